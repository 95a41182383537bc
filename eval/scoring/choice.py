"""Multiple choice (ScienceQA-IMG, SEED-Bench, MMBench): parse a letter, score, CircularEval."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Sequence

LETTERS = "ABCDEFGHIJ"


def parse_letter(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-form answer names, or None when it names none (or several).

    Accepted: a bare letter ("B", "(B)", "B.", "B) cat", "Answer: B") or the text of exactly one
    option. A parse failure is scored wrong, never guessed (the reference picks a random letter).
    """
    letters = LETTERS[: len(options)]
    text = text.strip()
    standalone = set(re.findall(rf"\b([{letters}])\b", text))
    m = re.match(rf"^\(?([{letters}])\)?(?:[.:)\s]|$)", text)
    if m:
        return m.group(1) if standalone <= {m.group(1)} else None  # "A or B" names two
    m = re.search(rf"(?:answer|option)\s*(?:is)?\s*[:：]?\s*\(?([{letters}])\)?\b", text, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    named = [letters[i] for i, opt in enumerate(options) if opt and opt.strip().lower() == text.lower().rstrip(".")]
    if len(named) == 1:
        return named[0]
    return standalone.pop() if len(standalone) == 1 else None


def choice_prompt(question: str, options: Sequence[str], hint: str | None = None) -> str:
    lines = ([f"Hint: {hint}"] if hint else []) + [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines)


def circular_eval(records: Iterable[dict]) -> dict:
    """MMBench CircularEval: a question counts as right only if every circular shift of its
    options was answered right. Records: {"index" (question group), "correct": bool}."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[r["index"]].append(bool(r["correct"]))
    passed = [all(v) for v in groups.values()]
    return {"circular_accuracy": sum(passed) / len(passed) if passed else 0.0, "questions": len(passed),
            "variants": sum(len(v) for v in groups.values())}


def circular_shifts(options: Sequence[str], answer: str) -> list[tuple[list[str], str]]:
    """The N rotations of the options with the answer letter moved accordingly."""
    n = len(options)
    k = LETTERS.index(answer)
    return [([options[(i + s) % n] for i in range(n)], LETTERS[(k - s) % n]) for s in range(n)]
