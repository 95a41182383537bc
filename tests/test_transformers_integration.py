"""EVE through transformers' own doors: the Auto classes and pipeline, chat templates, the
processor's kwargs conventions, the embedding and inputs_embeds paths, and generation modes."""

from __future__ import annotations

import copy

import pytest
import torch

from eve.templates import TEMPLATES, get_template
from tests.conftest import random_image

IMAGE = "<image>"


def _messages(images, turns):
    """Structured chat messages: user turns with image items first, assistant turns as text."""
    out, it = [], iter(images)
    for role, text, n_images in turns:
        content = [{"type": "image", "image": next(it)} for _ in range(n_images)] + [{"type": "text", "text": text}]
        out.append({"role": role, "content": content})
    return out


CONVERSATIONS = [
    [("user", "What is it?", 1)],
    [("user", "What is it?", 1), ("assistant", "A cat.", 0)],
    [("user", "Compare them.", 2), ("assistant", "The left one is larger.", 0), ("user", "Why?", 0)],
    [("user", "Hello, how are you?", 0)],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_chat_template_equals_eve_templates(processor, name, turns):
    template = get_template(name)
    images = [random_image(20, 20, i) for i in range(3)]
    messages = _messages(images, turns)
    as_turns = [{"from": "human" if r == "user" else "gpt", "value": f"{IMAGE}\n" * n + t}
                for r, t, n in turns]
    text = processor.apply_chat_template(messages, chat_template=name)
    if turns[-1][0] == "assistant" and (name != "plain" or len(turns) == 2):
        assert text == template.render(as_turns)[0]
    if turns[-1][0] == "user" and len(turns) == 1:
        assert processor.apply_chat_template(messages, chat_template=name, add_generation_prompt=True) == template.prompt(as_turns[0]["value"])
    if name == "vicuna_v1" and len(turns) == 3:  # several turns and images, generation prompt
        expected = template.render(as_turns[:2])[0] + template.user + as_turns[2]["value"] + template.assistant.rstrip()
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_chat_template_tokenized_equals_the_processor_on_the_same_text(processor):
    image = random_image(40, 20)
    messages = _messages([image], [("user", "What colour?", 1)])
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    direct = processor(text=[get_template("vicuna_v1").prompt(f"{IMAGE}\nWhat colour?")], images=[image])
    assert torch.equal(out["input_ids"], direct["input_ids"]) and torch.equal(out["pixel_values"], direct["pixel_values"])


def test_templates_are_saved_with_the_processor(checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    assert set(processor.chat_template) == {"default", *TEMPLATES}
    assert processor.chat_template["default"] == TEMPLATES["vicuna_v1"].jinja()


def test_processor_conventions(processor):
    image = random_image(40, 20)
    assert processor.image_token == IMAGE and processor.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE)
    base = processor(text=f"{IMAGE}\nhi", images=[image])
    half = processor(text=f"{IMAGE}\nhi", images=[image], images_kwargs={"rescale_factor": 1 / 510})
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (processor.image_processor.image_mean, processor.image_processor.image_std))
    h, w = base["image_sizes"][0].tolist()
    raw = base["pixel_values"][0, :, :h, :w] * std + mean  # back to [0, 1]
    torch.testing.assert_close(half["pixel_values"][0, :, :h, :w] * std + mean, raw / 2, atol=1e-5, rtol=1e-5)
    flat = processor(text=f"{IMAGE}\nhi", images=[image], rescale_factor=1 / 510)
    assert torch.equal(flat["pixel_values"], half["pixel_values"])
    right = processor(text=["a", "a b c d"], text_kwargs={"padding_side": "right"})
    assert right["attention_mask"][0, -1] == 0 and processor(text=["a", "a b c d"])["attention_mask"][0, 0] == 0
    with pytest.raises(ValueError, match="passed two times"):
        processor(text="hi", padding=True, text_kwargs={"padding": False})
    with pytest.raises(TypeError, match="stride"):
        processor(text="hi", stride=2)  # overflowing windows would cut images: not offered
    with pytest.raises(TypeError, match="crop_size"):
        processor(text=f"{IMAGE}\nhi", images=[image], images_kwargs={"crop_size": 8})
    with pytest.raises(TypeError, match="image_size"):
        processor.image_processor([image], image_size=64)


def test_auto_model_for_image_text_to_text_and_pipeline(checkpoint):
    from transformers import AutoModelForImageTextToText, pipeline

    from eve.modeling_eve import EveForCausalLM

    assert isinstance(AutoModelForImageTextToText.from_pretrained(checkpoint), EveForCausalLM)
    pipe = pipeline("image-text-to-text", model=str(checkpoint))
    image = random_image(40, 20)
    messages = _messages([image], [("user", "What is it?", 1)])
    chat = pipe(text=messages, max_new_tokens=3, generate_kwargs={"do_sample": False})[0]
    assert chat["generated_text"][-1]["role"] == "assistant"
    plain = pipe(images=[image], text=f"{IMAGE}\nWhat is it?", max_new_tokens=3, generate_kwargs={"do_sample": False},
                 return_full_text=False)[0]
    # the same answer as generate on the same inputs
    processor, model = pipe.processor, pipe.model
    inputs = processor(text=[f"{IMAGE}\nWhat is it?"], images=[image])
    ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert plain["generated_text"] == processor.post_process_image_text_to_text(ids[:, inputs["input_ids"].shape[1]:])[0]


def test_embedding_input_ids_and_inputs_embeds(model, processor):
    image = random_image(40, 20)
    inputs = processor(text=[f"{IMAGE}\nWhat?"], images=[image])
    embeds = model.get_input_embeddings()(inputs["input_ids"])  # the image id lies past the table: no IndexError
    assert embeds.shape[:2] == inputs["input_ids"].shape
    with torch.no_grad():
        reference = model(**inputs).logits
        merged = model(inputs_embeds=embeds, **inputs).logits  # input_ids place the image in the given embeddings
        text_only = processor(text=["What?"])
        plain = model(inputs_embeds=model.get_input_embeddings()(text_only["input_ids"]), attention_mask=text_only["attention_mask"]).logits
    torch.testing.assert_close(merged, reference)
    assert torch.isfinite(plain).all()
    with pytest.raises(ValueError, match="no input_ids"):
        model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])


def test_generation_never_yields_the_image_token_and_takes_repetition_penalty(model, processor):
    image = random_image(40, 20)
    inputs = processor(text=[f"{IMAGE}\nWhat?", f"{IMAGE}\nAnd this?"], images=[image, random_image(20, 40, 1)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, repetition_penalty=1.3,
                             output_scores=True, return_dict_in_generate=True)
        sampled = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=0, temperature=5.0)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    image_id = processor.image_token_id
    assert (new != image_id).all() and (sampled[:, inputs["input_ids"].shape[1]:] != image_id).all()
    assert all(torch.isneginf(s[:, image_id]).all() for s in out.scores)
    # after the vocabulary grows, the image id is a real row: still never generated
    grown = type(model)(copy.deepcopy(model.config))  # resizing writes the config: not the shared model's
    grown.load_state_dict(model.state_dict())
    grown.resize_token_embeddings(image_id + 8)
    with torch.no_grad():
        logits = grown(**inputs, mask_image_logit=True).logits
    assert logits.shape[-1] == image_id + 8 and torch.isneginf(logits[..., image_id]).all()


@pytest.mark.parametrize("mode", [dict(num_beams=2), dict(do_sample=True, top_k=5), dict(cache_implementation="static")])
def test_generation_modes_keep_working(model, processor, mode):
    inputs = processor(text=[f"{IMAGE}\nWhat?", "Hi"], images=[random_image(40, 20)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **mode)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_prompt_lookup_decoding_with_image_prompts(model, processor):
    inputs = processor(text=[f"{IMAGE}\nWhat? What? What?"], images=[random_image(40, 20)])
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        lookup = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=2)
    assert torch.equal(greedy, lookup)


def test_lora_forward_backward_merge(fresh_model, processor):
    import peft

    inputs = processor(text=[f"{IMAGE}\nWhat?"], images=[random_image(40, 20)])
    lora = peft.get_peft_model(fresh_model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    out = lora(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = [n for n, p in lora.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
        before = lora(**inputs).logits
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, before, atol=1e-5, rtol=1e-4)


def test_get_image_features_is_a_standard_output(model, processor):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    images = [random_image(40, 20), random_image(20, 40, 1)]
    feats = model.get_image_features(**processor.image_processor(images))
    assert isinstance(feats, BaseModelOutputWithPooling)
    assert feats.last_hidden_state.shape == (sum(feats.lengths), model.config.text_config.hidden_size)
    assert [len(t) for t in feats.pooler_output] == feats.lengths  # one visual sequence per image, for generate()
    assert torch.equal(feats.pooler_output[1], feats.last_hidden_state[feats.lengths[0]:])


def test_assisted_decoding_with_image_prompts(model, processor, tiny_llama_dir):
    from eve.build import build_eve

    assistant = build_eve(str(tiny_llama_dir), "debug", seed=1)[0].eval()  # another EVE of the same width
    inputs = processor(text=[f"{IMAGE}\nWhat?"], images=[random_image(40, 20)])
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assisted = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, assistant_model=assistant)
    assert torch.equal(greedy, assisted)  # greedy assisted decoding keeps the main model's tokens


def test_beams_with_several_images_per_prompt(model, processor):
    images = [random_image(40, 20), random_image(20, 40, 1), random_image(30, 30, 2)]
    inputs = processor(text=[f"{IMAGE}\n{IMAGE}\nCompare.", f"{IMAGE}\nWhat?"], images=images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2, num_return_sequences=2,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        prefill = model(**inputs).logits[:, -1]  # each prompt's next-token logits, images in their own order
        alone = model.generate(**processor(text=[f"{IMAGE}\nWhat?"], images=images[2:]), max_new_tokens=3, min_new_tokens=3,
                               num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.sequences.shape[0] == 4
    # every beam starts from its own prompt with its own images (a swapped image moves these logits)
    vocab = prefill.shape[-1]
    torch.testing.assert_close(out.logits[0][:, :vocab], prefill.repeat_interleave(2, dim=0))
    assert torch.equal(out.sequences[2:, -3:], alone[:, -3:])  # the second prompt's beams as if it were alone


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values, attention_mask):
        return self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_cache=False).logits


def test_torch_export_of_a_forward_with_a_fixed_image_size(model, processor):
    inputs = processor(text=[f"{IMAGE}\nWhat?"], images=[random_image(32, 16)])  # exactly one image's size: no image_sizes
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    with torch.no_grad():
        exported = torch.export.export(_Logits(model), args, strict=False)
        torch.testing.assert_close(exported.module()(*args), _Logits(model)(*args))


def test_decode_step_compiles_without_graph_breaks(model, processor):
    inputs = processor(text=[f"{IMAGE}\nWhat?"], images=[random_image(32, 16)])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        explained = torch._dynamo.explain(model.forward)(
            input_ids=step, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1),
            position_ids=torch.tensor([[inputs["input_ids"].shape[1]]]), past_key_values=out.past_key_values,
            use_cache=True, mask_image_logit=True,
        )
    assert explained.graph_break_count == 0, explained.break_reasons


def test_processor_save_load_round_trip(converted_like_processor, tmp_path):
    from transformers import AutoProcessor

    processor = converted_like_processor
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert (again.split_at_images, again.image_processor.canvas_fill) == (True, [122, 116, 104])
    assert again.chat_template == processor.chat_template
    image = random_image(40, 20)
    a, b = processor(text=f"{IMAGE}\nhi", images=[image]), again(text=f"{IMAGE}\nhi", images=[image])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def converted_like_processor(processor):
    from eve.processing_eve import EveImageProcessor, EveProcessor

    ip = EveImageProcessor(**{**processor.image_processor.to_dict(), "canvas_fill": [122, 116, 104]})
    return EveProcessor(ip, processor.tokenizer, split_at_images=True)


def test_generation_continues_from_its_cache(model, processor):
    """generate(), then generate() again on the extended prompt with the returned cache: the
    same tokens as one uninterrupted call (the images are encoded for the first call only)."""
    inputs = processor(text=[f"{IMAGE}\nWhat?"], images=[random_image(40, 20)])
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        mask = torch.ones_like(first.sequences)
        rest = model.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                              max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(rest, full)
