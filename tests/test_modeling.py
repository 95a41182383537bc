"""EveForCausalLM against the bare decoder, batching, save/load and generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, LlamaForCausalLM

import eve
from eve import EveConfig, EveForCausalLM


def _real(logits, mask):
    """Logits of the real (non-padding) positions of one left-padded row."""
    return logits[mask.bool()]


def test_mixed_aspect_ratio_batch_equals_each_sample_alone(model, processor, images):
    texts = ["<image> what colour is it?", "Describe <image>", "<image> and a long question about the shapes?"]
    batch = processor(text=texts, images=images)
    with torch.no_grad():
        logits = model(**batch).logits
        for i, (text, image) in enumerate(zip(texts, images)):
            alone = processor(text=[text], images=[image])
            single = model(**alone).logits[0]
            torch.testing.assert_close(_real(logits[i], batch["attention_mask"][i]), single, rtol=1e-4, atol=1e-5)


def test_text_only_logits_equal_the_bare_decoder(model, processor, tiny_llama_dir):
    bare = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    inputs = processor(text=["hello world, no image here", "short"])
    with torch.no_grad():
        ours = model(**inputs).logits
        ref = bare(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_several_images_in_one_sample(model, processor, images):
    inputs = processor(text=["first <image> second <image> third <image>"], images=[images])
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()


def test_placeholder_feature_mismatch_is_a_clear_error(model, processor, images):
    inputs = processor(text=["<image> x"], images=images[:1])
    ids = inputs["input_ids"]
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        model(input_ids=ids[:, 3:], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="do not match"):
        model(input_ids=ids)  # placeholders but no pixels


def test_labels_on_image_positions_are_ignored(model, processor, images):
    inputs = processor(text=["<image> a caption"], images=images[:1])
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        masked = labels.masked_fill(labels == model.config.image_token_id, -100)
        ref = model(**inputs, labels=masked).loss
    assert torch.isfinite(loss) and loss == ref


def test_save_and_reload_with_auto_classes(model, processor, images, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "eve"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, EveForCausalLM) and isinstance(proc2, eve.EveProcessor)
    inputs = processor(text=["<image> hi", "<image> there"], images=images[:2])
    again = proc2(text=["<image> hi", "<image> there"], images=images[:2])
    for key in inputs:
        torch.testing.assert_close(inputs[key], again[key])
    for (name, p), (_, q) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(p, q), name
    with torch.no_grad():  # loaded tensors may be aligned differently: last-bit float32 rounding
        torch.testing.assert_close(model(**inputs).logits, reloaded(**again).logits, rtol=1e-5, atol=1e-6)


def _greedy_by_hand(model, inputs, steps):
    """Greedy decoding without a cache: the full sequence through forward at every step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pixels = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **pixels).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def test_generate_equals_a_manual_greedy_loop(model, processor, images):
    inputs = processor(text=["<image> what is it?", "tell me about <image> please"], images=images[:2])
    steps = 6
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert torch.equal(out, _greedy_by_hand(model, inputs, steps))


def test_sampling_generates(model, processor, images):
    inputs = processor(text=["<image>"], images=images[:1])
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=5, temperature=0.8)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_attention_implementations_agree(tiny_llama_dir, processor, images, tmp_path):
    model, _ = eve.build.build_eve(str(tiny_llama_dir), "debug", attn_implementation="eager")
    model.eval().save_pretrained(tmp_path)
    sdpa = EveForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "eager"
    inputs = processor(text=["<image> a", "b <image>"], images=images[:2])
    real = inputs["attention_mask"].bool()  # fully masked padding rows differ by backend
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[real], sdpa(**inputs).logits[real], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir, processor, images):
    grads = []
    for checkpointing in (False, True):
        model, _ = eve.build.build_eve(str(tiny_llama_dir), "debug", seed=0)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = processor(text=["<image> some caption"], images=images[:1])
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append(model.vision.patch_embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_flavors_and_flops():
    assert EveConfig.from_flavor("eve-7b").text_config.num_hidden_layers == 32
    assert EveConfig.from_flavor("eve-7b-hd").image_size == 1344
    with pytest.raises(KeyError, match="unknown EVE flavor"):
        EveConfig.from_flavor("eve-70b")
    with torch.device("meta"):
        big = EveForCausalLM(EveConfig.from_flavor("eve-7b"))
    flops = big.flops_per_token(2048)
    n = sum(p.numel() for name, p in big.language_model.named_parameters() if "embed_tokens" not in name)
    assert 6.5e9 < n < 6.8e9  # Vicuna-7B without its input embedding table
    assert flops == pytest.approx(3 * (2 * n + 4 * 32 * 2048 * 4096))
    assert big.flops_per_token(2048, train_decoder=False) == pytest.approx(flops * 2 / 3)


def test_invalid_geometry_is_rejected():
    with pytest.raises(ValueError, match="multiple of teacher_image_size"):
        EveConfig.from_flavor("debug", image_size=40)
