"""The PAL as an option for EVEv2, and a stage's own image size.

Under EVE's geometry the teacher grid is an exact 1/pal_pool of the model grid, and the general
`teacher_grid` must agree with it everywhere; under EVEv2's area rule it need not, and the
pooling is adaptive. A stage's `image_size` changes the resolution of the model it starts from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from eve import EveConfig, EveForCausalLM
from eve.build import build_eve
from eve.configuration_eve2 import Eve2Config
from eve.patch_aligning import EveForAlignedTraining, image_patch_states, pool_to, teacher_grid
from eve.processing_eve import EveImageProcessor, teacher_geometry
from eve.teacher import ClipTeacher
from train.config import TrainConfig
from train.stages import set_image_size
from train.trainer import train

pytest_plugins = ["tests.test_train"]  # its `data` fixture


@pytest.mark.parametrize("flavor, overrides", [("debug", {}), ("debug", {"image_size": 64}), ("eve-7b", {}), ("eve-7b-hd", {})])
def test_teacher_grid_is_eves_exact_pool_under_eves_geometry(flavor, overrides):
    config = EveConfig.from_flavor(flavor, **overrides)
    ip = EveImageProcessor.from_config(config)
    rng = random.Random(0)
    unit = 2 * config.patch_size
    for _ in range(300):
        height, width = rng.randint(1, 3000), rng.randint(1, 3000)
        resized = ip.resized_size(height, width)
        h, w = resized[0] // unit, resized[1] // unit
        assert teacher_grid(config, h, w) == (h // config.pal_pool, w // config.pal_pool), (height, width)
        # the teacher's copy of the model's image is the teacher's copy of the native one
        p = config.teacher_patch_size
        assert teacher_geometry(*resized, config.teacher_image_size, p) == teacher_geometry(height, width, config.teacher_image_size, p)


def test_adaptive_pooling_takes_pytorchs_windows():
    x = torch.arange(15.0).view(3, 5, 1, 1)  # [h, w, T, d]
    got = pool_to(x, (2, 3))[..., 0, 0]
    # window i covers floor(i*n/m) .. ceil((i+1)*n/m)
    rows, cols = [(0, 2), (1, 3)], [(0, 2), (1, 4), (3, 5)]
    want = torch.tensor([[x[r0:r1, c0:c1].mean().item() for c0, c1 in cols] for r0, r1 in rows])
    assert torch.allclose(got, want)
    assert torch.equal(pool_to(x, (3, 5)), x)


@pytest.fixture(scope="module")
def eve2_48(tiny_llama_dir, tiny_clip_dir):
    """EVEv2 whose square images are 3 x 3 tokens against the tiny teacher's 2 x 2 grid."""
    model, processor = build_eve(str(tiny_llama_dir), "eve2-debug", seed=0, image_size=48, teacher_model=str(tiny_clip_dir))
    return model, processor, ClipTeacher.from_open_clip(str(tiny_clip_dir))


def _batch(processor, teacher):
    images = [Image.new("RGB", (48, 48), (200, 30, 30)), Image.new("RGB", (40, 120), (30, 200, 30))]
    inputs = processor(text=["<image> red", "<image> green"], images=images, return_teacher=True, padding=True)
    return inputs, teacher(inputs.pop("teacher_pixel_values"))


def test_eve2_pal_aligns_off_grid_tokens_to_the_teacher(eve2_48):
    model, processor, teacher = eve2_48
    assert isinstance(model.config, Eve2Config)
    aligned = EveForAlignedTraining(model)
    inputs, tokens = _batch(processor, teacher)
    with torch.no_grad():
        feats = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        assert feats.grids[0] == (3, 3) and teacher_grid(model.config, 3, 3) == (2, 2)  # adaptive, not a whole pool
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        states = image_patch_states(hidden, aligned.pal.taps, inputs["input_ids"] == model.config.image_token_id, feats, model.config)
        pred = aligned.pal(states)
    # A teacher that says exactly what the PAL predicts, on the canvas where the processor put each image.
    fake, offset = torch.zeros_like(tokens), 0
    for i, (h, w) in enumerate(feats.grids):
        ht, wt = teacher_grid(model.config, h, w)
        top, left = (2 - ht) // 2, (2 - wt) // 2
        fake[i, top : top + ht, left : left + wt] = pred[offset : offset + ht * wt].view(ht, wt, -1)
        offset += ht * wt
    assert offset == len(pred)
    with torch.no_grad():
        assert aligned(**inputs, teacher_tokens=fake).pal_loss.abs() < 1e-5


def test_eve2_pal_trains_the_patch_embedding_and_leaves_the_decoder(eve2_48):
    model, processor, teacher = eve2_48
    model = type(model)(model.config)  # a fresh copy: the fixture stays untouched
    aligned = EveForAlignedTraining(model)
    model.requires_grad_(False)
    params = list(model.vision.parameters()) + list(aligned.pal.parameters())
    for p in params:
        p.requires_grad_(True)
    before = {n: p.clone() for n, p in model.language_model.named_parameters()}
    inputs, tokens = _batch(processor, teacher)
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(12):
        out = aligned(**inputs, teacher_tokens=tokens)
        opt.zero_grad()
        out.pal_loss.backward()
        opt.step()
        losses.append(out.pal_loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, before[n]) for n, p in model.language_model.named_parameters())


def test_eve_train_runs_eve2_stage1_with_the_pal(tmp_path, data, tiny_llama_dir, tiny_clip_dir):
    cfg = TrainConfig.load("stage1_eve2_debug", [
        f"output_dir={tmp_path / 'pal'}", f"init_from={tiny_llama_dir}", "pal=true", "total_steps=3", "num_workers=0",
        "micro_batch_size=4", "global_batch_size=4", "save_every=3", "log_every=1", "max_length=256",
        f"flavor_overrides={json.dumps({'teacher_model': str(tiny_clip_dir)})}"])
    cfg.data[0].path = str(data / "captions.jsonl")
    train(cfg)
    metrics = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(0 < m["pal_loss"] < 2 for m in metrics)


def test_a_stage_sets_the_image_size_or_refuses_it_unchanged(built):
    model, processor = built
    model = EveForCausalLM(model.config.__class__.from_dict(model.config.to_dict()))
    processor = type(processor)(image_processor=EveImageProcessor.from_config(model.config), tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="image_size=40: .*multiple of teacher_image_size"):
        set_image_size(model, processor, 40)
    assert model.config.image_size == processor.image_processor.image_size == 32
    set_image_size(model, processor, 64)
    assert model.config.image_size == processor.image_processor.image_size == 64
    assert processor.image_processor.resized_size(100, 50) == (64, 32)
