"""eve-smoke: a short end-to-end run of the model on this machine, with nothing downloaded.

Writes a tiny Llama (the Vicuna stand-in) and a tiny open_clip tower (the EVA-CLIP stand-in)
to --out, builds an EVE around them exactly as from real checkpoints, captions generated
images of several aspect ratios, computes the PAL loss against the teacher, saves the model
and reloads it through transformers' Auto classes. The weights are random, so the captions are
noise: the point is that every path runs and the visual token counts are right.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import eve
from eve.build import build_eve
from eve.patch_aligning import EveForAlignedTraining
from eve.processing_eve import EveImageProcessor
from eve.teacher import ClipTeacher
from eve.testing import make_tiny_llama, make_tiny_open_clip

ASPECTS = {"1:1": (480, 480), "3:1": (900, 300), "1:4": (200, 800), "16:9": (640, 360), "1:1 (tiny)": (24, 24)}


def draw_scene(width: int, height: int, seed: int) -> Image.Image:
    """A few coloured shapes on a light canvas."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (240, 240, 235))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = max(2, int(min(width, height) * rng.uniform(0.1, 0.3)))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
    return img


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eve-smoke", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/smoke"), help="output directory")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per caption")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)

    decoder_dir = make_tiny_llama(args.out / "tiny-llama", seed=args.seed)
    teacher_dir = make_tiny_open_clip(args.out / "tiny-clip", seed=args.seed)
    model, processor = build_eve(str(decoder_dir), "debug", seed=args.seed, teacher_model=str(teacher_dir))
    model.eval()
    parts = model.num_parameters_by_part()
    print(f"built EVE (debug flavor): vision {parts['vision']:,} + decoder {parts['decoder']:,} parameters")

    full = EveImageProcessor.from_config(eve.EveConfig.from_flavor("eve-7b"))
    images = {name: draw_scene(w, h, seed=i) for i, (name, (w, h)) in enumerate(ASPECTS.items())}
    rows = []
    for name, img in tqdm(images.items(), desc="captioning", unit="image"):
        inputs = processor(text=["<image>"], images=[img])
        n_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        caption = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        h, w = inputs["image_sizes"][0].tolist()
        rows.append((name, img.size, (w, h), n_tokens, full.resized_size(img.height, img.width)[::-1],
                     full.num_visual_tokens(img.height, img.width), caption))

    print(f"\n{'aspect':<11}{'native':>11}{'debug in':>10}{'tokens':>8}{'eve-7b in':>11}{'tokens':>8}  caption (random weights)")
    for name, native, debug_in, n, big_in, big_n, caption in rows:
        fmt = lambda s: f"{s[0]}x{s[1]}"  # noqa: E731
        print(f"{name:<11}{fmt(native):>11}{fmt(debug_in):>10}{n:>8}{fmt(big_in):>11}{big_n:>8}  {caption!r}")

    teacher = ClipTeacher.from_open_clip(model.config.teacher_model)
    batch = processor(text=["<image> a caption"] * 3, images=list(images.values())[:3], return_teacher=True)
    tokens = teacher(batch.pop("teacher_pixel_values"))
    with torch.no_grad():
        aligned = EveForAlignedTraining(model)(**batch, labels=batch["input_ids"], teacher_tokens=tokens)
    print(f"\nmixed-aspect batch of 3: LM loss {aligned.lm_loss:.3f}, PAL loss {aligned.pal_loss:.3f}")

    final = args.out / "model"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(final).eval()
    probe = processor(text=["<image> hello"], images=[images["3:1"]])
    with torch.no_grad():
        diff = (model(**probe).logits - reloaded(**probe).logits).abs().max().item()
    # Weights are bit-identical; loaded tensors may sit at other memory alignments, which can
    # change float32 rounding in the last bit.
    print(f"saved to {final}; reloaded with AutoModelForCausalLM: max |logit difference| = {diff:.1e}")
    if diff > 1e-5:
        raise SystemExit("smoke: the reloaded model differs")
    print(f"smoke: ok in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
