"""What the encoder-free front end costs: EVE against its bare decoder, measured in one run.

(a) Train step: forward + backward (no optimizer) of EVE on one image + text, against the bare
    LlamaForCausalLM on a text-only sequence of the same total length (visual tokens count as
    tokens). Both use labels = input_ids; EVE masks its image positions to -100 internally.
(b) Decode: new tokens/s of greedy `generate` with the KV cache, EVE with the image in the
    prompt against the bare decoder with a text prompt of the same length. Both make exactly
    --new-tokens tokens (min_new_tokens = max_new_tokens, do_sample=False, EOS cannot stop them).
    A stopping criterion timestamps every new token (it runs once per token, right after the
    token is picked; generate syncs there anyway). Decode speed = (N - 1) / (time from token 1
    to token N), so the prefill, where EVE embeds the image, is left out; the prefill (time to
    the first token, from the generate call) is reported beside it, without a target.

Both models hold the same decoder weights: the bare model is a deep copy of EVE's
`language_model`, so its config and attention implementation are identical too. After --warmup
rounds, each of --repeats rounds times EVE and bare back to back, alternating which goes first,
and the table shows medians; "pair ratio" is the min..max of the per-round EVE/bare ratios, a
noise gauge. Peak memory is the process max RSS on CPU (both models), torch's per-side peak
allocation on CUDA.

    .venv/bin/python bench/model_overhead.py                     # CPU, float32, small config
    python bench/model_overhead.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16

The last line reads `model_overhead: step_ratio=<EVE/bare step time> decode_ratio=<EVE/bare
decode tokens/s>`. Targets (printed, not asserted): step_ratio <= 1.10, decode_ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import numpy as np
import torch
from PIL import Image

import eve  # before transformers: installs the torchvision import guard
from transformers import StoppingCriteria, StoppingCriteriaList


class TokenClock(StoppingCriteria):
    """Never stops; records when each new token exists (generate calls it once per token)."""

    def __init__(self, sync):
        self.sync, self.stamps = sync, []

    def __call__(self, input_ids, scores, **kwargs):
        self.sync()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512, help="decoder width (heads = hidden / 64)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers")
    ap.add_argument("--vision-width", type=int, default=256, help="PEL width (vision_hidden_size)")
    ap.add_argument("--image", default="672x448", help="WIDTHxHEIGHT of the synthetic image")
    ap.add_argument("--text-tokens", type=int, default=64, help="text tokens after the image")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens each generate makes")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(0)
    cfg = eve.EveConfig.from_flavor(
        "eve-7b",
        text_config=dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, intermediate_size=args.hidden * 43 // 16),
        vision_hidden_size=args.vision_width, patch_size=14, image_size=672, teacher_image_size=336,
    )
    model = eve.EveForCausalLM(cfg).to(device, dtype)
    bare = copy.deepcopy(model.language_model)  # a LlamaForCausalLM with the very same weights and config
    models = {"EVE": model, "bare": bare}

    rng = np.random.default_rng(0)
    width, height = map(int, args.image.lower().split("x"))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    pix = eve.EveImageProcessor.from_config(cfg)([image])
    h, w = pix["image_sizes"][0].tolist()
    n_visual = eve.num_visual_tokens(h, w, cfg.patch_size)
    vocab = cfg.text_config.vocab_size
    text = rng.integers(3, vocab, args.text_tokens).tolist()
    ids = {
        "EVE": torch.tensor([[1] + [cfg.image_token_id] * n_visual + text], device=device),
        "bare": torch.tensor([[1] + rng.integers(3, vocab, n_visual).tolist() + text], device=device),
    }
    image_inputs = {"pixel_values": pix["pixel_values"].to(device, dtype), "image_sizes": pix["image_sizes"].to(device)}
    extra = {"EVE": image_inputs, "bare": {}}
    mask = torch.ones_like(ids["EVE"])

    def train_step(side: str) -> dict:
        m = models[side]
        m.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        m(input_ids=ids[side], labels=ids[side], **extra[side]).loss.backward()
        sync()
        return {"step": time.perf_counter() - start}

    def decode(side: str) -> dict:
        clock, n = TokenClock(sync), args.new_tokens
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = models[side].generate(
                input_ids=ids[side], attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                stopping_criteria=StoppingCriteriaList([clock]), **extra[side],
            )
        assert out.shape[1] - ids[side].shape[1] == n == len(clock.stamps)
        first, last = clock.stamps[0], clock.stamps[-1]
        return {"prefill": first - start, "decode": (n - 1) / (last - first)}

    results = {"EVE": {}, "bare": {}}  # side -> measure -> one value per timed round
    peaks = {"EVE": 0, "bare": 0}

    def run(phase, training: bool) -> None:
        for m in models.values():
            m.train(training)
        for i in range(args.warmup + args.repeats):
            sides = ["EVE", "bare"] if i % 2 == 0 else ["bare", "EVE"]  # alternate: order effects cancel
            for side in sides:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                r = phase(side)
                if cuda:
                    peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated())
                if i >= args.warmup:
                    for key, value in r.items():
                        results[side].setdefault(key, []).append(value)

    wall = time.perf_counter()
    run(train_step, training=True)
    run(decode, training=False)
    wall = time.perf_counter() - wall

    def stats(key: str):
        a, b = np.array(results["EVE"][key]), np.array(results["bare"][key])
        return np.median(a), np.median(b), a / b

    parts = model.num_parameters_by_part()
    tc = cfg.text_config
    print(f"device {device} ({args.threads} threads)" if not cuda else f"device {torch.cuda.get_device_name()}",
          f"| {args.dtype} | attention {tc._attn_implementation}")
    print(f"decoder {parts['decoder'] / 1e6:.1f}M params ({tc.num_hidden_layers} layers, width {tc.hidden_size}, "
          f"{tc.num_attention_heads} heads, ffn {tc.intermediate_size}), same weights on both sides; "
          f"EVE front end {parts['vision'] / 1e6:.2f}M (vision width {cfg.vision_hidden_size})")
    grid = f"{h // (2 * cfg.patch_size)}x{w // (2 * cfg.patch_size)}"
    print(f"sequence {ids['EVE'].shape[1]} tokens = 1 BOS + {n_visual} visual ({width}x{height} image -> {w}x{h} px, "
          f"{grid} pooled grid) + {args.text_tokens} text; bare: same length, all text")
    print()
    print(f"{'':<30}{'EVE':>10}{'bare':>10}{'ratio':>8}{'pair ratio':>16}  target")
    rows = [("train step fwd+bwd (ms)", "step", 1e3, "<= 1.10"),
            ("prefill, 1st token (ms)", "prefill", 1e3, "-"),
            (f"decode, {args.new_tokens - 1} tokens (tok/s)", "decode", 1, ">= 0.95")]
    ratios = {}
    for label, key, scale, target in rows:
        a, b, pair = stats(key)
        ratios[key] = a / b
        spread = f"{pair.min():.3f}..{pair.max():.3f}"
        print(f"{label:<30}{a * scale:>10.1f}{b * scale:>10.1f}{a / b:>8.3f}{spread:>16}  {target}")
    print()
    print(f"medians of {args.repeats} interleaved rounds after {args.warmup} warmup; {wall:.0f} s timed phases")
    if cuda:
        print(f"peak memory allocated: EVE {peaks['EVE'] / 2**30:.2f} GiB, bare {peaks['bare'] / 2**30:.2f} GiB")
    else:
        print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
              "(process max RSS, both models)")
    print(f"model_overhead: step_ratio={ratios['step']:.3f} decode_ratio={ratios['decode']:.3f}")


if __name__ == "__main__":
    main()
