"""eve-convert for EVEv2 releases (BAAI/EVE-7B-HD-v2.0, model_type "eve-qwen2"); `eve-convert`
picks this path from config.json's model_type.

    hf download BAAI/EVE-7B-HD-v2.0 --local-dir EVE-7B-HD-v2.0
    eve-convert EVE-7B-HD-v2.0 eve2-7b-hd        # then AutoModelForCausalLM.from_pretrained("eve2-7b-hd")

The guarantees of the v1 converter (eve.convert): every weight is mapped
(eve.reference_layout_v2) or the conversion stops naming it; config values and shapes are
checked against the Eve2Config they imply before anything is written; weights stream into
safetensors shards in their source dtype; the output appears atomically. As the release's own
loader does, the embeddings and head keep len(tokenizer) rows (Qwen2.5 pads them to 152064).
The tokenizer gains `<image>` (the release splices at id -200, outside any vocabulary), the
processor splits prompts at images as the release's `tokenizer_image_token` does, and its
default chat template is `eve2_qwen` (the release's `qwen2` conversation).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from eve.configuration_eve2 import Eve2Config
from eve.convert import (
    DEFAULT_MAX_SHARD,
    RECORD_FILE,
    _check_shapes,
    _fresh_tmp,
    _generation_config,
    _read_json,
    _shapes,
    _tensor,
    _write,
)
from eve.modeling_eve2 import Eve2ForCausalLM
from eve.processing_eve import EveImageProcessor, EveProcessor, add_image_token
from eve.reference_layout import ConversionError, check_rotary, llama_fields
from eve.reference_layout_v2 import (
    ALIASES,
    IGNORED_FIELDS,
    QWEN2_FIELDS,
    check_eve2_fields,
    classify_eve2_key,
    eve2_geometry,
    release_family,
    release_key,
)
from eve.shards import TensorRef, checkpoint_files, source_tensors
from eve.templates import chat_templates, get_template

CHAT_TEMPLATE = "eve2_qwen"


def read_release_config(src: Path) -> dict:
    return _read_json(src / "config.json", f"{src} is not a checkpoint folder (no config.json); download one first, "
                      f"e.g. `hf download BAAI/EVE-7B-HD-v2.0 --local-dir {src}`")


def detect_family(src: str | Path) -> str:
    """'eve' or 'eve2': which release layout the folder `src` holds."""
    return release_family(read_release_config(Path(src)), Path(src) / "config.json")


def convert_eve2_release(
    src: str | Path,
    out: str | Path,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    ignore_config_keys: tuple[str, ...] = (),
    overwrite: bool = False,
) -> Path:
    """Convert an EVEv2 release folder into an EVE-kit EVEv2 checkpoint at `out`."""
    src, out = Path(src), Path(out)
    cfg = read_release_config(src)
    if release_family(cfg, src / "config.json") != "eve2":
        raise ConversionError(f"{src}: an EVE v1 release; convert it with eve.convert.convert_reference_to_eve")
    check_eve2_fields(cfg, set(ignore_config_keys))
    geometry = eve2_geometry(cfg, src)

    refs: dict[str, TensorRef] = {}
    rotary: list[TensorRef] = []
    for key, ref in source_tensors(checkpoint_files(src)).items():
        kind, name = classify_eve2_key(key)
        if kind == "rotary":
            rotary.append(ref)
        elif name in refs:  # a key and its alias (class_embedding and start_embedding) both present
            raise ConversionError(f"weights {refs[name].name!r} and {key!r} both map to {name!r}")
        else:
            refs[name] = ref

    tokenizer = _release_tokenizer(src)
    vocab = _vocabulary_rows(cfg, refs, len(tokenizer))
    config = _eve2_config({**cfg, "vocab_size": vocab}, geometry, refs, add_image_token(tokenizer))
    templates = {**chat_templates(), "default": get_template(CHAT_TEMPLATE).jinja()}
    processor = EveProcessor(EveImageProcessor.from_config(config), tokenizer, chat_template=templates, split_at_images=True)

    with torch.device("meta"):
        expected = _shapes(Eve2ForCausalLM(config))
    if config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)
    missing = sorted(set(expected) - set(refs))
    if missing:  # named as the release names them
        raise ConversionError(f"the checkpoint lacks {len(missing)} weight(s) EVEv2 needs: "
                              f"{[release_key(n) for n in missing[:8]]}{' ...' if len(missing) > 8 else ''}")
    _check_shapes(refs, expected, "EVE-kit's EVEv2")
    for ref in rotary:
        check_rotary(ref.name, _tensor(ref), config.text_config)
    generation = _generation_config(src, config)  # read before anything is written: a bad file stops us here

    dtypes = Counter(ref.dtype for ref in refs.values() if ref.dtype.is_floating_point)
    config.dtype = dtypes.most_common(1)[0][0] if dtypes else torch.float32
    config.architectures = ["Eve2ForCausalLM"]
    tmp = _fresh_tmp(out, overwrite)
    _write(tmp, refs, max_shard_size, "model", f"{src.name} -> {out.name}")
    config.save_pretrained(tmp)
    generation.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    record = {
        "from": "eve2-release", "source": str(src.resolve()), "weights": len(refs), "checked_rotary_buffers": len(rotary),
        "aliases": sorted(ref.name for ref in refs.values() if ref.name in ALIASES),
        "geometry_from": geometry["source"], "image_size": config.image_size, "patch_size": config.patch_size,
        "image_token_id": config.image_token_id, "chat_template": CHAT_TEMPLATE,
        "vocab_size": vocab, "dropped_vocabulary_rows": int(cfg.get("vocab_size", vocab)) - vocab,
        "ignored_config_keys": sorted((set(cfg) & IGNORED_FIELDS) | (set(cfg) & set(ignore_config_keys))),
    }
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(out)
    return out


def _release_tokenizer(src: Path):
    from transformers import AutoTokenizer, Qwen2Config

    try:  # a Qwen2 config tells AutoTokenizer the family: config.json's "eve-qwen2" is unknown to transformers
        tokenizer = AutoTokenizer.from_pretrained(src, config=Qwen2Config())
    except Exception as e:  # noqa: BLE001 - name the folder whatever the tokenizer library raised
        raise ConversionError(f"{src}: the tokenizer does not load ({type(e).__name__}: {e})") from e
    return tokenizer  # its ChatML template gives way to the processor's (saved as chat_template.jinja)


def _vocabulary_rows(cfg: dict, refs: dict[str, TensorRef], tokens: int) -> int:
    """The release's inference resizes the embeddings and head to len(tokenizer) (builder.py's
    `resize_token_embeddings`): Qwen2.5's 152064 rows become 151665, so the padding rows can
    never be generated. Those rows are cut here the same way (a row-major prefix), which also
    puts `<image>` just past the vocabulary."""
    rows = int(cfg.get("vocab_size", tokens))
    if tokens > rows:
        raise ConversionError(f"the tokenizer has {tokens} tokens but config.json's vocab_size is {rows}: the release "
                              "would give the extra tokens random embeddings when it loads")
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if name in refs and refs[name].shape[0] == rows > tokens:
            refs[name] = _first_rows(refs[name], tokens)
    return tokens


def _first_rows(ref: TensorRef, n: int) -> TensorRef:
    def read():
        data = ref.read()
        return data[:n] if isinstance(data, torch.Tensor) else data[: n * (len(data) // ref.shape[0])]

    return TensorRef(ref.name, ref.dtype, (n, *ref.shape[1:]), ref.file, read)


def _eve2_config(cfg: dict, geometry: dict, refs: dict[str, TensorRef], image_token_id: int) -> Eve2Config:
    from transformers import Qwen2Config

    conv = refs.get("vision.patch_embedding.0.weight")
    if conv is None:
        raise ConversionError("no model.vision_tower.patch_embedding.0.weight: not an EVEv2 checkpoint")
    width, p = int(cfg.get("mm_hidden_size", conv.shape[0])), geometry["patch_size"]
    if conv.shape != (width, 3, p, p):
        raise ConversionError(f"model.vision_tower.patch_embedding.0.weight has shape {list(conv.shape)}, but mm_hidden_size "
                              f"{width} and a {p}-px patch ({geometry['source']}) need {[width, 3, p, p]}")
    try:
        return Eve2Config(
            text_config=Qwen2Config(**llama_fields(cfg, QWEN2_FIELDS)), vision_hidden_size=width, patch_size=p,
            image_size=geometry["image_size"], image_token_id=image_token_id, image_mean=geometry["image_mean"],
            image_std=geometry["image_std"], modality_experts=True,
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json does not make a valid Eve2Config: {e}") from e
