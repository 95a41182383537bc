"""EVEv2 models: EVE's splicing, generation and Auto-class plumbing (eve.modeling_eve) around
EVEv2's convolutional patch embedding and a decoder whose layers hold modality experts.

The image-token mask of `input_ids` becomes the layers' routing at prefill; decode steps carry
only generated (text) tokens and take the text weights, so the KV cache holds image keys and
values from the vision copies and everything after from the text ones, as in the reference.
"""

from __future__ import annotations

from torch import nn

from eve.configuration_eve2 import Eve2Config
from eve.modality_experts import ModalityExperts, Routing, add_modality_experts
from eve.modeling_eve import EveForCausalLM, EveModel
from eve.patch_embedding_v2 import Eve2VisionEmbedding

NO_SPLIT = ["LlamaModalityExpertsLayer", "Qwen2ModalityExpertsLayer", "MistralModalityExpertsLayer", "Eve2VisionEmbedding"]


class Eve2Family:
    """What Eve2Model and Eve2ForCausalLM add to their v1 counterparts."""

    config_class = Eve2Config
    config: Eve2Config
    vision_class = Eve2VisionEmbedding
    _no_split_modules = NO_SPLIT

    def _build_decoder(self, config: Eve2Config, auto_class) -> nn.Module:
        decoder = auto_class.from_config(config.text_config)
        if config.modality_experts:
            add_modality_experts(getattr(decoder, "model", decoder), decoder.config)
        return decoder

    def expert_layers(self) -> list[ModalityExperts]:
        return [m for m in self.language_model.modules() if isinstance(m, ModalityExperts)]

    def copy_text_to_vision_experts(self) -> None:
        """Initialise every vision copy from its text weights (EVEv2's start of stage 2)."""
        for layer in self.expert_layers():
            layer.copy_text_to_vision()

    def _decoder_inputs(self, input_ids, *args) -> dict:
        """EVE's decoder inputs plus the layers' routing, read off the image tokens of a prefill
        (a decode step's tokens are generated text)."""
        inputs = super()._decoder_inputs(input_ids, *args)
        if self.config.modality_experts and input_ids is not None and input_ids.shape[-1] > 1:
            inputs["vision_routing"] = Routing.from_mask(input_ids == self.config.image_token_id)
        return inputs


class Eve2Model(Eve2Family, EveModel):
    """EVEv2 without the language-model head (`AutoModel`)."""

    def __init__(self, config: Eve2Config):
        super().__init__(config)
        self.copy_text_to_vision_experts()  # post_init drew the copies afresh


class Eve2ForCausalLM(Eve2Family, EveForCausalLM):
    """EVEv2 for generation and training (`AutoModelForCausalLM`, `AutoModelForImageTextToText`)."""

    def __init__(self, config: Eve2Config):
        super().__init__(config)
        self.copy_text_to_vision_experts()  # post_init drew the copies afresh

    def num_parameters_by_part(self) -> dict[str, int]:
        experts = sum(p.numel() for layer in self.expert_layers() for p in layer.vision.parameters())
        parts = super().num_parameters_by_part()
        return {"vision": parts["vision"], "decoder": parts["decoder"] - experts, "vision_experts": experts}
