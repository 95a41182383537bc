"""Running `eve-demo --quick` from tests (test_demo.py checks it; test_web_page.py talks to its model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

FINAL_LINE = re.compile(r"^demo: heldout_accuracy=([0-9.]+) unseen_ar_accuracy=([0-9.]+) chance=([0-9.]+)$", re.M)


def clean_env() -> dict:
    """This environment without a launcher's rank variables (pytest may run under one)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def start_demo(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "demo.cli", "--quick", "--out", str(out), *extra], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-4000:]
    return output
