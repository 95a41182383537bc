"""EVEv2's modality experts on tiny Llama and Qwen2 decoders: with untouched copies the layers
compute exactly what the bare decoder computes; each token trains only its own modality's copy;
a batch equals each sample alone; the KV cache decodes as the full forward does."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from eve.modality_experts import ModalityExperts, Routing, add_modality_experts

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def _pair(model_type: str):
    config = AutoConfig.for_model(model_type, **TINY)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    bare = AutoModelForCausalLM.from_config(config).eval()
    experts = copy.deepcopy(bare)
    add_modality_experts(experts.model, experts.config)
    return bare, experts


def _forward(model, ids, image_mask=None, **kw):
    return model(input_ids=ids, vision_routing=Routing.from_mask(image_mask), **kw).logits


@pytest.fixture(params=["llama", "qwen2"])
def pair(request):
    return _pair(request.param)


def _mask(ids: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, start:stop] = True
    return mask


def test_untouched_experts_equal_the_bare_decoder(pair):
    bare, experts = pair
    assert all(isinstance(layer, ModalityExperts) for layer in experts.model.layers)
    ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        want = bare(input_ids=ids).logits
        assert torch.equal(_forward(experts, ids), want)  # text only
        torch.testing.assert_close(_forward(experts, ids, _mask(ids, 2, 7)), want, rtol=1e-5, atol=1e-5)  # copies == text weights


def test_vision_copies_change_only_what_follows_the_first_image_token(pair):
    bare, experts = pair
    with torch.no_grad():
        for layer in experts.model.layers:
            layer.vision.mlp.down_proj.weight.mul_(3)
    ids = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        want, got = bare(input_ids=ids).logits, _forward(experts, ids, _mask(ids, 4, 8))
    torch.testing.assert_close(got[:, :4], want[:, :4], rtol=1e-5, atol=1e-5)  # causal: before the image
    assert not torch.allclose(got[:, 4:], want[:, 4:], atol=1e-3)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if ".layers." in n}


@pytest.mark.parametrize("all_image", [True, False])
def test_each_token_trains_only_its_modality(pair, all_image):
    _, experts = pair
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones_like(ids, dtype=torch.bool) if all_image else None
    _forward(experts, ids, mask).sum().backward()
    for name, grad in _grads(experts).items():
        trained = ".vision." in name if all_image else ".vision." not in name
        assert (grad is not None and grad.abs().sum() > 0) == trained, name


def test_a_batch_equals_each_sample_alone(pair):
    _, experts = pair
    a, b = torch.randint(3, 97, (1, 12)), torch.randint(3, 97, (1, 9))
    ma, mb = _mask(a, 1, 5), _mask(b, 3, 8)
    pad = torch.zeros(1, 3, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], 1)])  # left-padded like generate()
    mask = torch.cat([ma, torch.cat([pad.bool(), mb], 1)])
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = _forward(experts, ids, mask, attention_mask=attn, position_ids=position_ids)
        alone_a, alone_b = _forward(experts, a, ma), _forward(experts, b, mb)
    torch.testing.assert_close(batch[0], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[1, 3:], alone_b[0], rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_the_full_forward(pair):
    _, experts = pair
    ids = torch.randint(3, 97, (1, 10))
    mask = _mask(ids, 2, 6)
    with torch.no_grad():
        prefill = experts(input_ids=ids[:, :8], vision_routing=Routing.from_mask(mask[:, :8]), use_cache=True)
        step = experts(input_ids=ids[:, 8:9], past_key_values=prefill.past_key_values, use_cache=True)  # a text token
        full = _forward(experts, ids[:, :9], mask[:, :9])
    torch.testing.assert_close(step.logits[:, -1], full[:, 8], rtol=1e-5, atol=1e-5)


def test_hidden_states_are_captured_from_expert_layers(pair):
    _, experts = pair
    ids = torch.randint(3, 97, (1, 6))
    out = experts(input_ids=ids, vision_routing=Routing.from_mask(_mask(ids, 1, 3)), output_hidden_states=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
