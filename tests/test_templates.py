"""Chat templates, loss masks from character offsets, and max length after splicing."""

from __future__ import annotations

import pytest

from eve.templates import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    LabelMaskingError,
    encode_example,
    get_template,
    tokenize_with_labels,
    truncate_after_splice,
)

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "How many shapes?"},
    {"from": "gpt", "value": "two"},
]


def _supervised_text(tokenizer, ids, labels):
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_vicuna_v1_renders_the_reference_format():
    text, spans = get_template("vicuna_v1").render(CONVERSATION)
    assert text == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A red circle.</s>"
        " USER: How many shapes? ASSISTANT: two</s>"
    )
    assert [text[a:b] for a, b in spans] == ["A red circle.</s>", "two</s>"]
    assert get_template("vicuna_v1").prompt("Hi?") == VICUNA_SYSTEM + " USER: Hi? ASSISTANT:"


def test_vicuna_labels_cover_exactly_the_answers(processor):
    tok = processor.tokenizer
    out = encode_example(tok, "vicuna_v1", CONVERSATION, processor.image_token_id, [7])
    ids, labels = out["input_ids"], out["labels"]
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids.count(processor.image_token_id) == 7
    assert _supervised_text(tok, ids, labels).replace(" ", "") == "Aredcircle.</s>two</s>"
    assert labels.count(tok.eos_token_id) == 2  # the model learns to stop after each answer


def test_plain_template_supervises_the_caption(processor):
    tok = processor.tokenizer
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a blue square"}]
    out = encode_example(tok, "plain", turns, processor.image_token_id, [5])
    ids, labels = out["input_ids"], out["labels"]
    assert ids[1:6] == [processor.image_token_id] * 5
    assert _supervised_text(tok, ids, labels) == "a blue square\n"


def test_a_straddling_token_raises_instead_of_shifting_labels(processor):
    tok = processor.tokenizer
    text = "USER: hi ASSISTANT: the assistant"
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    a, b = next((a, b) for a, b in offsets[::-1] if b - a >= 3)  # a multi-character token
    start = b - 1  # the loss span starts inside it
    with pytest.raises(LabelMaskingError, match="straddles"):
        tokenize_with_labels(tok, text, [(start, len(text))])


def test_bad_conversations_raise(processor):
    tok = processor.tokenizer
    with pytest.raises(LabelMaskingError, match="speaker"):
        encode_example(tok, "vicuna_v1", [{"from": "robot", "value": "x"}], processor.image_token_id)
    with pytest.raises(LabelMaskingError, match="placeholder"):
        encode_example(tok, "vicuna_v1", CONVERSATION, processor.image_token_id, [])
    with pytest.raises(LabelMaskingError, match="no token carries loss"):
        encode_example(tok, "vicuna_v1", [{"from": "human", "value": "q"}], processor.image_token_id)


def test_truncation_never_cuts_an_image():
    img = 99
    ids = [1, 5, img, img, img, img, 6, 7, 8, 9]
    labels = [-100, -100, -100, -100, -100, -100, 6, 7, 8, 9]
    out_ids, out_labels, dropped = truncate_after_splice(ids, labels, 8, img)
    assert out_ids == ids[:8] and dropped == 2
    with pytest.raises(LabelMaskingError, match="does not fit"):
        truncate_after_splice(ids, labels, 4, img)  # would split the image
    assert truncate_after_splice(ids, labels, 20, img) == (ids, labels, 0)


def test_max_length_applies_after_splicing(processor):
    tok = processor.tokenizer
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a very long caption " * 8}]
    full = encode_example(tok, "plain", turns, processor.image_token_id, [10])
    cut = encode_example(tok, "plain", turns, processor.image_token_id, [10], max_length=20)
    assert len(cut["input_ids"]) == 20 and cut["truncated_tokens"] == len(full["input_ids"]) - 20
    assert cut["input_ids"].count(processor.image_token_id) == 10
