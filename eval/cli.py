"""eve-eval: evaluate EVE checkpoints on standard benchmarks, from the benchmarks' own files.

    eve-eval run --model DIR --task vqav2 --questions Q.json --annotations A.json --images DIR --out runs/eval
    eve-eval run ... --task textvqa --option ocr=false --sweep     # no OCR tokens; + the aspect-ratio sweep
    eve-eval score --task vqav2 --predictions preds.jsonl --annotations A.json   # no model loaded
        (one {"question_id", "answer"} object a line, one a question; a prediction for a question the
        annotations lack is an error, questions left unanswered are counted in "coverage")
    eve-eval compare runs/eval/vqav2-aaaa runs/eval/vqav2-bbbb                     # paired comparison
    eve-eval tasks                                                                 # the registry
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from eval.tasks import get_task

log = logging.getLogger("eve-eval")


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def cmd_run(args) -> None:
    from eval.inputs import InputError, load_items

    task = get_task(args.task)
    options = _options(args.option)
    items = load_items(task, Path(args.questions), _path(args.annotations), _path(args.images), **options)
    if args.limit:
        items = items[: args.limit]
    if args.annotations and all(it.target is None for it in items):  # before the model loads: nothing could be scored
        raise InputError(f"{args.annotations}: none of the {len(items)} questions from {args.questions} has an "
                         f"annotation here (e.g. question id {items[0].question_id!r}): the question ids disagree")

    from eve.pretrained import load_pretrained
    from eval.robustness import run_sweep
    from eval.runner import model_fingerprint, run_items, settings_hash
    from eval.summary import summarize, write_summary

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
    if summary["unscored"]:
        log.warning("%d of %d items have no annotation (or a malformed row) and are not scored; the metrics are "
                    "over the other %d", summary["unscored"], summary["items"], summary["scored"])
    if args.sweep:
        resolutions = [int(r) for r in args.sweep_resolutions.split(",")]
        summary["sweep"] = run_sweep(model, processor, task, items, run_dir, records, args.batch_size, args.template,
                                     resolutions=resolutions, fill=args.sweep_fill, max_new_tokens=args.max_new_tokens)["settings"]
    write_summary(summary, run_dir)
    print(json.dumps(summary, indent=2))
    print(f"eve-eval: {task.name} on {len(records)} items -> {run_dir}")


def cmd_score(args) -> None:
    """Policy (one prediction per question, unknown question ids are an error, missing ones are
    counted): eval.inputs."""
    from eval.inputs import coverage, load_targets, match, read_predictions
    from eval.summary import summarize
    from eval.tasks.base import Item

    task = get_task(args.task)
    annotations, questions = Path(args.annotations), _path(args.questions)
    targets, unannotated = load_targets(task, annotations, questions)
    if unannotated:
        log.warning("%s: %d question(s) have no usable annotation and cannot be scored (e.g. %r)",
                    annotations, len(unannotated), unannotated[0])
    try:  # items carry what parsing needs (the options of a multiple-choice question)
        items = {it.question_id: it for it in task.load(questions or annotations, annotations, None)}
    except (KeyError, TypeError, ValueError):  # e.g. VQAv2 annotations without the question file
        items = {}
    predictions = read_predictions(Path(args.predictions))
    missing = match(predictions, targets, str(annotations))
    records = []
    for qid, row in predictions.rows.items():
        item = items.get(qid) or Item(qid, "", None, targets[qid])
        parsed = task.parse(str(row["answer"]), item)
        records.append({"question_id": qid, "parsed": parsed, "score": task.score(parsed, targets[qid]),
                        "target": targets[qid], "meta": item.meta, "native_size": None, "visual_tokens": 0,
                        "latency_s": 0.0, "error": None})
    summary = summarize(task, records)
    summary["coverage"] = coverage(predictions, targets, missing, unannotated)
    print(json.dumps(summary, indent=2))


def cmd_compare(args) -> None:
    from eval.inputs import InputError, read_predictions
    from eval.stats import paired_comparison

    def scores(run: str) -> dict:
        rows = read_predictions(Path(run) / "predictions.jsonl", "output").rows
        return {qid: r["score"] for qid, r in rows.items() if r.get("score") is not None}

    a, b = scores(args.run_a), scores(args.run_b)
    try:
        comparison = paired_comparison(a, b)
    except ValueError as e:  # two runs of different tasks or question files
        raise InputError(f"{args.run_a} and {args.run_b}: {e}") from e
    print(json.dumps(comparison, indent=2))


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def main(argv: list[str] | None = None) -> None:
    from eval.jsonl import InputError
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
    run.add_argument("--batch-size", type=positive_int, default=8)
    run.add_argument("--max-new-tokens", type=positive_int, default=None)
    run.add_argument("--template", default="vicuna_v1",
                     help="chat template: vicuna_v1 (EVE's SFT, and what the paper's benchmark scripts pass), eve_v1 "
                          "(the reference loaders' default, 'curious human'; its Q-Bench script), plain")
    run.add_argument("--limit", type=positive_int, default=None, help="only the first N items")
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
    # warnings (a torn line dropped, questions left unanswered) go to stderr as it is now, for
    # this call only: a caller's own logging setup is left as it was
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("eve-eval: warning: %(message)s"))
    log.addHandler(handler)
    try:
        args.fn(args)
    except InputError as e:  # the user's files, not our code: the message, no traceback
        print(f"eve-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    main()
