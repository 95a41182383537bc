"""img2dataset parquet files, read one row group at a time (memory: one row group, never the file;
img2dataset writes 100 rows a group).

A parquet needs a `key` column; `caption`, `url`, `status` and `error_message` are kept as the
item's meta. Its images are in the parquet itself when it has a binary column named after
img2dataset's `--encode_format` (`jpg`, `png`, `webp`: its `--output_format parquet`), else in a
companion tar or folder (see sources.py). Every failure is a `ParquetError` with the reason the
scan records (`unreadable_container`: pyarrow cannot read it, from the row group named on;
`unsupported_container`: readable, but not img2dataset's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterator

IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg")
META_COLUMNS = ("caption", "url", "status", "error_message")


class ParquetError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ParquetLayout:
    image_column: str | None  # the column holding the encoded images, if the parquet holds them
    meta_columns: tuple[str, ...]
    row_groups: int
    rows: int


def read_layout(f: BinaryIO, path: str) -> ParquetLayout:
    import pyarrow as pa

    pf = _open(f, path)
    schema = pf.schema_arrow
    if "key" not in schema.names:
        raise ParquetError("unsupported_container", f"{path}: no 'key' column (expected img2dataset's layout: key, url, "
                                                    f"caption, ...; it has {schema.names[:12]})")
    binary = [c for c in IMAGE_COLUMNS if c in schema.names
              and (pa.types.is_binary(schema.field(c).type) or pa.types.is_large_binary(schema.field(c).type))]
    return ParquetLayout(binary[0] if binary else None, tuple(c for c in META_COLUMNS if c in schema.names),
                         pf.metadata.num_row_groups, pf.metadata.num_rows)


def read_keys(f: BinaryIO, path: str) -> list:
    """The key column (the keys of one file: its only column read whole)."""
    return _read(lambda: _open(f, path).read(columns=["key"], use_threads=False).column("key").to_pylist(), path, "the keys")


def iter_row_groups(f: BinaryIO, path: str, layout: ParquetLayout) -> Iterator[tuple[int, "pyarrow.Table"]]:  # noqa: F821
    """(index, table of key, meta and image columns) per row group; a ParquetError names the
    first row group that cannot be read."""
    pf = _open(f, path)
    columns = ["key", *layout.meta_columns, *([layout.image_column] if layout.image_column else [])]
    for g in range(layout.row_groups):
        yield g, _read(lambda: pf.read_row_group(g, columns=columns, use_threads=False), path, f"row group {g}")


def read_image_column(f: BinaryIO, path: str, column: str, group: int):
    """One row group's images, as a pyarrow array."""
    return _read(lambda: _open(f, path).read_row_group(group, columns=[column], use_threads=False).column(0).combine_chunks(),
                 path, f"row group {group}")


def _open(f: BinaryIO, path: str):
    import pyarrow.parquet as pq

    return _read(lambda: pq.ParquetFile(f), path, "the footer")


def _read(read, path: str, what: str):
    try:
        return read()
    except ParquetError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a hostile file: recorded
        raise ParquetError("unreadable_container", f"{path}: pyarrow cannot read {what}: {type(e).__name__}: {e}") from e
