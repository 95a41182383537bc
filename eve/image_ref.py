"""Where an image lives, and reading it without ever blocking.

A reference is a plain path, or `shard.tar#member` for a member of an uncompressed tar (the form
curation exports and training reads). Folder and file names may hold `#` themselves (`we#ird/`),
so a reference is split at the first `.tar#`, and only there: this is the one parser.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

TAR_MARK = ".tar#"


def split_ref(ref: str) -> tuple[str, str | None]:
    """"a/b.tar#c/d.png" -> ("a/b.tar", "c/d.png"); "we#ird/x.png" -> ("we#ird/x.png", None)."""
    at = ref.find(TAR_MARK)
    if at < 0:
        return ref, None
    cut = at + len(TAR_MARK) - 1
    return ref[:cut], ref[cut + 1 :]


def join_ref(tar_path: str | os.PathLike, member: str) -> str:
    return f"{tar_path}#{member}"


class NotRegularFileError(ValueError):
    """A FIFO, socket, device or directory where an image file was expected."""


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """A regular file opened for reading, for readers that take only what they need (Pillow's
    header, tarfile, pyarrow). A FIFO, socket, device or directory named like an image would
    block a plain open() or read() forever (and a run lock with it): it is opened without
    blocking and refused with NotRegularFileError naming it; a missing file gives
    FileNotFoundError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ENXIO:  # what opening a socket gives
            raise NotRegularFileError(f"{path} is not a regular file (a socket)") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{path} is not a regular file ({file_kind(mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (see open_regular_file)."""
    with open_regular_file(path) as f:
        return f.read()


def file_kind(mode: int) -> str:
    """What a file that is not regular is, for messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"
