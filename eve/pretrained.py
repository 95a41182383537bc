"""Load an EVE checkpoint for inference: what eve-eval, eve-chat, eve-serve and the lmms-eval
adapter all do."""

from __future__ import annotations

import os

import torch


def load_pretrained(pretrained: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                    attn_implementation: str | None = None):
    """(model in eval mode, processor) from a checkpoint folder or hub id. Default device: this
    process's GPU (LOCAL_RANK) when CUDA is there, else the CPU; default dtype ("auto"): bf16 on
    CUDA, fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    import eve  # noqa: F401  (Auto registration)

    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if dtype is None or dtype == "auto":
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype, **extra).to(device).eval()
    return model, AutoProcessor.from_pretrained(pretrained)
