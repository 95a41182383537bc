"""EVEv2's divide-and-conquer decoder: every decoder layer gets vision copies of its two norms,
q/k/v/o and MLP, and each token goes through the copy of its modality, chosen by a hard mask
(image tokens -> vision copies); attention itself stays joint over the whole sequence.

The decoder is transformers' own model (LlamaModel, Qwen2Model, MistralModel): only its layers
are replaced, by subclasses of its own layer class (so output capturing, gradient checkpointing
and `_no_split_modules` see the class they know) holding the text weights under the usual names
and the copies under `vision.*`. The routing reaches the layers as a keyword argument that the
decoder model passes through (`vision_routing`); without it, or on a decode step (generated
tokens are text), a layer computes exactly what the original layer computes.

Each copy computes only its own tokens (gathered, computed, scattered back), so a mixed
sequence costs what the dense decoder costs, plus the gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb, eager_attention_forward
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

EXPERT_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass(frozen=True)
class Routing:
    """Which flattened [B*L] positions are image tokens (`vision`) and which are not (`text`)."""

    vision: torch.Tensor  # [Nv] long
    text: torch.Tensor  # [Nt] long

    @classmethod
    def from_mask(cls, image_mask: torch.Tensor | None) -> "Routing | None":
        """None when there is no image token: every layer then takes the plain text path."""
        if image_mask is None or not bool(image_mask.any()):
            return None
        flat = image_mask.reshape(-1)
        return cls(flat.nonzero().squeeze(-1), (~flat).nonzero().squeeze(-1))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, d] -> (text rows [Nt, d], image rows [Nv, d])."""
        flat = x.reshape(-1, x.shape[-1])
        return flat.index_select(0, self.text), flat.index_select(0, self.vision)

    def merge(self, t: torch.Tensor, v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The inverse of split, into [*shape[:-1], d_out]. In place into one new buffer: an
        out-of-place index_copy would copy the whole output once per modality."""
        out = t.new_empty(t.shape[0] + v.shape[0], t.shape[-1])
        out.index_copy_(0, self.text, t)
        out.index_copy_(0, self.vision, v.to(t.dtype))
        return out.view(*shape[:-1], -1)


def _apply(parts, text_fn: nn.Module, vision_fn: nn.Module):
    """Each modality's module on its own rows: `parts` is a tensor (no routing: all text) or
    (text rows, image rows) from Routing.split."""
    if isinstance(parts, torch.Tensor):
        return text_fn(parts)
    return text_fn(parts[0]), vision_fn(parts[1])


def _merge(r: Routing | None, parts, shape: torch.Size) -> torch.Tensor:
    return parts if r is None else r.merge(*parts, shape)


def _split(r: Routing | None, x: torch.Tensor):
    return x if r is None else r.split(x)


class VisionExperts(nn.Module):
    """The vision copies of one layer, built by the layer's own classes."""

    def __init__(self, layer: nn.Module, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.self_attn = type(layer.self_attn)(config, layer_idx)
        self.mlp = type(layer.mlp)(config)
        self.input_layernorm = type(layer.input_layernorm)(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = type(layer.post_attention_layernorm)(config.hidden_size, eps=config.rms_norm_eps)


class ModalityExperts:
    """Mixed into a transformers decoder layer class: adds `vision` and routes tokens to it."""

    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.vision = VisionExperts(self, config, layer_idx)

    @torch.no_grad()
    def copy_text_to_vision(self) -> None:
        """EVEv2's initialisation of the copies: the language weights themselves."""
        for part in EXPERT_PARTS:
            getattr(self.vision, part).load_state_dict(getattr(self, part).state_dict())

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, L, d]
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        vision_routing: Routing | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # Each modality's rows are gathered once per sub-block and stay apart through its norm and
        # projections; they are merged only where tokens meet (attention) and at the residuals.
        r, shape = vision_routing, hidden_states.shape
        normed = _apply(_split(r, hidden_states), self.input_layernorm, self.vision.input_layernorm)
        hidden_states = hidden_states + self._attention(normed, r, shape, position_embeddings, attention_mask,
                                                        past_key_values, **kwargs)
        normed = _apply(_split(r, hidden_states), self.post_attention_layernorm, self.vision.post_attention_layernorm)
        return hidden_states + _merge(r, _apply(normed, self.mlp, self.vision.mlp), shape)

    def _attention(self, normed, r, shape, position_embeddings, attention_mask, past_key_values, **kwargs) -> torch.Tensor:
        """The layer's attention (transformers' attention interface: sdpa, flash, eager, flex), with
        q/k/v/o projected by each token's own copy."""
        attn, vis = self.self_attn, self.vision.self_attn
        heads = (*shape[:-1], -1, attn.head_dim)
        q = _merge(r, _apply(normed, attn.q_proj, vis.q_proj), shape).view(heads).transpose(1, 2)  # [B, H, L, hd]
        k = _merge(r, _apply(normed, attn.k_proj, vis.k_proj), shape).view(heads).transpose(1, 2)  # [B, Hkv, L, hd]
        v = _merge(r, _apply(normed, attn.v_proj, vis.v_proj), shape).view(heads).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = interface(
            attn, q, k, v, attention_mask, dropout=0.0 if not self.training else attn.attention_dropout,
            scaling=attn.scaling, sliding_window=getattr(attn, "sliding_window", None), **kwargs,
        )
        out = out.reshape(*shape[:-1], -1).contiguous()  # [B, L, H*hd]
        return _merge(r, _apply(_split(r, out), attn.o_proj, vis.o_proj), shape)


class LlamaModalityExpertsLayer(ModalityExperts, LlamaDecoderLayer):
    pass


class Qwen2ModalityExpertsLayer(ModalityExperts, Qwen2DecoderLayer):
    pass


class MistralModalityExpertsLayer(ModalityExperts, MistralDecoderLayer):
    pass


# The decoder families whose layers (norms, attention with rotary q/k, gated MLP) the mixin reads.
EXPERT_LAYERS = {"llama": LlamaModalityExpertsLayer, "qwen2": Qwen2ModalityExpertsLayer, "mistral": MistralModalityExpertsLayer}


def add_modality_experts(decoder: nn.Module, config: PretrainedConfig) -> None:
    """Replace the layers of a transformers decoder model (`decoder.layers`) by modality-expert
    layers of the same family; the text weights are moved over, the copies initialised from them."""
    if config.model_type not in EXPERT_LAYERS:
        raise ValueError(f"EVEv2 experts support decoders of type {sorted(EXPERT_LAYERS)}, not {config.model_type!r}")
    cls = EXPERT_LAYERS[config.model_type]
    for i, layer in enumerate(decoder.layers):
        if isinstance(layer, ModalityExperts):
            continue
        expert = cls(config, i).to(device=_device(layer), dtype=_dtype(layer))
        for part in EXPERT_PARTS:
            setattr(expert, part, getattr(layer, part))  # the very modules: no copy of the text weights
        expert.copy_text_to_vision()
        decoder.layers[i] = expert


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
