"""Typed configuration of one training stage, read from JSON with command-line overrides.

Shipped files live in train/configs/: the paper's three stages at 7B and the debug flavor.
Every field can be overridden on the command line: `--set lr_vision=1e-3 --set pal=false`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataSource:
    """A manifest: JSONL (one sample per line) or a LLaVA-style JSON list, each sample
    {"id", "image" (path, optional), "conversations": [{"from", "value"}, ...]}."""

    path: str
    image_root: str | None = None  # images are relative to this (default: the manifest's folder)


@dataclass
class TrainConfig:
    stage: int  # 1 pre-align (decoder frozen), 2 generative pre-training, 3 SFT
    output_dir: str
    data: list[DataSource]
    # Where the stage starts: an EVE checkpoint (the previous stage's output), or for stage 1
    # a decoder checkpoint (path or hub id) that is wrapped into a fresh EVE of `flavor`.
    init_from: str
    init_is_decoder: bool = False
    flavor: str = "eve-7b"
    flavor_overrides: dict = field(default_factory=dict)
    template: str = "plain"
    # PAL and its teacher (SPEC 1.5): on in stages 1-2 by default, off in 3.
    pal: bool | None = None
    pal_weight: float = 1.0
    teacher: str | None = None  # open_clip name or local dir; default: the model config's teacher_model
    teacher_pretrained: str | None = None
    # optimisation
    lr_vision: float = 4e-4  # PEL + projector + PAL
    lr_decoder: float = 0.0  # 0 freezes the decoder (stage 1)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    global_batch_size: int = 512
    max_length: int = 2048  # applied after the visual tokens are spliced in (an image is never cut)
    # Pack each micro-batch's samples into as few rows of <= max_length tokens as fit (train/packing.py):
    # same samples per step (exact resume), position_ids restart per sample, no cross-sample attention.
    packing: bool = False
    epochs: int = 1
    total_steps: int | None = None  # the run's length and its schedule's, in optimizer steps (default: the epochs)
    max_steps: int | None = None  # stop early (debugging); the schedule still spans the epoch(s)
    # systems
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = True
    attn_implementation: str | None = None
    num_workers: int = 2
    seed: int = 0
    # checkpoints and logging
    save_every: int = 500  # optimizer steps
    keep_last: int = 2
    log_every: int = 10
    on_bad_sample: str = "skip"  # or "fail"

    def __post_init__(self):
        self.data = [d if isinstance(d, DataSource) else DataSource(**d) for d in self.data]
        self.adam_betas = tuple(self.adam_betas)
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.pal is None:
            self.pal = self.stage in (1, 2)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.on_bad_sample not in ("skip", "fail"):
            raise ValueError("on_bad_sample must be 'skip' or 'fail'")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")

    @property
    def trains_decoder(self) -> bool:
        return self.lr_decoder > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        """Read a JSON config (a path, or a name in train/configs/) and apply `key=value` overrides
        (values parsed as JSON when they parse, else kept as strings)."""
        path = Path(path)
        if not path.exists() and (CONFIG_DIR / path.with_suffix(".json").name).exists():
            path = CONFIG_DIR / path.with_suffix(".json").name
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read training config {path}: {e}") from e
        raw.pop("//", None)  # a comment key
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not key=value")
            raw[key.strip()] = _parse(value)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{path}: unknown config field(s) {sorted(unknown)}")
        return cls(**raw)


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
