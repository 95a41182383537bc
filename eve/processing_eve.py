"""Image processor and processor for EVE (SPEC 1.1 and 1.3).

Geometry, for an image of native size (H, W) with long side L and short side S:
  at teacher scale T (336): long -> T, short -> ceil(T * S / L / p) * p  (p = teacher patch, 14)
  at model scale: both times r = image_size / T (2 at 672, 4 at 1344).
EVEv2 (`resize_rule="area"`): about image_size**2 pixels at the image's own aspect ratio, each
side rounded up to a multiple of 2p (`area_geometry`).
The model sees each image un-padded: the batch is padded to its largest height and width with
zeros (the normalised mean) at the bottom/right, and `image_sizes` says where each image ends,
so padding never reaches the decoder. `pad_to_square=True` gives the reference layout instead
(a centred square canvas plus a 4th mask channel); both yield identical visual tokens.
"""

import copy
import math
from typing import Sequence, Unpack

import numpy as np
import torch
from PIL import Image
from transformers import AddedToken, BatchFeature
from transformers.image_processing_utils import BaseImageProcessor, ImageProcessingMixin
from transformers.processing_utils import ImagesKwargs, ProcessorMixin, TextKwargs

from eve.processing_kwargs import EveImagesKwargs, EveProcessorKwargs, EveTextKwargs

from eve.image_io import ImageInput, load_image

IMAGE_TOKEN = "<image>"


def teacher_geometry(height: int, width: int, teacher_size: int, teacher_patch: int) -> tuple[int, int]:
    """(h, w) at teacher scale: long side -> teacher_size, short side rounded up to the patch."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    long, short = max(height, width), min(height, width)
    # ceil(teacher_size * short / long / patch) in integers, at least one patch
    short_t = max(1, -(-teacher_size * short // (long * teacher_patch))) * teacher_patch
    return (teacher_size, short_t) if height >= width else (short_t, teacher_size)


def model_geometry(height: int, width: int, image_size: int, teacher_size: int, teacher_patch: int) -> tuple[int, int]:
    """(h, w) fed to the patch embedding: the teacher geometry times r = image_size / teacher_size."""
    h, w = teacher_geometry(height, width, teacher_size, teacher_patch)
    r = image_size // teacher_size
    return h * r, w * r


def area_geometry(height: int, width: int, image_size: int, unit: int) -> tuple[int, int]:
    """EVEv2's (h, w): the image scaled to about image_size**2 pixels at its own aspect ratio,
    each side rounded up to a multiple of `unit` (one visual token, 2 x patch) and at least one.
    Small images are scaled up too, as the reference does at inference."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = math.sqrt(height * width) / image_size

    def side(n: int) -> int:
        return max(math.ceil(n / ratio / unit), 1) * unit

    return side(height), side(width)


def num_visual_tokens(height: int, width: int, patch_size: int) -> int:
    """Length of the visual sequence for a (resized) image: <CLS> + h rows of (w + <SPL>)."""
    h, w = height // (2 * patch_size), width // (2 * patch_size)
    return 1 + h * (w + 1)


def centred_offset(canvas: int, size: int, grid: int) -> int:
    """Offset that centres `size` on `canvas`, snapped down to the patch grid so that patches of
    the canvas and of the image coincide (at 672 the snap never moves anything)."""
    return (canvas - size) // (2 * grid) * grid


def expand_image_tokens(
    ids: Sequence[int], image_token_id: int, counts: Sequence[int], labels: Sequence[int] | None = None
):
    """Replace the k-th `image_token_id` in `ids` by counts[k] copies of it (labels -> -100).

    Returns the new ids (and labels when given). Raises when placeholders and images differ.
    """
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(positions) != len(counts):
        raise ValueError(
            f"the text has {len(positions)} {IMAGE_TOKEN} placeholder(s) but {len(counts)} image(s) were given"
        )
    out_ids, out_labels, start = [], [], 0
    for pos, n in zip(positions, counts):
        out_ids += list(ids[start:pos]) + [image_token_id] * n
        if labels is not None:
            out_labels += list(labels[start:pos]) + [-100] * n
        start = pos + 1
    out_ids += list(ids[start:])
    if labels is None:
        return out_ids
    out_labels += list(labels[start:])
    return out_ids, out_labels


def encode_text(tokenizer, text: str, split_at_images: bool = False, add_special_tokens: bool = True,
                return_offsets: bool = False, **kwargs) -> dict:
    """Ids (and character offsets) of one text whose `<image>` placeholders are the tokenizer's
    image token (one id each, expanded later by `expand_image_tokens`).

    `split_at_images=False` tokenizes the whole text at once, `<image>` being an added special token.
    `split_at_images=True` is the reference's `tokenizer_image_token`, which EVE's released models
    were trained and evaluated on: the text between placeholders is tokenized piece by piece, each
    as a text of its own (so a SentencePiece tokenizer gives the text after an image its dummy
    prefix "▁"), and only the first piece keeps its BOS.
    """
    if not split_at_images:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=return_offsets, **kwargs)
        out = {"input_ids": list(enc["input_ids"])}
        if return_offsets:
            out["offset_mapping"] = [tuple(o) for o in enc["offset_mapping"]]
        return out
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, offsets, start = [], [], 0
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(image_id)
            offsets.append((start - len(IMAGE_TOKEN), start))
        enc = tokenizer(piece, add_special_tokens=add_special_tokens, return_offsets_mapping=return_offsets, **kwargs)
        piece_ids = list(enc["input_ids"])
        piece_offsets = [tuple(o) for o in enc["offset_mapping"]] if return_offsets else [(0, 0)] * len(piece_ids)
        if k and piece_ids and piece_ids[0] == tokenizer.bos_token_id and add_special_tokens:
            piece_ids, piece_offsets = piece_ids[1:], piece_offsets[1:]
        ids += piece_ids
        offsets += [(a + start, b + start) for a, b in piece_offsets]
        start += len(piece) + len(IMAGE_TOKEN)
    return {"input_ids": ids, "offset_mapping": offsets} if return_offsets else {"input_ids": ids}


def truncate_text(ids: list[int], max_length: int, image_token_id: int, side: str = "right", index: int = 0) -> list[int]:
    """`ids` cut to `max_length` from `side`, removing text only: a cut that would remove any
    image token raises, since the model needs every visual token of an image it is given."""
    if len(ids) <= max_length:
        return ids
    kept, cut = (ids[:max_length], ids[max_length:]) if side == "right" else (ids[len(ids) - max_length:], ids[: len(ids) - max_length])
    if image_token_id in cut:
        raise ValueError(
            f"text {index}: truncating {len(ids)} tokens to max_length={max_length} from the {side} would cut an image "
            f"({sum(t == image_token_id for t in ids)} image tokens): raise max_length or pass fewer or smaller images"
        )
    return kept


def add_image_token(tokenizer) -> int:
    """Give the tokenizer the `<image>` special token (once); returns its id, which lies past the
    decoder's vocabulary for a tokenizer that fills it (32000 for Vicuna)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def pad_images(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """[3, h_i, w_i] arrays -> [N, 3, max h, max w], each at the top-left, zeros (the mean) elsewhere."""
    hmax, wmax = max(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
    batch = np.zeros((len(arrays), arrays[0].shape[0], hmax, wmax), dtype=np.float32)
    for b, arr in enumerate(arrays):
        batch[b, :, : arr.shape[1], : arr.shape[2]] = arr
    return batch


def image_sizes_of(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.asarray([a.shape[1:] for a in arrays], dtype=np.int64).reshape(-1, 2)


class EveImageProcessor(BaseImageProcessor):
    r"""Resizes any image to EVE's geometry and normalises it (SPEC 1.1).

    Returns `pixel_values` [N, 3, Hmax, Wmax] (each image at the top-left, zeros elsewhere) and
    `image_sizes` [N, 2] (h, w); with `pad_to_square=True`, `pixel_values` [N, 4, S, S] with the
    image centred and a mask channel instead. With `return_teacher=True`, also
    `teacher_pixel_values` [N, 3, T, T]: the teacher's own copy at teacher scale, centred.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = EveImagesKwargs
    SETTINGS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "resample", "max_pixels",
                "canvas_fill")

    def __init__(
        self,
        image_size: int = 672,
        patch_size: int = 14,
        teacher_image_size: int = 336,
        teacher_patch_size: int = 14,
        image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        teacher_image_mean: Sequence[float] | None = None,
        teacher_image_std: Sequence[float] | None = None,
        resample: int = Image.Resampling.BICUBIC,
        max_pixels: int | None = None,
        canvas_fill: Sequence[int] | None = None,
        rescale_factor: float = 1 / 255,
        do_rescale: bool = True,
        do_normalize: bool = True,
        resize_rule: str = "teacher_grid",
        **kwargs,
    ):
        # BaseImageProcessor's own __init__ validates torchvision/PIL backend kwargs that this
        # processor does not use; it subclasses it only so the Auto classes accept it.
        ImageProcessingMixin.__init__(self, **kwargs)
        self.image_size, self.patch_size = image_size, patch_size
        self.teacher_image_size, self.teacher_patch_size = teacher_image_size, teacher_patch_size
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.teacher_image_mean = list(teacher_image_mean or image_mean)
        self.teacher_image_std = list(teacher_image_std or image_std)
        self.resample = int(resample)
        if resize_rule not in ("teacher_grid", "area"):
            raise ValueError(f"resize_rule must be 'teacher_grid' (EVE) or 'area' (EVEv2), not {resize_rule!r}")
        self.resize_rule = resize_rule
        self.max_pixels = max_pixels
        self.do_rescale, self.do_normalize = bool(do_rescale), bool(do_normalize)
        self.rescale_factor = float(rescale_factor)
        if self.rescale_factor == 0:
            raise ValueError("rescale_factor must not be 0 (pass do_rescale=False to keep 0-255 values)")
        # RGB (0-255) of the square canvases' border; None is the exact normalisation mean (0 after
        # normalising). The reference pads with int(255 * mean), which converted models keep.
        self.canvas_fill = None if canvas_fill is None else [int(c) for c in canvas_fill]

    @classmethod
    def from_config(cls, config) -> "EveImageProcessor":
        """The processor matching an `EveConfig`."""
        return cls(
            image_size=config.image_size,
            patch_size=config.patch_size,
            teacher_image_size=config.teacher_image_size,
            teacher_patch_size=config.teacher_patch_size,
            image_mean=config.image_mean,
            image_std=config.image_std,
            teacher_image_mean=config.teacher_image_mean,
            teacher_image_std=config.teacher_image_std,
            resize_rule=getattr(config, "resize_rule", "teacher_grid"),
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_rule == "area":
            return area_geometry(height, width, self.image_size, 2 * self.patch_size)
        return model_geometry(height, width, self.image_size, self.teacher_image_size, self.teacher_patch_size)

    def num_visual_tokens(self, height: int, width: int) -> int:
        """Visual tokens for a native (height, width) image."""
        return num_visual_tokens(*self.resized_size(height, width), self.patch_size)

    def _fill(self, mean, std) -> np.ndarray:
        """The square canvases' border in the output's units: [3, 1, 1]. By default the exact
        normalisation mean; `canvas_fill` gives an RGB colour instead."""
        if self.canvas_fill is None and self.do_normalize:
            return np.zeros((3, 1, 1), dtype=np.float32)  # exactly the mean after normalising
        # an RGB colour (0-255), by default the mean's, through the same steps as the pixels
        fill = np.asarray(self.canvas_fill if self.canvas_fill is not None else np.asarray(mean) * 255, dtype=np.float32)
        return self._normalise(self._rescale(fill), mean, std).reshape(3, 1, 1)

    def _rescale(self, arr: np.ndarray) -> np.ndarray:
        # Divided, not multiplied: for the default 1/255 this is exactly `/ 255.0`, the arithmetic
        # every model trained here saw (a multiply differs by an ulp, which trajectories amplify).
        return arr / np.float32(1.0 / self.rescale_factor) if self.do_rescale else arr

    def _normalise(self, arr: np.ndarray, mean, std) -> np.ndarray:
        if not self.do_normalize:
            return arr
        return (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)

    def _scaled(self, hwc: np.ndarray, mean, std) -> np.ndarray:
        """0-255 pixels [h, w, 3] -> rescaled, normalised float32 [3, h, w]."""
        return self._normalise(self._rescale(np.asarray(hwc, dtype=np.float32)), mean, std).transpose(2, 0, 1)

    def _to_array(self, img: Image.Image, size: tuple[int, int], mean, std) -> np.ndarray:
        h, w = size
        resized = img.resize((w, h), resample=self.resample) if img.size != (w, h) else img
        return self._scaled(np.asarray(resized), mean, std)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        return_teacher: bool = False,
        pad_to_square: bool = False,
        return_tensors: str | None = "pt",
        **settings,
    ) -> BatchFeature:
        """`settings` override this call's SETTINGS (e.g. `image_mean`); anything else is an error."""
        unknown = sorted(set(settings) - set(self.SETTINGS))
        if unknown:
            raise TypeError(f"EveImageProcessor does not take {unknown}; per-call settings: {list(self.SETTINGS)} "
                            "(the geometry belongs to the model's config)")
        if settings:
            if settings.get("rescale_factor", 1) == 0:
                raise ValueError("rescale_factor must not be 0 (pass do_rescale=False to keep 0-255 values)")
            ip = copy.copy(self)
            ip.__dict__.update({k: v for k, v in settings.items()})
            return ip(images, return_teacher, pad_to_square, return_tensors)
        if not isinstance(images, (list, tuple)):
            images = [images]
        pil = [load_image(im, self.max_pixels) for im in images]
        if pad_to_square:
            data = {"pixel_values": self.square_canvas(pil)}
        else:
            arrays = [self.preprocess_one(im) for im in pil]
            data = {"pixel_values": pad_images(arrays), "image_sizes": image_sizes_of(arrays)}
        if return_teacher:
            data["teacher_pixel_values"] = self.teacher_pixels(pil)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels at model geometry as `__call__(..., do_rescale=False, do_normalize=False)` gives
        them ([3, h, w], 0-255, any dtype) -> what `__call__` gives for the same image: rescaled
        and normalised by this processor's settings, float32, the same arithmetic. eve-serve
        prepares a request in 8 bits (a quarter of the bytes to hand its engine) and normalises
        it in the engine."""
        return self._scaled(np.asarray(pixels).transpose(1, 2, 0), self.image_mean, self.image_std)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        """One decoded RGB image at model geometry, normalised and un-padded: [3, h, w]."""
        return self._to_array(image, self.resized_size(image.height, image.width), self.image_mean, self.image_std)

    def square_canvas(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The reference layout: centred on an image_size square, 4th channel = real pixels."""
        if self.resize_rule == "area":
            raise ValueError("pad_to_square is EVE v1's reference layout; EVEv2 images (resize_rule='area') can be longer "
                             "than image_size on one side: use the default un-padded layout")
        side = self.image_size
        batch = np.zeros((len(images), 4, side, side), dtype=np.float32)
        batch[:, :3] = self._fill(self.image_mean, self.image_std)
        for b, img in enumerate(images):
            arr = self.preprocess_one(img)
            h, w = arr.shape[1:]
            top, left = centred_offset(side, h, self.patch_size), centred_offset(side, w, self.patch_size)
            batch[b, :3, top : top + h, left : left + w] = arr
            batch[b, 3, top : top + h, left : left + w] = 1.0
        return batch

    def teacher_pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The teacher's copies: the model's image at teacher scale (`teacher_geometry` of its
        resized size, which for EVE's rule is the native size's), centred on a T x T canvas."""
        side, p = self.teacher_image_size, self.teacher_patch_size
        batch = np.zeros((len(images), 3, side, side), dtype=np.float32)
        batch[:] = self._fill(self.teacher_image_mean, self.teacher_image_std)
        for b, img in enumerate(images):
            h, w = teacher_geometry(*self.resized_size(img.height, img.width), side, p)
            top, left = centred_offset(side, h, p), centred_offset(side, w, p)
            batch[b, :, top : top + h, left : left + w] = self._to_array(
                img, (h, w), self.teacher_image_mean, self.teacher_image_std
            )
        return batch


class EveProcessor(ProcessorMixin):
    r"""Tokenizer + image processor, like transformers' Llava/Fuyu processors:
    `inputs = processor(text=..., images=..., return_tensors="pt")` is exactly what
    `model(**inputs)` and `model.generate(**inputs)` take.

    Batches are left-padded by default, as batched generation needs.
    Each `<image>` in the text becomes as many image-token ids as the image has visual tokens,
    in the order the images are given (a flat list, or one list per text).
    """

    valid_processor_kwargs = EveProcessorKwargs
    # Defaults of transformers' kwargs merging (lowest priority): left padding for batched generation.
    text_kwargs = EveProcessorKwargs._defaults["text_kwargs"]
    images_kwargs = EveProcessorKwargs._defaults["images_kwargs"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, split_at_images: bool = False, **kwargs):
        if tokenizer is not None:
            add_image_token(tokenizer)
        if chat_template is None:
            from eve.templates import chat_templates  # eve.templates builds on this module

            chat_template = chat_templates()
        # True for models converted from the reference (eve-convert): see `encode_text`.
        self.split_at_images = bool(split_at_images)
        self.image_token = IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        videos=None,
        audio=None,
        **kwargs: Unpack[EveProcessorKwargs],
    ) -> BatchFeature:
        """Settings go flat (`padding=...`, `return_teacher=True`) or by modality
        (`text_kwargs={...}`, `images_kwargs={...}`); a setting given both ways, or one that is
        not in EveTextKwargs / EveImagesKwargs, is an error. Defaults, lowest first: left padding,
        the tokenizer's own init settings (e.g. `padding="max_length"`, `max_length`) and the image
        processor's attributes, then what the call says."""
        if text is None:
            raise ValueError("EveProcessor needs `text` (use the image processor alone for images only)")
        if videos is not None or audio is not None:
            raise ValueError("EVE reads images and text; videos and audio are not supported (pass video frames as images)")
        # read here: transformers 5.17 does not know this flat setting, later ones mirror it into text_kwargs
        mm_token_types = kwargs.pop("return_mm_token_type_ids", False)
        if "return_mm_token_type_ids" in kwargs.get("text_kwargs", {}):
            kwargs["text_kwargs"] = dict(kwargs["text_kwargs"])  # the caller's dict stays as it was
            mm_token_types = kwargs["text_kwargs"].pop("return_mm_token_type_ids") or mm_token_types
        merged = self._merge_kwargs(EveProcessorKwargs, tokenizer_init_kwargs=self._tokenizer_defaults(),
                                    **_checked_kwargs(kwargs))
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        truncation = text_kwargs.pop("truncation", None)
        texts = [text] if isinstance(text, str) else list(text)
        per_text = _images_per_text(texts, images)
        data = {}
        counts: list[list[int]] = [[] for _ in texts]
        flat = [im for group in per_text for im in group]
        if flat:
            if images_kwargs.get("pad_to_square"):
                raise ValueError("pad_to_square is the image processor's reference layout; the processor pads per batch")
            image_inputs = self.image_processor(flat, return_tensors=None, **images_kwargs)
            data.update(image_inputs)
            sizes = image_inputs["image_sizes"].tolist()
            tokens = iter(num_visual_tokens(h, w, self.image_processor.patch_size) for h, w in sizes)
            counts = [[next(tokens) for _ in group] for group in per_text]
        special = text_kwargs.pop("add_special_tokens", True)
        if self.split_at_images:
            encoded = [encode_text(self.tokenizer, t, True, special)["input_ids"] for t in texts]
        else:  # one batched call
            encoded = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        ids = [expand_image_tokens(seq, self.image_token_id, c) for seq, c in zip(encoded, counts)]
        if truncation not in (None, False, "do_not_truncate") and text_kwargs.get("max_length") is not None:
            side = getattr(self.tokenizer, "truncation_side", "right")
            ids = [truncate_text(seq, text_kwargs["max_length"], self.image_token_id, side, i) for i, seq in enumerate(ids)]
        if text_kwargs.get("padding") != "max_length":
            text_kwargs.pop("max_length", None)  # it bounded truncation only
        data.update(self.tokenizer.pad({"input_ids": ids}, return_tensors=None, **text_kwargs))
        if mm_token_types:  # 1 at image tokens, as serving engines read them
            data["mm_token_type_ids"] = [[int(t == self.image_token_id) for t in seq] for seq in data["input_ids"]]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _tokenizer_defaults(self) -> dict:
        """The settings the tokenizer was made with, which take precedence over the processor's
        defaults, as in transformers' processors; except its padding side: saved tokenizers
        often say right (Vicuna's does), and batched generation needs left padding, so left
        stays unless a call says otherwise."""
        return {k: v for k, v in self.tokenizer.init_kwargs.items() if k != "padding_side"}

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decoded texts of generated ids (image tokens never reach the text)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


_TEXT_KEYS = set(EveTextKwargs.__annotations__)
_IMAGE_KEYS = set(EveImagesKwargs.__annotations__)


_OTHER_PROCESSING_KEYS = {k for kw in (TextKwargs, ImagesKwargs) for k in kw.__annotations__} - _TEXT_KEYS - _IMAGE_KEYS


def _checked_kwargs(kwargs: dict) -> dict:
    """transformers' merging drops a processing setting this processor does not honour (with a
    warning); here it is an error. Keys that are no processing setting at all (a pipeline hands
    generation kwargs over too) are left to transformers' warning."""
    for key, value in kwargs.items():
        allowed = {"text_kwargs": _TEXT_KEYS, "images_kwargs": _IMAGE_KEYS}.get(key)
        if allowed is not None:
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise TypeError(f"EveProcessor: {key} does not take {unknown}; it takes {sorted(allowed)}")
        elif key in _OTHER_PROCESSING_KEYS:
            raise TypeError(f"EveProcessor does not honour {key!r}; text settings: {sorted(_TEXT_KEYS)}, "
                            f"image settings: {sorted(_IMAGE_KEYS)}")
    return kwargs


def _images_per_text(texts: list[str], images) -> list[list]:
    """Group images by text in placeholder order, checking the counts."""
    wanted = [t.count(IMAGE_TOKEN) for t in texts]
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(g, (list, tuple)) for g in images):
        groups = [list(g) for g in images]
        if len(groups) != len(texts):
            raise ValueError(f"got {len(groups)} image lists for {len(texts)} texts")
    else:
        if len(images) != sum(wanted):
            raise ValueError(
                f"the text(s) hold {sum(wanted)} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s) were given"
            )
        it = iter(images)
        groups = [[next(it) for _ in range(n)] for n in wanted]
    for i, (group, n) in enumerate(zip(groups, wanted)):
        if len(group) != n:
            raise ValueError(f"text {i} holds {n} {IMAGE_TOKEN} placeholder(s) but {len(group)} image(s) were given")
    return groups
