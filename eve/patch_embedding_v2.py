"""EVEv2's patch embedding: convolutions only (the EVEv2 paper's "patch embedding layer").

pixels -> Conv(p x p, stride p, 3 -> C) -> GELU -> Conv(2 x 2, stride 2, C -> d)  (one token per 2p x 2p px)
       -> [<CLS>, row 1, <SPL>, row 2, <SPL>, ...]  (1 + h*(w+1) tokens, the v1 layout)
`<CLS>` and `<SPL>` live in the decoder's width d. Parameter names follow the EVEv2 release
(`patch_embedding.0` / `.2`, `class_embedding`, `split_embedding`).
"""

from __future__ import annotations

import torch
from torch import nn

from eve.configuration_eve2 import Eve2Config
from eve.patch_embedding import ImageFeatures, valid_boxes


class Eve2VisionEmbedding(nn.Module):
    """Takes `pixel_values` [N, 3, H, W] with `image_sizes` [N, 2] (each image at the top-left)."""

    def __init__(self, config: Eve2Config):
        super().__init__()
        C, d, p = config.vision_hidden_size, config.text_config.hidden_size, config.patch_size
        self.patch_size = p
        self.patch_embedding = nn.Sequential(nn.Conv2d(config.num_channels, C, p, p), nn.GELU(), nn.Conv2d(C, d, 2, 2))
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.split_embedding = nn.Parameter(torch.zeros(d))

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageFeatures:
        p = self.patch_size
        if pixel_values.shape[1] != 3:
            raise ValueError(f"EVEv2 takes 3-channel pixel_values with image_sizes, got {pixel_values.shape[1]} channels")
        boxes = valid_boxes(pixel_values, image_sizes, (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p), p)
        # Kernel = stride and every image starts at the top-left on the 2p grid: its tokens never
        # see the batch's padding, so the whole batch goes through at once.
        dtype = self.patch_embedding[0].weight.dtype
        feats = self.patch_embedding(pixel_values.to(dtype))  # [N, d, H/2p, W/2p]
        cls, spl = self.class_embedding.to(feats.dtype), self.split_embedding.to(feats.dtype)
        sequences, grids = [], []
        for i, (_, _, gh, gw) in enumerate(boxes):
            h, w = gh // 2, gw // 2
            rows = feats[i, :, :h, :w].permute(1, 2, 0)  # [h, w, d]
            rows = torch.cat([rows, spl.expand(h, 1, -1)], dim=1)  # [h, w+1, d]
            sequences += [cls[None], rows.reshape(h * (w + 1), -1)]
            grids.append((h, w))
        tokens = torch.cat(sequences)  # [sum 1 + h*(w+1), d]
        per_image = tuple(tokens.split([1 + h * (w + 1) for h, w in grids]))
        return ImageFeatures(last_hidden_state=tokens, pooler_output=per_image, grids=grids)
