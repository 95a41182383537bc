"""Helpers for the eve-serve / eve-chat / page tests: a model whose answers depend on what it is
shown, a server started as users start it, and `generate` run directly for comparison."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from demo_run import clean_env


def lively_checkpoint(checkpoint: Path, out: Path) -> Path:
    """The debug EVE with its weight matrices redrawn at std 0.3: at the usual 0.02 a random model
    says the same thing whatever it is shown, which would let a wrong prompt or image pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    for f in Path(checkpoint).iterdir():  # processor, tokenizer, chat templates
        if not (out / f.name).exists():
            (shutil.copytree if f.is_dir() else shutil.copy)(f, out / f.name)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`eve-serve MODEL ...` in a subprocess, as a user runs it."""

    def __init__(self, model: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.cli", str(model), "--port", str(self.port), *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=clean_env())
        deadline = time.time() + 180
        while True:
            assert self.proc.poll() is None, f"eve-serve exited: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"eve-serve did not start: {log.read_text()[-3000:]}"
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(0.3)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.load(r)

    def post_raw(self, path: str, data: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def engine_pid(self) -> int:
        """The engine process (eve-serve's child that generates)."""
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        engines = [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert len(engines) == 1, kids
        return engines[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_openai(messages: list[dict], images: list) -> list[dict]:
    """Structured chat messages ({"type": "image"} parts) -> OpenAI's (image_url data URLs)."""
    it = iter(images)
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = [{"type": "image_url", "image_url": {"url": data_url(next(it))}} if p["type"] == "image" else p
                 for p in m["content"]]
        out.append({"role": m["role"], "content": parts})
    return out


def generate_directly(model, processor, messages: list[dict], images: list, max_new_tokens: int) -> tuple[str, int]:
    """(answer, prompt tokens) of plain `generate` on one conversation, greedy."""
    from serve.messages import render

    inputs = processor(text=[render(processor, messages)], images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    n = inputs["input_ids"].shape[1]
    return processor.decode(out[0, n:], skip_special_tokens=True), n
