"""Resumable sharded work: a shard is done exactly when its output file exists.

Every stage writes each shard to a temporary file and renames it into place (atomic on POSIX),
so `kill -9` at any point leaves finished shards whole and unfinished ones absent: a re-run
skips the former and redoes the latter, losing and duplicating nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_npy_atomic(path: Path, array) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: {e}") from e


def shards(folder: Path, suffix: str = ".jsonl") -> list[Path]:
    """The finished shard files of a stage, in order."""
    return sorted(folder.glob(f"shard-*{suffix}")) if folder.exists() else []


def remove_partial(folder: Path) -> int:
    """Delete temporary files a killed run left behind (one writer per output folder)."""
    if not folder.exists():
        return 0
    stale = [p for p in folder.rglob("*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink()
    return len(stale)
