"""eve-convert on tiny EVEv2 releases: logits and greedy tokens equal to the release's arithmetic
written out here from its code (VisionTokenizer, moe_function, Qwen2 layers, process_images,
tokenizer_image_token), every key mapped bit for bit in its dtype, the refusals naming what they
refuse, the CLI's dispatch by model_type, and an interrupted run that leaves no output folder."""

from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from eve.convert import main
from eve.convert_v2 import convert_eve2_release
from eve.reference_layout import ConversionError
from eve.reference_layout_v2 import eve2_geometry
from eve.testing_reference_v2 import write_eve2_release
from tests.conftest import random_image

PATCH, IMAGE_SIZE, TOKENS = 8, 64, 400  # the tiny release's patch, area target and tokenizer length
MEAN, STD = np.float32([0.48145466, 0.4578275, 0.40821073]), np.float32([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_eve2_release(tmp_path_factory.mktemp("rel") / "EVE-tiny-v2")


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    return convert_eve2_release(release, tmp_path_factory.mktemp("conv") / "eve2-tiny", max_shard_size=300_000)


@pytest.fixture(scope="module")
def loaded(converted):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(converted, attn_implementation="sdpa")
    return model.eval(), AutoProcessor.from_pretrained(converted)


def tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def release_pixels(image, max_size=IMAGE_SIZE, patch=PATCH) -> torch.Tensor:
    """The release's process_images: area rule, PIL's default (bicubic) resize, CLIP normalisation."""
    W, H = image.size
    r, unit = math.sqrt(W * H) / max_size, 2 * patch
    w, h = (max(math.ceil(n / r / unit) * unit, unit) for n in (W, H))
    arr = np.asarray(image.resize((w, h)), dtype=np.float32) / 255
    return torch.from_numpy(((arr - MEAN) / STD).transpose(2, 0, 1).copy())


def release_visual_tokens(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """VisionTokenizer.forward on one image [3, H, W]: <CLS>, then each row followed by <SPL>."""
    t = lambda k: sd[f"model.vision_tower.{k}"]  # noqa: E731
    x = F.gelu(F.conv2d(pixels[None], t("patch_embedding.0.weight"), t("patch_embedding.0.bias"), stride=PATCH))
    x = F.conv2d(x, t("patch_embedding.2.weight"), t("patch_embedding.2.bias"), stride=2)[0]  # [d, h, w]
    x = torch.cat([x, t("split_embedding")[:, None, None].expand(-1, x.shape[1], 1)], dim=-1)
    return torch.cat([t("class_embedding")[None], x.flatten(1).T])


def release_logits(sd: dict, cfg: dict, ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """EVEQwen2ForCausalLM on one sequence whose image positions (ids == -200) hold `visual`,
    with its embeddings and head resized to the tokenizer's length as its loader does."""
    d, H, Hkv, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    hd, L, image = d // H, ids.shape[0], ids == -200
    m = image[:, None].float()  # the release's visual_token_mask
    x = sd["model.embed_tokens.weight"][ids.clamp(min=0)]
    x[image] = visual
    angles = torch.outer(torch.arange(L).float(), 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

    def norm(t, name):
        return sd[name + ".weight"] * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))

    def lin(t, name):
        return F.linear(t, sd[name + ".weight"], sd.get(name + ".bias"))

    def mlp(t, name):
        return lin(F.silu(lin(t, name + ".gate_proj")) * lin(t, name + ".up_proj"), name + ".down_proj")

    def moe(t, text, vision, fn):  # the release's moe_function
        return fn(t, text) * (1 - m) + fn(t, vision) * m

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = moe(x, p + "input_layernorm", p + "moe_input_layernorm", norm)
        q, k, v = (moe(h, f"{p}self_attn.{n}_proj", f"{p}self_attn.moe_{n}_proj", lin).view(L, -1, hd).transpose(0, 1)
                   for n in "qkv")
        k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True).transpose(0, 1).reshape(L, d)
        x = x + moe(a, p + "self_attn.o_proj", p + "self_attn.moe_o_proj", lin)
        h = moe(x, p + "post_attention_layernorm", p + "moe_post_attention_layernorm", norm)
        x = x + moe(h, p + "mlp", p + "moe_mlp", mlp)
    return F.linear(norm(x, "model.norm"), sd["lm_head.weight"][:TOKENS])


def release_ids(release, prompt: str) -> list[int]:
    """tokenizer_image_token: each text piece tokenized alone (the release's tokenizer.json as
    the tokenizers library reads it), joined by IMAGE_TOKEN_INDEX."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(release / "tokenizer.json"))
    ids = []
    for k, piece in enumerate(prompt.split("<image>")):
        ids += ([-200] if k else []) + tok.encode(piece).ids
    return ids


def test_converted_logits_and_generation_equal_the_release(release, converted, loaded):
    model, processor = loaded
    sd, cfg = tensors(release), json.loads((release / "config.json").read_text())
    record = json.loads((converted / "conversion.json").read_text())
    assert record["weights"] + record["checked_rotary_buffers"] == len(sd) and record["dropped_vocabulary_rows"] == 8
    image = random_image(90, 40, 7)
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    prompt = processor.apply_chat_template([turn], add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\nWhat is it? ASSISTANT:")  # eve2_qwen, the release's qwen2 conversation
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    h, w = inputs["image_sizes"][0].tolist()
    pixels = release_pixels(image)
    torch.testing.assert_close(inputs["pixel_values"][0, :, :h, :w], pixels, atol=1e-5, rtol=0)
    visual = release_visual_tokens(sd, pixels)

    ids = torch.tensor(release_ids(release, prompt))
    expanded = torch.cat([torch.full((len(visual),), -200) if t == -200 else t[None] for t in ids])
    image_id = model.config.image_token_id
    assert torch.equal(inputs["input_ids"][0], expanded.masked_fill(expanded == -200, image_id))
    with torch.no_grad():
        ours = model(**inputs).logits[0]
        torch.testing.assert_close(ours, release_logits(sd, cfg, expanded, visual), atol=1e-4, rtol=1e-4)
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, repetition_penalty=1.0)[0]
        L = expanded.shape[0]
        reference = release_logits(sd, cfg, torch.cat([expanded, out[L:]]), visual)
    assert out.shape[0] > L and torch.equal(out[L:], reference[L - 1 : -1].argmax(-1))  # decode steps: text weights


def release_to_kit(key: str) -> str:
    """Where each release weight belongs in EVE-kit, written out by hand."""
    key = key.replace("start_embedding", "class_embedding").replace("end_embedding", "split_embedding")
    if key.startswith("model.vision_tower."):
        return "vision." + key.removeprefix("model.vision_tower.")
    for moe, part in (("self_attn.moe_", "vision.self_attn."), ("moe_", "vision.")):
        if moe in key:
            return "language_model." + key.replace(moe, part)
    return "language_model." + key


def test_every_tensor_is_kept_bit_exact_in_its_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    src = write_eve2_release(tmp_path / "rel", dtype=torch.bfloat16, aliases=True, preprocessor=False)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, 16, 2).float() / 16)  # a rotary buffer, as older saves kept them
    _set_tensor(src, "model.layers.0.self_attn.rotary_emb.inv_freq", inv_freq)
    out = convert_eve2_release(src, tmp_path / "out", max_shard_size=100_000)
    source = {k: v for k, v in tensors(src).items() if "rotary_emb" not in k}
    ours = tensors(out)
    assert "model.vision_tower.start_embedding" in source and set(ours) == {release_to_kit(k) for k in source}
    for key, t in source.items():
        rows = t[:TOKENS] if key in ("model.embed_tokens.weight", "lm_head.weight") else t  # the loader's resize
        assert ours[release_to_kit(key)].dtype == torch.bfloat16 and torch.equal(ours[release_to_kit(key)], rows), key
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(ours)
    record = json.loads((out / "conversion.json").read_text())
    assert record["checked_rotary_buffers"] == 1 and record["weights"] == len(source)
    assert record["aliases"] == ["model.vision_tower.end_embedding", "model.vision_tower.start_embedding"]
    assert record["geometry_from"] == "name 'openai/eve-anyratio-res64-patch8'"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.vision.class_embedding, source["model.vision_tower.start_embedding"])
    expert = model.language_model.model.layers[1].vision.self_attn.k_proj.bias
    assert torch.equal(expert, source["model.layers.1.self_attn.moe_k_proj.bias"])


def test_the_tokenizer_gains_image_past_the_vocabulary(release, loaded):
    from transformers import Qwen2Tokenizer

    model, processor = loaded
    assert "<image>" not in Qwen2Tokenizer.from_pretrained(release).get_vocab()
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == TOKENS
    assert model.config.text_config.vocab_size == TOKENS and model.get_output_embeddings().weight.shape[0] == TOKENS
    ip = processor.image_processor
    assert processor.split_at_images and (ip.resize_rule, ip.image_size, ip.patch_size) == ("area", IMAGE_SIZE, PATCH)
    for prompt in ["<image>\n<image>\nCompare them.", "USER:  <image>  two  spaces 12345", "<image>"]:
        n = prompt.count("<image>")
        ids = processor(text=prompt, images=[random_image(16, 16)] * n, return_tensors=None)["input_ids"][0]
        collapsed = [-200 if t == TOKENS else t for i, t in enumerate(ids) if t != TOKENS or i == 0 or ids[i - 1] != TOKENS]
        assert collapsed == release_ids(release, prompt), prompt


def _set_tensor(src, key: str, value: torch.Tensor | None) -> None:
    """`key` set to `value` (None: removed) in the shard that holds it, or in the first shard."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / index["weight_map"].get(key, min(index["weight_map"].values()))
    stored = load_file(shard)
    if value is None:
        del stored[key], index["weight_map"][key]
    else:
        stored[key], index["weight_map"][key] = value, shard.name
    save_file(stored, str(shard))
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("key, value, message", [
    ("model.vision_tower.pos_embedding", torch.zeros(4), r"'model\.vision_tower\.pos_embedding' maps to"),
    ("model.mm_projector.0.weight", torch.zeros(4), r"'model\.mm_projector\.0\.weight' has no place"),
    ("model.layers.0.mlp.moe_gate.weight", torch.zeros(4), r"'model\.layers\.0\.mlp\.moe_gate\.weight' maps to"),
    ("model.layers.1.moe_mlp.up_proj.weight", None, r"lacks 1 weight.*'model\.layers\.1\.moe_mlp\.up_proj\.weight'"),
    ("model.layers.0.self_attn.moe_k_proj.bias", torch.zeros(7), r"'model\.layers\.0\.self_attn\.moe_k_proj\.bias' has shape \[7\]"),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8), "RoPE frequencies differ from those of rope_theta=1000000.0"),
    ("model.vision_tower.start_embedding", torch.zeros(64), r"'model\.vision_tower\.(class|start)_embedding' and .* both map"),
])
def test_unmapped_missing_or_misshapen_keys_are_errors_naming_them(release, tmp_path, key, value, message):
    src = shutil.copytree(release, tmp_path / "rel")
    _set_tensor(src, key, value)
    with pytest.raises(ConversionError, match=message):
        convert_eve2_release(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.converting").exists()  # nothing written


@pytest.mark.parametrize("field, value, message", [
    ("add_moe", False, "add_moe = False is not supported"),
    ("moe_part", "self_attn-mlp", "moe_part = 'self_attn-mlp'"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("mm_future_setting", 3, r"unknown field\(s\) \['mm_future_setting'\]"),
    ("add_moe", None, r"\['add_moe'\] missing"),
])
def test_unsupported_settings_are_errors_naming_them(release, tmp_path, field, value, message):
    src = shutil.copytree(release, tmp_path / "rel")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop(field) if value is None else cfg.update({field: value})
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=message):
        convert_eve2_release(src, tmp_path / "out")


def test_geometry_sources_and_their_refusals(release, tmp_path):
    assert eve2_geometry({"mm_vision_tower": "openai/eve-anyratio-res800-patch16"}, tmp_path)["image_size"] == 800
    g = eve2_geometry({"mm_vision_tower": "/elsewhere/vision-tower"}, tmp_path)
    assert (g["image_size"], g["patch_size"], g["source"][:8]) == (1600, 16, "defaults")
    src = shutil.copytree(release, tmp_path / "rel")
    pre = src / "openai/eve-anyratio-res64-patch8/preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), "dense_stride": 4}))
    with pytest.raises(ConversionError, match="dense_stride 4"):
        convert_eve2_release(src, tmp_path / "out")
    pre.unlink()  # then the name decides; one without res/patch gives the 16-px default, which the conv refutes
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": "openai/some-tower"}))
    with pytest.raises(ConversionError, match=r"shape \[32, 3, 8, 8\].*16-px patch \(defaults"):
        convert_eve2_release(src, tmp_path / "out")


def test_a_tokenizer_longer_than_the_decoder_is_refused(tmp_path):
    src = write_eve2_release(tmp_path / "rel", padded_vocab=-8)
    with pytest.raises(ConversionError, match="400 tokens but config.json's vocab_size is 392"):
        convert_eve2_release(src, tmp_path / "out")


def test_cli_dispatch_help_and_refusals(release, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "eve-qwen2" in capsys.readouterr().out
    refusals = ((["--teacher", "ViT-L-14"], "EVEv2 has no PAL"), (["--to", "reference"], "EVEv2 release already"))
    for extra, message in refusals:
        with pytest.raises(SystemExit) as exit_info:
            main([str(release), str(tmp_path / "out"), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    src = shutil.copytree(release, tmp_path / "llama3")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "eve-llama3"}))
    with pytest.raises(SystemExit):
        main([str(src), str(tmp_path / "out")])
    assert "model_type 'eve-llama3'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _file_size_limit(nbytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_an_interrupted_cli_run_leaves_no_output_and_the_next_replaces_it(release, converted, tmp_path, capsys):
    """The CLI in a process that cannot write a file past 100 kB (a full disk) stops mid-shard;
    OUT never appears, and the next run replaces what it left."""
    out = tmp_path / "eve2"
    run = subprocess.run([sys.executable, "-m", "eve.convert", str(release), str(out), "--max-shard-size", "300KB"],
                         capture_output=True, text=True, timeout=600, preexec_fn=_file_size_limit(100_000))
    assert run.returncode == 2 and "File too large" in run.stderr, run.stderr[-2000:]
    assert not out.exists() and any((tmp_path / ".eve2.converting").glob(".model-shard-*.tmp"))
    main([str(release), str(out), "--max-shard-size", "300KB"])
    assert "wrote" in capsys.readouterr().out and not (tmp_path / ".eve2.converting").exists()
    first, again = tensors(converted), tensors(out)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
