"""Reading an item's image back, wherever the scan found it (see sources.py): a file, one seek
into a tar, or a row of a parquet's image column.

Only regular files are ever opened, and without blocking: a FIFO named like an image (or
swapped in since the scan) would otherwise block a reader forever, and the run lock with it.
A parquet's images are read one row group at a time: `ItemReader` holds the last row group's
image column, so the items of a row group, consecutive in scan order, cost one read together
(memory: one row group per reader; img2dataset writes 100 rows a group).
"""

from __future__ import annotations

import io
import tarfile
import warnings

from PIL import Image

from data_curation import parquets
from eve.image_ref import open_regular_file, read_regular_file, split_ref

PARQUET_ROW_MARK = "#row="  # an image held in a parquet: ref "x.parquet#row=N"


class UnusableItemError(ValueError):
    """Reading an item the scan already found unusable (its reason travels with it)."""

    def __init__(self, item: dict):
        super().__init__(item.get("detail") or item["reason"])
        self.reason, self.detail = item["reason"], item.get("detail") or item["reason"]


class ItemReader:
    """Reads the encoded bytes of items: one seek into a tar, the file, or the image column of a
    parquet's row group. It holds the last row group's images: the items of a row group are
    consecutive in scan order, so reading them in order reads each row group once (memory: one
    row group; one reader per process or task, never shared)."""

    def __init__(self):
        self._group: tuple[tuple, object] | None = None  # ((path, column, group), pyarrow array)

    def read(self, item: dict) -> bytes:
        """FileNotFoundError when the item has no image or its file is gone; UnusableItemError
        for one the scan found unusable."""
        if item.get("reason"):
            raise UnusableItemError(item)
        ref = item.get("ref")
        if ref is None:
            raise FileNotFoundError(item.get("detail") or f"item {item.get('uid')} has no image")
        if "parquet_column" in item:
            images = self._row_group(ref.rsplit(PARQUET_ROW_MARK, 1)[0], item["parquet_column"], item["parquet_row_group"])
            data = images[item["parquet_row"]].as_py()
            if data is None:
                raise FileNotFoundError(f"{ref}: no image in {item['parquet_column']!r}")
            return data
        if "tar_offset" in item:
            tar_path, _ = split_ref(ref)
            with open_regular_file(tar_path) as f:
                f.seek(item["tar_offset"])
                return f.read(item["tar_size"])  # short when the tar is truncated: a decode error later
        return read_ref_bytes(ref)

    def _row_group(self, path: str, column: str, group: int):
        key = (path, column, group)
        if self._group is None or self._group[0] != key:
            self._group = None  # let the last one go before reading the next
            with open_regular_file(path) as f:
                self._group = (key, parquets.read_image_column(f, path, column, group))
        return self._group[1]


def read_item_bytes(item: dict) -> bytes:
    """The encoded bytes of one item (see ItemReader; stages keep one reader for many items)."""
    return ItemReader().read(item)


def read_ref_bytes(ref: str) -> bytes:
    """A path, or "x.tar#member" (found by walking the tar's headers)."""
    tar_path, member = split_ref(ref)
    if member is not None:
        with open_regular_file(tar_path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            try:
                data = tar.extractfile(member)
            except KeyError:
                data = None
            if data is None:
                raise FileNotFoundError(f"no file member {member!r} in {tar_path}")
            return data.read()
    return read_regular_file(ref)


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """(width, height) from the header of encoded bytes, or (None, None)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb warnings: the filter stage decides
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Exception:  # noqa: BLE001 - recorded by the filter stage, never fatal here
        return None, None


def header_size(item: dict, reader: ItemReader | None = None) -> tuple[int | None, int | None]:
    """(width, height) from the image header, or (None, None) when it cannot be read (the filter
    stage decodes the image and records why)."""
    if item.get("reason") or item.get("ref") is None:
        return None, None
    try:
        if "tar_offset" in item or "parquet_column" in item:
            return image_size((reader or ItemReader()).read(item))
        with warnings.catch_warnings(), open_regular_file(item["ref"]) as f:
            warnings.simplefilter("ignore")
            with Image.open(f) as img:
                return img.size
    except Exception:  # noqa: BLE001 - recorded by the filter stage, never fatal here
        return None, None
