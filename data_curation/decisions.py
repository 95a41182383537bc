"""Where every scanned item ends: kept, or rejected with a reason. One place computes it, so the
summary, captioning and export always agree and the counts add up."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator

from data_curation.shards import read_jsonl, shards


def clustered_sources(out: Path) -> set[str] | None:
    """Sources that went through embed/cluster/select (None: the embed stage has not run)."""
    meta = sorted((out / "embed").glob("shard-*.json")) if (out / "embed").exists() else []
    if not meta:
        return None
    sources = json.loads(meta[0].read_text()).get("sources")
    return set(sources) if sources is not None else {"*"}


def final_decisions(out: Path) -> Iterator[dict]:
    """Every item of every filter shard with its final status and reason."""
    clustered = clustered_sources(out)
    selected = failed = None
    if clustered is not None and (out / "select" / "selected.json").exists():
        selected = json.loads((out / "select" / "selected.json").read_text())["selected_items"]
        failed = {f["uid"]: f["reason"] for m in sorted((out / "embed").glob("shard-*.json"))
                  for f in json.loads(m.read_text())["failed"]}
    for shard in shards(out / "filter"):
        for item in read_jsonl(shard):
            if item["status"] == "kept" and clustered is not None and ("*" in clustered or item["source"] in clustered):
                if selected is None:
                    item = {**item, "status": "pending", "reason": "not_selected_yet"}
                elif item["uid"] in failed:
                    item = {**item, "status": "rejected", "reason": failed[item["uid"]]}
                elif item["uid"] in selected:
                    item = {**item, **selected[item["uid"]]}
                else:
                    item = {**item, "status": "rejected", "reason": "cluster_rank"}
            yield item


def count(out: Path) -> dict:
    statuses, reasons = Counter(), Counter()
    for item in final_decisions(out):
        statuses[item["status"]] += 1
        if item["status"] == "rejected":
            reasons[item["reason"]] += 1
    return {"items": sum(statuses.values()), "kept": statuses["kept"], "pending": statuses["pending"],
            "rejected": statuses["rejected"], "rejected_by_reason": dict(sorted(reasons.items()))}
