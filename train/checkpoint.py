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
