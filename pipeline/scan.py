"""Reading image headers: size after EXIF orientation, mode and format, never the pixels.

`scan_batch` is the unit of work of the scan stage: it takes listing rows and returns one
compact row per file. Every failure becomes a rejection row; it never raises for a bad file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import BinaryIO

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline.imaging import EXIF_ORIENTATION, TRANSPOSED_ORIENTATIONS
from pipeline.sources import LISTING_SCHEMA, InputRoot

# Formats we decode; Pillow identifies more (PSD, ICO, PPM...), which are rejected by name.
# MPO is what Pillow calls the JPEGs many phones write (a JPEG with extra frames).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
DEFAULT_MAX_PIXELS = 250_000_000  # room for 170-megapixel wallpapers and 200 MP phone shots
HEADER_BYTES = 1 << 16  # enough for the header and EXIF block of nearly every image file

SCAN_SCHEMA = pa.schema(
    [
        *LISTING_SCHEMA,
        ("key", pa.string()),  # the sample's key in the shards: stable while the file is unchanged
        ("width", pa.int32()),  # after EXIF orientation
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("orientation", pa.int8()),
    ]
)


def sample_key(row: dict) -> str:
    """20 hex digits from the source and its file's identity (size, mtime, caption)."""
    caption_identity = (
        row["caption"]
        if row.get("caption") is not None
        else f"{row.get('caption_source')}:{row.get('caption_size')}:{row.get('caption_mtime_ns')}"
    )
    identity = f"{row['source']}\0{row['size']}\0{row['mtime_ns']}\0{caption_identity}"
    return hashlib.blake2b(identity.encode(), digest_size=10).hexdigest()


def scan_batch(rows: pa.Table, root: InputRoot, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Header of every listed file: a table of SCAN_SCHEMA, one row per input row."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings on odd but readable headers
        scanned = [_scan_one(row, root, max_pixels) for row in rows.to_pylist()]
    return pa.Table.from_pylist(scanned, schema=SCAN_SCHEMA)


def _scan_one(row: dict, root: InputRoot, max_pixels: int) -> dict:
    if row["reject"]:
        return row
    try:
        filesystem, path = root.resolve(row["source"])
        if row["size"] is None:
            info = filesystem.get_file_info(path)
            row |= {"size": info.size, "mtime_ns": info.mtime_ns}
        row["key"] = sample_key(row)
        if not row["size"]:
            return row | _reject("not_an_image", "empty file")
        stream = root.open(row["source"], HEADER_BYTES)
    except OSError as error:
        return row | _reject("unreadable", f"{type(error).__name__}: {error}")
    try:
        width, height, orientation, header = _read_header(stream, root, row["source"])
    except UnidentifiedImageError:
        return row | _reject("not_an_image", "not a recognised image file")
    except (OSError, ValueError, SyntaxError) as error:  # Pillow raises all three on bad headers
        return row | _reject("corrupt", f"{type(error).__name__}: {error}")
    if header["format"] not in SUPPORTED_FORMATS:
        return (
            row
            | header
            | _reject("unsupported_format", f"{header['format']} images are not supported")
        )
    if orientation not in range(1, 9):
        orientation = 1
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    row |= header | {"width": width, "height": height, "orientation": orientation}
    if width * height > max_pixels:
        return row | _reject(
            "too_many_pixels", f"{width}x{height} is over max_pixels={max_pixels:,}"
        )
    return row


def _read_header(stream: BinaryIO, root: InputRoot, source: str) -> tuple[int, int, int, dict]:
    """The header from `stream`; from the whole file when a remote file's first bytes fall short."""
    with stream:
        try:
            return _header(stream)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            if not (isinstance(stream, io.BytesIO) and len(stream.getbuffer()) == HEADER_BYTES):
                raise
    with root.open(source) as whole:
        return _header(whole)


def _header(stream: BinaryIO) -> tuple[int, int, int, dict]:
    """(stored width, stored height, EXIF orientation, format and mode); reads no pixels."""
    image = Image.open(stream)
    return *image.size, _orientation(image), {"format": image.format, "mode": image.mode}


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, as `ImageOps.exif_transpose` will apply it, from the header only.

    Pillow's `getexif()` parses more than this needs, and for a PNG decodes the pixels to look
    for a late eXIf chunk; it is used only where XMP may carry the orientation instead.
    """
    if image.format == "TIFF":
        return image.tag_v2.get(EXIF_ORIENTATION, 1)
    if "xmp" in image.info or "XML:com.adobe.xmp" in image.info:
        return image.getexif().get(EXIF_ORIENTATION, 1)
    exif = Image.Exif()
    if "exif" in image.info:
        exif.load(image.info["exif"])
    return exif.get(EXIF_ORIENTATION, 1)


def _reject(code: str, message: str) -> dict:
    return {"reject": code, "message": message}
