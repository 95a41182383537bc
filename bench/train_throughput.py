"""Training-step throughput of EVE under DeepSpeed: tokens/s and model-MFU.

Runs the real training module (EveForAlignedTraining: decoder + PEL + PAL) through
deepspeed.initialize with the trainer's own config builder, on synthetic batches of images of
mixed aspect ratios plus captions. Image tokens count as decoder tokens (SPEC). Model FLOPs per
token: 6N (+ attention) when the decoder trains (stages 2-3), 4N in stage 1; the frozen
teacher's forward FLOPs are reported separately and not counted in model-MFU.

    .venv/bin/python bench/train_throughput.py                 # CPU: a small config
    python bench/train_throughput.py --size 1b --stage 2       # GPU: ~1B decoder, bf16

The last line reads `train_throughput: tokens_per_s=<x> model_mfu=<0..1 or n/a on CPU>`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

import eve
from eve.patch_aligning import EveForAlignedTraining
from eve.teacher import ClipTeacher
from train.config import TrainConfig
from train.distributed import close_distributed, init_distributed
from train.metrics import memory_gb, peak_flops
from train.stages import parameter_groups
from train.trainer import deepspeed_config, enable_activation_checkpointing

SIZES = {  # decoder sizes: (hidden, layers, heads, ffn), vision width, image size, teacher
    "small": dict(text=(256, 4, 8, 688), vision=128, image_size=224, teacher_size=112, patch=14, teacher=None),
    "1b": dict(text=(2048, 16, 16, 5504), vision=1024, image_size=672, teacher_size=336, patch=14, teacher="EVA02-L-14-336"),
}


def build(size: str, stage: int, device, dtype, attn: str | None):
    s = SIZES[size]
    hidden, layers, heads, ffn = s["text"]
    cfg = eve.EveConfig.from_flavor(
        "eve-7b",
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=ffn),
        vision_hidden_size=s["vision"], image_size=s["image_size"], teacher_image_size=s["teacher_size"],
        patch_size=s["patch"], teacher_patch_size=s["patch"], teacher_hidden_size=1024 if size == "1b" else 128,
    )
    if attn:
        cfg._attn_implementation = attn
    model = eve.EveForCausalLM(cfg)
    import open_clip

    if s["teacher"]:  # a real tower, randomly initialised (nothing is downloaded)
        visual = open_clip.create_model(s["teacher"], pretrained=None).visual
    else:  # a small open_clip ViT for CPU runs
        from eve.testing import tiny_open_clip_config

        visual = open_clip.CLIP(**tiny_open_clip_config(image_size=112, patch_size=14, width=128)).visual
    teacher = ClipTeacher(visual).to(device, dtype)
    return model, teacher, eve.EveImageProcessor.from_config(cfg)


def synthetic_batch(processor, cfg, micro: int, text_len: int, seed: int):
    rng = np.random.default_rng(seed)
    shapes = [(1.0, 1.0), (1.5, 1.0), (1.0, 2.0), (3.0, 1.0)]
    images = [Image.fromarray(rng.integers(0, 255, (int(300 * h), int(300 * w), 3), dtype=np.uint8)) for w, h in
              (shapes[i % len(shapes)] for i in range(micro))]
    pix = processor(images, return_teacher=True)
    rows = []
    for h, w in pix["image_sizes"].tolist():
        n = eve.num_visual_tokens(h, w, cfg.patch_size)
        rows.append([1] + [cfg.image_token_id] * n + rng.integers(3, 32000, text_len).tolist())
    longest = max(map(len, rows))
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pix["pixel_values"],
            "image_sizes": pix["image_sizes"]}, pix["teacher_pixel_values"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 1b on CUDA, small on CPU")
    ap.add_argument("--stage", type=int, choices=[1, 2, 3], default=2)
    ap.add_argument("--micro", type=int, default=4, help="micro batch size")
    ap.add_argument("--text-len", type=int, default=64, help="caption tokens per sample")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--attn", default=None, help="sdpa / flash_attention_2 / eager")
    ap.add_argument("--no-checkpointing", action="store_true", help="disable activation checkpointing")
    args = ap.parse_args()

    import deepspeed

    dist = init_distributed()
    cuda = dist.device.type == "cuda"
    size = args.size or ("1b" if cuda else "small")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model, teacher, processor = build(size, args.stage, dist.device, dtype, args.attn)
    if not args.no_checkpointing:
        enable_activation_checkpointing(model)
    module = EveForAlignedTraining(model, use_pal=args.stage in (1, 2))
    lr_decoder = 0.0 if args.stage == 1 else 1e-5
    groups = parameter_groups(model, module.pal, 1e-4, lr_decoder, 0.0)
    cfg = TrainConfig(stage=args.stage, output_dir="/tmp/unused", data=[], init_from="-", micro_batch_size=args.micro,
                      global_batch_size=args.micro * dist.world_size, zero_stage=args.zero)
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(groups), config=deepspeed_config(cfg, dist.world_size, cuda))

    batch, teacher_pixels = synthetic_batch(processor, model.config, args.micro, args.text_len, seed=dist.rank)
    batch = {k: v.to(dist.device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    teacher_pixels = teacher_pixels.to(dist.device, dtype)
    tokens = int(batch["attention_mask"].sum())
    step_times, teacher_times = [], []
    for i in range(args.warmup + args.steps):
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        teacher_tokens = teacher(teacher_pixels) if module.pal is not None else None
        sync()
        t1 = time.perf_counter()
        out = engine(**batch, teacher_tokens=teacher_tokens)
        engine.backward(out.loss)
        engine.step()
        sync()
        if i >= args.warmup:
            step_times.append(time.perf_counter() - t1)
            teacher_times.append(t1 - t0)

    step = float(np.median(step_times))
    tokens_per_s = tokens * dist.world_size / step
    seq = batch["input_ids"].shape[1]
    flops_token = model.flops_per_token(seq, train_decoder=args.stage != 1)
    peak = peak_flops(dist.device)
    mfu = flops_token * tokens_per_s / (peak * dist.world_size) if peak else None
    teacher_params = sum(p.numel() for p in teacher.parameters())
    teacher_tokens_n = teacher_pixels.shape[0] * (teacher_pixels.shape[-1] // model.config.teacher_patch_size) ** 2
    if dist.is_main:
        n_dec = sum(p.numel() for p in model.language_model.parameters())
        print(f"device {dist.device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), dtype {dtype}, ranks {dist.world_size}")
        print(f"size {size}: decoder {n_dec / 1e6:.0f}M params, stage {args.stage}, micro {args.micro}, seq {seq}, "
              f"tokens/step {tokens} (image + text)")
        print(f"step (decoder+PEL+PAL, fwd+bwd+opt): median {step * 1e3:.1f} ms over {args.steps}")
        print(f"teacher forward (separate): median {np.median(teacher_times) * 1e3:.1f} ms, "
              f"~{2 * teacher_params * teacher_tokens_n / 1e12:.3f} TFLOP per step (not in model-MFU)")
        print(f"model FLOPs/token {flops_token / 1e9:.2f} GFLOP; tokens/s {tokens_per_s:.0f}; "
              f"model-MFU {'n/a on CPU' if mfu is None else f'{mfu:.3f}'} (target >= 0.40 on H100, stage 2)")
        print(f"peak memory {memory_gb(dist.device):.2f} GiB")
        print(f"train_throughput: tokens_per_s={tokens_per_s:.1f} model_mfu={'n/a' if mfu is None else f'{mfu:.3f}'}")
    torch.distributed.barrier()
    close_distributed()


if __name__ == "__main__":
    main()
