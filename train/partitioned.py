"""ZeRO-3 start-up: build the model already partitioned, then load its weights a tensor group at
a time, so no rank ever holds the whole model (8 ranks x a full 7B in fp32 is ~220 GB).

The model is constructed under `deepspeed.zero.Init`, uninitialised but for what the checkpoint
lacks. transformers' own ZeRO-3 path is not used: its `from_pretrained` reads the whole checkpoint
into rank 0's memory before scattering it, and its construction gathers every module whole to
initialise weights the checkpoint then overwrites. Here every rank reads only its own share of
each tensor (safetensors reads by offset) straight into its partition: nothing is gathered,
nothing is sent.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from eve.build import eve_config_for_decoder
from eve.configuration_eve2 import Eve2Config
from eve.modeling_eve import EveForCausalLM, default_attn_implementation
from eve.modeling_eve2 import Eve2ForCausalLM
from train.export import checkpoint_entries, tensor_groups

log = logging.getLogger(__name__)


def build_partitioned(init_from: str, init_is_decoder: bool, flavor: str, overrides: dict, attn_implementation: str | None,
                      seed: int, dtype: torch.dtype, ds_config: dict):
    """(model, processor) as `train.trainer.load_start` returns them, but partitioned over the
    ranks from the start. Every rank calls it."""
    import deepspeed
    from transformers import AutoConfig, AutoProcessor, GenerationConfig
    from transformers.initialization import no_init_weights
    from transformers.integrations import deepspeed as hf_deepspeed

    attn = attn_implementation or default_attn_implementation()
    if init_is_decoder:
        decoder_config = AutoConfig.from_pretrained(init_from, attn_implementation=attn)
        config, processor = eve_config_for_decoder(init_from, flavor, decoder_config, **overrides)
        prefix, fresh = "language_model.", "vision."
    else:
        config = AutoConfig.from_pretrained(init_from, attn_implementation=attn)
        processor = AutoProcessor.from_pretrained(init_from)
        prefix, fresh = "", None
    model_class = Eve2ForCausalLM if isinstance(config, Eve2Config) else EveForCausalLM
    # Not transformers' own ZeRO-3 construction (HfDeepSpeedConfig + _from_config): it then
    # initialises every weight, gathering each module whole (the embedding: twice its size on
    # gloo), only for the checkpoint to overwrite them all. Here nothing is initialised but what
    # the checkpoint lacks.
    arange_kept = getattr(hf_deepspeed, "prevent_arange_dtype_change", nullcontext)  # RoPE buffers stay fp32
    with no_init_weights(), arange_kept(), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        model = model_class(config)
    if fresh:
        torch.manual_seed(seed)
        fresh_module = model.get_submodule(fresh.rstrip("."))
        with deepspeed.zero.GatheredParameters(list(fresh_module.parameters()), modifier_rank=0):
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                fresh_module.apply(model._init_weights)
    # A bare decoder has no vision experts: each starts as its layer's language weights (EVEv2's
    # initialisation), read from the same checkpoint keys straight into its own partition.
    copies = {name: name.replace(".vision.", ".").removeprefix(prefix) for name, _ in model.named_parameters()
              if ".vision." in name} if init_is_decoder else {}
    load_partitioned(model, checkpoint_files(init_from), prefix, fresh, copies)
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


def load_partitioned(model: nn.Module, files: dict[str, Path], prefix: str = "", fresh: str | None = None,
                     copies: dict[str, str] | None = None) -> None:
    """Copy the checkpoint `files` ({key: file}) into `model`, whose parameters are ZeRO-3
    partitions: each rank reads its own share. Checkpoint key `k` is model key `prefix + k`;
    `copies` ({model key: checkpoint key}) fills more model tensors from keys already read.
    Every model tensor must be in the checkpoint except those under `fresh` (newly initialised)
    and a tied output embedding; every checkpoint key must be used."""
    from safetensors import safe_open

    entries = {e.name: e for e in checkpoint_entries(model)}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(entries)
    wanted = {prefix + key: key for key in files if prefix + key not in tied}  # a tied copy: the same weight
    wanted |= {name: key for name, key in (copies or {}).items() if key in files}
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
        for path, items in by_file.items():
            # Opened per group: the file's mapping is released with it, so the pages read stay
            # off this process's resident memory.
            with safe_open(path, "pt") as f, torch.no_grad():
                for e in items:
                    key = wanted[e.name]
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != e.shape:
                        raise ValueError(f"{path}: {key} has shape {shape}, the model's {e.name} {e.shape}")
                    if e.partitioned:
                        _read_partition(f, key, e)
                    else:  # buffers are not partitioned: every rank reads its own
                        e.tensor.data.copy_(f.get_tensor(key))


def _read_partition(f, key: str, entry) -> None:
    """Read this rank's ZeRO-3 share of `key` straight into its partition: DeepSpeed keeps a flat
    slice [rank * size, (rank + 1) * size) of the flattened tensor (the last rank's padded), so
    each rank reads the rows that cover its slice and nothing is gathered or sent."""
    param = entry.tensor
    part = param.ds_tensor
    group = getattr(param, "ds_process_group", None)
    rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
    numel, size = param.ds_numel, part.numel()
    start, end = min(rank * size, numel), min((rank + 1) * size, numel)
    if end <= start:
        return
    if len(entry.shape) == 0:
        flat = f.get_tensor(key).reshape(-1)[start:end]
    else:
        row = numel // entry.shape[0]
        first, last = start // row, -(-end // row)
        flat = f.get_slice(key)[first:last].reshape(-1)[start - first * row : end - first * row]
    part.data[: end - start].copy_(flat)
