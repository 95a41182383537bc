"""Eve2Config: EVEv2 (baaivision/EVE, folder EVEv2), the second family beside EVE v1.

What differs from v1 (EveConfig, whose decoder handling, image token and flavors it shares):
- the patch embedding is convolutions only: Conv(p x p, 3 -> C), GELU, Conv(2 x 2, C -> d),
  then `<CLS>` and a row-end token per row in the decoder's width (no cross-attention, no MLP);
- images are resized to about `image_size`**2 pixels at their own aspect ratio:
  r = sqrt(W * H) / image_size, each side W / r rounded up to a multiple of 2p (32 px);
- with `modality_experts`, every decoder layer holds vision copies of its norms, q/k/v/o and
  MLP, and image tokens go through them (eve/modality_experts.py).
The PAL (v1's teacher alignment) is not part of EVEv2's recipe, so EVEv2's shipped stages leave
it off; it is an option (`pal=true` in a stage), with the teacher fields of EveConfig.
"""

from __future__ import annotations

from eve.configuration_eve import EveConfig, _debug, _demo


class Eve2Config(EveConfig):
    r"""Configuration of an EVEv2 model.

    Args:
        text_config: the decoder's config (`llama`, `qwen2` or `mistral`; Qwen2.5-7B-Instruct for
            the paper).
        vision_hidden_size: channels C of the first convolution (1024).
        patch_size: kernel and stride p of the first convolution (16); a visual token covers
            2p x 2p pixels.
        image_size: side of the square whose area images are resized to (800 in the first
            stages, 1600 after).
        modality_experts: vision copies of every decoder layer's norms, attention projections
            and MLP (True in EVEv2).
        image_token_id, image_mean, image_std: as in EveConfig.
        pal_layers, pal_tap_every, cross_attention_heads, teacher_*: the optional PAL's, as in
            EveConfig; the teacher sees the model's image at teacher scale.
    """

    model_type = "eve2"

    vision_hidden_size: int = 1024
    patch_size: int = 16
    image_size: int = 1600
    resize_rule: str = "area"
    modality_experts: bool = True

    def _validate_geometry(self) -> None:
        if self.resize_rule != "area":
            raise ValueError(f"EVEv2 resizes by area (resize_rule='area'), not {self.resize_rule!r}")
        if self.image_size < 2 * self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must hold at least one visual token ({2 * self.patch_size} px)")
        if self.teacher_image_size % self.teacher_patch_size:
            raise ValueError(f"teacher_image_size ({self.teacher_image_size}) must be a multiple of "
                             f"teacher_patch_size ({self.teacher_patch_size})")
        if self.teacher_hidden_size % self.cross_attention_heads:
            raise ValueError("teacher_hidden_size must be divisible by cross_attention_heads (the PAL's heads)")

    @classmethod
    def from_flavor(cls, name: str, **overrides) -> "Eve2Config":
        """A named configuration: one of `EVE2_FLAVORS` (`eve2-debug`, `eve2-demo`, `eve2-7b`)."""
        if name not in EVE2_FLAVORS:
            raise KeyError(f"unknown EVEv2 flavor {name!r}; known: {', '.join(sorted(EVE2_FLAVORS))}")
        kwargs = EVE2_FLAVORS[name]()
        kwargs["text_config"] = {**kwargs["text_config"], **(overrides.pop("text_config", None) or {})}
        return cls(**{**kwargs, **overrides})


def _qwen25_7b() -> dict:
    return dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)


def _pal_settings(flavor: dict) -> dict:
    """The optional PAL's settings of a v1 flavor (its teacher, heads and taps)."""
    keys = ("teacher_image_size", "teacher_patch_size", "teacher_hidden_size", "cross_attention_heads", "pal_tap_every")
    return {k: flavor[k] for k in keys}


def _eve2_debug() -> dict:
    return dict(text_config=_debug()["text_config"], vision_hidden_size=32, patch_size=8, image_size=32, **_pal_settings(_debug()))


def _eve2_demo() -> dict:
    """eve-demo's EVEv2: the v1 demo's decoder, 4-px patches, images of about 64 x 64 pixels."""
    return dict(text_config=_demo()["text_config"], vision_hidden_size=64, patch_size=4, image_size=64, **_pal_settings(_demo()))


def _eve2_7b() -> dict:
    return dict(text_config=_qwen25_7b(), vision_hidden_size=1024, patch_size=16, image_size=1600)


EVE2_FLAVORS = {"eve2-debug": _eve2_debug, "eve2-demo": _eve2_demo, "eve2-7b": _eve2_7b}
