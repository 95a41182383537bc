"""Worker processes that die with the run that started them.

A run killed with SIGKILL cannot stop its pool: its workers, orphaned, would wait for work
forever, holding memory (and, before the run lock moved to filelock, the lock: the re-run was
refused). So each worker asks the kernel to SIGKILL it when its parent dies (Linux: prctl
PR_SET_PDEATHSIG; elsewhere a thread in the worker watches the parent's pid), then checks that
the parent did not die before it asked. The kernel sends that signal when the thread that forked
the worker ends: ProcessPoolExecutor forks all its workers (fork context) from the thread of the
first submit, here the stage's own.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_SECONDS = 1.0


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """`workers` processes forked from this one (no re-import of torch per worker), which die
    with it; None for 0 (work in this process)."""
    if workers <= 0:
        return None
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent,
                                                  initargs=(os.getpid(),))


def die_with_parent(parent: int) -> None:
    """Pool initializer: this process ends when `parent` does."""
    if not (sys.platform.startswith("linux") and _set_parent_death_signal()):
        threading.Thread(target=_watch, args=(parent,), daemon=True, name="parent-watch").start()
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


def _set_parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc or no prctl in it (musl builds without it, ...)
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os._exit(1)
