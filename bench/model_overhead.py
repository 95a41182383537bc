"""What the encoder-free front ends cost: EVE and EVEv2 against their bare decoder, in one run.

(a) Train step: forward + backward (no optimizer) of each model on one image + text, against the
    bare LlamaForCausalLM on a text-only sequence of the same total length (visual tokens count
    as tokens). All use labels = input_ids; EVE and EVEv2 mask image positions to -100 internally.
(b) Decode: new tokens/s of greedy `generate` with the KV cache, each model with the image in the
    prompt against the bare decoder with a text prompt of the same length. All make exactly
    --new-tokens tokens (min_new_tokens = max_new_tokens, do_sample=False, EOS cannot stop them).
    A stopping criterion timestamps every new token (it runs once per token, right after the
    token is picked; generate syncs there anyway). Decode speed = (N - 1) / (time from token 1
    to token N), so the prefill, where the image is embedded, is left out; the prefill (time to
    the first token, from the generate call) is reported beside it, without a target.

All models hold the same decoder weights: the bare model is a deep copy of EVE's
`language_model`, so its config and attention implementation are identical too; EVEv2 loads
those weights into its decoder and initialises its vision experts (per-layer copies of the norms,
q/k/v/o and MLP that image tokens are routed to) from them, as EVEv2's stage 2 starts. The
experts double the decoder layers' parameters but not the FLOPs per token (each token goes
through one copy), so what they cost in time is the routing: gathering each modality's tokens,
two smaller matmuls instead of one, and scattering the results back. Decode steps carry only
text tokens and take the text weights.

EVEv2 resizes by area: --eve2-image-size 608 with 16-px patches gives the default 672x448 image
the pooled grid (16x24, 401 visual tokens) that EVE gives it; where the counts differ (other
images), the family with fewer visual tokens gets more text, so that all sequences, the bare one
included, have the same length.

After --warmup rounds, each of --repeats rounds times the models and bare back to back, the
order reversed every other round (each pair alternates which goes first: order effects cancel),
and the table shows medians; "pair ratio" is the min..max of the per-round model/bare ratios, a
noise gauge. Peak memory is the process max RSS on CPU (all models), torch's per-side peak
allocation on CUDA.

    .venv/bin/python bench/model_overhead.py                     # CPU, float32, small config
    python bench/model_overhead.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16

The last line reads `model_overhead: step_ratio=<EVE/bare step time> decode_ratio=<EVE/bare
decode tokens/s> eve2_step_ratio=<EVEv2/bare> eve2_decode_ratio=<EVEv2/bare>` (the keys of the
families measured, --family). Targets (printed, not asserted): step_ratio <= 1.10, decode_ratio
>= 0.95 for both families.
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


FAMILIES = {"eve": ["EVE"], "eve2": ["EVEv2"], "both": ["EVE", "EVEv2"]}
SUMMARY_PREFIX = {"EVE": "", "EVEv2": "eve2_"}


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
    ap.add_argument("--family", choices=sorted(FAMILIES), default="both", help="which models to time against bare")
    ap.add_argument("--hidden", type=int, default=512, help="decoder width (heads = hidden / 64)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers")
    ap.add_argument("--vision-width", type=int, default=256, help="vision_hidden_size of both front ends")
    ap.add_argument("--eve2-image-size", type=int, default=608, help="EVEv2's area target side (16-px patches)")
    ap.add_argument("--image", default="672x448", help="WIDTHxHEIGHT of the synthetic image")
    ap.add_argument("--text-tokens", type=int, default=64, help="text tokens after the longer image")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens each generate makes")
    # Three models a round: 7 rounds keep the default run under 5 minutes on a small, busy CPU box.
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    # One thread: on a shared box each op's threads wait for the slowest, descheduled one (3-5x
    # slower and noisier with 2 threads on 2 busy cores); the ratios compare like with like anyway.
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    families = FAMILIES[args.family]

    torch.manual_seed(0)
    cfg = eve.EveConfig.from_flavor(
        "eve-7b",
        text_config=dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, intermediate_size=args.hidden * 43 // 16),
        vision_hidden_size=args.vision_width, patch_size=14, image_size=672, teacher_image_size=336,
    )
    # EVE is built even when only EVEv2 is timed: its decoder is where both others take their weights.
    v1 = eve.EveForCausalLM(cfg).to(device, dtype)
    bare = copy.deepcopy(v1.language_model)  # a LlamaForCausalLM with the very same weights and config
    cfgs, models = {"EVE": cfg}, {"EVE": v1}
    if "EVEv2" in families:
        cfgs["EVEv2"] = eve.Eve2Config(text_config=copy.deepcopy(cfg.text_config), vision_hidden_size=args.vision_width,
                                       patch_size=16, image_size=args.eve2_image_size)
        v2 = eve.Eve2ForCausalLM(cfgs["EVEv2"]).to(device, dtype)
        missing, unexpected = v2.language_model.load_state_dict(v1.language_model.state_dict(), strict=False)
        assert not unexpected and all(".vision." in key for key in missing), (missing, unexpected)
        v2.copy_text_to_vision_experts()  # from the decoder weights just loaded, not the ones it was built with
        models["EVEv2"] = v2
        assert v2.config.text_config._attn_implementation == bare.config._attn_implementation
    models = {side: models[side] for side in families} | {"bare": bare}

    rng = np.random.default_rng(0)
    width, height = map(int, args.image.lower().split("x"))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    geometry, extra = {}, {"bare": {}}
    for side in families:
        c = cfgs[side]
        pix = eve.EveImageProcessor.from_config(c)([image])
        h, w = pix["image_sizes"][0].tolist()
        geometry[side] = (h, w, eve.num_visual_tokens(h, w, c.patch_size))
        extra[side] = {"pixel_values": pix["pixel_values"].to(device, dtype),
                       "image_sizes": pix["image_sizes"].to(device)}
    # All sequences have one length (the family with fewer visual tokens takes more text), so one
    # bare run serves both families. Which tokens does not matter to the time.
    seq_len = 1 + max(n_visual for _, _, n_visual in geometry.values()) + args.text_tokens
    words = rng.integers(3, cfg.text_config.vocab_size, seq_len - 1).tolist()
    ids = {"bare": torch.tensor([[1] + words], device=device)}
    for side, (_, _, n_visual) in geometry.items():
        sequence = [1] + [cfgs[side].image_token_id] * n_visual + words[:seq_len - 1 - n_visual]
        ids[side] = torch.tensor([sequence], device=device)
    mask = torch.ones_like(ids["bare"])

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

    results = {side: {} for side in models}  # side -> measure -> one value per timed round
    peaks = dict.fromkeys(models, 0)

    def run(phase, training: bool) -> None:
        for m in models.values():
            m.train(training)
        order = list(models)
        for i in range(args.warmup + args.repeats):
            for side in order if i % 2 == 0 else order[::-1]:
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

    def stats(side: str, key: str, ref: str = "bare"):
        a, b = np.array(results[side][key]), np.array(results[ref][key])
        return np.median(a), np.median(b), a / b

    tc = cfg.text_config
    parts = {side: models[side].num_parameters_by_part() for side in families}
    decoder = sum(p.numel() for p in bare.parameters())
    layers = sum(p.numel() for p in bare.model.layers.parameters())
    print(f"device {device} ({args.threads} threads)" if not cuda else f"device {torch.cuda.get_device_name()}",
          f"| {args.dtype} | attention {tc._attn_implementation}")
    print(f"decoder {decoder / 1e6:.1f}M params ({tc.num_hidden_layers} layers, width {tc.hidden_size}, "
          f"{tc.num_attention_heads} heads, ffn {tc.intermediate_size}, vocab {tc.vocab_size}), "
          "same weights on all sides")
    for side in families:
        c, part = cfgs[side], parts[side]
        front = "PEL" if side == "EVE" else "convolutions"
        line = (f"{side} front end {part['vision'] / 1e6:.2f}M ({front}, vision width {c.vision_hidden_size}, "
                f"patch {c.patch_size})")
        if "vision_experts" in part:
            experts = part["vision_experts"]
            line += (f"; vision experts {experts / 1e6:.1f}M, a second copy of the decoder layers' "
                     f"{layers / 1e6:.1f}M (decoder {decoder / 1e6:.1f}M -> {(decoder + experts) / 1e6:.1f}M)")
        print(line)
    for side in families:
        h, w, n_visual = geometry[side]
        n_text = ids[side].shape[1] - 1 - n_visual
        grid = f"{h // (2 * cfgs[side].patch_size)}x{w // (2 * cfgs[side].patch_size)}"
        print(f"{side + ' sequence':<15}{seq_len} tokens = 1 BOS + {n_visual} visual ({width}x{height} image -> "
              f"{w}x{h} px, {grid} pooled grid) + {n_text} text")
    print(f"{'bare sequence':<15}{seq_len} tokens, all text")
    if "EVEv2" in families:
        flops = {side: models[side].flops_per_token(seq_len) for side in families}
        print("train FLOPs per token (decoder, 6N + attention): "
              + ", ".join(f"{side} {f / 1e6:.1f}M" for side, f in flops.items())
              + " (each token goes through one copy of each layer: the experts add parameters, not FLOPs)")
    print()
    print(f"{'':<30}{'':<7}{'model':>10}{'bare':>10}{'ratio':>8}{'pair ratio':>16}  target")
    rows = [("train step fwd+bwd (ms)", "step", 1e3, "<= 1.10"),
            ("prefill, 1st token (ms)", "prefill", 1e3, "-"),
            (f"decode, {args.new_tokens - 1} tokens (tok/s)", "decode", 1, ">= 0.95")]
    ratios = {}
    for label, key, scale, target in rows:
        for j, side in enumerate(families):
            a, b, pair = stats(side, key)
            ratios[side, key] = a / b
            spread = f"{pair.min():.3f}..{pair.max():.3f}"
            print(f"{label if j == 0 else '':<30}{side:<7}{a * scale:>10.1f}{b * scale:>10.1f}{a / b:>8.3f}"
                  f"{spread:>16}  {target}")
    if len(families) == 2:
        for label, key in (("step time", "step"), ("prefill time", "prefill"), ("decode tok/s", "decode")):
            a, b, pair = stats("EVEv2", key, ref="EVE")
            print(f"{'EVEv2/EVE ' + label:<57}{a / b:>8.3f}{f'{pair.min():.3f}..{pair.max():.3f}':>16}")
    print()
    print(f"medians of {args.repeats} interleaved rounds after {args.warmup} warmup; {wall:.0f} s timed phases")
    if cuda:
        print("peak memory allocated: " + ", ".join(f"{side} {peaks[side] / 2**30:.2f} GiB" for side in models))
    else:
        weights = ", ".join(f"{side} {sum(p.nbytes for p in m.parameters()) / 2**30:.2f}" for side, m in models.items())
        print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS, "
              "all models built: one process has no per-model peak)")
        print(f"weights (GiB): {weights}; a train step adds as much again in gradients")
    print("model_overhead: " + " ".join(f"{SUMMARY_PREFIX[side]}step_ratio={ratios[side, 'step']:.3f} "
                                        f"{SUMMARY_PREFIX[side]}decode_ratio={ratios[side, 'decode']:.3f}"
                                        for side in families))


if __name__ == "__main__":
    main()
