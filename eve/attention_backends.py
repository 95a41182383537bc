"""SDPA kernels for generation, where the attention shapes change at nearly every call.

torch (2.11 on Hopper and newer) sends a masked `scaled_dot_product_attention` to cuDNN first, and
cuDNN builds an execution plan for each (batch, query, key) shape it has not seen. A decode step's
key length grows by one per step, and batches of other prompts have other lengths and sizes, so
generating over varied requests meets a new shape at nearly every step. Measured on an H200 (torch
2.11, bf16, q_len 1, padding mask): a new shape took 40 ms with cuDNN (up to 0.6 s) and 0.08 ms
with the memory-efficient kernel; a repeated shape, 0.05 and 0.07 ms. Behind eve-serve, 32-row
batches ran at 0.2-0.3 of direct `generate`'s throughput with cuDNN, 0.84 without (bench/serve.py).

The model knows nothing of this: callers that generate choose the kernels around the call.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN left out; flash and memory-efficient attention need no per-shape plan, math takes the rest.
PLANLESS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def varying_shape_attention(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context for generating on `device`: SDPA without cuDNN on CUDA, nothing changed elsewhere."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(PLANLESS)
