"""eve-curate's run lock: who excludes whom, refusal without waiting, and release when the holder is
killed with SIGKILL, even when it had forked worker processes that outlive it (the re-run after
`kill -9` must never be refused)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_curation.shards import CurationError, Part, run_lock

REPO = Path(__file__).resolve().parents[1]

# Takes the lock, optionally forks a process pool as the filter stage does (filtering._pool), says
# "ready" and the pool's worker pids, waits.
HOLDER = """
import concurrent.futures, multiprocessing, sys, time
from pathlib import Path
from data_curation.shards import Part, run_lock
out, part, fork = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "fork"
with run_lock(out, "filter", Part.parse(part)):
    workers = []
    if fork:
        pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
        list(pool.map(time.sleep, [0.2, 0.2]))  # both workers exist and wait for work
        workers = list(pool._processes)
    print("ready", *workers, flush=True)
    time.sleep(600)
"""


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def start_holder(out: Path, part: str = "", fork: bool = False) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), part, "fork" if fork else ""], env=child_env(),
                            stdout=subprocess.PIPE, text=True)
    ready, *workers = proc.stdout.readline().split() or [""]
    if ready != "ready":
        proc.kill()
        raise AssertionError("the holder did not take the lock")
    return proc, [int(w) for w in workers]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def refused(out: Path, stage: str = "filter", part: Part = Part()) -> bool:
    try:
        with run_lock(out, stage, part):
            return False
    except CurationError as e:
        assert str(e).startswith("another eve-curate is running") and "(lock " in str(e)
        return True


def test_whole_runs_exclude_all_and_parts_run_side_by_side(tmp_path):
    out = tmp_path / "out"
    with run_lock(out, "embed"):
        assert refused(out, "embed") and refused(out, "select") and refused(out, "embed", Part(0, 2))
    with run_lock(out, "embed", Part(0, 2)):
        assert not refused(out, "embed", Part(1, 2))  # the other part may run beside it
        assert refused(out, "embed", Part(0, 2))  # the same part may not
        assert refused(out, "embed") and refused(out, "select")  # nor a whole-stage run
        with pytest.raises(CurationError, match=r"embed part 0/2 on .*lock-part-0-of-2"):
            with run_lock(out, "embed", Part(0, 2)):
                pass
    assert not refused(out, "embed")  # all released on leaving


def test_refusal_does_not_wait(tmp_path):
    out = tmp_path / "out"
    holder, _ = start_holder(out)
    try:
        start = time.monotonic()
        assert refused(out) and refused(out, "embed", Part(1, 3))
        assert time.monotonic() - start < 2
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("part", ["", "1/2"])
def test_sigkill_releases_the_lock(tmp_path, part):
    out = tmp_path / "out"
    holder, _ = start_holder(out, part)
    assert refused(out) and refused(out, "filter", Part.parse(part))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert not refused(out)  # the re-run takes the whole stage
    if part:
        assert not refused(out, "filter", Part.parse(part))


@pytest.mark.parametrize("part", ["", "1/2"])
def test_orphaned_forked_workers_do_not_hold_the_lock(tmp_path, part):
    out = tmp_path / "out"
    holder, workers = start_holder(out, part, fork=True)
    try:
        assert len(workers) == 2
        holder.send_signal(signal.SIGKILL)  # the run only: its workers live on, orphaned
        holder.wait()
        assert all(map(alive, workers)), "the pool workers should outlive the killed run"
        assert not refused(out)
        if part:
            assert not refused(out, "filter", Part.parse(part))
    finally:
        holder.kill()
        holder.wait()
        for pid in filter(alive, workers):
            os.kill(pid, signal.SIGKILL)


def test_lock_stays_held_after_forked_workers_exit(tmp_path):
    out = tmp_path / "out"
    probe = ("import sys; from pathlib import Path; from data_curation.shards import CurationError, run_lock\n"
             "try:\n    with run_lock(Path(sys.argv[1]), 'select'): print('acquired')\n"
             "except CurationError: print('refused')")
    env = child_env()
    with run_lock(out, "filter"):
        pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
        assert sum(pool.map(abs, range(-4, 4))) == 16
        pool.shutdown()
        got = subprocess.run([sys.executable, "-c", probe, str(out)], env=env, capture_output=True, text=True)
        assert got.stdout.strip() == "refused", got.stderr
    got = subprocess.run([sys.executable, "-c", probe, str(out)], env=env, capture_output=True, text=True)
    assert got.stdout.strip() == "acquired", got.stderr
