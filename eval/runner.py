"""Run a checkpoint on a task: batched greedy generation over images of mixed aspect ratios,
one JSONL record per item, resumable, then a summary (JSON and Markdown).

Records live in <out>/<task>-<settings hash>/predictions.jsonl: a re-run with the same
checkpoint and settings skips the items already there; other settings get another folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from eve.templates import get_template
from eval.stats import bootstrap_ci
from eval.tasks.base import Item, Task

AR_BUCKETS = [(0, 0.4, "<=1:2.5"), (0.4, 0.8, "tall"), (0.8, 1.25, "~square"), (1.25, 2.5, "wide"), (2.5, 1e9, ">=2.5:1")]
MP_BUCKETS = [(0, 0.1, "<0.1MP"), (0.1, 0.5, "0.1-0.5MP"), (0.5, 2, "0.5-2MP"), (2, 1e9, ">2MP")]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def model_fingerprint(model: str | Path, commit_hash: str | None = None) -> str:
    """What identifies the model an evaluation ran: a hash of a local folder's config.json and
    weight files (their bytes; a model retrained into the same folder gets another one), or the
    hub revision a hub id was loaded at. Records are keyed by it, never by the path alone."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}@{commit_hash or 'unknown'}"
    files = [path / "config.json", *sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)]
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files if f.exists())
    with tqdm(total=total, unit="B", unit_scale=True, desc="fingerprint", disable=total < 2**30) as bar:
        for f in files:
            if not f.exists():
                continue
            digest.update(f.name.encode() + b"\0")
            with open(f, "rb") as handle:
                while chunk := handle.read(2**24):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()[:16]


def _bucket(value: float, buckets) -> str:
    return next(name for lo, hi, name in buckets if lo <= value < hi)


def run_items(
    model,
    processor,
    task: Task,
    items: list[Item],
    run_dir: Path,
    batch_size: int = 8,
    template: str = "vicuna_v1",
    max_new_tokens: int | None = None,
    transform: Callable | None = None,
) -> list[dict]:
    """Generate and score every item not yet in run_dir/predictions.jsonl; returns all records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "predictions.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["question_id"]] = r
    todo = [it for it in items if it.question_id not in done]
    tpl = get_template(template)
    device = next(model.parameters()).device
    with open(path, "a") as out, tqdm(total=len(items), initial=len(items) - len(todo), desc=task.name, unit="item") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for record in _run_batch(model, processor, task, batch, tpl, max_new_tokens or task.max_new_tokens, transform, device):
                out.write(json.dumps(record) + "\n")
                done[record["question_id"]] = record
            out.flush()
            bar.update(len(batch))
    return [done[it.question_id] for it in items if it.question_id in done]


def _run_batch(model, processor, task, batch, tpl, max_new_tokens, transform, device) -> list[dict]:
    ready, records = [], []
    for item in batch:  # a bad image is this item's error record, not the run's end
        try:
            image = item.image() if item.image is not None else None
            if image is not None and transform is not None:
                image = transform(image)
            ready.append((item, image))
        except Exception as e:  # noqa: BLE001
            records.append(_record(item, "", "", _failed_score(item), None, None, 0, 0.0, f"{type(e).__name__}: {e}"))
    groups = [[(i, im) for i, im in ready if im is not None], [(i, im) for i, im in ready if im is None]]
    for group in groups:  # image and text-only prompts are batched apart
        if not group:
            continue
        prompts = [tpl.prompt(("<image>\n" if im is not None else "") + it.question) for it, im in group]
        images = [im for _, im in group if im is not None] or None
        start = time.perf_counter()
        try:
            inputs = processor(text=prompts, images=images, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        except Exception as e:  # noqa: BLE001
            records += [_record(it, p, "", _failed_score(it), im, None, 0, 0.0, f"{type(e).__name__}: {e}")
                        for (it, im), p in zip(group, prompts)]
            continue
        latency = (time.perf_counter() - start) / len(group)
        sizes = inputs["image_sizes"].tolist() if "image_sizes" in inputs else []
        counts = (inputs["input_ids"] == processor.image_token_id).sum(1).tolist()
        k = 0
        for (item, image), prompt, text, n_visual in zip(group, prompts, texts, counts):
            processed = sizes[k][::-1] if image is not None else None
            k += image is not None
            parsed = task.parse(text, item)
            score = task.score(parsed, item.target) if item.target is not None else None
            records.append(_record(item, prompt, text.strip(), score, image, processed, n_visual, latency, None, parsed))
    return records


def _failed_score(item: Item) -> float | None:
    """An item we could not answer counts wrong; a malformed row (no target) cannot be scored."""
    return 0.0 if item.target is not None else None


def _record(item, prompt, output, score, image, processed, n_visual, latency, error, parsed="") -> dict:
    return {
        "question_id": item.question_id, "prompt": prompt, "output": output, "parsed": parsed, "score": score,
        "target": item.target, "meta": item.meta, "native_size": list(image.size) if image is not None else None,
        "processed_size": processed, "visual_tokens": n_visual, "latency_s": latency, "error": error,
    }


def summarize(task: Task, records: list[dict]) -> dict:
    """Task metrics, a bootstrap CI of the mean score, errors, and accuracy by native aspect
    ratio and megapixels."""
    scored = [r for r in records if r["score"] is not None]
    summary = {"task": task.name, "items": len(records), "errors": sum(r["error"] is not None for r in records)}
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
