"""Open-ended VQA tasks in their official file formats: VQAv2, VizWiz, TextVQA, GQA."""

from __future__ import annotations

import json
from pathlib import Path

from eval.scoring.vqa import exact_match, vqa_accuracy
from eval.tasks.base import SHORT_ANSWER, Item, Task, file_image, register, rows_to_items


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


class _VqaTask(Task):
    def score(self, parsed: str, target) -> float:
        return vqa_accuracy(parsed, target)


@register
class VQAv2(_VqaTask):
    """questions: v2_OpenEnded_mscoco_*_questions.json; annotations: v2_mscoco_*_annotations.json;
    images: the COCO folder (COCO_<split>_<12-digit id>.jpg, or <id>.jpg)."""

    name = "vqav2"

    def load(self, questions, annotations, images, **options):
        qs = _load_json(questions)["questions"]
        answers = {}
        if annotations:
            answers = {str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in _load_json(annotations)["annotations"]}
        split = _load_json(questions).get("data_subtype", "val2014")

        def make(q):
            image = None
            if images is not None:
                path = Path(images) / f"COCO_{split}_{int(q['image_id']):012d}.jpg"
                image = file_image(path if path.exists() else Path(images) / f"{q['image_id']}.jpg")
            return Item(str(q["question_id"]), f"{q['question']}\n{SHORT_ANSWER}", image, answers.get(str(q["question_id"])))

        return rows_to_items(qs, make, str(questions))

    def targets(self, annotations, questions=None):
        return {str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in _load_json(annotations)["annotations"]}


@register
class VizWiz(_VqaTask):
    """A VizWiz split JSON (a list of {image, question, answers}); question_id is the image name."""

    name = "vizwiz"

    def load(self, questions, annotations, images, **options):
        rows = _load_json(annotations or questions)
        prompt = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER
        return rows_to_items(rows, lambda r: Item(r["image"], f"{r['question']}\n{prompt}",
                                                  file_image(Path(images) / r["image"]) if images else None,
                                                  [a["answer"] for a in r.get("answers", [])]), str(annotations or questions))


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
            return Item(str(r["question_id"]), f"{question}\n{SHORT_ANSWER}", image, r.get("answers", []))

        return rows_to_items(rows, make, str(annotations or questions))


@register
class GQA(Task):
    """GQA questions JSON ({question_id: {imageId, question, answer}}), images <imageId>.jpg."""

    name = "gqa"

    def load(self, questions, annotations, images, **options):
        rows = _load_json(questions)
        return rows_to_items(list(rows.items()), lambda kv: Item(str(kv[0]), f"{kv[1]['question']}\n{SHORT_ANSWER}",
                             file_image(Path(images) / f"{kv[1]['imageId']}.jpg") if images else None, kv[1].get("answer")),
                             str(questions), key=lambda i, kv: kv[0])

    def score(self, parsed, target) -> float:
        return exact_match(parsed, target)
