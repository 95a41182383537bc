"""Sequence packing (train/packing.py): a packed sample computes exactly what it computes alone
(transformers' packed-sequence masks from position_ids), the losses match, the packer keeps
every sample whole within max_length, and a stage-2 run trains with packing on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from eve.build import build_eve
from eve.patch_aligning import EveForAlignedTraining
from eve.templates import IGNORE_INDEX
from train.config import TrainConfig
from train.data import Sample, collate
from train.packing import collate_packed, pack, wants_flat_batch


def _sample(processor, text: str, image=None, sid: str = "x", seed: int = 0) -> Sample:
    """A training sample as EveDataset makes it (visual tokens spliced, labels -100 there), with
    random 'teacher tokens' riding in teacher_pixels so that their order follows the images."""
    enc = processor(text=[text], images=[image] if image is not None else None)
    ids = enc["input_ids"][0].tolist()
    image_token = processor.image_token_id
    labels = [IGNORE_INDEX if t == image_token else t for t in ids]
    pixels = teacher = None
    if image is not None:
        pixels = processor.image_processor.preprocess_one(image)
        teacher = np.random.default_rng(seed).standard_normal((2, 2, 32)).astype(np.float32)
    return Sample(ids, labels, pixels, teacher, sid, 0, [])


@pytest.fixture
def samples(processor):
    return [
        _sample(processor, "<image> a red picture of a square", random_image(60, 60, 1), "a", 1),
        _sample(processor, "text only, a little longer than the others are", None, "b"),
        _sample(processor, "a tall one: <image> blue", random_image(20, 100, 3), "c", 3),
        _sample(processor, "hi", None, "d"),
    ]


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("meta", "teacher_pixel_values")}


def _segments(batch: dict):
    """(row, start, end) of each sample in a packed batch, from the position_ids restarts."""
    out = []
    for r, row in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        out += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_packed_logits_equal_each_sample_alone(model, samples, processor, attn, flatten):
    model.set_attn_implementation(attn)
    try:
        lengths = [len(s.input_ids) for s in samples]
        max_length = lengths[0] + lengths[1] + lengths[3]  # a, b, d share a row; c goes alone
        batch = collate_packed(samples, processor.tokenizer.pad_token_id, max_length, flatten=flatten)
        assert "attention_mask" not in batch
        assert batch["input_ids"].shape[0] == (1 if flatten else 2)
        assert batch["meta"]["images"] == 2 and batch["meta"]["tokens"] == sum(lengths)
        with torch.no_grad():
            packed = model(**_model_inputs(batch)).logits
            for s in samples:
                alone_batch = collate([s], processor.tokenizer.pad_token_id)
                alone = model(**_model_inputs(alone_batch)).logits[0]
                # find it in the packed batch by its tokens
                hits = [(r, a, b) for r, a, b in _segments(batch) if batch["input_ids"][r, a:b].tolist() == s.input_ids]
                assert len(hits) == 1, s.sample_id
                r, a, _ = hits[0]
                torch.testing.assert_close(packed[r, a : a + len(s.input_ids)], alone, atol=1e-5, rtol=1e-5)
            # and without packing separation the row would differ (the test can see leaks)
            leaky = _model_inputs(batch)
            leaky["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
            assert not torch.allclose(model(**leaky).logits, packed, atol=1e-3)
    finally:
        model.set_attn_implementation("sdpa")


def test_packed_losses_equal_unpacked(model, samples, processor):
    """LM loss (summed over tokens, and the micro-batch mean) and PAL loss of a packed
    micro-batch equal those of the same samples unpacked and of each sample alone."""
    torch.manual_seed(0)
    aligned = EveForAlignedTraining(model).eval()
    pad = processor.tokenizer.pad_token_id
    packed = collate_packed(samples, pad, max_length=sum(len(s.input_ids) for s in samples[:3]))
    padded = collate(samples, pad)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]

    def run(batch):
        out = aligned(**_model_inputs(batch), teacher_tokens=batch["teacher_pixel_values"])
        return out.lm_loss, out.pal_loss

    with torch.no_grad():
        lm_packed, pal_packed = run(packed)
        lm_padded, pal_padded = run(padded)
        summed, count = 0.0, 0
        for s in samples:
            out = model(**_model_inputs(collate([s], pad)))
            n = sum(label != IGNORE_INDEX for label in s.labels[1:])
            summed, count = summed + out.loss.item() * n, count + n
    n_packed = int((packed["labels"] != IGNORE_INDEX).sum())
    assert n_packed == count  # the first token of each sample is never a target
    assert lm_packed.item() * n_packed == pytest.approx(summed, rel=1e-5)
    assert lm_packed.item() == pytest.approx(lm_padded.item(), rel=1e-5)
    assert pal_packed.item() == pytest.approx(pal_padded.item(), rel=1e-5)
    assert pal_packed.item() > 0


def test_packer_keeps_samples_whole_within_max_length():
    rng = random.Random(0)
    for trial in range(200):
        max_length = rng.randint(1, 300)
        lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 40))]
        rows = pack(lengths, max_length)
        assert rows == pack(lengths, max_length)  # deterministic
        flat = [i for row in rows for i in row]
        assert sorted(flat) == list(range(len(lengths)))  # every sample exactly once, never split
        assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
        assert sum(sum(lengths[i] for i in row) for row in rows) == sum(lengths)
        assert all(row == sorted(row) for row in rows)
        # greedy is near-optimal: no two rows could be merged
        loads = sorted(sum(lengths[i] for i in row) for row in rows)
        assert len(loads) < 2 or loads[0] + loads[1] > max_length
    with pytest.raises(ValueError, match="cannot be packed"):
        pack([5, 11], 10)
    assert wants_flat_batch("flash_attention_2") and not wants_flat_batch("sdpa") and not wants_flat_batch(None)


def test_collate_packed_layout(samples, processor):
    pad = processor.tokenizer.pad_token_id
    lengths = [len(s.input_ids) for s in samples]
    batch = collate_packed(samples, pad, max_length=max(lengths))
    assert batch["input_ids"].shape[1] <= max(lengths)
    assert batch["meta"]["ids"] == ["a", "b", "c", "d"]  # the sampler's order, for the accounting
    assert batch["meta"]["tokens"] == sum(lengths)
    segments = _segments(batch)
    real = [(r, a, b) for r, a, b in segments if (batch["input_ids"][r, a:b] != pad).any()]
    assert sorted(b - a for _, a, b in real) == sorted(lengths)
    # images in the order their tokens appear, teacher copies alongside
    image_rows = [s for s in samples if s.pixels is not None]
    assert batch["pixel_values"].shape[0] == batch["teacher_pixel_values"].shape[0] == len(image_rows)


def test_stage2_trains_with_packing(tmp_path, tiny_llama_dir, tiny_clip_dir):
    from train.trainer import train

    init = tmp_path / "init"
    model, processor = build_eve(str(tiny_llama_dir), "debug", seed=0, teacher_model=str(tiny_clip_dir))
    model.save_pretrained(init)
    processor.save_pretrained(init)
    (tmp_path / "img").mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    records = []
    for i in range(16):
        colour = list(colours)[i % 2]
        Image.new("RGB", [(48, 48), (96, 32), (32, 80)][i % 3], colours[colour]).save(tmp_path / "img" / f"{i}.png")
        turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {colour} picture"}]
        records.append({"id": f"c{i}", "image": f"img/{i}.png", "conversations": turns})
        if i % 4 == 0:
            records.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = {}
    for packing in (True, False):
        cfg = TrainConfig(
            stage=2, output_dir=str(tmp_path / f"out-{packing}"), init_from=str(init),
            data=[{"path": str(tmp_path / "captions.jsonl")}], template="plain", lr_vision=2e-3, lr_decoder=3e-3,
            warmup_ratio=0.1, micro_batch_size=4, global_batch_size=8, max_length=64, packing=packing,
            gradient_checkpointing=False, zero_stage=2, save_every=100, log_every=1, num_workers=0, seed=0,
            epochs=2, max_steps=3,
        )
        train(cfg)
        lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
        metrics[packing] = [json.loads(line) for line in lines]
    packed, unpacked = metrics[True], metrics[False]
    assert len(packed) == 3
    losses = [m["lm_loss"] for m in packed]
    assert all(np.isfinite(losses)) and all(np.isfinite([m["pal_loss"] for m in packed]))
    assert losses[-1] < losses[0] and packed[-1]["pal_loss"] < packed[0]["pal_loss"]
    # the same samples per step, only laid out differently: the same training
    for key in ("lm_loss", "pal_loss"):
        assert [m[key] for m in packed] == pytest.approx([m[key] for m in unpacked], rel=1e-4)
    assert all(m["tokens_per_s"] > 0 for m in packed)
