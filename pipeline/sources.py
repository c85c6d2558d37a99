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

import functools
import itertools
import json
import os
import stat
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import IMAGE_EXTENSIONS
from pipeline.inputs import (
    ARCHIVE_EXTENSION,
    CONTAINER_EXTENSIONS,
    IMAGES,
    LISTING,
    PARQUET_EXTENSION,
    Input,
    container,
    split_extension,
)
from pipeline.readers import read_bytes
from pipeline.rejects import Reason, reject

CAPTION_EXTENSIONS = (".txt", ".caption", ".json")  # the first an image has is its caption
METADATA_NAME = "metadata.jsonl"
DEFAULT_CAPTION_FIELDS = ("text", "caption", "tags")


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
        ("archive", pa.string()),  # a container's sample: the tar or Parquet file's source
        ("member_offset", pa.int64()),  # a tar member's: where its bytes start (`size` long)
        ("source_row", pa.int64()),  # a Parquet file's row: its number in the file
    ]
)


def list_input(source: Input) -> pa.Table:
    """All candidate images of the input as a table of LISTING_SCHEMA, sorted by source, listed
    in this process (the job shares the folders out: `list_level`, `list_folders`)."""
    rows, folders = list_level(source)
    return pa.concat_tables([rows, list_folders(source, folders)]).sort_by("source")


def list_level(source: Input, folder: str = "") -> tuple[pa.Table, list[str]]:
    """One level of the input tree: the files directly in `folder` (relative to the input, ''
    for its top) as listing rows, and its subfolders, relative too, to list apart. A listing
    file is all rows and no folders; a Parquet file of images, its one row."""
    if source.kind == LISTING:
        return _read_listing_file(source), []
    if source.kind == IMAGES:
        info = source.filesystem.get_file_info(source.path)
        row = {"source": info.base_name, "size": info.size, "mtime_ns": info.mtime_ns}
        return pa.Table.from_pylist([row], schema=LISTING_SCHEMA), []
    if source.local:
        entries, folders = _local_level(source.path, folder)
    else:
        entries, folders = _remote_level(source.filesystem, source.path, folder)
    return _rows(_pair_captions(entries, source)), folders


def list_folders(source: Input, folders: list[str]) -> pa.Table:
    """Every file under each of `folders` (relative to the input tree), as listing rows; a
    unit of work of the job's list stage."""
    walk = _walk_local if source.local else functools.partial(_walk_remote, source.filesystem)
    directories = (entries for folder in folders for entries in walk(source.path, folder))
    return _rows(row for entries in directories for row in _pair_captions(entries, source))


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
    entries = [
        {"source": i.path[start:], "size": i.size, "mtime_ns": i.mtime_ns}
        for i in infos
        if i.type == pafs.FileType.File
    ]
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


def _metadata_captions(entry: dict, source: Input) -> tuple[dict[str, str], dict | None]:
    """A metadata.jsonl's captions by image source, and a rejection row for it naming its bad
    lines (None when every line is good); the good lines count either way."""
    folder = entry["source"][: -len(METADATA_NAME)]
    captions, bad = {}, []
    try:
        lines = read_bytes(source, entry["source"]).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return {}, entry | reject(Reason.BAD_CAPTION, f"cannot be read: {error}")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            caption = json_caption(value, source.caption_field)
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


def _pair_captions(entries: list[dict], source: Input) -> Iterator[dict]:
    """One directory's images with their sidecars or metadata.jsonl captions; unknown and
    orphan files become rejections.

    Sidecar extensions match in any case (`photo.TXT`), as image extensions do.
    """
    described: dict[str, str] = {}
    for entry in entries:
        if entry["source"].rpartition("/")[2] == METADATA_NAME and not entry.get("reject"):
            captions, rejected = _metadata_captions(entry, source)
            described |= captions
            if rejected:
                yield rejected
    split = {entry["source"]: split_extension(entry["source"]) for entry in entries}
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
        if entry.get("reject") or extension in CONTAINER_EXTENSIONS:
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
    stem, extension = split_extension(source)
    return (extension == PARQUET_EXTENSION and stem in archives) or (
        source.endswith("_stats.json") and source[: -len("_stats.json")] in archives
    )


def _read_listing_file(source: Input) -> pa.Table:
    """A Parquet/CSV listing as LISTING_SCHEMA rows; a row without a path is a rejection."""
    with source.filesystem.open_input_file(source.path) as stream:
        is_parquet = container(source.path) == PARQUET_EXTENSION
        table = pq.read_table(stream) if is_parquet else pa_csv.read_csv(stream)
    if "path" not in table.column_names:
        raise ValueError(
            f"listing {source.uri} has no 'path' column (columns: {table.column_names})"
        )
    columns = {field.name: pa.nulls(len(table), field.type) for field in LISTING_SCHEMA}
    paths = table["path"].cast(pa.string())
    missing = pc.fill_null(pc.equal(paths, ""), True)  # CSV gives "" for an empty cell
    columns["source"] = pc.fill_null(paths, "")
    if "caption" in table.column_names:
        columns["caption"] = table["caption"].cast(pa.string())
    columns["reject"] = pc.if_else(missing, Reason.NO_PATH.value, columns["reject"])
    columns["message"] = pc.if_else(missing, "listing row has no path", columns["message"])
    return pa.table(columns, schema=LISTING_SCHEMA)
