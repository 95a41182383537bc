"""Checkpoint shards read without trust and written with memory bounded by one tensor.

Reading: `*.safetensors` headers are parsed and checked here and each tensor's bytes are read
with plain file reads when needed; `pytorch_model*.bin` files load only through
`torch.load(weights_only=True)` and must hold a flat dict of tensors.

Writing: `ShardWriter` streams tensors into safetensors shards of at most `max_shard_bytes`.
safetensors' own `save_file` needs every tensor of a shard in memory at once (and copies each
to bytes), so a 5 GB shard would cost 10 GB; the format is a JSON header plus raw bytes, so it
is written here tensor by tensor and read back by safetensors, transformers and everyone else.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
COPY_CHUNK = 64 << 20  # bytes copied at a time between files
MAX_HEADER = 100 << 20

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely or does not hold what it should."""


@dataclass
class TensorRef:
    """One tensor of a source checkpoint, described without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    _read: Callable[[], bytes | torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    def read(self) -> bytes | torch.Tensor:
        """The tensor's raw little-endian bytes (safetensors) or the tensor itself (.bin)."""
        return self._read()


def checkpoint_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors preferred, then .bin; sharded
    (with an index json) or single."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = src / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a weight index ({e})") from e
            files = sorted({src / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are missing: {missing}")
            return files
        if (src / single).is_file():
            return [src / single]
    found = sorted(p.name for p in src.glob("*.safetensors")) or sorted(p.name for p in src.glob("pytorch_model*.bin"))
    if found:
        return [src / name for name in found]
    raise CheckpointError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Tensors of a safetensors file, checked against the file (offsets, sizes, dtypes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {n} is impossible for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not an object")
    base, refs = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry {info!r}") from e
        ref = TensorRef(name, dtype, shape, path, _range_reader(path, base + start, end - start))
        if end - start != ref.nbytes or start < 0 or base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has bytes {start}-{end} that do not fit")
        refs[name] = ref
    return refs


def _range_reader(path: Path, offset: int, length: int) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise CheckpointError(f"{path}: truncated (wanted {length} bytes at {offset})")
        return data

    return read


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model*.bin` state dict through the weights-only unpickler (memory-mapped when
    the file allows it). Anything but a flat {name: tensor} dict is refused."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - the unpickler's refusals come in several types
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])  # not torch's advice to unpickle anyway
        raise CheckpointError(f"{path}: refused by the weights-only loader ({type(e).__name__}: {reason})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def bin_refs(path: Path, state: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
    return {k: TensorRef(k, v.dtype, tuple(v.shape), path, (lambda v=v: v)) for k, v in state.items()}


def _as_bytes(data: bytes | torch.Tensor) -> memoryview | bytes:
    if isinstance(data, bytes):
        return data
    # A byte view of the tensor (bf16 has no numpy dtype, uint8 does); no copy when contiguous.
    return memoryview(data.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes safetensors shards `model-0000k-of-0000n.safetensors` (or one `model.safetensors`)
    plus the index, into `out`, streaming one tensor at a time."""

    def __init__(self, out: Path, max_shard_bytes: int, prefix: str = "model"):
        self.out, self.max_shard_bytes, self.prefix = out, max_shard_bytes, prefix
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def plan(self, tensors: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> list[list[int]]:
        """Split (name, dtype, shape, nbytes) in order into shards of at most max_shard_bytes
        (a larger single tensor gets a shard of its own). Returns index lists."""
        groups, current, size = [], [], 0
        for i, (_, _, _, nbytes) in enumerate(tensors):
            if current and size + nbytes > self.max_shard_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            groups.append(current)
        return groups

    def write_shard(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], data: Iterable[bytes | torch.Tensor]) -> Path:
        """One shard: the header from `entries`, then each tensor's bytes from `data` in order."""
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in entries:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as safetensors writes it
        path = self.out / f".{self.prefix}-shard-{len(self.shards):05d}.tmp"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for (name, dtype, shape), item in zip(entries, data, strict=True):
                raw = _as_bytes(item)
                if len(raw) != _nbytes(dtype, shape):
                    raise CheckpointError(f"tensor {name!r}: {len(raw)} bytes, expected {_nbytes(dtype, shape)}")
                for start in range(0, len(raw), COPY_CHUNK):
                    f.write(raw[start : start + COPY_CHUNK])
                del raw, item
        self.shards.append((path, [name for name, _, _ in entries]))
        self.total += offset
        return path

    def finish(self, metadata: dict | None = None) -> list[Path]:
        """Give the shards their final names and write the index (several shards only)."""
        n = len(self.shards)
        final = []
        if n == 1:
            path = self.out / f"{self.prefix}.safetensors"
            os.replace(self.shards[0][0], path)
            return [path]
        weight_map = {}
        for k, (tmp, names) in enumerate(self.shards, start=1):
            path = self.out / f"{self.prefix}-{k:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, path)
            final.append(path)
            weight_map.update({name: path.name for name in names})
        index = {"metadata": {"total_size": self.total, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def source_tensors(files: list[Path]) -> dict[str, TensorRef]:
    """Every tensor of the weight files, described without reading data (a .bin is memory-mapped
    where its format allows, so its pages are read only when a tensor is). A name present in
    two files is an error."""
    refs: dict[str, TensorRef] = {}
    for path in files:
        found = read_safetensors_header(path) if path.suffix == ".safetensors" else bin_refs(path, load_bin(path))
        for name, ref in found.items():
            if name in refs:
                raise CheckpointError(f"tensor {name!r} is in both {refs[name].file.name} and {path.name}")
            refs[name] = ref
    return refs
