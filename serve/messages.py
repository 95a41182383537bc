"""Chat messages -> the model's prompt and images, for `eve-chat` and `eve-serve` alike.

Messages use transformers' structured form (`{"role": "user", "content": [{"type": "image"},
{"type": "text", "text": ...}]}`) and the prompt is the processor's own chat template, so a
conversation reads exactly as eve-eval and training render it (`eve.templates`). OpenAI's form
(`image_url` parts holding data URLs) is translated here, and every way a request can be wrong
is a `RequestError` naming the message and part.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from PIL import Image

from eve.image_io import InvalidImageError, load_image
from serve.errors import RequestError

ROLES = ("system", "user", "assistant")
_DATA_URL = re.compile(r"^data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.I)


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_images: int = 8
    max_image_bytes: int = 20 * 1024 * 1024  # encoded
    max_pixels: int = 40_000_000  # decoded, before resizing: refuses decompression bombs


def decode_data_url(url: str, limits: Limits, where: str) -> Image.Image:
    """`data:image/...;base64,...` -> RGB image. Remote URLs are refused: the server fetches
    nothing on a client's behalf."""
    if not isinstance(url, str) or not _DATA_URL.match(url):
        shown = url if isinstance(url, str) and len(url) <= 60 else f"{str(url)[:60]}..."
        raise RequestError(f"{where}: image_url must be a base64 data URL (data:image/png;base64,...), got {shown!r}",
                           param=where, code="invalid_image_url")
    payload = url.split(",", 1)[1]
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(f"{where}: image is larger than {limits.max_image_bytes} bytes", param=where, code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}: the data URL is not valid base64 ({e})", param=where, code="invalid_image") from e
    try:
        return load_image(data, limits.max_pixels)
    except InvalidImageError as e:
        raise RequestError(f"{where}: cannot use the image: {e.reason}: {e.detail}", param=where, code="invalid_image") from e


def from_openai(messages, limits: Limits = Limits()) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI chat messages -> (structured messages for the chat template, images in prompt order)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out, images = [], []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} must be an object with role and content", param=where)
        role = msg.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        if role == "system" and i != 0:
            raise RequestError(f"{where}: a system message may only come first", param=where)
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise RequestError(f"{at}: only user messages may hold images", param=at)
                if len(images) == limits.max_images:
                    raise RequestError(f"{at}: too many images; a request may hold at most {limits.max_images}",
                                       param=at, code="too_many_images")
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(decode_data_url(url, limits, at))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{at}: a part is {{'type': 'text', 'text': ...}} or "
                                   f"{{'type': 'image_url', 'image_url': {{'url': 'data:...'}}}}, got type {kind!r}", param=at)
        out.append({"role": role, "content": parts})
    if out[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", param=f"messages[{len(out) - 1}]")
    return out, images


def render(processor, messages: list[dict], template: str | None = None) -> str:
    """The generation prompt of a conversation: the processor's chat template (`template` picks a
    named one: vicuna_v1, eve_v1, plain), ending where the assistant's answer starts."""
    return processor.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
