"""What serving costs: the demo-sized EVE behind `eve-serve` against direct `generate`, in one run.

The same R requests (an image of a random aspect ratio from 1:3 to 3:1 and a question each,
greedy, --max-tokens new tokens) go
  direct: through `processor` + `model.generate` in this process, --batch-size at a time, back to back;
  served: to `eve-serve --max-batch-size <batch-size>` (a subprocess on 127.0.0.1) from --clients
          concurrent clients, each sending its share one after another over a keep-alive connection.
The default is twice as many clients as the batch holds, so that a full batch waits while one
runs: with fewer, the server idles while the clients it just answered send their next request.
Requests/s, generated tokens/s and p50/p95 latency (direct: a request's latency is its batch's
time) are printed side by side, with the server's mean batch, the share of the time it spent
generating and the clients' own CPU. --rounds alternate direct and served; this machine's speed
drifts by +-15% within a minute, so a round is short and the summary is the median of the
per-round served/direct ratios (each pair run back to back), not a ratio of medians.
Both sides use the SDPA kernels the engine uses (`eve.attention_backends`: no cuDNN on CUDA),
so the ratio measures serving, not a kernel choice; direct repeats its batches each round, and
would otherwise reuse cuDNN plans that a server's ever-new shapes never can.
Peak memory: the max RSS of this process (direct) and of the server (its front and engine
processes together).

The model is the demo's size (a 4-layer Llama, d 128, 96-px images in 4-px patches), with random
weights unless --model names a checkpoint (e.g. runs/demo/final).

    .venv/bin/python bench/serve.py
    .venv/bin/python bench/serve.py --model runs/demo/final --clients 32 --batch-size 16

Last line: `serve: throughput_ratio=<served/direct requests/s> p95_s=<served p95 latency>`.
Target (printed, not asserted): throughput_ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# This file's folder comes first on sys.path and its name would hide the `serve` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import eve  # noqa: E402,F401  (before transformers: the torchvision import guard, Auto registration)

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What color are the shapes?", "How many shapes are there?", "What shape are they?", "Describe the picture."]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint to serve (default: a demo-sized EVE with random weights)")
    ap.add_argument("--requests", type=int, default=64, help="requests per round")
    ap.add_argument("--clients", type=int, default=16,
                    help="concurrent clients (default twice the batch: a full batch waits while one runs)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's CPU threads for generation, direct and served alike (default: torch's, one per core)")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... for both sides (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="both sides (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--work", default=str(ROOT / "build" / "bench" / "serve"))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def demo_sized_model(work: Path) -> Path:
    from eve.build import build_eve
    from eve.testing import make_tiny_llama

    out = work / "model"
    if not (out / "config.json").is_file():
        decoder = make_tiny_llama(work / "decoder", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                  num_key_value_heads=4, max_position_embeddings=512)
        model, processor = build_eve(str(decoder), "demo", image_size=96, teacher_image_size=48)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def make_requests(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ratio = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
        w, h = (128, max(16, round(128 / ratio))) if ratio >= 1 else (max(16, round(128 * ratio)), 128)
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(180, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(4, 16))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 200, 3)))
        out.append((img, QUESTIONS[i % len(QUESTIONS)]))
    return out


def messages(image: Image.Image, question: str) -> list[dict]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]


def run_direct(model, processor, requests, batch_size: int, max_tokens: int) -> dict:
    from eve.attention_backends import varying_shape_attention
    from serve.messages import render

    latencies, tokens = [], 0
    tok = processor.tokenizer
    start = time.perf_counter()
    for b in range(0, len(requests), batch_size):
        batch = requests[b : b + batch_size]
        t0 = time.perf_counter()
        prompts = [render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]) for _, q in batch]
        inputs = processor(text=prompts, images=[im for im, _ in batch], return_tensors="pt").to(model.device)
        with torch.inference_mode(), varying_shape_attention(model.device):  # the engine's kernels
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1] :]
        tokens += int((new != tok.pad_token_id).sum())
        latencies += [time.perf_counter() - t0] * len(batch)
    return {"wall": time.perf_counter() - start, "latencies": latencies, "tokens": tokens}


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.load(r)


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def run_served(port: int, name: str, requests, clients: int, max_tokens: int, server: int) -> dict:
    """`clients` threads, each with one keep-alive connection, posting its share of the requests
    one after another. Plain http.client rather than the `openai` package (whose answers the
    tests check): the clients share this machine's two cores with the server, so they are kept
    as light as a client can be."""
    bodies = [json.dumps({"model": name, "messages": messages(im, q), "max_tokens": max_tokens}).encode() for im, q in requests]

    def worker(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        out = []
        for body in bodies[k::clients]:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"eve-serve answered {response.status}: {data[:300]!r}")
            out.append((time.perf_counter() - t0, json.loads(data)["usage"]["completion_tokens"]))
        conn.close()
        return out

    before = health(port)
    engine = sum(map(cpu_s, children(server)))  # the engine process (and multiprocessing's idle helper)
    front = cpu_s(server)
    cpu0, start = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(worker, range(clients)) for x in part]
    wall = time.perf_counter() - start
    after = health(port)
    engine = sum(map(cpu_s, children(server))) - engine
    front = cpu_s(server) - front
    return {"wall": wall, "front_ms": front / len(requests) * 1e3, "engine_cores": engine / wall, "latencies": [r[0] for r in results], "tokens": sum(r[1] for r in results),
            "client_cpu": (time.process_time() - cpu0) / wall, "busy": (after["busy_s"] - before["busy_s"]) / wall,
            "batch": (after["requests"] - before["requests"]) / max(1, after["batches"] - before["batches"])}


def rss_mb(pid: int | None = None) -> float:
    """Peak RSS of this process, or of a process and its children (eve-serve: front and engine)."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            total += int(line.split()[1]) / 1024
    for child in children(pid):
        total += rss_mb(child)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, batch_size: int, threads: int | None, device: str, dtype: str) -> subprocess.Popen:
    log = open(Path(model).parent / "server.log", "w")
    command = [sys.executable, "-m", "serve.cli", str(model), "--port", str(port), "--max-batch-size", str(batch_size),
               "--device", device, "--dtype", dtype, "--log-level", "warning"] + ([] if threads is None else ["--threads", str(threads)])
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"eve-serve exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("eve-serve did not come up in 180 s")


def summary(run: dict, n: int) -> dict:
    lat = sorted(run["latencies"])
    return {**run, "rps": n / run["wall"], "tok_s": run["tokens"] / run["wall"], "p50": statistics.median(lat),
            "p95": lat[min(len(lat) - 1, int(np.ceil(0.95 * len(lat))) - 1)]}


def main() -> None:
    args = parse_args()
    from eve.pretrained import load_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.model) if args.model else demo_sized_model(work)
    model, processor = load_pretrained(str(path), args.device, args.dtype)
    requests = make_requests(args.requests, args.seed)
    port = free_port()
    server = start_server(path, port, args.batch_size, args.threads, str(model.device), args.dtype)
    name = path.name
    try:
        run_served(port, name, requests[: args.clients], args.clients, 4, server.pid)  # warm-up: both paths once
        run_direct(model, processor, requests[: args.batch_size], args.batch_size, 4)
        direct, served = [], []
        for r in range(args.rounds):
            first, second = ("direct", "served") if r % 2 == 0 else ("served", "direct")
            for side in (first, second):
                if side == "direct":
                    direct.append(summary(run_direct(model, processor, requests, args.batch_size, args.max_tokens), len(requests)))
                else:
                    served.append(summary(run_served(port, name, requests, args.clients, args.max_tokens, server.pid),
                                          len(requests)))
        server_rss = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def med(runs, key):
        return statistics.median(x[key] for x in runs)

    print(f"model: {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.device}, {model.dtype}), "
          f"torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores")
    print(f"{args.requests} requests x {args.max_tokens} new tokens, batch {args.batch_size}, {args.clients} clients, "
          f"{args.rounds} rounds (medians)")
    print(f"{'':8} {'req/s':>8} {'tok/s':>8} {'p50 s':>8} {'p95 s':>8} {'peak MB':>9}")
    for label, runs, mem in (("direct", direct, rss_mb()), ("served", served, server_rss)):
        print(f"{label:8} {med(runs, 'rps'):8.2f} {med(runs, 'tok_s'):8.1f} {med(runs, 'p50'):8.3f} {med(runs, 'p95'):8.3f} {mem:9.0f}")
    print(f"served: mean batch {med(served, 'batch'):.1f}, engine busy {med(served, 'busy'):.0%} of the time, "
          f"clients' CPU {med(served, 'client_cpu'):.0%} of a core")
    print(f"server CPU: HTTP front {med(served, 'front_ms'):.1f} ms per request, engine {med(served, 'engine_cores'):.2f} cores")
    ratios = [s["rps"] / d["rps"] for d, s in zip(direct, served)]
    ratio = statistics.median(ratios)
    print(f"per-round served/direct: {', '.join(f'{x:.2f}' for x in ratios)}; mean {statistics.mean(ratios):.2f}, "
          f"ratio of medians {med(served, 'rps') / med(direct, 'rps'):.2f}  (target >= 0.9)")
    print(f"serve: throughput_ratio={ratio:.2f} p95_s={med(served, 'p95'):.3f}")


if __name__ == "__main__":
    main()
