"""eve-convert on tiny checkpoints in the reference's released layout: every key mapped, logits
equal to the reference's arithmetic computed here from the source tensors, the round trip, the
refusals, and prompt ids equal to the reference's split-and-join rule."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from eve.convert import convert_eve_to_reference, convert_reference_to_eve, main
from eve.reference_layout import ConversionError, vision_tower_geometry
from eve.shards import CheckpointError
from eve.testing import tiny_llama_config
from eve.testing_reference import TEACHER_KEYS, write_reference_checkpoint
from tests.conftest import random_image

WIDTH, PATCH, HEADS = 32, 8, 8


@pytest.fixture(scope="module")
def text_config():
    return tiny_llama_config(vocab_size=400, num_hidden_layers=4)  # taps 4 and 0, as every 4 layers


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory, text_config):
    return write_reference_checkpoint(tmp_path_factory.mktemp("ref") / "EVE-tiny", text_config, fmt="bin", shard_bytes=150_000)


@pytest.fixture(scope="module")
def converted(ref_dir, tmp_path_factory):
    return convert_reference_to_eve(ref_dir, tmp_path_factory.mktemp("conv") / "eve-tiny", max_shard_size=250_000)


def source_tensors(ref_dir) -> dict:
    out = {}
    for shard in sorted(ref_dir.glob("pytorch_model-*.bin")):
        out.update(torch.load(shard, weights_only=True))
    return out


def model_tensors(folder) -> dict:
    out = {}
    for f in folder.glob("model*.safetensors"):
        out.update(load_file(f))
    return out


def reference_visual_tokens(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The reference's patch embedding + projector, written out from its description (scale
    width**-0.5, 8 heads) on one un-padded image [3, H, W]: [1 + h*(w+1), d]."""
    t = lambda k: sd[f"model.vision_tower.{k}"]  # noqa: E731
    C, hd = WIDTH, WIDTH // HEADS

    def ln_linear(x, pre):
        return F.layer_norm(x, (C,), t(f"{pre}.0.weight"), t(f"{pre}.0.bias")) @ t(f"{pre}.1.weight").T

    def attend(q, k, v):  # q [..., Lq, C], k/v [..., Lk, C], per head
        q, k, v = (x.unflatten(-1, (HEADS, hd)).transpose(-3, -2) for x in (q, k, v))
        w = (q @ k.transpose(-1, -2) * C**-0.5).softmax(-1)
        return (w @ v).transpose(-3, -2).flatten(-2)

    feats = F.conv2d(pixels[None], t("patch_embedding.weight"), stride=PATCH)[0]  # [C, H, W]
    h, w = feats.shape[1] // 2, feats.shape[2] // 2
    windows = feats.unfold(1, 2, 2).unfold(2, 2, 2).reshape(C, h * w, 4).permute(1, 2, 0)  # [hw, 4, C]
    pooled = windows.mean(1, keepdim=True)  # [hw, 1, C]
    kv = ln_linear(windows, "local_attention.kv")
    local = pooled + attend(ln_linear(pooled, "local_attention.q"), kv[..., :C], kv[..., C:]) @ t("local_attention.proj.weight").T
    local = (local + t("local_attention.proj.bias"))[:, 0]  # [hw, C]
    cls = t("class_embedding")[None]
    kv = ln_linear(local, "global_attention.kv")
    cls = cls + attend(ln_linear(cls, "global_attention.q"), kv[:, :C], kv[:, C:]) @ t("global_attention.proj.weight").T
    cls = cls + t("global_attention.proj.bias")
    rows = torch.cat([local.view(h, w, C), t("split_embedding").expand(h, 1, C)], 1).reshape(-1, C)
    seq = torch.cat([cls, rows])
    hidden = F.gelu(seq @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
    return hidden @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"]


def test_converted_logits_equal_reference_arithmetic(ref_dir, converted, text_config):
    from transformers import AutoModelForCausalLM, AutoProcessor, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    record = json.loads((converted / "conversion.json").read_text())
    sd = source_tensors(ref_dir)
    assert record["weights"] + record["pal_weights"] + record["dropped_teacher_weights"] + record["checked_rotary_buffers"] == len(sd)

    image = random_image(50, 20, 4)
    prompt = "A chat. USER: <image>\nWhat is it? ASSISTANT:"
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    h, w = inputs["image_sizes"][0].tolist()
    visual = reference_visual_tokens(sd, inputs["pixel_values"][0, :, :h, :w])

    decoder = LlamaForCausalLM(text_config).eval()
    decoder.load_state_dict({k: v for k, v in sd.items() if k.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head"))
                             and "rotary_emb" not in k})
    ids = inputs["input_ids"][0]
    is_image = ids == model.config.image_token_id
    embeds = decoder.get_input_embeddings()(ids.masked_fill(is_image, 0))
    embeds[is_image] = visual
    with torch.no_grad():
        expected = decoder(inputs_embeds=embeds[None]).logits
        ours = model(**inputs).logits
        canvas = model(input_ids=inputs["input_ids"], pixel_values=processor.image_processor([image], pad_to_square=True)["pixel_values"]).logits
    assert int(is_image.sum()) == visual.shape[0]
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(canvas, expected, atol=2e-5, rtol=1e-4)


def test_config_processor_and_pal_side_file(converted, ref_dir):
    from transformers import AutoProcessor

    from eve.configuration_eve import EveConfig

    config = EveConfig.from_pretrained(converted)
    assert (config.vision_hidden_size, config.patch_size, config.image_size, config.cross_attention_heads) == (32, 8, 32, 8)
    assert config.cross_attention_scale == pytest.approx(32**-0.5)
    assert (config.teacher_model, config.teacher_pretrained, config.pal_tap_layers) == ("ViT-L-14-336", "openai", [4, 0])
    processor = AutoProcessor.from_pretrained(converted)
    assert processor.split_at_images and processor.image_token_id == config.image_token_id == 400
    assert processor.image_processor.canvas_fill == [122, 116, 104]  # int(255 * mean), as the reference pads
    # the teacher's canvas border is the reference's fill colour, normalised
    border = processor.image_processor.teacher_pixels([random_image(40, 10)])[0, :, -1, 0]  # below the image
    mean, std = torch.tensor(config.teacher_image_mean), torch.tensor(config.teacher_image_std)
    torch.testing.assert_close(torch.from_numpy(border), (torch.tensor([122, 116, 104]) / 255 - mean) / std)
    pal = load_file(converted / "pal.safetensors")
    sd = source_tensors(ref_dir)
    assert torch.equal(pal["tap_norms.1.1.weight"], sd["model.vision_tower_compressor.norm_layer.1.1.weight"])
    assert torch.equal(pal["input_proj.bias"], sd["model.vision_tower_compressor.input_layer.bias"])
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded by --max-shard-size
    assert not any("vision_clip" in k or "clip_layer" in k for k in index["weight_map"])


def test_round_trip_to_reference_gives_back_identical_tensors(ref_dir, converted, tmp_path):
    back = convert_eve_to_reference(converted, tmp_path / "back")
    sd = source_tensors(ref_dir)
    out = model_tensors(back)
    kept = {k for k in sd if k not in TEACHER_KEYS and "rotary_emb" not in k}
    assert set(out) == kept
    for k in kept:
        assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k]), k
    cfg, src_cfg = json.loads((back / "config.json").read_text()), json.loads((ref_dir / "config.json").read_text())
    for field in ("mm_hidden_size", "mm_projector_type", "hidden_size", "num_hidden_layers", "vocab_size", "model_type"):
        assert cfg[field] == src_cfg[field], field
    pre = json.loads((back / "eve-patch8-anypixel-32" / "preprocessor_config.json").read_text())
    assert (pre["image_size"], pre["patch_stride"], pre["image_size_clip"], pre["conv_stride"]) == (32, 8, 16, 2)
    tok = json.loads((back / "tokenizer_config.json").read_text())
    assert tok == json.loads((ref_dir / "tokenizer_config.json").read_text())  # the release's own, for its slow tokenizer
    assert (back / "tokenizer.model").read_bytes() == (ref_dir / "tokenizer.model").read_bytes()
    assert "<image>" not in (back / "tokenizer.json").read_text()
    again = convert_reference_to_eve(back, tmp_path / "again")  # and the reverse reads as a release again
    first, second = model_tensors(converted), model_tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_safetensors_source_and_single_file_output(tmp_path, text_config, converted):
    src = write_reference_checkpoint(tmp_path / "ref-st", text_config, fmt="safetensors", shard_bytes=300_000)
    out = convert_reference_to_eve(src, tmp_path / "out")
    ours = load_file(out / "model.safetensors")  # under 5 GB: one file, no index
    reference = model_tensors(converted)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)  # same seed: the same tensors from .bin or safetensors


def _add_tensor(src, name, tensor):
    save_file({name: tensor}, str(src / "model-extra.safetensors"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "model-extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture
def st_ref(tmp_path, text_config):
    return write_reference_checkpoint(tmp_path / "ref", text_config, fmt="safetensors", shard_bytes=10**7)


def test_unknown_or_misshapen_keys_are_errors_naming_them(st_ref, tmp_path):
    shutil.copytree(st_ref, tmp_path / "a")
    _add_tensor(tmp_path / "a", "model.vision_resampler.query", torch.zeros(4))
    with pytest.raises(ConversionError, match="model.vision_resampler.query"):
        convert_reference_to_eve(tmp_path / "a", tmp_path / "out-a")
    shutil.copytree(st_ref, tmp_path / "b")
    _add_tensor(tmp_path / "b", "model.vision_tower.extra_norm.weight", torch.zeros(4))
    with pytest.raises(ConversionError, match="model.vision_tower.extra_norm.weight"):
        convert_reference_to_eve(tmp_path / "b", tmp_path / "out-b")
    shutil.copytree(st_ref, tmp_path / "c")
    name = "model.mm_projector.2.bias"
    shard = tmp_path / "c" / json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(7)
    save_file(tensors, str(shard))
    with pytest.raises(ConversionError, match=r"model\.mm_projector\.2\.bias.*shape \[7\]"):
        convert_reference_to_eve(tmp_path / "c", tmp_path / "out-c")
    assert not (tmp_path / "out-a").exists() and not (tmp_path / "out-c").exists()  # nothing half-written


@pytest.mark.parametrize("field, value, message", [
    ("mm_projector_type", "linear", "mm_projector_type"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end"),
    ("mm_vision_select_layer", -1, "mm_vision_select_layer"),
    ("mm_vision_tower_clip", "google/siglip-so400m", "mm_vision_tower_clip"),
    ("mm_future_setting", 3, "mm_future_setting"),
])
def test_unsupported_settings_are_errors_naming_them(st_ref, tmp_path, field, value, message):
    cfg = json.loads((st_ref / "config.json").read_text())
    cfg[field] = value
    (st_ref / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=message):
        convert_reference_to_eve(st_ref, tmp_path / "out")


def test_conv_stride_and_geometry_from_the_tower_name(st_ref, tmp_path):
    pre = st_ref / "eve-patch8-anypixel-32" / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    data["conv_stride"] = 3
    pre.write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="conv_stride 3"):
        convert_reference_to_eve(st_ref, tmp_path / "out")
    for name, expected in (("openai/eve-patch14-anypixel-672", (14, 672)), ("/data/openai/eve-patch14-anypixel-1344", (14, 1344))):
        g = vision_tower_geometry({"mm_vision_tower": name}, tmp_path)
        assert (g["patch_size"], g["image_size"], g["teacher_image_size"], g["teacher_patch_size"]) == (*expected, 336, 14)
    with pytest.raises(ConversionError, match="cannot tell the patch and image size"):
        vision_tower_geometry({"mm_vision_tower": "openai/some-tower"}, tmp_path)


def test_a_pickle_that_is_not_a_tensor_is_refused(st_ref, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, content in (("evil", {"model.norm.weight": Payload()}), ("int", {"model.norm.weight": 3})):
        src = tmp_path / name
        shutil.copytree(st_ref, src)
        for f in list(src.glob("model*.safetensors")) + [src / "model.safetensors.index.json"]:
            f.unlink()
        torch.save(content, src / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match="pytorch_model.bin"):
            convert_reference_to_eve(src, tmp_path / f"out-{name}")
    assert not marker.exists()


PROMPTS = [
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\nWhat is in the image? ASSISTANT:",
    "<image>\n<image>\nCompare the two pictures.",
    "<image>",
    "Describe this: <image>",
    "USER:  <image>  two  spaces and 12345 digits",
    "<image>\nWhat does “Ünïcode” say? 🙂",
]


def test_prompt_ids_equal_the_reference_split_and_join_rule(converted, ref_dir):
    """The reference tokenizes the text around each <image> on its own with Vicuna's
    SentencePiece tokenizer; here that rule runs on the sentencepiece library itself."""
    import sentencepiece as spm
    from transformers import AutoProcessor

    sp = spm.SentencePieceProcessor(model_file=str(ref_dir / "tokenizer.model"))
    processor = AutoProcessor.from_pretrained(converted)
    image_id = processor.image_token_id
    for prompt in PROMPTS:
        chunks = [[sp.bos_id()] + sp.encode(c) for c in prompt.split("<image>")]
        expected = [sp.bos_id()]
        for k, chunk in enumerate(chunks):
            expected += ([image_id] if k else []) + chunk[1:]
        n = prompt.count("<image>")
        ids = processor(text=prompt, images=[random_image(16, 16)] * n or None, return_tensors=None)["input_ids"][0]
        collapsed = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
        assert collapsed == expected, prompt
    # right after an image, the text starts afresh: SentencePiece's dummy prefix, then the newline byte
    ids = processor(text=PROMPTS[0], images=[random_image(16, 16)], return_tensors=None)["input_ids"][0]
    after = ids[max(i for i, t in enumerate(ids) if t == image_id) + 1 :][:2]
    assert [sp.id_to_piece(t) for t in after] == ["▁", "<0x0A>"]


def test_training_labels_of_a_converted_tokenizer(converted):
    from transformers import AutoProcessor

    from eve.templates import encode_example

    processor = AutoProcessor.from_pretrained(converted)
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "two circles"}]
    out = encode_example(processor.tokenizer, "vicuna_v1", turns, processor.image_token_id, [5], split_at_images=True)
    assert out["input_ids"].count(processor.image_token_id) == 5
    answers = [t for t, label in zip(out["input_ids"], out["labels"]) if label != -100]
    assert processor.tokenizer.decode(answers).replace(" ", "") == "red</s>twocircles</s>"


def test_converted_model_trains_with_its_pal(converted, tmp_path):
    """eve-train continues a converted release with PAL on, starting from the release's PAL."""
    from train.config import TrainConfig
    from train.trainer import train

    from eve.testing import make_tiny_open_clip

    teacher = make_tiny_open_clip(tmp_path / "teacher")  # 16-px images in 8-px patches, width 32: the tiny release's
    random_image(40, 24).save(tmp_path / "img.png")
    rows = [{"id": i, "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "dots"}]}
            for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    without = tmp_path / "no-pal"
    shutil.copytree(converted, without)
    (without / "pal.safetensors").unlink()

    def first_pal_loss(init, name):
        cfg = TrainConfig(stage=3, output_dir=str(tmp_path / name), data=[{"path": str(tmp_path / "data.jsonl")}],
                          init_from=str(init), template="vicuna_v1", pal=True, teacher=str(teacher), lr_vision=1e-3,
                          lr_decoder=1e-4, micro_batch_size=2, global_batch_size=2, max_length=256, total_steps=1,
                          zero_stage=2, num_workers=0, log_every=1, seed=0)
        final = train(cfg)
        assert (final / "model.safetensors").is_file() and not (final / "pal.safetensors").exists()
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["pal_loss"]

    # the same data, seed and teacher: only the PAL's starting weights differ
    assert first_pal_loss(converted, "with") != pytest.approx(first_pal_loss(without, "fresh"), abs=1e-6)


def test_cli(ref_dir, tmp_path, capsys):
    main([str(ref_dir), str(tmp_path / "out"), "--max-shard-size", "1MB"])
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # an existing output is never overwritten silently
        main([str(ref_dir), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--to" in capsys.readouterr().out
