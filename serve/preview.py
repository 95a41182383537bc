"""The image as the model sees it, for the browser page: sizes, visual tokens and the pixels
after resizing, recovered from the processor's own output (not resized a second time)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from eve.processing_eve import num_visual_tokens


def describe(processor, image: Image.Image) -> dict:
    ip = processor.image_processor
    arr = ip.preprocess_one(image)  # [3, h, w], normalised, exactly what the patch embedding reads
    h, w = arr.shape[1:]
    if ip.do_normalize:
        arr = arr * np.asarray(ip.image_std, np.float32)[:, None, None] + np.asarray(ip.image_mean, np.float32)[:, None, None]
    if ip.do_rescale:
        arr = arr / np.float32(ip.rescale_factor)
    pixels = Image.fromarray(np.clip(arr.transpose(1, 2, 0).round(), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    pixels.save(buf, format="PNG")
    return {
        "native_size": [image.width, image.height],
        "processed_size": [int(w), int(h)],
        "patch_grid": [int(w) // (2 * ip.patch_size), int(h) // (2 * ip.patch_size)],
        "visual_tokens": num_visual_tokens(int(h), int(w), ip.patch_size),
        "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
    }
