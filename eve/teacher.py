"""The frozen CLIP teacher of the Patch Aligning Layer, loaded through open_clip (SPEC 1.5).

Any open_clip vision tower works: `EVA02-L-14-336` (the design card), the openai `ViT-L-14-336`
(the reference), or a local `open_clip_config.json` + weights directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ClipTeacher(nn.Module):
    """Penultimate-layer patch tokens (no CLS) of a frozen open_clip image tower: [N, G, G, C]."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        trunk = getattr(visual, "trunk", None)  # timm towers (EVA) sit in .trunk
        blocks = trunk.blocks if trunk is not None else visual.transformer.resblocks
        self.depth = len(blocks)
        self.width = int(getattr(trunk, "num_features", 0) or visual.transformer.width)

    @classmethod
    def from_open_clip(cls, name_or_path: str, pretrained: str | None = None, **kwargs) -> "ClipTeacher":
        """`name_or_path`: an open_clip model name (with `pretrained` a tag or a checkpoint file)
        or a local directory in open_clip's layout. Only the image tower is kept."""
        import open_clip

        if Path(name_or_path).is_dir():
            model = open_clip.create_model(f"local-dir:{name_or_path}", weights_only=True, **kwargs)
        else:
            model = open_clip.create_model(name_or_path, pretrained=pretrained, weights_only=True, **kwargs)
        return cls(model.visual)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and friends stay off

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        out = self.visual.forward_intermediates(
            pixel_values.to(dtype), indices=[self.depth - 2], stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
        return out["image_intermediates"][0].permute(0, 2, 3, 1)  # [N, C, G, G] -> [N, G, G, C]
