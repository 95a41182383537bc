"""What the encoder-free front end costs: EVE against its bare decoder, measured in one run.

(a) train step (forward + backward, no optimizer): EVE on one 672x448 image + text, against
    the bare LlamaForCausalLM on a text-only sequence of the same total length;
(b) decoding: new tokens/s of EVE.generate (image in the prompt) against the bare decoder's
    generate on a text prompt of the same length. Prefill is timed apart (a 1-token generate)
    and subtracted, so the ratio compares the per-token decode loop.
Both models share the same decoder weights. Timings interleave A and B (alternating which goes
first) after a warmup and report medians, so machine noise hits both sides alike.

    .venv/bin/python bench/model_overhead.py [--hidden 512 --layers 8 --repeats 5]

Last line: `model_overhead: step_ratio=<EVE/bare> decode_ratio=<EVE/bare>`.
Targets: step_ratio <= 1.10 (teacher excluded), decode_ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from PIL import Image

import eve
from transformers import LlamaForCausalLM


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vision-width", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    cfg = eve.EveConfig.from_flavor(
        "eve-7b",
        text_config=dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, intermediate_size=int(args.hidden * 2.6875)),
        vision_hidden_size=args.vision_width,
    )
    model = eve.EveForCausalLM(cfg).to(device, dtype)
    bare = LlamaForCausalLM(cfg.text_config).to(device, dtype)
    bare.load_state_dict(model.language_model.state_dict())  # the same decoder on both sides

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (448, 672, 3), dtype=np.uint8))  # 672 wide, 448 high
    pix = eve.EveImageProcessor.from_config(cfg)([image])
    n_visual = eve.num_visual_tokens(*pix["image_sizes"][0].tolist(), cfg.patch_size)
    text = rng.integers(3, cfg.text_config.vocab_size, args.text_tokens).tolist()
    eve_ids = torch.tensor([[1] + [cfg.image_token_id] * n_visual + text], device=device)
    bare_ids = torch.tensor([[1] + rng.integers(3, cfg.text_config.vocab_size, n_visual).tolist() + text], device=device)
    image_inputs = {"pixel_values": pix["pixel_values"].to(device, dtype), "image_sizes": pix["image_sizes"].to(device)}
    mask = torch.ones_like(eve_ids)

    def step(m, ids, **kw):
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids, **kw).loss.backward()

    def generate(m, ids, n, **kw):
        with torch.no_grad():
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)

    model.train(), bare.train()
    step_eve, step_bare = [], []
    for i in range(args.warmup + args.repeats):
        pair = [lambda: step(model, eve_ids, **image_inputs), lambda: step(bare, bare_ids)]
        first_b = i % 2  # alternate who goes first, so order effects cancel
        t = [timed(pair[j], sync) for j in ((1, 0) if first_b else (0, 1))]
        a, b = (t[1], t[0]) if first_b else (t[0], t[1])
        if i >= args.warmup:
            step_eve.append(a), step_bare.append(b)

    model.eval(), bare.eval()
    decode_eve, decode_bare = [], []
    for i in range(args.warmup + args.repeats):
        a_full = timed(lambda: generate(model, eve_ids, args.new_tokens, **image_inputs), sync)
        a_pre = timed(lambda: generate(model, eve_ids, 1, **image_inputs), sync)
        b_full = timed(lambda: generate(bare, bare_ids, args.new_tokens), sync)
        b_pre = timed(lambda: generate(bare, bare_ids, 1), sync)
        if i >= args.warmup:
            decode_eve.append((args.new_tokens - 1) / (a_full - a_pre))
            decode_bare.append((args.new_tokens - 1) / (b_full - b_pre))

    se, sb = np.median(step_eve), np.median(step_bare)
    de, db = np.median(decode_eve), np.median(decode_bare)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    parts = model.num_parameters_by_part()
    print(f"device {device}, {dtype}; decoder {parts['decoder'] / 1e6:.1f}M params ({args.layers} layers, width {args.hidden}), "
          f"vision {parts['vision'] / 1e6:.2f}M")
    print(f"sequence: {eve_ids.shape[1]} tokens = 1 BOS + {n_visual} visual (672x448 image) + {args.text_tokens} text")
    print(f"{'':<28}{'EVE':>12}{'bare':>12}{'ratio':>8}  target")
    print(f"{'train step fwd+bwd (ms)':<28}{se * 1e3:>12.1f}{sb * 1e3:>12.1f}{se / sb:>8.3f}  <= 1.10")
    print(f"{'decode (new tokens/s)':<28}{de:>12.1f}{db:>12.1f}{de / db:>8.3f}  >= 0.95")
    print(f"medians of {args.repeats} interleaved repeats; peak memory {peak:.2f} GiB")
    print(f"model_overhead: step_ratio={se / sb:.3f} decode_ratio={de / db:.3f}")


if __name__ == "__main__":
    main()
