"""Typed configuration of one training stage: a JSON file (or a shipped name in train/configs/)
with command-line overrides, parsed by jsonargparse from the dataclass fields below.

Values are coerced and checked against the field types (`lr_vision=abc` is an error naming the
field), `flavor_overrides.image_size=1344` sets one entry of a nested dict, an unknown key is an
error that names the nearest field, and `eve-train --help` lists every field with its help.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataSource:
    """A manifest: JSONL (one sample per line) or a LLaVA-style JSON list, each sample
    {"id", "image" (path, optional), "conversations": [{"from", "value"}, ...]}.

    Args:
        path: the manifest file.
        image_root: folder the images are relative to (default: the manifest's folder).
    """

    path: str
    image_root: str | None = None


@dataclass
class LoraSettings:
    """LoRA / QLoRA through PEFT: the decoder's linears get low-rank adapters; its base weights stay frozen.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapters' input.
        target_modules: decoder module names that get adapters (default: every linear of the
            attention and MLP blocks, q/k/v/o and gate/up/down).
        train_vision: the vision front end (patch embedding + projector) and PAL train fully
            beside the adapters, at lr_vision.
        quantize: "4bit" (QLoRA, NF4) or "8bit" base weights of the decoder through bitsandbytes
            (CUDA only); null keeps them in the training precision. The vision front end and PAL
            are never quantised.
        merge: export the merged model (loads like any EVE) instead of the adapter alone.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    train_vision: bool = True
    quantize: str | None = None
    merge: bool = False

    def __post_init__(self):
        if self.quantize not in (None, "4bit", "8bit"):
            raise ValueError(f"lora.quantize must be null, '4bit' or '8bit', got {self.quantize!r}")
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")


@dataclass
class TrainConfig:
    """One EVE training stage (SPEC 2).

    Args:
        stage: 1 pre-align (decoder frozen), 2 generative pre-training, 3 SFT.
        output_dir: the stage's folder: checkpoints/, metrics.jsonl, final/.
        data: training manifests, each {"path": ..., "image_root": ...}.
        init_from: where the stage starts: an EVE checkpoint (the previous stage's final/), or,
            with init_is_decoder, a decoder checkpoint (path or hub id) wrapped into a fresh EVE.
        init_is_decoder: init_from is a bare decoder (stage 1 from Vicuna).
        flavor: EVE flavor of a fresh model (debug, demo, eve-7b, eve-7b-hd).
        flavor_overrides: EveConfig fields over the flavor's, e.g. image_size=1344.
        image_size: the resolution of this stage's images, set on the starting model's config and
            processor and kept in the export (EVEv2: 800 in stages 1-2a, 1600 after; EVE-7B-HD:
            1344 in SFT); null keeps the starting model's.
        template: chat template of the data: plain (stages 1-2), vicuna_v1 (stage 3), eve_v1.
        pal: Patch Aligning Layer against the frozen teacher; null: on in stages 1-2, off in 3.
        pal_weight: weight of the PAL loss beside the LM loss.
        teacher: open_clip name or local directory of the teacher (default: the model config's).
        teacher_pretrained: open_clip pretrained tag or checkpoint file of the teacher.
        lr_vision: learning rate of the patch embedding, projector and PAL.
        lr_decoder: learning rate of the decoder (with lora: of its adapters); 0 freezes it.
        lr_experts: EVEv2: learning rate of the decoder's vision experts; null: lr_decoder's.
            0 freezes them (stage 1), lr_experts > 0 with lr_decoder 0 trains them alone.
        lora: LoRA / QLoRA settings ({"r": 16, ...}); null trains the decoder's own weights.
        warmup_ratio: share of the steps with linear warmup before the cosine decay.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        grad_clip: gradient norm clipping.
        micro_batch_size: samples per rank per forward.
        global_batch_size: samples per optimizer step over all ranks (gradient accumulation fills it).
        max_length: tokens per sample after the visual tokens are spliced in (an image is never cut).
        packing: pack each micro-batch's samples into as few rows of <= max_length as fit (same
            samples per step, so resume stays exact; no attention across samples).
        epochs: passes over the data.
        total_steps: the run's length and its schedule's, in optimizer steps (default: the epochs).
        max_steps: stop early (debugging); the schedule still spans total_steps.
        zero_stage: DeepSpeed ZeRO stage (0-3); at 3 the model is built partitioned.
        precision: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.
        gradient_checkpointing: recompute activations in the backward pass.
        attn_implementation: sdpa, flash_attention_2 or eager (default: the best available).
        num_workers: data-loader worker processes per rank.
        seed: seed of the data order and of new weights.
        save_every: optimizer steps between checkpoints.
        keep_last: complete checkpoints kept.
        log_every: optimizer steps between metric lines.
        on_bad_sample: skip (count it and go on) or fail.
    """

    stage: int
    output_dir: str
    data: list[DataSource]
    init_from: str
    init_is_decoder: bool = False
    flavor: str = "eve-7b"
    flavor_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    template: str = "plain"
    pal: bool | None = None
    pal_weight: float = 1.0
    teacher: str | None = None
    teacher_pretrained: str | None = None
    lr_vision: float = 4e-4
    lr_decoder: float = 0.0
    lr_experts: float | None = None
    lora: LoraSettings | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    global_batch_size: int = 512
    max_length: int = 2048
    packing: bool = False
    epochs: int = 1
    total_steps: int | None = None
    max_steps: int | None = None
    zero_stage: int = 2
    precision: str = "auto"
    gradient_checkpointing: bool = True
    attn_implementation: str | None = None
    num_workers: int = 2
    seed: int = 0
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    on_bad_sample: str = "skip"

    def __post_init__(self):
        self.data = [d if isinstance(d, DataSource) else DataSource(**d) for d in self.data]
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        self.adam_betas = tuple(self.adam_betas)
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.pal is None:
            self.pal = self.stage in (1, 2)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.on_bad_sample not in ("skip", "fail"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'fail', got {self.on_bad_sample!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")
        if self.lora is not None and self.lr_decoder <= 0:
            raise ValueError("lora trains the decoder's adapters at lr_decoder, which is 0: set lr_decoder > 0")
        if self.lora is not None and self.lora.quantize and (self.zero_stage == 3 or self.init_is_decoder):
            raise ValueError("lora.quantize loads a saved EVE (not init_is_decoder) with zero_stage 0-2: "
                             "quantised weights cannot be ZeRO-3 partitions")

    @property
    def trains_decoder(self) -> bool:
        return self.lr_decoder > 0 or bool(self.lr_experts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = (), stage: int | None = None) -> "TrainConfig":
        """Read a JSON config (a path, or a name in train/configs/) and apply `key=value`
        overrides (a dotted key sets one entry of a nested dict or of `lora`). `stage`, when
        given, must agree with the config's."""
        return parse_train_config(["--config", str(path), *(f"--set={o}" for o in overrides)]
                                  + (["--stage", str(stage)] if stage is not None else []))[0]


# ---- parsing ---------------------------------------------------------------------------------

def resolve_config_path(name: str | Path) -> Path:
    """A config path, or the name of a shipped one (`stage3_eve7b`)."""
    path = Path(name)
    if not path.exists() and (CONFIG_DIR / path.with_suffix(".json").name).exists():
        path = CONFIG_DIR / path.with_suffix(".json").name
    return path


def read_config_file(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read training config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a training config is a JSON object, got {type(raw).__name__}")
    raw.pop("//", None)  # a comment key
    return raw


def check_keys(keys, where: str) -> None:
    """Every key (dotted for nested ones) names a field; else an error with the nearest names."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    nested = {"lora": {f.name for f in dataclasses.fields(LoraSettings)}}
    for key in keys:
        head, _, rest = key.partition(".")
        if head not in fields:
            wrong, choices = head, fields
        elif rest and head in nested and rest.split(".")[0] not in nested[head]:
            wrong, choices = rest.split(".")[0], nested[head]
        else:
            continue
        near = difflib.get_close_matches(wrong, sorted(choices), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(near)}?" if near else f"fields: {', '.join(sorted(choices))}"
        raise ValueError(f"{where}: unknown config field {key!r}; {hint}")


def build_parser(prog: str = "eve-train", description: str | None = None):
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    class Help(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, default_meta=False, formatter_class=Help)
    parser.add_argument("--config", action=ActionConfigFile, required=True,
                        help="the stage's JSON config: a path or a name in train/configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (a JSON value; a dotted key sets one entry of a nested dict), "
                             "e.g. --set lr_vision=1e-3 --set flavor_overrides.image_size=1344 --set lora.r=8")
    parser.add_argument("--allow_config_change", type=bool, default=False,
                        help="resume a run whose saved config differs from this one (the changed fields are logged)")
    parser.add_class_arguments(TrainConfig, as_group=True)
    return parser


def parse_train_config(argv: list[str], description: str | None = None) -> tuple[TrainConfig, bool]:
    """(config, allow_config_change) from eve-train's arguments: `--config` gives the base, every
    field's own option (`--lr_vision 1e-3`) and `--set key=value` override it."""
    from jsonargparse import ArgumentError

    pre = _preparse(argv)
    path = resolve_config_path(pre["config"])
    raw = read_config_file(path)
    check_keys(_flat_keys(raw), str(path))
    for key in pre["options"]:
        check_keys([key], "command line")
    overrides = []
    for item in pre["set"]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        check_keys([key.strip()], "--set")
        overrides += [f"--{key.strip()}", value]
    if pre["stage"] is not None and "stage" in raw and int(pre["stage"]) != raw["stage"]:
        raise ValueError(
            f"--stage {pre['stage']} disagrees with {path}, a stage-{raw['stage']} config (its template, freezing "
            f"and PAL are stage {raw['stage']}'s): pass a stage-{pre['stage']} config"
        )
    parser = build_parser(description=description)
    try:  # the file's content goes in as a JSON string: its comment key is gone
        ns = parser.parse_args(["--config", json.dumps(raw), *pre["rest"], *overrides])
    except ArgumentError as e:
        raise ValueError(f"{path}: {e}") from None
    fields = {f.name: ns[f.name] for f in dataclasses.fields(TrainConfig)}
    fields["data"] = [vars(d) if not isinstance(d, dict) else d for d in (fields["data"] or [])]
    lora = fields["lora"]
    fields["lora"] = None if lora is None else (lora if isinstance(lora, dict) else vars(lora))
    return TrainConfig(**fields), bool(ns.allow_config_change)


def _preparse(argv: list[str]) -> dict:
    """Pick out --config, --set and --stage; field options (`--lr_vision 1e-3`, `--lr-vision=1e-3`)
    go on to jsonargparse."""
    out = {"config": None, "set": [], "stage": None, "options": [], "rest": []}
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if not name.startswith("--"):
            raise ValueError(f"unexpected argument {argv[i]!r}")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            elif name != "--allow_config_change":
                raise ValueError(f"{name} needs a value")
        i += 1
        key = name[2:].replace("-", "_")
        if key == "config":
            out["config"] = value
        elif key == "set":
            out["set"].append(value)
        elif key == "allow_config_change":
            out["rest"] += ["--allow_config_change", value or "true"]
        else:
            if key == "stage":
                out["stage"] = value
            out["options"].append(key)
            out["rest"] += [f"--{key}", value]
    if out["config"] is None:
        raise ValueError("--config is required (a JSON path or a name in train/configs/)")
    return out


def _flat_keys(raw: dict) -> list[str]:
    keys = []
    for key, value in raw.items():
        if key == "lora" and isinstance(value, dict):
            keys += [f"lora.{k}" for k in value]
        else:
            keys.append(key)
    return keys
