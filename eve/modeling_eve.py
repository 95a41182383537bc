"""EveForCausalLM: a LLaMA-family decoder that reads images through EveVisionEmbedding.

The decoder is any `AutoModelForCausalLM` (Vicuna for the paper), used as transformers ships it:
attention goes through its own interface (`sdpa`, `flash_attention_2`, `eager`). Each
`image_token_id` position of `input_ids` is replaced by one visual token (SPEC 1.3).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from eve.configuration_eve import EveConfig
from eve.patch_embedding import EveVisionEmbedding, ImageFeatures
from eve.processing_eve import num_visual_tokens


def default_attn_implementation() -> str:
    """`flash_attention_2` where flash-attn imports and CUDA is present, else `sdpa`."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401  (a broken build must not be picked)
        except ImportError:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


class ImageTokenEmbedding(nn.Embedding):
    """The decoder's token embedding (same weight, same checkpoint key), that also takes the image
    token's id, which may lie past the table: those positions get id 0's row, and EveForCausalLM
    writes the visual tokens over them. So `model.get_input_embeddings()(input_ids)` works on the
    processor's output, as it does for any transformers model."""

    image_token_id: int

    @classmethod
    def wrap(cls, embedding: nn.Embedding, image_token_id: int) -> "ImageTokenEmbedding":
        if isinstance(embedding, cls):
            embedding.image_token_id = image_token_id
            return embedding
        if type(embedding) is not nn.Embedding:  # a subclass's own forward (e.g. a scaled embedding) would be lost
            raise TypeError(f"EVE takes the image id through the decoder's nn.Embedding; got {type(embedding).__name__}")
        # The same module, re-classed: no new parameter (tying, loading and ZeRO-3 partitions see
        # the one they know) and no new module (building one under zero.Init on the meta device
        # leaves DeepSpeed's init hooks installed).
        embedding.__class__ = cls
        embedding.image_token_id = image_token_id
        return embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids.masked_fill(input_ids == self.image_token_id, 0))


class VocabularyScores(LogitsProcessor):
    """Scores cut back to the vocabulary (a no-op when they are no wider)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores[..., : self.vocab_size]


class EvePreTrainedModel(PreTrainedModel):
    """What EveModel and EveForCausalLM share: both hold the vision front end as `vision` and the
    decoder as `language_model` (a base model in EveModel, a causal LM in EveForCausalLM), and both
    splice images into the token embeddings the same way."""

    config_class = EveConfig
    config: EveConfig
    base_model_prefix = "eve"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "EveVisionEmbedding"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    vision_class = EveVisionEmbedding  # the family's front end (eve.modeling_eve2 has EVEv2's)

    def _build_decoder(self, config: EveConfig, auto_class) -> nn.Module:
        """The decoder as transformers builds it from its config (a family may add to it)."""
        return auto_class.from_config(config.text_config)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, self.vision_class) and hasattr(module, "class_embedding"):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            module.class_embedding.normal_(std=std)
            module.split_embedding.normal_(std=std)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(ImageTokenEmbedding.wrap(value, self.config.image_token_id))

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **kwargs) -> ImageFeatures:
        """The visual sequences of `pixel_values` (an ImageFeatures, i.e. transformers'
        BaseModelOutputWithPooling; `return_dict` and other kwargs generate() passes are accepted)."""
        return self.vision(pixel_values, image_sizes)

    def embed_inputs(
        self, input_ids: torch.LongTensor, image_features: ImageFeatures | None = None, inputs_embeds: torch.Tensor | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """Token embeddings (or the given `inputs_embeds`) with each image-token position of
        `input_ids` replaced by its visual token. `check=False` skips counting the image tokens,
        which costs a device-to-host sync: a decode step has no image and needs no count."""
        image_mask = input_ids == self.config.image_token_id  # [B, L]
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, d]
        if image_features is None and not check:
            return embeds
        visual = None if image_features is None else torch.cat(list(image_features.pooler_output))  # [V, d]
        n_features = 0 if visual is None else visual.shape[0]
        if torch.compiler.is_compiling():  # torch.export / compile: the same check as a runtime assertion
            torch._check(image_mask.sum().item() == n_features, lambda: "image tokens and image features do not match")
            n_positions = n_features
        else:
            n_positions = int(image_mask.sum())
        if n_positions != n_features:
            lengths = [] if image_features is None else [len(t) for t in image_features.pooler_output]
            raise ValueError(
                f"image tokens and image features do not match: {n_positions} image-token positions in "
                f"input_ids, {n_features} visual tokens from {len(lengths)} image(s) (per image: {lengths}). "
                "Build inputs with EveProcessor, which expands each <image> to its visual length."
            )
        if n_features:
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual.to(embeds.dtype))
        return embeds

    def _decoder_inputs(
        self, input_ids, pixel_values, image_sizes, attention_mask, position_ids, past_key_values, inputs_embeds,
        use_cache, mm_encoder_outputs,
    ) -> dict:
        """What the decoder takes (inputs_embeds with the images in place, positions, cache)
        from what EVE takes (input_ids with image tokens plus pixels or pre-encoded images)."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs:
            raise ValueError("pass pixel_values or mm_encoder_outputs (pre-encoded images), not both")
        features = (mm_encoder_outputs or {}).get("image")
        if input_ids is None and (pixel_values is not None or features is not None):
            raise ValueError(
                "pixel_values came with inputs_embeds but no input_ids, so the images have no positions: pass the "
                "processor's input_ids too (their image tokens mark where each image goes), or merge them yourself "
                "with model.embed_inputs(input_ids, model.get_image_features(pixel_values, image_sizes), inputs_embeds)"
            )
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if input_ids is not None and (inputs_embeds is None or pixel_values is not None or features is not None):
            if features is None and pixel_values is not None:
                features = self.get_image_features(pixel_values, image_sizes)
            inputs_embeds = self.embed_inputs(input_ids, features, inputs_embeds, check=prefill)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2 and prefill:
            # Left-padded prompts: count positions from each sample's first real token, as
            # generate() does, so a batched forward equals each sample alone.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if use_cache is None and past_key_values is None and attention_mask is None and position_ids is not None:
            # Packed rows (position_ids restarting per sample, no mask, see train/packing.py):
            # transformers builds their block-diagonal mask only when no cache is passed, and the
            # decoder would create one by default.
            if position_ids.shape[-1] > 1 and bool((position_ids.diff(dim=-1) != 1).any()):
                use_cache = False
        return dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past_key_values, use_cache=use_cache)


class EveModel(EvePreTrainedModel):
    """EVE without the language-model head (`AutoModel`): the decoder's last hidden states over
    text and visual tokens, for embeddings and feature extraction. Loads an EveForCausalLM
    checkpoint (its head is left out)."""

    _keys_to_ignore_on_load_unexpected = [r"^language_model\.lm_head\."]
    # An EveForCausalLM checkpoint holds the decoder as a causal LM (`language_model.model.*`).
    _CAUSAL_LM_KEYS = {r"^language_model\.model\.": "language_model."}

    def __init__(self, config: EveConfig):
        super().__init__(config)
        self.vision = self.vision_class(config)
        self.language_model = self._build_decoder(config, AutoModel)
        self.set_input_embeddings(self.language_model.get_input_embeddings())
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("key_mapping", cls._CAUSAL_LM_KEYS)
        return super().from_pretrained(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, ImageFeatures] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        decoder_inputs = self._decoder_inputs(input_ids, pixel_values, image_sizes, attention_mask, position_ids,
                                              past_key_values, inputs_embeds, use_cache, mm_encoder_outputs)
        return self.language_model(**decoder_inputs, **kwargs)


class EveForCausalLM(EvePreTrainedModel, GenerationMixin):
    """EVE for generation and training. Holds the decoder as `language_model` and the vision
    front end as `vision`; the Patch Aligning Layer and teacher live outside (eve.patch_aligning)."""

    _IMAGE_INPUTS = ("pixel_values", "image_sizes", "mm_encoder_outputs")

    def __init__(self, config: EveConfig):
        super().__init__(config)
        self.vision = self.vision_class(config)
        self.language_model = self._build_decoder(config, AutoModelForCausalLM)
        self.set_input_embeddings(self.language_model.get_input_embeddings())
        self.post_init()

    # decoder plumbing, so that generate(), resize_token_embeddings() etc. work as usual
    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, ImageFeatures] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        mask_image_logit = kwargs.pop("mask_image_logit", False)
        decoder_inputs = self._decoder_inputs(input_ids, pixel_values, image_sizes, attention_mask, position_ids,
                                              past_key_values, inputs_embeds, use_cache, mm_encoder_outputs)
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)  # never predict images
        out = self.language_model(**decoder_inputs, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        if mask_image_logit and out.logits is not None:
            out.logits = self._mask_image_logit(out.logits)
        return out

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, **kwargs):
        # named parameters: generate() accepts inputs_embeds only from a model whose signature shows it
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        cache = inputs.get("past_key_values")
        for key in self._IMAGE_INPUTS:
            if cache is not None and cache.get_seq_length():
                inputs.pop(key, None)  # the images were read at prefill; a decode step has no image tokens
            elif inputs.get(key) is None and kwargs.get(key) is not None and len(kwargs[key]):
                # transformers hands images (pixels, or pre-encoded since 5.2x) to a model's prefill
                # only when it is not an assistant; an EVE assistant's prompt holds the same image
                # tokens, so it reads them too.
                inputs[key] = kwargs[key]
        if inputs.get("input_ids") is None and inputs.get("inputs_embeds") is not None and input_ids is not None \
                and input_ids.shape[:2] == inputs["inputs_embeds"].shape[:2]:
            # generate(input_ids, inputs_embeds=...) prefills from the embeddings alone; the ids
            # say where the images go, so they come along.
            inputs["input_ids"] = input_ids
        inputs["mask_image_logit"] = True
        return inputs

    def generate(self, *args, logits_processor=None, **kwargs):
        """transformers' generate(). For beam search, the image token's -inf score column (see
        `_mask_image_logit`) is cut off after the logits processors have read it: transformers
        5.17 lays beams x vocabulary out by the config's vocabulary size. (Other modes keep it:
        assisted decoding writes processed scores back into the logits, column for column.)"""
        config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or config.num_beams or 1) > 1:
            logits_processor = LogitsProcessorList([*(logits_processor or []), VocabularyScores(self.config.text_config.vocab_size)])
        return super().generate(*args, logits_processor=logits_processor, **kwargs)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """transformers' expansion for beams / several return sequences. transformers 5.17 still
        holds raw pixels here and repeats each image in place, which misorders the images of a
        prompt that has several: expand them by prompt instead (later versions pre-encode the
        images and expand them by prompt themselves, so no pixels reach this point)."""
        pixels = model_kwargs.pop("pixel_values", None) if expand_size > 1 and input_ids is not None else None
        sizes = model_kwargs.pop("image_sizes", None) if pixels is not None else None
        input_ids_before = input_ids
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        if pixels is not None:
            order = torch.tensor(self._image_rows(input_ids_before, pixels, sizes, expand_size), device=pixels.device)
            model_kwargs["pixel_values"] = pixels[order]
            if sizes is not None:
                model_kwargs["image_sizes"] = torch.as_tensor(sizes, device=pixels.device)[order]
        return input_ids, model_kwargs

    def _image_rows(self, input_ids, pixels, sizes, expand_size) -> list[int]:
        """Image indices in the order of the expanded rows: each prompt's images, `expand_size` times."""
        p = self.vision.patch_size
        boxes = self.vision._valid_boxes(pixels, sizes, (pixels.shape[-2] // p, pixels.shape[-1] // p))
        lengths = iter(enumerate(num_visual_tokens(gh * p, gw * p, p) for _, _, gh, gw in boxes))
        order = []
        for n_tokens in (input_ids == self.config.image_token_id).sum(-1).tolist():
            group = []
            while n_tokens > 0 and (image := next(lengths, None)) is not None:  # (a mismatch is forward's error to report)
                group.append(image[0])
                n_tokens -= image[1]
            order += group * expand_size
        return order

    def compute_transition_scores(self, sequences, scores, *args, **kwargs):
        """transformers' compute_transition_scores, on scores without the image token's column
        (it reads them by the config's vocabulary size)."""
        vocab = self.config.text_config.vocab_size
        return super().compute_transition_scores(sequences, tuple(s[..., :vocab] for s in scores), *args, **kwargs)

    def _mask_image_logit(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores that cover the image token's id with -inf, so that generation never picks it and
        logits processors that index scores by prompt ids (repetition penalty) see a column for
        it: one -inf column is appended when the id lies past the vocabulary."""
        image_id, vocab = self.config.image_token_id, logits.shape[-1]
        if image_id >= vocab:
            pad = logits.new_full((*logits.shape[:-1], image_id + 1 - vocab), float("-inf"))
            return torch.cat([logits, pad], dim=-1)
        return logits.index_fill(-1, torch.tensor([image_id], device=logits.device), float("-inf"))

    def num_parameters_by_part(self) -> dict[str, int]:
        return {
            "vision": sum(p.numel() for p in self.vision.parameters()),
            "decoder": sum(p.numel() for p in self.language_model.parameters()),
        }

    def flops_per_token(self, seq_len: int, train_decoder: bool = True, backward: bool = True) -> float:
        """Model FLOPs per decoder token (image tokens count as tokens), PaLM/nanoGPT style.

        Forward: 2N (N = decoder matmul parameters, embedding table excluded) plus attention
        4 * n_layer * seq_len * d. A training step is 3x forward (6N); with the decoder frozen
        (stage 1) its weight gradients are skipped but input gradients still flow to the PEL:
        2x forward (4N). The PEL and PAL are small next to the decoder and left out.
        """
        tc = self.config.text_config
        # EVEv2's vision experts (`.vision.` inside the decoder) are left out: each token goes
        # through one copy of each layer, so they add parameters, not FLOPs.
        n = sum(p.numel() for name, p in self.language_model.named_parameters()
                if "embed_tokens" not in name and ".vision." not in name)
        forward = 2 * n + 4 * tc.num_hidden_layers * seq_len * tc.hidden_size
        return forward * ((3 if train_decoder else 2) if backward else 1)
