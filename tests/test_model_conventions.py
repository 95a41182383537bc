"""EVE against what transformers' models promise (the checks of its ModelTesterMixin and
GenerationTesterMixin, written for EVE): the headless AutoModel, hidden states and attentions,
tuple outputs, dtype and attention loading options, training gradients, and generate() from
embeddings and with its output options."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from eve.modeling_eve import EveForCausalLM, EveModel
from tests.conftest import random_image

IMAGE = "<image>"


@pytest.fixture
def inputs(processor):
    """Two left-padded prompts, one with an image."""
    return processor(text=[f"{IMAGE}\nWhat is it?", "Hello"], images=[random_image(40, 20)])


def test_auto_model_is_the_headless_model(checkpoint, model, inputs, tmp_path):
    base = AutoModel.from_pretrained(checkpoint)  # an EveForCausalLM checkpoint, its head left out
    assert isinstance(base, EveModel) and not hasattr(base, "lm_head")
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
        full = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(hidden, full.hidden_states[-1])
    base.save_pretrained(tmp_path / "saved")  # written back in the causal LM's key layout
    again = AutoModel.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(**inputs).last_hidden_state, hidden)
    fresh = EveModel(base.config)  # a headless model made from scratch saves its own layout, which loads too
    fresh.load_state_dict(base.state_dict())
    fresh.save_pretrained(tmp_path / "fresh")
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(tmp_path / "fresh")(**inputs).last_hidden_state, hidden)


def test_hidden_states_cover_every_layer_and_every_token(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        embeds = model.embed_inputs(inputs["input_ids"], model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]))
    cfg = model.config.text_config
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert all(h.shape == (*inputs["input_ids"].shape, cfg.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], embeds)  # the embedding output holds the visual tokens


def test_attentions_with_eager_attention(checkpoint, inputs):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    assert model.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    cfg, (b, n) = model.config.text_config, inputs["input_ids"].shape
    assert len(out.attentions) == cfg.num_hidden_layers
    assert all(a.shape == (b, cfg.num_attention_heads, n, n) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(b, cfg.num_attention_heads, n))


def test_tuple_outputs_equal_the_output_object(model, inputs):
    with torch.no_grad():
        as_object = model(**inputs, labels=inputs["input_ids"])
        as_tuple = model(**inputs, labels=inputs["input_ids"], return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_object.to_tuple())
    assert torch.equal(as_tuple[0], as_object.loss) and torch.equal(as_tuple[1], as_object.logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "auto"])
def test_loading_in_another_dtype_casts_every_part(checkpoint, inputs, dtype):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    expected = torch.float32 if dtype == "auto" else dtype  # the debug checkpoint is saved in float32
    assert {p.dtype for p in model.parameters()} == {expected}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == expected and torch.isfinite(logits).all()


def test_device_map_auto_loads_and_generates(checkpoint, inputs):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_every_parameter_trains(fresh_model, inputs):
    out = fresh_model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    missing = [n for n, p in fresh_model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing


def test_generate_from_inputs_embeds_with_images(model, inputs):
    with torch.no_grad():
        from_ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        from_embeds = model.generate(**inputs, inputs_embeds=embeds, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        text = {k: inputs[k][1:] for k in ("input_ids", "attention_mask")}
        text_embeds = model.get_input_embeddings()(text["input_ids"])
        embeds_only = model.generate(inputs_embeds=text_embeds, attention_mask=text["attention_mask"], max_new_tokens=4,
                                     min_new_tokens=4, do_sample=False)
    # with both, generate returns the prompt ids too; from embeddings alone, the new tokens only
    assert torch.equal(from_embeds, from_ids) and torch.equal(embeds_only, from_ids[1:, -4:])
    with pytest.raises(ValueError, match="no input_ids"):
        model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                       image_sizes=inputs["image_sizes"], max_new_tokens=2)


def test_generate_returns_what_it_is_asked_for(model, inputs):
    n_new, (b, n) = 3, inputs["input_ids"].shape
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, return_dict_in_generate=True,
                             output_scores=True, output_logits=True, output_hidden_states=True, output_attentions=True)
    assert out.sequences.shape == (b, n + n_new)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == len(out.attentions) == n_new
    assert out.hidden_states[0][0].shape[:2] == (b, n) and out.hidden_states[1][0].shape[:2] == (b, 1)  # prefill, then one token
    assert torch.equal(torch.stack(out.scores, 1).argmax(-1), out.sequences[:, n:])


@pytest.mark.parametrize("num_beams", [1, 2])
def test_transition_scores(model, inputs, num_beams):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=num_beams,
                             output_scores=True, return_dict_in_generate=True)
    scores = model.compute_transition_scores(out.sequences, out.scores, out.get("beam_indices"))
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    if num_beams == 1:  # greedy: each step's score is the best one
        torch.testing.assert_close(scores, torch.stack([s.max(-1).values for s in out.scores], 1))


def test_config_round_trip(checkpoint, model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    assert config.to_diff_dict() == model.config.to_diff_dict()
    assert config.get_text_config() is config.text_config and config.text_config.model_type == "llama"


def test_a_tied_decoder_stays_tied_through_save_and_load(tmp_path, processor):
    from eve.build import build_eve
    from eve.testing import make_tiny_llama

    decoder = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    model = build_eve(str(decoder), "debug", seed=0)[0].eval()
    assert model.config.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path / "eve")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "eve").eval()
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight
    inputs = processor(text=[f"{IMAGE}\nWhat?"], images=[random_image(40, 20)])
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)
