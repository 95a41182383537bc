"""Patch Aligning Layer and the open_clip teacher."""

from __future__ import annotations

import pytest
import torch

from eve import EveConfig, EveForCausalLM
from eve.patch_aligning import EveForAlignedTraining, PatchAligningLayer, image_patch_states
from eve.teacher import ClipTeacher


@pytest.fixture(scope="module")
def teacher(tiny_clip_dir):
    return ClipTeacher.from_open_clip(str(tiny_clip_dir))


def test_teacher_loads_from_a_local_open_clip_dir(teacher, processor, images):
    assert teacher.width == 32 and teacher.depth == 2
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.visual.training
    tokens = teacher(processor.image_processor(images, return_teacher=True)["teacher_pixel_values"])
    assert tokens.shape == (3, 2, 2, 32)  # 16 px canvas / 8 px patches, penultimate layer, no CLS


def _batch(processor, images, teacher):
    inputs = processor(text=["<image> a caption", "<image> another", "text <image>"], images=images, return_teacher=True)
    tokens = teacher(inputs.pop("teacher_pixel_values"))
    return inputs, tokens


def test_pal_loss_is_zero_when_the_output_equals_the_teacher(model, processor, images, teacher):
    aligned = EveForAlignedTraining(model)
    inputs, tokens = _batch(processor, images, teacher)
    with torch.no_grad():
        feats = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        mask = inputs["input_ids"] == model.config.image_token_id
        states = image_patch_states(hidden, aligned.pal.taps, mask, feats, model.config)
        pred = aligned.pal(states)
    # Replace the teacher by a copy of the PAL's own prediction, placed on the teacher canvas.
    fake = torch.zeros_like(tokens)
    offset = 0
    for i, (h, w) in enumerate(feats.grids):
        ht, wt = h // model.config.pal_pool, w // model.config.pal_pool
        top, left = (2 - ht) // 2, (2 - wt) // 2
        fake[i, top : top + ht, left : left + wt] = pred[offset : offset + ht * wt].view(ht, wt, -1)
        offset += ht * wt
    with torch.no_grad():
        out = aligned(**inputs, teacher_tokens=fake)
    assert out.pal_loss.abs() < 1e-5


def test_pal_loss_decreases_under_training(fresh_model, processor, images, teacher):
    model = fresh_model
    aligned = EveForAlignedTraining(model)
    model.requires_grad_(False)  # stage 1 freezes the decoder; train PEL + PAL
    params = list(model.vision.parameters()) + list(aligned.pal.parameters())
    for p in params:
        p.requires_grad_(True)
    before = {n: p.clone() for n, p in model.language_model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=3e-3)
    inputs, tokens = _batch(processor, images, teacher)
    labels = inputs["input_ids"].clone()
    losses = []
    for _ in range(12):
        out = aligned(**inputs, labels=labels, teacher_tokens=tokens)
        opt.zero_grad()
        out.pal_loss.backward()
        opt.step()
        losses.append(out.pal_loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for n, p in model.language_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_text_only_batch_adds_zero_and_touches_the_pal(fresh_model, processor):
    aligned = EveForAlignedTraining(fresh_model)
    inputs = processor(text=["just text"])
    out = aligned(**inputs, labels=inputs["input_ids"])
    assert out.pal_loss.item() == 0.0 and out.loss.item() == pytest.approx(out.lm_loss.item())
    out.loss.backward()
    assert all(p.grad is not None for p in aligned.pal.parameters())


def test_images_without_teacher_tokens_is_an_error(model, processor, images):
    aligned = EveForAlignedTraining(model)
    inputs = processor(text=["<image>"], images=images[:1])
    with pytest.raises(ValueError, match="teacher_tokens"):
        aligned(**inputs)


def test_hd_geometry_pools_two_by_two():
    cfg = EveConfig.from_flavor("debug", image_size=64)  # r = 4: pooled grid is 2x the teacher grid
    assert cfg.pal_pool == 2
    model = EveForCausalLM(cfg).eval()
    aligned = EveForAlignedTraining(model)
    from eve import EveImageProcessor

    ip = EveImageProcessor.from_config(cfg)
    from conftest import random_image

    batch = ip([random_image(64, 32)], return_teacher=True)
    n = model.get_image_features(batch["pixel_values"], batch["image_sizes"]).lengths[0]
    ids = torch.tensor([[1] + [cfg.image_token_id] * n + [5, 6]])
    tokens = torch.randn(1, 2, 2, cfg.teacher_hidden_size)
    out = aligned(input_ids=ids, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], teacher_tokens=tokens)
    assert torch.isfinite(out.pal_loss)


def test_pal_needs_two_taps():
    cfg = EveConfig.from_flavor("debug", pal_tap_every=4)  # 2 layers, every 4 -> only [2]
    with pytest.raises(ValueError, match="tap"):
        PatchAligningLayer(cfg)
