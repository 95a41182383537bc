"""eve-eval against hostile input (issue 16): a bad predictions line, a torn or corrupt run
record, duplicate predictions, question ids that disagree with the annotations, empty
annotation files. Each must be a one-line error naming FILE[:LINE] and the problem (exit 2,
no traceback), or a warning with counts that add up; never a score that quietly means
something else. The policies tested are those in eval/inputs.py and eval/jsonl.py."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_image
from eval.cli import main as eval_main
from eval.tasks import get_task
from test_eval_run import make_benchmarks

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["no", "yes", "no", "yes"]  # POPE questions 0..3
RIGHT = [{"question_id": i, "answer": LABELS[i]} for i in range(4)]
WRONG = [{"question_id": i, "answer": "yes" if LABELS[i] == "no" else "no"} for i in range(4)]


def _lines(*rows) -> bytes:
    return b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows)


@pytest.fixture(scope="module")
def pope(tmp_path_factory) -> Path:
    """A clean POPE file (4 questions) with its images beside it."""
    root = tmp_path_factory.mktemp("pope")
    for i in range(4):
        random_image(32 + 8 * i, 32, seed=i).save(root / f"{i}.jpg")
    (root / "pope.jsonl").write_text("".join(json.dumps({"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?",
                                                         "label": LABELS[i]}) + "\n" for i in range(4)))
    return root / "pope.jsonl"


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    return make_benchmarks(tmp_path_factory.mktemp("bench"))


def _cli(*args) -> subprocess.CompletedProcess:
    """The real command, in a process of its own: what a user sees, traceback included."""
    return subprocess.run([sys.executable, "-m", "eval.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def _score(preds: Path, annotations: Path, task: str = "pope") -> subprocess.CompletedProcess:
    return _cli(*_score_args(preds, annotations, task))


def _refused(out: subprocess.CompletedProcess) -> str:
    """Exit 2, no score on stdout, one error line on stderr and no traceback; returns that line."""
    assert out.returncode == 2, out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("eve-eval: error: ")
    return line


def _scored(argv, capsys) -> tuple[dict, str]:
    """A score that goes through, in this process (scipy imports once): (summary, stderr)."""
    eval_main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return json.loads(out.out), out.err


def _score_args(preds: Path, annotations: Path, task: str = "pope") -> list:
    return ["score", "--task", task, "--predictions", preds, "--annotations", annotations]


def _fails(argv, capsys) -> str:
    """What _refused checks, through main() in this process (quicker; and runs need the
    session's model): exit 2, nothing on stdout, the error as the last stderr line."""
    with pytest.raises(SystemExit) as exc:
        eval_main([str(a) for a in argv])
    out = capsys.readouterr()
    assert exc.value.code == 2 and out.out == "" and "Traceback" not in out.err
    line = out.err.strip().splitlines()[-1]
    assert line.startswith("eve-eval: error: ")
    return line


# --- 1. a predictions line that is not a JSON object ------------------------------------------

BAD_LINES = {
    "list": (b"[1, 2]\n", "expected a JSON object, got a list"),
    "integer": (b"42\n", "expected a JSON object, got an integer"),
    "null": (b"null\n", "expected a JSON object, got null"),
    "string": (b'"yes"\n', "expected a JSON object, got a string"),
    "latin-1 byte": (b'{"question_id": 1, "answer": "caf\xe9"}\n', "not UTF-8: byte 0xe9"),
    "cut short": (b'{"question_id": 1, "ans\n', "not JSON"),
    "no answer": (b'{"question_id": 1}\n', 'no "answer"'),
    "null answer": (b'{"question_id": 1, "answer": null}\n', '"answer" must be a string or a number, not null'),
    "list id": (b'{"question_id": [1], "answer": "no"}\n', '"question_id" must be a string or an integer, not a list'),
}


# a cut-short last line is a torn write, left out with a warning: test_score_leaves_out_a_torn_last_line
@pytest.mark.parametrize("case, where", [(c, w) for c in sorted(BAD_LINES) for w in ("middle", "last")
                                         if (c, w) != ("cut short", "last")])
def test_score_names_the_file_and_line_of_a_bad_prediction(case, where, pope, tmp_path, capsys):
    bad, problem = BAD_LINES[case]
    rows = [RIGHT[0], bad, *RIGHT[1:]] if where == "middle" else [*RIGHT, bad]
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines(*rows))
    line = _fails(_score_args(preds, pope), capsys)
    assert f"{preds}:{2 if where == 'middle' else 5}: " in line and problem in line


@pytest.mark.parametrize("case", ["list", "integer", "latin-1 byte", "cut short"])
def test_the_real_command_says_so_in_one_line(case, pope, tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines(RIGHT[0], BAD_LINES[case][0], *RIGHT[1:]))
    line = _refused(_score(preds, pope))
    assert f"{preds}:2: {BAD_LINES[case][1]}" in line


def test_score_leaves_out_a_torn_last_line(pope, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    torn = json.dumps(RIGHT[3]).encode()[:-7]  # what kill -9 leaves: no newline, no closing brace
    preds.write_bytes(_lines(*RIGHT[:3], torn))
    summary, err = _scored(_score_args(preds, pope), capsys)
    assert f"{preds}:4: torn last line ({len(torn)} bytes" in err
    coverage = summary["coverage"]
    assert coverage["prediction_lines"] == 3 and coverage["torn_lines_dropped"] == 1
    assert (coverage["questions"], coverage["answered"], coverage["missing"]) == (4, 3, 1)


def test_score_of_a_missing_or_empty_predictions_file_is_an_error(pope, tmp_path, capsys):
    assert "no such file" in _fails(_score_args(tmp_path / "nope.jsonl", pope), capsys).lower()
    (tmp_path / "empty.jsonl").write_text("\n \n")
    assert f"{tmp_path / 'empty.jsonl'}: no predictions in it" in _fails(_score_args(tmp_path / "empty.jsonl", pope), capsys)


# --- 2. a torn or corrupt record in a run's own predictions.jsonl ------------------------------

def _run_argv(checkpoint, pope, out) -> list:
    return ["run", "--model", checkpoint, "--task", "pope", "--questions", pope, "--images", pope.parent,
            "--out", out, "--batch-size", "4", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def finished_run(checkpoint, pope, tmp_path_factory) -> Path:
    """A completed POPE run (its --out folder); tests copy it and damage the copy."""
    out = tmp_path_factory.mktemp("run")
    eval_main([str(a) for a in _run_argv(checkpoint, pope, out)])
    return out


def _copy(finished_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    (run_dir,) = out.iterdir()
    return out, run_dir / "predictions.jsonl"


@pytest.mark.parametrize("cut", ["half the last line", "the last line and the newline before it"])
def test_rerun_drops_a_torn_last_record_and_redoes_its_item(cut, finished_run, checkpoint, pope, tmp_path, capsys):
    out, path = _copy(finished_run, tmp_path)
    whole = path.read_bytes()
    last = whole.rstrip(b"\n").rfind(b"\n") + 1  # where the 4th record starts
    damaged = whole[: last + (len(whole) - last) // 2] if cut.startswith("half") else whole[: last - 1]
    path.write_bytes(damaged)
    eval_main([str(a) for a in _run_argv(checkpoint, pope, out)])
    err = capsys.readouterr().err
    if cut.startswith("half"):
        assert f"{path}:4: torn last line ({len(damaged) - last} bytes" in err and "redone" in err
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole again
    assert [r["question_id"] for r in rows] == ["0", "1", "2", "3"]
    assert path.read_bytes()[:last] == whole[:last]  # the good records kept as they were
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["items"] == summary["scored"] == 4


def test_rerun_refuses_a_corrupt_record_that_is_not_the_last(finished_run, checkpoint, pope, tmp_path, capsys):
    out, path = _copy(finished_run, tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"\n"  # a torn line with good ones after it: not an interrupted append
    path.write_bytes(b"".join(lines))
    err = _fails(_run_argv(checkpoint, pope, out), capsys)
    assert f"{path}:2: not JSON" in err and "not the last line" in err
    assert path.read_bytes() == b"".join(lines)  # nothing cut or appended


def test_a_second_run_on_the_same_records_is_refused(finished_run, checkpoint, pope, tmp_path, capsys):
    out, path = _copy(finished_run, tmp_path)
    path.write_bytes(path.read_bytes()[:-10])  # the line a first run is still writing
    size = path.stat().st_size
    with open(path, "a") as first:
        fcntl.flock(first, fcntl.LOCK_EX)
        err = _fails(_run_argv(checkpoint, pope, out), capsys)
    assert f"{path}: another eve-eval run is writing this file" in err
    assert path.stat().st_size == size  # that line is not cut as a torn tail


def test_compare_refuses_a_corrupt_record(finished_run, tmp_path, capsys):
    out, path = _copy(finished_run, tmp_path)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\n[]\n", 1))
    assert f"{path}:2: expected a JSON object, got a list" in _fails(["compare", path.parent, path.parent], capsys)


# --- 3. duplicate predictions ------------------------------------------------------------------

def test_identical_duplicates_are_counted_once(pope, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines(RIGHT[0], RIGHT[1], WRONG[2], WRONG[3], RIGHT[1], RIGHT[1]))  # 4/6 if counted
    summary, err = _scored(_score_args(preds, pope), capsys)
    assert f"{preds}:5: question_id '1' repeats line 2" in err and f"{preds}:6:" in err
    assert summary["accuracy"] == 0.5 and summary["n"] == 4
    c = summary["coverage"]
    assert c["prediction_lines"] == 6 == c["answered"] + c["duplicate_lines"] and c["missing"] == 0


def test_conflicting_duplicates_are_an_error(pope, tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines(*RIGHT, WRONG[2]))
    line = _refused(_score(preds, pope))  # the real command
    assert f"{preds}:5: question_id '2'" in line and "line 3" in line


# --- 4. question ids that disagree with the annotations ----------------------------------------

def test_predictions_for_unknown_questions_are_an_error(pope, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines(RIGHT[0], RIGHT[1], {"question_id": "COCO_2", "answer": "no"}, {"question_id": 3.0, "answer": "no"}))
    line = _fails(_score_args(preds, pope), capsys)
    assert f"{preds}:4: " in line and "not a number" in line  # 3.0 is not the id 3
    preds.write_bytes(_lines(RIGHT[0], RIGHT[1], {"question_id": "COCO_2", "answer": "no"}, {"question_id": "q3", "answer": "no"}))
    line = _refused(_score(preds, pope))  # the real command
    assert "2 of 4 predictions" in line and str(pope) in line and "'COCO_2' (line 3)" in line and "'q3' (line 4)" in line


def test_unanswered_questions_are_counted_and_said(pope, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines(RIGHT[0], WRONG[3]))
    summary, err = _scored(_score_args(preds, pope), capsys)
    assert "2 of 4 annotated questions have no prediction" in err
    c = summary["coverage"]
    assert (c["questions"], c["answered"], c["missing"]) == (4, 2, 2) and summary["items"] == summary["n"] == 2
    assert summary["accuracy"] == 0.5 and "answered questions only" in c["policy"]


def _vqa_files(root: Path, question_ids, annotation_ids) -> tuple[Path, Path]:
    for i in question_ids:
        random_image(40, 40, seed=i).save(root / f"{i}.jpg")
    q, a = root / "q.json", root / "a.json"
    q.write_text(json.dumps({"questions": [{"question_id": i, "image_id": i, "question": "Colour?"} for i in question_ids]}))
    a.write_text(json.dumps({"annotations": [{"question_id": i, "answers": [{"answer": "red"}] * 10} for i in annotation_ids]}))
    return q, a


def test_run_refuses_question_and_annotation_ids_that_disagree_before_loading_a_model(tmp_path, capsys):
    q, a = _vqa_files(tmp_path, [0, 1], [100, 101])
    err = _fails(["run", "--model", tmp_path / "no-such-model", "--task", "vqav2", "--questions", q, "--annotations", a,
                  "--images", tmp_path, "--out", tmp_path / "out"], capsys)
    assert f"{a}: none of the 2 questions from {q} has an annotation" in err


def test_run_counts_questions_without_an_annotation(checkpoint, tmp_path, capsys):
    q, a = _vqa_files(tmp_path, [0, 1, 2], [1])
    eval_main([str(x) for x in ["run", "--model", checkpoint, "--task", "vqav2", "--questions", q, "--annotations", a,
                                "--images", tmp_path, "--out", tmp_path / "out", "--max-new-tokens", "2"]])
    out = capsys.readouterr()
    assert "2 of 3 items have no annotation" in out.err
    summary = json.loads(out.out[: out.out.rindex("}") + 1])
    assert (summary["items"], summary["scored"], summary["unscored"]) == (3, 1, 2)


# --- 5. empty annotation files -----------------------------------------------------------------

EMPTY = {
    "0 bytes": ("pope", "", "the file is empty"),
    "blank lines": ("pope", " \n\n", "the file is empty"),
    "an empty list": ("pope", "[]\n", "no annotated pope questions"),
    "an empty vizwiz list": ("vizwiz", "[]", "no annotated vizwiz questions"),
    "no vqav2 annotations": ("vqav2", '{"annotations": []}', "no annotated vqav2 questions"),
    "a textvqa split without answers": ("textvqa", json.dumps({"data": [{"question_id": 1, "image_id": "1",
                                                                          "question": "?"}]}), "no annotated textvqa questions"),
    "the wrong JSON": ("textvqa", "[1, 2]", "cannot be read as textvqa"),
}


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_score_refuses_an_empty_annotations_file(case, tmp_path, capsys):
    task, text, problem = EMPTY[case]
    annotations = tmp_path / "annotations.json"
    annotations.write_text(text)
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines(RIGHT[1]))
    # the real command for the case (a 0-byte POPE file), main() for the rest
    line = _refused(_score(preds, annotations, task)) if case == "0 bytes" else _fails(_score_args(preds, annotations, task), capsys)
    assert f"error: {annotations}" in line and problem in line


def test_run_refuses_an_empty_questions_file_before_loading_a_model(tmp_path, capsys):
    (tmp_path / "pope.jsonl").write_text("")
    err = _fails(["run", "--model", tmp_path / "no-such-model", "--task", "pope", "--questions", tmp_path / "pope.jsonl",
                  "--out", tmp_path / "out"], capsys)
    assert f"{tmp_path / 'pope.jsonl'}: the file is empty" in err


def test_repeated_or_answerless_annotations(tmp_path, capsys):
    q, a = _vqa_files(tmp_path, [0, 1], [0, 1, 1])
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines({"question_id": 0, "answer": "red"}))
    line = _fails(_score_args(preds, a, "vqav2"), capsys)
    assert f"{a}: " in line and "question id '1' appears more than once" in line
    a.write_text(json.dumps({"annotations": [{"question_id": 0, "answers": [{"answer": "red"}] * 10},
                                             {"question_id": 1, "answers": []}]}))
    summary, err = _scored(_score_args(preds, a, "vqav2"), capsys)  # no human answers: unscorable, counted, not a crash
    assert "1 question(s) have no usable annotation" in err
    c = summary["coverage"]
    assert (c["questions"], c["questions_without_annotation"], c["answered"]) == (1, 1, 1)


# --- every task, through the one reader and the one matching rule --------------------------------

def _bench_score_args(task: str, spec: dict, preds: Path) -> list:
    annotations = spec.get("annotations", spec["questions"])
    return ["score", "--task", task, "--predictions", preds, "--annotations", annotations,
            *(["--questions", spec["questions"]] if "annotations" in spec else [])]


@pytest.mark.parametrize("task", ["vqav2", "textvqa", "vizwiz", "gqa", "pope", "scienceqa_img", "mme", "mmbench", "seed"])
def test_every_task_counts_each_question_once_and_refuses_strangers(task, benchmarks, tmp_path, capsys):
    spec = benchmarks[task]
    targets = get_task(task).targets(Path(spec.get("annotations", spec["questions"])), Path(spec["questions"]))
    ids = [q for q, t in targets.items() if t is not None]
    preds = tmp_path / "preds.jsonl"
    rows = [{"question_id": q, "answer": "A"} for q in ids]
    preds.write_bytes(_lines(*rows))
    eval_main([str(a) for a in _bench_score_args(task, spec, preds)])
    once = json.loads(capsys.readouterr().out)
    preds.write_bytes(_lines(*rows, *rows))  # every prediction twice, identically
    eval_main([str(a) for a in _bench_score_args(task, spec, preds)])
    twice = json.loads(capsys.readouterr().out)
    assert twice["coverage"]["duplicate_lines"] == len(ids) and twice["coverage"]["answered"] == len(ids)
    del once["coverage"], twice["coverage"], once["mean_score_ci95"], twice["mean_score_ci95"]
    assert once == twice
    preds.write_bytes(_lines(*rows, {"question_id": ids[0], "answer": "B"}))
    assert f"{preds}:{len(ids) + 1}: question_id {ids[0]!r}" in _fails(_bench_score_args(task, spec, preds), capsys)
    preds.write_bytes(_lines(*rows, {"question_id": "not-a-question", "answer": "A"}))
    assert "'not-a-question' (line" in _fails(_bench_score_args(task, spec, preds), capsys)


def test_mmbench_does_not_pass_a_question_with_shifts_unanswered(benchmarks, tmp_path, capsys):
    spec = benchmarks["mmbench"]
    targets = get_task("mmbench").targets(Path(spec["questions"]))
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(_lines(*[{"question_id": f"0-{s}", "answer": targets[f"0-{s}"]} for s in range(3)]))  # 3 of 4 shifts
    eval_main([str(a) for a in _bench_score_args("mmbench", spec, preds)])
    summary = json.loads(capsys.readouterr().out)
    assert summary["accuracy"] == 1.0 and summary["questions"] == 0 and summary["circular_incomplete"] == 1
