"""The EVEv2 release layout (baaivision/EVE, folder EVEv2; BAAI/EVE-7B-HD-v2.0): its config
fields and weight names, and how each maps to EVE-kit's EVEv2 (eve.convert_v2 uses it).

Release weight names, and where they go:
  model.vision_tower.patch_embedding.{0,2}.*       -> vision.patch_embedding.{0,2}.*
  model.vision_tower.class_embedding / split_embedding (early code: start_embedding / end_embedding)
                                                   -> vision.class_embedding / split_embedding
  model.layers.N.self_attn.moe_{q,k,v,o}_proj.*    -> language_model.model.layers.N.vision.self_attn.{q,k,v,o}_proj.*
  model.layers.N.moe_{mlp,input_layernorm,post_attention_layernorm}.*
                                                   -> language_model.model.layers.N.vision.{...}.*
  model.embed_tokens / layers / norm, lm_head      -> language_model.model.*, language_model.lm_head
  model.layers.N.self_attn.rotary_emb.inv_freq     -> checked against the config's RoPE, not stored
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from eve.configuration_eve import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from eve.reference_layout import (
    MODEL_PREFIXES,
    ROTARY_BUFFER,
    ConversionError,
    check_known_fields,
    map_key,
    mm_vision_tower,
    tower_preprocessor,
)

# config.json's model_type -> family. The release's Llama-3 variant is not converted: its
# attention code was not checked against EVE-kit's experts.
V1_MODEL_TYPES = {"eve"}
EVE2_MODEL_TYPES = {"eve-qwen2"}
REFUSED_MODEL_TYPES = {
    "eve-llama3": "EVEv2 on Llama-3 is not supported by eve-convert (only eve-qwen2 releases)",
    "eve2": "this is already an EVE-kit EVEv2 checkpoint (eve-convert --to reference writes EVE v1 only)",
}

# EVEv2 has no projector: the patch embedding's second convolution writes the decoder's width.
EVE2_PREFIXES = [(src, dst) for src, dst in MODEL_PREFIXES if dst != "vision.projector."]
# The early code's names for <CLS> and the row-end token.
ALIASES = {
    "model.vision_tower.start_embedding": "model.vision_tower.class_embedding",
    "model.vision_tower.end_embedding": "model.vision_tower.split_embedding",
}
# One rule for every expert: `moe_` before a part's name, under self_attn for q/k/v/o.
EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn\.)?moe_(.+)")
EXPERT_NAME = re.compile(r"language_model\.model\.layers\.(\d+)\.vision\.(self_attn\.)?(.+)")

# Fields passed to transformers' Qwen2Config (RoPE as `rope_parameters`, see llama_fields).
QWEN2_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id",
    "tie_word_embeddings", "use_cache", "use_sliding_window", "sliding_window", "max_window_layers",
}
# Read by the converter itself (geometry, width), or bookkeeping of the training run.
EVE2_FIELDS = {"mm_vision_tower", "mm_hidden_size"}
IGNORED_FIELDS = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "tune_VE", "tune_LLM", "tune_MOE", "vision_tower_lr",
}
# Settings EVE-kit represents at one value only: (field, required value, why).
FIXED_FIELDS = [
    ("add_moe", True, "EVE-kit converts EVEv2 with its modality experts, as released"),
    ("moe_part", "layernorm-self_attn-mlp", "EVE-kit's experts copy every layer's norms, attention and MLP"),
    ("use_sliding_window", False, "the release's attention (sdpa) never applies a sliding window; transformers' would"),
    ("rope_scaling", None, "the release's Qwen2 code ignores rope_scaling (plain RoPE); transformers' would apply it"),
]
REQUIRED_FIELDS = ("add_moe", "moe_part")

# The vision tower's geometry when no preprocessor_config.json is at hand (the 1600-px release).
TOWER_NAME = re.compile(r"res(\d+)-patch(\d+)")
DEFAULT_IMAGE_SIZE, DEFAULT_PATCH = 1600, 16


def release_family(cfg: dict, path: Path) -> str:
    """'eve' (v1 release) or 'eve2' (EVEv2 release) by config.json's model_type."""
    model_type = cfg.get("model_type", "eve")  # the v1 converter never required one
    if model_type in V1_MODEL_TYPES:
        return "eve"
    if model_type in EVE2_MODEL_TYPES:
        return "eve2"
    why = REFUSED_MODEL_TYPES.get(model_type, f"known: {sorted(V1_MODEL_TYPES | EVE2_MODEL_TYPES)}")
    raise ConversionError(f"{path}: model_type {model_type!r} is not a release eve-convert converts ({why})")


def check_eve2_fields(cfg: dict, ignore: set[str] = frozenset()) -> None:
    """Refuse settings EVE-kit cannot represent, and fields it does not know."""
    missing = [f for f in REQUIRED_FIELDS if f not in cfg]
    if missing:
        raise ConversionError(f"config.json: {missing} missing: the release's code cannot build this model either")
    check_known_fields(cfg, QWEN2_FIELDS | EVE2_FIELDS | IGNORED_FIELDS, FIXED_FIELDS, ignore)


def classify_eve2_key(key: str) -> tuple[str, str | None]:
    """('model', EVE-kit name) or ('rotary', None); raises for anything else."""
    if ROTARY_BUFFER.fullmatch(key):
        return "rotary", None
    key = ALIASES.get(key, key)
    m = EXPERT_KEY.fullmatch(key)
    name = f"language_model.model.layers.{m[1]}.vision.{m[2] or ''}{m[3]}" if m else map_key(key, EVE2_PREFIXES)
    if name is None:
        raise ConversionError(f"weight {key!r} has no place in EVE-kit's EVEv2 (not a decoder, expert or vision-tower key)")
    return "model", name


def release_key(name: str) -> str:
    """The release's name of an EVE-kit EVEv2 weight (for errors that name what is missing)."""
    m = EXPERT_NAME.fullmatch(name)
    if m:
        return f"model.layers.{m[1]}.{m[2] or ''}moe_{m[3]}"
    return map_key(name, EVE2_PREFIXES, reverse=True) or name


def eve2_geometry(cfg: dict, src: Path) -> dict:
    """Patch size, image size (the area rule's target) and normalisation of `mm_vision_tower`:
    from its preprocessor_config.json when at hand, else from its name
    (`eve-anyratio-res1600-patch16`), else the 1600-px release's; `source` says which."""
    tower = mm_vision_tower(cfg)
    pre = tower_preprocessor(tower, src)
    if pre is not None:
        return _geometry_from_preprocessor(pre)
    m = TOWER_NAME.search(Path(tower).name)
    size, patch, source = (int(m[1]), int(m[2]), f"name {tower!r}") if m else (
        DEFAULT_IMAGE_SIZE, DEFAULT_PATCH, f"defaults (no preprocessor_config.json for {tower!r}, name not res<N>-patch<P>)")
    return {"image_size": size, "patch_size": patch, "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD), "source": source}


def _geometry_from_preprocessor(path: Path) -> dict:
    try:
        pre = json.loads(path.read_text())
        geometry = {
            "image_size": int(pre["max_size"]), "patch_size": int(pre["patch_stride"]),
            "image_mean": [float(x) for x in pre.get("image_mean", OPENAI_CLIP_MEAN)],
            "image_std": [float(x) for x in pre.get("image_std", OPENAI_CLIP_STD)], "source": str(path),
        }
        dense, factor = int(pre.get("dense_stride", 2)), float(pre.get("rescale_factor", 1 / 255))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{path}: not an EVEv2 preprocessor config ({type(e).__name__}: {e})") from e
    if dense != 2:
        raise ConversionError(f"{path}: dense_stride {dense}: EVE-kit's second convolution is 2 x 2")
    if pre.get("do_normalize", True) is not True or pre.get("do_rescale", True) is not True or abs(factor - 1 / 255) > 1e-9:
        raise ConversionError(f"{path}: EVE-kit rescales by 1/255 and normalises, as CLIP's processor does by default")
    return geometry
