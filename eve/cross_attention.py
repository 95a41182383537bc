"""Multi-head cross-attention without q/k/v projections of its own, shared by CA1, CA2 and CA3."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Lq, C], k/v [B, Lk, C] -> [B, Lq, C].

    `scale` None means head_dim**-0.5. `key_padding_mask` [B, Lk] is True for real keys.
    """
    B, Lq, C = q.shape
    Lk = k.shape[1]
    hd = C // num_heads
    q = q.view(B, Lq, num_heads, hd).transpose(1, 2)  # [B, H, Lq, hd]
    k = k.view(B, Lk, num_heads, hd).transpose(1, 2)
    v = v.view(B, Lk, num_heads, hd).transpose(1, 2)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(B, Lq, C)
