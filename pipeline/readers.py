"""Reading the input's containers: a loose file, a WebDataset tar, a Parquet file of images.

One reader per container serves both stages that read the input: the scan, which goes through
each file once, front to back (a header, a hash, a tar's members, a Parquet file's rows), and
the fit, which reads one image (`read_image`: a local file lazily by its path, a tar member by
range, a Parquet row through its row group). Sources are resolved by the job's `Input`; a
failure is an OSError or a pyarrow error, which the stages turn into the file's rejection.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import io
import itertools
import os
import stat
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.inputs import ARCHIVE_EXTENSION, PARQUET_EXTENSION, Input, container, is_local
from pipeline.rejects import Reason, reject

PARQUET_BATCH_ROWS = 64  # rows of a Parquet input turned into Python values at once


# A loose file: an image, a caption sidecar, a metadata.jsonl


def open_file(source: Input, path: str, limit: int | None = None) -> BinaryIO:
    """The file for reading: a local file itself (read lazily), else its bytes in memory,
    only the first `limit` of them when given (one ranged read from an object store)."""
    filesystem, path = source.resolve(path)
    if is_local(filesystem):
        return open(path, "rb")  # the caller closes it
    with filesystem.open_input_file(path) as stream:
        return io.BytesIO(stream.readall() if limit is None else stream.read(limit))


def open_stream(source: Input, path: str) -> BinaryIO:
    """The file for reading straight through (a local file, or one GET of an object)."""
    filesystem, path = source.resolve(path)
    if is_local(filesystem):
        return open(path, "rb")
    return filesystem.open_input_stream(path)


def read_bytes(source: Input, path: str) -> bytes:
    with open_file(source, path) as stream:
        return stream.read()


def file_info(filesystem: pafs.FileSystem, path: str) -> dict:
    """Size and mtime of a file a listing names, or its rejection: missing, not a file."""
    if is_local(filesystem):
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return reject(Reason.UNREADABLE, "no such file")
        if stat.S_ISDIR(info.st_mode):
            return reject(Reason.NOT_A_FILE, "a directory")
        if not stat.S_ISREG(info.st_mode):
            return reject(Reason.NOT_A_FILE, "not a regular file (a FIFO, socket or device)")
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return reject(Reason.UNREADABLE, "no such file")
    if info.type != pafs.FileType.File:
        return reject(Reason.NOT_A_FILE, f"not a file ({info.type.name})")
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def _loose_image(source: Input, row: dict) -> bytes | str:
    """A loose image: its local path (read lazily by the decoder), else its bytes."""
    filesystem, path = source.resolve(row["source"])
    if is_local(filesystem):
        return path
    with filesystem.open_input_file(path) as stream:
        return stream.readall()


# A WebDataset tar


@contextlib.contextmanager
def open_tar(source: Input, archive: str) -> Iterator[tarfile.TarFile]:
    """The tar as a stream, read once front to back (never extracted, a member at a time)."""
    with open_stream(source, archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        yield tar


def _tar_image(source: Input, row: dict) -> bytes:
    """A tar member's bytes, by range (one ranged GET on an object store)."""
    filesystem, path = source.resolve(row["archive"])
    offset, size = row["member_offset"], row["size"]
    if is_local(filesystem):
        with open(path, "rb") as stream:
            stream.seek(offset)
            return stream.read(size)
    with filesystem.open_input_file(path) as stream:
        return stream.read_at(size, offset)


# A Parquet file of images


def open_parquet(source: Input, archive: str) -> pq.ParquetFile:
    """A Parquet file. pyarrow reads a row group's column chunk whole (one coalesced read on
    an object store) whatever the batch size: scan.MAX_ROW_GROUP_BYTES bounds it."""
    filesystem, path = source.resolve(archive)
    return pq.ParquetFile(filesystem.open_input_file(path))


def image_bytes(value: object) -> bytes | None:
    """An image column's value: a `datasets.Image` struct's bytes, or plain binary."""
    return value.get("bytes") if isinstance(value, dict) else value


class _ParquetCursor:
    """A Parquet file's image column read forward, a row group at a time and PARQUET_BATCH_ROWS
    rows of it at a time: rows asked for in file order (as a fit task asks) cost one pass over
    their row groups; a row behind is read from the start of its group. A damaged row group
    costs only its own rows."""

    def __init__(self, source: Input, archive: str) -> None:
        self._file = open_parquet(source, archive)
        metadata = self._file.metadata
        counts = (metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
        self._starts = list(itertools.accumulate(counts, initial=0))  # each group's first row
        self._column = source.image_column
        self._seek(0)

    def _seek(self, group: int) -> None:
        self._group = group
        self._batches = self._file.iter_batches(PARQUET_BATCH_ROWS, [group], [self._column])
        self._first, self._batch = self._starts[group], pa.array([], pa.binary())

    def image(self, row: int) -> bytes | None:
        group = bisect.bisect_right(self._starts, row) - 1
        if not 0 <= group < len(self._starts) - 1:
            raise OSError(f"row {row} is not in the file ({self._starts[-1]} rows)")
        if group != self._group or row < self._first:
            self._seek(group)
        while row >= self._first + len(self._batch):
            self._first += len(self._batch)
            if (batch := next(self._batches, None)) is None:
                raise OSError(f"row {row} is past the end of its row group ({self._first})")
            self._batch = batch.column(0)
        return image_bytes(self._batch[row - self._first].as_py())


@functools.lru_cache(maxsize=2)  # a fit task reads its rows by file, in file order
def _parquet_cursor(source: Input, archive: str) -> _ParquetCursor:
    return _ParquetCursor(source, archive)


def _parquet_image(source: Input, row: dict) -> bytes | None:
    """A Parquet row's image bytes (`_ParquetCursor`); a file that fails to read is opened
    anew for the next row asked of it."""
    try:
        return _parquet_cursor(source, row["archive"]).image(row["source_row"])
    except Exception:
        _parquet_cursor.cache_clear()
        raise


_IMAGE_READERS = {
    "": _loose_image,
    ARCHIVE_EXTENSION: _tar_image,
    PARQUET_EXTENSION: _parquet_image,
}


def read_image(source: Input, row: dict) -> bytes | str | None:
    """The fit's read of a listed image (a scan row): by its container's reader."""
    return _IMAGE_READERS[container(row.get("archive") or "")](source, row)
