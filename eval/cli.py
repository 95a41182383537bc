"""eve-eval: evaluate EVE checkpoints on standard benchmarks, from the benchmarks' own files.

    eve-eval run --model DIR --task vqav2 --questions Q.json --annotations A.json --images DIR --out runs/eval
    eve-eval run ... --task textvqa --option ocr=false --sweep     # no OCR tokens; + the aspect-ratio sweep
    eve-eval score --task vqav2 --predictions preds.jsonl --annotations A.json   # no model loaded
    eve-eval compare runs/eval/vqav2-aaaa runs/eval/vqav2-bbbb                     # paired comparison
    eve-eval tasks                                                                 # the registry
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_run(args) -> None:
    from eve.pretrained import load_pretrained
    from eval.robustness import run_sweep
    from eval.runner import model_fingerprint, run_items, settings_hash, summarize, write_summary
    from eval.tasks import get_task

    task = get_task(args.task)
    options = _options(args.option)
    items = task.load(Path(args.questions), Path(args.annotations) if args.annotations else None,
                      Path(args.images) if args.images else None, **options)
    if args.limit:
        items = items[: args.limit]
    model, processor = load_pretrained(args.model, args.device)
    # keyed by the weights, not the path: a model retrained into the same folder gets its own records
    weights = model_fingerprint(args.model, getattr(model.config, "_commit_hash", None))
    settings = {"model": str(Path(args.model).resolve()), "weights": weights, "task": task.name, "options": options,
                "template": args.template,
                "max_new_tokens": args.max_new_tokens or task.max_new_tokens, "questions": str(Path(args.questions).resolve())}
    run_dir = Path(args.out) / f"{task.name}-{settings_hash(settings)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "settings.json").write_text(json.dumps(settings, indent=2))
    records = run_items(model, processor, task, items, run_dir, args.batch_size, args.template, args.max_new_tokens)
    summary = summarize(task, records)
    if args.sweep:
        resolutions = [int(r) for r in args.sweep_resolutions.split(",")]
        summary["sweep"] = run_sweep(model, processor, task, items, run_dir, records, args.batch_size, args.template,
                                     resolutions=resolutions, fill=args.sweep_fill, max_new_tokens=args.max_new_tokens)["settings"]
    write_summary(summary, run_dir)
    print(json.dumps(summary, indent=2))
    print(f"eve-eval: {task.name} on {len(records)} items -> {run_dir}")


def cmd_score(args) -> None:
    from eval.runner import summarize
    from eval.tasks import get_task

    from eval.tasks.base import Item

    task = get_task(args.task)
    targets = task.targets(Path(args.annotations), Path(args.questions) if args.questions else None)
    try:  # items carry what parsing needs (the options of a multiple-choice question)
        items = {it.question_id: it for it in task.load(Path(args.questions or args.annotations), Path(args.annotations), None)}
    except (KeyError, TypeError, ValueError):  # e.g. VQAv2 annotations without the question file
        items = {qid: Item(qid, "", None, target) for qid, target in targets.items()}
    records = []
    for n, line in enumerate(Path(args.predictions).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, answer = str(row["question_id"]), str(row["answer"])
        except (json.JSONDecodeError, KeyError) as e:
            print(f"{args.predictions}:{n}: skipped, {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if qid not in targets:
            print(f"{args.predictions}:{n}: question_id {qid} is not in the annotations", file=sys.stderr)
            continue
        item = items[qid]
        parsed = task.parse(answer, item)
        records.append({"question_id": qid, "parsed": parsed, "score": task.score(parsed, targets[qid]),
                        "target": targets[qid], "meta": item.meta, "native_size": None, "visual_tokens": 0,
                        "latency_s": 0.0, "error": None})
    print(json.dumps(summarize(task, records), indent=2))


def cmd_compare(args) -> None:
    from eval.stats import paired_comparison

    def scores(run: str) -> dict:
        rows = [json.loads(line) for line in (Path(run) / "predictions.jsonl").read_text().splitlines() if line.strip()]
        return {r["question_id"]: r["score"] for r in rows if r["score"] is not None}

    print(json.dumps(paired_comparison(scores(args.run_a), scores(args.run_b)), indent=2))


def main(argv: list[str] | None = None) -> None:
    from eval.robustness import FILLS
    from eval.tasks import TASKS

    parser = argparse.ArgumentParser(prog="eve-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a checkpoint on a task and score it")
    run.add_argument("--model", required=True, help="EVE checkpoint directory (or hub id)")
    run.add_argument("--task", required=True, choices=sorted(TASKS))
    run.add_argument("--questions", required=True, help="the benchmark's question file (or folder, for MME)")
    run.add_argument("--annotations", help="the benchmark's annotation file, where separate")
    run.add_argument("--images", help="image folder (not needed for TSV benchmarks with base64 images)")
    run.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option, e.g. ocr=false (textvqa)")
    run.add_argument("--out", default="runs/eval", help="output folder")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-new-tokens", type=int, default=None)
    run.add_argument("--template", default="vicuna_v1",
                     help="chat template: vicuna_v1 (EVE's SFT, and what the paper's benchmark scripts pass), eve_v1 "
                          "(the reference loaders' default, 'curious human'; its Q-Bench script), plain")
    run.add_argument("--limit", type=int, default=None, help="only the first N items")
    run.add_argument("--device", default=None)
    run.add_argument("--sweep", action="store_true", help="also run the aspect-ratio / resolution sweep")
    run.add_argument("--sweep-resolutions", default="336,672", metavar="PX,PX",
                     help="longest sides the sweep re-renders each image at (default 336,672)")
    run.add_argument("--sweep-fill", default="neutral", choices=FILLS,
                     help="what pads the reframed images: neutral grey (default) or the image's own border colour")
    run.set_defaults(fn=cmd_run)
    score = sub.add_parser("score", help="score a predictions JSONL (question_id, answer) with no model")
    score.add_argument("--task", required=True, choices=sorted(TASKS))
    score.add_argument("--predictions", required=True)
    score.add_argument("--annotations", required=True)
    score.add_argument("--questions", help="question file, where the task keeps questions apart")
    score.set_defaults(fn=cmd_score)
    compare = sub.add_parser("compare", help="paired comparison of two runs of the same task")
    compare.add_argument("run_a")
    compare.add_argument("run_b")
    compare.set_defaults(fn=cmd_compare)
    tasks = sub.add_parser("tasks", help="list the registered tasks")
    tasks.set_defaults(fn=lambda a: print("\n".join(f"{n}: {(c.__doc__ or '').split(chr(10))[0]}" for n, c in sorted(TASKS.items()))))
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
