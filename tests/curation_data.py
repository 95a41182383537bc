"""Generated inputs for the eve-curate tests: a folder source with the bad-image zoo, a nested
folder, a webdataset tar, and img2dataset parquet layouts (with a tar, with a folder), with the
reason each item must end with at a minimum side of 32 and a max aspect of 4."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

MIN_SIDE, MAX_ASPECT, MAX_PIXELS = 32, 4.0, 4_000_000
# (width, height) cycle of the plain images: 3 keepable sizes, one too small, one too elongated
SIZES = [((64, 48), None), ((48, 64), None), ((40, 40), None), ((20, 60), "too_small"), ((200, 40), "bad_aspect")]


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_zoo(folder: Path) -> dict[str, str | None]:
    """Bad and unusual images; file name -> expected reason (None: kept, converted to RGB)."""
    expected = {}

    def put(name: str, data: bytes, reason: str | None) -> None:
        (folder / name).write_bytes(data)
        expected[name] = reason

    put("zero.jpg", b"", "empty")
    put("corrupt.jpg", b"\xff\xd8\xff\xe0 not a jpeg" * 20, "decode_error")
    put("truncated.png", encode(noise(64, 64, 7))[:80], "decode_error")
    put("notimage.png", b"plain text, not an image\n" * 10, "decode_error")
    put("cmyk.jpg", encode(noise(64, 48, 8, "CMYK"), "JPEG"), None)
    put("deep16.png", encode(Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 16))), None)
    put("palette.png", encode(noise(64, 48, 9).convert("P")), None)
    put("alpha.png", encode(noise(48, 48, 10, "RGBA")), None)
    frames = [noise(48, 40, 11), noise(48, 40, 12)]
    put("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: 60x40 on disk, 40x60 upright
    put("rotated.jpg", encode(noise(60, 40, 13), "JPEG", exif=exif), None)
    put("bomb.png", encode(Image.new("L", (2500, 2500))), "too_large")  # 6.25 Mpx > MAX_PIXELS
    put("thin_header.png", encode(noise(30, 64, 14)), "too_small")
    return expected


def make_sources(root: Path, n_laion: int = 60) -> tuple[dict[str, Path], Counter]:
    """Writes every source under `root`; returns ({name: path}, expected final reasons of the
    items that are decided before clustering: Counter with None for 'passes the filter')."""
    expected: Counter = Counter()
    laion = root / "laion"
    laion.mkdir(parents=True)
    for i in range(n_laion):
        (w, h), reason = SIZES[i % len(SIZES)]
        noise(w, h, 1000 + i).save(laion / f"{i:04d}.png")
        expected[("laion", reason)] += 1
    for reason in write_zoo(laion).values():
        expected[("laion", reason)] += 1
    (laion / "zz_dup.png").write_bytes((laion / "0000.png").read_bytes())  # after 0000.png in scan order
    expected[("laion", "duplicate")] += 1
    (laion / "notes.txt").write_text("not an image: ignored by the scan")

    sa = root / "sa" / "batch0"
    sa.mkdir(parents=True)
    for i in range(6):
        noise(64, 64, 2000 + i).save(sa / f"sa_{i}.jpg")
        expected[("sa", None)] += 1

    with tarfile.open(root / "openimages.tar", "w") as tar:
        for i in range(5):
            add_member(tar, f"{i:03d}.png", encode(noise(48, 48, 3000 + i)))
            add_member(tar, f"{i:03d}.json", json.dumps({"i": i}).encode())
            expected[("openimages", None)] += 1
        add_member(tar, "005.png", b"\x89PNG broken")
        expected[("openimages", "decode_error")] += 1

    web = root / "web"
    web.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    # img2dataset, webdataset layout: 00000.parquet + 00000.tar; k3 failed to download
    with tarfile.open(web / "00000.tar", "w") as tar:
        for k in ("k0", "k1", "k2"):
            add_member(tar, f"{k}.jpg", encode(noise(50, 40, 5000 + ord(k[1])), "JPEG"))
            add_member(tar, f"{k}.txt", b"original caption")
        add_member(tar, "extra.jpg", encode(noise(50, 40, 4000), "JPEG"))  # not in the parquet: listed too
    pq.write_table(pa.table({"key": ["k0", "k1", "k2", "k3"], "caption": ["a", "b", "c", "d"],
                             "url": [f"http://x/{k}" for k in "0123"],
                             "status": ["success", "success", "success", "failed_to_download"],
                             "error_message": [None, None, None, "HTTP 404"]}), web / "00000.parquet")
    expected[("web", None)] += 4
    expected[("web", "missing")] += 1
    # img2dataset, files layout: 00001.parquet + 00001/
    (web / "00001").mkdir()
    for k in ("f0", "f1"):
        noise(40, 50, 6000 + ord(k[1])).save(web / "00001" / f"{k}.jpg")
    pq.write_table(pa.table({"key": ["f0", "f1"], "caption": ["x", "y"]}), web / "00001.parquet")
    expected[("web", None)] += 2
    return {"laion": laion, "sa": root / "sa", "openimages": root / "openimages.tar", "web": web}, expected


def write_captions_file(path: Path, sources: dict[str, Path], skip_keys: set[str]) -> None:
    """A captions JSONL for every image the scan will list (whatever gets kept), except `skip_keys`."""
    from data_curation.sources import Input, list_items

    with open(path, "w") as f:
        for name, p in sources.items():
            for it in list_items(Input(name, p.resolve())):
                if it["key"] not in skip_keys:
                    f.write(json.dumps({"uid": it["uid"], "caption": f"a {name} picture", "model": "annotator-v0"}) + "\n")


def make_tiny_llava(path: Path) -> Path:
    """A random tiny LLaVA (CLIP vision tower + the tiny Llama) with its processor: a stand-in for
    a generic transformers captioner such as LLaVA-1.5-13B."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from eve.testing import make_tiny_tokenizer, tiny_llama_config

    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=14, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(vocab_size=len(tok)),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(path)
    return path
