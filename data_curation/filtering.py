"""Stage 2, filter: size, aspect ratio, decodability and (optionally) exact duplicates.

Each output shard holds every item of its scan shard with a decision: {"status": "kept"} or
{"status": "rejected", "reason": ..., "detail": ...}. The checks, in order (the first that
fails names the reason): what the scan already found unusable (its reason: missing, not_a_file,
unreadable_container, ... see sources.py), sizes from the header (too_small, bad_aspect; cheap,
so most rejections cost no decode), reading the bytes (missing, not_a_file, unreadable) and a
full decode through eve.image_io.load_image (empty, decode_error, too_large for decompression
bombs; CMYK, 16-bit, palette, alpha and animated images are converted, not rejected), the sizes
again after EXIF orientation, then exact duplicates (duplicate; the first in scan order is kept).

Decoding runs in `--workers` processes (data_curation.workers: they die with the run, so a
`kill -9` leaves none behind), each task a run of consecutive items read through one
ItemReader (a parquet row group is read once per task); the duplicate check runs in the parent
in scan order, and a resumed run rebuilds its set of seen hashes from the finished shards (16
bytes per kept image in memory).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from data_curation.failures import failure_of
from data_curation.progress import bar, stage_log
from data_curation.shards import CurationError, StageDir, pause_for_tests, read_jsonl, write_jsonl_atomic
from data_curation.reading import ItemReader
from data_curation.workers import process_pool
from eve.image_io import load_image

log = stage_log("filter")


@dataclass(frozen=True)
class FilterSettings:
    min_side: int = 448  # SPEC 3 decision: >= 448 on both sides
    max_aspect: float = 4.0  # long side / short side
    dedup: bool = False
    max_pixels: int | None = None  # decompression-bomb limit (None: Pillow's default, ~89 Mpx)

    def __post_init__(self):
        if self.min_side < 1 or self.max_aspect < 1:
            raise CurationError(f"filter: need --min-side >= 1 and --max-aspect >= 1, got {self.min_side}, {self.max_aspect}")


def _size_reason(w: int | None, h: int | None, s: FilterSettings) -> str | None:
    if not w or not h:
        return None
    if min(w, h) < s.min_side:
        return "too_small"
    if max(w, h) / min(w, h) > s.max_aspect:
        return "bad_aspect"
    return None


def judge(item: dict, settings: FilterSettings, reader: ItemReader | None = None) -> dict:
    """The decision for one item, without the duplicate check (which needs scan order). Never
    raises: anything that goes wrong with one image is that image's rejection."""
    out = dict(item)
    if item.get("reason"):  # the scan found it unusable and said why
        return {**out, "status": "rejected"}
    reason = _size_reason(item.get("width"), item.get("height"), settings)
    if reason:
        return {**out, "status": "rejected", "reason": reason}
    try:
        data = (reader or ItemReader()).read(item)
        img = load_image(data, settings.max_pixels)
        out["width"], out["height"] = img.size  # after EXIF orientation
    except Exception as e:  # noqa: BLE001 - a bad item never ends the run
        reason, detail = failure_of(e)
        return {**out, "status": "rejected", "reason": reason, "detail": detail}
    reason = _size_reason(out["width"], out["height"], settings)
    if reason:
        return {**out, "status": "rejected", "reason": reason}
    if settings.dedup:
        out["content_hash"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    return {**out, "status": "kept"}


def judge_run(items: list[dict], settings: FilterSettings) -> list[dict]:
    """The decisions for consecutive items (one worker task), through one reader."""
    reader = ItemReader()
    return [judge(it, settings, reader) for it in items]


def _mark_duplicates(rows: list[dict], seen: set[bytes]) -> None:
    for row in rows:
        if row["status"] == "kept" and "content_hash" in row:
            digest = bytes.fromhex(row["content_hash"])
            if digest in seen:
                row.update(status="rejected", reason="duplicate")
            else:
                seen.add(digest)


def filter_stage(out: Path, settings: FilterSettings, workers: int = 0) -> dict:
    """filter/shard-*.jsonl for every scan shard; `workers` > 0 decodes in that many processes."""
    scan, stage = StageDir(out, "scan"), StageDir(out, "filter")
    scan.require_complete("filter")
    stage.claim(asdict(settings), upstream=[scan])
    if stage.complete:
        log.info("already finished")
        return stage.done_info()
    stage.remove_partial()
    sizes = scan.done_info()["shard_sizes"]
    seen: set[bytes] = set()
    done = [i for i in range(len(sizes)) if stage.shard(i, ".jsonl").exists()]
    log.info("%d of %d shard(s) already done%s", len(done), len(sizes),
             "; rebuilding the duplicate set" if settings.dedup and done else "")
    pool = process_pool(workers)
    check = functools.partial(judge_run, settings=settings)
    try:
        with bar(sum(sizes), "filter", "img") as progress:
            for index, n in enumerate(sizes):
                target = stage.shard(index, ".jsonl")
                if target.exists():
                    if settings.dedup:
                        seen.update(bytes.fromhex(r["content_hash"]) for r in read_jsonl(target)
                                    if r["status"] == "kept" and "content_hash" in r)
                    progress.update(n)
                    continue
                items = list(read_jsonl(scan.shard(index, ".jsonl")))
                if pool:
                    step = max(1, -(-len(items) // (4 * workers)))
                    rows = [r for run in pool.map(check, [items[i:i + step] for i in range(0, len(items), step)]) for r in run]
                else:
                    rows = check(items)
                _mark_duplicates(rows, seen)
                write_jsonl_atomic(target, rows)
                progress.update(n)
                pause_for_tests()
    finally:
        if pool:
            pool.shutdown()
    counts = {"kept": 0, "rejected": 0}
    for index in range(len(sizes)):
        for r in read_jsonl(stage.shard(index, ".jsonl")):
            counts[r["status"]] += 1
    stage.mark_complete(counts)
    log.info("kept %d, rejected %d of %d", counts["kept"], counts["rejected"], sum(sizes))
    return counts
