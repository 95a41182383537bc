"""Checkpoints in the EVE reference code's released layout, written from scratch with random
weights: what eve-convert's tests and bench/convert.py convert. Names, config fields and the
tokenizer files follow BAAI/EVE-7B-v1.0 (a LlamaForCausalLM's own names, the reference's
vision_tower / mm_projector / vision_tower_compressor / vision_clip modules, a SentencePiece
tokenizer.model); the names are spelled out here rather than taken from eve.reference_layout,
so that a test of the converter's key map is not a test of the map against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eve.testing import TINY_CORPUS

TEACHER_KEYS = {  # a few of the CLIP ViT-L/14-336 tensors the reference saves twice
    "model.vision_clip.backbone.vision_model.embeddings.class_embedding": (1024,),
    "model.vision_clip.backbone.vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
    "model.vision_clip.backbone.vision_model.pre_layrnorm.weight": (1024,),
    "model.vision_tower_compressor.clip_layer.backbone.vision_model.embeddings.class_embedding": (1024,),
    "model.vision_tower_compressor.clip_layer.backbone.vision_model.pre_layrnorm.weight": (1024,),
}


def make_sentencepiece_tokenizer(path: str | Path, vocab_size: int = 400) -> Path:
    """A Llama-style SentencePiece model (BPE, byte fallback, dummy prefix, <unk>/<s>/</s> = 0/1/2)
    and the tokenizer_config.json the reference saved beside it."""
    import io

    import sentencepiece as spm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 8), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "model_max_length": 2048,
        "padding_side": "right", "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return path


def reference_shapes(text_config, width: int, patch: int, with_pal: bool = True, with_teacher: bool = True) -> dict:
    """{name: shape} of an EVE checkpoint as the reference saves it (no rotary buffers)."""
    from transformers import LlamaForCausalLM

    d = text_config.hidden_size
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(text_config).state_dict().items()}
    tower = {"patch_embedding.weight": (width, 3, patch, patch), "class_embedding": (width,), "split_embedding": (width,)}
    for attn in ("local_attention", "global_attention"):
        tower.update({f"{attn}.q.0.weight": (width,), f"{attn}.q.0.bias": (width,), f"{attn}.q.1.weight": (width, width),
                      f"{attn}.kv.0.weight": (width,), f"{attn}.kv.0.bias": (width,), f"{attn}.kv.1.weight": (2 * width, width),
                      f"{attn}.proj.weight": (width, width), f"{attn}.proj.bias": (width,)})
    shapes.update({f"model.vision_tower.{k}": v for k, v in tower.items()})
    shapes.update({"model.mm_projector.0.weight": (d, width), "model.mm_projector.0.bias": (d,),
                   "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,)})
    if with_pal:
        taps = len(range(0, text_config.num_hidden_layers + 1, 4))
        pal = "model.vision_tower_compressor."
        for j in range(taps):
            shapes.update({f"{pal}norm_layer.{j}.0.weight": (d,), f"{pal}norm_layer.{j}.0.bias": (d,),
                           f"{pal}norm_layer.{j}.1.weight": (width, d)})
        shapes.update({f"{pal}input_layer.weight": (width, d), f"{pal}input_layer.bias": (width,),
                       f"{pal}output_layer.weight": (width, width), f"{pal}output_layer.bias": (width,)})
    if with_teacher:
        shapes.update(TEACHER_KEYS)
    return shapes


def reference_config(text_config, width: int, tower: str, with_pal: bool = True) -> dict:
    cfg = {k: v for k, v in text_config.to_dict().items() if k in {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
        "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "use_cache"}}
    cfg.update(
        _name_or_path="checkpoints/eve-7b-fitu-672-mse", architectures=["EVELlamaForCausalLM"], model_type="eve",
        torch_dtype="bfloat16", transformers_version="4.31.0", pretraining_tp=1, rope_scaling=None, rope_theta=10000.0,
        freeze_mm_mlp_adapter=False, image_aspect_ratio="pad", mm_hidden_size=width, mm_projector_type="mlp2x_gelu",
        mm_use_im_patch_token=False, mm_use_im_start_end=False, mm_vision_select_feature="patch",
        mm_vision_select_layer=-2, mm_vision_tower=tower, mm_vision_tower_clip="openai/clip-vit-large-patch14-336",
        requires_cliploss=with_pal, tune_mm_mlp_adapter=False, use_mm_proj=True, tokenizer_padding_side="right",
        tokenizer_model_max_length=2048,
    )
    return cfg


def write_reference_checkpoint(
    path: str | Path,
    text_config,
    width: int = 32,
    patch: int = 8,
    image_size: int = 32,
    teacher_size: int = 16,
    teacher_patch: int = 8,
    fmt: str = "bin",
    shard_bytes: int = 1 << 20,
    with_pal: bool = True,
    with_teacher: bool = True,
    rotary: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """A random EVE checkpoint in the released layout at `path`, sharded by `shard_bytes` as
    `fmt` ("bin": pytorch_model-*.bin, "safetensors": model-*.safetensors, each with its index),
    with its vision tower's preprocessor_config.json in a subfolder named as the reference names it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tower = f"eve-patch{patch}-anypixel-{image_size}"
    (path / tower).mkdir(exist_ok=True)
    (path / tower / "preprocessor_config.json").write_text(json.dumps({
        "image_size": image_size, "patch_stride": patch, "conv_stride": 2, "image_size_clip": teacher_size,
        "patch_stride_clip": teacher_patch, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "crop_size": image_size, "size": image_size,
        "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3,
    }))
    (path / "config.json").write_text(json.dumps(reference_config(text_config, width, f"openai/{tower}", with_pal), indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    make_sentencepiece_tokenizer(path) if tokenizer_dir is None else _copy_tokenizer(Path(tokenizer_dir), path)

    g = torch.Generator().manual_seed(seed)
    shapes = reference_shapes(text_config, width, patch, with_pal, with_teacher)
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    names = list(shapes) + ([f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(text_config.num_hidden_layers)] if rotary else [])
    written, current, size = [], {}, 0  # shards are written as they fill, so memory holds one

    def flush():
        tmp = path / f".shard-{len(written)}.tmp"
        torch.save(current, tmp) if fmt == "bin" else save_file(current, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(current)))

    for name in names:
        if name.endswith("inv_freq"):
            t = inv_freq.clone()
        elif name.endswith(("norm.weight", "layernorm.weight", ".0.weight")) and len(shapes[name]) == 1:
            t = (1 + 0.1 * torch.randn(shapes[name], generator=g)).to(dtype)  # norms near 1, as trained ones are
        else:
            t = (0.05 * torch.randn(shapes[name], generator=g)).to(dtype)
        if current and size + t.numel() * t.element_size() > shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = t
        size += t.numel() * t.element_size()
    flush()
    n, weight_map = len(written), {}
    for k, (tmp, shard_names) in enumerate(written, start=1):
        fname = f"pytorch_model-{k:05d}-of-{n:05d}.bin" if fmt == "bin" else f"model-{k:05d}-of-{n:05d}.safetensors"
        tmp.rename(path / fname)
        weight_map.update({name: fname for name in shard_names})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return path


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
