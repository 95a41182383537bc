"""Training checkpoints: DeepSpeed's (model, optimizer, scheduler) plus our client state (data
position, RNG, counters), saved and resumed so that every rank, on every node, agrees.

What "complete" means. Every rank writes its part of `step-N/` (DeepSpeed's shards) and then its
own `rank{R}.saved`; after a barrier, which proves every rank's part written, local rank 0 of
*each node* writes the marker `complete.json` (atomically). Rank R counts step N complete if the
directory it sees holds both the marker and `rank{R}.saved`. With a shared `output_dir` every node
writes the same marker, identical and atomic, so harmless. With node-local disks each node holds
its own copy: a node killed before writing its marker leaves the step incomplete for its ranks,
and a rank now running on another node than the disk that holds its shards (launchers may number
nodes differently after a restart) misses its `rank{R}.saved`. A second barrier keeps every node
from pruning until every node holds the new marker, so a node that dies in between still has the
previous checkpoint.

Resuming. The ranks gather what each sees (all_gather_object) and take the newest step complete
on every rank; all load it, and if loading failed on any rank, all fall back together to the next
older common one. Once resumed from step K, every `step-*` newer than K is discarded: those steps
are redone, and a stale marker must never sit beside shards rewritten over it. A marked step whose
`rank{R}.saved` some rank lacks, with no common step, is an error rather than a fresh start: that
rank's files were lost (a node's disk, ranks moved between node-local disks), and starting over
would discard the other nodes' checkpoints.

Loading runs no pickled code. DeepSpeed reads its `.pt` files with `torch.load(weights_only=False)`,
so a replaced `mp_rank_00_model_states.pt` could run anything on the next `eve-train`. Loading is
done under torch's own switch that forces the weights-only unpickler on every `torch.load`
(`TORCH_FORCE_WEIGHTS_ONLY_LOAD`, scoped to the load), with the few DeepSpeed types its states hold
allow-listed (`DEEPSPEED_STATE_TYPES`). A file holding anything else fails to load and is treated
as an unreadable checkpoint: the run falls back to the previous one. Our own client state is plain
Python and tensors (the numpy RNG state is saved as lists).

Node-local disks under ZeRO-1/2: by default only rank 0 writes DeepSpeed's model-states file,
which every rank reads; add `"checkpoint": {"use_node_local_storage": true}` to the DeepSpeed
config (train/configs/zero2.json) so that local rank 0 of each node writes it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
MARKER = "complete.json"
RANK_FILE = "rank{}.saved"


class CheckpointError(RuntimeError):
    """Checkpoints that exist but cannot be resumed from (lost by a rank, or none loadable)."""


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints holding the marker in the directory this process sees, oldest first."""
    if not ckpt_dir.exists():
        return []
    return sorted((p for p in ckpt_dir.glob("step-*") if (p / MARKER).exists()), key=_step_of)


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, keys.tolist(), pos, has_gauss, gauss]  # lists, which the weights-only unpickler reads
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _writes_for_node() -> bool:
    """Local rank 0 writes the marker and prunes, for its node's disk."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def _gather(obj) -> list:
    """`obj` from every rank, in rank order; every rank must call it."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_atomic(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # one per writer
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_main: bool) -> Path:
    """Every rank calls this. (`is_main` is kept for the caller: the marker is written by local
    rank 0 of every node, see the module docstring.)"""
    path = ckpt_dir / _tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=path.name, client_state=client_state, save_latest=False)
    rank = _rank()
    _write_atomic(path / RANK_FILE.format(rank), {"step": step, "rank": rank, "host": socket.gethostname()})
    _barrier()  # every rank's part is on its disk
    if _writes_for_node():
        _write_atomic(path / MARKER, {"step": step, "samples_consumed": client_state["samples_consumed"]})
    _barrier()  # every node holds the marker before any node prunes what came before
    if _writes_for_node():
        _prune(ckpt_dir, keep_last)
    return path


def _remove(path: Path) -> None:
    # The marker first: a removal cut short leaves a partial checkpoint, never a complete-looking one.
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)  # other nodes may be removing it from a shared disk too


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    complete = complete_checkpoints(ckpt_dir)
    newest = _step_of(complete[-1])
    for old in complete[:-keep_last] if keep_last > 0 else []:
        _remove(old)
    for partial in ckpt_dir.glob("step-*"):  # left by a crash during a save
        if not (partial / MARKER).exists() and _step_of(partial) < newest:
            _remove(partial)


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


def _agreed_steps(ckpt_dir: Path) -> list[int]:
    """The steps complete on every rank, newest first (every rank computes the same list)."""
    rank = _rank()
    steps = [_step_of(p) for p in ckpt_dir.glob("step-*")] if ckpt_dir.exists() else []
    marked = {s for s in steps if (ckpt_dir / _tag(s) / MARKER).exists()}
    # A marked step without any rank file was written before rank files existed (rank 0 marked it
    # after a barrier, on a shared disk): complete as it always was.
    saved = {s for s in steps if (ckpt_dir / _tag(s) / RANK_FILE.format(rank)).exists()
             or (s in marked and not any((ckpt_dir / _tag(s)).glob(RANK_FILE.format("*"))))}
    views = _gather((marked, saved))
    complete = [m & s for m, s in views]
    common = set.intersection(*complete)
    if rank == 0:
        for step in sorted(set().union(*complete) - common):
            lacking = [r for r, c in enumerate(complete) if step not in c]
            log.warning("%s is not complete on rank(s) %s: not resumed from", ckpt_dir / _tag(step), lacking)
    # Every rank writes its file before any marker exists, so a rank lacking its file for a marked step
    # lost it; only the step being saved may be marked on some nodes and not yet on others.
    marked_anywhere = set().union(*(m for m, _ in views))
    lost = [r for r, (_, s) in enumerate(views) if marked_anywhere - s]
    if not common and lost:
        raise CheckpointError(
            f"{ckpt_dir} holds checkpoints {sorted(marked_anywhere)}, but none complete on every rank: rank(s) {lost} "
            f"lack their own {RANK_FILE.format('R')} in the step directories they see (a node lost its disk, ranks "
            "moved to other nodes' local disks)"
        )
    return sorted(common, reverse=True)


def deepspeed_state_types() -> list:
    """The classes DeepSpeed pickles into its model and optimizer states (besides tensors and
    Python containers), found by `torch.serialization.get_unsafe_globals_in_checkpoint` on the
    checkpoints of ZeRO-1/2/3 runs, fp32 and 16-bit. Each is data: an enum, a dataclass, a loss
    scaler's attributes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loading():
    """Every `torch.load` inside, DeepSpeed's included, uses the weights-only unpickler: torch's
    documented switch, set for the duration of the load only and restored after."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_state_types()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _load(engine, ckpt_dir: Path, step: int) -> tuple[dict | None, str | None]:
    """This rank's client state, or why it could not load it. (Under ZeRO-1/2 DeepSpeed reads all
    its files before any collective: an unreadable file fails here without hanging the others.)"""
    try:
        with weights_only_loading():
            loaded, client_state = engine.load_checkpoint(
                str(ckpt_dir), tag=_tag(step), load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: report and fall back
        return None, f"{type(e).__name__}: {e}"
    if loaded is None or client_state is None or "step" not in client_state:
        return None, "incomplete"
    return client_state, None


def load_latest(engine, ckpt_dir: Path) -> dict | None:
    """Resume every rank from the newest checkpoint complete on every rank that every rank can
    load; None if there is none to resume from. Every rank must call it."""
    steps = _agreed_steps(ckpt_dir)
    for step in steps:
        client_state, error = _load(engine, ckpt_dir, step)
        errors = _gather(error)
        if not any(errors):
            set_rng_state(client_state["rng"])  # rank 0's; the data order comes from the sampler's seed
            log.info("rank %d resumed from %s (step %d)", _rank(), ckpt_dir / _tag(step), step)
            _discard_newer(ckpt_dir, step)
            return client_state
        if _rank() == 0:
            failed = {r: e for r, e in enumerate(errors) if e}
            log.error("checkpoint %s cannot be loaded on rank(s) %s; all ranks falling back to the previous one",
                      ckpt_dir / _tag(step), failed)
    if steps:
        raise CheckpointError(f"none of the checkpoints in {ckpt_dir} could be loaded on every rank: {[_tag(s) for s in steps]} "
                              "(the log says why each failed); move them away to start over")
    _discard_newer(ckpt_dir, 0)
    return None


def _discard_newer(ckpt_dir: Path, step: int) -> None:
    """Remove what is newer than the checkpoint resumed from (partial, or not complete everywhere,
    or unloadable): those steps are redone, and a stale marker must not sit beside shards rewritten
    over it. Every rank has finished loading by now (the gather above)."""
    if not _writes_for_node() or not ckpt_dir.exists():
        return
    for path in ckpt_dir.glob("step-*"):
        if _step_of(path) > step:
            log.warning("discarding %s, newer than the checkpoint resumed from", path)
            _remove(path)
