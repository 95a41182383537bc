"""Stage 2, filter: size, aspect ratio, decodability and (optionally) exact duplicates.

Each output shard holds every item of its scan shard with a decision: {"status": "kept"} or
{"status": "rejected", "reason": ...}. Reasons: too_small, bad_aspect, decode_error, empty,
too_large, missing, duplicate. Duplicates are exact (SHA-256 of the bytes); the first in scan
order is kept, and a resumed run rebuilds the seen-set from the finished shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_curation.shards import read_jsonl, shards, write_jsonl_atomic
from data_curation.sources import read_bytes
from eve.image_io import InvalidImageError, load_image


@dataclass
class FilterSettings:
    min_side: int = 448  # SPEC decision: >= 448 on both sides
    max_aspect: float = 4.0  # long / short
    dedup: bool = False
    max_pixels: int | None = None  # decompression-bomb limit (default: Pillow's)


def judge(item: dict, settings: FilterSettings, seen: set[str]) -> dict:
    w, h = item.get("width"), item.get("height")
    out = dict(item)
    if w and h:
        if min(w, h) < settings.min_side:
            return {**out, "status": "rejected", "reason": "too_small"}
        if max(w, h) / min(w, h) > settings.max_aspect:
            return {**out, "status": "rejected", "reason": "bad_aspect"}
    try:
        data = read_bytes(item["ref"])
        img = load_image(data, settings.max_pixels)
    except InvalidImageError as e:
        return {**out, "status": "rejected", "reason": e.reason, "detail": e.detail[:200]}
    except FileNotFoundError as e:
        return {**out, "status": "rejected", "reason": "missing", "detail": str(e)[:200]}
    except Exception as e:  # noqa: BLE001 - a bad item never ends the run
        return {**out, "status": "rejected", "reason": "decode_error", "detail": f"{type(e).__name__}: {e}"[:200]}
    out["width"], out["height"] = img.size  # after EXIF orientation
    if min(img.size) < settings.min_side:
        return {**out, "status": "rejected", "reason": "too_small"}
    if max(img.size) / min(img.size) > settings.max_aspect:
        return {**out, "status": "rejected", "reason": "bad_aspect"}
    if settings.dedup:
        digest = hashlib.sha256(data).hexdigest()
        out["sha256"] = digest
        if digest in seen:
            return {**out, "status": "rejected", "reason": "duplicate"}
        seen.add(digest)
    return {**out, "status": "kept"}


def filter_stage(out: Path, settings: FilterSettings) -> None:
    src, dst = out / "scan", out / "filter"
    seen: set[str] = set()
    for shard in tqdm(shards(src), desc="filter", unit="shard"):
        target = dst / shard.name
        if target.exists():  # finished: only its hashes are needed
            seen.update(r["sha256"] for r in read_jsonl(target) if r.get("status") == "kept" and "sha256" in r)
            continue
        write_jsonl_atomic(target, [judge(item, settings, seen) for item in read_jsonl(shard)])
