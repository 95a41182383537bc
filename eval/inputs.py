"""What eve-eval checks in the files it is handed, in one place for every task, so bad input is
a one-line error (`eve-eval: error: FILE[:LINE]: problem`, exit 2), never a traceback or a
quietly wrong score.

Benchmark files (questions, annotations): a missing or empty file, a file with no question in
it, or a question id given twice is an error naming the file.

Prediction files (`eve-eval score`) and a run's own records are read with eval.jsonl (a torn
last line is dropped with a warning; any other bad line is an error naming FILE:LINE). Each
line needs a "question_id" (string or integer) and an "answer" (string or number); a run's
records an "output".

One prediction per question: a question_id given again with the same answer is counted once,
with a warning naming both lines; given again with another answer it is an error naming the
id and both lines, since which one was meant is not ours to guess.

Matching, as the official VQA scorer does it: a prediction for a question_id the annotations
do not have (another split, another id scheme) is an error and nothing is scored. Questions
with no prediction (a partial or --limit run) are allowed but counted: the summary's
"coverage" gives questions / answered / missing, and the metrics are over the answered ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from eval.jsonl import InputError, drop_torn_tail, kind, read_jsonl
from eval.tasks.base import Item, Task

log = logging.getLogger("eve-eval")
MATCHING_POLICY = ("metrics are over the answered questions only; a prediction for a question the annotations "
                   "do not have is an error; one prediction per question")


def _problem(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"missing field {e.args[0]!r}" if e.args else "missing field"
    if isinstance(e, json.JSONDecodeError):
        return f"not JSON at line {e.lineno} column {e.colno}: {e.msg}"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8: {e.reason} at byte {e.start}"
    if isinstance(e, OSError):
        return f"cannot read {e.filename}: {e.strerror}" if e.filename else f"cannot read: {e}"
    if isinstance(e, ValueError):  # the tasks' own checks say what is wrong in words
        return str(e)
    return f"{type(e).__name__}: {e}"


def _files(*paths: Path | None) -> str:
    """The benchmark files given, checked to exist and hold something; their names for messages."""
    given = [Path(p) for p in dict.fromkeys(paths) if p is not None]
    for p in given:
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        # a 0-byte or blank file would otherwise parse as "no questions" and score 0.0
        if p.is_file() and p.stat().st_size < 2**16 and not p.read_bytes().strip():
            raise InputError(f"{p}: the file is empty")
    return ", ".join(map(str, given))


def _read(files: str, task: Task, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{files}: cannot be read as {task.name}: {_problem(e)}") from e
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # JSON of another shape: say which one we read
        expected = " ".join((type(task).__doc__ or "").split()).split(". ")[0]  # the first sentence
        raise InputError(f"{files}: cannot be read as {task.name} ({_problem(e)}); expected {expected}") from e


def load_items(task: Task, questions: Path, annotations: Path | None = None, images: Path | None = None,
               **options) -> list[Item]:
    """The task's items: at least one readable question, each id once."""
    files = _files(questions, annotations)
    items = _read(files, task, lambda: task.load(questions, annotations, images, **options))
    if not items:
        raise InputError(f"{files}: no {task.name} questions in it")
    if all(it.meta.get("malformed") for it in items):  # a run would be all error records
        raise InputError(f"{files}: no readable {task.name} question in it; first: {items[0].meta['problem']}")
    seen: set[str] = set()
    for item in items:
        if item.question_id in seen:
            raise InputError(f"{files}: question id {item.question_id!r} appears more than once")
        seen.add(item.question_id)
    return items


def load_targets(task: Task, annotations: Path, questions: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """(question_id -> target of every annotated question, ids of questions with no usable one)."""
    files = _files(annotations, questions)
    targets = _read(files, task, lambda: task.targets(annotations, questions))
    scorable = {q: t for q, t in targets.items() if t is not None}
    if not scorable:
        raise InputError(f"{files}: no annotated {task.name} questions in it")
    return scorable, [q for q, t in targets.items() if t is None]


def _question_id(row: dict, where: str) -> str:
    qid = row.get("question_id")
    if "question_id" not in row:
        raise InputError(f'{where}: no "question_id" (keys: {", ".join(map(repr, row)) or "none"})')
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise InputError(f'{where}: "question_id" must be a string or an integer, not {kind(qid)}')
    return str(qid)


def _answer(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if key not in row:
        raise InputError(f'{where}: no "{key}" (keys: {", ".join(map(repr, row))})')
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f'{where}: "{key}" must be a string or a number, not {kind(value)}')
    return str(value)


@dataclass
class Predictions:
    path: Path
    rows: dict[str, dict] = field(default_factory=dict)  # question_id -> its (first) row
    lines: dict[str, int] = field(default_factory=dict)  # question_id -> its line
    read: int = 0  # object lines read, duplicates included
    duplicates: int = 0
    torn: int = 0  # torn last lines dropped (0 or 1)


def read_predictions(path: Path, answer_key: str = "answer", repair: bool = False) -> Predictions:
    """One row per question_id (see the module docstring). repair: cut a torn last line off the
    file (a run's own records, whose item is then redone); else it is only left out."""
    jsonl = read_jsonl(path)
    out = Predictions(Path(path), read=len(jsonl.rows), torn=int(jsonl.torn_line is not None))
    for n, row in jsonl.rows:
        where = f"{path}:{n}"
        qid, answer = _question_id(row, where), _answer(row, answer_key, where)
        if qid not in out.rows:
            out.rows[qid], out.lines[qid] = row, n
            continue
        first = out.lines[qid]
        if str(out.rows[qid][answer_key]) != answer:
            raise InputError(f"{where}: question_id {qid!r} is answered again, differently from line {first}; "
                             "one prediction per question")
        log.warning("%s: question_id %r repeats line %d with the same answer; counted once", where, qid, first)
        out.duplicates += 1
    if repair:  # only once every line has passed: a refused file is left as it was
        drop_torn_tail(jsonl)
    if jsonl.torn:
        log.warning("%s: %s", jsonl.torn, "dropped from the file; its item is redone" if repair else "left out")
    return out


def match(predictions: Predictions, targets: dict[str, Any], annotations: str) -> list[str]:
    """Every prediction must name an annotated question (else an error); returns the question
    ids left without a prediction, warning when there are any."""
    if not predictions.rows:
        raise InputError(f"{predictions.path}: no predictions in it")
    unknown = [q for q in predictions.rows if q not in targets]
    if unknown:
        examples = ", ".join(f"{q!r} (line {predictions.lines[q]})" for q in unknown[:3])
        raise InputError(f"{predictions.path}: {len(unknown)} of {len(predictions.rows)} predictions are for questions "
                         f"{annotations} has no annotation for: {examples}{' ...' if len(unknown) > 3 else ''}; "
                         "another split or id scheme? Nothing scored")
    missing = [q for q in targets if q not in predictions.rows]
    if missing:
        log.warning("%s: %d of %d annotated questions have no prediction (e.g. %r); scored over the %d answered",
                    predictions.path, len(missing), len(targets), missing[0], len(targets) - len(missing))
    return missing


def coverage(predictions: Predictions, targets: dict, missing: list[str], unannotated: list[str]) -> dict:
    """Counts that add up: lines = answered + duplicates; questions = answered + missing."""
    return {"prediction_lines": predictions.read, "duplicate_lines": predictions.duplicates,
            "torn_lines_dropped": predictions.torn, "questions": len(targets),
            "answered": len(targets) - len(missing), "missing": len(missing),
            "questions_without_annotation": len(unannotated), "policy": MATCHING_POLICY}
