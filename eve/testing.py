"""Tiny stand-ins for Vicuna and EVA-CLIP, written to disk so they load through exactly the code
path real checkpoints take (`from_pretrained` on a directory, open_clip `local-dir:`).

Used by the tests, the smoke run and the benchmarks: nothing here is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red circle and a blue square on a white canvas.",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "There are two green triangles, three yellow stars and one purple hexagon.",
    "The text says hello world. It is a tall and narrow picture, or a wide panorama.",
    "Describe the picture. How many shapes are there? Which colour is the largest one?",
    "zero one two three four five six seven eight nine ten yes no left right top bottom",
]


def make_tiny_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with Llama's special ids (<unk>=0, <s>=1, </s>=2) that adds
    BOS like Llama's, trained on `corpus` (default: a few sentences)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or TINY_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def tiny_llama_config(**overrides):
    """The `debug` flavor's decoder config (hidden 64, 2 layers), with overrides."""
    from transformers import LlamaConfig

    from eve.configuration_eve import FLAVORS

    kwargs = {**FLAVORS["debug"]()["text_config"], **overrides}
    kwargs.pop("model_type")
    return LlamaConfig(**kwargs)


def make_tiny_llama(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random tiny LlamaForCausalLM and its tokenizer to `path` (a Vicuna stand-in)."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), **config_overrides))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_open_clip_config(image_size: int = 16, patch_size: int = 8, width: int = 32, layers: int = 2) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size, "head_width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1},
    }


def make_tiny_open_clip(path: str | Path, seed: int = 0, **cfg) -> Path:
    """Write a random tiny open_clip CLIP to `path` in open_clip's local-dir layout (an EVA-CLIP
    stand-in): open_clip_config.json + open_clip_model.safetensors."""
    import open_clip

    model_cfg = tiny_open_clip_config(**cfg)
    torch.manual_seed(seed)
    return save_open_clip(open_clip.CLIP(**model_cfg), model_cfg, path)


def save_open_clip(model: torch.nn.Module, model_cfg: dict, path: str | Path) -> Path:
    """open_clip's local-dir layout, which `open_clip.create_model("local-dir:PATH")` reads."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}, indent=2))
    return path


def make_tiny_qwen2(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random tiny Qwen2ForCausalLM (q/k/v biases, as Qwen2.5's) and the tiny tokenizer
    to `path` (a Qwen2.5-7B-Instruct stand-in for EVEv2)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = make_tiny_tokenizer()
    kwargs = {**tiny_llama_config().to_dict(), "vocab_size": len(tokenizer), **config_overrides}
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: kwargs[k] for k in keep}))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
