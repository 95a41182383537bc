"""Stage 7, export: training manifests in the format train/ reads.

train.jsonl: one sample a line, {"id", "image", "conversations": [human "<image>", gpt caption],
"source", "width", "height"}; llava.json: the same as a LLaVA-style list; with --webdataset,
the images and their JSON re-sharded into tar files (and a manifest pointing into them).
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

from data_curation.decisions import final_decisions
from data_curation.shards import read_jsonl, shards, write_json_atomic, write_jsonl_atomic
from data_curation.sources import read_bytes


def export_stage(out: Path, webdataset: bool = False, per_tar: int = 1000, llava_json: bool = True) -> dict:
    """Streams the kept items; only the captions (one string per kept item) are held in memory.
    llava.json is a single JSON list by its format: leave it out at scale with llava_json=False."""
    captions = {r["uid"]: r["caption"] for f in shards(out / "caption") for r in read_jsonl(f)}
    dst = out / "export"
    counts = {"exported": 0, "kept_without_caption": 0}

    def samples():
        for item in final_decisions(out):
            if item["status"] != "kept":
                continue
            if item["uid"] not in captions:
                counts["kept_without_caption"] += 1
                continue
            counts["exported"] += 1
            yield {"id": item["uid"], "image": item["ref"],
                   "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": captions[item["uid"]]}],
                   "source": item["source"], "width": item["width"], "height": item["height"]}

    rows = _reshard(samples(), dst, per_tar) if webdataset else samples()
    write_jsonl_atomic(dst / "train.jsonl", rows)
    if llava_json:
        write_json_atomic(dst / "llava.json", list(read_jsonl(dst / "train.jsonl")))
    return counts


def _reshard(samples, dst: Path, per_tar: int):
    """Write images + JSON into tar shards; yields the samples pointing into them (shard.tar#key)."""
    dst.mkdir(parents=True, exist_ok=True)
    for index in itertools.count():
        chunk = list(itertools.islice(samples, per_tar))
        if not chunk:
            return
        name = f"shard-{index:05d}.tar"
        tmp = dst / (name + ".tmp")
        out = []
        with tarfile.open(tmp, "w") as tar:
            for s in chunk:
                data = read_bytes(s["image"])
                ext = Path(s["image"].split("#")[-1]).suffix or ".jpg"
                for member, payload in ((f"{s['id']}{ext}", data), (f"{s['id']}.json", json.dumps(s).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                out.append({**s, "image": f"{name}#{s['id']}{ext}"})
        tmp.replace(dst / name)
        yield from out
