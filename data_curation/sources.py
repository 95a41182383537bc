"""Stage 1, scan: list the images of every input, give each a stable uid and read its size from
the header (Pillow opens lazily: no full decode here; the filter stage decodes).

Inputs (`--input NAME=PATH`, repeatable; NAME is the source, e.g. laion):
- a folder, walked recursively in sorted order: image files, `.tar` shards (webdataset), and
  img2dataset-style `.parquet` files (a `key` column, optionally `caption`, `url`, `status`,
  `error_message`; see parquets.py). A parquet's images are in the parquet itself (a binary
  `jpg`, `png` or `webp` column: img2dataset's `--output_format parquet`), else in the tar of
  the same name (`00000.parquet` + `00000.tar`, its webdataset layout), in the folder of the
  same name (`00000.parquet` + `00000/`, its files layout) or beside the parquet
  (`<key>.<ext>`). A parquet's images are listed once, through the parquet, with its caption
  and url; images in a companion tar or folder that the parquet does not name are listed too.
- a single `.tar`, `.parquet` or image file.

Nothing found is dropped silently: what is named like an image (or is a container) but cannot be
one is listed as an item that already carries its rejection, `reason` and `detail` (naming the
file, row or member), which the filter stage records as it is:
  missing                a parquet row without an image (null bytes, a failed download, none in
                         its companion), a broken symbolic link
  empty                  a parquet row with zero bytes
  not_a_file             a FIFO, socket, device or link where an image was expected (only
                         regular files are ever opened: a FIFO would block a reader forever)
  unreadable             a file or folder this user cannot read
  unreadable_container   a tar or parquet that cannot be read, or stops being readable
                         part-way: one item for the file with the library's error; what was
                         readable before that point is listed
  unsupported_container  a compressed archive (.tar.gz, .zip, ...), a parquet without `key`
  duplicate_name         a tar member whose name repeats (readers use the last one) or a
                         parquet row repeating an earlier key
  ambiguous_path         a path holding ".tar#", which a reference cannot tell from a tar member
What is not named like an image (webdataset sidecars, tar directory members, hidden files, other
files) is counted in scan/done.json's "skipped", as are symlinked folders (not followed).

An item: {"uid", "source", "key", "ref", "width", "height"} (+ "tar_offset"/"tar_size" for a
tar member, read with one seek; + "parquet_column"/"parquet_row_group"/"parquet_row" for an
image held in a parquet, read with its row group, ref "x.parquet#row=N"; + "meta" from the
parquet; + "reason"/"detail" for one that cannot be used). `ref` is an absolute path, or
"shard.tar#member" (the form train/ reads). The uid hashes the source name and the key (the
path relative to the input), so it is the same on every run and machine. File names that are
not valid UTF-8 are kept as Python's os functions give them (with surrogateescape): the uid
hashes their original bytes, and JSON escapes them so they read back to the same file.

Memory: a tar's member headers, a parquet's keys and one row group at a time. Reading an item's
bytes back is reading.py's; export.py copies the images held in a parquet into tars that train/
can read.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from data_curation import parquets
from data_curation.parquets import ParquetError, ParquetLayout
from data_curation.progress import bar, stage_log
from data_curation.reading import PARQUET_ROW_MARK, ItemReader, header_size, image_size
from data_curation.shards import CurationError, StageDir, pause_for_tests, read_jsonl, write_jsonl_atomic
from data_curation.tars import TarListing, Unusable, list_tar
from eve.image_ref import NotRegularFileError, TAR_MARK, file_kind, join_ref, open_regular_file, split_ref

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Archives the scan cannot read inside: listed as unsupported_container instead of ignored.
UNSUPPORTED_CONTAINERS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst",
                          ".tar.lz4", ".zip", ".7z", ".rar")
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
        if not Path(path).is_dir() and not Path(path).is_file():
            raise CurationError(f"--input {spec!r}: {path} is neither a folder nor a regular file")
        inputs.append(Input(name, Path(path).resolve()))
    names = Counter(i.name for i in inputs)
    if any(n > 1 for n in names.values()):
        raise CurationError(f"two inputs share a source name: {sorted(k for k, n in names.items() if n > 1)}")
    return inputs


def make_uid(source: str, key: str) -> str:
    # surrogateescape: a name that is not UTF-8 hashes as its bytes on disk (os.fsencode's way)
    return hashlib.sha1(f"{source}/{key}".encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _item(source: str, key: str, ref: str | None, **extra) -> dict:
    extra = {k: v for k, v in extra.items() if v is not None}
    return {"uid": make_uid(source, key), "source": source, "key": key, "ref": ref, **extra}


def _unusable_item(source: str, key: str, ref: str | None, reason: str, detail: str, **extra) -> dict:
    return _item(source, key, ref, **extra, reason=reason, detail=detail)


def _kind_of(name: str) -> str | None:
    """What a file name says the file is: image, tar, parquet, unsupported (archive) or None."""
    lower = name.lower()
    if lower.endswith(UNSUPPORTED_CONTAINERS):
        return "unsupported"
    if lower.endswith(".tar"):
        return "tar"
    if lower.endswith(".parquet"):
        return "parquet"
    return "image" if _is_image(name) else None


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


# files ---------------------------------------------------------------------------------------
def _unusable_file(path: Path) -> tuple[str, str] | None:
    """(reason, detail) when `path` cannot be opened as a regular file, without opening it."""
    try:
        mode = path.stat().st_mode  # follows symlinks: one to an image is that image
    except FileNotFoundError:
        return "missing", f"{path}: a broken symbolic link"
    except OSError as e:
        return "unreadable", f"{path}: {e.strerror or e}"
    if stat.S_ISREG(mode):
        return None
    return "not_a_file", f"{path} is not a regular file ({file_kind(mode)})"


# listing --------------------------------------------------------------------------------------
def list_items(inp: Input, skipped: Counter | None = None) -> Iterator[dict]:
    """Every image of one input, in a deterministic order (sizes not read yet, except for images
    held in a parquet). What is not an image is counted in `skipped`."""
    skipped = Counter() if skipped is None else skipped
    root = inp.path
    kind = None if root.is_dir() else _kind_of(root.name)
    if root.is_dir():
        yield from _folder_items(inp.name, root, skipped)
    elif kind in ("tar", "image", "unsupported"):
        yield from _file_items(inp.name, root, root.name, kind, skipped)
    elif kind == "parquet":
        yield from _parquet_items(inp.name, root, root.name, _parquet_plan(root), skipped)
    else:
        raise CurationError(f"input {inp.name}={root}: not a folder, .tar, .parquet or image file")


@dataclass(frozen=True)
class ParquetPlan:
    layout: ParquetLayout
    companion: tuple[str, Path]  # ("bytes", itself), ("tar", x.tar), ("dir", x/) or ("same", its folder)


def _parquet_plan(parquet: Path) -> ParquetPlan | ParquetError:
    """How to read a parquet's images, or why it cannot be read (recorded when it is listed)."""
    try:
        with open_regular_file(parquet) as f:
            layout = parquets.read_layout(f, str(parquet))
    except OSError as e:
        return ParquetError("unreadable", f"{parquet}: {e.strerror or e}")
    except NotRegularFileError as e:
        return ParquetError("not_a_file", str(e))
    except ParquetError as e:
        return e
    if layout.image_column:
        companion = ("bytes", parquet)
    elif parquet.with_suffix(".tar").is_file():
        companion = ("tar", parquet.with_suffix(".tar"))
    elif parquet.with_suffix("").is_dir():
        companion = ("dir", parquet.with_suffix(""))
    else:
        companion = ("same", parquet.parent)
    return ParquetPlan(layout, companion)


def _folder_items(source: str, root: Path, skipped: Counter) -> Iterator[dict]:
    walk_errors: list[OSError] = []
    for dirpath, dirs, files in os.walk(root, onerror=walk_errors.append):
        yield from _walk_error_items(source, root, walk_errors)
        here = Path(dirpath)
        skipped["hidden"] += sum(n.startswith(".") for n in dirs + files)
        skipped["linked_folders"] += sum((here / d).is_symlink() for d in dirs)  # os.walk does not enter them
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = sorted(f for f in files if not f.startswith("."))
        kinds = {n: _kind_of(n) for n in names}
        skipped["other_files"] += sum(k is None for k in kinds.values())
        plans = {n: _parquet_plan(here / n) for n in names if kinds[n] == "parquet" and _unusable_file(here / n) is None}
        claimed_files = {p.companion[1].name for p in plans.values() if isinstance(p, ParquetPlan) and p.companion[0] == "tar"}
        claimed_dirs = {p.companion[1].name for p in plans.values() if isinstance(p, ParquetPlan) and p.companion[0] == "dir"}
        for n, plan in plans.items():
            if isinstance(plan, ParquetPlan) and plan.companion[0] == "same":  # images beside it are listed through it
                keys = {str(k) for k in _parquet_keys(here / n)}
                claimed_files |= {f for f in names if kinds[f] == "image" and Path(f).stem in keys}
        dirs[:] = [d for d in dirs if d not in claimed_dirs]  # walked through their parquet
        for name in names:
            full, kind = here / name, kinds[name]
            rel = full.relative_to(root).as_posix()
            if kind is None or name in claimed_files:
                continue
            if kind == "parquet" and name in plans:
                yield from _parquet_items(source, full, rel, plans[name], skipped)
            else:
                yield from _file_items(source, full, rel, kind, skipped)
    yield from _walk_error_items(source, root, walk_errors)


def _walk_error_items(source: str, root: Path, errors: list[OSError]) -> Iterator[dict]:
    """A folder the walk could not list (os.walk skips it quietly otherwise)."""
    for e in errors:
        where = Path(e.filename) if e.filename else root
        rel = where.relative_to(root).as_posix() if where != root else "."
        yield _unusable_item(source, f"{rel}/", str(where), "unreadable", f"{where}: cannot list this folder: {e.strerror or e}")
    errors.clear()


def _file_items(source: str, full: Path, rel: str, kind: str, skipped: Counter) -> Iterator[dict]:
    """The items of one file named like an image, tar, archive or parquet: its own, or one item
    saying why it cannot be read."""
    problem = _unusable_file(full)
    if problem is None and kind == "unsupported":
        problem = ("unsupported_container", f"{full}: a compressed archive; eve-curate reads images, plain .tar shards "
                                            "and parquet: unpack it (e.g. gunzip x.tar.gz -> x.tar) and scan again")
    if problem is None and kind in ("image", "tar") and TAR_MARK in str(full):
        problem = ("ambiguous_path", f"{full}: holds {TAR_MARK!r}, so its reference would read as a tar member: rename it")
    if problem is not None:
        yield _unusable_item(source, rel, str(full), *problem)
    elif kind == "tar":
        yield from _tar_items(source, full, rel, skipped)
    elif kind == "parquet":
        yield from _parquet_items(source, full, rel, _parquet_plan(full), skipped)
    else:
        yield _item(source, rel, str(full))


def _list_tar(tar_path: Path) -> TarListing:
    try:
        with open_regular_file(tar_path) as f:
            return list_tar(f, str(tar_path), _is_image)
    except NotRegularFileError as e:
        return TarListing(unusable=[Unusable(None, "not_a_file", str(e))])
    except OSError as e:
        return TarListing(unusable=[Unusable(None, "unreadable", f"{tar_path}: {e.strerror or e}")])


def _tar_items(source: str, tar_path: Path, rel: str, skipped: Counter) -> Iterator[dict]:
    listing = _list_tar(tar_path)
    skipped.update(listing.skipped)
    for m in listing.members:
        yield _item(source, join_ref(rel, m.name), join_ref(tar_path, m.name), tar_offset=m.offset_data, tar_size=m.size)
    yield from _tar_unusable_items(source, tar_path, rel, listing)


def _tar_unusable_items(source: str, tar_path: Path, rel: str, listing: TarListing) -> Iterator[dict]:
    for u in listing.unusable:
        if u.name is None:
            log.warning("%s", u.detail)  # a whole container: its images may be many
            yield _unusable_item(source, rel, str(tar_path), u.reason, u.detail)
        else:
            yield _unusable_item(source, join_ref(rel, u.name), join_ref(tar_path, u.name), u.reason, u.detail)


def _parquet_keys(path: Path) -> list:
    """The keys of a parquet, [] when it cannot be read (it is recorded when it is listed)."""
    try:
        with open_regular_file(path) as f:
            return parquets.read_keys(f, str(path))
    except (OSError, NotRegularFileError, ParquetError):
        return []


def _parquet_items(source: str, path: Path, rel: str, plan: ParquetPlan | ParquetError, skipped: Counter) -> Iterator[dict]:
    if isinstance(plan, ParquetError):
        log.warning("%s", plan.detail)
        yield _unusable_item(source, rel, str(path), plan.reason, plan.detail)
        return
    kind, where = plan.companion
    tar_listing = None
    located: dict[str, Located] = {}  # key -> where its image is
    if kind == "tar":
        tar_listing = _list_tar(where)
        skipped.update(tar_listing.skipped)
        located = {m.name.rsplit(".", 1)[0]: Located(join_ref(where, m.name), m.offset_data, m.size) for m in tar_listing.members}
    elif kind in ("dir", "same"):
        files = sorted(where.rglob("*") if kind == "dir" else where.iterdir())
        located = {f.relative_to(where).with_suffix("").as_posix(): Located(str(f), problem=_unusable_file(f))
                   for f in files if _is_image(f.name)}
    used: set[str] = set()
    yield from _parquet_rows(source, path, rel, plan, located, used)
    root_rel = Path(rel).parent / where.name
    if tar_listing is not None:
        yield from _tar_unusable_items(source, where, root_rel.as_posix(), tar_listing)
    if kind in ("same", "bytes"):
        return  # the folder walk lists the other images beside the parquet
    leftovers = sorted(set(located) - used)
    if leftovers:
        log.info("%s: %d image(s) in %s that the parquet does not name are listed too", path, len(leftovers), where)
    for k in leftovers:
        found = located[k]
        if kind == "tar":
            key = join_ref(root_rel.as_posix(), split_ref(found.ref)[1])
        else:
            key = f"{root_rel.as_posix()}/{Path(found.ref).relative_to(where).as_posix()}"
        yield found.item(source, key)


@dataclass(frozen=True)
class Located:
    """Where a parquet row's image is, in its companion tar or folder."""

    ref: str
    tar_offset: int | None = None
    tar_size: int | None = None
    problem: tuple[str, str] | None = None  # (reason, detail): a FIFO named like the image, ...

    def item(self, source: str, key: str, **extra) -> dict:
        if self.problem:
            return _unusable_item(source, key, self.ref, *self.problem, **extra)
        return _item(source, key, self.ref, tar_offset=self.tar_offset, tar_size=self.tar_size, **extra)


def _parquet_rows(source: str, path: Path, rel: str, plan: ParquetPlan, located: dict, used: set[str]) -> Iterator[dict]:
    """One item per row, reading one row group at a time; a row group that cannot be read ends
    the listing with one unreadable_container item for the rest of the file."""
    layout, row = plan.layout, 0
    first_row: dict[str, int] = {}
    try:
        f = open_regular_file(path)
    except (OSError, NotRegularFileError) as e:  # replaced since its layout was read
        yield _unusable_item(source, rel, str(path), "unreadable_container", f"{path}: {e}")
        return
    with f:
        groups = parquets.iter_row_groups(f, str(path), layout)
        while True:
            try:
                group = next(groups, None)
            except ParquetError as e:
                detail = f"{e.detail}; rows {row} to {layout.rows - 1} are lost, the {row} before are listed"
                log.warning("%s", detail)
                yield _unusable_item(source, rel, str(path), e.reason, detail)
                return
            if group is None:
                return
            g, table = group
            keys = table.column("key").to_pylist()
            metas = table.select(list(layout.meta_columns)).to_pylist() if layout.meta_columns else [{}] * len(keys)
            images = table.column(layout.image_column) if layout.image_column else None
            for i, (key, meta) in enumerate(zip(keys, metas, strict=True)):
                key = str(key) if key is not None else f"row{row}"
                failed = meta.get("status") not in (None, "success")
                meta = {k: v for k, v in meta.items() if v is not None and (failed or k not in ("status", "error_message"))}
                if key in first_row:
                    yield _unusable_item(source, f"{rel}:{key}@row{row}", f"{path}{PARQUET_ROW_MARK}{row}", "duplicate_name",
                                         f"{path} row {row}: key {key!r} repeats row {first_row[key]}", meta=meta or None)
                else:
                    first_row[key] = row
                    yield _parquet_row_item(source, path, rel, key, row, meta, plan.companion[1], located, used,
                                            (layout.image_column, g, i, images[i].as_py()) if images is not None else None)
                row += 1


def _parquet_row_item(source: str, path: Path, rel: str, key: str, row: int, meta: dict, where: Path, located: dict,
                      used: set[str], held: tuple | None) -> dict:
    """The item of one parquet row; `held`: (column, row group, index, bytes) when the parquet
    holds the image."""
    item_key, meta = f"{rel}:{key}", meta or None
    why = f" ({meta['error_message']})" if meta and meta.get("error_message") else ""
    if held is not None:
        column, g, i, data = held
        ref = f"{path}{PARQUET_ROW_MARK}{row}"
        if data is None:
            return _unusable_item(source, item_key, None, "missing", f"{path} row {row}: no image (null {column!r}){why}",
                                  meta=meta)
        if not data:
            return _unusable_item(source, item_key, ref, "empty", f"{path} row {row}: zero bytes in {column!r}", meta=meta)
        w, h = image_size(data)
        return _item(source, item_key, ref, parquet_column=column, parquet_row_group=g, parquet_row=i, width=w, height=h,
                     meta=meta)
    found = located.get(key)
    if found is None:
        return _unusable_item(source, item_key, None, "missing", f"{path} row {row}: no image for key {key!r} in {where}{why}",
                              meta=meta)
    used.add(key)
    return found.item(source, item_key, meta=meta)


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
    skipped: Counter = Counter()
    items = itertools.chain.from_iterable(list_items(i, skipped) for i in parsed)
    sizes, by_source, unusable, written = [], Counter(), Counter(), 0
    uid_hashes = array.array("Q")
    reader = ItemReader()
    with bar(None, "scan", "img") as progress:
        for index in itertools.count():
            chunk = list(itertools.islice(items, shard_size))
            if not chunk:
                break
            sizes.append(len(chunk))
            by_source.update(it["source"] for it in chunk)
            unusable.update(it["reason"] for it in chunk if "reason" in it)
            uid_hashes.extend(int(it["uid"][:16], 16) for it in chunk)
            target = stage.shard(index, ".jsonl")
            if not target.exists():
                rows = []
                for it in chunk:
                    w, h = (it.pop("width"), it.pop("height")) if "width" in it else header_size(it, reader)
                    rows.append({**it, "width": w, "height": h})
                write_jsonl_atomic(target, rows)
                written += 1
                pause_for_tests()
            progress.update(len(chunk))
    _check_unique(np.frombuffer(uid_hashes, dtype=np.uint64), stage, len(sizes))
    info = {"items": sum(sizes), "shards": len(sizes), "shard_sizes": sizes, "by_source": dict(sorted(by_source.items())),
            "unusable": dict(sorted(unusable.items())), "skipped": dict(sorted((k, v) for k, v in skipped.items() if v))}
    stage.mark_complete(info)
    log.info("listed %d images from %d input(s) into %d shard(s) (%d written now, the rest were done): %s",
             info["items"], len(parsed), len(sizes), written, info["by_source"])
    if unusable:
        log.warning("%d of them cannot be used (the filter records each with its reason and detail): %s",
                    sum(unusable.values()), info["unusable"])
    if info["skipped"]:
        log.info("not images, skipped: %s", info["skipped"])
    return info


def _check_unique(hashes: np.ndarray, stage: StageDir, shards: int) -> None:
    """Two items with one uid would be counted once downstream: refuse (8 bytes per item), naming
    a few of them (found again in the shards just written)."""
    values, counts = np.unique(hashes, return_counts=True)
    repeated = values[counts > 1]
    if not len(repeated):
        return
    wanted = {int(v) for v in repeated[:3]}
    examples = [f"{it['source']}: {it['key']!r} ({it['ref']})" for i in range(shards) for it in read_jsonl(stage.shard(i, ".jsonl"))
                if int(it["uid"][:16], 16) in wanted]
    raise CurationError(f"{len(repeated)} uid(s) listed twice, i.e. one source lists one key twice: {'; '.join(examples)}. "
                        "Is an image reachable through two inputs of one source, or a file named like a tar member "
                        "('x.tar#y.png' beside x.tar)? Rename or move it and scan again")


def scan_shard_count(out: Path) -> int:
    stage = StageDir(out, "scan")
    stage.require_complete("this stage")
    return int(stage.done_info()["shards"])
