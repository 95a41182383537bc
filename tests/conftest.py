"""Shared fixtures: a tiny Llama and a tiny open_clip model written to disk once per session,
and a debug-flavor EVE built from them through the same code path as a real Vicuna."""

from __future__ import annotations

import os
from pathlib import Path

# DeepSpeed's JIT-built ops are cached here (scripts/setup_env.sh builds them once).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "build" / "torch_extensions"))

import numpy as np
import pytest
import torch
from PIL import Image

import eve  # noqa: F401  (torchvision guard + Auto registration before transformers)
from eve.build import build_eve
from eve.testing import make_tiny_llama, make_tiny_open_clip


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def built(tiny_llama_dir):
    model, processor = build_eve(str(tiny_llama_dir), "debug", seed=0)
    return model.eval(), processor


@pytest.fixture(scope="session")
def checkpoint(built, tmp_path_factory):
    """The debug EVE saved with save_pretrained: what `from_pretrained` users and the CLIs load."""
    model, processor = built
    path = tmp_path_factory.mktemp("eve-ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lively(checkpoint, tmp_path_factory):
    """The debug EVE with weights that make its answers depend on what it is shown (the server
    and chat tests compare answers)."""
    from serving import lively_checkpoint

    return lively_checkpoint(checkpoint, tmp_path_factory.mktemp("lively"))


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """`eve-demo --quick` once per session (about six minutes on 2 cores): (run folder, its output)."""
    from demo_run import finish, start_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    return out, finish(start_demo(out))


@pytest.fixture
def model(built):
    return built[0]


@pytest.fixture
def fresh_model(tiny_llama_dir):
    """A model of its own, for tests that train or otherwise change it."""
    return build_eve(str(tiny_llama_dir), "debug", seed=0)[0]


@pytest.fixture
def processor(built):
    return built[1]


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture
def images():
    """Images of several aspect ratios (1:1, 3:1, 1:5)."""
    return [random_image(60, 60, 1), random_image(90, 30, 2), random_image(20, 100, 3)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
