"""MME: yes/no questions in 14 subtasks, two per image; acc, acc+ and the two totals."""

from __future__ import annotations

from pathlib import Path

from eval.scoring.mme import mme_scores
from eval.scoring.pope import parse_yes_no
from eval.tasks.base import Item, Task, file_image, register


@register
class MME(Task):
    """The MME benchmark folder: <subtask>/ holding images and `questions_answers_YN/*.txt` (or
    .txt files beside the images), each line `image<TAB>question<TAB>Yes|No`."""

    name = "mme"

    def load(self, questions, annotations, images, **options):
        root = Path(questions)
        items = []
        for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            qa_dir = task_dir / "questions_answers_YN"
            for txt in sorted((qa_dir if qa_dir.is_dir() else task_dir).glob("*.txt")):
                try:
                    lines = txt.read_text(encoding="utf-8-sig").splitlines()
                except UnicodeDecodeError as e:
                    raise ValueError(f"{txt}: not UTF-8 ({e.reason} at byte {e.start})") from e
                for n, line in enumerate(lines):
                    parts = line.split("\t")
                    if len(parts) != 3:
                        raise ValueError(f"{txt}:{n + 1}: expected image<TAB>question<TAB>answer")
                    image_name, question, answer = parts
                    if answer.strip().lower() not in ("yes", "no"):  # else always scored wrong
                        raise ValueError(f"{txt}:{n + 1}: answer {answer!r} is neither Yes nor No")
                    image_dir = task_dir / "images" if (task_dir / "images").is_dir() else task_dir
                    items.append(Item(f"{task_dir.name}/{image_name}/{n}", question, file_image(image_dir / image_name),
                                      answer, {"subtask": task_dir.name, "image": image_name}))
        return items

    def parse(self, output, item):
        return parse_yes_no(output)

    def score(self, parsed, target) -> float:
        return float(parsed == target.strip().lower())

    def summarize(self, records):
        return mme_scores({"subtask": r["meta"]["subtask"], "image": r["meta"]["image"], "answer": r["target"],
                           "prediction": r["parsed"]} for r in records)
