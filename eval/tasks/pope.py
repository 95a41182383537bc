"""POPE (random / popular / adversarial): yes-no questions about objects."""

from __future__ import annotations

import json
from pathlib import Path

from eval.scoring.pope import parse_yes_no, pope_metrics
from eval.tasks.base import SHORT_ANSWER, Item, Task, file_image, register


@register
class POPE(Task):
    """JSONL lines {question_id, image, text, label}; images in the COCO val2014 folder."""

    name = "pope"
    max_new_tokens = 8

    def load(self, questions, annotations, images, **options):
        items = []
        for n, line in enumerate(Path(annotations or questions).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{annotations or questions}:{n}: {e}") from e
            image = file_image(Path(images) / r["image"]) if images else None
            items.append(Item(str(r["question_id"]), f"{r['text']}\n{SHORT_ANSWER}", image, r.get("label"),
                              {"category": r.get("category", "")}))
        return items

    def parse(self, output, item):
        return parse_yes_no(output)

    def score(self, parsed, target) -> float:
        return float(parsed == str(target).strip().lower())

    def summarize(self, records):
        return pope_metrics([r["parsed"] for r in records], [str(r["target"]).strip().lower() for r in records])
