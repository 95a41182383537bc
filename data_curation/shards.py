"""Resumable sharded work: a shard is done exactly when its final file exists.

Every stage writes each shard to a hidden temporary file beside its final name and renames it
into place (`os.replace`, atomic on POSIX), so `kill -9` at any point leaves finished shards
whole and unfinished ones absent: a re-run skips the former and redoes the latter, losing and
duplicating nothing. Shard i of every stage derives from scan shard i, so stages join per shard
and memory stays bounded by a shard.

A stage folder also holds `settings.json` (what the stage was asked to do, with a fingerprint of
the stage it read from): re-running with other settings is refused instead of mixing shards made
two ways. `done.json` marks a finished stage and holds its counts. A lock file keeps two runs
from writing the same shards at once (filelock's; released by the kernel when a process dies, and
never held by the worker processes a run forks, so `kill -9` of a run never blocks the re-run).

JSON files are UTF-8. A file name that is not valid UTF-8 reaches Python as a str with lone
surrogates (surrogateescape); they are written as JSON escapes (`\\udcff`), which every JSON
reader turns back into the same str, and open() back into the original bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from filelock import FileLock, ReadWriteLock, Timeout

log = logging.getLogger("eve-curate")

# Seconds to sleep after each finished shard: lets tests kill a run mid-way reliably.
SHARD_DELAY_ENV = "EVE_CURATE_SHARD_DELAY"
_TMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.tmp(-journal)?$")
_SHARD_RE = re.compile(r"shard-(\d+)")


class CurationError(RuntimeError):
    """A problem the user has to act on (wrong order of stages, changed settings, bad input)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_index(name: str) -> int | None:
    m = _SHARD_RE.search(name)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it only when the block finishes; on an
    exception nothing is left behind, on `kill -9` a hidden `.name.PID.tmp` that the next run
    removes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def open_json_text(path: Path, mode: str = "r"):
    """A JSON file opened as UTF-8 text. Writing, lone surrogates (from file names that are not
    valid UTF-8) become `\\udcxx`: they only occur inside JSON strings, where that is their
    JSON escape, so the file stays valid UTF-8 and the names read back unchanged."""
    return open(path, mode, encoding="utf-8", errors="backslashreplace" if "w" in mode else "strict")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> int:
    """Streams `rows` into `path` (one JSON object a line); returns how many were written."""
    n = 0
    with atomic_path(path) as tmp, open_json_text(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp, open_json_text(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_jsonl(path: Path) -> Iterator[dict]:
    with open_json_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise CurationError(f"{path}:{n}: not JSON: {e}") from e


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CurationError(f"{path}: not JSON: {e}") from e


def pause_for_tests() -> None:
    delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


@dataclass(frozen=True)
class Part:
    """`--part I/N`: this process does the shards whose index is I modulo N, so N processes (one
    per GPU or node) share a stage; a run without --part (0/1) does all of them."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, spec: str | None) -> "Part":
        if not spec:
            return cls()
        try:
            i, n = (int(v) for v in spec.split("/"))
        except ValueError:
            raise CurationError(f"--part {spec!r}: expected I/N, e.g. 0/4") from None
        if not 0 <= i < n:
            raise CurationError(f"--part {spec!r}: need 0 <= I < N")
        return cls(i, n)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, index: int) -> bool:
        return index % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class StageDir:
    """One stage's folder under the curation output: settings, shards, completion marker."""

    def __init__(self, out: Path, name: str):
        self.out, self.name = Path(out), name
        self.path = self.out / name

    def shard(self, index: int, suffix: str) -> Path:
        return self.path / f"{shard_name(index)}{suffix}"

    # settings -------------------------------------------------------------------------------
    @property
    def settings_path(self) -> Path:
        return self.path / "settings.json"

    @property
    def started(self) -> bool:
        return self.settings_path.exists()

    def settings(self) -> dict:
        return read_json(self.settings_path) if self.started else {}

    def fingerprint(self) -> str:
        """Changes whenever this stage or any stage before it is redone with other settings."""
        return hashlib.sha1(self.settings_path.read_bytes()).hexdigest()[:16] if self.started else "none"

    def claim(self, settings: dict, upstream: list["StageDir"]) -> None:
        """Record what this stage does; refuse when earlier shards were made with other settings
        or from another version of the stage they read."""
        wanted = {"settings": settings, "upstream": {u.name: u.fingerprint() for u in upstream}}
        wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as they read back
        if self.started:
            have = self.settings()
            if have != wanted:
                diff = _differences(have, wanted)
                raise CurationError(
                    f"{self.path} was made with other settings ({'; '.join(diff)}). Use another --out, or delete "
                    f"{self.path} and the stages after it to redo them."
                )
            return
        write_json_atomic(self.settings_path, wanted)

    # completion ----------------------------------------------------------------------------
    @property
    def done_path(self) -> Path:
        return self.path / "done.json"

    @property
    def complete(self) -> bool:
        return self.done_path.exists()

    def done_info(self) -> dict:
        return read_json(self.done_path) if self.complete else {}

    def mark_complete(self, info: dict) -> None:
        write_json_atomic(self.done_path, info)

    def require_complete(self, needed_by: str) -> None:
        if not self.complete:
            raise CurationError(
                f"{needed_by} needs the {self.name} stage to be finished in {self.out}: run "
                f"`eve-curate {self.name} --out {self.out}` first (it resumes where it stopped)"
            )

    # interrupted runs ----------------------------------------------------------------------
    def remove_partial(self, part: Part = Part()) -> int:
        """Delete temporary files an interrupted run left (only this part's shards when split)."""
        if not self.path.exists():
            return 0
        removed = 0
        for p in self.path.rglob(".*.tmp*"):
            m = _TMP_RE.match(p.name)
            if not m or not p.is_file():
                continue
            index = shard_index(m.group("final"))
            if part.whole or (index is not None and part.owns(index)):
                p.unlink()
                removed += 1
        if removed:
            log.info("%s: removed %d temporary file(s) of an interrupted run", self.name, removed)
        return removed


@contextlib.contextmanager
def run_lock(out: Path, stage: str, part: Part = Part()) -> Iterator[None]:
    """One writer per stage (or per part of a split stage). A run without --part excludes every
    other run on the same output; runs of different parts of one stage may run side by side.
    Never waits: a held lock is refused at once with a CurationError.

    All filelock, nothing hand-written: the output's lock is a `ReadWriteLock` (an SQLite
    transaction, i.e. POSIX record locks; shared for a part, exclusive for a whole stage), a part's
    own lock a `FileLock` (flock). The kernel drops both when the process dies (kill -9 included),
    and neither stays held by the workers a stage forks: POSIX locks are not inherited, and
    FileLock closes its descriptor in forked children (filelock >= 3.30). The bare `fcntl.flock`
    used before was inherited by filtering's pool, whose orphans kept the lock after kill -9 and
    got the re-run refused. `is_singleton=False`: with the default, a second run_lock in the same
    process would nest in the first one's hold instead of being refused.
    """
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        path = out / ".eve-curate.lock"
        lock = ReadWriteLock(path, is_singleton=False)
        held.callback(lock.close)  # releases the hold, closes the database
        acquire = lock.acquire_write if part.whole else lock.acquire_read
        _acquire(lambda: acquire(blocking=False), path, f"{stage} on {out}")
        if not part.whole:
            (out / stage).mkdir(exist_ok=True)
            path = out / stage / f".lock-part-{part.index}-of-{part.count}"
            part_lock = FileLock(path, blocking=False)
            _acquire(part_lock.acquire, path, f"{stage} part {part} on {out}")
            held.callback(part_lock.release)
        yield


def _acquire(acquire, path: Path, what: str) -> None:
    try:
        acquire()
    except Timeout:
        raise CurationError(f"another eve-curate is running {what} (lock {path}); wait for it or stop it") from None


def _differences(have: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(have) | set(wanted)):
        a, b = have.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return out
