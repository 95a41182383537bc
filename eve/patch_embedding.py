"""Patch Embedding Layer (PEL) and projector: what replaces the vision encoder (SPEC 1.2).

pixels -> Conv(p x p) -> valid patches H x W -> 2x2 avg-pool (h x w queries)
       -> CA1: each query attends to the 4 conv features of its own window
       -> CA2: a learnable <CLS> attends to all h*w tokens
       -> [<CLS>, row 1, <SPL>, row 2, <SPL>, ...]  (1 + h*(w+1) tokens)
       -> MLP (Linear C->d, GELU, Linear d->d)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

from eve.configuration_eve import EveConfig
from eve.cross_attention import multihead_attend


class PatchCrossAttention(nn.Module):
    """out = query + proj(attn(LN->Linear(query), LN->Linear(context) as k and v))."""

    def __init__(self, width: int, num_heads: int, scale: float | None, eps: float):
        super().__init__()
        self.num_heads, self.scale = num_heads, scale
        self.q = nn.Sequential(nn.LayerNorm(width, eps=eps), nn.Linear(width, width, bias=False))
        self.kv = nn.Sequential(nn.LayerNorm(width, eps=eps), nn.Linear(width, 2 * width, bias=False))
        self.proj = nn.Linear(width, width)

    def forward(self, query, context, key_padding_mask=None):
        # query [B, Lq, C], context [B, Lk, C]
        k, v = self.kv(context).chunk(2, dim=-1)
        attn = multihead_attend(self.q(query), k, v, self.num_heads, self.scale, key_padding_mask)
        return query + self.proj(attn)


@dataclass
class ImageFeatures(BaseModelOutputWithPooling):
    """Visual sequences of a batch of images, as transformers' standard image-feature output:
    `last_hidden_state` [sum_i 1 + h_i*(w_i+1), d], every image's tokens concatenated in image
    order (images differ in length, so there is no batch axis); `pooler_output`, the same tokens
    as one [1 + h_i*(w_i+1), d] tensor per image, which is what generate() pre-encodes, expands
    for beams and hands to forward as `mm_encoder_outputs` (as for Llava); `grids`, the pooled
    grid (h_i, w_i) of each image."""

    grids: list[tuple[int, int]] | None = None

    @property
    def tokens(self) -> torch.Tensor:
        return self.last_hidden_state

    @property
    def lengths(self) -> list[int]:
        return [1 + h * (w + 1) for h, w in self.grids]


class EveVisionEmbedding(nn.Module):
    """PEL + projector. Takes `pixel_values` [N, 3, H, W] with `image_sizes` [N, 2] (each image
    at the top-left), or the reference layout [N, 4, S, S] whose 4th channel marks real pixels."""

    def __init__(self, config: EveConfig):
        super().__init__()
        C, d = config.vision_hidden_size, config.text_config.hidden_size
        heads, scale, eps = config.cross_attention_heads, config.cross_attention_scale, config.layer_norm_eps
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, C, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(C))
        self.split_embedding = nn.Parameter(torch.zeros(C))
        self.local_attention = PatchCrossAttention(C, heads, scale, eps)
        self.global_attention = PatchCrossAttention(C, heads, scale, eps)
        self.projector = nn.Sequential(nn.Linear(C, d), ACT2FN[config.projector_hidden_act], nn.Linear(d, d))

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageFeatures:
        dtype, p = self.patch_embedding.weight.dtype, self.patch_size
        # The grid of each image must be known on the host to slice it out (shapes follow the data):
        # read it before queueing the convolution, so that this prefill's one sync waits for the
        # inputs' copy only. Decode steps carry no pixels and never get here.
        boxes = self._valid_boxes(pixel_values, image_sizes, (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p))
        feats = self.patch_embedding(pixel_values[:, :3].to(dtype))  # [N, C, H/p, W/p]

        windows, grids = [], []
        for i, (top, left, gh, gw) in enumerate(boxes):
            f = feats[i, :, top : top + gh, left : left + gw]  # [C, gh, gw]
            h, w = gh // 2, gw // 2
            # row-major 2x2 windows: [h*w, 4, C]
            windows.append(f.reshape(-1, h, 2, w, 2).permute(1, 3, 2, 4, 0).reshape(h * w, 4, -1))
            grids.append((h, w))
        windows = torch.cat(windows)  # [sum hw, 4, C]
        pooled = windows.mean(dim=1, keepdim=True)  # 2x2 average pool: [sum hw, 1, C]
        local = self.local_attention(pooled, windows).squeeze(1)  # CA1: [sum hw, C]

        per_image = local.split([h * w for h, w in grids])
        padded = pad_sequence(per_image, batch_first=True)  # [N, Lmax, C]
        lengths = torch.tensor([len(t) for t in per_image], device=padded.device)
        key_mask = torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]
        cls = self.class_embedding.to(padded.dtype).expand(len(grids), 1, -1)
        cls = self.global_attention(cls, padded, key_mask)  # CA2: [N, 1, C]

        spl = self.split_embedding.to(local.dtype)
        sequences = []
        for i, (h, w) in enumerate(grids):
            rows = torch.cat([per_image[i].view(h, w, -1), spl.expand(h, 1, -1)], dim=1)  # [h, w+1, C]
            sequences += [cls[i], rows.reshape(h * (w + 1), -1)]
        tokens = self.projector(torch.cat(sequences))
        per_image = tuple(tokens.split([1 + h * (w + 1) for h, w in grids]))
        return ImageFeatures(last_hidden_state=tokens, pooler_output=per_image, grids=grids)

    def _valid_boxes(self, pixel_values, image_sizes, grid_hw) -> list[tuple[int, int, int, int]]:
        return valid_boxes(pixel_values, image_sizes, grid_hw, self.patch_size)


def valid_boxes(pixel_values, image_sizes, grid_hw, p: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) in patches of each image's real pixels."""
    n = pixel_values.shape[0]
    if pixel_values.shape[1] == 4:  # reference layout: the mask channel marks the image
        mask = F.avg_pool2d(pixel_values[:, 3:].float(), p, p)[:, 0] > 0.5  # [N, H/p, W/p]
        rows, cols = mask.any(2), mask.any(1)
        stats = torch.stack([rows.int().argmax(1), cols.int().argmax(1), rows.sum(1), cols.sum(1)], 1)
        boxes = [tuple(b) for b in stats.tolist()]
    elif image_sizes is not None:
        sizes = torch.as_tensor(image_sizes).reshape(n, 2).tolist()
        for h, w in sizes:
            if h % (2 * p) or w % (2 * p) or h <= 0 or w <= 0:
                raise ValueError(f"image size {h}x{w} is not a positive multiple of 2 x patch ({2 * p}) px")
        boxes = [(0, 0, h // p, w // p) for h, w in sizes]
    else:
        boxes = [(0, 0, grid_hw[0], grid_hw[1])] * n
    for i, (_, _, gh, gw) in enumerate(boxes):
        if gh < 2 or gw < 2 or gh % 2 or gw % 2:
            raise ValueError(
                f"image {i}: its valid region is {gh}x{gw} patches; it must be even and >= 2 on both sides "
                "(use EveImageProcessor to resize images)"
            )
    return boxes
