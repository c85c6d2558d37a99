"""Listing the input: which image files there are, their caption sidecars, and what is unusable.

Input is a directory tree (a local path or any URL pyarrow opens: file://, s3://, gs://) or a
Parquet/CSV listing with a `path` column and an optional `caption` column. Captions in a tree,
first found wins:
1. a sidecar with the image's stem: `.txt`, `.caption` (kohya-ss's convention), or `.json`
   (its `caption_field`, read when the image is fitted);
2. a `metadata.jsonl` in the image's folder (diffusers' imagefolder layout): a JSON object a
   line, `file_name` (relative to that folder) and the `caption_field`.
The caption field, when not given, is the first of DEFAULT_CAPTION_FIELDS a JSON object has; a
list (booru tags) is joined with ", ". Listing reads directory entries only, and metadata.jsonl.

WebDataset tars (img2dataset's output among them) and Parquet files with an image column
(Hugging Face `datasets`' layout: `{bytes, path}` structs, or plain binary) are listed as files
and opened by the scan, which makes a row of each sample (scan.py); an img2dataset shard's
`NAME.parquet` and `NAME_stats.json` beside `NAME.tar` are its metadata, not inputs.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import json
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
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

CAPTION_EXTENSIONS = (".txt", ".caption", ".json")  # the first an image has is its caption
METADATA_NAME = "metadata.jsonl"
ARCHIVE_EXTENSION = ".tar"  # WebDataset shards
PARQUET_EXTENSION = ".parquet"  # with an image column: a row per image
DEFAULT_CAPTION_COLUMNS = ("text", "caption")
DEFAULT_CAPTION_FIELDS = ("text", "caption", "tags")
PARQUET_BATCH_ROWS = 64  # rows of a Parquet input turned into Python values at once


def json_caption(value: object, field: str = "") -> str | None:
    """The caption in a JSON object (a sidecar, a metadata.jsonl line): `field`, or the first
    of DEFAULT_CAPTION_FIELDS it has; a list joined with ", "; None when it has none. A
    ValueError when `value` is not an object."""
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    names = (field,) if field else DEFAULT_CAPTION_FIELDS
    found = next((value[name] for name in names if value.get(name) is not None), None)
    if isinstance(found, list):
        return ", ".join(str(tag) for tag in found)
    return None if found is None else str(found).strip()


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
        ("archive", pa.string()),  # a tar member's: the tar's source (`source` is TAR/MEMBER)
        ("member_offset", pa.int64()),  # where the member's bytes start in it (`size` long)
    ]
)


@dataclass(frozen=True)
class InputRoot:
    """Where sources are read from (a directory, or the folder of a listing file), and the
    field JSON captions are read from (`json_caption`)."""

    uri: str
    caption_field: str = ""
    image_column: str = "image"  # of Parquet inputs with image bytes
    caption_column: str = ""  # of those; empty: the first of DEFAULT_CAPTION_COLUMNS

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

    def read_member(self, archive: str, offset: int, size: int) -> bytes:
        """A tar member's bytes, by range (one ranged GET on an object store)."""
        filesystem, path = self.resolve(archive)
        if isinstance(filesystem, pafs.LocalFileSystem):
            with open(path, "rb") as stream:
                stream.seek(offset)
                return stream.read(size)
        with filesystem.open_input_file(path) as stream:
            return stream.read_at(size, offset)

    def parquet(self, source: str) -> pq.ParquetFile:
        """A Parquet file. pyarrow reads a row group's column chunk whole (one coalesced read
        on an object store) whatever the batch size: scan.MAX_ROW_GROUP_BYTES bounds it."""
        filesystem, path = self.resolve(source)
        return pq.ParquetFile(filesystem.open_input_file(path))

    def read_row(self, row: dict) -> bytes | str:
        """A listed image: its local path (read lazily by the decoder), else its bytes."""
        archive = row.get("archive")
        if archive and archive.lower().endswith(PARQUET_EXTENSION):
            return _parquet_image(self, archive, row["member_offset"])
        if archive:
            return self.read_member(row["archive"], row["member_offset"], row["size"])
        return self.local_path(row["source"]) or self.read_bytes(row["source"])

    def local_path(self, source: str) -> str | None:
        """The file's path when it is on this machine's filesystem, else None."""
        filesystem, path = self.resolve(source)
        return path if isinstance(filesystem, pafs.LocalFileSystem) else None


def image_bytes(value: object) -> bytes | None:
    """An image column's value: a `datasets.Image` struct's bytes, or plain binary."""
    return value.get("bytes") if isinstance(value, dict) else value


class _ParquetCursor:
    """A Parquet file's image column read forward, a row group at a time and PARQUET_BATCH_ROWS
    rows of it at a time: rows asked for in file order (as a fit task asks) cost one pass over
    their row groups; a row behind is read from the start of its group. A damaged row group
    costs only its own rows."""

    def __init__(self, root: InputRoot, archive: str) -> None:
        self._file = root.parquet(archive)
        metadata = self._file.metadata
        counts = (metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
        self._starts = list(itertools.accumulate(counts, initial=0))  # each group's first row
        self._column = root.image_column
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
def _parquet_cursor(root: InputRoot, archive: str) -> _ParquetCursor:
    return _ParquetCursor(root, archive)


def _parquet_image(root: InputRoot, archive: str, row: int) -> bytes | None:
    """Row `row`'s image bytes of a Parquet input (`_ParquetCursor`); a file that fails to read
    is opened anew for the next row asked of it."""
    try:
        return _parquet_cursor(root, archive).image(row)
    except Exception:
        _parquet_cursor.cache_clear()
        raise


def absolute(uri: str) -> str:
    """A URL as it is; a local path made absolute, as Ray workers elsewhere must read it."""
    return uri if "://" in uri else os.path.abspath(uri)


def _is_listing_file(uri: str) -> bool:
    return uri.endswith((".parquet", ".csv"))


def input_root(uri: str, caption_field: str = "", image_column: str = "image",
               caption_column: str = "") -> InputRoot:  # fmt: skip
    """The root sources are resolved against: the tree itself, or a listing's folder."""
    folder = (uri.rsplit("/", 1)[0] if "/" in uri else ".") if _is_listing_file(uri) else uri
    return InputRoot(folder.rstrip("/") or "/", caption_field, image_column, caption_column)


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
    """Whether the tree holds an image file or a tar of them."""
    for _, _, files in os.walk(root):
        if any(_split_extension(name)[1] in IMAGE_EXTENSIONS | {ARCHIVE_EXTENSION,
                                                                PARQUET_EXTENSION}
               for name in files):  # fmt: skip
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


def list_input(uri: str, caption_field: str = "") -> pa.Table:
    """All candidate images of the input as a table of LISTING_SCHEMA, sorted by source, listed
    in this process (the job shares the folders out: `list_level`, `list_folders`)."""
    rows, folders = list_level(uri, "", caption_field)
    return pa.concat_tables([rows, list_folders(uri, folders, caption_field)]).sort_by("source")


def list_level(uri: str, folder: str = "", caption_field: str = "") -> tuple[pa.Table, list[str]]:
    """One level of the input tree: the files directly in `folder` (relative to the input, ''
    for its top) as listing rows, and its subfolders, relative too, to list apart. A listing
    file is all rows and no folders."""
    if _is_listing_file(uri):
        return _read_listing_file(uri), []
    root = input_root(uri, caption_field)
    filesystem, path = split_uri(root.uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        entries, folders = _local_level(path, folder)
    else:
        entries, folders = _remote_level(filesystem, path, folder)
    return _rows(_pair_captions(entries, root)), folders


def list_folders(uri: str, folders: list[str], caption_field: str = "") -> pa.Table:
    """Every file under each of `folders` (relative to the input tree), as listing rows; a
    unit of work of the job's list stage."""
    root = input_root(uri, caption_field)
    filesystem, path = split_uri(root.uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        directories = (entries for folder in folders for entries in _walk_local(path, folder))
    else:
        directories = (entries for folder in folders
                       for entries in _walk_remote(filesystem, path, folder))  # fmt: skip
    return _rows(row for entries in directories for row in _pair_captions(entries, root))


def _rows(rows: Iterator[dict]) -> pa.Table:
    """Rows to Arrow in chunks: the Python objects alive at once stay few whatever the count."""
    batches = []
    while chunk := list(itertools.islice(rows, 8192)):
        batches.append(pa.RecordBatch.from_pylist(chunk, schema=LISTING_SCHEMA))
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA)


def _local_level(root: str, folder: str) -> tuple[list[dict], list[str]]:
    """The regular files directly in root/folder and its subfolders. Directory links are not
    followed and file links must stay inside the root."""
    real_root = os.path.realpath(root)
    prefix = f"{folder}/" if folder else ""
    entries, folders = [], []
    with os.scandir(os.path.join(root, folder) if folder else root) as scanned:
        for entry in scanned:
            source = prefix + entry.name
            if _is_folder(entry):  # a link to a folder too, which is not followed
                if not entry.is_symlink():
                    folders.append(source)
                continue
            try:
                source.encode()
            except UnicodeEncodeError:  # bytes Python could not decode: an old archive's name
                shown = os.fsencode(source).decode("utf-8", "backslashreplace")
                entries.append(
                    {"source": shown} | reject(Reason.BAD_NAME, "the file name is not UTF-8")
                )
                continue
            entries.append({"source": source} | _local_entry(entry, real_root))
    return entries, sorted(folders)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: not a folder; the file's stat says what it is
        return False


def _walk_local(root: str, folder: str) -> Iterator[list[dict]]:
    """The files of root/folder and of every folder under it, a folder at a time (sidecars sit
    beside their images)."""
    stack = [folder]
    while stack:
        entries, folders = _local_level(root, stack.pop())
        yield entries
        stack += reversed(folders)


def _local_entry(entry: os.DirEntry, real_root: str) -> dict:
    """A local file's size and mtime, or why it cannot be an input."""
    try:
        info = entry.stat()  # follows a link: a loop or dangling link raises here
    except OSError as error:
        return reject(Reason.UNREADABLE, f"cannot stat: {error.strerror}")
    if (
        entry.is_symlink()
        and os.path.commonpath([real_root, os.path.realpath(entry.path)]) != real_root
    ):
        return reject(Reason.OUTSIDE_ROOT, "symlink points outside the input root")
    if not stat.S_ISREG(info.st_mode):
        return reject(Reason.NOT_A_FILE, "not a regular file")
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _remote_level(
    filesystem: pafs.FileSystem, root: str, folder: str
) -> tuple[list[dict], list[str]]:
    """An object store's files directly under root/folder, and its folders (common prefixes)."""
    base = f"{root.rstrip('/')}/{folder}" if folder else root.rstrip("/")
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=False))
    start = len(root.rstrip("/")) + 1
    entries = [{"source": i.path[start:], "size": i.size, "mtime_ns": i.mtime_ns}
               for i in infos if i.type == pafs.FileType.File]  # fmt: skip
    folders = sorted(i.path[start:] for i in infos if i.type == pafs.FileType.Directory)
    return entries, folders


def _walk_remote(filesystem: pafs.FileSystem, root: str, folder: str) -> Iterator[list[dict]]:
    """An object store's files under root/folder, grouped by their folder: one recursive
    listing (a prefix of paged LIST requests), not a request per folder."""
    base = f"{root.rstrip('/')}/{folder}"
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    files = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    start = len(root.rstrip("/")) + 1
    for _, group in itertools.groupby(files, key=lambda file: file[0].rsplit("/", 1)[0]):
        yield [
            {"source": path[start:], "size": size, "mtime_ns": mtime} for path, size, mtime in group
        ]


def _metadata_captions(entry: dict, root: InputRoot) -> tuple[dict[str, str], dict | None]:
    """A metadata.jsonl's captions by image source, and a rejection row for it naming its bad
    lines (None when every line is good); the good lines count either way."""
    folder = entry["source"][: -len(METADATA_NAME)]
    captions, bad = {}, []
    try:
        lines = root.read_bytes(entry["source"]).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return {}, entry | reject(Reason.BAD_CAPTION, f"cannot be read: {error}")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            caption = json_caption(value, root.caption_field)
            name = value["file_name"]
        except (ValueError, KeyError, TypeError) as error:
            bad.append(f"line {number}: {type(error).__name__}: {error}")
            continue
        if caption is not None:
            captions[folder + str(name)] = caption
    if not bad:
        return captions, None
    shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
    return captions, entry | reject(Reason.BAD_CAPTION, f"{len(bad)} bad lines: {shown}")


def _pair_captions(entries: list[dict], root: InputRoot) -> Iterator[dict]:
    """One directory's images with their sidecars or metadata.jsonl captions; unknown and
    orphan files become rejections.

    Sidecar extensions match in any case (`photo.TXT`), as image extensions do.
    """
    described: dict[str, str] = {}
    for entry in entries:
        if entry["source"].rpartition("/")[2] == METADATA_NAME and not entry.get("reject"):
            captions, rejected = _metadata_captions(entry, root)
            described |= captions
            if rejected:
                yield rejected
    split = {entry["source"]: _split_extension(entry["source"]) for entry in entries}
    archives = {stem for stem, extension in split.values() if extension == ARCHIVE_EXTENSION}
    entries = [e for e in entries if e.get("reject") or not _is_metadata(e["source"], archives)]
    sidecars = {
        (stem, extension): entry
        for entry in entries
        for stem, extension in [split[entry["source"]]]
        if extension in CAPTION_EXTENSIONS
    }
    image_stems = {stem for stem, extension in split.values() if extension in IMAGE_EXTENSIONS}
    for entry in entries:
        stem, extension = split[entry["source"]]
        if entry.get("reject") or extension in (ARCHIVE_EXTENSION, PARQUET_EXTENSION):
            yield entry  # an archive: the scan reads its samples
        elif extension in IMAGE_EXTENSIONS:
            for caption_extension in CAPTION_EXTENSIONS:
                sidecar = sidecars.get((stem, caption_extension))
                if sidecar and not sidecar.get("reject"):
                    entry |= {
                        "caption_source": sidecar["source"],
                        "caption_size": sidecar["size"],
                        "caption_mtime_ns": sidecar["mtime_ns"],
                    }
                    break
            else:
                if entry["source"] in described:
                    entry |= {"caption": described[entry["source"]]}
            yield entry
        elif extension in CAPTION_EXTENSIONS:
            if stem not in image_stems:
                yield entry | reject(
                    Reason.ORPHAN_CAPTION, "caption file without an image of the same name"
                )
        else:
            yield entry | reject(
                Reason.UNSUPPORTED_FORMAT, f"not an image extension: {extension or 'none'}"
            )


def _is_metadata(source: str, archives: set[str]) -> bool:
    """A folder's metadata.jsonl, or an img2dataset shard's NAME.parquet or NAME_stats.json
    beside its NAME.tar (`archives`: the stems of the folder's tars)."""
    if source.rpartition("/")[2] == METADATA_NAME:
        return True
    stem, extension = _split_extension(source)
    return (extension == ".parquet" and stem in archives) or (
        source.endswith("_stats.json") and source[: -len("_stats.json")] in archives
    )


def _split_extension(source: str) -> tuple[str, str]:
    """(source without its extension, the extension in lower case), as pathlib's suffix has it
    ('.hidden' and 'name.' have none), without a path object per file."""
    name_start = source.rfind("/") + 1
    dot = source.rfind(".")
    if dot <= name_start or dot == len(source) - 1:
        return source, ""
    return source[:dot], source[dot:].lower()


def _read_listing_file(uri: str) -> pa.Table:
    """A Parquet/CSV listing as LISTING_SCHEMA rows; a row without a path is a rejection."""
    filesystem, path = split_uri(absolute(uri))
    with filesystem.open_input_file(path) as stream:
        if uri.endswith(".parquet") and "path" not in pq.read_schema(stream).names:
            info = filesystem.get_file_info(path)  # images in it, not paths: an archive
            row = {"source": path.rsplit("/", 1)[-1], "size": info.size, "mtime_ns": info.mtime_ns}
            return pa.Table.from_pylist([row], schema=LISTING_SCHEMA)
        stream.seek(0)
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
