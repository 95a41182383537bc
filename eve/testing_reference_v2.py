"""Tiny EVEv2 releases in BAAI/EVE-7B-HD-v2.0's layout, written from scratch with random weights:
what eve-convert's EVEv2 tests convert. Names and config fields follow the release code's
`save_pretrained` (baaivision/EVE, EVEv2: EVEQwen2ForCausalLM, its VisionTokenizer and the
`moe_*` copies in every layer), the tokenizer Qwen2.5's (byte-level BPE, no BOS, ChatML
specials and template). The names are spelled out here rather than taken from
eve.reference_layout_v2, so that a test of the converter's key map is not a test of the map
against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eve.testing import TINY_CORPUS

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EXPERT_COPIES = {  # each layer's vision copies, by the text weight they copy (the release's Qwen2 code)
    "self_attn.moe_q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.moe_q_proj.bias": "self_attn.q_proj.bias",
    "self_attn.moe_k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.moe_k_proj.bias": "self_attn.k_proj.bias",
    "self_attn.moe_v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.moe_v_proj.bias": "self_attn.v_proj.bias",
    "self_attn.moe_o_proj.weight": "self_attn.o_proj.weight",
    "moe_mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "moe_mlp.up_proj.weight": "mlp.up_proj.weight",
    "moe_mlp.down_proj.weight": "mlp.down_proj.weight",
    "moe_input_layernorm.weight": "input_layernorm.weight",
    "moe_post_attention_layernorm.weight": "post_attention_layernorm.weight",
}
PREPROCESSOR = {  # the release code's openai/eve-anyratio-res1600-patch16/preprocessor_config.json
    "do_center_crop": False, "do_normalize": True, "do_resize": False, "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "max_size": 1600, "patch_stride": 16, "dense_stride": 2,
}


def write_qwen_tokenizer(path: str | Path, vocab_size: int = 400) -> Path:
    """A Qwen2-style tokenizer (Qwen2Tokenizer class, <|endoftext|>/<|im_start|>/<|im_end|> = 0/1/2,
    eos <|im_end|>, pad <|endoftext|>, no BOS) with Qwen's ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, chat_template=CHATML, model_max_length=32768,
               errors="replace", split_special_tokens=False)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def tiny_qwen2_config(vocab_size: int, **overrides):
    """A Qwen2.5-shaped decoder at toy size (q/k/v biases, GQA, rope_theta 1e6)."""
    from transformers import Qwen2Config

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    return Qwen2Config(**{**kwargs, **overrides})


def release_config(text_config, width: int, tower: str) -> dict:
    """config.json as EVEv2's training script saves it (Qwen2.5's fields plus its own)."""
    d = text_config.to_dict()
    cfg = {k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                             "rms_norm_eps", "tie_word_embeddings", "use_cache", "bos_token_id", "eos_token_id",
                             "pad_token_id", "attention_dropout", "max_window_layers")}
    cfg.update(
        _name_or_path="checkpoints/EVEv2-stage2", architectures=["EVEQwen2ForCausalLM"], model_type="eve-qwen2",
        torch_dtype="bfloat16", transformers_version="4.45.0", rope_theta=1000000.0, rope_scaling=None,
        sliding_window=131072, use_sliding_window=False, mm_vision_tower=tower, mm_hidden_size=width, add_moe=True,
        moe_part="layernorm-self_attn-mlp", tune_VE=True, tune_LLM=True, tune_MOE=True, vision_tower_lr=1e-5,
    )
    return cfg


def release_shapes(text_config, width: int, patch: int, aliases: bool = False) -> dict:
    """{name: shape} of an EVEv2 checkpoint as the release saves it (no rotary buffers)."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(text_config).state_dict().items()}
    d = text_config.hidden_size
    cls, spl = ("start_embedding", "end_embedding") if aliases else ("class_embedding", "split_embedding")
    shapes.update({"model.vision_tower.patch_embedding.0.weight": (width, 3, patch, patch),
                   "model.vision_tower.patch_embedding.0.bias": (width,),
                   "model.vision_tower.patch_embedding.2.weight": (d, width, 2, 2),
                   "model.vision_tower.patch_embedding.2.bias": (d,),
                   f"model.vision_tower.{cls}": (d,), f"model.vision_tower.{spl}": (d,)})
    for i in range(text_config.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes.update({layer + moe: shapes[layer + text] for moe, text in EXPERT_COPIES.items()})
    return shapes


def write_eve2_release(
    path: str | Path,
    width: int = 32,
    patch: int = 8,
    image_size: int = 64,
    padded_vocab: int = 8,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 200_000,
    seed: int = 0,
    aliases: bool = False,
    preprocessor: bool = True,
) -> Path:
    """A random EVEv2 release at `path`: sharded model-*.safetensors with their index, config.json,
    generation_config.json, the tokenizer and (with `preprocessor`) the vision tower's
    preprocessor_config.json in the folder `mm_vision_tower` names. The decoder's vocabulary is
    `padded_vocab` rows larger than the tokenizer, as Qwen2.5's 152064 rows are for 151665 tokens."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_size = len(json.loads(write_qwen_tokenizer(path).joinpath("tokenizer.json").read_text())["model"]["vocab"])
    text_config = tiny_qwen2_config(tokenizer_size + padded_vocab)
    tower = f"openai/eve-anyratio-res{image_size}-patch{patch}"
    if preprocessor:
        (path / tower).mkdir(parents=True, exist_ok=True)
        pre = {**PREPROCESSOR, "max_size": image_size, "patch_stride": patch}
        (path / tower / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (path / "config.json").write_text(json.dumps(release_config(text_config, width, tower), indent=2))
    (path / "generation_config.json").write_text(json.dumps({  # Qwen2.5-Instruct's, which the trainer keeps
        "bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": True, "temperature": 0.7,
        "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}))

    g = torch.Generator().manual_seed(seed)
    shards, size = [{}], 0
    for name, shape in release_shapes(text_config, width, patch, aliases).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = 1 + 0.1 * torch.randn(shape, generator=g)  # norms near 1, as trained ones are
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        t = t.to(dtype)
        if shards[-1] and size + t.numel() * t.element_size() > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    weight_map = {}
    for k, tensors in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return path
