"""The inference checkpoint, streamed into safetensors shards a tensor group at a time.

Under ZeRO-3 every group is gathered (all ranks take part, as the gather needs them) and rank 0
writes it, so no rank holds more than its partition plus one group, however large the model.
Without ZeRO-3 the gather is a no-op and the same code writes the same files.

The writing is by hand: safetensors' `save_file` (and so `save_pretrained`) needs every tensor of
a shard in memory at once, which for a 5 GB shard is exactly the peak this avoids. The format is
simple enough to stream: an 8-byte header length, a JSON header of dtypes, shapes and byte
offsets (known from the shapes before any tensor is gathered), then the raw bytes in order.
The result is what `save_pretrained` writes: the same keys (tied weights once), the same shard
and index names, loadable by `from_pretrained` and safetensors alike.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
GROUP_BYTES = 256 * 2**20  # gathered at once: a decoder layer of a 7B model is ~400 MB in bf16

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass
class Entry:
    """One tensor of the checkpoint: its key, the live parameter or buffer, its full shape."""

    name: str
    tensor: torch.Tensor
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.tensor.element_size()

    @property
    def partitioned(self) -> bool:
        return hasattr(self.tensor, "ds_id")


def checkpoint_entries(model: nn.Module) -> list[Entry]:
    """The tensors a checkpoint of `model` holds, in module order: parameters (a tied weight once,
    under its first name, as transformers saves it) and persistent buffers. Shapes are the full
    ones, also for ZeRO-3 partitions."""
    entries, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        entries.append(Entry(name, tensor, tuple(getattr(tensor, "ds_shape", tensor.shape))))
    return entries


def tensor_groups(entries: list[Entry], limit: int = GROUP_BYTES) -> list[list[Entry]]:
    """Consecutive entries of at most `limit` bytes together (a bigger tensor alone)."""
    groups, size = [[]], 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return [g for g in groups if g]


def gathered(group: list[Entry], zero3: bool, modifier_rank: int | None = None):
    """The full tensors of `group` for the duration of the block (ZeRO-3), else nothing to do."""
    params = [e.tensor for e in group if e.partitioned]
    if not (zero3 and params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def save_sharded(model: nn.Module, out: Path, is_main: bool, zero3: bool, max_shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write `model`'s weights, config and generation config to `out` as `save_pretrained` would.
    Every rank must call it under ZeRO-3; only `is_main` writes. Returns the weight files."""
    out = Path(out)
    entries = checkpoint_entries(model)
    for entry in entries:
        if entry.tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{entry.name}: dtype {entry.tensor.dtype} has no safetensors name")
    shards = tensor_groups(entries, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    for shard, name in zip(shards, names):
        _write_shard(shard, out / name, is_main, zero3)
    if is_main:
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                     "weight_map": {e.name: name for shard, name in zip(shards, names) for e in shard}}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _save_configs(model, out, entries)
    return [out / n for n in names]


def _write_shard(shard: list[Entry], path: Path, is_main: bool, zero3: bool) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in shard:
        header[e.name] = {"dtype": _DTYPE_NAMES[e.tensor.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") if is_main else nullcontext() as f:
        if f is not None:
            f.write(struct.pack("<Q", len(raw)) + raw)
        for group in tensor_groups(shard):
            with gathered(group, zero3):
                if f is not None:
                    for e in group:
                        f.write(e.tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    if is_main:
        os.replace(tmp, path)  # a shard is either whole or absent


def _save_configs(model, out: Path, entries: list[Entry]) -> None:
    floats = [e.tensor.dtype for e in entries if e.tensor.is_floating_point()]
    model.config.dtype = str(floats[0]).removeprefix("torch.") if floats else None
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out)
