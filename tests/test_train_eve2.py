"""EVEv2's stages through eve-train on a tiny Qwen2: the patch embedding alone, then the vision
experts with the language weights frozen (both under ZeRO-3, built partitioned), then SFT of
everything (ZeRO-2) at a larger image size; the export loads as EVEv2."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

from eve.modeling_eve2 import Eve2ForCausalLM
from eve.testing import make_tiny_qwen2
from train.config import TrainConfig
from train.trainer import train

pytest_plugins = ["tests.test_train"]  # its `data` fixture: captions and conversations over coloured images


def _config(tmp_path: Path, name: str, data: Path, init: str, zero_stage: int = 2) -> TrainConfig:
    cfg = TrainConfig.load(name, [f"output_dir={tmp_path / name}", f"init_from={init}", "total_steps=2", "num_workers=0",
                                  "micro_batch_size=4", "global_batch_size=8", "save_every=2", "max_length=256",
                                  f"zero_stage={zero_stage}"])
    cfg.data[0].path = str(data / ("sft.json" if cfg.stage == 3 else "captions.jsonl"))
    return cfg


def _weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def _split(weights: dict) -> tuple[dict, dict, dict]:
    vision = {k: v for k, v in weights.items() if k.startswith("vision.")}
    experts = {k: v for k, v in weights.items() if ".vision." in k}
    language = {k: v for k, v in weights.items() if k.startswith("language_model.") and ".vision." not in k}
    return vision, experts, language


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eve2_stages_freeze_what_they_should_and_export(tmp_path, data, tmp_path_factory):
    qwen = make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))
    final1 = train(_config(tmp_path, "stage1_eve2_debug", data, str(qwen), zero_stage=3))  # experts copied per partition
    vision1, experts1, language1 = _split(_weights(final1))
    start = {f"language_model.{k}": v for k, v in load_file(qwen / "model.safetensors").items()}
    assert _same(language1, start), "stage 1 must leave the language weights as loaded"
    assert all(torch.equal(v, language1[k.replace(".vision.", ".")]) for k, v in experts1.items()), "experts start as copies"

    final2 = train(_config(tmp_path, "stage2a_eve2_debug", data, str(final1), zero_stage=3))
    vision2, experts2, language2 = _split(_weights(final2))
    assert _same(language2, language1), "stage 2a must leave the language weights frozen"
    assert not _same(experts2, experts1) and not _same(vision2, vision1)

    final3 = train(_config(tmp_path, "stage3_eve2_debug", data, str(final2)))
    _, _, language3 = _split(_weights(final3))
    assert not _same(language3, language2)
    model = AutoModelForCausalLM.from_pretrained(final3).eval()
    processor = AutoProcessor.from_pretrained(final3)
    assert isinstance(model, Eve2ForCausalLM)
    # stage 3's image_size (64, as EVEv2-7B's later stages go to 1600) over stage 2a's 32, kept in the export
    assert AutoProcessor.from_pretrained(final2).image_processor.image_size == 32
    assert model.config.image_size == processor.image_processor.image_size == 64
    inputs = processor(text=["<image>\nWhat colour is it?"], images=[Image.new("RGB", (40, 120), (220, 30, 30))])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
