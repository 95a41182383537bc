"""How much language a decoder keeps through the multimodal stages (the EVE paper's forgetting,
SQA 65.3 -> 63.0, which EVEv2's experts address), measured on the demo's own terms: teacher-forced
next-token accuracy on held-out world text (captions and chats the stand-in decoder was
pre-trained on, drawn with another seed), for the stand-in decoder and for each family's model
after stage 2 and stage 3. Text-only input takes EVEv2's text weights only, so its experts show
as what the language weights did or did not learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from demo.stand_ins import world_text

HELD_OUT_SEED_OFFSET = 10_000  # the decoder's corpus uses the run's seed: these texts are new ones


@torch.no_grad()
def text_accuracy(model_dir: str | Path, texts: list[str], batch_size: int = 32) -> float:
    """Top-1 next-token accuracy over every real (non-padding) position of `texts`."""
    import eve  # noqa: F401  (Auto classes for EVE checkpoints)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    hits = total = 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits  # [B, L, V]
        predicted, target = logits[:, :-1].argmax(-1), enc.input_ids[:, 1:]
        real = enc.attention_mask[:, 1:].bool()
        hits += int((predicted == target)[real].sum())
        total += int(real.sum())
    return hits / total


def held_out_texts(seed: int, n: int = 256) -> list[str]:
    return world_text(np.random.default_rng(seed + HELD_OUT_SEED_OFFSET), n)
