"""The EVE reference code's checkpoint layout (baaivision/EVE, EVEv1), as released on the hub
(BAAI/EVE-7B-v1.0, BAAI/EVE-7B-HD-v1.0): its config fields and weight names, and how each maps
to EVE-kit's. One table serves both directions (eve.convert uses it).

Reference weight names, and where they go:
  model.embed_tokens / layers / norm, lm_head   -> language_model.model.*, language_model.lm_head
  model.vision_tower.*                          -> vision.*  (PEL: conv, CA1, CA2, <CLS>, <SPL>)
  model.mm_projector.{0,2}                      -> vision.projector.{0,2}
  model.vision_tower_compressor.{norm_layer, input_layer, output_layer}
                                                -> the PAL side file (tap_norms, input_proj, output_proj)
  model.vision_clip.*, ...compressor.clip_layer.* -> dropped: copies of the frozen CLIP teacher,
                                                   which EVE-kit loads through open_clip
  model.layers.N.self_attn.rotary_emb.inv_freq  -> checked against the config's RoPE, not stored
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from eve.configuration_eve import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from eve.shards import CheckpointError


class ConversionError(CheckpointError):
    """A checkpoint, key or setting that the conversion cannot represent faithfully."""


# (reference prefix, EVE-kit prefix) for the inference model; matched longest first.
MODEL_PREFIXES = [
    ("lm_head.", "language_model.lm_head."),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("model.mm_projector.", "vision.projector."),
    ("model.vision_tower.", "vision."),
]
# The PAL (the reference's VisionCompressor), kept in a side file with PatchAligningLayer's names.
PAL_PREFIXES = [
    ("model.vision_tower_compressor.norm_layer.", "tap_norms."),
    ("model.vision_tower_compressor.input_layer.", "input_proj."),
    ("model.vision_tower_compressor.output_layer.", "output_proj."),
]
TEACHER_PREFIXES = ("model.vision_clip.", "model.vision_tower_compressor.clip_layer.")
ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# The reference's CLIP teachers (`mm_vision_tower_clip`, by folder name) as open_clip models.
TEACHERS = {
    "clip-vit-large-patch14-336": ("ViT-L-14-336", "openai"),
    "eva02-clip-l-14-336": ("EVA02-L-14-336", "merged2b_s6b_b61k"),
}
REFERENCE_TEACHER = "openai/clip-vit-large-patch14-336"

# Fields of the released config.json, by what the converter does with them.
LLAMA_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "use_cache",
}
# Bookkeeping of the reference's training run: no effect on the model's arithmetic.
IGNORED_FIELDS = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tune_vision_tower", "use_mm_proj", "mm_projector_lr",
    "vision_tower_lr", "image_aspect_ratio", "image_grid_pinpoints", "mm_patch_merge_type",
    "tokenizer_padding_side", "tokenizer_model_max_length", "max_sequence_length", "requires_cliploss",
    "mm_vision_tower_clip", "mm_vision_tower", "mm_hidden_size",
}
# Settings EVE-kit can represent only at one value: (field, required value, why).
FIXED_FIELDS = [
    ("mm_projector_type", "mlp2x_gelu", "EVE-kit's projector is Linear-GELU-Linear"),
    ("mm_use_im_start_end", False, "image start/end tokens are not part of EVE-kit's splice"),
    ("mm_use_im_patch_token", False, "an <im_patch> token would change the vocabulary"),
    ("mm_vision_select_layer", -2, "the teacher targets are the penultimate layer"),
    ("mm_vision_select_feature", "patch", "the teacher targets are patch tokens without CLS"),
    ("pretraining_tp", 1, "tensor-parallel slicing of the MLP is not modelled"),
]


def map_key(key: str, prefixes: list[tuple[str, str]], reverse: bool = False) -> str | None:
    """`key` under the first (longest) matching prefix pair, or None."""
    pairs = sorted(((b, a) if reverse else (a, b) for a, b in prefixes), key=lambda p: -len(p[0]))
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def classify_reference_key(key: str) -> tuple[str, str | None]:
    """('model' | 'pal', EVE-kit name), ('teacher' | 'rotary', None); raises for anything else."""
    if key.startswith(TEACHER_PREFIXES):
        return "teacher", None
    if ROTARY_BUFFER.fullmatch(key):
        return "rotary", None
    for kind, prefixes in (("pal", PAL_PREFIXES), ("model", MODEL_PREFIXES)):
        name = map_key(key, prefixes)
        if name is not None:
            return kind, name
    raise ConversionError(f"weight {key!r} has no place in EVE-kit's layout (not a decoder, PEL, projector, PAL or teacher key)")


def vision_tower_geometry(cfg: dict, src: Path) -> dict:
    """Image geometry of the reference's `mm_vision_tower` preprocessor: from its
    preprocessor_config.json when that folder is at hand (absolute, or relative to the
    checkpoint), else from the folder name (`eve-patch14-anypixel-672`)."""
    tower = mm_vision_tower(cfg)
    pre = tower_preprocessor(tower, src)
    if pre is not None:
        return _geometry_from_preprocessor(json.loads(pre.read_text()), pre)
    m = re.search(r"patch(\d+)-anypixel-(\d+)", Path(tower).name)
    if not m:
        raise ConversionError(
            f"config.json: mm_vision_tower {tower!r}: cannot tell the patch and image size (expected a folder "
            "named like eve-patch14-anypixel-672, or its preprocessor_config.json next to the checkpoint)"
        )
    return {"patch_size": int(m[1]), "image_size": int(m[2]), "teacher_image_size": 336, "teacher_patch_size": 14,
            "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "source": f"name {tower!r}"}


def mm_vision_tower(cfg: dict) -> str:
    tower = cfg.get("mm_vision_tower")
    if not isinstance(tower, str) or not tower:
        raise ConversionError("config.json: `mm_vision_tower` is missing: this is not an EVE checkpoint in the released layout")
    return tower


def tower_preprocessor(tower: str, src: Path) -> Path | None:
    """The vision tower's preprocessor_config.json, where the reference's code would find it
    (the name as a path) or beside the checkpoint (the name, or its last part, under `src`)."""
    for folder in (Path(tower), src / tower, src / Path(tower).name):
        if (folder / "preprocessor_config.json").is_file():
            return folder / "preprocessor_config.json"
    return None


def _geometry_from_preprocessor(pre: dict, path: Path) -> dict:
    try:
        conv_stride = int(pre.get("conv_stride", 2))
        geometry = {
            "patch_size": int(pre["patch_stride"]), "image_size": int(pre["image_size"]),
            "teacher_image_size": int(pre["image_size_clip"]), "teacher_patch_size": int(pre["patch_stride_clip"]),
            "image_mean": [float(x) for x in pre.get("image_mean", OPENAI_CLIP_MEAN)],
            "image_std": [float(x) for x in pre.get("image_std", OPENAI_CLIP_STD)], "source": str(path),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{path}: not an EVE preprocessor config ({type(e).__name__}: {e})") from e
    if conv_stride != 2:
        raise ConversionError(f"{path}: conv_stride {conv_stride}: EVE-kit pools the patch grid 2 x 2 only")
    return geometry


def teacher_of(cfg: dict) -> tuple[str, str | None]:
    """open_clip (name, pretrained) of the reference's `mm_vision_tower_clip`."""
    name = str(cfg.get("mm_vision_tower_clip") or REFERENCE_TEACHER)
    key = Path(name).name.lower()
    if key in TEACHERS:
        return TEACHERS[key]
    raise ConversionError(
        f"config.json: mm_vision_tower_clip {name!r} is not a teacher EVE-kit knows ({', '.join(TEACHERS)}); "
        "name its open_clip equivalent with --teacher (and --teacher-pretrained)"
    )


def check_fields(cfg: dict, ignore: set[str] = frozenset()) -> None:
    """Refuse settings EVE-kit cannot represent, and fields it does not know."""
    check_known_fields(cfg, LLAMA_FIELDS | IGNORED_FIELDS, FIXED_FIELDS, ignore)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {cfg['hidden_act']!r}: the reference decoder is a LLaMA (silu)")


def check_known_fields(cfg: dict, known: set[str], fixed: list[tuple[str, object, str]], ignore: set[str] = frozenset()) -> None:
    """Refuse `fixed` fields (field, only value, why) at any other value, and fields neither
    `known`, fixed nor ignored by the user."""
    for field, required, why in fixed:
        if field in cfg and cfg[field] != required:
            raise ConversionError(f"config.json: {field} = {cfg[field]!r} is not supported ({why}; only {required!r})")
    known = known | {f for f, _, _ in fixed} | set(ignore)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConversionError(
            f"config.json: unknown field(s) {unknown}: EVE-kit cannot tell whether it represents them "
            "(pass --ignore-config-key NAME for each one you have checked is harmless)"
        )


def llama_fields(cfg: dict, names: set[str] = LLAMA_FIELDS) -> dict:
    """The decoder config's arguments among `names`; RoPE settings as transformers 5's `rope_parameters`."""
    fields = {k: v for k, v in cfg.items() if k in names and k not in ("rope_theta", "rope_scaling")}
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        if not isinstance(scaling, dict):
            raise ConversionError(f"config.json: rope_scaling {scaling!r} is not a dict")
        rope.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling.get("rope_type", scaling.get("type")))
    fields["rope_parameters"] = rope
    return fields


def check_rotary(name: str, value: torch.Tensor, text_config) -> None:
    """A saved RoPE `inv_freq` buffer must be the one the config implies."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    rope = getattr(text_config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        return  # scaled RoPE: transformers recomputes it from the config; nothing stored to compare
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if value.shape != expected.shape or not torch.allclose(value.double(), expected, rtol=1e-3):
        raise ConversionError(f"weight {name!r}: RoPE frequencies differ from those of rope_theta={theta} (head_dim {head_dim})")
