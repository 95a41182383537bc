"""The command-line tools and the environment every interpreter gets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoProcessor

from eve.build import main as build_main
from eve.smoke import main as smoke_main

REPO = Path(__file__).resolve().parents[1]


def test_a_fresh_interpreter_imports_transformers_and_open_clip():
    """The .pth hook installs the torchvision guard without `import eve`."""
    code = "from transformers import LlamaConfig; import open_clip, torchvision; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_eve_build_cli(tiny_llama_dir, tmp_path, images):
    build_main(["--decoder", str(tiny_llama_dir), "--flavor", "debug", "--out", str(tmp_path / "eve")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "eve").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "eve")
    assert model.config.image_token_id == processor.image_token_id
    inputs = processor(text=["<image> caption:"], images=images[:1])
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_smoke_runs(tmp_path, capsys):
    smoke_main(["--out", str(tmp_path), "--max-new-tokens", "2"])
    printed = capsys.readouterr().out
    assert "smoke: ok" in printed and "601" in printed  # a square image at 672 px: 601 tokens
    assert (tmp_path / "model" / "model.safetensors").exists()
