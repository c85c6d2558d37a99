"""What --input is, decided once where the job starts and handed to every stage as one `Input`:
its file system, the path sources are read against, its kind (a folder tree, a listing file,
one Parquet file of images) and how captions and Parquet images are read from it.

Three questions are answered here alone: whether a file system is this machine's (`is_local`),
which container a source is by its extension (`container`: a tar, a Parquet file, or a loose
file), and which kind of input a URI names (`resolve_input`, which also refuses a local input
that cannot be one before anything starts).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import IMAGE_EXTENSIONS
from pipeline.errors import UsageError
from pipeline.format import split_uri

ARCHIVE_EXTENSION = ".tar"  # WebDataset shards
PARQUET_EXTENSION = ".parquet"  # with an image column: a row per image
CONTAINER_EXTENSIONS = (ARCHIVE_EXTENSION, PARQUET_EXTENSION)  # files the scan opens for samples
LISTING_EXTENSIONS = (PARQUET_EXTENSION, ".csv")  # an input file with a `path` column
DEFAULT_CAPTION_COLUMNS = ("text", "caption")  # of a Parquet file of images

FOLDER = "folder"  # Input.kind: a tree of images, sidecars, tars and Parquet files of images
LISTING = "listing"  # a .parquet/.csv file with a `path` (and `caption`) column
IMAGES = "images"  # one Parquet file of images, without a `path` column


def is_local(filesystem: pafs.FileSystem) -> bool:
    """Whether `filesystem` is this machine's: its files are opened, stat'ed and walked with
    the os module, and read lazily by path."""
    return isinstance(filesystem, pafs.LocalFileSystem)


def split_extension(source: str) -> tuple[str, str]:
    """(source without its extension, the extension in lower case), as pathlib's suffix has it
    ('.hidden' and 'name.' have none), without a path object per file."""
    name_start = source.rfind("/") + 1
    dot = source.rfind(".")
    if dot <= name_start or dot == len(source) - 1:
        return source, ""
    return source[:dot], source[dot:].lower()


def container(source: str) -> str:
    """The container a source is: ARCHIVE_EXTENSION, PARQUET_EXTENSION, or "" (a loose file)."""
    extension = split_extension(source)[1]
    return extension if extension in CONTAINER_EXTENSIONS else ""


def in_containers(sources: pa.ChunkedArray) -> np.ndarray:
    """`container(source) != ""` for a column of sources, as a (N,) bool array."""
    names = pc.utf8_lower(sources)
    found = [pc.ends_with(names, extension) for extension in CONTAINER_EXTENSIONS]
    return pc.or_(*found).to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class Input:
    """--input, resolved (`resolve_input`); picklable and hashable, so Ray tasks take it and a
    worker's caches key on it."""

    uri: str  # as given, a local path made absolute
    kind: str  # FOLDER, LISTING or IMAGES
    path: str  # in `filesystem`: the folder, or the file
    filesystem: pafs.FileSystem = field(compare=False, repr=False)
    caption_field: str = ""  # of JSON captions (sources.json_caption); empty: the defaults
    image_column: str = "image"  # of Parquet files of images
    caption_column: str = ""  # of those; empty: the first of DEFAULT_CAPTION_COLUMNS

    @property
    def root(self) -> str:
        """The path relative sources are read against: the folder, or the file's folder."""
        return self.path if self.kind == FOLDER else self.path.rpartition("/")[0]

    @property
    def local(self) -> bool:
        return is_local(self.filesystem)

    def resolve(self, source: str) -> tuple[pafs.FileSystem, str]:
        """A source's file system and path: relative to `root`, or as a listing names it (an
        absolute path, a URL)."""
        if "://" in source or source.startswith("/"):
            return pafs.FileSystem.from_uri(source)
        return self.filesystem, f"{self.root}/{source}"

    def caption_column_in(self, names: list[str]) -> str | None:
        """The caption column of a Parquet file of images with columns `names`, if it has one."""
        wanted = [self.caption_column] if self.caption_column else DEFAULT_CAPTION_COLUMNS
        return next((name for name in wanted if name in names), None)


def absolute(uri: str) -> str:
    """A URL as it is; a local path made absolute, as Ray workers elsewhere must read it."""
    return uri if "://" in uri else os.path.abspath(uri)


def resolve_input(
    uri: str, caption_field: str = "", image_column: str = "image", caption_column: str = ""
) -> Input:
    """--input as an `Input`: a local one checked first (UsageError for a missing path, a file
    that is not a listing, a folder without images; a URL is checked by listing it), a
    .parquet file's kind read from its schema (a `path` column: a listing)."""
    given, uri = uri, absolute(uri)
    filesystem, path = split_uri(uri)
    if is_local(filesystem):
        _check_local(given, path)
    kind = FOLDER
    if split_extension(path)[1] in LISTING_EXTENSIONS:
        kind = LISTING
        if container(path) == PARQUET_EXTENSION:
            with filesystem.open_input_file(path) as stream:
                kind = LISTING if "path" in pq.read_schema(stream).names else IMAGES
    return Input(uri, kind, path, filesystem, caption_field, image_column, caption_column)


def _check_local(uri: str, path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"--input {uri} does not exist")
    if os.path.isfile(path):
        if split_extension(path)[1] not in LISTING_EXTENSIONS:
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
    """Whether the tree holds an image file or a container of them."""
    wanted = IMAGE_EXTENSIONS | set(CONTAINER_EXTENSIONS)
    for _, _, files in os.walk(root):
        if any(split_extension(name)[1] in wanted for name in files):
            return True
    return False


def check_separate(source: Input, output_uri: str) -> None:
    """Refuse an OUT inside the input folder (a rerun would list the job's own files as images)
    or an input inside OUT (--overwrite clears OUT)."""
    if source.kind != FOLDER:
        return  # a listing names its files: nothing under its folder is listed by accident
    output_fs, output_path = split_uri(absolute(output_uri))
    input_path = source.path
    if source.filesystem.type_name != output_fs.type_name:
        return
    if source.local:
        input_path, output_path = os.path.realpath(input_path), os.path.realpath(output_path)
    common = posixpath.commonpath([input_path, output_path])
    if common == input_path:
        raise UsageError(
            f"--output {output_uri} is inside --input {source.uri}: the next run would take the "
            "prepared files for images; put OUT beside the input"
        )
    if common == output_path:
        raise UsageError(f"--input {source.uri} is inside --output {output_uri}: keep them apart")
