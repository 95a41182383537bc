"""A run's summary: the task's metrics over the scored records, a bootstrap CI of the mean
score, counts of what was and was not scored, and accuracy by native aspect ratio and size."""

from __future__ import annotations

import json
from pathlib import Path

from eval.stats import bootstrap_ci
from eval.tasks.base import Task

AR_BUCKETS = [(0, 0.4, "<=1:2.5"), (0.4, 0.8, "tall"), (0.8, 1.25, "~square"), (1.25, 2.5, "wide"), (2.5, 1e9, ">=2.5:1")]
MP_BUCKETS = [(0, 0.1, "<0.1MP"), (0.1, 0.5, "0.1-0.5MP"), (0.5, 2, "0.5-2MP"), (2, 1e9, ">2MP")]


def _bucket(value: float, buckets) -> str:
    return next(name for lo, hi, name in buckets if lo <= value < hi)


def summarize(task: Task, records: list[dict]) -> dict:
    """Task metrics, a bootstrap CI of the mean score, errors, and accuracy by native aspect
    ratio and megapixels. Items with no target (no annotation, a malformed row) are counted as
    "unscored", so a metric over fewer items than asked is never silent."""
    scored = [r for r in records if r["score"] is not None]
    summary = {"task": task.name, "items": len(records), "scored": len(scored), "unscored": len(records) - len(scored),
               "errors": sum(r["error"] is not None for r in records)}
    summary.update(task.summarize(scored))
    scores = [r["score"] for r in scored]
    summary["mean_score"] = sum(scores) / len(scores) if scores else 0.0
    summary["mean_score_ci95"] = list(bootstrap_ci(scores))
    for key, buckets, fn in (("by_aspect_ratio", AR_BUCKETS, lambda w, h: w / h), ("by_megapixels", MP_BUCKETS, lambda w, h: w * h / 1e6)):
        groups: dict = {}
        for r in scored:
            if r["native_size"]:
                groups.setdefault(_bucket(fn(*r["native_size"]), buckets), []).append(r["score"])
        summary[key] = {name: {"n": len(v), "accuracy": sum(v) / len(v)} for name, v in groups.items()}
    tokens = [r["visual_tokens"] for r in scored if r["visual_tokens"]]
    summary["mean_visual_tokens"] = sum(tokens) / len(tokens) if tokens else 0
    summary["mean_latency_s"] = sum(r["latency_s"] for r in scored) / len(scored) if scored else 0.0
    return summary


def write_summary(summary: dict, run_dir: Path) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# {summary['task']}", "", "| metric | value |", "| --- | --- |"]
    for key, value in summary.items():
        if isinstance(value, (int, float)):
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    for key in ("by_aspect_ratio", "by_megapixels"):
        if summary.get(key):
            lines += ["", f"## {key.replace('_', ' ')}", "", "| bucket | n | accuracy |", "| --- | --- | --- |"]
            lines += [f"| {b} | {v['n']} | {v['accuracy']:.4f} |" for b, v in summary[key].items()]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
