"""Hostile input for eve-train (issue 16): a resume that would unpickle code, and manifests full of
junk. Every bad sample is skipped and counted under its reason, or stops the run with one clear
message naming the file and line; a checkpoint holding a pickled program is never executed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from train.config import TrainConfig
from train.trainer import train

REPO = Path(__file__).parents[1]
CAPTION = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red picture"}]


def _config(out: Path, manifest: Path, llama: Path, clip: Path, **kw) -> TrainConfig:
    base = dict(
        stage=1, output_dir=str(out), init_from=str(llama), init_is_decoder=True, flavor="debug",
        flavor_overrides={"teacher_model": str(clip)}, data=[{"path": str(manifest)}], template="plain",
        lr_vision=2e-3, lr_decoder=0.0, micro_batch_size=4, global_batch_size=8, max_length=256,
        zero_stage=2, save_every=2, log_every=1, num_workers=0, seed=0,
    )
    return TrainConfig(**{**base, **kw})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _good(i: int, image: str) -> bytes:
    return json.dumps({"id": f"g{i}", "image": image, "conversations": CAPTION}).encode()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A manifest where each of 14 bad samples sits between good ones (so in one epoch each bad
    one is met once, as itself, and replaced by its good neighbour), with the reason each must be
    counted under. Good images live in a folder named `we#ird` and in a tar."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "we#ird").mkdir()
    for i in range(18):
        Image.new("RGB", (32 + 8 * (i % 3), 32), (200, 20 * (i % 5), 30)).save(root / "we#ird" / f"{i}.png")
    os.mkfifo(root / "we#ird" / "fifo.png")  # a plain open() of it would block forever
    with tarfile.open(root / "cut.tar", "w") as tar:
        for i in range(3):
            tar.add(root / "we#ird" / f"{i}.png", arcname=f"{i}.png")
    with tarfile.open(root / "cut.tar") as tar:
        second = tar.getmember("1.png")
    with open(root / "cut.tar", "r+b") as f:
        f.truncate(second.offset_data + second.size // 2)  # the tar ends inside its second member
    bad = [
        (b"42", "bad_record"),
        (b"null", "bad_record"),
        (b"[1, 2]", "bad_record"),
        (b'{"id": "latin-1 \xe9\xff", "conversations": []}', "bad_json"),
        (b'{"id": "torn", "conver', "bad_json"),
        (json.dumps({"id": "s", "image": "we#ird/0.png", "conversations": "<image> a red picture"}).encode(), "bad_record"),
        (json.dumps({"id": "t", "image": "we#ird/0.png", "conversations": ["<image>", "a red picture"]}).encode(), "bad_record"),
        (json.dumps({"id": "v", "image": "we#ird/0.png", "conversations": [{"from": "human", "value": 1},
                                                                           {"from": "gpt", "value": 2}]}).encode(), "bad_record"),
        (json.dumps({"id": "i", "image": 7, "conversations": CAPTION}).encode(), "bad_record"),
        (json.dumps({"id": "e", "image": "we#ird/0.png", "conversations": [CAPTION[0], {"from": "gpt", "value": " "}]}).encode(),
         "empty_answer"),
        (json.dumps({"id": "u", "image": "we#ird/0.png", "conversations": [{"from": "alien", "value": "<image>"},
                                                                           CAPTION[1]]}).encode(), "unknown_speaker"),
        (_good(100, "we#ird/fifo.png"), "not_a_file"),
        (_good(101, "cut.tar#1.png"), "decode_error"),
        (_good(102, "cut.tar#2.png"), "missing"),
    ]
    lines, good = [], 0
    for line, _ in bad:
        lines += [line, _good(good, f"we#ird/{good}.png")]
        good += 1
    lines.insert(3, b"   ")  # a blank line is no sample
    lines += [_good(good, "cut.tar#0.png")] + [_good(g, f"we#ird/{g}.png") for g in range(good + 1, 18)]
    assert (len(lines) - 1) % 8 == 0  # whole steps of 8: one epoch meets every sample once
    (root / "zoo.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expected = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return root, expected, (len(lines) - 1) // 8


def test_every_bad_sample_is_skipped_and_counted_under_its_reason(tmp_path, zoo, tiny_llama_dir, tiny_clip_dir, caplog):
    root, expected, steps = zoo
    cfg = _config(tmp_path / "run", root / "zoo.jsonl", tiny_llama_dir, tiny_clip_dir, max_steps=steps)
    train(cfg)
    last = _metrics(tmp_path / "run")[-1]
    assert last["skipped_by_reason"] == expected and last["skipped"] == sum(expected.values())
    assert "(bad_record) at " + str(root / "zoo.jsonl") + ":1: a number, not a JSON object" in caplog.text
    assert "not a regular file (a FIFO)" in caplog.text


def _run_cli(cfg: TrainConfig, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "train.cli", "--stage", "1", "--config", str(path)], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def test_fail_fast_names_the_line_without_a_traceback(tmp_path, tiny_llama_dir, tiny_clip_dir):
    manifest = tmp_path / "junk.jsonl"
    manifest.write_text("[1, 2]\n" * 8)
    run = _run_cli(_config(tmp_path / "run", manifest, tiny_llama_dir, tiny_clip_dir, on_bad_sample="fail"), tmp_path)
    assert run.returncode != 0
    assert "junk.jsonl:" in run.stderr and "bad_record: a list, not a JSON object" in run.stderr
    assert "Traceback" not in run.stderr


def test_llava_json_that_is_not_utf8_is_one_clear_error(tmp_path, tiny_llama_dir, tiny_clip_dir):
    manifest = tmp_path / "llava.json"
    manifest.write_bytes(b'[{"id": "\xff", "conversations": []}]')
    run = _run_cli(_config(tmp_path / "run", manifest, tiny_llama_dir, tiny_clip_dir), tmp_path)
    assert run.returncode != 0
    assert f"manifest {manifest} is not valid UTF-8 JSON" in run.stderr and "Traceback" not in run.stderr


class _WritesMarker:
    """A pickle that runs code when unpickled: it writes `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def test_a_checkpoint_holding_a_pickled_program_is_never_run(tmp_path, zoo, tiny_llama_dir, tiny_clip_dir, caplog):
    root, _, _ = zoo
    cfg = _config(tmp_path / "run", root / "zoo.jsonl", tiny_llama_dir, tiny_clip_dir, max_steps=4, keep_last=3)
    train(cfg)
    newest = Path(cfg.output_dir) / "checkpoints" / "step-00000004"
    states = newest / "mp_rank_00_model_states.pt"
    original = torch.load(states, weights_only=True)  # what we write loads weights-only
    marker = tmp_path / "marker"
    torch.save({**original, "module": _WritesMarker(marker)}, states)  # complete.json kept
    torch.load(states, weights_only=False)  # what DeepSpeed itself would do: the pickle is live
    assert marker.exists()
    marker.unlink()
    (Path(cfg.output_dir) / "final").rename(tmp_path / "final-before")  # as if killed before the export
    train(cfg)
    assert not marker.exists(), "resuming ran code from a checkpoint"
    assert "falling back" in caplog.text and "step-00000004" in caplog.text
    assert [m["step"] for m in _metrics(Path(cfg.output_dir))] == [1, 2, 3, 4]  # 3-4 redone from step 2
