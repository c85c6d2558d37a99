"""Reading image headers: size after EXIF orientation, mode and format, never the pixels.

`scan_batch` is the unit of work of the scan stage: it takes listing rows and returns one
compact row per file, and per sample of a WebDataset tar or a Parquet file of images
(`_scan_archive`, `_scan_parquet`). Every failure becomes a rejection row; it never raises for a
bad file.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from PIL import Image, UnidentifiedImageError

from pipeline.config import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from pipeline.imaging import Header, max_file_bytes, read_header
from pipeline.inputs import ARCHIVE_EXTENSION, PARQUET_EXTENSION, Input, container
from pipeline.perceptual import perceptual_hash
from pipeline.readers import (
    PARQUET_BATCH_ROWS,
    file_info,
    image_bytes,
    open_file,
    open_parquet,
    open_stream,
    open_tar,
    read_image,
)
from pipeline.rejects import Reason, reject
from pipeline.sources import LISTING_SCHEMA, json_caption

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
        ("dhash", pa.uint64()),  # perceptual, for near duplicates (--near-dedup); None: off
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
    rows: pa.Table,
    source: Input,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dedup: bool = True,
    near_dedup: bool = False,
) -> pa.Table:
    """Header of every listed file: a table of SCAN_SCHEMA, one row per input row and one per
    sample of a container; with `dedup`, each usable file's `content_hash` too (the whole file
    read, streamed); with `near_dedup`, its perceptual `dhash` (a small decode: perceptual.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings on odd but readable headers
        scanned = []
        for row in rows.to_pylist():
            kind = container(row["source"])
            if kind and not row["reject"]:
                scanned += _CONTAINER_SCANS[kind](row, source, max_pixels, dedup, near_dedup)
                continue
            row = _scan_one(row, source, max_pixels)
            if dedup and not row.get("reject"):
                row |= _content_hash(source, row["source"])
            if near_dedup and not row.get("reject") and row.get("dhash") is None:
                row |= _perceptual_hash(row, source=source)  # else OUT's index held it
            scanned.append(row)
    return pa.Table.from_pylist(scanned, schema=SCAN_SCHEMA)


def _sample_name(member: str) -> tuple[str, str]:
    """WebDataset's split of a member name: (sample, extension), the extension from the first
    dot of the base name (`dir/0001.seg.png` -> `dir/0001`, `seg.png`)."""
    folder, _, name = member.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _scan_archive(
    row: dict, source: Input, max_pixels: int, dedup: bool, near_dedup: bool
) -> list[dict]:
    """A row per sample of the tar `row` lists, read as a stream once (never extracted, a
    member in memory at a time): its image member's header, offset and hash, its caption from
    its `txt` member or its `json` member's field. A sample without an image, a member that is
    not one, and a tar that ends early are rejections naming the tar and the member; the
    samples before stay."""
    archive, base = row["source"], _member_base(row)
    samples: dict[str, dict] = {}  # sample -> its row, in the tar's order
    entry: dict = {}
    try:
        with open_tar(source, archive) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                sample, extension = _sample_name(member.name)
                entry = samples.setdefault(sample, dict(base, source=f"{archive}/{sample}"))
                is_image = f".{extension}" in IMAGE_EXTENSIONS and entry["size"] is None
                if not (is_image or extension in ("txt", "json")) or entry["reject"]:
                    continue
                entry["reading"] = True
                data = tar.extractfile(member).read()
                del entry["reading"]
                if is_image:
                    entry |= {
                        "source": f"{archive}/{member.name}",
                        "size": member.size,
                        "member_offset": member.offset_data,
                    }
                    _image_member(entry, data, max_pixels, dedup, near_dedup)
                else:  # a txt member wins over a json one, whichever comes first
                    entry.setdefault("captions", {})[extension] = _member_caption(
                        data, extension, source.caption_field, entry
                    )
    except (tarfile.TarError, OSError, EOFError) as error:
        cause = f"{type(error).__name__}: {error}"
        if entry.pop("reading", False):
            entry |= reject(Reason.CORRUPT, f"the tar ends inside this sample: {cause}")
        ended = reject(Reason.CORRUPT, f"the tar ends early, after {len(samples)} samples: {cause}")
        samples[""] = dict(base, source=archive, size=row["size"]) | ended
    for entry in samples.values():
        captions = entry.pop("captions", {})
        entry["caption"] = (
            captions["txt"] if captions.get("txt") is not None else captions.get("json")
        )
        if entry["size"] is None and not entry["reject"]:
            entry |= reject(Reason.NOT_AN_IMAGE, "a tar sample without an image member")
        entry["key"] = sample_key(entry)
    return list(samples.values())


def _scan_parquet(
    row: dict, source: Input, max_pixels: int, dedup: bool, near_dedup: bool
) -> list[dict]:
    """A row per row of a Parquet file with an image column (`source.image_column`: a
    `datasets.Image` struct or binary) and an optional caption column, streamed a batch of
    rows at a time: the image's header and hash, its row number as `source_row`. A row
    without image bytes is a rejection; a file without the column is one; a row group of
    several rows over MAX_ROW_GROUP_BYTES of images costs its rows, and a damaged one its rows
    from the damage on, each a rejection."""
    archive, base = row["source"], _member_base(row)
    try:
        parquet = open_parquet(source, archive)
        names = parquet.schema_arrow.names
    except (OSError, pa.ArrowException) as error:
        return [row | reject(Reason.CORRUPT, f"not a readable Parquet file: {error}")]
    if source.image_column not in names:
        return [
            row
            | reject(
                Reason.UNSUPPORTED_FORMAT,
                f"a Parquet file without an image "
                f"column {source.image_column!r} (--image-column; it has: "
                f"{', '.join(names)})",
            )
        ]
    caption_column = source.caption_column_in(names)
    columns = [source.image_column] + ([caption_column] if caption_column else [])
    rows, number = [], 0
    for group in range(parquet.num_row_groups):
        end = number + parquet.metadata.row_group(group).num_rows
        size = _image_bytes_in(parquet, group, source.image_column)
        if size > MAX_ROW_GROUP_BYTES and end - number > 1:
            rows += _group_lost(
                base,
                archive,
                range(number, end),
                Reason.UNSUPPORTED_FORMAT,
                f"its row group ({group}) holds {size / 1e9:.1f} GB of images in "
                f"{end - number} rows, over {MAX_ROW_GROUP_BYTES / 1e9:.1f} GB: "
                "pyarrow reads a row group's column whole, so each image would "
                "cost reading them all; rewrite the file with fewer rows a row "
                "group",
            )
            number = end
            continue
        try:
            for table in parquet.iter_batches(PARQUET_BATCH_ROWS, [group], columns):
                texts = table[caption_column].to_pylist() if caption_column else [None] * len(table)
                for value, text in zip(table[source.image_column].to_pylist(), texts, strict=True):
                    rows.append(
                        _parquet_row(
                            base, archive, number, (value, text), max_pixels, dedup, near_dedup
                        )
                    )
                    number += 1
        except (OSError, pa.ArrowException) as error:
            cause = f"{type(error).__name__}: {' '.join(str(error).split())}"  # one line
            message = f"its row group ({group}) is damaged: {cause}"
            rows += _group_lost(base, archive, range(number, end), Reason.CORRUPT, message)
        number = end
    return rows


_CONTAINER_SCANS = {ARCHIVE_EXTENSION: _scan_archive, PARQUET_EXTENSION: _scan_parquet}

# Of a Parquet input's image column in one row group of several rows: what a fit task reads to
# fit any one of them (a row group of one image is that image, whatever its size).
MAX_ROW_GROUP_BYTES = 1 << 30


def _image_bytes_in(parquet: pq.ParquetFile, group: int, column: str) -> int:
    """Bytes of `column` (its leaves: a struct's `bytes` and `path`) in row group `group`."""
    metadata = parquet.metadata.row_group(group)
    chunks = (metadata.column(i) for i in range(metadata.num_columns))
    return sum(
        chunk.total_uncompressed_size
        for chunk in chunks
        if chunk.path_in_schema.split(".")[0] == column
    )


def _group_lost(base: dict, archive: str, numbers: range, reason: Reason, message: str) -> list:
    """A rejection for each of a Parquet input's rows `numbers` that its row group costs."""
    return [
        dict(base, source=f"{archive}/{n:09d}", source_row=n) | reject(reason, message)
        for n in numbers
    ]


def _parquet_row(
    base: dict,
    archive: str,
    number: int,
    values: tuple[object, object],
    max_pixels: int,
    dedup: bool,
    near_dedup: bool,
) -> dict:
    """The scan row of a Parquet input's row `number` (its image and caption columns' values)."""
    value, text = values
    data = image_bytes(value)
    entry = dict(
        base,
        source=f"{archive}/{number:09d}",
        source_row=number,
        size=None if data is None else len(data),
        caption=None if text is None else str(text).strip(),
    )
    if data is None:
        entry |= reject(Reason.NOT_AN_IMAGE, "a Parquet row without image bytes")
    else:
        _image_member(entry, data, max_pixels, dedup, near_dedup)
    entry["key"] = sample_key(entry)
    return entry


def _member_base(row: dict) -> dict:
    """The empty scan row of a sample inside the archive (a tar, a Parquet file) `row` lists."""
    return {name: None for name in SCAN_SCHEMA.names} | {
        "archive": row["source"],
        "mtime_ns": row["mtime_ns"],
    }


def _image_member(entry: dict, data: bytes, max_pixels: int, dedup: bool, near_dedup: bool) -> None:
    """An archive sample's image bytes: their header and hashes into its row, or its rejection."""
    if not data:
        entry |= reject(Reason.NOT_AN_IMAGE, "empty file")
        return
    entry |= _checked(dict(entry), io.BytesIO(data), None, max_pixels)
    if dedup and not entry["reject"]:
        entry["content_hash"] = xxhash.xxh3_128_hexdigest(data)
    if near_dedup and not entry["reject"]:
        entry |= _perceptual_hash(entry, data=data)


def _perceptual_hash(row: dict, data: bytes | None = None, source: Input | None = None) -> dict:
    """The `dhash` of a row's image (`data`, else read from `source` as the fit reads it), or
    the rejection of a file that cannot be read or pixels that do not decode (which the fit
    would reject alike)."""
    try:
        image = data if data is not None else read_image(source, row)
    except (OSError, pa.ArrowException) as error:
        return reject(Reason.UNREADABLE, f"{type(error).__name__}: {error}")
    try:
        return {"dhash": perceptual_hash(image, row["format"], row["orientation"])}
    except Exception as error:  # any decoder failure on a corrupt file is that file's alone
        return reject(Reason.CORRUPT, f"{type(error).__name__}: {error}")


def _member_caption(data: bytes, extension: str, field: str, entry: dict) -> str | None:
    """A sample's caption member's text; a bad one marks the sample rejected."""
    try:
        text = data.decode("utf-8")
        return text.strip() if extension == "txt" else json_caption(json.loads(text), field)
    except UnicodeDecodeError as error:
        entry |= reject(Reason.CAPTION_ENCODING, f"caption is not UTF-8: {error}")
    except ValueError as error:
        entry |= reject(Reason.BAD_CAPTION, f"{entry['source']}.{extension}: {error}")
    return None


def content_hash(stream: BinaryIO) -> str:
    """32 hex digits of xxh3-128 over a stream's bytes, read a MiB at a time (~9 GB/s: ten
    times blake2b or md5 here, bench/inputs_bench.py; 128 bits: no collision in 10M files)."""
    digest = xxhash.xxh3_128()
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _content_hash(source: Input, path: str) -> dict:
    try:
        with open_stream(source, path) as stream:
            return {"content_hash": content_hash(stream)}
    except OSError as error:
        return reject(Reason.UNREADABLE, f"{type(error).__name__}: {error}")


def _scan_one(row: dict, source: Input, max_pixels: int) -> dict:
    if row["reject"]:
        return row
    if "\0" in row["source"]:
        return row | reject(Reason.BAD_PATH, "the path holds a NUL character")
    try:
        filesystem, path = source.resolve(row["source"])
    except (ValueError, pa.ArrowException) as error:  # NUL in a path, a scheme pyarrow lacks
        hint = " (download http URLs first)" if row["source"].startswith("http") else ""
        return row | reject(Reason.BAD_PATH, f"{error}{hint}")
    try:
        if row["size"] is None:  # a listing row: what is there?
            row |= file_info(filesystem, path)
            if row.get("reject"):
                return row
        row["key"] = sample_key(row)
        if not row["size"]:
            return row | reject(Reason.NOT_AN_IMAGE, "empty file")
        stream = open_file(source, row["source"], HEADER_BYTES)
    except OSError as error:
        return row | reject(Reason.UNREADABLE, f"{type(error).__name__}: {error}")
    return _checked(row, stream, source, max_pixels)


def _checked(row: dict, stream: BinaryIO, source: Input | None, max_pixels: int) -> dict:
    """`row` with its image's header from `stream`, or the rejection the header calls for."""
    try:
        header = _read_header(stream, source, row["source"])
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


def _read_header(stream: BinaryIO, source: Input | None, path: str) -> Header:
    """The header from `stream`; from the whole file when a remote file's first bytes fall
    short (`source` None: `stream` is the whole file already)."""
    with stream:
        try:
            return read_header(Image.open(stream))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            if source is None or not (
                isinstance(stream, io.BytesIO) and len(stream.getbuffer()) == HEADER_BYTES
            ):
                raise
    with open_file(source, path) as whole:
        return read_header(Image.open(whole))
