"""Why one item failed, as a reason code and a short detail: the same text on every run (memory
addresses removed), so a resumed run writes byte-identical shards."""

from __future__ import annotations

import re

_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")
MAX_DETAIL = 300


def failure_of(e: BaseException) -> tuple[str, str]:
    """(reason, detail) of an exception raised while reading or decoding one item:
    eve.image_io.InvalidImageError carries its reason (empty, decode_error, too_large,
    missing); a file that is gone is `missing`; anything else is a `decode_error`."""
    reason, detail = getattr(e, "reason", None), getattr(e, "detail", None)
    if not isinstance(reason, str) or not isinstance(detail, str):
        reason, detail = ("missing", str(e)) if isinstance(e, FileNotFoundError) else ("decode_error", f"{type(e).__name__}: {e}")
    return reason, clean_detail(detail)


def clean_detail(text: str) -> str:
    return _ADDRESS.sub("", text)[:MAX_DETAIL]
