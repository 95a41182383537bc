"""The per-call settings EveProcessor and EveImageProcessor honour, as transformers' typed
processing kwargs. Kept apart because transformers reads these annotations at run time, which
`from __future__ import annotations` (used everywhere else) would turn into strings."""

from typing import TypedDict

from transformers.processing_utils import ProcessingKwargs


class EveImagesKwargs(TypedDict, total=False):
    """What EveImageProcessor honours per call (`images_kwargs`); geometry is the model's and fixed."""

    return_teacher: bool  # also the teacher's copies (training)
    pad_to_square: bool  # the reference's square canvas + mask channel
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float
    resample: int
    max_pixels: int | None
    canvas_fill: list[int] | None
    return_tensors: str | None


class EveTextKwargs(TypedDict, total=False):
    """What EveProcessor honours for the text (`text_kwargs`). No truncation: an image is never cut."""

    add_special_tokens: bool
    padding: bool | str
    padding_side: str
    pad_to_multiple_of: int | None
    max_length: int | None
    return_attention_mask: bool
    return_tensors: str | None


class EveProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: EveTextKwargs
    images_kwargs: EveImagesKwargs
