"""summary.json at the root of the output folder: counts per stage and per reason code, checked
to add up, rewritten after every stage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from data_curation.decisions import count
from data_curation.shards import read_jsonl, shards, write_json_atomic


def write_summary(out: Path) -> dict:
    scanned = sum(1 for f in shards(out / "scan") for _ in read_jsonl(f))
    summary = {"scan": {"items": scanned}}
    filtered = Counter()
    reasons: Counter = Counter()
    for f in shards(out / "filter"):  # streamed: counts only
        for r in read_jsonl(f):
            filtered[r["status"]] += 1
            if r["status"] == "rejected":
                reasons[r["reason"]] += 1
    if filtered:
        summary["filter"] = {"items": sum(filtered.values()), "kept": filtered["kept"], "rejected_by_reason": dict(reasons)}
    if (out / "cluster" / "cluster.json").exists():
        summary["cluster"] = json.loads((out / "cluster" / "cluster.json").read_text())
    if (out / "select" / "selected.json").exists():
        sel = json.loads((out / "select" / "selected.json").read_text())
        summary["select"] = {k: v for k, v in sel.items() if k != "selected_items"}
    summary["final"] = count(out)
    captioned = sum(1 for f in shards(out / "caption") for _ in read_jsonl(f))
    if captioned:
        summary["caption"] = {"captioned": captioned}
    if (out / "export" / "train.jsonl").exists():
        summary["export"] = {"samples": sum(1 for _ in read_jsonl(out / "export" / "train.jsonl"))}
    final = summary["final"]
    summary["counts_add_up"] = (final["kept"] + final["rejected"] + final["pending"] == final["items"]
                                and (not filtered or final["items"] == scanned))
    if not summary["counts_add_up"]:
        raise RuntimeError(f"curation counts do not add up: {summary}")
    write_json_atomic(out / "summary.json", summary)
    return summary
