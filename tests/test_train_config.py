"""eve-train's typed config: types coerced and checked, dotted keys, unknown keys with the
nearest name, --stage against the config's, help for every field, and resume refusing a
changed config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from train import checkpoint
from train.cli import main as eve_train
from train.config import LoraSettings, TrainConfig


def test_values_are_coerced_and_checked_by_field_type():
    cfg = TrainConfig.load("stage1_debug", ["lr_vision=1e-3", "max_steps=7", "pal=false", "adam_betas=[0.9, 0.95]"])
    assert (cfg.lr_vision, cfg.max_steps, cfg.pal, cfg.adam_betas) == (1e-3, 7, False, (0.9, 0.95))
    with pytest.raises(ValueError, match=r"lr_vision[\s\S]*abc"):
        TrainConfig.load("stage1_debug", ["lr_vision=abc"])
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig.load("stage1_debug", ["max_steps=2.5"])


def test_a_dotted_key_sets_one_entry():
    base = TrainConfig.load("stage1_debug")
    cfg = TrainConfig.load("stage1_debug", ["flavor_overrides.image_size=64"])
    assert cfg.flavor_overrides == {**base.flavor_overrides, "image_size": 64}  # the other entries stay
    lora = TrainConfig.load("stage3_debug", ["lora.r=4", "lora.quantize=4bit", "lr_decoder=1e-4"]).lora
    assert lora == LoraSettings(r=4, quantize="4bit")


@pytest.mark.parametrize("override, wrong, near", [("lr_visoin=1", "lr_visoin", "lr_vision"), ("lora.rank=4", "lora.rank", "")])
def test_unknown_keys_name_the_nearest_field(override, wrong, near):
    with pytest.raises(ValueError, match=f"unknown config field '{wrong}'.*{near}"):
        TrainConfig.load("stage3_debug", [override])


def test_unknown_keys_in_the_file_too(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stage": 1, "output_dir": "x", "data": [], "init_from": "y", "lr_visoin": 1}))
    with pytest.raises(ValueError, match="c.json: unknown config field 'lr_visoin'; did you mean lr_vision"):
        TrainConfig.load(path)


def test_stage_must_agree_with_the_config(capsys):
    with pytest.raises(SystemExit, match="--stage 3 disagrees with .*stage1_debug.json, a stage-1 config"):
        eve_train(["--stage", "3", "--config", "stage1_debug"])
    with pytest.raises(SystemExit, match="--stage is required"):
        eve_train(["--config", "stage1_debug"])


def test_help_lists_every_field_with_its_help(capsys):
    eve_train(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in (TrainConfig, LoraSettings):
        import docstring_parser

        documented = {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
        for f in dataclasses.fields(cls):
            assert documented.get(f.name), f"{cls.__name__}.{f.name} has no help text"
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text
    assert "learning rate of the patch embedding, projector and PAL" in text


def _started_run(tmp_path: Path, cfg: TrainConfig) -> Path:
    """What a run leaves behind: its config and one complete checkpoint."""
    out = Path(cfg.output_dir)
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "checkpoints" / "step-00000001" / checkpoint.MARKER).write_text("{}")
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    return out


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = TrainConfig.load("stage2_debug", [f"output_dir={tmp_path / 'run'}"])
    out = _started_run(tmp_path, cfg)
    assert checkpoint.check_resume_config(out, cfg.to_dict(), allow_change=False) == []
    harmless = dataclasses.replace(cfg, max_steps=3, num_workers=0)  # stop early, other loaders: same run
    assert checkpoint.check_resume_config(out, harmless.to_dict(), allow_change=False) == []
    changed = dataclasses.replace(cfg, lr_decoder=1e-3, flavor_overrides={**cfg.flavor_overrides, "image_size": 64})
    with pytest.raises(ValueError, match=r"changed: flavor_overrides.image_size: None -> 64; lr_decoder: .* -> 0.001.*--allow_config_change"):
        checkpoint.check_resume_config(out, changed.to_dict(), allow_change=False)
    assert len(checkpoint.check_resume_config(out, changed.to_dict(), allow_change=True)) == 2
    fresh = dataclasses.replace(changed, output_dir=str(tmp_path / "new"))  # nothing to resume: anything goes
    assert checkpoint.check_resume_config(Path(fresh.output_dir), fresh.to_dict(), allow_change=False) == []


def test_shipped_stage_configs_load_and_chain():
    """Every shipped stage config parses, and each continuing stage starts from another shipped
    stage's export, at an image size that is the same or larger."""
    from train.config import CONFIG_DIR

    configs = {path.stem: TrainConfig.load(path) for path in sorted(CONFIG_DIR.glob("stage*.json"))}
    exports = {f"{cfg.output_dir}/final": cfg for cfg in configs.values()}
    for name, cfg in configs.items():
        if cfg.init_is_decoder:
            continue
        assert cfg.init_from in exports, f"{name} starts from {cfg.init_from}, which no shipped stage exports"
        parent = exports[cfg.init_from]
        assert parent.stage <= cfg.stage, name
        if parent.image_size and cfg.image_size:
            assert cfg.image_size >= parent.image_size, name
    assert [configs[n].image_size for n in ("stage1_eve2_7b", "stage2a_eve2_7b", "stage2a_hd_eve2_7b", "stage2b_eve2_7b",
                                             "stage3_eve2_7b")] == [800, 800, 1600, 1600, 1600]
