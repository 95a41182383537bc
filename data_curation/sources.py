"""Stage 1, scan: list images from folders, webdataset tar shards and img2dataset-style parquet,
give each a stable uid and read its size from the header (no full decode).

An item: {"uid", "source", "ref", "width", "height"}; `ref` is a file path, or "shard.tar#member"
for an image inside a tar. The uid hashes the source name and the image's key within it, so it
does not change between runs or machines.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import tarfile
from pathlib import Path
from typing import Iterator

from PIL import Image
from tqdm import tqdm

from data_curation.shards import shard_name, shards, write_jsonl_atomic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def make_uid(source: str, key: str) -> str:
    return hashlib.sha1(f"{source}/{key}".encode()).hexdigest()[:20]


def parse_inputs(specs: list[str]) -> list[tuple[str, Path]]:
    """`name=path` (or just `path`, named after its folder) -> (source name, path)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not Path(path).exists():
            raise FileNotFoundError(f"input {spec!r}: {path} does not exist")
        out.append((name, Path(path).resolve()))  # refs stay valid from any working directory
    return out


def iter_refs(source: str, path: Path) -> Iterator[tuple[str, str]]:
    """(key, ref) of every image in a folder (recursively), a .tar, a folder of .tar shards,
    or an img2dataset parquet (its `key` column; images as <key>.<ext> beside it)."""
    if path.is_file() and path.suffix == ".tar":
        yield from _tar_refs(path, path.name)
    elif path.is_file() and path.suffix == ".parquet":
        yield from _parquet_refs(path)
    else:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                rel = str(full.relative_to(path))
                if full.suffix.lower() in IMAGE_EXTENSIONS:
                    yield rel, str(full)
                elif full.suffix == ".tar":
                    yield from _tar_refs(full, rel)
                elif full.suffix == ".parquet":
                    yield from _parquet_refs(full)


def _tar_refs(tar_path: Path, key_prefix: str) -> Iterator[tuple[str, str]]:
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                yield f"{key_prefix}#{member.name}", f"{tar_path}#{member.name}"


def _parquet_refs(path: Path) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["key"])
    for key in table.column("key").to_pylist():
        found = next((path.parent / f"{key}{ext}" for ext in (".jpg", ".png", ".webp", ".jpeg")
                      if (path.parent / f"{key}{ext}").exists()), path.parent / f"{key}.jpg")
        yield f"{path.name}:{key}", str(found)


def read_bytes(ref: str) -> bytes:
    """The encoded bytes of an item (a file, or a member of a tar)."""
    if "#" in ref and ref.split("#", 1)[0].endswith(".tar"):
        tar_path, member = ref.split("#", 1)
        with tarfile.open(tar_path) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise FileNotFoundError(f"{member} is not a file in {tar_path}")
            return f.read()
    return Path(ref).read_bytes()


def header_size(ref: str) -> tuple[int | None, int | None]:
    try:
        with Image.open(io.BytesIO(read_bytes(ref))) as img:
            return img.size
    except Exception:  # noqa: BLE001 - the filter stage decodes and records the reason
        return None, None


def scan(inputs: list[str], out: Path, shard_size: int = 1000) -> int:
    """Write scan/shard-*.jsonl; finished shards are skipped. Returns the number of items."""
    folder = out / "scan"
    done = {p.stem for p in shards(folder)}
    refs = ((source, key, ref) for source, path in parse_inputs(inputs) for key, ref in iter_refs(source, path))
    total = 0
    with tqdm(desc="scan", unit="img") as bar:
        for index in itertools.count():
            chunk = list(itertools.islice(refs, shard_size))
            if not chunk:
                break
            total += len(chunk)
            if shard_name(index) not in done:
                rows = []
                for source, key, ref in chunk:
                    w, h = header_size(ref)
                    rows.append({"uid": make_uid(source, key), "source": source, "ref": ref, "width": w, "height": h})
                write_jsonl_atomic(folder / f"{shard_name(index)}.jsonl", rows)
            bar.update(len(chunk))
    return total
