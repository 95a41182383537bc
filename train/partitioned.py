"""ZeRO-3 start-up: build the model already partitioned, then load its weights a tensor group at
a time, so no rank ever holds the whole model (8 ranks x a full 7B in fp32 is ~220 GB).

Construction goes through transformers' own ZeRO-3 support (an `HfDeepSpeedConfig` alive while
the model is built makes it construct under `deepspeed.zero.Init` and initialise partitioned
weights correctly). Loading does not: transformers' ZeRO-3 `from_pretrained` reads the whole
checkpoint into rank 0's memory before scattering it, which is the start-up peak we avoid. Here
rank 0 reads only the tensors of the group being loaded (safetensors reads by offset), and the
group is scattered before the next is read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from eve.build import eve_config_for_decoder
from eve.configuration_eve import EveConfig
from eve.modeling_eve import EveForCausalLM, default_attn_implementation
from train.export import checkpoint_entries, gathered, tensor_groups

log = logging.getLogger(__name__)


def build_partitioned(init_from: str, init_is_decoder: bool, flavor: str, overrides: dict, attn_implementation: str | None,
                      seed: int, dtype: torch.dtype, ds_config: dict):
    """(model, processor) as `train.trainer.load_start` returns them, but partitioned over the
    ranks from the start. Every rank calls it."""
    from transformers import AutoConfig, AutoProcessor, GenerationConfig
    from transformers.integrations import HfDeepSpeedConfig

    attn = attn_implementation or default_attn_implementation()
    if init_is_decoder:
        decoder_config = AutoConfig.from_pretrained(init_from, attn_implementation=attn)
        config, processor = eve_config_for_decoder(init_from, flavor, decoder_config, **overrides)
        prefix, fresh = "language_model.", "vision."
    else:
        config = EveConfig.from_pretrained(init_from, attn_implementation=attn)
        processor = AutoProcessor.from_pretrained(init_from)
        prefix, fresh = "", None
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers builds partitioned while it lives
    torch.manual_seed(seed)
    model = EveForCausalLM._from_config(config, dtype=dtype)
    load_partitioned(model, checkpoint_files(init_from), prefix, fresh)
    try:
        model.generation_config = GenerationConfig.from_pretrained(init_from)
    except OSError:  # a checkpoint without generation_config.json: the model config's defaults
        pass
    return model, processor


def checkpoint_files(path_or_id: str) -> dict[str, Path]:
    """{checkpoint key: safetensors file} of a local folder or a hub id."""
    folder = Path(path_or_id)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path_or_id, allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {key: single for key in f.keys()}
    raise FileNotFoundError(
        f"{folder} holds no safetensors weights (model.safetensors or an index): ZeRO-3 start-up reads "
        "safetensors only; convert the checkpoint (load it and save_pretrained) first"
    )


def load_partitioned(model: nn.Module, files: dict[str, Path], prefix: str = "", fresh: str | None = None) -> None:
    """Copy the checkpoint `files` ({key: file}) into `model`, whose parameters may be ZeRO-3
    partitions: each group is gathered, filled on rank 0 and scattered again. Checkpoint key `k` is
    model key `prefix + k`. Every model tensor must be in the checkpoint except those under
    `fresh` (newly initialised) and a tied output embedding; every checkpoint key must be used."""
    from safetensors import safe_open

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    entries = {e.name: e for e in checkpoint_entries(model)}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(entries)
    wanted = {prefix + key: key for key in files if prefix + key not in tied}  # a tied copy: the same weight
    unexpected = sorted(k for k in wanted if k not in entries)
    missing = sorted(k for k in entries if k not in wanted and not (fresh and k.startswith(fresh)))
    if unexpected or missing:
        raise ValueError(
            f"the checkpoint does not fit the model: {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(missing)} missing keys {missing[:5]}"
        )
    todo = [entries[k] for k in entries if k in wanted]
    for group in tensor_groups(todo):
        by_file: dict[Path, list] = {}
        for e in group:
            by_file.setdefault(files[wanted[e.name]], []).append(e)
        with gathered(group, zero3=True, modifier_rank=0), torch.no_grad():
            for path, items in by_file.items():
                # Opened per group: the file's mapping is released with it, so the pages read stay
                # off this process's resident memory.
                with safe_open(path, "pt") as f:
                    for e in items:
                        if e.partitioned and rank != 0:
                            continue  # rank 0's values are scattered on leaving the block
                        value = f.get_tensor(wanted[e.name])
                        if tuple(value.shape) != e.shape:
                            raise ValueError(f"{path}: {wanted[e.name]} has shape {tuple(value.shape)}, the model's {e.name} {e.shape}")
                        e.tensor.data.copy_(value)  # buffers are not partitioned: every rank reads its own
