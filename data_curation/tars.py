"""Listing an uncompressed tar (a webdataset shard) without trusting it.

`list_tar` returns the members a reader can use as images, and everything else that is named
like an image, or the tar itself, as an `Unusable` that the scan records as a rejected item, so
the counts add up against what the tar holds:

- a regular member with an image name is listed; when a name repeats, the last one is listed
  (tar extraction and train/ read that one) and the earlier ones are `duplicate_name`;
- a symbolic link, hard link, device or FIFO member with an image name is `not_a_file`;
- a tar that cannot be opened, or that stops being a tar part-way (cut inside a header or a
  member's data, garbage after a member), is one `unreadable_container` naming the byte offset
  and tarfile's error; the members before that point are listed.
- directory members and other members (webdataset's sidecars: .json, .txt, ...) are counted.

tarfile ends its listing quietly at a header it cannot parse (a tar cut inside a header reads as
a shorter tar), so the bytes after the last header are checked: a well-formed tar ends with zero
blocks, or at the end of the file.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

CHUNK = 1 << 20


@dataclass(frozen=True)
class Unusable:
    """A thing the scan found that cannot be used: `name` tells it from its container's other
    entries (None: the container itself)."""

    name: str | None
    reason: str
    detail: str


@dataclass
class TarListing:
    members: list[tarfile.TarInfo] = field(default_factory=list)  # regular image members, in tar order
    unusable: list[Unusable] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # what is not an image: {"tar_directories": n, ...}


def list_tar(f: BinaryIO, path: str, is_image: Callable[[str], bool]) -> TarListing:
    """Everything in the tar open as `f` (named `path` in messages). Memory: its member headers,
    which tarfile keeps anyway."""
    out = TarListing()
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except Exception as e:  # noqa: BLE001 - whatever a hostile file makes tarfile raise is recorded
        out.unusable.append(Unusable(None, "unreadable_container", f"{path}: not a readable uncompressed tar: {_error(e)}"))
        return out
    images: list[tarfile.TarInfo] = []
    while True:
        try:
            member = tar.next()
        except Exception as e:  # noqa: BLE001
            last = f" (cut inside the data of {images[-1].name!r}?)" if images and "end of data" in str(e) else ""
            out.unusable.append(Unusable(None, "unreadable_container", f"{path}: unreadable after byte {tar.offset}{last}: "
                                         f"{_error(e)}; the {len(tar.members)} member(s) before it are listed"))
            break
        if member is None:
            garbage = _first_nonzero(f, tar.offset)
            if garbage is not None:
                out.unusable.append(Unusable(None, "unreadable_container",
                                             f"{path}: no valid tar header at byte {garbage} (cut or corrupt there); "
                                             f"the {len(tar.members)} member(s) before it are listed"))
            break
        if member.isdir():
            out.skipped["tar_directories"] += 1
        elif not is_image(member.name):
            out.skipped["tar_other_members"] += 1
        elif member.isfile():
            images.append(member)
        else:
            out.unusable.append(Unusable(member.name, "not_a_file", f"{path}: member {member.name!r} is {_kind(member)}"))
    last_of = {m.name: m for m in images}
    for m in images:
        if last_of[m.name] is m:
            out.members.append(m)
        else:
            out.unusable.append(Unusable(f"{m.name}@{m.offset}", "duplicate_name",
                                         f"{path}: member {m.name!r} at byte {m.offset} is repeated at byte "
                                         f"{last_of[m.name].offset}, which readers of the tar use"))
    return out


def _first_nonzero(f: BinaryIO, offset: int) -> int | None:
    """The offset of the first byte that is not zero from `offset` on, or None."""
    f.seek(offset)
    while chunk := f.read(CHUNK):
        stripped = chunk.lstrip(b"\0")
        if stripped:
            return offset + len(chunk) - len(stripped)
        offset += len(chunk)
    return None


def _kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"a symbolic link to {m.linkname!r}"
    if m.islnk():
        return f"a hard link to {m.linkname!r}"
    if m.ischr() or m.isblk():
        return "a device"
    if m.isfifo():
        return "a FIFO"
    return f"not a regular file (type {m.type!r})"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
