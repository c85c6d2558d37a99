"""Reading image headers: size after EXIF orientation, mode and format, never the pixels.

`scan_batch` is the unit of work of the scan stage: it takes listing rows and returns one
compact row per file. Every failure becomes a rejection row; it never raises for a bad file.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import xxhash
from PIL import Image, UnidentifiedImageError

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.imaging import Header, max_file_bytes, read_header
from pipeline.rejects import Reason, reject
from pipeline.sources import LISTING_SCHEMA, InputRoot

# Formats we decode; Pillow identifies more (PSD, ICO, PPM...), which are rejected by name.
# MPO is what Pillow calls the JPEGs many phones write (a JPEG with extra frames).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
HEADER_BYTES = 1 << 16  # enough for the header and EXIF block of nearly every image file

SCAN_SCHEMA = pa.schema(
    [
        *LISTING_SCHEMA,
        ("key", pa.string()),  # the sample's key in the shards: stable while the file is unchanged
        ("width", pa.int32()),  # after EXIF orientation
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("orientation", pa.int8()),  # what the decoded pixels still need (imaging.Header)
        ("note", pa.string()),  # metadata ignored, and why
        ("content_hash", pa.string()),  # of the file's bytes, for exact duplicates; None: off
    ]
)
HASH_CHUNK = 1 << 20


def sample_key(row: dict) -> str:
    """20 hex digits from the source and its file's identity (size, mtime, caption)."""
    caption_identity = (
        row["caption"]
        if row.get("caption") is not None
        else f"{row.get('caption_source')}:{row.get('caption_size')}:{row.get('caption_mtime_ns')}"
    )
    identity = f"{row['source']}\0{row['size']}\0{row['mtime_ns']}\0{caption_identity}"
    return hashlib.blake2b(identity.encode(), digest_size=10).hexdigest()


def scan_batch(
    rows: pa.Table, root: InputRoot, max_pixels: int = DEFAULT_MAX_PIXELS, dedup: bool = True
) -> pa.Table:
    """Header of every listed file: a table of SCAN_SCHEMA, one row per input row; with
    `dedup`, each usable file's `content_hash` too (the whole file read, streamed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings on odd but readable headers
        scanned = []
        for row in rows.to_pylist():
            row = _scan_one(row, root, max_pixels)
            if dedup and not row.get("reject"):
                row |= _content_hash(root, row["source"])
            scanned.append(row)
    return pa.Table.from_pylist(scanned, schema=SCAN_SCHEMA)


def content_hash(stream: BinaryIO) -> str:
    """32 hex digits of xxh3-128 over a stream's bytes, read a MiB at a time (~9 GB/s: ten
    times blake2b or md5 here, bench/dedup_bench.py; 128 bits: no collision in 10M files)."""
    digest = xxhash.xxh3_128()
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _content_hash(root: InputRoot, source: str) -> dict:
    filesystem, path = root.resolve(source)
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            with open(path, "rb") as stream:
                return {"content_hash": content_hash(stream)}
        with filesystem.open_input_stream(path) as stream:
            return {"content_hash": content_hash(stream)}
    except OSError as error:
        return reject(Reason.UNREADABLE, f"{type(error).__name__}: {error}")


def _scan_one(row: dict, root: InputRoot, max_pixels: int) -> dict:
    if row["reject"]:
        return row
    if "\0" in row["source"]:
        return row | reject(Reason.BAD_PATH, "the path holds a NUL character")
    try:
        filesystem, path = root.resolve(row["source"])
    except (ValueError, pa.ArrowException) as error:  # NUL in a path, a scheme pyarrow lacks
        hint = " (download http URLs first)" if row["source"].startswith("http") else ""
        return row | reject(Reason.BAD_PATH, f"{error}{hint}")
    try:
        if row["size"] is None:  # a listing row: what is there?
            row |= _listed_file(filesystem, path)
            if row.get("reject"):
                return row
        row["key"] = sample_key(row)
        if not row["size"]:
            return row | reject(Reason.NOT_AN_IMAGE, "empty file")
        stream = root.open(row["source"], HEADER_BYTES)
    except OSError as error:
        return row | reject(Reason.UNREADABLE, f"{type(error).__name__}: {error}")
    try:
        header = _read_header(stream, root, row["source"])
    except UnidentifiedImageError:
        return row | reject(Reason.NOT_AN_IMAGE, "not a recognised image file")
    except (OSError, ValueError, SyntaxError) as error:  # Pillow raises all three on bad headers
        return row | reject(Reason.CORRUPT, f"{type(error).__name__}: {error}")
    row |= {
        "width": header.width,
        "height": header.height,
        "format": header.format,
        "mode": header.mode,
        "orientation": header.orientation,
        "note": header.note,
    }
    if header.format not in SUPPORTED_FORMATS:
        return row | reject(Reason.UNSUPPORTED_FORMAT, f"{header.format} images are not supported")
    pixels = header.width * header.height
    if pixels > max_pixels:
        return row | reject(
            Reason.TOO_MANY_PIXELS,
            f"{header.width}x{header.height} is over max_pixels={max_pixels:,}",
        )
    if row["size"] > max_file_bytes(pixels):
        return row | reject(
            Reason.FILE_TOO_LARGE,
            f"{row['size']:,} bytes for a {header.width}x{header.height} image "
            f"(at most {max_file_bytes(pixels):,}): junk after the image, or a sparse file",
        )
    return row


def _listed_file(filesystem: pafs.FileSystem, path: str) -> dict:
    """Size and mtime of a file a listing names, or its rejection: missing, not a file."""
    if isinstance(filesystem, pafs.LocalFileSystem):
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


def _read_header(stream: BinaryIO, root: InputRoot, source: str) -> Header:
    """The header from `stream`; from the whole file when a remote file's first bytes fall short."""
    with stream:
        try:
            return read_header(Image.open(stream))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            if not (isinstance(stream, io.BytesIO) and len(stream.getbuffer()) == HEADER_BYTES):
                raise
    with root.open(source) as whole:
        return read_header(Image.open(whole))
