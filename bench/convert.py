"""eve-convert's time and memory on a ~1B-parameter EVE checkpoint in the released layout.

Writes a random checkpoint the way the reference saved BAAI/EVE-7B-v1.0 (LlamaForCausalLM names
plus vision_tower / mm_projector / vision_tower_compressor / vision_clip, bf16, sharded
pytorch_model-*.bin with an index, a SentencePiece tokenizer), then converts it twice, each in a
fresh process so that peak RSS is its own: eve-convert, and side by side the plain way (load the
whole state dict with torch.load, rename, huggingface_hub.save_torch_state_dict). Reports
seconds, peak RSS, the RSS of a process that only imports the converter (the floor every run
pays), and peak RSS over the largest source shard.

    .venv/bin/python bench/convert.py [--shard-gb 1.2] [--keep DIR]

The last line reads `convert: seconds=<x> peak_rss_over_largest_shard=<ratio>`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OURS = """
import sys
from eve.convert import convert_reference_to_eve
convert_reference_to_eve(sys.argv[1], sys.argv[2])
"""
NAIVE = """
import json, sys
from pathlib import Path
import torch
from huggingface_hub import save_torch_state_dict
import eve.convert  # the same imports as ours
from eve.reference_layout import classify_reference_key
src = Path(sys.argv[1])
state = {}
for shard in sorted(set(json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"].values())):
    state.update(torch.load(src / shard, map_location="cpu", weights_only=True))
renamed = {}
for key, value in state.items():
    kind, name = classify_reference_key(key)
    if kind == "model":
        renamed[name] = value
Path(sys.argv[2]).mkdir(parents=True)
save_torch_state_dict(renamed, sys.argv[2], max_shard_size="5GB")
"""
# VmHWM, not ru_maxrss: a child's ru_maxrss keeps the RSS of the parent it was forked from.
PEAK_RSS = "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
IMPORTS_ONLY = "import eve.convert, torch, transformers, huggingface_hub"


def run_child(code: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of `code` in a fresh interpreter."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", f"{code}\n{PEAK_RSS}", *args],
        cwd=ROOT, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return seconds, int(proc.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-gb", type=float, default=1.2, help="source shard size (the release: ~10 GB at 7B)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig

    from eve.testing_reference import write_reference_checkpoint

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "EVE-1B-ref"
    text = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
    start = time.perf_counter()
    if not (src / "pytorch_model.bin.index.json").exists():
        write_reference_checkpoint(src, text, width=1024, patch=14, image_size=672, teacher_size=336, teacher_patch=14,
                                   fmt="bin", shard_bytes=int(args.shard_gb * 1e9), dtype=torch.bfloat16)
    shards = sorted(src.glob("pytorch_model-*.bin"))
    largest = max(p.stat().st_size for p in shards) / 2**30
    weights = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    print(f"source: {len(weights)} tensors in {len(shards)} .bin shards, {sum(p.stat().st_size for p in shards) / 2**30:.2f} GiB "
          f"(largest {largest:.2f} GiB), written in {time.perf_counter() - start:.1f} s")

    _, floor = run_child(IMPORTS_ONLY)
    results = {}
    for name, code in (("eve-convert", OURS), ("load-all + save_torch_state_dict", NAIVE)):
        out = work / f"out-{name.split()[0]}"
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak = run_child(code, str(src), str(out))
        results[name] = (seconds, peak)
        print(f"{name:>34}: {seconds:6.1f} s  peak RSS {peak:5.2f} GiB  ({peak / largest:.2f} x largest shard, "
              f"{(peak - floor) / largest:.2f} x above the import floor of {floor:.2f} GiB)")
        shutil.rmtree(out, ignore_errors=True)
    (ours_s, ours_peak), (naive_s, naive_peak) = results.values()
    print(f"eve-convert vs load-all: time {ours_s / naive_s:.2f}x, peak RSS {ours_peak / naive_peak:.2f}x")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"convert: seconds={ours_s:.1f} peak_rss_over_largest_shard={ours_peak / largest:.2f}")


if __name__ == "__main__":
    main()
