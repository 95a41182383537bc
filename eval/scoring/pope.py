"""POPE: yes/no object hallucination metrics (positive class: "yes")."""

from __future__ import annotations

import re
from typing import Sequence


def parse_yes_no(text: str) -> str:
    """'yes' or 'no' as the LLaVA POPE evaluation reads it: the first sentence, 'no'/'not' means no."""
    first = re.split(r"[.\n]", text.strip(), maxsplit=1)[0].lower()
    words = set(re.findall(r"[a-z]+", first))
    return "no" if {"no", "not"} & words else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(predictions, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "n": n}
