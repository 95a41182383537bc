"""The demo's stand-ins for Vicuna and EVA-CLIP, trained here in a minute so that "decoder frozen
in stage 1" and "align to the teacher" mean something, then saved where a real checkpoint would
be: a Llama directory (`from_pretrained`) and an open_clip local directory (`local-dir:`).

- Decoder: a byte-level BPE tokenizer trained with `tokenizers` on the world's text, and a small
  LlamaForCausalLM pre-trained on text alone (captions and chats whose answers it cannot know),
  so it knows the language and the chat format but has never seen a pixel.
- Teacher: a small open_clip CLIP trained contrastively on (image, caption) pairs of the world.
  Captions repeat (64 distinct scenes), so every pair with the same colour, kind and count is a
  positive: a multi-positive InfoNCE in both directions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from demo.world import COLOURS, COUNT_WORDS, KINDS, TRAIN_ASPECTS, Scene, render, sample_scene
from eval.tasks.base import SHORT_ANSWER
from eve.templates import get_template
from eve.testing import make_tiny_tokenizer, save_open_clip

TOKENIZER_VOCAB = 1000


def world_text(rng: np.random.Generator, n: int) -> list[str]:
    """Captions (`plain` template's text) and vicuna_v1 chats about random scenes: the decoder's
    pre-training corpus. Answers are about a scene the text never shows: only priors to learn."""
    vicuna, texts = get_template("vicuna_v1"), []
    for i in range(n):
        scene = sample_scene(rng, TRAIN_ASPECTS, seed=i)
        if i % 2 == 0:
            texts.append(scene.caption(rng) + "\n")
            continue
        turns = []
        for _, question, answer in scene.questions(rng)[: 1 + i % 3]:
            turns += [{"from": "human", "value": f"{question}\n{SHORT_ANSWER}"},
                      {"from": "gpt", "value": answer}]
        texts.append(vicuna.render(turns)[0])
    return texts


def make_decoder(out: Path, config: dict, steps: int, seed: int, batch_size: int = 32, lr: float = 3e-3) -> list[float]:
    """Train the tokenizer and pre-train the decoder on text; save both to `out`. Returns the losses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = np.random.default_rng(seed)
    corpus = world_text(rng, 4000)
    tokenizer = make_tiny_tokenizer(TOKENIZER_VOCAB, corpus)
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, "vocab_size": len(tokenizer)}))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 20, steps)
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in corpus]
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="decoder: text pre-training", unit="step"):
        batch = [encoded[i] for i in rng.integers(len(encoded), size=batch_size)]
        longest = max(map(len, batch))
        ids = torch.tensor([b + [tokenizer.pad_token_id] * (longest - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (longest - len(b)) for b in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return losses


def teacher_config(vocab_size: int, image_size: int, patch_size: int, width: int) -> dict:
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": image_size, "layers": 4, "width": width, "patch_size": patch_size, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": vocab_size + 1, "width": width, "heads": 4, "layers": 2},
    }


def _label(scene: Scene) -> int:
    return (list(COLOURS).index(scene.colour) * len(KINDS) + KINDS.index(scene.kind)) * len(COUNT_WORDS) + scene.count - 1


def make_teacher(out: Path, tokenizer, image_processor, images: int, steps: int, seed: int, long_side: int,
                 batch_size: int = 64, lr: float = 2e-3) -> list[float]:
    """Train a small open_clip CLIP on the world's (image, caption) pairs; save it to `out`."""
    import open_clip

    rng = np.random.default_rng(seed + 1)
    scenes = [sample_scene(rng, TRAIN_ASPECTS, seed=10_000_000 + seed * 100_000 + i) for i in range(images)]
    pixels = torch.from_numpy(np.concatenate([
        image_processor.teacher_pixels([render(s, long_side) for s in scenes[i : i + 256]])
        for i in tqdm(range(0, images, 256), desc="teacher: rendering", unit="batch")
    ]))
    eot = len(tokenizer)  # open_clip pools the text at the largest id: put EOT above the vocabulary
    model_cfg = teacher_config(len(tokenizer), image_processor.teacher_image_size, image_processor.teacher_patch_size, 64)
    context = model_cfg["text_cfg"]["context_length"]
    texts = torch.zeros(images, context, dtype=torch.long)
    for i, s in enumerate(scenes):
        ids = tokenizer(s.caption(rng), add_special_tokens=False)["input_ids"][: context - 1] + [eot]
        texts[i, : len(ids)] = torch.tensor(ids)
    labels = torch.tensor([_label(s) for s in scenes])

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = get_cosine_schedule_with_warmup(opt, 20, steps)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="teacher: contrastive training", unit="step"):
        idx = torch.from_numpy(rng.integers(images, size=batch_size))
        image_emb = F.normalize(model.encode_image(pixels[idx]), dim=-1)
        text_emb = F.normalize(model.encode_text(texts[idx]), dim=-1)
        logits = model.logit_scale.exp() * image_emb @ text_emb.T
        same = (labels[idx, None] == labels[None, idx]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    save_open_clip(model, model_cfg, out)
    return losses
