"""Why one item failed, as a reason code and a short detail: the same text on every run (memory
addresses removed), so a resumed run writes byte-identical shards."""

from __future__ import annotations

import re

from eve.image_ref import NotRegularFileError

_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")
MAX_DETAIL = 300


def failure_of(e: BaseException) -> tuple[str, str]:
    """(reason, detail) of an exception raised while reading or decoding one item:
    eve.image_io.InvalidImageError carries its reason (empty, decode_error, too_large,
    missing, not_a_file); a file that is gone is `missing`, a FIFO, socket, device or folder where
    the scan saw a file is `not_a_file`, one this user may not read is `unreadable`; anything else
    is a `decode_error`."""
    reason, detail = getattr(e, "reason", None), getattr(e, "detail", None)
    if isinstance(reason, str) and isinstance(detail, str):
        return reason, clean_detail(detail)
    if isinstance(e, FileNotFoundError):
        return "missing", clean_detail(str(e))
    if isinstance(e, NotRegularFileError):
        return "not_a_file", clean_detail(str(e))
    if isinstance(e, PermissionError):
        return "unreadable", clean_detail(str(e))
    return "decode_error", clean_detail(f"{type(e).__name__}: {e}")


def clean_detail(text: str) -> str:
    return _ADDRESS.sub("", text)[:MAX_DETAIL]
