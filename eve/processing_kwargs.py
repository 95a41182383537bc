"""The per-call settings EveProcessor and EveImageProcessor honour, as transformers' typed
processing kwargs. Kept apart because transformers reads these annotations at run time, which
`from __future__ import annotations` (used everywhere else) would turn into strings."""

from typing import TypedDict

from transformers.processing_utils import ProcessingKwargs


class EveImagesKwargs(TypedDict, total=False):
    """What EveImageProcessor honours per call (`images_kwargs`); geometry is the model's and fixed."""

    return_teacher: bool  # also the teacher's copies (training)
    pad_to_square: bool  # the reference's square canvas + mask channel
    do_rescale: bool
    rescale_factor: int | float
    do_normalize: bool
    image_mean: float | list[float] | tuple[float, ...]
    image_std: float | list[float] | tuple[float, ...]
    resample: int
    max_pixels: int | None
    canvas_fill: list[int] | None
    return_tensors: str | None


class EveTextKwargs(TypedDict, total=False):
    """What EveProcessor honours for the text (`text_kwargs`). Truncation cuts text only: a cut
    that would remove any image token is an error (an image is never cut, SPEC 1.3)."""

    add_special_tokens: bool
    padding: bool | str
    padding_side: str
    truncation: bool | str | None
    pad_to_multiple_of: int | None
    max_length: int | None
    return_attention_mask: bool
    return_tensors: str | None


class EveProcessorKwargs(ProcessingKwargs, total=False):
    # Lowest-priority defaults: left padding for batched generation, tensors. transformers 5.17
    # reads them here; later versions read EveProcessor's class attributes, which are these.
    _defaults = {
        "text_kwargs": {"padding": True, "padding_side": "left", "add_special_tokens": True, "return_tensors": "pt"},
        "images_kwargs": {"return_tensors": "pt"},
    }
    text_kwargs: EveTextKwargs
    images_kwargs: EveImagesKwargs
