"""POPE (random / popular / adversarial): yes-no questions about objects."""

from __future__ import annotations

import json
from pathlib import Path

from eval.scoring.pope import parse_yes_no, pope_metrics
from eval.tasks.base import SHORT_ANSWER, Item, Task, file_image, register, rows_to_items


@register
class POPE(Task):
    """JSONL lines {question_id, image, text, label}; images in the COCO val2014 folder."""

    name = "pope"

    def load(self, questions, annotations, images, **options):
        path = Path(annotations or questions)
        lines = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]

        def make(line):
            r = json.loads(line)
            label = r.get("label")
            if label is not None and str(label).strip().lower() not in ("yes", "no"):  # else always scored wrong
                raise ValueError(f"label {label!r} is neither yes nor no")
            image = file_image(Path(images) / r["image"]) if images else None
            return Item(str(r["question_id"]), f"{r['text']}\n{SHORT_ANSWER}", image, label,
                        {"category": r.get("category", "")})

        return rows_to_items(lines, make, str(path))

    def parse(self, output, item):
        return parse_yes_no(output)

    def score(self, parsed, target) -> float:
        return float(parsed == str(target).strip().lower())

    def summarize(self, records):
        return pope_metrics([r["parsed"] for r in records], [str(r["target"]).strip().lower() for r in records])
