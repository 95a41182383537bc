"""eve-curate end to end on generated images: every stage, the bad-image zoo, counts that add up,
selection against brute force, kill -9 resume, captioning with an EVE checkpoint."""

from __future__ import annotations

import io
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
from PIL import Image

from data_curation.cli import main as curate
from data_curation.selection import assign, top_n_per_cluster
from eve.testing import make_tiny_open_clip
from train.config import DataSource
from train.data import Manifest

REPO = Path(__file__).resolve().parents[1]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_sources(root: Path, n: int = 120) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    laion, sa = root / "laion", root / "sa"
    laion.mkdir(parents=True)
    sa.mkdir()
    for i in range(n):
        w, h = [(64, 48), (48, 64), (40, 40), (20, 60), (200, 40)][i % 5]
        colour = rng.integers(0, 255, 3)
        Image.fromarray(np.tile(colour, (h, w, 1)).astype(np.uint8)).save(laion / f"{i:04d}.png")
    # the bad-image zoo, all in the clustered source
    (laion / "zero.jpg").write_bytes(b"")
    (laion / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
    (laion / "truncated.png").write_bytes(_png(Image.new("RGB", (64, 64), "red"))[:60])
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(laion / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(laion / "deep16.png")
    Image.new("P", (64, 64)).save(laion / "palette.png")
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(laion / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("L", (3000, 3000)).save(laion / "bomb.png")  # rejected by --max-pixels
    (laion / "dup.png").write_bytes((laion / "0000.png").read_bytes())  # an exact duplicate
    for i in range(8):
        Image.new("RGB", (64, 64), (i * 30, 10, 10)).save(sa / f"{i}.png")
    with tarfile.open(root / "openimages.tar", "w") as tar:
        for i in range(6):
            data = _png(Image.new("RGB", (48, 48), (10, i * 40, 10)))
            info = tarfile.TarInfo(f"{i:03d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq_dir = root / "parquet"
    pq_dir.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(4):
        Image.new("RGB", (50, 40), (10, 10, i * 60)).save(pq_dir / f"k{i}.jpg")
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(4)], "caption": ["x"] * 4}), pq_dir / "part-0.parquet")
    return {"laion": laion, "sa": sa, "openimages": root / "openimages.tar", "web": pq_dir / "part-0.parquet"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_open_clip(tmp_path_factory.mktemp("clip32"), image_size=32, patch_size=8)


def pipeline_config(root: Path, sources: dict, clip_dir: Path, out: Path) -> dict:
    return {
        "out": str(out),
        "scan": {"input": [f"{k}={v}" for k, v in sources.items()], "shard_size": 16},
        "filter": {"min_side": 32, "max_aspect": 4.0, "dedup": True, "max_pixels": 4_000_000},
        "embed": {"model": str(clip_dir), "sources": ["laion"], "batch_size": 8},
        "cluster": {"k": 6, "niter": 10, "seed": 0},
        "select": {"per_cluster": 10},
    }


def test_pipeline_end_to_end_and_counts_add_up(tmp_path, clip_dir):
    sources = make_sources(tmp_path / "src")
    out = tmp_path / "out"
    cfg = pipeline_config(tmp_path, sources, clip_dir, out)
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(cfg))
    curate(["run", "--config", str(path)])
    from data_curation.decisions import final_decisions

    kept = [it for it in final_decisions(out) if it["status"] == "kept"]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"uid": it["uid"], "caption": "flat colour"}) + "\n" for it in kept))
    curate(["caption", "--out", str(out), "--captions-file", str(tmp_path / "caps.jsonl")])
    curate(["export", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]
    assert summary["counts_add_up"] and final["items"] == summary["scan"]["items"] == 120 + 9 + 8 + 6 + 4
    reasons = final["rejected_by_reason"]
    assert reasons["too_small"] == 24  # the 20x60 images
    assert reasons["bad_aspect"] == 24  # 200x40
    assert reasons["duplicate"] == 1 and reasons["empty"] == 1 and reasons["too_large"] == 1
    assert reasons["decode_error"] == 2  # corrupt, truncated
    assert reasons["cluster_rank"] == summary["select"]["rejected_cluster_rank"]
    assert final["kept"] == 8 + 6 + 4 + summary["select"]["selected"]  # unclustered sources kept whole
    assert summary["cluster"]["trained_points"] == summary["cluster"]["embeddings_sampled"]
    assert (out / "cluster_sizes.png").exists()
    manifest = Manifest(DataSource(str(out / "export" / "train.jsonl")))
    assert len(manifest) == final["kept"]
    assert manifest[0]["conversations"][1]["value"] == "flat colour"
    assert json.loads((out / "export" / "llava.json").read_text())[0]["id"] == manifest[0]["id"]


def test_selection_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.normal(size=(7, 16)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    ids, sims = assign(x, c, chunk=64)
    ref = x @ c.T
    assert np.array_equal(ids, ref.argmax(1)) and np.allclose(sims, ref.max(1), atol=1e-5)
    uids = np.asarray([f"u{i:04d}" for i in range(500)])
    kept = set(uids[top_n_per_cluster(ids, sims, uids, 20)])
    brute = set()
    for k in range(7):
        members = np.flatnonzero(ref.argmax(1) == k)
        brute |= set(uids[members[np.argsort(-ref[members, k], kind="stable")][:20]])
    assert kept == brute


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_kill_9_during_embed_then_rerun(tmp_path, clip_dir):
    sources = {"laion": make_sources(tmp_path / "src", n=300)["laion"]}
    outs = {}
    for name in ("straight", "killed"):
        out = tmp_path / name
        curate(["scan", "--out", str(out), "--input", f"laion={sources['laion']}", "--shard-size", "8"])
        curate(["filter", "--out", str(out), "--min-side", "32", "--max-pixels", "4000000"])
        outs[name] = out
    cmd = [sys.executable, "-m", "data_curation.cli", "embed", "--out", str(outs["killed"]), "--model", str(clip_dir), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((outs["killed"] / "embed").glob("shard-*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = len(list((outs["killed"] / "filter").glob("shard-*.jsonl")))
    done = len(list((outs["killed"] / "embed").glob("shard-*.json")))
    assert 1 <= done < total, "the run should have been killed mid-way"
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, cwd=REPO, timeout=600)
    curate(["embed", "--out", str(outs["straight"]), "--model", str(clip_dir), "--batch-size", "1"])
    for meta in sorted((outs["straight"] / "embed").glob("shard-*.json")):
        other = outs["killed"] / "embed" / meta.name
        assert json.loads(meta.read_text())["uids"] == json.loads(other.read_text())["uids"]
        np.testing.assert_allclose(np.load(meta.with_suffix(".npy")), np.load(other.with_suffix(".npy")), atol=1e-5)
    assert not list((outs["killed"] / "embed").glob("*.tmp*"))


def test_caption_with_an_eve_checkpoint(tmp_path, clip_dir, built):
    model, processor = built
    ckpt = tmp_path / "eve"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (i * 80, 0, 0)).save(src / f"{i}.png")
    out = tmp_path / "out"
    curate(["scan", "--out", str(out), "--input", f"sa={src}"])
    curate(["filter", "--out", str(out), "--min-side", "32"])
    curate(["caption", "--out", str(out), "--model", str(ckpt), "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in (out / "caption" / "shard-00000.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["model"] == str(ckpt) and "prompt" in r and r["max_new_tokens"] == 4 for r in rows)


def test_help_for_every_subcommand(capsys):
    for stage in ["scan", "filter", "embed", "cluster", "select", "caption", "export", "run"]:
        with pytest.raises(SystemExit) as e:
            curate([stage, "--help"])
        assert e.value.code == 0
        assert "--" in capsys.readouterr().out
