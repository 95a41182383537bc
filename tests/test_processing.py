"""Image geometry, visual token counts, image decoding and the processor's placeholder checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image
from eve import EveConfig, EveImageProcessor, InvalidImageError, load_image, num_visual_tokens
from eve.processing_eve import expand_image_tokens, model_geometry, teacher_geometry


@pytest.fixture(scope="module")
def ip672():
    return EveImageProcessor.from_config(EveConfig.from_flavor("eve-7b"))


@pytest.mark.parametrize(
    "size, resized, tokens",
    [
        ((1000, 1000), (672, 672), 1 + 24 * 25),  # 1:1 -> 601 (SPEC)
        ((900, 300), (224, 672), 1 + 8 * 25),  # 3:1 landscape (w, h) = (900, 300)
        ((200, 1000), (672, 140), None),  # 1:5: 336*200/1000 = 67.2 -> 70 at 336 -> 140
        ((1, 4000), (672, 28), 1 + 24 * 2),  # a 1-pixel-wide sliver still gets one patch column
        ((1, 1), (672, 672), 601),  # a single pixel
    ],
)
def test_geometry_and_token_counts(ip672, size, resized, tokens):
    w, h = size
    assert ip672.resized_size(h, w) == resized
    rh, rw = resized
    assert rh % 28 == 0 and rw % 28 == 0
    expected = tokens if tokens is not None else 1 + (rh // 28) * (rw // 28 + 1)
    assert ip672.num_visual_tokens(h, w) == expected


def test_hd_square_is_2353_tokens():
    ip = EveImageProcessor.from_config(EveConfig.from_flavor("eve-7b-hd"))
    assert ip.resized_size(500, 500) == (1344, 1344)
    assert ip.num_visual_tokens(500, 500) == 2353


def test_short_side_rounds_up_to_patch():
    assert teacher_geometry(100, 300, 336, 14) == (112, 336)  # 112 = 336/3 exactly
    assert teacher_geometry(101, 300, 336, 14) == (126, 336)  # 113.1 -> 126 (round up)
    assert model_geometry(101, 300, 672, 336, 14) == (252, 672)


def test_model_sees_exact_counts(model, processor, images):
    batch = processor.image_processor(images)
    feats = model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    for (h, w), n in zip(batch["image_sizes"].tolist(), feats.lengths):
        assert n == num_visual_tokens(h, w, model.config.patch_size)
    assert feats.tokens.shape == (sum(feats.lengths), model.config.text_config.hidden_size)


def test_padded_and_unpadded_give_identical_tokens(model, processor, images):
    ip = processor.image_processor
    with torch.no_grad():
        loose = model.get_image_features(**ip(images))
        square = model.get_image_features(ip(images, pad_to_square=True)["pixel_values"])
        single = [model.get_image_features(**ip([im])).tokens for im in images]
    assert loose.grids == square.grids
    torch.testing.assert_close(loose.tokens, square.tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(loose.tokens, torch.cat(single), rtol=0, atol=1e-6)


def test_teacher_copy_is_centred_on_its_canvas(processor):
    out = processor.image_processor([random_image(64, 16, 5)], return_teacher=True)
    t = out["teacher_pixel_values"][0]  # [3, 16, 16]; image is 16 x 8 at teacher scale (h x w = 8 x 16)
    rows_with_image = (t.abs().sum(dim=(0, 2)) > 0).nonzero().flatten().tolist()
    assert rows_with_image == list(range(0, 8))  # (16 - 8) / 2 = 4 px, snapped to the 8-px grid -> 0


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_bad_images_fail_clearly(tmp_path):
    good = _encoded(random_image(40, 30), "PNG")
    cases = {
        "zero.png": (b"", "empty"),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10, "decode_error"),
        "truncated.png": (good[: len(good) // 2], "decode_error"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InvalidImageError) as err:
            load_image(path)
        assert err.value.reason == reason and name in str(err.value)
    with pytest.raises(InvalidImageError) as err:
        load_image(tmp_path / "missing.png")
    assert err.value.reason == "missing"


def test_decompression_bomb_is_rejected():
    data = _encoded(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(InvalidImageError) as err:
        load_image(data, max_pixels=1_000_000)
    assert err.value.reason == "too_large"


def test_odd_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert load_image(_encoded(cmyk, "JPEG")).mode == "RGB"
    deep = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # mode I;16
    rgb = load_image(_encoded(deep, "PNG"))
    assert rgb.mode == "RGB" and rgb.getpixel((7, 7))[0] == 255 and rgb.getpixel((0, 0))[0] == 0
    pal = Image.new("P", (8, 8))
    assert load_image(pal).mode == "RGB"
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(gif.getvalue()).getpixel((0, 0))[0] > 200  # first frame (red)


def test_exif_orientation_is_honoured():
    img = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    assert load_image(_encoded(img, "JPEG", exif=exif)).size == (20, 40)


def test_sliver_image_has_a_defined_result(model, processor):
    sliver = Image.new("RGB", (4000, 1), "gray")
    inputs = processor(text=["<image>"], images=[sliver])
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()


def test_placeholder_and_image_counts_must_match(processor, images):
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=["<image> and <image>"], images=images[:1])
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=["no image here"], images=images[:1])
    with pytest.raises(ValueError, match="placeholder"):
        expand_image_tokens([1, 9, 2], 9, [3, 4])


def test_processor_expands_each_placeholder(processor, images):
    out = processor(text=["a <image> b <image>", "<image> c"], images=[images[:2], images[2:]])
    n = [num_visual_tokens(h, w, 8) for h, w in out["image_sizes"].tolist()]
    counts = (out["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert counts == [n[0] + n[1], n[2]]
    assert (out["attention_mask"][:, -1] == 1).all()  # left padding
