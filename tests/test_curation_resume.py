"""kill -9 and re-run: `eve-curate run` in a real subprocess, killed with SIGKILL mid-stage, then
run again, gives exactly the outputs of an uninterrupted run, without redoing finished shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from curation_data import MAX_PIXELS, MIN_SIDE, make_sources, write_captions_file

from data_curation.cli import main as curate
from data_curation.shards import SHARD_DELAY_ENV
from eve.testing import make_tiny_open_clip

REPO = Path(__file__).resolve().parents[1]
VOLATILE = {"seconds", "updated", "out"}


def pipeline(sources: dict, clip_dir: Path, captions: Path, out: Path) -> dict:
    return {
        "out": str(out),
        "scan": {"input": [f"{k}={v}" for k, v in sources.items()], "shard_size": 8},
        "filter": {"min_side": MIN_SIDE, "dedup": True, "max_pixels": MAX_PIXELS, "workers": 0},
        "embed": {"model": str(clip_dir), "sources": ["laion"], "batch_size": 4, "workers": 0},
        "cluster": {"k": 3, "niter": 8, "seed": 0},
        "select": {"per_cluster": 6},
        "caption": {"captions_file": str(captions)},
        "export": {"webdataset": True, "per_tar": 7},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    sources, _ = make_sources(root / "src", n_laion=40)
    write_captions_file(root / "captions.jsonl", sources, set())
    clip_dir = make_tiny_open_clip(root / "clip", image_size=32, patch_size=8)
    straight = root / "straight"
    (root / "straight.json").write_text(json.dumps(pipeline(sources, clip_dir, root / "captions.jsonl", straight)))
    assert curate(["run", "--config", str(root / "straight.json")]) == 0
    return root, sources, clip_dir, straight


def _env(delay: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, SHARD_DELAY_ENV: str(delay), "PYTHONPATH": str(REPO)}


def _command(config: Path) -> list[str]:
    return [sys.executable, "-m", "data_curation.cli", "run", "--config", str(config)]


def kill_when(config: Path, ready, timeout: float = 180) -> bool:
    """Start the pipeline, SIGKILL it as soon as `ready()` holds; False if it finished first."""
    proc = subprocess.Popen(_command(config), env=_env(0.25), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        raise AssertionError("the pipeline neither finished nor reached the kill point")
    assert proc.returncode == 0
    return False


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def assert_same_outputs(a: Path, b: Path) -> None:
    for rel in ("export/train.jsonl", "export/decisions.jsonl", "export/llava.json", "cluster/centroids.npy", "select/thresholds.npz"):
        if rel.endswith((".npy", ".npz")):
            za, zb = np.load(a / rel), np.load(b / rel)
            for name in (za.files if rel.endswith(".npz") else [None]):
                np.testing.assert_allclose(za[name] if name else za, zb[name] if name else zb, atol=1e-6, err_msg=rel)
        else:
            assert (a / rel).read_text() == (b / rel).read_text(), rel
    for stage in ("scan", "filter", "select", "caption"):
        names = sorted(p.name for p in (a / stage).glob("shard-*"))
        assert names == sorted(p.name for p in (b / stage).glob("shard-*")) and names, stage
        for n in names:
            assert (a / stage / n).read_text() == (b / stage / n).read_text(), f"{stage}/{n}"
    for p in sorted((a / "embed").glob("shard-*.npy")):
        np.testing.assert_allclose(np.load(p), np.load(b / "embed" / p.name), atol=1e-6)
        assert (p.with_suffix(".json")).read_text() == (b / "embed" / p.with_suffix(".json").name).read_text()
    for p in sorted((a / "export" / "webdataset").glob("*.tar")):
        with tarfile.open(p) as ta, tarfile.open(b / "export" / "webdataset" / p.name) as tb:
            assert [(m.name, ta.extractfile(m).read()) for m in ta] == [(m.name, tb.extractfile(m).read()) for m in tb]
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    assert _strip(sa) == _strip(sb) and sb["counts_add_up"]
    assert not [p for p in b.rglob("*.tmp*")], "temporary files left behind"


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


def test_kill_9_mid_embed_then_rerun_equals_uninterrupted(setup):
    root, sources, clip_dir, straight = setup
    out = root / "killed_once"
    config = root / "killed_once.json"
    config.write_text(json.dumps(pipeline(sources, clip_dir, root / "captions.jsonl", out)))
    total = json.loads((straight / "scan" / "done.json").read_text())["shards"]
    assert kill_when(config, lambda: _count(out / "embed", "shard-*.json") >= 2)
    done = sorted((out / "embed").glob("shard-*.json")) + sorted((out / "filter").glob("shard-*.jsonl"))
    assert 2 <= _count(out / "embed", "shard-*.json") < total, "killed mid-stage"
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    subprocess.run(_command(config), env=_env(0), cwd=REPO, check=True, capture_output=True, timeout=300)
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes, "a finished shard was redone"
    assert_same_outputs(straight, out)


@pytest.mark.slow
def test_kill_9_in_every_stage_then_rerun_equals_uninterrupted(setup):
    root, sources, clip_dir, straight = setup
    out = root / "killed_often"
    config = root / "killed_often.json"
    config.write_text(json.dumps(pipeline(sources, clip_dir, root / "captions.jsonl", out)))
    points = [
        lambda: _count(out / "scan", "shard-*.jsonl") >= 2,
        lambda: _count(out / "filter", "shard-*.jsonl") >= 3,
        lambda: _count(out / "embed", "shard-*.json") >= 1,
        lambda: _count(out / "select" / "assign", "shard-*.npz") >= 1,
        lambda: _count(out / "select", "shard-*.jsonl") >= 2,
        lambda: _count(out / "caption", "shard-*.jsonl") >= 1,
        lambda: _count(out / "export" / "webdataset", "shard-*.tar") >= 1,
    ]
    killed = sum(kill_when(config, ready) for ready in points)
    assert killed >= 5
    subprocess.run(_command(config), env=_env(0), cwd=REPO, check=True, capture_output=True, timeout=300)
    assert_same_outputs(straight, out)
