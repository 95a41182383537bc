"""Open-ended VQA tasks in their official file formats: VQAv2, VizWiz, TextVQA, GQA."""

from __future__ import annotations

import json
from pathlib import Path

from eval.scoring.vqa import exact_match, vqa_accuracy
from eval.tasks.base import SHORT_ANSWER, Item, Task, by_id, file_image, register, rows_to_items


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))  # -sig: as Windows editors save it
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _answers(answers: list) -> list[str] | None:
    """The human answers ({"answer": ...} or plain strings), or None (unscored, and counted so)
    where a split ships none: VQA accuracy over zero answers is undefined."""
    if not isinstance(answers, list):
        raise TypeError(f"answers must be a list, not {type(answers).__name__}")
    out = [a["answer"] if isinstance(a, dict) else a for a in answers]
    if not all(isinstance(a, str) for a in out):  # checked here: the scorer would fail mid-run
        raise TypeError(f"answers must be strings: {out[:3]!r}")
    return out or None


class _VqaTask(Task):
    def score(self, parsed: str, target) -> float:
        return vqa_accuracy(parsed, target)


@register
class VQAv2(_VqaTask):
    """questions: v2_OpenEnded_mscoco_*_questions.json; annotations: v2_mscoco_*_annotations.json;
    images: the COCO folder (COCO_<split>_<12-digit id>.jpg, or <id>.jpg)."""

    name = "vqav2"

    def load(self, questions, annotations, images, **options):
        raw = _load_json(questions)
        qs, split = raw["questions"], raw.get("data_subtype", "val2014")
        answers = self.targets(annotations) if annotations else {}

        def make(q):
            image = None
            if images is not None:
                path = Path(images) / f"COCO_{split}_{int(q['image_id']):012d}.jpg"
                image = file_image(path if path.exists() else Path(images) / f"{q['image_id']}.jpg")
            return Item(str(q["question_id"]), f"{q['question']}\n{SHORT_ANSWER}", image, answers.get(str(q["question_id"])))

        return rows_to_items(qs, make, str(questions))

    def targets(self, annotations, questions=None):
        return by_id(_load_json(annotations)["annotations"], lambda a: str(a["question_id"]),
                     lambda a: _answers(a["answers"]))


@register
class VizWiz(_VqaTask):
    """A VizWiz split JSON (a list of {image, question, answers}); question_id is the image name."""

    name = "vizwiz"

    def load(self, questions, annotations, images, **options):
        rows = _load_json(annotations or questions)
        prompt = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER
        return rows_to_items(rows, lambda r: Item(r["image"], f"{r['question']}\n{prompt}",
                                                  file_image(Path(images) / r["image"]) if images else None,
                                                  _answers(r.get("answers", []))), str(annotations or questions))


@register
class TextVQA(_VqaTask):
    """TextVQA_0.5.1_<split>.json ({"data": [...]}, images <image_id>.jpg). The OCR tokens go in
    the prompt, as LLaVA-1.5 and EVE report it (the reference's *_val_v051_ocr.jsonl); ocr=false
    leaves them out."""

    name = "textvqa"

    def load(self, questions, annotations, images, ocr: bool = True, **options):
        rows = _load_json(annotations or questions)["data"]
        def make(r):
            question = r["question"]
            if ocr and r.get("ocr_tokens"):
                question += "\nReference OCR token: " + ", ".join(r["ocr_tokens"])
            image = file_image(Path(images) / f"{r['image_id']}.jpg") if images else None
            return Item(str(r["question_id"]), f"{question}\n{SHORT_ANSWER}", image, _answers(r.get("answers", [])))

        return rows_to_items(rows, make, str(annotations or questions))


@register
class GQA(Task):
    """GQA questions JSON ({question_id: {imageId, question, answer}}), images <imageId>.jpg."""

    name = "gqa"

    def load(self, questions, annotations, images, **options):
        rows = _load_json(questions)

        def make(kv):
            qid, q = kv
            if not isinstance(q.get("answer", ""), str):  # the scorer would fail mid-run
                raise TypeError(f"answer must be a string, not {type(q['answer']).__name__}")
            image = file_image(Path(images) / f"{q['imageId']}.jpg") if images else None
            return Item(str(qid), f"{q['question']}\n{SHORT_ANSWER}", image, q.get("answer"))

        return rows_to_items(list(rows.items()), make, str(questions), key=lambda i, kv: kv[0])

    def score(self, parsed, target) -> float:
        return exact_match(parsed, target)
