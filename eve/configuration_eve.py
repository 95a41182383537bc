"""EveConfig: the decoder's config plus the encoder-free vision front end and the PAL settings.

Sizes and numbers follow SPEC section 1. Named flavors (`EveConfig.from_flavor`) give the
paper's models, a tiny `debug` model for tests and the small `demo` model of eve-demo.
"""

from __future__ import annotations

from transformers import AutoConfig, LlamaConfig, PretrainedConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EveConfig(PretrainedConfig):
    r"""Configuration of an encoder-free EVE model.

    Args:
        text_config: the decoder's config (any LLaMA-family config, or a dict with `model_type`).
        vision_hidden_size: width C of the patch embedding layer (1024 for EVE-7B).
        patch_size: conv kernel and stride of the patch embedding (14).
        image_size: longest image side fed to the model (672; 1344 for EVE-7B-HD).
        teacher_image_size: longest side of the teacher's copy and of the base geometry (336).
        teacher_patch_size: the teacher's patch size; the short side is rounded up to a
            multiple of it at teacher scale (14).
        cross_attention_heads: heads of CA1, CA2 and CA3 (8).
        cross_attention_scale: softmax scale of CA1/CA2/CA3. None means head_dim**-0.5; the
            reference code uses width**-0.5, which you get by setting it explicitly.
        image_token_id: sentinel id that the processor writes once per visual token; the model
            replaces those positions by the visual sequence. It need not exist in the decoder's
            vocabulary (by default it is the first id past it).
        image_mean, image_std: normalisation of the decoder's image input.
        projector_hidden_act: activation between the two projector linears.
        pal_layers: decoder hidden-state indices the Patch Aligning Layer taps (0 is the
            embedding output). None means every `pal_tap_every` layers from the last down to 0.
        pal_tap_every: spacing of the default taps (4).
        teacher_model: open_clip model name or local directory of the frozen teacher.
        teacher_pretrained: open_clip pretrained tag or checkpoint file for `teacher_model`.
        teacher_hidden_size: width of the teacher's patch tokens (the PAL output width).
        teacher_image_mean, teacher_image_std: normalisation of the teacher's copy.
    """

    model_type = "eve"
    sub_configs = {"text_config": AutoConfig}

    text_config: dict | PretrainedConfig | None = None
    vision_hidden_size: int = 1024
    patch_size: int = 14
    image_size: int = 672
    teacher_image_size: int = 336
    teacher_patch_size: int = 14
    num_channels: int = 3
    cross_attention_heads: int = 8
    cross_attention_scale: float | None = None
    layer_norm_eps: float = 1e-5
    image_token_id: int | None = None
    image_mean: list[float] | tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: list[float] | tuple[float, ...] = OPENAI_CLIP_STD
    projector_hidden_act: str = "gelu"
    pal_layers: list[int] | None = None
    pal_tap_every: int = 4
    teacher_model: str = "EVA02-L-14-336"
    teacher_pretrained: str | None = None
    teacher_hidden_size: int = 1024
    teacher_image_mean: list[float] | tuple[float, ...] = OPENAI_CLIP_MEAN
    teacher_image_std: list[float] | tuple[float, ...] = OPENAI_CLIP_STD
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            text = dict(self.text_config)
            self.text_config = AutoConfig.for_model(text.pop("model_type", "llama"), **text)
        elif self.text_config is None:
            self.text_config = LlamaConfig()
        if self.image_token_id is None:
            self.image_token_id = self.text_config.vocab_size
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        self.teacher_image_mean = list(self.teacher_image_mean)
        self.teacher_image_std = list(self.teacher_image_std)
        # The inference checkpoint is the decoder plus the front end: follow the decoder on tying.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        super().__post_init__(**kwargs)
        self._validate_geometry()

    def _validate_geometry(self) -> None:
        if self.image_size % self.teacher_image_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of teacher_image_size "
                f"({self.teacher_image_size})"
            )
        if self.teacher_image_size % self.teacher_patch_size:
            raise ValueError(
                f"teacher_image_size ({self.teacher_image_size}) must be a multiple of "
                f"teacher_patch_size ({self.teacher_patch_size})"
            )
        # A teacher patch covers `scale * teacher_patch_size` model pixels, which must be a
        # whole number of 2x2-pooled model patches (the PAL pooling factor).
        span = self.scale * self.teacher_patch_size
        if span % (2 * self.patch_size):
            raise ValueError(
                f"a teacher patch ({self.teacher_patch_size} px at scale {self.scale}) must cover "
                f"whole 2x2 pooled patches of {self.patch_size} px"
            )
        if self.vision_hidden_size % self.cross_attention_heads:
            raise ValueError("vision_hidden_size must be divisible by cross_attention_heads")
        if self.teacher_hidden_size % self.cross_attention_heads:
            raise ValueError("teacher_hidden_size must be divisible by cross_attention_heads")

    @property
    def scale(self) -> int:
        """r in SPEC 1.1: image_size / teacher_image_size."""
        return self.image_size // self.teacher_image_size

    @property
    def pal_pool(self) -> int:
        """Average-pool factor from the pooled PEL grid to the teacher grid (1 at 672, 2 at 1344)."""
        return self.scale * self.teacher_patch_size // (2 * self.patch_size)

    @property
    def pal_tap_layers(self) -> list[int]:
        """Tapped hidden-state indices, query (deepest) first."""
        if self.pal_layers is not None:
            return sorted(self.pal_layers, reverse=True)
        return list(range(self.text_config.num_hidden_layers, -1, -self.pal_tap_every))

    @classmethod
    def from_flavor(cls, name: str, **overrides) -> "EveConfig":
        """A named configuration: one of `FLAVORS` (`debug`, `demo`, `eve-7b`, `eve-7b-hd`)."""
        if name not in FLAVORS:
            raise KeyError(f"unknown EVE flavor {name!r}; known: {', '.join(sorted(FLAVORS))}")
        kwargs = FLAVORS[name]()
        text_overrides = overrides.pop("text_config", None) or {}
        kwargs["text_config"] = {**kwargs["text_config"], **text_overrides}
        kwargs.update(overrides)
        return cls(**kwargs)


def _vicuna_7b() -> dict:
    return dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def _debug() -> dict:
    return dict(
        text_config=dict(
            model_type="llama",
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
        vision_hidden_size=32,
        patch_size=8,
        image_size=32,
        teacher_image_size=16,
        teacher_patch_size=8,
        cross_attention_heads=4,
        pal_tap_every=1,
        teacher_hidden_size=32,
    )


def _eve_7b() -> dict:
    return dict(text_config=_vicuna_7b(), vision_hidden_size=1024, patch_size=14, image_size=672)


def _eve_7b_hd() -> dict:
    return {**_eve_7b(), "image_size": 1344}


def _demo() -> dict:
    """eve-demo's model: 64-px images in 4-px patches (an 8 x 8 pooled grid for a square image)
    over a small Llama, aligned to a 32-px teacher with 4-px patches (scale 2, like EVE-7B)."""
    text = {**_debug()["text_config"], "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 512}
    return dict(text_config=text, vision_hidden_size=64, patch_size=4, image_size=64, teacher_image_size=32,
                teacher_patch_size=4, cross_attention_heads=4, pal_tap_every=2, teacher_hidden_size=64)


FLAVORS = {"debug": _debug, "demo": _demo, "eve-7b": _eve_7b, "eve-7b-hd": _eve_7b_hd}
