"""EVEv2 on tiny Llama and Qwen2 decoders: the area resize rule, text-only logits equal to the
bare decoder's, experts that act only from the image on, a batch equal to each sample alone,
save/load through the Auto classes, and generation with the KV cache."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from eve.build import build_eve
from eve.modeling_eve2 import Eve2ForCausalLM
from eve.processing_eve import area_geometry, num_visual_tokens
from eve.testing import make_tiny_qwen2


@pytest.mark.parametrize("size, target, unit, want", [
    ((250, 1000), 1600, 32, (800, 3200)),  # r = 0.3125: exact multiples
    ((10, 10), 1600, 32, (1600, 1600)),  # small images are scaled up
    ((300, 200), 800, 32, (992, 672)),  # r = sqrt(60000) / 800; 979.8 -> 992, 653.2 -> 672
    ((1, 1000), 32, 16, (16, 1024)),  # r = sqrt(1000) / 32: 1011.9 -> 1024; at least one token high
])
def test_area_resize_rule(size, target, unit, want):
    assert area_geometry(*size, target, unit) == want


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decoder_dir(request, tiny_llama_dir, tmp_path_factory):
    return tiny_llama_dir if request.param == "llama" else make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def eve2(decoder_dir):
    model, processor = build_eve(str(decoder_dir), "eve2-debug", attn_implementation="sdpa", seed=0)
    return model.eval(), processor


def _inputs(processor, prompts, images):
    return processor(text=prompts, images=images, padding=True, return_tensors="pt")


def test_text_only_logits_equal_the_bare_decoder(eve2, decoder_dir):
    model, processor = eve2
    assert isinstance(model, Eve2ForCausalLM) and model.config.model_type == "eve2"
    bare = AutoModelForCausalLM.from_pretrained(decoder_dir, attn_implementation="sdpa").eval()
    ids = processor.tokenizer(["What colour is the largest one?"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, bare(input_ids=ids).logits)


def test_the_experts_act_from_the_image_on(eve2):
    model, processor = eve2
    inputs = _inputs(processor, ["Describe <image> please"], [Image.new("RGB", (48, 20), (200, 30, 30))])
    first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == num_visual_tokens(32, 64, 8)  # 32x64 px
    with torch.no_grad():
        before = model(**inputs).logits
        for layer in model.expert_layers():
            layer.vision.mlp.down_proj.weight.mul_(2)
        after = model(**inputs).logits
        model.copy_text_to_vision_experts()
    torch.testing.assert_close(after[:, :first], before[:, :first])
    assert not torch.allclose(after[:, first:], before[:, first:], atol=1e-4)


def test_training_reaches_the_patch_embedding_and_both_copies(eve2):
    model, processor = eve2
    inputs = _inputs(processor, ["<image> a red picture"], [Image.new("RGB", (40, 40), (200, 30, 30))])
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    layer = model.expert_layers()[0]
    for part in (model.vision.patch_embedding[0].weight, model.vision.class_embedding, layer.vision.self_attn.q_proj.weight,
                 layer.self_attn.q_proj.weight):
        assert part.grad is not None and part.grad.abs().sum() > 0
    model.zero_grad()


def test_a_batch_equals_each_sample_alone(eve2):
    model, processor = eve2
    processor.tokenizer.padding_side = "left"
    prompts = ["<image> What is it?", "Look: <image> and tell me the colour of it"]
    images = [Image.new("RGB", (30, 90), (20, 200, 30)), Image.new("RGB", (100, 25), (20, 30, 200))]
    batch = _inputs(processor, prompts, images)
    with torch.no_grad():
        together = model(**batch).logits
        for b in range(2):
            alone = model(**_inputs(processor, [prompts[b]], [images[b]])).logits[0]
            torch.testing.assert_close(together[b, -alone.shape[0]:], alone, rtol=1e-4, atol=1e-4)


def test_save_load_and_generate_with_the_kv_cache(eve2, tmp_path):
    model, processor = eve2
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is Eve2ForCausalLM and proc.image_processor.resize_rule == "area"
    inputs = _inputs(proc, ["<image> What is it?"], [Image.new("RGB", (70, 30), (200, 200, 30))])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
        cached = loaded.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = loaded.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == inputs["input_ids"].shape[1] + 6


def test_packed_rows_equal_each_sample_alone(eve2):
    """Packing (train/packing.py) with experts: the routing follows the packed image tokens."""
    from test_packing import _model_inputs, _sample, _segments

    from train.data import collate
    from train.packing import collate_packed

    model, processor = eve2
    samples = [_sample(processor, "<image> a red picture", Image.new("RGB", (60, 60), (200, 30, 30)), "a"),
               _sample(processor, "text only, a little longer", None, "b"),
               _sample(processor, "a tall one: <image> blue", Image.new("RGB", (20, 100), (30, 30, 200)), "c")]
    batch = collate_packed(samples, processor.tokenizer.pad_token_id, sum(len(s.input_ids) for s in samples), flatten=False)
    assert batch["input_ids"].shape[0] == 1  # one packed row
    with torch.no_grad():
        packed = model(**_model_inputs(batch)).logits
        for s, (r, a, b) in zip(samples, _segments(batch)):
            assert batch["input_ids"][r, a:b].tolist() == s.input_ids
            alone = model(**_model_inputs(collate([s], processor.tokenizer.pad_token_id))).logits[0]
            torch.testing.assert_close(packed[r, a:b], alone, atol=1e-5, rtol=1e-5)
