"""Load an EVE checkpoint for inference, as `eve-chat` and `eve-serve` do."""

from __future__ import annotations

import torch


def load(model: str, device: str | None = None, dtype: str = "auto"):
    """(model, processor) from a checkpoint folder or hub id: bf16 on CUDA, fp32 on CPU unless
    `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    import eve  # noqa: F401  (registers EVE with the Auto classes)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    return net, AutoProcessor.from_pretrained(model)
