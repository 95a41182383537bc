"""Stage 7, export: training manifests in the format train/ reads.

train.jsonl: one sample a line, {"id", "image", "conversations": [human "<image>", gpt caption],
"source", "width", "height"}; llava.json: the same as a LLaVA-style list; with --webdataset,
the images and their JSON re-sharded into tar files (and a manifest pointing into them).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from data_curation.decisions import final_decisions
from data_curation.shards import read_jsonl, shards, write_json_atomic, write_jsonl_atomic
from data_curation.sources import read_bytes


def export_stage(out: Path, webdataset: bool = False, per_tar: int = 1000) -> dict:
    captions = {r["uid"]: r["caption"] for f in shards(out / "caption") for r in read_jsonl(f)}
    dst = out / "export"
    samples, missing = [], 0
    for item in final_decisions(out):
        if item["status"] != "kept":
            continue
        if item["uid"] not in captions:
            missing += 1
            continue
        samples.append({"id": item["uid"], "image": item["ref"],
                        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": captions[item["uid"]]}],
                        "source": item["source"], "width": item["width"], "height": item["height"]})
    if webdataset:
        samples = _reshard(samples, dst, per_tar)
    write_jsonl_atomic(dst / "train.jsonl", samples)
    write_json_atomic(dst / "llava.json", samples)
    return {"exported": len(samples), "kept_without_caption": missing}


def _reshard(samples: list[dict], dst: Path, per_tar: int) -> list[dict]:
    """Write images + JSON into tar shards; the manifest then points into them (shard.tar#key)."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for start in range(0, len(samples), per_tar):
        name = f"shard-{start // per_tar:05d}.tar"
        tmp = dst / (name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for s in samples[start : start + per_tar]:
                data = read_bytes(s["image"])
                ext = Path(s["image"].split("#")[-1]).suffix or ".jpg"
                for member, payload in ((f"{s['id']}{ext}", data), (f"{s['id']}.json", json.dumps(s).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                out.append({**s, "image": f"{name}#{s['id']}{ext}"})
        tmp.replace(dst / name)
    return out
