"""Scorers against hand-computed cases: every normalisation rule, leave-one-out, CircularEval,
POPE, MME and bootstrap."""

from __future__ import annotations

import pytest

from eval.scoring.choice import circular_eval, circular_shifts, parse_letter
from eval.scoring.mme import mme_scores
from eval.scoring.pope import parse_yes_no, pope_metrics
from eval.scoring.vqa import exact_match, normalize_answer, vqa_accuracy
from eval.stats import bootstrap_ci, paired_comparison


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two", "2"),  # number words
        ("none", "0"),
        ("the dog", "dog"),  # articles
        ("a red car.", "red car"),  # trailing period
        ("3.5", "3.5"),  # a decimal point stays
        ("1,000", "1000"),  # digit-grouping comma: punctuation dropped
        ("yes, it is", "yes it is"),  # punctuation next to a space is dropped
        ("black-and-white", "black and white"),  # inside a word it becomes a space
        ("dont", "don't"),  # contractions
        ("isnt", "isn't"),
        ("  Yes\n", "yes"),  # whitespace and case
        ("(left)", "left"),
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_leave_one_out():
    # 3 of 10 annotators say "2": the 3 subsets without one of them hold 2 matches (2/3), the
    # other 7 hold 3 matches (1): (3 * 2/3 + 7) / 10 = 0.9
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_gqa_exact_match():
    assert exact_match("The table.", "table") == 1.0
    assert exact_match("tables", "table") == 0.0


@pytest.mark.parametrize(
    "text, options, letter",
    [
        ("B", ["a", "b", "c"], "B"),
        ("(C) the third", ["a", "b", "c"], "C"),
        ("A.", ["x", "y"], "A"),
        ("The answer is B.", ["x", "y"], "B"),
        ("dog", ["cat", "dog"], "B"),
        ("I cannot tell", ["cat", "dog"], None),  # a parse failure, never a guess
        ("A or B", ["cat", "dog"], None),
        ("E", ["a", "b", "c", "d"], None),  # not an offered letter
    ],
)
def test_letter_parsing(text, options, letter):
    assert parse_letter(text, options) == letter


def test_circular_eval_needs_every_shift_right():
    records = [{"index": 1, "correct": True}] * 4 + [{"index": 2, "correct": True}] * 3 + [{"index": 2, "correct": False}]
    out = circular_eval(records)
    assert out == {"circular_accuracy": 0.5, "questions": 2, "variants": 8}
    shifts = circular_shifts(["w", "x", "y", "z"], "C")
    assert [s[1] for s in shifts] == ["C", "B", "A", "D"]
    assert all(opts["ABCD".index(ans)] == "y" for opts, ans in shifts)


def test_pope_metrics_and_edge_cases():
    assert parse_yes_no("Yes, there is a dog.") == "yes"
    assert parse_yes_no("No.") == "no"
    assert parse_yes_no("There is not a dog in the image.") == "no"
    assert parse_yes_no("") == "yes"  # LLaVA's rule: anything without no/not is yes
    m = pope_metrics(["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "n": 4}
    none_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["yes_ratio"] == 0.0


def test_mme_acc_and_acc_plus():
    recs = [
        {"subtask": "count", "image": "1.jpg", "answer": "Yes", "prediction": "Yes"},
        {"subtask": "count", "image": "1.jpg", "answer": "No", "prediction": "No"},
        {"subtask": "count", "image": "2.jpg", "answer": "Yes", "prediction": "Yes"},
        {"subtask": "count", "image": "2.jpg", "answer": "No", "prediction": "Yes"},
        {"subtask": "code_reasoning", "image": "3.jpg", "answer": "No", "prediction": "no"},
        {"subtask": "code_reasoning", "image": "3.jpg", "answer": "Yes", "prediction": "no"},
    ]
    s = mme_scores(recs)
    assert s["count"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert s["perception"] == 125.0 and s["cognition"] == 50.0


def test_bootstrap_and_paired_comparison():
    lo, hi = bootstrap_ci([1, 0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3
    cmp = paired_comparison({str(i): 0.0 for i in range(40)}, {str(i): float(i % 2) for i in range(40)})
    assert cmp["difference"] == 0.5 and cmp["p_b_better"] == 1.0 and cmp["b_wins"] == 20
