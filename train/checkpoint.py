"""Training checkpoints: DeepSpeed's (model, optimizer, scheduler) plus our client state (data
position, RNG, counters). A checkpoint counts only once its `complete.json` marker exists, so
one cut short by `kill -9` is never resumed from; an unreadable one falls back to the previous.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
MARKER = "complete.json"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not ckpt_dir.exists():
        return []
    return sorted((p for p in ckpt_dir.glob("step-*") if (p / MARKER).exists()), key=_step_of)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_main: bool) -> Path:
    tag = f"step-{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.distributed.barrier()
    path = ckpt_dir / tag
    if is_main:
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"step": step, "samples_consumed": client_state["samples_consumed"]}))
        os.replace(tmp, path / MARKER)
        _prune(ckpt_dir, keep_last)
    torch.distributed.barrier()
    return path


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    complete = complete_checkpoints(ckpt_dir)
    newest = _step_of(complete[-1])
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for partial in ckpt_dir.glob("step-*"):  # left by a crash during a save
        if not (partial / MARKER).exists() and _step_of(partial) < newest:
            shutil.rmtree(partial, ignore_errors=True)


# Fields a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = {"max_steps", "num_workers", "log_every", "save_every", "keep_last", "gradient_checkpointing"}


def check_resume_config(out: Path, config: dict, allow_change: bool) -> list[str]:
    """The fields in which `config` differs from the one the run in `out` was started with
    (a dotted name per changed entry). A run with a complete checkpoint refuses a changed config
    unless `allow_change`: resuming it would silently mix two runs."""
    saved_path = out / "train_config.json"
    if not complete_checkpoints(out / "checkpoints") or not saved_path.exists():
        return []
    saved = json.loads(saved_path.read_text())
    changed = [f"{key}: {before!r} -> {after!r}" for key, before, after in _diff(saved, json.loads(json.dumps(config)))
               if key.split(".")[0] not in RESUMABLE_CHANGES]
    if changed and not allow_change:
        raise ValueError(
            f"{out} holds a run started with another config, which resuming would mix with this one; changed: "
            + "; ".join(changed) + ". Use another output_dir, or pass --allow_config_change to resume anyway"
        )
    if changed:
        log.warning("resuming %s with a changed config (--allow_config_change): %s", out, "; ".join(changed))
    return changed


def _diff(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip("."), a, b


def load_latest(engine, ckpt_dir: Path) -> dict | None:
    """Resume from the newest readable checkpoint; None if there is none to resume from."""
    candidates = complete_checkpoints(ckpt_dir)
    for path in reversed(candidates):
        try:
            loaded, client_state = engine.load_checkpoint(
                str(ckpt_dir), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: report and fall back
            log.error("checkpoint %s cannot be loaded (%s: %s); falling back to the previous one", path, type(e).__name__, e)
            continue
        if loaded is None or client_state is None or "step" not in client_state:
            log.error("checkpoint %s is incomplete; falling back to the previous one", path)
            continue
        set_rng_state(client_state["rng"])  # rank 0's; the data order comes from the sampler's seed
        log.info("resumed from %s (step %d)", path, client_state["step"])
        return client_state
    if candidates:
        raise RuntimeError(f"none of the checkpoints in {ckpt_dir} could be loaded: {[p.name for p in candidates]}")
    return None
