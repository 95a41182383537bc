"""What a benchmark task is: how to read its files, prompt, parse, score and summarise."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."


@dataclass
class Item:
    question_id: str
    question: str  # the user turn without the image placeholder
    image: Callable[[], Any] | None  # -> PIL image (opened lazily), or None for text-only
    target: Any  # whatever the scorer needs (answers, letter, label ...)
    meta: dict = field(default_factory=dict)  # subtask, category, index ... (kept in records)


class Task:
    """Subclasses read the benchmark's own files and implement `parse` and `score`."""

    name: str = ""
    # The reference's eval loaders (eve/eval/model_vqa_loader.py) decode greedily up to 128 new
    # tokens, stopping at </s>; its ScienceQA and MMBench loaders allow 1024.
    max_new_tokens: int = 128

    def load(self, questions: Path, annotations: Path | None, images: Path | None, **options) -> list[Item]:
        raise NotImplementedError

    def targets(self, annotations: Path, questions: Path | None = None) -> dict[str, Any]:
        """question_id -> target, from the annotation file alone (for `eve-eval score`)."""
        return by_id(self.load(questions or annotations, annotations, None), lambda item: item.question_id,
                     lambda item: item.target)

    def parse(self, output: str, item: Item) -> str:
        return output.strip()

    def score(self, parsed: str, target: Any) -> float:
        raise NotImplementedError

    def summarize(self, records: list[dict]) -> dict:
        """Task-level metrics from per-item records (default: mean score)."""
        scores = [r["score"] for r in records]
        return {"accuracy": sum(scores) / len(scores) if scores else 0.0}


def by_id(rows, key: Callable, value: Callable) -> dict:
    """{key(row): value(row)}, refusing an id given twice: a dict would keep the last quietly."""
    out = {}
    for row in rows:
        k = key(row)
        if k in out:
            raise ValueError(f"question id {k!r} appears more than once")
        out[k] = value(row)
    return out


def bad_row(question_id: str, where: str, error: Exception) -> Item:
    """A malformed row becomes an item whose image cannot be opened: the runner records it as
    that item's error and goes on."""

    problem = f"{where}: malformed row: {type(error).__name__}: {error}"

    def fail():
        raise ValueError(problem)

    return Item(question_id, "", fail, None, {"malformed": True, "problem": problem})


def rows_to_items(rows, make_item, where: str, key=lambda i, row: str(i)) -> list[Item]:
    """make_item(row) (an item, a list of items, or None to skip) for each row; a row it cannot
    read becomes a bad_row item."""
    items = []
    for i, row in enumerate(rows):
        try:
            made = make_item(row)
            items.extend([] if made is None else made if isinstance(made, list) else [made])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a row of the wrong shape
            items.append(bad_row(f"malformed-{key(i, row)}", f"{where} row {i}", e))
    return items


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


def file_image(path: Path) -> Callable[[], Any]:
    from eve.image_io import load_image

    return lambda: load_image(path)


def base64_image(data: str) -> Callable[[], Any]:
    from eve.image_io import load_image

    return lambda: load_image(base64.b64decode(data))


def read_tsv(path: Path) -> list[dict]:
    import csv
    import sys

    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of a name
        return list(csv.DictReader(f, delimiter="\t"))


