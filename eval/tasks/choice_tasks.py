"""Multiple-choice tasks: ScienceQA-IMG, MMBench (CircularEval), SEED-Bench."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from eval.scoring.choice import LETTERS, choice_prompt, circular_eval, circular_shifts, parse_letter
from eval.tasks.base import MULTIPLE_CHOICE, Item, Task, base64_image, file_image, read_tsv, register, rows_to_items


def _options(values) -> list[str]:
    """A question's options, checked here: the letter parser would fail on them mid-run."""
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"options must be a list of strings: {values!r:.80}")
    return values


def _letter(answer, options: list[str]) -> str:
    if not isinstance(answer, str) or answer not in LETTERS[: len(options)]:  # else always scored wrong
        raise ValueError(f"answer {answer!r} is not one of the {len(options)} option letters")
    return answer


class _ChoiceTask(Task):
    def parse(self, output, item):
        return parse_letter(output, item.meta["options"]) or ""

    def score(self, parsed, target) -> float:
        return float(parsed == target)

    def summarize(self, records):
        n = len(records)
        return {"accuracy": sum(r["score"] for r in records) / n if n else 0.0,
                "parse_failure_rate": sum(r["parsed"] == "" for r in records) / n if n else 0.0}


@register
class ScienceQA(_ChoiceTask):
    """ScienceQA problems.json (+ pid_splits.json optional); the IMG subset: problems with an image
    in the test split (option split=...), images at <images>/<split>/<pid>/image.png."""

    name = "scienceqa_img"
    max_new_tokens = 1024  # the reference's model_vqa_science.py

    def load(self, questions, annotations, images, split: str = "test", **options):
        path = Path(annotations or questions)
        problems = json.loads(path.read_text(encoding="utf-8-sig"))

        def make(kv):
            pid, p = kv
            if p.get("split", split) != split or not p.get("image"):
                return None
            options_ = _options(p["choices"])
            answer = p["answer"]
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options_):
                raise ValueError(f"answer {answer!r} is not an index into the {len(options_)} choices")
            prompt = choice_prompt(p["question"], options_, p.get("hint") or None) + "\n" + MULTIPLE_CHOICE
            image = file_image(Path(images) / split / pid / p["image"]) if images else None
            return Item(pid, prompt, image, LETTERS[answer], {"options": options_})

        return rows_to_items(list(problems.items()), make, str(path), key=lambda i, kv: kv[0])


@register
class MMBench(_ChoiceTask):
    """MMBench TSV (index, question, hint, A-D, answer, category, image as base64). Every
    question is asked once per circular shift of its options (CircularEval)."""

    name = "mmbench"
    max_new_tokens = 1024  # the reference's model_vqa_mmbench.py

    def load(self, questions, annotations, images, circular: bool = True, **options):
        def make(row):
            opts = [row[c] for c in "ABCD" if row.get(c) and row[c] != "nan"]
            answer = _letter(row["answer"], opts) if row.get("answer") else None  # a test split has none
            shifts = circular_shifts(opts, answer) if circular and answer else [(opts, answer)]
            hint = row.get("hint") if row.get("hint") not in (None, "", "nan") else None
            return [Item(f"{row['index']}-{s}", choice_prompt(row["question"], rotated, hint) + "\n" + MULTIPLE_CHOICE,
                         base64_image(row["image"]), letter,
                         {"options": rotated, "index": row["index"], "category": row.get("category", ""),
                          "variants": len(shifts)})
                    for s, (rotated, letter) in enumerate(shifts)]

        return rows_to_items(read_tsv(Path(questions)), make, str(questions))

    def summarize(self, records):
        out = super().summarize(records)
        counts = Counter(r["meta"]["index"] for r in records)
        # a question passes only with every shift right: one with shifts unanswered is left out, not passed
        whole = [r for r in records if counts[r["meta"]["index"]] == r["meta"].get("variants", counts[r["meta"]["index"]])]
        out.update(circular_eval({"index": r["meta"]["index"], "correct": r["score"] == 1.0} for r in whole))
        out["circular_incomplete"] = len(counts) - out["questions"]
        return out


@register
class SEEDBench(_ChoiceTask):
    """SEED-Bench JSON ({"questions": [...], "question_type": {name: id}}), image questions only;
    images at <images>/<data_id>. Accuracy per dimension (question type)."""

    name = "seed"

    def load(self, questions, annotations, images, **options):
        raw = json.loads(Path(annotations or questions).read_text(encoding="utf-8-sig"))
        names = {v: k for k, v in raw.get("question_type", {}).items()}
        def make(q):
            if q.get("data_type", "image") != "image":
                return None
            opts = _options([q[f"choice_{c}"] for c in "abcd"])
            prompt = choice_prompt(q["question"], opts) + "\n" + MULTIPLE_CHOICE
            image = file_image(Path(images) / q["data_id"]) if images else None
            return Item(str(q["question_id"]), prompt, image, _letter(q["answer"], opts),
                        {"options": opts, "dimension": names.get(q["question_type_id"], str(q["question_type_id"]))})

        return rows_to_items(raw["questions"], make, str(annotations or questions))

    def summarize(self, records):
        out = super().summarize(records)
        dims = defaultdict(list)
        for r in records:
            dims[r["meta"]["dimension"]].append(r["score"])
        out["per_dimension"] = {d: sum(v) / len(v) for d, v in sorted(dims.items())}
        return out
