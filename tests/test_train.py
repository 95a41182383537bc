"""The three training stages under DeepSpeed on CPU: chaining, freezing, ZeRO-2/3, exact resume,
guards, and a two-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.config import DataSource, TrainConfig
from train.trainer import NonFiniteLossError, train

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
SIZES = [(48, 48), (96, 32), (32, 80)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    captions, convs = [], []
    for i in range(48):
        colour = list(COLOURS)[i % 3]
        Image.new("RGB", SIZES[(i // 3) % 3], COLOURS[colour]).save(root / "img" / f"{i}.png")
        captions.append({"id": f"c{i}", "image": f"img/{i}.png",
                         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {colour} picture"}]})
        turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]
        convs.append({"id": f"s{i}", "image": f"img/{i}.png", "conversations": turns})
        if i % 4 == 0:  # text-only samples mixed in
            convs.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})
    (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad = {"id": "bad", "image": "img/bad.png", "conversations": captions[0]["conversations"]}
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions[:20] + [bad] + captions[20:]))
    (root / "sft.json").write_text(json.dumps(convs))
    return root


def config(tmp_path: Path, data: Path, stage: int, init: str, **kw) -> TrainConfig:
    base = dict(
        stage=stage, output_dir=str(tmp_path / f"stage{stage}"), init_from=init,
        data=[{"path": str(data / ("sft.json" if stage == 3 else "captions.jsonl"))}],
        template="vicuna_v1" if stage == 3 else "plain",
        lr_vision=2e-3, lr_decoder=0.0 if stage == 1 else 1e-3, warmup_ratio=0.2,
        micro_batch_size=4, global_batch_size=8, max_length=256,
        zero_stage=2, save_every=2, log_every=1, num_workers=0, seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _decoder_weights(path: Path) -> dict:
    return {k.removeprefix("language_model."): v for k, v in load_file(path / "model.safetensors").items() if k.startswith("language_model.")}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_stages_chain_freeze_and_export(tmp_path, data, tiny_llama_dir, tiny_clip_dir, processor):
    s1 = config(tmp_path, data, 1, str(tiny_llama_dir), init_is_decoder=True, flavor="debug",
                flavor_overrides={"teacher_model": str(tiny_clip_dir)})
    final1 = train(s1)
    before = {k: v for k, v in load_file(tiny_llama_dir / "model.safetensors").items()}
    after1 = _decoder_weights(final1)
    assert set(after1) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after1[name], tensor), f"stage 1 changed decoder weight {name}"
    metrics = [json.loads(line) for line in (Path(s1.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["pal_loss"] < metrics[0]["pal_loss"]
    assert metrics[-1]["skipped"] == 1  # the truncated PNG, replaced and counted
    assert (Path(s1.output_dir) / "loss.png").exists()
    assert json.loads((final1 / "train_config.json").read_text())["pal"] is True

    final2 = train(config(tmp_path, data, 2, str(final1), zero_stage=3))
    after2 = _decoder_weights(final2)
    assert any(not torch.equal(after2[k], after1[k]) for k in after1), "stage 2 must train the decoder"

    s3 = config(tmp_path, data, 3, str(final2))
    final3 = train(s3)
    assert json.loads((final3 / "train_config.json").read_text())["pal"] is False
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(final3).eval()
    proc = AutoProcessor.from_pretrained(final3)
    assert not any("pal" in k for k in model.state_dict())
    prompt = "<image>\nWhat colour is it?"
    inputs = proc(text=[prompt], images=[Image.new("RGB", (40, 120), COLOURS["red"])])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_resume_continues_the_exact_loss_curve(tmp_path, data, tiny_llama_dir, tiny_clip_dir):
    common = dict(init_is_decoder=True, flavor="debug", flavor_overrides={"teacher_model": str(tiny_clip_dir)})
    straight = config(tmp_path / "a", data, 1, str(tiny_llama_dir), **common)
    train(straight)
    interrupted = config(tmp_path / "b", data, 1, str(tiny_llama_dir), max_steps=3, **common)
    train(interrupted)  # stops after step 3 (checkpointed), as a crash after that save would
    assert len(_losses(Path(interrupted.output_dir))) == 3
    interrupted.max_steps = None
    train(interrupted)
    assert _losses(Path(interrupted.output_dir)) == _losses(Path(straight.output_dir))


def test_unreadable_checkpoint_falls_back_to_the_previous(tmp_path, data, tiny_llama_dir, tiny_clip_dir, caplog):
    cfg = config(tmp_path, data, 1, str(tiny_llama_dir), init_is_decoder=True, flavor="debug",
                 flavor_overrides={"teacher_model": str(tiny_clip_dir)}, max_steps=4, keep_last=3)
    train(cfg)
    ckpts = sorted((Path(cfg.output_dir) / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004"]
    for f in ckpts[-1].glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])  # truncated on disk
    cfg.max_steps = 5
    train(cfg)
    assert "falling back" in caplog.text
    assert len(_losses(Path(cfg.output_dir))) == 5  # steps 3-5 redone from the step-2 checkpoint


def test_nan_loss_stops_with_the_step_and_samples(tmp_path, data, tiny_llama_dir, tiny_clip_dir):
    cfg = config(tmp_path, data, 1, str(tiny_llama_dir), init_is_decoder=True, flavor="debug",
                 flavor_overrides={"teacher_model": str(tiny_clip_dir)}, pal_weight=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 1, micro-batch 0.*samples \['c"):
        train(cfg)


def test_bad_image_fails_fast_when_asked(tmp_path, data, tiny_llama_dir, tiny_clip_dir):
    from eve.image_io import InvalidImageError

    cfg = config(tmp_path, data, 1, str(tiny_llama_dir), init_is_decoder=True, flavor="debug",
                 flavor_overrides={"teacher_model": str(tiny_clip_dir)}, on_bad_sample="fail", seed=3)
    with pytest.raises(InvalidImageError, match="bad.png"):
        train(cfg)


def _cli(cfg: TrainConfig, tmp_path: Path, launcher: list[str]) -> list[str]:
    path = tmp_path / f"cfg-{time.monotonic_ns()}.json"
    raw = cfg.to_dict()
    path.write_text(json.dumps(raw))
    return [*launcher, "-m", "train.cli", "--stage", str(cfg.stage), "--config", str(path)]


def _env():
    """This process already holds a process group (in-process tests): children get their own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def straight_then_killed_and_rerun(straight: TrainConfig, killed: TrainConfig, tmp_path: Path, checkpoints: int = 1) -> None:
    """Run `straight` through, run `killed` until `checkpoints` complete checkpoints exist, kill -9
    it, re-run it: its loss curve must equal the straight run's. Both as subprocesses with the
    same threads, so float reductions match bit for bit."""
    ref = subprocess.run(_cli(straight, tmp_path, [sys.executable]), env=_env(), capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = _cli(killed, tmp_path, [sys.executable])
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    ckpt = Path(killed.output_dir) / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(ckpt.glob("step-*/complete.json"))) < checkpoints and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(ckpt.glob("step-*/complete.json")), "no checkpoint was written before the kill"
    assert not (Path(killed.output_dir) / "final").exists(), "the run should have been killed mid-way"
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _losses(Path(killed.output_dir)) == _losses(Path(straight.output_dir))


def test_kill_9_mid_run_then_rerun_resumes(tmp_path, data, tiny_llama_dir, tiny_clip_dir):
    common = dict(init_is_decoder=True, flavor="debug", flavor_overrides={"teacher_model": str(tiny_clip_dir)},
                  save_every=1, epochs=3)
    straight_then_killed_and_rerun(config(tmp_path / "a", data, 1, str(tiny_llama_dir), **common),
                                   config(tmp_path / "b", data, 1, str(tiny_llama_dir), **common), tmp_path)


def test_two_processes_on_localhost(tmp_path, data, tiny_llama_dir, tiny_clip_dir):
    cfg = config(tmp_path, data, 1, str(tiny_llama_dir), init_is_decoder=True, flavor="debug",
                 flavor_overrides={"teacher_model": str(tiny_clip_dir)}, micro_batch_size=2, max_steps=2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(29500 + os.getpid() % 1000)]
    run = subprocess.run(_cli(cfg, tmp_path, launcher), env=_env(), capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = _losses(Path(cfg.output_dir))
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "train" / "configs").glob("stage*.json")))
def test_shipped_configs_load(name):
    cfg = TrainConfig.load(name, ["max_steps=3"])
    eve2 = "eve2" in name  # EVEv2: no PAL; its stage 2a trains the experts with the language weights frozen
    assert cfg.max_steps == 3 and cfg.pal == (cfg.stage in (1, 2) and not eve2)
    assert (cfg.lr_decoder == 0) == (cfg.stage == 1 or "stage2a" in name)
    assert not eve2 or (cfg.lr_experts == 0) == (cfg.stage == 1)


def test_images_from_tar_shards_with_loader_workers(tmp_path, data, tiny_llama_dir, tiny_clip_dir):
    import tarfile

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i in range(16):
            tar.add(data / "img" / f"{i}.png", arcname=f"{i:04d}.png")
    rows = [{"id": f"w{i}", "image": f"shard-000.tar#{i:04d}.png",
             "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a picture"}]} for i in range(16)]
    (tmp_path / "wds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, data, 1, str(tiny_llama_dir), init_is_decoder=True, flavor="debug",
                 flavor_overrides={"teacher_model": str(tiny_clip_dir)}, num_workers=2)
    cfg.data = [DataSource(str(tmp_path / "wds.jsonl"))]
    train(cfg)
    metrics = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[-1]["skipped"] == 0 and "data_wait_frac" in metrics[-1]
