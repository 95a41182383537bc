"""Checkpoint agreement across ranks and nodes (train/checkpoint.py): in-process with threads
standing in for ranks (each on its own node's disk, or sharing one), and eve-train under torchrun
with one rank SIGKILLed in the middle of a checkpoint save."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from test_train import _cli, _env, _losses, config, data  # noqa: F401  (data: the module's fixture)
from train import checkpoint

ROOT = Path(__file__).parents[1]


class FakeEngine:
    """DeepSpeed's save/load as far as train/checkpoint.py uses them: one shard per rank."""

    def __init__(self, rank: int):
        self.rank, self.loaded = rank, []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / f"shard{self.rank}.pt").write_bytes(pickle.dumps(client_state))

    def load_checkpoint(self, load_dir, tag, **_):
        state = pickle.loads((Path(load_dir) / tag / f"shard{self.rank}.pt").read_bytes())  # raises if missing
        self.loaded.append(state["step"])
        return load_dir, state


def run_ranks(monkeypatch, fn, world: int = 2, same_node: bool = False, timeout: float = 60) -> list:
    """fn(rank) on `world` threads as ranks, with train/checkpoint.py's gather and barrier across
    them; each rank is its node's local rank 0 unless `same_node`. A rank left waiting for one that
    died gets BrokenBarrierError after `timeout`. Returns each rank's result or exception."""
    local = threading.local()
    barrier = threading.Barrier(world, timeout=timeout)
    slots = {}  # (call number, rank): what that rank gave

    def gather(obj):
        local.calls += 1
        slots[local.calls, local.rank] = obj
        barrier.wait()
        return [slots[local.calls, r] for r in range(world)]

    monkeypatch.setattr(checkpoint, "_rank", lambda: local.rank)
    monkeypatch.setattr(checkpoint, "_gather", gather)
    monkeypatch.setattr(checkpoint, "_barrier", lambda: barrier.wait())
    monkeypatch.setattr(checkpoint, "_writes_for_node", lambda: not same_node or local.rank == 0)
    results = [None] * world

    def target(rank):
        local.rank, local.calls = rank, 0
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[rank] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _save_steps(monkeypatch, dirs, engines, steps, keep_last=2):
    def fn(rank):
        for step in steps:
            state = {"step": step, "samples_consumed": 8 * step, "rng": checkpoint.rng_state()}
            checkpoint.save(engines[rank], dirs[rank], step, state, keep_last, rank == 0)

    assert run_ranks(monkeypatch, fn, same_node=dirs[0] == dirs[1]) == [None, None]


def _resume(monkeypatch, dirs, engines):
    return run_ranks(monkeypatch, lambda r: checkpoint.load_latest(engines[r], dirs[r]), same_node=dirs[0] == dirs[1])


def _names(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("step-*"))


@pytest.fixture
def nodes(tmp_path):
    """Two nodes with local disks: rank r sees only dirs[r]."""
    return [tmp_path / "node0" / "checkpoints", tmp_path / "node1" / "checkpoints"], [FakeEngine(0), FakeEngine(1)]


def test_node_local_disks_save_prune_and_resume_together(monkeypatch, nodes):
    dirs, engines = nodes
    _save_steps(monkeypatch, dirs, engines, [1, 2, 3])
    for d, rank in zip(dirs, (0, 1)):
        assert _names(d) == ["step-00000002", "step-00000003"]  # keep_last=2, pruned on each node
        assert (d / "step-00000003" / checkpoint.MARKER).exists() and (d / "step-00000003" / f"rank{rank}.saved").exists()
    states = _resume(monkeypatch, dirs, engines)
    assert [s["step"] for s in states] == [3, 3]


def test_a_file_missing_on_one_rank_makes_every_rank_fall_back(monkeypatch, nodes, caplog):
    dirs, engines = nodes
    _save_steps(monkeypatch, dirs, engines, [1, 2])
    (dirs[1] / "step-00000002" / "shard1.pt").unlink()  # rank 1's own file lost; its markers remain
    states = _resume(monkeypatch, dirs, engines)
    assert [s["step"] for s in states] == [1, 1]
    assert engines[0].loaded == [2, 1] and engines[1].loaded == [1]  # rank 0 loaded step 2 fine, yet falls back too
    assert "cannot be loaded on rank(s) {1: " in caplog.text and "FileNotFoundError" in caplog.text
    assert "falling back" in caplog.text
    assert _names(dirs[0]) == _names(dirs[1]) == ["step-00000001"]  # step 2 is redone, not kept stale


def test_a_node_killed_before_its_marker_falls_back_everywhere(monkeypatch, nodes):
    """Rank 1's node dies between the two barriers of step 2's save: node 0 has step 2 complete
    and must not have pruned step 1 (keep_last=1), which both then resume from."""
    dirs, engines = nodes
    _save_steps(monkeypatch, dirs, engines, [1], keep_last=1)
    write = checkpoint._write_atomic

    def dies_at_its_marker(path, record):
        if path.name == checkpoint.MARKER and path.is_relative_to(dirs[1]):
            raise SystemExit("killed")
        write(path, record)

    monkeypatch.setattr(checkpoint, "_write_atomic", dies_at_its_marker)
    state = {"step": 2, "samples_consumed": 16, "rng": checkpoint.rng_state()}
    results = run_ranks(monkeypatch, lambda r: checkpoint.save(engines[r], dirs[r], 2, state, 1, r == 0), timeout=2)
    assert isinstance(results[0], threading.BrokenBarrierError) and isinstance(results[1], SystemExit)
    assert (dirs[0] / "step-00000002" / checkpoint.MARKER).exists() and (dirs[0] / "step-00000001").exists()
    assert not (dirs[1] / "step-00000002" / checkpoint.MARKER).exists()
    monkeypatch.setattr(checkpoint, "_write_atomic", write)
    states = _resume(monkeypatch, dirs, engines)
    assert [s["step"] for s in states] == [1, 1] and engines[0].loaded == [1]  # step 2 never tried
    assert _names(dirs[0]) == _names(dirs[1]) == ["step-00000001"]


def test_a_save_cut_short_on_one_rank_is_never_resumed_from(monkeypatch, tmp_path):
    """Shared disk: rank 0 finished its part of step 3, rank 1 was killed while writing its own."""
    shared = tmp_path / "checkpoints"
    engines = [FakeEngine(0), FakeEngine(1)]
    _save_steps(monkeypatch, [shared, shared], engines, [1, 2])
    engines[0].save_checkpoint(shared, "step-00000003", {"step": 3}, False)
    (shared / "step-00000003" / "shard1.pt").write_bytes(b"cut sho")
    states = _resume(monkeypatch, [shared, shared], engines)
    assert [s["step"] for s in states] == [2, 2]
    assert _names(shared) == ["step-00000001", "step-00000002"]


def test_a_node_that_lost_its_checkpoints_is_an_error_not_a_fresh_start(monkeypatch, nodes):
    dirs, engines = nodes
    _save_steps(monkeypatch, dirs, engines, [1, 2])
    for path in dirs[1].glob("step-*"):  # node 1 replaced by one with an empty disk
        checkpoint._remove(path)
    results = _resume(monkeypatch, dirs, engines)
    assert all(isinstance(r, RuntimeError) and "rank(s) [1] lack their own" in str(r) for r in results), results
    assert _names(dirs[0]) == ["step-00000001", "step-00000002"]  # nothing discarded


def test_nothing_to_resume_from_starts_fresh_and_clears_partials(monkeypatch, nodes):
    dirs, engines = nodes
    engines[0].save_checkpoint(dirs[0], "step-00000001", {"step": 1}, False)  # killed in the first save
    assert _resume(monkeypatch, dirs, engines) == [None, None]
    assert _names(dirs[0]) == []


# --- eve-train under torchrun, one rank killed with SIGKILL mid-save --------------------------

def _launcher() -> list[str]:
    with socket.socket() as s:  # a free port: other test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port)]


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank} under the launcher")


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_rank_killed_mid_save_then_rerun_resumes_on_both_ranks_with_the_same_curve(
    tmp_path, data, tiny_llama_dir, tiny_clip_dir  # noqa: F811
):
    common = dict(init_is_decoder=True, flavor="debug", flavor_overrides={"teacher_model": str(tiny_clip_dir)},
                  micro_batch_size=2, save_every=1, max_steps=6)
    straight = config(tmp_path / "a", data, 1, str(tiny_llama_dir), **common)
    ref = subprocess.run(_cli(straight, tmp_path, _launcher()), env=_env(), capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = config(tmp_path / "b", data, 1, str(tiny_llama_dir), **common)
    cmd = _cli(killed, tmp_path, _launcher())
    ckpt = Path(killed.output_dir) / "checkpoints"
    step4 = ckpt / "step-00000004"
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        # Rank 1's shard of step 4 is made a FIFO: opening it to write blocks until someone reads,
        # so rank 1 stays inside step 4's save for as long as we like, while rank 0 writes its
        # part and waits for it. Made once step 1 is complete: past the start, which clears
        # step-* newer than what it resumed from, and three steps ahead of step 4's save.
        _wait_for(lambda: (ckpt / "step-00000001" / checkpoint.MARKER).exists(), proc, "step 1's checkpoint")
        step4.mkdir()
        fifo = step4 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        os.mkfifo(fifo)
        rank0_part = [step4 / "mp_rank_00_model_states.pt", step4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        _wait_for(lambda: all(p.exists() for p in rank0_part), proc, "rank 0's part of step 4")
        time.sleep(2)  # rank 0 finishes writing and waits in the barrier; rank 1 is stuck in the open
        assert not (step4 / checkpoint.MARKER).exists() and not list(step4.glob("rank*.saved"))
        _worker(proc, 1).send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # the launcher tears rank 0 down and fails
    finally:
        if proc.poll() is None:  # the test failed midway: end the launcher and its workers
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
    assert (ckpt / "step-00000003" / checkpoint.MARKER).exists() and not (step4 / checkpoint.MARKER).exists()
    assert not (Path(killed.output_dir) / "final").exists()
    fifo.unlink()
    fifo.write_bytes(b"PK\x03\x04 cut short")  # what rank 1 would really leave behind

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} resumed from {ckpt / 'step-00000003'} (step 3)" in rerun.stderr, rerun.stderr[-3000:]
    assert _losses(Path(killed.output_dir)) == _losses(Path(straight.output_dir))
    assert len(_losses(Path(straight.output_dir))) == 6


def test_a_checkpoint_from_before_rank_files_still_counts(tmp_path):
    from train.checkpoint import MARKER, _agreed_steps

    old = tmp_path / "step-00000004"  # what earlier versions wrote: DeepSpeed's files and the marker
    old.mkdir()
    (old / MARKER).write_text("{}")
    (tmp_path / "step-00000006").mkdir()  # a partial one beside it
    assert _agreed_steps(tmp_path) == [4]
