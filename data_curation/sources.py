"""Stage 1, scan: list the images of every input, give each a stable uid and read its size from
the header (Pillow opens lazily: no full decode here; the filter stage decodes).

Inputs (`--input NAME=PATH`, repeatable; NAME is the source, e.g. laion):
- a folder, walked recursively in sorted order: image files, `.tar` shards (webdataset), and
  img2dataset-style `.parquet` files (a `key` column, optionally `caption`, `url`, `status`,
  `error_message`) whose images are in the tar of the same name (`00000.parquet` +
  `00000.tar`, img2dataset's webdataset layout), in the folder of the same name
  (`00000.parquet` + `00000/`, its files layout) or beside the parquet (`<key>.<ext>`). A
  parquet's images are listed once, through the parquet, with its caption and url; a parquet
  row without an image becomes an item that the filter rejects as `missing`; images in a
  companion tar or folder that the parquet does not name are listed too.
- a single `.tar`, `.parquet` or image file.

An item: {"uid", "source", "key", "ref", "width", "height"} (+ "tar_offset"/"tar_size" for a
tar member, read with one seek; + "meta" from the parquet). `ref` is an absolute path, or
"shard.tar#member" (the form train/ reads). The uid hashes the source name and the key (the
path relative to the input), so it is the same on every run and machine.
"""

from __future__ import annotations

import array
import hashlib
import io
import itertools
import os
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_curation.progress import bar, stage_log
from data_curation.shards import CurationError, StageDir, pause_for_tests, write_jsonl_atomic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PARQUET_META_COLUMNS = ("caption", "url", "status", "error_message")
log = stage_log("scan")


@dataclass(frozen=True)
class Input:
    name: str
    path: Path


def parse_inputs(specs: list[str]) -> list[Input]:
    """`name=path` (or a bare path, named after its last component) -> inputs; paths are made
    absolute so the refs stay valid from any working directory."""
    inputs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise CurationError(f"--input {spec!r}: expected NAME=PATH")
        if not Path(path).exists():
            raise CurationError(f"--input {spec!r}: {path} does not exist")
        inputs.append(Input(name, Path(path).resolve()))
    names = Counter(i.name for i in inputs)
    if any(n > 1 for n in names.values()):
        raise CurationError(f"two inputs share a source name: {sorted(k for k, n in names.items() if n > 1)}")
    return inputs


def make_uid(source: str, key: str) -> str:
    return hashlib.sha1(f"{source}/{key}".encode()).hexdigest()[:20]


def _item(source: str, key: str, ref: str | None, **extra) -> dict:
    extra = {k: v for k, v in extra.items() if v is not None}
    return {"uid": make_uid(source, key), "source": source, "key": key, "ref": ref, **extra}


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


# listing --------------------------------------------------------------------------------------
def list_items(inp: Input) -> Iterator[dict]:
    """Every image of one input, in a deterministic order (sizes not read yet)."""
    root = inp.path
    if root.is_dir():
        yield from _folder_items(inp.name, root)
    elif root.suffix == ".tar":
        yield from _tar_items(inp.name, root, root.name)
    elif root.suffix == ".parquet":
        yield from _parquet_items(inp.name, root, root.name, _companion(root))
    elif _is_image(root.name):
        yield _item(inp.name, root.name, str(root))
    else:
        raise CurationError(f"input {inp.name}={root}: not a folder, .tar, .parquet or image file")


def _companion(parquet: Path) -> tuple[str, Path]:
    """Where a parquet's images are: ("tar", x.tar), ("dir", x/) or ("same", its folder)."""
    if parquet.with_suffix(".tar").is_file():
        return "tar", parquet.with_suffix(".tar")
    if parquet.with_suffix("").is_dir():
        return "dir", parquet.with_suffix("")
    return "same", parquet.parent


def _folder_items(source: str, root: Path) -> Iterator[dict]:
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = sorted(f for f in files if not f.startswith("."))
        companions = {p: _companion(here / p) for p in names if p.endswith(".parquet")}
        claimed_files = {c.name for kind, c in companions.values() if kind == "tar"}
        claimed_dirs = {c.name for kind, c in companions.values() if kind == "dir"}
        for p, (kind, _) in companions.items():
            if kind == "same":  # images beside the parquet are listed through it
                keys = {str(k) for k in _parquet_keys(here / p)}
                claimed_files |= {n for n in names if _is_image(n) and Path(n).stem in keys}
        dirs[:] = [d for d in dirs if d not in claimed_dirs]  # walked through their parquet
        for name in names:
            full = here / name
            rel = full.relative_to(root).as_posix()
            if name in companions:
                yield from _parquet_items(source, full, rel, companions[name])
            elif name in claimed_files:
                continue
            elif name.endswith(".tar"):
                yield from _tar_items(source, full, rel)
            elif _is_image(name):
                yield _item(source, rel, str(full))


def _tar_members(tar_path: Path) -> Iterator[tarfile.TarInfo]:
    """The image members of an uncompressed tar, in order; a truncated tar yields what it has."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError as e:
                    log.warning("%s: unreadable after some members (%s); listed the members before it", tar_path, e)
                    return
                if member is None:
                    return
                if member.isfile() and _is_image(member.name):
                    yield member
    except tarfile.ReadError as e:
        raise CurationError(f"{tar_path}: not a readable uncompressed tar ({e}); webdataset shards are plain .tar files: "
                            "fix or move this file and re-run the scan") from e


def _tar_items(source: str, tar_path: Path, rel: str) -> Iterator[dict]:
    for m in _tar_members(tar_path):
        yield _item(source, f"{rel}#{m.name}", f"{tar_path}#{m.name}", tar_offset=m.offset_data, tar_size=m.size)


def _parquet_keys(path: Path) -> list:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if "key" not in schema.names:
        raise CurationError(f"{path}: no 'key' column (expected img2dataset's layout: key, url, caption, ...)")
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


def _parquet_items(source: str, path: Path, rel: str, companion: tuple[str, Path]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    kind, where = companion
    keys = _parquet_keys(path)  # also checks the schema
    if kind == "tar":
        members = {m.name.rsplit(".", 1)[0]: m for m in _tar_members(where)}
        located = {k: (f"{where}#{m.name}", m.offset_data, m.size) for k, m in members.items()}
    else:
        files = sorted(where.rglob("*") if kind == "dir" else where.iterdir())
        located = {f.relative_to(where).with_suffix("").as_posix(): (str(f), None, None)
                   for f in files if f.is_file() and _is_image(f.name)}
    meta_cols = [c for c in PARQUET_META_COLUMNS if c in pq.read_schema(path).names]
    metas = pq.read_table(path, columns=meta_cols).to_pylist() if meta_cols else [{}] * len(keys)
    used = set()
    for row, (key, meta) in enumerate(zip(keys, metas)):
        key = str(key) if key is not None else f"row{row}"
        failed = meta.get("status") not in (None, "success")
        meta = {k: v for k, v in meta.items() if v is not None and (failed or k not in ("status", "error_message"))}
        found = located.get(key)
        if found is None:
            why = f"{path} row {row}: no image for key {key!r} in {where}"
            if meta.get("error_message"):
                why += f" ({meta['error_message']})"
            yield _item(source, f"{rel}:{key}", None, meta=meta or None, detail=why)
            continue
        used.add(key)
        ref, offset, size = found
        yield _item(source, f"{rel}:{key}", ref, tar_offset=offset, tar_size=size, meta=meta or None)
    if kind == "same":
        return  # the folder walk lists the other images beside the parquet
    leftovers = sorted(set(located) - used)
    if leftovers:
        log.info("%s: %d image(s) in %s that the parquet does not name are listed too", path, len(leftovers), where)
    root_rel = Path(rel).parent / where.name
    for k in leftovers:
        ref, offset, size = located[k]
        member = ref.split("#", 1)[1] if kind == "tar" else Path(ref).relative_to(where).as_posix()
        yield _item(source, f"{root_rel.as_posix()}{'#' if kind == 'tar' else '/'}{member}", ref, tar_offset=offset, tar_size=size)


# reading --------------------------------------------------------------------------------------
def read_item_bytes(item: dict) -> bytes:
    """The encoded bytes of an item: one seek into its tar, or the file. FileNotFoundError when
    it has no image (a parquet row whose download failed) or the file is gone."""
    ref = item.get("ref")
    if ref is None:
        raise FileNotFoundError(item.get("detail") or f"item {item.get('uid')} has no image")
    if "tar_offset" in item:
        tar_path = ref.split("#", 1)[0]
        with open(tar_path, "rb") as f:
            f.seek(item["tar_offset"])
            return f.read(item["tar_size"])  # short when the tar is truncated: a decode error later
    return read_ref_bytes(ref)


def read_ref_bytes(ref: str) -> bytes:
    """A path, or "x.tar#member" (found by walking the tar's headers)."""
    if "#" in ref and ref.split("#", 1)[0].endswith(".tar"):
        tar_path, member = ref.split("#", 1)
        with tarfile.open(tar_path, "r:") as tar:
            try:
                f = tar.extractfile(member)
            except KeyError:
                f = None
            if f is None:
                raise FileNotFoundError(f"no file member {member!r} in {tar_path}")
            return f.read()
    return Path(ref).read_bytes()


def header_size(item: dict) -> tuple[int | None, int | None]:
    """(width, height) from the image header, or (None, None) when it cannot be read (the filter
    stage decodes the image and records why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb warnings: the filter stage decides
            if "tar_offset" in item or item.get("ref") is None:
                with Image.open(io.BytesIO(read_item_bytes(item))) as img:
                    return img.size
            with Image.open(item["ref"]) as img:
                return img.size
    except Exception:  # noqa: BLE001 - recorded by the filter stage, never fatal here
        return None, None


# the stage ------------------------------------------------------------------------------------
def scan_stage(out: Path, inputs: list[str], shard_size: int = 5000) -> dict:
    """Write scan/shard-*.jsonl (every listed image, sizes from headers); finished shards are
    skipped. Returns the counts recorded in scan/done.json."""
    stage = StageDir(out, "scan")
    parsed = parse_inputs(inputs)
    if shard_size < 1:
        raise CurationError("--shard-size must be >= 1")
    stage.claim({"inputs": [[i.name, str(i.path)] for i in parsed], "shard_size": shard_size}, upstream=[])
    if stage.complete:
        log.info("already finished: %s", stage.done_info()["items"])
        return stage.done_info()
    stage.remove_partial()
    items = itertools.chain.from_iterable(list_items(i) for i in parsed)
    sizes, by_source, written = [], Counter(), 0
    uid_hashes = array.array("Q")
    with bar(None, "scan", "img") as progress:
        for index in itertools.count():
            chunk = list(itertools.islice(items, shard_size))
            if not chunk:
                break
            sizes.append(len(chunk))
            by_source.update(it["source"] for it in chunk)
            uid_hashes.extend(int(it["uid"][:16], 16) for it in chunk)
            target = stage.shard(index, ".jsonl")
            if not target.exists():
                rows = []
                for it in chunk:
                    w, h = header_size(it)
                    rows.append({**it, "width": w, "height": h})
                write_jsonl_atomic(target, rows)
                written += 1
                pause_for_tests()
            progress.update(len(chunk))
    _check_unique(np.frombuffer(uid_hashes, dtype=np.uint64))
    info = {"items": sum(sizes), "shards": len(sizes), "shard_sizes": sizes, "by_source": dict(sorted(by_source.items()))}
    stage.mark_complete(info)
    log.info("listed %d images from %d input(s) into %d shard(s) (%d written now, the rest were done): %s",
             info["items"], len(parsed), len(sizes), written, info["by_source"])
    return info


def _check_unique(hashes: np.ndarray) -> None:
    """Two items with one uid would be counted once downstream: refuse (8 bytes per item)."""
    values, counts = np.unique(hashes, return_counts=True)
    if (counts > 1).any():
        raise CurationError(f"{int((counts > 1).sum())} uid(s) listed twice (an image reachable through two inputs of one source?)")


def scan_shard_count(out: Path) -> int:
    stage = StageDir(out, "scan")
    stage.require_complete("this stage")
    return int(stage.done_info()["shards"])
