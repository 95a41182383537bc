"""Run a checkpoint on a task: batched greedy generation over images of mixed aspect ratios,
one JSONL record per item, resumable (the summary is eval.summary's).

Records live in <out>/<task>-<settings hash>/predictions.jsonl: a re-run with the same
checkpoint and settings skips the items already there; other settings get another folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from eve.attention_backends import varying_shape_attention
from eve.templates import get_template
from eval.inputs import InputError, read_predictions
from eval.tasks.base import Item, Task


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
    tpl = get_template(template)
    device = next(model.parameters()).device
    with open(path, "a") as out:
        _lock(out, path)
        # a torn last record (kill -9, full disk) is cut off and its item redone; see eval.inputs
        done = read_predictions(path, "output", repair=True).rows
        todo = [it for it in items if it.question_id not in done]
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=task.name, unit="item") as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                for record in _run_batch(model, processor, task, batch, tpl, max_new_tokens or task.max_new_tokens,
                                         transform, device):
                    out.write(json.dumps(record) + "\n")
                    done[record["question_id"]] = record
                out.flush()
                bar.update(len(batch))
    return [done[it.question_id] for it in items if it.question_id in done]


def _lock(handle, path: Path) -> None:
    """One run per records file (released when the file closes): a second would redo the same
    items, and its cutting of a torn tail could cut the line the first is writing."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{path}: another eve-eval run is writing this file; wait for it or pass another --out") from None


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
            with torch.no_grad(), varying_shape_attention(device):
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
