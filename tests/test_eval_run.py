"""eve-eval end to end with a tiny model on generated items in each benchmark's own format."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import random_image
from eval.cli import main as eval_main

SIZES = [(40, 40), (90, 30), (24, 96), (64, 48)]


def _img(i: int) -> Image.Image:
    return random_image(*SIZES[i % len(SIZES)], seed=i)


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_benchmarks(root: Path) -> dict[str, dict]:
    """Tiny copies of each benchmark's file layout. Returns task -> CLI arguments."""
    imgs = root / "images"
    imgs.mkdir()
    for i in range(6):
        _img(i).save(imgs / f"COCO_val2014_{i:012d}.jpg")
        _img(i).save(imgs / f"{i}.jpg")
    (imgs / "COCO_val2014_000000000005.jpg").write_bytes(b"corrupt")  # one bad image
    vqa_q = {"data_subtype": "val2014", "questions": [{"question_id": i, "image_id": i, "question": "What colour?"} for i in range(6)]}
    vqa_a = {"annotations": [{"question_id": i, "answers": [{"answer": "red"}] * 10} for i in range(6)]}
    (root / "vqa_q.json").write_text(json.dumps(vqa_q))
    (root / "vqa_a.json").write_text(json.dumps(vqa_a))
    (root / "textvqa.json").write_text(json.dumps({"data": [
        {"question_id": i, "image_id": str(i), "question": "What does it say?", "answers": ["stop"] * 10,
         "ocr_tokens": ["stop", "sign"]} for i in range(4)]}))
    (root / "vizwiz.json").write_text(json.dumps([{"image": f"{i}.jpg", "question": "What is it?",
                                                   "answers": [{"answer": "unanswerable"}] * 10} for i in range(4)]))
    (root / "gqa.json").write_text(json.dumps({f"q{i}": {"imageId": str(i), "question": "Is it big?", "answer": "yes"} for i in range(4)}))
    (root / "pope.jsonl").write_text("".join(json.dumps({"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?",
                                                         "label": "yes" if i % 2 else "no"}) + "\n" for i in range(4))
                                     + "{not json\n" + json.dumps({"question_id": 9}) + "\n")  # two malformed rows
    sqa = root / "scienceqa"
    for i in range(3):
        (sqa / "test" / str(i)).mkdir(parents=True)
        _img(i).save(sqa / "test" / str(i) / "image.png")
    problems = {str(i): {"question": "Which is it?", "choices": ["cat", "dog", "bird"], "answer": i % 3, "hint": "",
                         "image": "image.png", "split": "test"} for i in range(3)}
    problems["9"] = {"question": "No image", "choices": ["a", "b"], "answer": 0, "image": None, "split": "test"}
    (root / "problems.json").write_text(json.dumps(problems))
    mme = root / "MME" / "count"
    mme.mkdir(parents=True)
    for i in range(2):
        _img(i).save(mme / f"{i}.jpg")
    (mme / "qa.txt").write_text("".join(f"{i}.jpg\tIs there one object?\t{a}\n" for i in range(2) for a in ("Yes", "No")))
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    rows = "".join(f"{i}\tWhat is shown?\tnan\tcat\tdog\tbird\tfish\tB\tcounting\t{_b64(_img(i))}\n" for i in range(2))
    (root / "mmbench.tsv").write_text(header + rows)
    seed = {"question_type": {"Scene Understanding": 1}, "questions": [
        {"question_id": str(i), "question": "Where?", "choice_a": "park", "choice_b": "beach", "choice_c": "room",
         "choice_d": "road", "answer": "A", "question_type_id": 1, "data_id": f"{i}.jpg"} for i in range(3)]}
    (root / "seed.json").write_text(json.dumps(seed))
    return {
        "vqav2": dict(questions=root / "vqa_q.json", annotations=root / "vqa_a.json", images=imgs),
        "textvqa": dict(questions=root / "textvqa.json", images=imgs, option="ocr=true"),
        "vizwiz": dict(questions=root / "vizwiz.json", images=imgs),
        "gqa": dict(questions=root / "gqa.json", images=imgs),
        "pope": dict(questions=root / "pope.jsonl", images=imgs),
        "scienceqa_img": dict(questions=root / "problems.json", images=sqa),
        "mme": dict(questions=root / "MME"),
        "mmbench": dict(questions=root / "mmbench.tsv"),
        "seed": dict(questions=root / "seed.json", images=imgs),
    }


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    return make_benchmarks(tmp_path_factory.mktemp("bench"))


def _run(task, spec, checkpoint, out, *extra):
    argv = ["run", "--model", str(checkpoint), "--task", task, "--out", str(out), "--batch-size", "3", "--max-new-tokens", "3"]
    for key in ("questions", "annotations", "images", "option"):
        if key in spec:
            argv += [f"--{key}", str(spec[key])]
    eval_main(argv + list(extra))
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith(task + "-")]
    return run_dir


@pytest.mark.parametrize("task", ["vqav2", "textvqa", "vizwiz", "gqa", "pope", "scienceqa_img", "mme", "mmbench", "seed"])
def test_every_task_format_runs_end_to_end(task, benchmarks, checkpoint, tmp_path):
    run_dir = _run(task, benchmarks[task], checkpoint, tmp_path)
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert records and summary["items"] == len(records)
    ok = [r for r in records if r["error"] is None]
    assert all(r["visual_tokens"] > 0 and r["processed_size"] and r["native_size"] for r in ok)
    assert (run_dir / "summary.md").exists()
    expected = {"pope": "f1", "mme": "perception", "mmbench": "circular_accuracy", "seed": "per_dimension",
                "scienceqa_img": "parse_failure_rate"}.get(task, "accuracy")
    assert expected in summary
    if task == "pope":
        malformed = [r for r in records if r["meta"].get("malformed")]
        assert len(malformed) == 2 and all("malformed row" in r["error"] for r in malformed)
        assert summary["errors"] == 2
    if task == "mmbench":
        assert len(records) == 8  # 2 questions x 4 circular shifts
    if task == "scienceqa_img":
        assert len(records) == 3  # the image-less problem is not in the IMG subset


def test_corrupt_image_is_an_error_record_and_rerun_resumes(benchmarks, checkpoint, tmp_path):
    run_dir = _run("vqav2", benchmarks["vqav2"], checkpoint, tmp_path)
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    bad = [r for r in records if r["error"]]
    assert [r["question_id"] for r in bad] == ["5"] and "decode_error" in bad[0]["error"]
    before = (run_dir / "predictions.jsonl").read_text()
    _run("vqav2", benchmarks["vqav2"], checkpoint, tmp_path)  # same checkpoint and settings
    assert (run_dir / "predictions.jsonl").read_text() == before  # nothing regenerated
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["errors"] == 1 and summary["items"] == 6


def test_a_model_retrained_into_the_same_folder_gets_its_own_records(benchmarks, checkpoint, tiny_llama_dir, tmp_path):
    import shutil

    from eve.build import build_eve

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    first = _run("vqav2", benchmarks["vqav2"], folder, tmp_path / "a")
    build_eve(str(tiny_llama_dir), "debug", seed=1)[0].save_pretrained(folder)  # "retrained": other weights, same path
    out = tmp_path / "a"
    eval_main(["run", "--model", str(folder), "--task", "vqav2", "--out", str(out), "--batch-size", "3", "--max-new-tokens", "3",
               "--questions", str(benchmarks["vqav2"]["questions"]), "--annotations", str(benchmarks["vqav2"]["annotations"]),
               "--images", str(benchmarks["vqav2"]["images"])])
    second = [p for p in out.iterdir() if p != first]
    assert len(second) == 1, "the retrained model reused the old model's records"
    settings = [json.loads((d / "settings.json").read_text()) for d in (first, second[0])]
    assert settings[0]["model"] == settings[1]["model"] and settings[0]["weights"] != settings[1]["weights"]


def test_score_subcommand_needs_no_model(benchmarks, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"question_id": i, "answer": "Red." if i < 3 else "blue"}) + "\n" for i in range(6)) + "not json\n")
    spec = benchmarks["vqav2"]
    eval_main(["score", "--task", "vqav2", "--predictions", str(preds), "--annotations", str(spec["annotations"]),
               "--questions", str(spec["questions"])])
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["accuracy"] == pytest.approx(0.5) and summary["items"] == 6
    assert "preds.jsonl:7" in out.err
    eval_main(["score", "--task", "vqav2", "--predictions", str(preds), "--annotations", str(spec["annotations"])])
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(0.5)  # annotations alone suffice


def test_aspect_ratio_sweep(benchmarks, checkpoint, tmp_path):
    spec = dict(benchmarks["gqa"])
    run_dir = _run("gqa", spec, checkpoint, tmp_path, "--sweep", "--limit", "2")
    sweep = json.loads((run_dir / "sweep.json").read_text())["settings"]
    assert {s["aspect"] for s in sweep} >= {"1:4", "1:1", "4:1"} and (run_dir / "sweep.png").exists()
    tall = next(s for s in sweep if s["aspect"] == "1:4" and s["resolution"] == 672)
    square = next(s for s in sweep if s["aspect"] == "1:1" and s["resolution"] == 672)
    assert tall["mean_visual_tokens"] < square["mean_visual_tokens"]  # fewer tokens for a thin image
    assert all(0.0 <= s["consistency_with_native"] <= 1.0 for s in sweep)


@pytest.mark.parametrize("fill", ["neutral", "edge"])
def test_reframe_pads_to_the_aspect_ratio_and_keeps_the_content(fill):
    from eval.robustness import NEUTRAL_FILL, reframe

    image = Image.new("RGB", (40, 20), (250, 240, 230))
    image.paste((200, 10, 10), (15, 5, 25, 15))  # a red square in the middle
    tall = reframe(image, (1, 4), 80, fill)
    assert tall.size == (20, 80)  # 40 x 160 canvas, longest side -> 80
    border = (250, 240, 230) if fill == "edge" else NEUTRAL_FILL
    assert max(abs(a - b) for a, b in zip(tall.getpixel((10, 2)), border)) <= 2
    assert tall.getpixel((10, 40))[0] > 150 and tall.getpixel((10, 40))[1] < 60  # the square, now 5 px wide
    with pytest.raises(ValueError, match="unknown sweep fill 'mirror'"):
        reframe(image, (1, 4), 80, "mirror")
