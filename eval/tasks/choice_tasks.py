"""Multiple-choice tasks: ScienceQA-IMG, MMBench (CircularEval), SEED-Bench."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from eval.scoring.choice import LETTERS, choice_prompt, circular_eval, circular_shifts, parse_letter
from eval.tasks.base import MULTIPLE_CHOICE, Item, Task, base64_image, file_image, read_tsv, register, rows_to_items


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
        problems = json.loads(path.read_text())

        def make(kv):
            pid, p = kv
            if p.get("split", split) != split or not p.get("image"):
                return None
            options_ = list(p["choices"])
            prompt = choice_prompt(p["question"], options_, p.get("hint") or None) + "\n" + MULTIPLE_CHOICE
            image = file_image(Path(images) / split / pid / p["image"]) if images else None
            return Item(pid, prompt, image, LETTERS[p["answer"]], {"options": options_})

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
            answer = row.get("answer")
            shifts = circular_shifts(opts, answer) if circular and answer else [(opts, answer)]
            hint = row.get("hint") if row.get("hint") not in (None, "", "nan") else None
            return [Item(f"{row['index']}-{s}", choice_prompt(row["question"], rotated, hint) + "\n" + MULTIPLE_CHOICE,
                         base64_image(row["image"]), letter,
                         {"options": rotated, "index": row["index"], "category": row.get("category", "")})
                    for s, (rotated, letter) in enumerate(shifts)]

        return rows_to_items(read_tsv(Path(questions)), make, str(questions))

    def summarize(self, records):
        out = super().summarize(records)
        out.update(circular_eval({"index": r["meta"]["index"], "correct": r["score"] == 1.0} for r in records))
        return out


@register
class SEEDBench(_ChoiceTask):
    """SEED-Bench JSON ({"questions": [...], "question_type": {name: id}}), image questions only;
    images at <images>/<data_id>. Accuracy per dimension (question type)."""

    name = "seed"

    def load(self, questions, annotations, images, **options):
        raw = json.loads(Path(annotations or questions).read_text())
        names = {v: k for k, v in raw.get("question_type", {}).items()}
        def make(q):
            if q.get("data_type", "image") != "image":
                return None
            opts = [q[f"choice_{c}"] for c in "abcd"]
            prompt = choice_prompt(q["question"], opts) + "\n" + MULTIPLE_CHOICE
            image = file_image(Path(images) / q["data_id"]) if images else None
            return Item(str(q["question_id"]), prompt, image, q["answer"],
                        {"options": opts, "dimension": names.get(q["question_type_id"], str(q["question_type_id"]))})

        return rows_to_items(raw["questions"], make, str(annotations or questions))

    def summarize(self, records):
        out = super().summarize(records)
        dims = defaultdict(list)
        for r in records:
            dims[r["meta"]["dimension"]].append(r["score"])
        out["per_dimension"] = {d: sum(v) / len(v) for d, v in sorted(dims.items())}
        return out
