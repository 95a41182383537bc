"""EveProcessor against what transformers' processors promise (the checks of its
ProcessorTesterMixin, written for EVE): defaults of the tokenizer and image processor it was
made with, per-call overrides flat or nested, settings passed twice, truncation that never cuts
an image, typed kwargs, save/load, and apply_chat_template in batches."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from eve.processing_eve import EveImageProcessor, EveProcessor
from eve.processing_kwargs import EveProcessorKwargs
from tests.conftest import random_image

IMAGE = "<image>"
WIDE = dict(width=400, height=30)  # 13:1, as transformers' own processor tests use


@pytest.fixture
def saved(checkpoint):
    return str(checkpoint)


def make(saved, tokenizer_kwargs=None, image_kwargs=None) -> EveProcessor:
    return EveProcessor(EveImageProcessor.from_pretrained(saved, **(image_kwargs or {})),
                        AutoTokenizer.from_pretrained(saved, **(tokenizer_kwargs or {})))


def raw_resized(processor, image) -> np.ndarray:
    """The image at model geometry in 0-255, [3, h, w]: what rescale and normalise start from."""
    ip = processor.image_processor
    h, w = ip.resized_size(image.height, image.width)
    return np.asarray(image.resize((w, h), resample=ip.resample), dtype=np.float32).transpose(2, 0, 1)


def test_call_takes_typed_kwargs():
    annotation = inspect.signature(EveProcessor.__call__).parameters["kwargs"].annotation
    assert typing.get_origin(annotation) is typing.Unpack and typing.get_args(annotation) == (EveProcessorKwargs,)
    assert EveProcessor.valid_processor_kwargs is EveProcessorKwargs


def test_tokenizer_init_settings_are_the_defaults(saved):
    processor = make(saved, {"max_length": 117, "padding": "max_length"})
    out = processor(text=f"lower newer {IMAGE}", images=random_image(**WIDE))
    assert out["input_ids"].shape == (1, 117)
    assert out["attention_mask"][0, 0] == 0  # still left padding
    # a call overrides them
    assert processor(text=f"lower newer {IMAGE}", images=random_image(**WIDE), max_length=112)["input_ids"].shape == (1, 112)


def test_a_saved_right_padding_side_does_not_break_batched_generation(saved):
    processor = make(saved, {"padding_side": "right"})  # as Vicuna's tokenizer_config says
    out = processor(text=["a", "a b c d"])
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1
    right = processor(text=["a", "a b c d"], padding_side="right")
    assert right["attention_mask"][0, -1] == 0


def test_image_processor_init_settings_are_the_defaults(saved):
    image = random_image(**WIDE)
    processor = make(saved, image_kwargs={"do_rescale": True, "rescale_factor": -1})
    ip = processor.image_processor
    out = processor(text=f"lower newer {IMAGE}", images=image)
    mean, std = (np.asarray(v, dtype=np.float32).reshape(3, 1, 1) for v in (ip.image_mean, ip.image_std))
    expected = (-raw_resized(processor, image) - mean) / std
    h, w = out["image_sizes"][0].tolist()
    np.testing.assert_allclose(out["pixel_values"][0, :, :h, :w].numpy(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("how", ["flat", "nested", "common"])
def test_call_settings_override_flat_or_nested(saved, how):
    processor, image = make(saved, {"padding": "longest"}), random_image(**WIDE)
    settings = {"do_rescale": True, "rescale_factor": -1, "padding": "max_length", "max_length": 76}
    if how == "flat":
        out = processor(text=f"lower newer {IMAGE}", images=image, return_tensors="pt", **settings)
    else:
        text = {k: settings[k] for k in ("padding", "max_length")}
        images = {k: settings[k] for k in ("do_rescale", "rescale_factor")}
        extra = {"common_kwargs": {"return_tensors": "pt"}} if how == "common" else {"return_tensors": "pt"}
        out = processor(text=f"lower newer {IMAGE}", images=image, text_kwargs=text, images_kwargs=images, **extra)
    assert out["input_ids"].shape == (1, 76) and out["pixel_values"][0, 0].mean() <= 0


def test_rescale_and_normalise_can_be_switched_off(saved):
    processor, image = make(saved), random_image(**WIDE)
    raw = raw_resized(processor, image)
    h, w = raw.shape[1:]
    unnormalised = processor(text=IMAGE, images=image, do_normalize=False)["pixel_values"][0, :, :h, :w].numpy()
    np.testing.assert_array_equal(unnormalised, raw / np.float32(255.0))
    untouched = processor(text=IMAGE, images=image, do_normalize=False, do_rescale=False)["pixel_values"][0, :, :h, :w]
    np.testing.assert_array_equal(untouched.numpy(), raw)
    # the reference layout's border is the mean colour in the same units
    square = processor.image_processor([image], pad_to_square=True, do_normalize=False)["pixel_values"]
    np.testing.assert_allclose(square[0, :3, 0, 0].numpy(), np.asarray(processor.image_processor.image_mean), rtol=1e-6)
    with pytest.raises(ValueError, match="rescale_factor"):
        processor(text=IMAGE, images=image, rescale_factor=0)


@pytest.mark.parametrize("twice", [
    dict(images_kwargs={"do_rescale": True, "rescale_factor": -1}, do_rescale=True),
    dict(text_kwargs={"padding": "do_not_pad"}, padding="max_length"),
])
def test_a_setting_passed_twice_raises(saved, twice):
    with pytest.raises(ValueError, match="two times"):
        make(saved)(text=[f"lower newer {IMAGE}"], images=random_image(**WIDE), return_tensors="pt", **twice)


def test_truncation_cuts_text_never_an_image(saved):
    processor, image = make(saved), random_image(**WIDE)
    full = processor(text=f"{IMAGE}\nlower newer upper older longer string", images=image)["input_ids"][0]
    cut = processor(text=f"{IMAGE}\nlower newer upper older longer string", images=image, truncation=True, max_length=len(full) - 3)
    assert torch.equal(cut["input_ids"][0], full[: len(full) - 3])
    with pytest.raises(ValueError, match="would cut an image"):
        processor(text=f"lower newer upper older longer string {IMAGE}", images=image, truncation=True, max_length=len(full) - 3)
    processor.tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match="from the left would cut an image"):
        processor(text=f"{IMAGE}\nlower newer upper older longer string", images=image, truncation=True, max_length=len(full) - 3)
    left = processor(text=f"lower newer upper older longer string {IMAGE}", images=image, truncation=True, max_length=8)
    assert left["input_ids"].shape == (1, 8) and (left["input_ids"][0, -4:] == processor.image_token_id).all()


def test_mm_token_type_ids_mark_the_image_tokens(saved):
    processor = make(saved)
    out = processor(text=[f"{IMAGE}\nhi", "hello there"], images=[random_image(40, 20)], return_mm_token_type_ids=True)
    assert torch.equal(out["mm_token_type_ids"].bool(), out["input_ids"] == processor.image_token_id)


def test_save_and_load_keep_every_setting(saved, tmp_path):
    processor = make(saved, image_kwargs={"do_normalize": False, "rescale_factor": 1 / 127.5})
    processor.save_pretrained(tmp_path)
    again = EveProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == processor.to_dict()
    assert repr(again.image_processor) == repr(processor.image_processor)
    image = random_image(40, 20)
    assert torch.equal(again(text=IMAGE, images=image)["pixel_values"], processor(text=IMAGE, images=image)["pixel_values"])


@pytest.mark.parametrize("return_tensors", ["np", "pt"])
def test_apply_chat_template_in_batches(saved, return_tensors):
    processor = make(saved)
    kind = {"np": np.ndarray, "pt": torch.Tensor}[return_tensors]
    batch = [[{"role": "user", "content": [{"type": "text", "text": "Describe this."}]}]] * 2
    prompts = processor.apply_chat_template(batch, add_generation_prompt=True)
    assert len(prompts) == 2 and prompts[0].endswith("USER: Describe this. ASSISTANT:")
    ids = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_tensors=return_tensors)
    assert np.array_equal(np.asarray(ids), np.asarray(processor.tokenizer(prompts)["input_ids"]))
    padded = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, padding="max_length",
                                           truncation=True, max_length=100, return_tensors=return_tensors)
    assert padded.shape == (2, 100)
    with_images = [[{"role": "user", "content": [{"type": "text", "text": "Describe this."},
                                                 {"type": "image", "image": random_image(30 + 10 * i, 20)}]}] for i in range(2)]
    out = processor.apply_chat_template(with_images, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors=return_tensors)
    assert {"input_ids", "attention_mask", "pixel_values", "image_sizes"} <= set(out)
    assert all(isinstance(v, kind) and len(v) == 2 for v in out.values())
    go_on = [m + [{"role": "assistant", "content": [{"type": "text", "text": "It is the sound of"}]}] for m in with_images]
    assert all(p.endswith("ASSISTANT: It is the sound of")
               for p in processor.apply_chat_template(go_on, continue_final_message=True))


def test_a_chat_template_of_ones_own_survives_save_and_load(saved, tmp_path):
    processor = make(saved)
    processor.chat_template = "{{ messages[0]['content'] }}"
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    again = EveProcessor.from_pretrained(tmp_path)  # (the tokenizer's own named templates come along)
    assert again.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def test_model_input_names_are_what_it_returns(saved):
    processor = make(saved)
    out = processor(text=[f"{IMAGE}\nhi"], images=[random_image(40, 20)])
    assert set(out) == set(processor.model_input_names) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
