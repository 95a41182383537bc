"""One JSONL reader for everything eve-eval reads line by line (predictions to score, a run's
own records), so a bad line is `FILE:LINE: problem`, never a traceback or a skipped answer.

Every non-blank line must be UTF-8 JSON holding an object. The one exception is a last line
that is cut short (not JSON, or UTF-8 ending mid-character): that is what kill -9 or a full
disk leaves, so it comes back as a torn tail for the caller to drop (and a run to redo). A bad
line with anything after it, or a last line that is whole but wrong (`[1, 2]`, `42`, `null`,
a stray byte), cannot come from an interrupted append: an error.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path


class InputError(ValueError):
    """A file the user gave cannot be used as it is; the CLI prints this and exits 2."""


@dataclass
class Jsonl:
    path: Path
    rows: list[tuple[int, dict]] = field(default_factory=list)  # (line number from 1, object)
    good_bytes: int = 0  # the file up to the end of its last good line
    torn_line: int | None = None  # the cut-short last line, if any
    torn_problem: str = ""

    @property
    def torn(self) -> str:
        """`FILE:LINE: torn last line (...)`, or "" when the file ends cleanly."""
        if self.torn_line is None:
            return ""
        return f"{self.path}:{self.torn_line}: torn last line ({self.torn_problem})"


def kind(value) -> str:
    """A JSON value's type, as a message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}[type(value)]


def _parse(raw: bytes) -> tuple[dict | None, str, bool]:
    """(object, "", False), or (None, problem, whether an interrupted write could leave it)."""
    raw = raw.rstrip(b"\r\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}", e.reason == "unexpected end of data"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not JSON at column {e.colno}: {e.msg}", True
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {kind(value)}", False
    return value, "", False


def read_jsonl(path: Path) -> Jsonl:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    out = Jsonl(path)
    cut = None  # (line, problem) of a bad line a torn write could have left: fine only if last
    line = 0
    pos = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # as Windows editors save UTF-8
    while pos < len(data):
        newline = data.find(b"\n", pos)
        end = len(data) if newline < 0 else newline + 1
        line += 1
        if data[pos:end].strip():
            if cut:
                raise InputError(f"{path}:{cut[0]}: {cut[1]} (and it is not the last line)")
            value, problem, torn = _parse(data[pos:end])
            if value is not None:
                out.rows.append((line, value))
                out.good_bytes = end
            elif torn:
                cut = (line, problem)
            else:
                raise InputError(f"{path}:{line}: {problem}")
        pos = end
    if cut:
        out.torn_line, out.torn_problem = cut[0], f"{len(data) - out.good_bytes} bytes, {cut[1]}"
    return out


def drop_torn_tail(jsonl: Jsonl) -> int:
    """Cut a torn last line off the file, and end the last good line with a newline so the next
    append starts a line of its own. Returns the bytes dropped."""
    size = jsonl.path.stat().st_size
    with open(jsonl.path, "r+b") as f:
        f.truncate(jsonl.good_bytes)
        if jsonl.good_bytes:
            f.seek(jsonl.good_bytes - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return size - jsonl.good_bytes
