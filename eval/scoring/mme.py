"""MME: per subtask, acc (per question) and acc+ (both questions of an image right); scores are
percentages summed into the perception and cognition totals."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from eval.scoring.pope import parse_yes_no

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]


def mme_scores(records: Iterable[dict]) -> dict:
    """Records: {"subtask", "image", "answer" (Yes/No), "prediction"}."""
    by_task: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_task[r["subtask"]][r["image"]].append(parse_yes_no(r["prediction"]) == r["answer"].strip().lower())
    out = {}
    for task, images in by_task.items():
        answers = [c for v in images.values() for c in v]
        acc = 100 * sum(answers) / len(answers)
        acc_plus = 100 * sum(all(v) for v in images.values()) / len(images)
        out[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    out["perception"] = sum(out[t]["score"] for t in PERCEPTION if t in out)
    out["cognition"] = sum(out[t]["score"] for t in COGNITION if t in out)
    return out
