"""Listing the input: which image files there are, their caption sidecars, and what is unusable.

Input is a directory tree (a local path or any URL pyarrow opens: file://, s3://, gs://) or a
Parquet/CSV listing with a `path` column and an optional `caption` column. Captions in a tree
come from a sidecar with the image's stem and `.txt` or `.caption` (kohya-ss's convention).
Listing reads directory entries only, never file contents.
"""

from __future__ import annotations

import io
import itertools
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import IMAGE_EXTENSIONS
from pipeline.errors import UsageError
from pipeline.format import split_uri
from pipeline.rejects import Reason, reject

CAPTION_EXTENSIONS = (".txt", ".caption")  # a .txt sidecar wins over a .caption one

LISTING_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # relative to the input root, '/'-separated; or as listed
        ("size", pa.int64()),  # bytes; null where not known before the scan (listing input)
        ("mtime_ns", pa.int64()),
        ("caption_source", pa.string()),  # sidecar, relative like `source`; null if none
        ("caption_size", pa.int64()),
        ("caption_mtime_ns", pa.int64()),
        ("caption", pa.string()),  # a listing file's caption column; null otherwise
        ("reject", pa.string()),  # a rejection code when the entry is unusable as listed
        ("message", pa.string()),
    ]
)


@dataclass(frozen=True)
class InputRoot:
    """Where sources are read from: a directory, or the folder of a listing file."""

    uri: str

    @cached_property
    def _root(self) -> tuple[pafs.FileSystem, str]:
        return split_uri(self.uri)

    def resolve(self, source: str) -> tuple[pafs.FileSystem, str]:
        if "://" in source or source.startswith("/"):
            return pafs.FileSystem.from_uri(source)
        filesystem, root = self._root
        return filesystem, f"{root}/{source}"

    def open(self, source: str, limit: int | None = None) -> BinaryIO:
        """The file for reading: a local file itself (read lazily), else its bytes in memory,
        only the first `limit` of them when given (one ranged read from an object store)."""
        filesystem, path = self.resolve(source)
        if isinstance(filesystem, pafs.LocalFileSystem):
            return open(path, "rb")  # the caller closes it
        with filesystem.open_input_file(path) as stream:
            return io.BytesIO(stream.readall() if limit is None else stream.read(limit))

    def read_bytes(self, source: str) -> bytes:
        with self.open(source) as stream:
            return stream.read()

    def local_path(self, source: str) -> str | None:
        """The file's path when it is on this machine's filesystem, else None."""
        filesystem, path = self.resolve(source)
        return path if isinstance(filesystem, pafs.LocalFileSystem) else None


def absolute(uri: str) -> str:
    """A URL as it is; a local path made absolute, as Ray workers elsewhere must read it."""
    return uri if "://" in uri else os.path.abspath(uri)


def _is_listing_file(uri: str) -> bool:
    return uri.endswith((".parquet", ".csv"))


def input_root(uri: str) -> InputRoot:
    """The root sources are resolved against: the tree itself, or a listing's folder."""
    if _is_listing_file(uri):
        return InputRoot(uri.rsplit("/", 1)[0] if "/" in uri else ".")
    return InputRoot(uri.rstrip("/") or "/")


def check_input(uri: str) -> None:
    """Refuse a local input that cannot be one, before anything starts (a URL is checked by
    listing it): a missing path, a file that is not a listing, a folder without images."""
    filesystem, path = split_uri(absolute(uri))
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return
    if not os.path.exists(path):
        raise UsageError(f"--input {uri} does not exist")
    if os.path.isfile(path):
        if not _is_listing_file(uri):
            raise UsageError(
                f"--input {uri} is a file, not a folder of images or a .parquet/.csv listing "
                "with a 'path' column"
            )
    elif not _has_image_file(path):
        raise UsageError(
            f"--input {uri} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            "in it or in its subfolders"
        )


def _has_image_file(root: str) -> bool:
    for _, _, files in os.walk(root):
        if any(_extension(name) in IMAGE_EXTENSIONS for name in files):
            return True
    return False


def check_separate(input_uri: str, output_uri: str) -> None:
    """Refuse an OUT inside the input folder (a rerun would list the job's own files as images)
    or an input inside OUT (--overwrite clears OUT)."""
    if _is_listing_file(input_uri):
        return  # a listing names its files: nothing under its folder is listed by accident
    input_fs, input_path = split_uri(absolute(input_uri))
    output_fs, output_path = split_uri(absolute(output_uri))
    if input_fs.type_name != output_fs.type_name:
        return
    if isinstance(input_fs, pafs.LocalFileSystem):
        input_path, output_path = os.path.realpath(input_path), os.path.realpath(output_path)
    common = posixpath.commonpath([input_path, output_path])
    if common == input_path:
        raise UsageError(
            f"--output {output_uri} is inside --input {input_uri}: the next run would take the "
            "prepared files for images; put OUT beside the input"
        )
    if common == output_path:
        raise UsageError(f"--input {input_uri} is inside --output {output_uri}: keep them apart")


def list_input(uri: str) -> pa.Table:
    """All candidate images of the input as a table of LISTING_SCHEMA, sorted by source.

    A tree is walked one directory at a time (sidecars sit beside their images) and rows go
    to Arrow in chunks, so the Python objects alive at once stay few whatever the file count.
    """
    if _is_listing_file(uri):
        return _read_listing_file(uri).sort_by("source")
    filesystem, path = split_uri(input_root(uri).uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        directories = _walk_local(path)
    else:
        directories = _walk_remote(filesystem, path)
    rows = (row for entries in directories for row in _pair_captions(entries))
    batches = []
    while chunk := list(itertools.islice(rows, 8192)):
        batches.append(pa.RecordBatch.from_pylist(chunk, schema=LISTING_SCHEMA))
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA).sort_by("source")


def _walk_local(root: str) -> Iterator[list[dict]]:
    """Regular files under root, a directory at a time; directory links are not followed and
    file links must stay inside the root."""
    real_root = os.path.realpath(root)
    for directory, subdirectories, files in os.walk(root, followlinks=False):
        subdirectories.sort()
        entries = []
        for name in sorted(files):
            full = os.path.join(directory, name)
            source = PurePosixPath(os.path.relpath(full, root)).as_posix()
            try:
                source.encode()
            except UnicodeEncodeError:  # bytes Python could not decode: an old archive's name
                shown = os.fsencode(source).decode("utf-8", "backslashreplace")
                entries.append(
                    {"source": shown} | reject(Reason.BAD_NAME, "the file name is not UTF-8")
                )
                continue
            entries.append({"source": source} | _local_entry(full, real_root))
        yield entries


def _local_entry(full: str, real_root: str) -> dict:
    """A local file's size and mtime, or why it cannot be an input."""
    try:
        info = os.stat(full)  # follows a link: a loop or dangling link raises here
    except OSError as error:
        return reject(Reason.UNREADABLE, f"cannot stat: {error.strerror}")
    if (
        os.path.islink(full)
        and os.path.commonpath([real_root, os.path.realpath(full)]) != real_root
    ):
        return reject(Reason.OUTSIDE_ROOT, "symlink points outside the input root")
    if not stat.S_ISREG(info.st_mode):
        return reject(Reason.NOT_A_FILE, "not a regular file")
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _walk_remote(filesystem: pafs.FileSystem, root: str) -> Iterator[list[dict]]:
    """An object store's files under root, grouped by their folder."""
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    start = len(root.rstrip("/")) + 1
    for _, group in itertools.groupby(files, key=lambda file: file[0].rsplit("/", 1)[0]):
        yield [
            {"source": path[start:], "size": size, "mtime_ns": mtime} for path, size, mtime in group
        ]


def _pair_captions(entries: list[dict]) -> Iterator[dict]:
    """One directory's images with their sidecars; unknown and orphan files become rejections.

    Sidecar extensions match in any case (`photo.TXT`), as image extensions do.
    """
    by_source = {entry["source"]: entry for entry in entries}
    sidecars = {
        (_stem(source), _extension(source)): entry
        for source, entry in by_source.items()
        if _extension(source) in CAPTION_EXTENSIONS
    }
    image_stems = {_stem(source) for source in by_source if _extension(source) in IMAGE_EXTENSIONS}
    for source, entry in by_source.items():
        extension = _extension(source)
        if entry.get("reject"):
            yield entry
        elif extension in IMAGE_EXTENSIONS:
            for caption_extension in CAPTION_EXTENSIONS:
                sidecar = sidecars.get((_stem(source), caption_extension))
                if sidecar and not sidecar.get("reject"):
                    entry |= {
                        "caption_source": sidecar["source"],
                        "caption_size": sidecar["size"],
                        "caption_mtime_ns": sidecar["mtime_ns"],
                    }
                    break
            yield entry
        elif extension in CAPTION_EXTENSIONS:
            if _stem(source) not in image_stems:
                yield entry | reject(
                    Reason.ORPHAN_CAPTION, "caption file without an image of the same name"
                )
        else:
            yield entry | reject(
                Reason.UNSUPPORTED_FORMAT, f"not an image extension: {extension or 'none'}"
            )


def _extension(source: str) -> str:
    return PurePosixPath(source).suffix.lower()


def _stem(source: str) -> str:
    return source[: len(source) - len(PurePosixPath(source).suffix)]


def _read_listing_file(uri: str) -> pa.Table:
    """A Parquet/CSV listing as LISTING_SCHEMA rows; a row without a path is a rejection."""
    filesystem, path = split_uri(absolute(uri))
    with filesystem.open_input_file(path) as stream:
        table = pq.read_table(stream) if uri.endswith(".parquet") else pa_csv.read_csv(stream)
    if "path" not in table.column_names:
        raise ValueError(f"listing {uri} has no 'path' column (columns: {table.column_names})")
    columns = {field.name: pa.nulls(len(table), field.type) for field in LISTING_SCHEMA}
    paths = table["path"].cast(pa.string())
    missing = pc.fill_null(pc.equal(paths, ""), True)  # CSV gives "" for an empty cell
    columns["source"] = pc.fill_null(paths, "")
    if "caption" in table.column_names:
        columns["caption"] = table["caption"].cast(pa.string())
    columns["reject"] = pc.if_else(missing, Reason.NO_PATH.value, columns["reject"])
    columns["message"] = pc.if_else(missing, "listing row has no path", columns["message"])
    return pa.table(columns, schema=LISTING_SCHEMA)
