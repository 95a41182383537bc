"""Decode any image a user or a dataset hands us into an RGB PIL image, or fail clearly.

Every failure is an `InvalidImageError` that names the source and carries a reason code, so
pipelines can record the rejection and move on instead of crashing deep inside torch.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eve.image_ref import NotRegularFileError, read_regular_file

ImageInput = Union[str, os.PathLike, bytes, Image.Image]


class InvalidImageError(ValueError):
    """An image that cannot be used. `reason` is a short code (decode_error, empty, too_large,
    missing, not_a_file)."""

    def __init__(self, source: str, reason: str, detail: str):
        super().__init__(f"{source}: {reason}: {detail}")
        self.source, self.reason, self.detail = source, reason, detail


def _source_name(image: ImageInput) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, bytes):
        return f"<{len(image)} bytes>"
    return f"<PIL image {getattr(image, 'size', '?')}>"


def load_image(image: ImageInput, max_pixels: int | None = None) -> Image.Image:
    """Open `image` (path, encoded bytes or PIL image) as an RGB image with EXIF orientation
    applied. Alpha is composited onto white; 16-bit and float images are rescaled to 8 bits;
    animated images give their first frame. `max_pixels` (default: Pillow's bomb limit)
    rejects decompression bombs before decoding.
    """
    source = _source_name(image)
    try:
        if isinstance(image, Image.Image):
            img = image
        else:
            data = read_regular_file(image) if not isinstance(image, bytes) else image
            if not data:
                raise InvalidImageError(source, "empty", "zero-byte file")
            img = Image.open(io.BytesIO(data))
            _check_size(img, source, max_pixels)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
        if getattr(img, "is_animated", False):
            img.seek(0)
        if img is image:  # the caller's: turned on a copy
            img = ImageOps.exif_transpose(img)
        else:  # ours: no copy (a server decodes one per request)
            ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(source, "too_large", str(e)) from e
    except FileNotFoundError as e:
        raise InvalidImageError(source, "missing", str(e)) from e
    except NotRegularFileError as e:
        raise InvalidImageError(source, "not_a_file", str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncation and corruption as OSError/SyntaxError/ValueError.
        raise InvalidImageError(source, "decode_error", f"{type(e).__name__}: {e}") from e


def _check_size(img: Image.Image, source: str, max_pixels: int | None) -> None:
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InvalidImageError(source, "decode_error", f"invalid size {w}x{h}")
    if limit is not None and w * h > limit:
        raise InvalidImageError(source, "too_large", f"{w}x{h} exceeds {limit} pixels")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")  # 2-D uint8 -> L
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
