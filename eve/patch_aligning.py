"""Patch Aligning Layer (PAL): training-only alignment of the decoder's image tokens to a frozen
CLIP teacher (SPEC 1.5). Nothing here is part of the inference checkpoint.

For every image: take the image span of each tapped hidden state, drop <CLS>, reshape to
h x (w+1), drop the <SPL> column, average-pool to the teacher grid. Per patch, CA3 attends from
the deepest tap (query) to the other taps; the result is compared to the teacher's
penultimate-layer patch token by 1 - cosine similarity, averaged per image, then over images.

The teacher sees the model's image at teacher scale (`teacher_grid`). Under EVE's resize rule the
model grid is a whole multiple (`pal_pool`) of the teacher's, and the pooling is the reference's
exact window mean; under EVEv2's area rule it need not be, and the pooling is adaptive (windows
of PyTorch's `adaptive_avg_pool2d`), which is how the PAL is an option for EVEv2 too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eve.configuration_eve import EveConfig
from eve.cross_attention import multihead_attend
from eve.modeling_eve import EveForCausalLM
from eve.patch_embedding import ImageFeatures
from eve.processing_eve import centred_offset, teacher_geometry


# The PAL's weights beside an inference checkpoint: training-only, so never in the model's own files.
PAL_WEIGHTS_NAME = "pal.safetensors"


class PatchAligningLayer(nn.Module):
    """CA3 over depth, per patch: [P, T, d] tapped states -> [P, C_teacher]."""

    def __init__(self, config: EveConfig):
        super().__init__()
        d, C = config.text_config.hidden_size, config.teacher_hidden_size
        self.taps = config.pal_tap_layers
        num_layers = config.text_config.num_hidden_layers
        if len(self.taps) < 2 or not all(0 <= t <= num_layers for t in self.taps):
            raise ValueError(f"PAL needs >= 2 tap indices in [0, {num_layers}], got {self.taps} (set pal_layers)")
        self.num_heads, self.scale = config.cross_attention_heads, config.cross_attention_scale
        eps = config.layer_norm_eps
        self.tap_norms = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(d, eps=eps), nn.Linear(d, C, bias=False)) for _ in self.taps]
        )
        self.input_proj = nn.Linear(d, C)
        self.output_proj = nn.Linear(C, C)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        # states [P, T, d], taps deepest first
        proj = torch.stack([norm(states[:, j]) for j, norm in enumerate(self.tap_norms)], dim=1)  # [P, T, C]
        q, kv = proj[:, :1], proj[:, 1:]
        attn = multihead_attend(q, kv, kv, self.num_heads, self.scale)[:, 0]  # [P, C]
        return self.input_proj(states[:, 0]) + self.output_proj(attn)


def load_pal(pal: PatchAligningLayer, directory: str | Path) -> Path | None:
    """Load the side file of a checkpoint folder into `pal` (all weights, exact shapes); None when
    the folder has none."""
    from safetensors.torch import load_file

    path = Path(directory) / PAL_WEIGHTS_NAME
    if not path.is_file():
        return None
    try:
        pal.load_state_dict(load_file(path))
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit this model's PAL (taps {pal.taps}): {e}") from e
    return path


def teacher_grid(config: EveConfig, h: int, w: int) -> tuple[int, int]:
    """The teacher's valid patch grid for an image whose model grid is h x w visual tokens: the
    teacher's copy is the model's image (2p*h x 2p*w px) at teacher scale, as the processor makes
    it. Under EVE's rule this is (h, w) / pal_pool."""
    side = 2 * config.patch_size
    th, tw = teacher_geometry(side * h, side * w, config.teacher_image_size, config.teacher_patch_size)
    return th // config.teacher_patch_size, tw // config.teacher_patch_size


def pool_to(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[h, w, ...] -> [ht, wt, ...], the mean over each teacher patch's window of model tokens."""
    (h, w), (ht, wt) = x.shape[:2], grid
    if (h, w) == (ht, wt):
        return x
    if h % ht == 0 and w % wt == 0:  # EVE's geometry: the reference's exact window mean
        return x.view(ht, h // ht, wt, w // wt, *x.shape[2:]).mean(dim=(1, 3))
    flat = x.flatten(2).permute(2, 0, 1)  # [T*d, h, w]
    return F.adaptive_avg_pool2d(flat, grid).permute(1, 2, 0).reshape(ht, wt, *x.shape[2:])


def image_patch_states(
    hidden_states: tuple[torch.Tensor, ...],
    taps: list[int],
    image_mask: torch.Tensor,
    features: ImageFeatures,
    config: EveConfig,
) -> torch.Tensor:
    """Gather the image tokens of the tapped layers, on the teacher grid: [P, T, d]."""
    positions = image_mask.flatten().nonzero().squeeze(1)  # visual tokens in image order
    stacked = torch.stack([hidden_states[t].flatten(0, 1)[positions] for t in taps], dim=1)  # [V, T, d]
    patches = []
    for seq, (h, w) in zip(stacked.split(features.lengths), features.grids):
        x = seq[1:].view(h, w + 1, *seq.shape[1:])[:, :w]  # drop <CLS> and the <SPL> column: [h, w, T, d]
        patches.append(pool_to(x, teacher_grid(config, h, w)).flatten(0, 1))
    return torch.cat(patches)


def teacher_patch_targets(teacher_tokens: torch.Tensor, features: ImageFeatures, config: EveConfig) -> torch.Tensor:
    """Valid teacher patches of each image (centred on the teacher canvas): [P, C]."""
    p, side = config.teacher_patch_size, config.teacher_image_size
    out = []
    for i, (h, w) in enumerate(features.grids):
        ht, wt = teacher_grid(config, h, w)
        top, left = centred_offset(side, ht * p, p) // p, centred_offset(side, wt * p, p) // p
        out.append(teacher_tokens[i, top : top + ht, left : left + wt].reshape(ht * wt, -1))
    return torch.cat(out)


def cosine_alignment_loss(pred: torch.Tensor, target: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """1 - mean cosine similarity per image, averaged over images."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # [P]
    per_image = torch.stack([c.mean() for c in cos.split(counts)])
    return (1 - per_image).mean()


@dataclass
class AlignedOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    pal_loss: torch.Tensor
    logits: torch.Tensor | None = None


class EveForAlignedTraining(nn.Module):
    """EVE plus the PAL: the module a training stage optimises. The trainer runs the frozen
    teacher and passes its tokens in (`teacher_tokens` [N, G, G, C], see eve.teacher). With
    `use_pal=False` it is the plain LM loss in the same output type (stage 3 by default)."""

    def __init__(self, model: EveForCausalLM, pal_weight: float = 1.0, use_pal: bool = True):
        super().__init__()
        self.model = model
        self.pal = PatchAligningLayer(model.config) if use_pal else None
        self.pal_weight = pal_weight

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        teacher_tokens: torch.Tensor | None = None,
        **kwargs,
    ) -> AlignedOutput:
        config = self.model.config
        features, embeds = self._embed(input_ids, pixel_values, image_sizes)
        out = self.model(
            input_ids=input_ids,  # with embeds given, only read for where the images are (EVEv2's routing)
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=None if labels is None else labels.masked_fill(input_ids == config.image_token_id, -100),
            output_hidden_states=self.pal is not None,
            use_cache=False,
            **kwargs,
        )
        if self.pal is None:
            return AlignedOutput(out.loss, out.loss, out.loss.new_zeros(()), out.logits)
        if features is None:
            # Text-only batch: run the PAL on nothing so every rank touches the same parameters
            # (ZeRO-3 gathers them in forward hooks), and add exactly 0.
            empty = out.hidden_states[0].new_zeros(0, len(self.pal.taps), config.text_config.hidden_size)
            pal_loss = self.pal(empty).sum() * 0.0
        else:
            if teacher_tokens is None:
                raise ValueError("EveForAlignedTraining needs teacher_tokens for a batch with images")
            image_mask = input_ids == config.image_token_id
            states = image_patch_states(out.hidden_states, self.pal.taps, image_mask, features, config)
            target = teacher_patch_targets(teacher_tokens, features, config)
            counts = [math.prod(teacher_grid(config, h, w)) for h, w in features.grids]
            pal_loss = cosine_alignment_loss(self.pal(states), target, counts)
        lm_loss = out.loss if out.loss is not None else pal_loss.new_zeros(())
        return AlignedOutput(lm_loss + self.pal_weight * pal_loss, lm_loss, pal_loss, out.logits)

    def _embed(self, input_ids, pixel_values, image_sizes) -> tuple[ImageFeatures | None, torch.Tensor]:
        """(image features, input embeddings with the visual tokens in place).

        Shaped for ZeRO-3, which gathers parameters in forward hooks, hooks every tensor a module
        returns for its backward, and requires every rank to run the same modules in the same
        order, forward and backward (a rank whose order changed re-traces alone, with a
        collective the others never join: a hang). So the visual tokens enter only through
        `last_hidden_state`, one tensor whatever the number of images (the per-image views are
        re-cut from it), and a micro-batch without images still runs the vision front end, first
        and into the embeddings, on one blank image of the smallest size, adding exactly 0. The
        zero gradients that adds are what DeepSpeed's flat buffers hold for an unused parameter
        anyway: the training numbers do not change."""
        if pixel_values is None:
            side = 2 * self.model.config.patch_size
            blank = torch.zeros(1, 3, side, side, device=input_ids.device)
            zero = self.model.get_image_features(blank, torch.tensor([[side, side]], device=input_ids.device)).last_hidden_state.sum() * 0.0
            return None, self.model.get_input_embeddings()(input_ids) + zero
        raw = self.model.get_image_features(pixel_values, image_sizes)
        tokens = raw.last_hidden_state
        features = ImageFeatures(last_hidden_state=tokens, pooler_output=tuple(tokens.split(raw.lengths)), grids=raw.grids)
        return features, self.model.embed_inputs(input_ids, features)
