"""eve-convert: EVE checkpoints in the reference code's layout (BAAI/EVE-7B-v1.0, BAAI/EVE-7B-HD-v1.0)
to EVE-kit checkpoints, and back; and EVEv2 releases (BAAI/EVE-7B-HD-v2.0) to EVE-kit's EVEv2.

    hf download BAAI/EVE-7B-HD-v1.0 --local-dir EVE-7B-HD-v1.0
    eve-convert EVE-7B-HD-v1.0 eve-7b-hd                      # then from_pretrained("eve-7b-hd")
    eve-convert EVE-7B-HD-v2.0 eve2-7b-hd                     # EVEv2 (eve.convert_v2)
    eve-convert --to reference runs/stage3/final eve-ref     # for the reference's own scripts (v1 only)

The release family comes from SRC's config.json: model_type "eve" is EVE v1, "eve-qwen2" EVEv2
(its vision experts become EVE-kit's modality experts; no PAL, so no --teacher).

Every weight is mapped (eve.reference_layout, eve.reference_layout_v2), or the conversion stops
naming it; shapes and config values are checked against the EveConfig (Eve2Config) they imply
before anything is written. The v1 PAL's weights go to a side file (`pal.safetensors`) that eve-train picks up when it continues
with PAL on; the reference's copies of the CLIP teacher are dropped (EVE-kit loads the teacher
through open_clip). Weights stream tensor by tensor into safetensors shards (5 GB by default) in
their source dtype, so memory stays bounded by a shard; `.bin` files load only with
`torch.load(weights_only=True)`. The output appears atomically: an interrupted run leaves only
a hidden `.NAME.converting` folder, which the next run replaces.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import eve  # noqa: F401  (Auto classes)
from eve.configuration_eve import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EveConfig
from eve.modeling_eve import EveForCausalLM
from eve.patch_aligning import PAL_WEIGHTS_NAME, PatchAligningLayer
from eve.processing_eve import IMAGE_TOKEN, EveImageProcessor, EveProcessor, add_image_token
from eve.reference_layout import (
    LLAMA_FIELDS,
    MODEL_PREFIXES,
    PAL_PREFIXES,
    TEACHERS,
    ConversionError,
    check_fields,
    check_rotary,
    classify_reference_key,
    llama_fields,
    map_key,
    teacher_of,
    vision_tower_geometry,
)
from eve.shards import ShardWriter, TensorRef, checkpoint_files, read_safetensors_header, source_tensors

PAL_FILE = PAL_WEIGHTS_NAME
RECORD_FILE = "conversion.json"
DEFAULT_MAX_SHARD = 5 * 10**9  # transformers' "5GB"
REFERENCE_HEADS = 8  # the reference hard-codes 8 heads in CA1, CA2 and CA3
REFERENCE_TAP_EVERY = 4  # ... and a PAL tap every 4 decoder layers


def convert_reference_to_eve(
    src: str | Path,
    out: str | Path,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    teacher: str | None = None,
    teacher_pretrained: str | None = None,
    ignore_config_keys: tuple[str, ...] = (),
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint folder in the released layout into an EVE-kit checkpoint at `out`."""
    src, out = Path(src), Path(out)
    cfg = _read_json(src / "config.json", f"{src} is not a checkpoint folder; download one first, e.g. "
                     f"`hf download BAAI/EVE-7B-v1.0 --local-dir {src}`")
    check_fields(cfg, set(ignore_config_keys))
    geometry = vision_tower_geometry(cfg, src)
    teacher_name, teacher_tag = (teacher, teacher_pretrained) if teacher else teacher_of(cfg)

    refs = source_tensors(checkpoint_files(src))
    parts: dict[str, dict[str, TensorRef]] = {"model": {}, "pal": {}, "teacher": {}, "rotary": {}}
    for key, ref in refs.items():
        kind, name = classify_reference_key(key)
        parts[kind][name or key] = ref

    tokenizer = _reference_tokenizer(src, cfg)
    config = _eve_config(cfg, geometry, parts, teacher_name, teacher_tag, add_image_token(tokenizer))
    image_processor = EveImageProcessor.from_config(config)
    image_processor.canvas_fill = [int(255 * m) for m in geometry["image_mean"]]  # as the reference pads
    processor = EveProcessor(image_processor, tokenizer, split_at_images=True)

    with torch.device("meta"):
        expected = _shapes(EveForCausalLM(config))
        pal_expected = _shapes(PatchAligningLayer(config)) if parts["pal"] else {}
    if config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)
    _check_shapes(parts["model"], expected, "EVE-kit's model")
    _check_shapes(parts["pal"], pal_expected, "EVE-kit's PAL")
    for name, ref in parts["rotary"].items():
        check_rotary(name, _tensor(ref), config.text_config)

    dtypes = Counter(ref.dtype for ref in parts["model"].values() if ref.dtype.is_floating_point)
    config.dtype = dtypes.most_common(1)[0][0] if dtypes else torch.float32
    config.architectures = ["EveForCausalLM"]
    tmp = _fresh_tmp(out, overwrite)
    _write(tmp, parts["model"], max_shard_size, "model", f"{src.name} -> {out.name}")
    if parts["pal"]:
        _write(tmp, parts["pal"], max_shard_size * 1000, "pal", "PAL side file")
    config.save_pretrained(tmp)
    _generation_config(src, config).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if (src / "tokenizer.model").is_file():  # kept so that --to reference can give the slow tokenizer back
        shutil.copy(src / "tokenizer.model", tmp / "tokenizer.model")
    record = {
        "from": "reference", "source": str(src.resolve()), "weights": len(parts["model"]), "pal_weights": len(parts["pal"]),
        "dropped_teacher_weights": len(parts["teacher"]), "checked_rotary_buffers": len(parts["rotary"]),
        "geometry_from": geometry["source"], "teacher": [teacher_name, teacher_tag],
        # for --to reference, which gives the reference its slow tokenizer back as it was
        "reference_tokenizer_config": _read_json(src / "tokenizer_config.json", "") if (src / "tokenizer_config.json").is_file() else None,
    }
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(out)
    return out


def convert_eve_to_reference(
    src: str | Path, out: str | Path, max_shard_size: int = DEFAULT_MAX_SHARD, overwrite: bool = False
) -> Path:
    """Write an EVE-kit checkpoint in the reference's layout (config fields, weight names,
    tokenizer without `<image>`, and its vision tower's preprocessor_config.json)."""
    src, out = Path(src), Path(out)
    config = EveConfig.from_pretrained(src)
    _check_representable(config)
    model_refs = {}
    for key, ref in source_tensors(checkpoint_files(src)).items():
        name = map_key(key, MODEL_PREFIXES, reverse=True)
        if name is None:
            raise ConversionError(f"weight {key!r} has no place in the reference's layout")
        model_refs[name] = ref
    if (src / PAL_FILE).is_file():
        if config.pal_layers is not None or config.pal_tap_every != REFERENCE_TAP_EVERY:
            raise ConversionError(f"{src / PAL_FILE}: the reference taps every {REFERENCE_TAP_EVERY} layers; this PAL "
                                  f"taps {config.pal_tap_layers} (move the file away to convert the model alone)")
        for key, ref in read_safetensors_header(src / PAL_FILE).items():
            name = map_key(key, PAL_PREFIXES, reverse=True)
            if name is None:
                raise ConversionError(f"{src / PAL_FILE}: weight {key!r} has no place in the reference's PAL")
            model_refs[name] = ref

    tmp = _fresh_tmp(out, overwrite)
    _write(tmp, model_refs, max_shard_size, "model", f"{src.name} -> {out.name}")
    tower = tmp / f"eve-patch{config.patch_size}-anypixel-{config.image_size}"
    tower.mkdir()
    (tower / "preprocessor_config.json").write_text(json.dumps(_reference_preprocessor(config, src), indent=2) + "\n")
    ref_cfg = _reference_config(config, out.resolve() / tower.name)
    (tmp / "config.json").write_text(json.dumps(ref_cfg, indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", tmp / "generation_config.json")
    _reference_tokenizer_files(src, tmp)
    tmp.rename(out)
    return out


# ---- reference -> EVE-kit -------------------------------------------------------------------


def _read_json(path: Path, missing: str) -> dict:
    if not path.is_file():
        raise ConversionError(missing)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return data


def _reference_tokenizer(src: Path, cfg: dict):
    from transformers import AutoTokenizer, LlamaConfig

    try:  # the decoder's config, not config.json: its model_type "eve" is the reference's, not EVE-kit's
        tokenizer = AutoTokenizer.from_pretrained(src, config=LlamaConfig(**llama_fields(cfg)))
    except Exception as e:  # noqa: BLE001 - name the folder whatever the tokenizer library raised
        raise ConversionError(f"{src}: the tokenizer does not load ({type(e).__name__}: {e})") from e
    if tokenizer.pad_token is None:  # Vicuna has none; the reference pads with <unk> (id 0)
        tokenizer.pad_token = tokenizer.unk_token
    if (src / "tokenizer.model").is_file():
        tokenizer = _sentencepiece_semantics(tokenizer)
    return tokenizer


def _sentencepiece_semantics(tokenizer):
    """The reference tokenized with the slow SentencePiece LlamaTokenizer, which gives every text
    it encodes a leading "▁" (the dummy prefix), even one that starts with a space.
    transformers 5 rebuilds LlamaTokenizer with a Metaspace pre-tokenizer that skips the prefix
    before a leading space (" two" -> [▁two], not [▁, ▁two]), and does so again on every load.
    The same vocabulary and merges behind a normaliser that always prepends, saved as a plain
    tokenizers backend, encode as SentencePiece does and stay that way when reloaded."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token, pad_token=tokenizer.pad_token, model_max_length=tokenizer.model_max_length,
    )


def _eve_config(cfg: dict, geometry: dict, parts: dict, teacher: str, teacher_tag: str | None, image_token_id: int) -> EveConfig:
    from transformers import LlamaConfig

    conv = parts["model"].get("vision.patch_embedding.weight")
    if conv is None:
        raise ConversionError("no model.vision_tower.patch_embedding.weight: not an EVE checkpoint")
    width = int(cfg.get("mm_hidden_size", conv.shape[0]))
    if conv.shape != (width, 3, geometry["patch_size"], geometry["patch_size"]):
        raise ConversionError(
            f"model.vision_tower.patch_embedding.weight has shape {list(conv.shape)}, but mm_hidden_size {width} and a "
            f"{geometry['patch_size']}-px patch ({geometry['source']}) need {[width, 3, geometry['patch_size'], geometry['patch_size']]}"
        )
    pal_width = parts["pal"]["input_proj.weight"].shape[0] if "input_proj.weight" in parts["pal"] else width
    if pal_width != width:
        # CA1/CA2 scale by width**-0.5 and CA3 by teacher_width**-0.5; EVE-kit has one scale for all three.
        raise ConversionError(f"the PAL's teacher width {pal_width} differs from mm_hidden_size {width}: not representable")
    try:
        text_config = LlamaConfig(**llama_fields(cfg))
        return EveConfig(
            text_config=text_config, vision_hidden_size=width, patch_size=geometry["patch_size"],
            image_size=geometry["image_size"], teacher_image_size=geometry["teacher_image_size"],
            teacher_patch_size=geometry["teacher_patch_size"], cross_attention_heads=REFERENCE_HEADS,
            cross_attention_scale=width**-0.5, image_token_id=image_token_id, image_mean=geometry["image_mean"],
            image_std=geometry["image_std"], pal_tap_every=REFERENCE_TAP_EVERY, teacher_model=teacher,
            teacher_pretrained=teacher_tag, teacher_hidden_size=pal_width, teacher_image_mean=OPENAI_CLIP_MEAN,
            teacher_image_std=OPENAI_CLIP_STD,
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json does not make a valid EveConfig: {e}") from e


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _check_shapes(refs: dict[str, TensorRef], expected: dict[str, tuple[int, ...]], what: str) -> None:
    for name, ref in refs.items():
        if name not in expected:
            raise ConversionError(f"weight {ref.name!r} maps to {name!r}, which {what} does not have")
        if tuple(ref.shape) != expected[name]:
            raise ConversionError(f"weight {ref.name!r} has shape {list(ref.shape)}; {what} needs {list(expected[name])} for {name!r}")
    missing = sorted(set(expected) - set(refs))
    if missing:
        raise ConversionError(f"the checkpoint lacks weight(s) {what} needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _tensor(ref: TensorRef) -> torch.Tensor:
    data = ref.read()
    if isinstance(data, torch.Tensor):
        return data
    return torch.frombuffer(bytearray(data), dtype=ref.dtype).reshape(ref.shape)


def _generation_config(src: Path, config: EveConfig):
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(src)
    return GenerationConfig.from_model_config(config.text_config)


# ---- shared -----------------------------------------------------------------------------------


def _fresh_tmp(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    elif out.exists():
        out.rmdir()
    tmp = out.parent / f".{out.name}.converting"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    tmp.mkdir(parents=True)
    return tmp


def _write(tmp: Path, refs: dict[str, TensorRef], max_shard: int, prefix: str, desc: str) -> None:
    """Stream `refs` ({output name: source tensor}) into shards, in source-file order."""
    files = list(dict.fromkeys(ref.file for ref in refs.values()))
    ordered = sorted(refs.items(), key=lambda kv: (files.index(kv[1].file), kv[0]))
    writer = ShardWriter(tmp, max_shard, prefix)
    entries = [(name, ref.dtype, ref.shape, ref.nbytes) for name, ref in ordered]
    with tqdm(total=sum(e[3] for e in entries), unit="B", unit_scale=True, desc=desc) as bar:
        for group in writer.plan(entries):
            writer.write_shard([entries[i][:3] for i in group], (_take(ordered[i][1], bar) for i in group))
    writer.finish()


def _take(ref: TensorRef, bar) -> bytes | torch.Tensor:
    """Read a tensor once and let go of the source (a .bin's pages are released with its last tensor)."""
    data = ref.read()
    ref._read = None
    bar.update(ref.nbytes)
    return data


# ---- EVE-kit -> reference -------------------------------------------------------------------


def _check_representable(config: EveConfig) -> None:
    """What the reference hard-codes; anything else cannot run in its scripts."""
    width = config.vision_hidden_size
    problems = []
    if getattr(config.text_config, "model_type", None) != "llama":
        problems.append(f"the decoder is {config.text_config.model_type!r}; the reference runs LLaMA decoders only")
    if config.cross_attention_heads != REFERENCE_HEADS:
        problems.append(f"cross_attention_heads {config.cross_attention_heads} (the reference uses {REFERENCE_HEADS})")
    scale = config.cross_attention_scale
    if scale is None or not math.isclose(scale, width**-0.5, rel_tol=1e-6):
        problems.append(f"cross_attention_scale {scale} (the reference uses vision_hidden_size**-0.5 = {width**-0.5:.6g})")
    if config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act {config.projector_hidden_act!r} (the reference uses GELU)")
    if not math.isclose(config.layer_norm_eps, 1e-5):
        problems.append(f"layer_norm_eps {config.layer_norm_eps} (the reference uses 1e-5)")
    if problems:
        raise ConversionError("the model cannot be written in the reference's layout: " + "; ".join(problems))


def _reference_config(config: EveConfig, tower: Path) -> dict:
    text = config.text_config.to_dict()
    rope = text.get("rope_parameters") or {}
    ref = {k: v for k, v in text.items() if k in LLAMA_FIELDS}
    ref["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    ref["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    names = {v: f"openai/{k}" for k, v in TEACHERS.items()}
    ref.update(
        architectures=["EVELlamaForCausalLM"], model_type="eve", torch_dtype=str(config.dtype).replace("torch.", ""),
        mm_vision_tower=str(tower), mm_hidden_size=config.vision_hidden_size, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, use_mm_proj=True, tune_mm_mlp_adapter=False, image_aspect_ratio="pad",
        mm_vision_tower_clip=names.get((config.teacher_model, config.teacher_pretrained), config.teacher_model),
        # True would make the reference build its CLIP teacher at load time from mm_vision_tower_clip.
        requires_cliploss=False,
    )
    return ref


def _reference_preprocessor(config: EveConfig, src: Path) -> dict:
    """The reference's CLIPImageProcessor config with its EVE geometry fields."""
    side = config.image_size
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": side},
        "do_center_crop": True, "crop_size": {"height": side, "width": side}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(config.image_mean),
        "image_std": list(config.image_std), "do_convert_rgb": True, "resample": 3, "image_size": side,
        "patch_stride": config.patch_size, "conv_stride": 2, "image_size_clip": config.teacher_image_size,
        "patch_stride_clip": config.teacher_patch_size,
    }


def _reference_tokenizer_files(src: Path, tmp: Path) -> None:
    """The tokenizer as the reference knows it: EVE-kit's `<image>` token removed (the reference
    resizes the embeddings to len(tokenizer), so an extra token would change the model)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tok_json = tmp / "tokenizer.json"
    if tok_json.is_file():
        data = json.loads(tok_json.read_text())
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("content") != IMAGE_TOKEN]
        tok_json.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    tok_cfg = tmp / "tokenizer_config.json"
    data = json.loads(tok_cfg.read_text())
    decoder = data.get("added_tokens_decoder", {})
    data["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v.get("content") != IMAGE_TOKEN}
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if isinstance(data.get(key), list):
            data[key] = [t for t in data[key] if (t.get("content") if isinstance(t, dict) else t) != IMAGE_TOKEN]
    data.pop("processor_class", None)
    if (src / "tokenizer.model").is_file():  # the reference loads the slow SentencePiece tokenizer (use_fast=False)
        shutil.copy(src / "tokenizer.model", tmp / "tokenizer.model")
        record = json.loads((src / RECORD_FILE).read_text()) if (src / RECORD_FILE).is_file() else {}
        data = record.get("reference_tokenizer_config") or {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            "bos_token": data.get("bos_token", "<s>"), "eos_token": data.get("eos_token", "</s>"),
            "unk_token": data.get("unk_token", "<unk>"), "pad_token": None, "padding_side": "right",
            "model_max_length": data.get("model_max_length", 2048), "clean_up_tokenization_spaces": False,
        }
    tok_cfg.write_text(json.dumps(data, ensure_ascii=False, indent=2))


# ---- CLI ------------------------------------------------------------------------------------


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eve-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint folder to convert")
    parser.add_argument("out", type=Path, help="output folder (must not exist, or be empty, unless --overwrite)")
    parser.add_argument("--to", choices=["eve-kit", "reference"], default="eve-kit",
                        help="eve-kit: SRC is a release, EVE v1 or EVEv2 by its model_type (default); reference: SRC is an EVE-kit EVE v1 checkpoint")
    parser.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD, help="largest output shard (default 5GB)")
    parser.add_argument("--teacher", help="open_clip name (or local dir) of the PAL teacher, when mm_vision_tower_clip is not one EVE-kit knows")
    parser.add_argument("--teacher-pretrained", help="open_clip pretrained tag or file for --teacher")
    parser.add_argument("--ignore-config-key", action="append", default=[], metavar="NAME",
                        help="a config.json field you have checked is harmless (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    from eve.convert_v2 import convert_eve2_release, detect_family  # eve.convert_v2 builds on this module

    try:
        family = detect_family(args.src)
        if args.to == "reference":
            if family != "eve":
                raise ConversionError(f"{args.src} is an EVEv2 release already; --to reference takes an EVE-kit EVE v1 checkpoint")
            out = convert_eve_to_reference(args.src, args.out, args.max_shard_size, args.overwrite)
        elif family == "eve2":
            if args.teacher or args.teacher_pretrained:
                raise ConversionError("--teacher/--teacher-pretrained are for EVE v1 releases (EVEv2 has no PAL)")
            out = convert_eve2_release(args.src, args.out, args.max_shard_size, tuple(args.ignore_config_key), args.overwrite)
        else:
            out = convert_reference_to_eve(args.src, args.out, args.max_shard_size, args.teacher, args.teacher_pretrained,
                                           tuple(args.ignore_config_key), args.overwrite)
    except (ConversionError, ValueError, OSError) as e:
        parser.exit(2, f"eve-convert: error: {e}\n")
    print(f"eve-convert: wrote {out}")


if __name__ == "__main__":
    main()
