"""Host memory per rank of eve-train under ZeRO-3 on CPU, at start-up and at export, over the model's size.

Runs the real eve-train (torch.distributed.run, 2 processes, gloo) on a ~1B-parameter EVE: a
randomly initialised LlamaForCausalLM (hidden 2048, 16 layers, ffn 5632, vocab 32000, untied) in
the `debug` flavor's tiny vision front end, saved as a stage-3 start checkpoint. The stage-3 run
is LoRA (r 8, merged at export: the export writes the whole merged model, gathered layer by
layer), fp32, micro batch 1, one optimizer step over a few synthetic image conversations.

eve-train writes <output_dir>/memory.json: the peak host RSS of each rank per phase (the peak is
reset between phases). "startup" is process start until the DeepSpeed engine is ready (model
built partitioned, weights loaded, deepspeed.initialize, checkpoint resume); "export" is the
final/ export. Each figure is also given over the full model's size in the training dtype
(parameters x 4 bytes in fp32, counted from the checkpoint's safetensors headers): 1.0 is one
whole model per rank. The same run with ZeRO-2 (the model replicated on every rank: what a
ZeRO-3 start-up cost before partitioned construction) runs beside it for comparison.

    .venv/bin/python bench/zero3_memory.py                  # ZeRO-3 and the ZeRO-2 baseline
    .venv/bin/python bench/zero3_memory.py --skip-baseline  # ZeRO-3 only

The model, its tokenizer and the data are built once under --work and reused (--rebuild makes
them anew); the model is built in a subprocess of its own. Each run's checkpoints/ (as big as the
model) is deleted once the run is read, unless --keep-checkpoints. The ranks inherit this
process's environment, e.g. MALLOC_MMAP_THRESHOLD_ (printed when set). Target (printed, not
asserted): ZeRO-3 start-up <= 0.70 of the model per rank at 2 ranks. The last line reads
`zero3_memory: startup_per_rank=<worst rank / model> export_per_rank=<worst rank / model>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
TARGET_STARTUP = 0.70
PHASES = ("startup", "train", "export")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
IMAGE_SIZES = [(32, 32), (48, 16), (16, 40), (40, 24)]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "build" / "bench" / "zero3_memory",
                    help="work folder: the start checkpoint, data and runs (reused if present)")
    ap.add_argument("--hidden", type=int, default=2048, help="decoder width")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers")
    ap.add_argument("--ffn", type=int, default=5632, help="decoder MLP width (intermediate_size)")
    ap.add_argument("--heads", type=int, default=16, help="attention heads (= key/value heads)")
    ap.add_argument("--vocab", type=int, default=32000, help="decoder vocabulary (embedding and lm_head rows)")
    ap.add_argument("--ranks", type=int, default=2, help="processes (torch.distributed.run --nproc_per_node)")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank (the adapters are merged at export)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per sample")
    ap.add_argument("--skip-baseline", action="store_true", help="skip the ZeRO-2 (replicated model) run")
    ap.add_argument("--rebuild", action="store_true", help="build the start checkpoint and data anew")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ (deleted by default)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds each eve-train run may take")
    ap.add_argument("--build-checkpoint", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the build subprocess
    return ap.parse_args()


# ---- the start checkpoint (built in a subprocess) ------------------------------------------------

def model_spec(args) -> dict:
    return {"hidden": args.hidden, "layers": args.layers, "ffn": args.ffn, "heads": args.heads, "vocab": args.vocab, "seed": 0}


def build_checkpoint(out: Path, spec: dict) -> None:
    """Write a random LlamaForCausalLM + the project's local tokenizer, wrap it into a debug-flavor
    EVE with build_eve and save that (model + processor) to `out`. Runs in its own process."""
    import torch

    import eve  # noqa: F401  (torchvision guard + Auto registration before transformers)
    from eve.build import build_eve
    from eve.testing import make_tiny_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    if len(tokenizer) > spec["vocab"]:
        raise ValueError(f"--vocab {spec['vocab']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    # The tokenizer's ids are the first len(tokenizer) rows of a Llama-sized vocabulary (as a
    # padded vocabulary would be); <image> gets the first id past the tokenizer, inside the rows.
    config = tiny_llama_config(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    decoder_dir = out.parent / (out.name + ".decoder")
    shutil.rmtree(decoder_dir, ignore_errors=True)
    torch.manual_seed(spec["seed"])
    start = time.perf_counter()
    decoder = LlamaForCausalLM(config)  # fp32
    decoder.save_pretrained(decoder_dir)
    tokenizer.save_pretrained(decoder_dir)
    del decoder
    model, processor = build_eve(str(decoder_dir), "debug", seed=spec["seed"])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    shutil.rmtree(decoder_dir)
    parts = model.num_parameters_by_part()
    print(f"built {out}: decoder {parts['decoder']:,} + vision {parts['vision']:,} parameters "
          f"in {time.perf_counter() - start:.0f} s", flush=True)


def ensure_checkpoint(args) -> Path:
    out = args.work / "eve-start"
    marker = out / "bench_spec.json"
    spec = model_spec(args)
    if not args.rebuild and marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"start checkpoint: reusing {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"start checkpoint: building {out} (subprocess) ...", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build-checkpoint", str(out)]
    cmd += [f"--{k}={v}" for k, v in spec.items() if k != "seed"]
    subprocess.run(cmd, check=True, cwd=REPO, env=child_env())
    marker.write_text(json.dumps(spec))
    return out


def safetensors_numels(folder: Path) -> dict[str, tuple[int, str]]:
    """{key: (numel, dtype)} of every tensor in `folder`'s safetensors files, from their headers alone."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for key, info in header.items():
            numel = 1
            for n in info["shape"]:
                numel *= n
            out[key] = (numel, info["dtype"])
    return out


# ---- data ---------------------------------------------------------------------------------------

def ensure_data(work: Path, rebuild: bool) -> Path:
    """A few image conversations (vicuna_v1 SFT, as tests/test_train.py's) for 1-2 steps."""
    root = work / "data"
    manifest = root / "sft.json"
    if manifest.is_file() and not rebuild:
        return manifest
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    convs = []
    for i, size in enumerate(IMAGE_SIZES):
        colour = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", size, COLOURS[colour]).save(root / "img" / f"{i}.png")
        convs.append({"id": f"s{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"It is {colour}."}]})
    manifest.write_text(json.dumps(convs))
    return manifest


# ---- the runs -----------------------------------------------------------------------------------

def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_config(args, start: Path, manifest: Path, out: Path, zero_stage: int) -> dict:
    return {
        "stage": 3, "output_dir": str(out), "data": [{"path": str(manifest)}], "init_from": str(start),
        "template": "vicuna_v1", "zero_stage": zero_stage, "precision": "fp32",
        "lora": {"r": args.lora_r, "alpha": 2.0 * args.lora_r, "merge": True},
        "lr_vision": 1e-4, "lr_decoder": 1e-4, "warmup_ratio": 0.0,
        "micro_batch_size": 1, "global_batch_size": args.ranks, "total_steps": 1, "max_length": args.max_length,
        "num_workers": 0, "gradient_checkpointing": False, "log_every": 1, "save_every": 1000, "seed": 0,
    }


def run_train(args, start: Path, manifest: Path, zero_stage: int) -> dict:
    """One eve-train run from scratch; returns its memory.json, wall time and output folder."""
    out = args.work / "runs" / f"zero{zero_stage}"
    shutil.rmtree(out, ignore_errors=True)  # a leftover run would be resumed
    out.mkdir(parents=True)
    cfg_path = out.parent / f"zero{zero_stage}.json"
    cfg_path.write_text(json.dumps(train_config(args, start, manifest, out, zero_stage), indent=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_addr", "127.0.0.1",
           "--master_port", free_port(), "-m", "train.cli", "--stage", "3", "--config", str(cfg_path)]
    log_path = out.parent / f"zero{zero_stage}.log"
    print(f"ZeRO-{zero_stage}: eve-train on {args.ranks} ranks (log {log_path}) ...", flush=True)
    wall = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"ZeRO-{zero_stage} run failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    memory = json.loads((out / "memory.json").read_text())
    if not args.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"memory": memory, "wall": wall, "out": out}


def import_baseline_gib() -> float:
    """Peak RSS of a process that only imports what an eve-train rank imports."""
    code = ("import eve, deepspeed, peft, train.trainer\n"
            "from pathlib import Path\n"
            "print(next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')).split()[1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024 / GiB


def meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / GiB
    return float("nan")


def main() -> None:
    args = parse_args()
    if args.build_checkpoint is not None:
        build_checkpoint(args.build_checkpoint, model_spec(args))
        return
    total = time.perf_counter()
    start = ensure_checkpoint(args)
    manifest = ensure_data(args.work, args.rebuild)
    tensors = safetensors_numels(start)
    n_params = sum(n for n, _ in tensors.values())
    n_decoder = sum(n for k, (n, _) in tensors.items() if k.startswith("language_model."))
    model_bytes = n_params * 4  # fp32, the training dtype here
    baseline = import_baseline_gib()
    malloc_env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    print(f"host: {os.cpu_count()} CPUs, {meminfo_gib('MemTotal'):.1f} GiB RAM ({meminfo_gib('MemAvailable'):.1f} available)"
          + (f"; ranks run with {malloc_env}" if malloc_env else ""))

    runs = {3: run_train(args, start, manifest, 3)}
    if not args.skip_baseline:
        runs[2] = run_train(args, start, manifest, 2)

    print()
    print(f"model: EVE (debug vision front end) over a LlamaForCausalLM of width {args.hidden}, {args.layers} layers, "
          f"ffn {args.ffn}, {args.heads} heads, vocab {args.vocab} (untied)")
    print(f"  {n_params / 1e9:.3f}B parameters ({n_decoder / 1e9:.3f}B decoder); full model in fp32: "
          f"{model_bytes / GiB:.2f} GiB = 1.00 below")
    print(f"run: stage 3, LoRA r={args.lora_r} merged at export, fp32, {args.ranks} ranks (CPU, gloo, 1 thread each), "
          f"micro batch 1, 1 optimizer step")
    print(f"import baseline of one process (python + torch + deepspeed + peft + eve-train): {baseline:.2f} GiB "
          f"= {baseline * GiB / model_bytes:.2f} of the model")
    print()
    head = f"{'':<8}{'phase':<9}" + "".join(f"{f'rank {r} GiB':>12}" for r in range(args.ranks)) + f"{'worst/model':>13}{'wall s':>9}"
    print(head)
    ratios = {}
    for zero, run in runs.items():
        for i, phase in enumerate(PHASES):
            per_rank = [r["host_peak_gb"] for r in run["memory"][phase]]
            ratio = max(per_rank) * GiB / model_bytes
            ratios[zero, phase] = ratio
            label = f"ZeRO-{zero}" if i == 0 else ""
            wall = f"{run['wall']:>9.0f}" if i == 0 else ""
            print(f"{label:<8}{phase:<9}" + "".join(f"{g:>12.2f}" for g in per_rank) + f"{ratio:>13.2f}{wall}")
    print()
    met = "met" if ratios[3, "startup"] <= TARGET_STARTUP else "NOT met"
    print(f"ZeRO-3 start-up: {ratios[3, 'startup']:.2f} of the model per rank (target <= {TARGET_STARTUP:.2f} at "
          f"{args.ranks} ranks: {met}); floor of a 1/{args.ranks} share plus the import baseline: "
          f"{1 / args.ranks + baseline * GiB / model_bytes:.2f}")
    if 2 in runs:
        for phase in ("startup", "export"):
            print(f"{phase}: ZeRO-3 {ratios[3, phase]:.2f} vs ZeRO-2 (replicated) {ratios[2, phase]:.2f} of the model per rank "
                  f"(ZeRO-3 / ZeRO-2 = {ratios[3, phase] / ratios[2, phase]:.2f})")
    final = runs[3]["out"] / "final"
    shards = sorted(final.glob("*.safetensors")) + sorted(final.glob("*.safetensors.index.json"))
    print(f"ZeRO-3 export {final}: " + ", ".join(f"{p.name} {p.stat().st_size / GiB:.2f} GiB" for p in shards))
    print(f"total time {time.perf_counter() - total:.0f} s")
    print(f"zero3_memory: startup_per_rank={ratios[3, 'startup']:.2f} export_per_rank={ratios[3, 'export']:.2f}")


if __name__ == "__main__":
    main()
