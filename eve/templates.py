"""Chat templates (`plain`, `vicuna_v1`, the reference's `eve_v1`, EVEv2's `eve2_qwen`) and loss masks built from
character offsets (SPEC 1.4).

The text is rendered once, with the character spans that carry loss (captions, assistant turns
and their `</s>`); it is tokenized once, and a token is a label exactly when its characters lie
inside such a span. A token that straddles a span boundary is a masking mismatch and raises
`LabelMaskingError`, which a data pipeline counts and skips: never train on shifted labels
(the reference's "tokenization mismatch" that led to NaN losses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from eve.processing_eve import IMAGE_TOKEN, encode_text, expand_image_tokens

IGNORE_INDEX = -100

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


# The reference's `eve_v1` conversation (its eval loaders' default --conv-mode): "human" for "user".
# The paper's benchmark scripts pass --conv-mode vicuna_v1 instead, except Q-Bench's (eve_v1).
EVE_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class LabelMaskingError(ValueError):
    """A sample whose loss mask cannot be built: tokens that do not align with it, or nothing
    worth a label (an empty answer, a speaker the template does not know). `reason` is a short
    code a data pipeline counts it under."""

    def __init__(self, message: str, reason: str = "label_mismatch"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str  # prefix of a user turn
    assistant: str  # prefix of an assistant turn
    turn_end: str  # appended to every assistant turn (inside the loss span)

    def render(self, turns: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Turns [{"from": "human"|"gpt", "value": str}, ...] -> (text, loss spans)."""
        if self.name == "plain":
            return _render_plain(turns)
        text, spans = self.system, []
        for i, turn in enumerate(turns):
            role = _role(turn, i)
            if role == "human":
                text += self.user + turn["value"]
            else:
                _check_answer(turn, i)
                text += self.assistant
                start = len(text)
                text += turn["value"] + self.turn_end
                spans.append((start, len(text)))
        return text, spans

    def prompt(self, question: str) -> str:
        """The generation prompt for one user turn, ending where the assistant starts."""
        if self.name == "plain":
            return question
        return self.system + self.user + question + self.assistant.rstrip()

    def jinja(self) -> str:
        """This template in Jinja, for transformers' `apply_chat_template` on structured messages
        ({"role": "user" | "assistant" | "system", "content": str or [{"type": "image"},
        {"type": "text", "text": ...}]}): an image item is written `<image>\n`, as eve-eval and
        the reference place it, and the result equals `render` / `prompt` of the same turns."""
        q = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731  (a JSON string is a Jinja string literal)
        content = (
            "{%- macro content(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for item in c -%}"
            "{%- if item['type'] == 'image' -%}{{ " + q(IMAGE_TOKEN + "\n") + " }}"
            "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
        )
        roles = "{%- for message in messages -%}{%- set role = message['role'] -%}"
        unknown = "{%- else -%}{{ raise_exception('unknown role ' ~ role ~ ' (user, assistant or system)') }}{%- endif -%}{%- endfor -%}"
        if self.name == "plain":  # stages 1-2: the user turn's images, then the caption and a newline;
            # a final user turn to generate from is written whole, as `prompt` does
            images = ("{%- if message['content'] is string -%}{{ " + q(IMAGE_TOKEN) + " * message['content'].count("
                      + q(IMAGE_TOKEN) + ") }}{%- else -%}{%- for item in message['content'] if item['type'] == 'image' -%}{{ "
                      + q(IMAGE_TOKEN) + " }}{%- endfor -%}{%- endif -%}")
            return (content + roles + "{%- if role in ['user', 'human'] and add_generation_prompt and loop.last -%}"
                    + "{{ content(message['content']) }}{%- elif role in ['user', 'human'] -%}" + images
                    + "{%- elif role in ['assistant', 'gpt'] -%}{{ content(message['content']) }}{{ " + q(self.turn_end) + " }}"
                    + "{%- elif role == 'system' -%}" + unknown)
        return (
            content
            + "{%- if messages and messages[0]['role'] == 'system' -%}{{ content(messages[0]['content']) }}"
            + "{%- else -%}{{ " + q(self.system) + " }}{%- endif -%}"
            + roles
            + "{%- if role in ['user', 'human'] -%}{{ " + q(self.user) + " }}{{ content(message['content']) }}"
            + "{%- elif role in ['assistant', 'gpt'] -%}{{ " + q(self.assistant) + " }}{{ content(message['content']) }}{{ "
            + q(self.turn_end) + " }}"
            + "{%- elif role == 'system' and loop.first -%}" + unknown
            + "{%- if add_generation_prompt -%}{{ " + q(self.assistant.rstrip()) + " }}{%- endif -%}"
        )


TEMPLATES = {
    "plain": Template("plain", "", "", "", "\n"),
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, " USER: ", " ASSISTANT: ", "</s>"),
    "eve_v1": Template("eve_v1", EVE_V1_SYSTEM, " USER: ", " ASSISTANT: ", "</s>"),
    # EVEv2's `qwen_v2` conversation: Vicuna's layout (not ChatML) with Qwen's <|im_end|> ending a turn.
    "eve2_qwen": Template("eve2_qwen", VICUNA_SYSTEM, " USER: ", " ASSISTANT: ", "<|im_end|>"),
}


def chat_templates() -> dict[str, str]:
    """Every template as Jinja, by name, with `vicuna_v1` as transformers' "default": what an
    EveProcessor saves and `apply_chat_template(..., chat_template=NAME)` picks from."""
    return {"default": TEMPLATES["vicuna_v1"].jinja(), **{name: t.jinja() for name, t in TEMPLATES.items()}}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _role(turn: dict, index: int) -> str:
    role = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}.get(turn.get("from"))
    if role is None:
        raise LabelMaskingError(f"turn {index}: unknown speaker {turn.get('from')!r}", "unknown_speaker")
    return role


def _check_answer(turn: dict, index: int) -> None:
    """An empty answer would train only on the turn's end (`</s>`, or the caption's newline)."""
    if not turn["value"].strip():
        raise LabelMaskingError(f"turn {index}: empty answer", "empty_answer")


def _render_plain(turns: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Stages 1-2: image + caption + newline, loss on the caption (SPEC 1.4)."""
    if len(turns) != 2:
        raise LabelMaskingError(f"plain template takes [image turn, caption turn], got {len(turns)} turns", "bad_record")
    if _role(turns[0], 0) != "human" or _role(turns[1], 1) != "gpt":
        raise LabelMaskingError(f"plain template takes [human turn, gpt turn], got [{turns[0]['from']!r}, "
                                f"{turns[1]['from']!r}]", "unknown_speaker")
    _check_answer(turns[1], 1)
    text = IMAGE_TOKEN * turns[0]["value"].count(IMAGE_TOKEN)  # the prompt text itself is dropped
    start = len(text)
    text += turns[1]["value"] + "\n"
    return text, [(start, len(text))]


def tokenize_with_labels(
    tokenizer, text: str, spans: Sequence[tuple[int, int]], split_at_images: bool = False
) -> tuple[list[int], list[int]]:
    """Tokenize `text` (with the tokenizer's BOS; see `encode_text` for `split_at_images`) and
    keep labels only inside `spans`."""
    enc = encode_text(tokenizer, text, split_at_images, add_special_tokens=True, return_offsets=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        if a == b:  # special tokens the tokenizer adds (BOS) have no characters
            labels.append(IGNORE_INDEX)
            continue
        # Tokenizers fold the space before a word into its token ("▁A", "ĠA"); that space
        # belongs to the prompt, so judge a token by its characters after leading spaces.
        piece = text[a:b]
        if piece.strip():
            a += len(piece) - len(piece.lstrip())
        inside = any(s <= a and b <= e for s, e in spans)
        if not inside and any(a < e and s < b for s, e in spans):
            raise LabelMaskingError(
                f"token {tokenizer.convert_ids_to_tokens(tok)!r} at chars {a}-{b} straddles a loss-span "
                f"boundary in {text[max(0, a - 20):b + 20]!r}"
            )
        labels.append(tok if inside else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        raise LabelMaskingError("no token carries loss (empty answer?)")
    return ids, labels


def truncate_after_splice(ids: list[int], labels: list[int], max_length: int, image_token_id: int):
    """Cut to `max_length` without cutting an image: the text tail goes. Returns
    (ids, labels, n_dropped). Raises when the images alone do not fit."""
    if len(ids) <= max_length:
        return ids, labels, 0
    cut = max_length
    # Move the cut back to the start of an image it would split.
    while cut > 0 and ids[cut - 1] == image_token_id and ids[cut] == image_token_id:
        cut -= 1
    if image_token_id in ids[cut:]:
        raise LabelMaskingError(f"an image does not fit in max_length={max_length} ({len(ids)} tokens after splicing)")
    if all(label == IGNORE_INDEX for label in labels[:cut]):
        raise LabelMaskingError(f"no supervised token is left within max_length={max_length}")
    return ids[:cut], labels[:cut], len(ids) - cut


def encode_example(
    tokenizer,
    template: str | Template,
    turns: Sequence[dict],
    image_token_id: int,
    visual_token_counts: Sequence[int] = (),
    max_length: int | None = None,
    split_at_images: bool = False,
) -> dict:
    """One training sample: render, tokenize with labels, splice the visual tokens (label -100)
    and apply `max_length` after splicing (SPEC 1.3). Raises LabelMaskingError on a bad sample."""
    tpl = get_template(template) if isinstance(template, str) else template
    text, spans = tpl.render(turns)
    ids, labels = tokenize_with_labels(tokenizer, text, spans, split_at_images)
    try:
        ids, labels = expand_image_tokens(ids, image_token_id, visual_token_counts, labels)
    except ValueError as e:
        raise LabelMaskingError(str(e)) from e  # more <image> markers than images, or fewer
    dropped = 0
    if max_length is not None:
        ids, labels, dropped = truncate_after_splice(ids, labels, max_length, image_token_id)
    return {"input_ids": ids, "labels": labels, "truncated_tokens": dropped}
