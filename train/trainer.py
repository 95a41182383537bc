"""One EVE training stage under DeepSpeed: build, freeze, optimise, checkpoint, resume, export.

The model code knows nothing of this: freezing, parameter groups, DeepSpeed, the teacher and
checkpointing are applied here, from outside.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import eve  # noqa: F401  (Auto classes)
from eve.build import build_eve
from eve.image_io import InvalidImageError
from eve.modeling_eve import EveForCausalLM
from eve.patch_aligning import EveForAlignedTraining, load_pal
from eve.processing_eve import EveProcessor
from eve.teacher import ClipTeacher
from eve.templates import LabelMaskingError
from train import checkpoint
from train.config import CONFIG_DIR, TrainConfig
from train.data import BadSampleError, EveDataset, ManifestError, ResumableSampler, collate
from train.distributed import DistInfo, all_true, init_distributed, sum_across
from train.export import save_sharded
from train.lora import apply_lora, export_adapter, export_merged, merge_adapter, quantization_config
from train.metrics import MetricsLog, PhaseMemory, memory_gb, peak_flops, plot_losses
from train.packing import collate_packed, wants_flat_batch
from train.partitioned import build_partitioned
from train.stages import parameter_groups, set_image_size

log = logging.getLogger("eve.train")


class NonFiniteLossError(RuntimeError):
    pass


# What a run stops with because of its input (data, checkpoints, a diverged loss), as opposed to a
# bug: eve-train prints these as one message.
USER_ERRORS = (BadSampleError, ManifestError, InvalidImageError, LabelMaskingError, checkpoint.CheckpointError,
               NonFiniteLossError)


def load_start(cfg: TrainConfig, dist: DistInfo, ds_config: dict, dtype: torch.dtype) -> tuple[EveForCausalLM, EveProcessor]:
    """The model the stage starts from, and its processor: partitioned from the start under
    ZeRO-3, with quantised decoder weights for QLoRA, else loaded whole."""
    if cfg.zero_stage == 3:
        return build_partitioned(cfg.init_from, cfg.init_is_decoder, cfg.flavor, cfg.flavor_overrides,
                                 cfg.attn_implementation, cfg.seed, dtype, ds_config)
    if cfg.init_is_decoder:
        return build_eve(cfg.init_from, cfg.flavor, attn_implementation=cfg.attn_implementation, seed=cfg.seed, **cfg.flavor_overrides)
    from transformers import AutoModelForCausalLM, AutoProcessor

    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.lora is not None and cfg.lora.quantize:
        if dist.device.type != "cuda":
            raise RuntimeError(f"lora.quantize={cfg.lora.quantize!r} needs CUDA (bitsandbytes); this run is on {dist.device}")
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, quantization_config=quantization_config(cfg.lora, dtype),
                                                     device_map={"": dist.local_rank}, dtype=dtype, **kwargs)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # checkpointing is set below
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, **kwargs)  # the family's class
    if not isinstance(model, EveForCausalLM):
        raise ValueError(f"{cfg.init_from} is a {type(model).__name__}, not an EVE model; a bare decoder needs init_is_decoder=true")
    return model, AutoProcessor.from_pretrained(cfg.init_from)


def enable_activation_checkpointing(model) -> None:
    """transformers 5.23 renamed gradient checkpointing; 5.17 knows only the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool) -> dict:
    ds = json.loads((CONFIG_DIR / f"zero{cfg.zero_stage}.json").read_text())
    ds.pop("//", None)
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not a multiple of micro x ranks = {per_step}")
    ds.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.global_batch_size // per_step,
        gradient_clipping=cfg.grad_clip,
        bf16={"enabled": bf16},
        zero_allow_untested_optimizer=True,
        steps_per_print=10**9,
    )
    return ds


def train(cfg: TrainConfig, allow_config_change: bool = False) -> Path:
    """Run (or resume) one stage; returns the exported inference model directory. A run in
    `output_dir` started with another config is not resumed unless `allow_config_change`."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    checkpoint.check_resume_config(out, cfg.to_dict(), allow_config_change)
    dist = init_distributed()
    memory = PhaseMemory(dist.device)
    torch.manual_seed(cfg.seed)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dist.device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32

    ds_config = deepspeed_config(cfg, dist.world_size, bf16)
    model, processor = load_start(cfg, dist, ds_config, dtype)
    peft_model = apply_lora(model, cfg.lora, lora_base(cfg.init_from)) if cfg.lora is not None else None
    if cfg.image_size is not None:
        set_image_size(model, processor, cfg.image_size)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    module = EveForAlignedTraining(model, cfg.pal_weight, use_pal=cfg.pal)
    if module.pal is not None and not cfg.init_is_decoder:
        # A converted release's PAL continues (eve-convert puts it beside the model). eve-train's own
        # stages start a fresh PAL each: continuing stage 1's into stage 2, as the reference does,
        # measured worse on eve-demo (0.78 / 0.75 against 0.86 / 0.78, seed 0, same code otherwise).
        loaded = load_pal(module.pal, cfg.init_from)
        if loaded is not None and dist.is_main:
            log.info("PAL weights from %s", loaded)
    groups = parameter_groups(model, module.pal, cfg.lr_vision, cfg.lr_decoder, cfg.weight_decay, adapters_only=peft_model is not None,
                              lr_experts=cfg.lr_experts)
    teacher = None
    if cfg.pal:
        name = cfg.teacher or model.config.teacher_model
        teacher = ClipTeacher.from_open_clip(name, cfg.teacher_pretrained or model.config.teacher_pretrained)
        teacher.to(dist.device, dtype)

    dataset = EveDataset(cfg.data, processor, cfg.template, cfg.max_length, with_teacher=cfg.pal, on_bad_sample=cfg.on_bad_sample)
    steps_per_epoch = len(dataset) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples make no full global batch of {cfg.global_batch_size}")
    total_steps = cfg.total_steps or steps_per_epoch * cfg.epochs  # the sampler reshuffles at each epoch's end
    optimizer = torch.optim.AdamW(groups, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    state = {"step": 0, "samples_consumed": 0, "skipped": {}, "truncated_samples": 0}
    resumed = checkpoint.load_latest(engine, ckpt_dir)
    if resumed is not None:  # DeepSpeed adds its own keys to the client state: keep ours
        state = {key: resumed[key] for key in state}
    memory.end("startup")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    metrics = MetricsLog(out, state["step"]) if dist.is_main else None
    sampler = ResumableSampler(len(dataset), cfg.seed, dist.rank, dist.world_size, state["samples_consumed"])
    pad_id = processor.tokenizer.pad_token_id
    if cfg.packing:  # the same micro_batch_size samples per micro-batch, packed into fewer rows
        flatten = wants_flat_batch(model.language_model.config._attn_implementation)
        collate_fn = partial(collate_packed, pad_token_id=pad_id, max_length=cfg.max_length, flatten=flatten)
    else:
        collate_fn = partial(collate, pad_token_id=pad_id)
    loader = DataLoader(
        dataset, batch_size=cfg.micro_batch_size, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=collate_fn, persistent_workers=cfg.num_workers > 0,
        # Its own generator: starting an iterator draws a seed for the workers, which from the global
        # RNG would shift it after a resume (dropout, e.g. LoRA's, would then differ from the straight run).
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    last = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    _loop(cfg, dist, engine, teacher, loader, state, last, total_steps, ckpt_dir, metrics, dtype, model)
    if metrics is not None:
        metrics.close()
    memory.end("train")
    final = _export(cfg, dist, model, peft_model, processor, out, state["step"] >= total_steps)
    memory.end("export")
    memory.write(out / "memory.json", dist.is_main)
    return final


def _loop(cfg, dist: DistInfo, engine, teacher, loader, state, last, total_steps, ckpt_dir, metrics, dtype, model):
    gas = engine.gradient_accumulation_steps()
    batches = iter(loader)
    bar = tqdm(total=last, initial=state["step"], desc=f"stage {cfg.stage}", unit="step", disable=not dist.is_main)
    window = {"loss": 0.0, "lm_loss": 0.0, "pal_loss": 0.0, "micro": 0, "tokens": 0, "images": 0, "seq": 0,
              "data_wait": 0.0, "start": time.time()}
    while state["step"] < last:
        for micro in range(gas):
            waited = time.time()
            batch = next(batches)
            window["data_wait"] += time.time() - waited  # > 0 means the loader starves the step
            meta = batch.pop("meta")
            teacher_pixels = batch.pop("teacher_pixel_values", None)
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            teacher_tokens = teacher(teacher_pixels.to(dist.device, dtype)) if teacher is not None and teacher_pixels is not None else None
            output = engine(**batch, teacher_tokens=teacher_tokens)
            if not all_true(bool(torch.isfinite(output.loss)), dist.device):
                raise NonFiniteLossError(
                    f"non-finite loss at step {state['step'] + 1}, micro-batch {micro} (lm {output.lm_loss.item()}, "
                    f"pal {output.pal_loss.item()}), samples {meta['ids']}: stopping instead of training through it"
                )
            engine.backward(output.loss)
            engine.step()
            for key in ("loss", "lm_loss", "pal_loss"):
                window[key] += getattr(output, key).detach().item()
            window["micro"] += 1
            window["tokens"] += meta["tokens"]  # real tokens (padding not counted), packed or not
            window["seq"] += meta["attn_len"]
            window["images"] += meta["images"]
            for where, reason, message in meta["skipped"]:
                state["skipped"][reason] = state["skipped"].get(reason, 0) + 1
                log.warning("skipped a bad sample (%s) at %s: %s", reason, where, message)
            state["truncated_samples"] += meta["truncated_samples"]
        state["step"] += 1
        state["samples_consumed"] += cfg.global_batch_size
        bar.update(1)
        if state["step"] % cfg.log_every == 0 or state["step"] == last:
            _log(cfg, dist, engine, window, state, metrics, bar, model)
        if state["step"] % cfg.save_every == 0 or state["step"] in (last, total_steps):
            client = {**state, "rng": checkpoint.rng_state()}
            checkpoint.save(engine, ckpt_dir, state["step"], client, cfg.keep_last, dist.is_main)
    bar.close()


def _log(cfg, dist, engine, window, state, metrics, bar, model):
    elapsed = time.time() - window["start"]
    sums = sum_across([window["loss"], window["lm_loss"], window["pal_loss"], window["micro"], window["tokens"], window["images"]], dist.device)
    loss, lm, pal, micro, tokens, images = sums
    tokens_per_s = tokens / elapsed
    seq = window["seq"] / max(1, window["micro"])
    peak = peak_flops(dist.device)
    flops = model.flops_per_token(int(seq), train_decoder=cfg.trains_decoder)
    lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
    record = {
        "step": state["step"], "loss": loss / micro, "lm_loss": lm / micro, "pal_loss": pal / micro, **lrs,
        "tokens_per_s": tokens_per_s, "images_per_s": images / elapsed,
        "model_mfu": flops * tokens_per_s / (peak * dist.world_size) if peak else None,
        "data_wait_frac": window["data_wait"] / elapsed, "memory_gb": memory_gb(dist.device), "skipped": sum(state["skipped"].values()),
        "skipped_by_reason": dict(sorted(state["skipped"].items())), "truncated": state["truncated_samples"],
    }
    if metrics is not None:
        metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", pal=f"{record['pal_loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
    window.update(loss=0.0, lm_loss=0.0, pal_loss=0.0, micro=0, tokens=0, images=0, seq=0, data_wait=0.0, start=time.time())


def lora_base(init_from: str) -> str:
    """Where an adapter export finds its base model: an absolute path for a local folder."""
    return str(Path(init_from).resolve()) if Path(init_from).is_dir() else init_from


def _export(cfg, dist, model, peft_model, processor, out: Path, finished: bool) -> Path:
    """The inference checkpoint (no PAL, no teacher) that AutoModelForCausalLM loads: the model,
    the merged model, or the LoRA adapter, streamed into 5 GB shards (gathered layer by layer
    under ZeRO-3)."""
    final = out / "final"
    if not finished:
        return final
    zero3 = cfg.zero_stage == 3
    if peft_model is None:
        save_sharded(model, final, dist.is_main, zero3)
    elif cfg.lora.merge and cfg.lora.quantize:
        export_adapter(peft_model, final / "adapter", dist.is_main, zero3)
        if dist.is_main:  # merging into quantised weights would round the update away: merge onto the full base
            merge_adapter(cfg.init_from, final / "adapter", final)
    elif cfg.lora.merge:
        export_merged(peft_model, final, dist.is_main, zero3)
    else:
        export_adapter(peft_model, final, dist.is_main, zero3)
    if dist.is_main:
        processor.save_pretrained(final)
        (final / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        plot_losses(out / "metrics.jsonl", out / "loss.png", f"stage {cfg.stage}")
    torch.distributed.barrier()
    return final
