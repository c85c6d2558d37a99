"""One image from file bytes to encoded bucket-fitted bytes: decode, orient, RGB, resize, crop.

Fitting follows `fit.py`: scale keeping the aspect until the bucket is covered, then crop the
overflow now (`center`, `random`) or leave it for the loader to crop at random at training
time (`none`, the source's way). JPEGs are decoded straight at a reduced size: libjpeg's
DCT-domain scaling (Pillow's `draft`) to the smallest of 1/2, 1/4 and 1/8 that still covers
the fitted size; a resampling filter does the rest: bicubic when shrinking (as good as
Lanczos there: 0.05 dB less PSNR, 11% faster, measured), Lanczos when enlarging, where its
sharpness shows. bench/prepare_bench.py measures the path against a full decode and a Lanczos
resize: about 3x faster per image at a higher PSNR at the same JPEG quality.
"""

from __future__ import annotations

import io
import re
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from pipeline.fit import crop_box, fit

EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 or 270 degrees
ORIENTATION_TRANSPOSE = {  # as ImageOps.exif_transpose applies them
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
DEFAULT_BACKGROUND = (255, 255, 255)  # white under transparency: what viewers and sites show
DRAFT_MARGIN = 1  # decode JPEGs at no less than this times the fitted size
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

RESAMPLING = {False: Image.Resampling.BICUBIC, True: Image.Resampling.LANCZOS}  # by enlarging

CROPS = {
    "none": lambda size, bucket, rng: None,
    "center": lambda size, bucket, rng: crop_box(*size, *bucket),
    "random": lambda size, bucket, rng: crop_box(*size, *bucket, rng),
}
ENCODERS = {  # extension -> (Pillow format, options given quality)
    "jpg": ("JPEG", lambda quality: {"quality": quality}),
    "webp": ("WEBP", lambda quality: {"quality": quality, "method": 4}),
    "png": ("PNG", lambda quality: {"compress_level": 6}),
}

# Our own limit (scan's max_pixels) replaces Pillow's decompression-bomb guard, whose default
# would refuse real 170 MP wallpapers; larger images are rejected before a pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


class Header(NamedTuple):
    """What the scan and the writer both take from a file's header, decided in one place."""

    width: int  # after orientation: the size the image is shown at
    height: int
    orientation: int  # the EXIF orientation the decoded pixels still need (1: none)
    format: str
    mode: str
    note: str | None  # metadata that was ignored, and why


def _pillow_orients_tiff() -> bool:
    """Whether Pillow applies a TIFF's orientation tag itself (Pillow 13 does, at open for the
    size and at load for the pixels), probed once on a 2x1 image."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.new("L", (2, 1)).save(buffer, "TIFF", exif=exif)
    return Image.open(buffer).size == (1, 2)


PILLOW_ORIENTS_TIFF = _pillow_orients_tiff()
XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)(\d)')  # as Pillow's getexif reads it


def read_header(image: Image.Image) -> Header:
    """The header of an opened image; reads no pixels.

    Orientation comes from the EXIF block (JPEG APP1, WebP's EXIF chunk, PNG's eXIf chunk when it
    precedes the image data, as the PNG spec places it), else from XMP's tiff:Orientation, else
    from a TIFF's own tag. A damaged block or a value outside 1..8 costs the metadata (orientation
    1, noted), never the image.
    """
    orientation, note = _orientation(image)
    width, height = image.size
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return Header(width, height, orientation, image.format, image.mode, note)


def _orientation(image: Image.Image) -> tuple[int, str | None]:
    if image.format == "TIFF":
        tag = image.tag_v2.get(EXIF_ORIENTATION, 1)
        return (1, None) if PILLOW_ORIENTS_TIFF else _valid(tag)
    orientation, note = None, None
    if "exif" in image.info:
        exif = Image.Exif()
        try:
            exif.load(image.info["exif"])
            orientation = exif.get(EXIF_ORIENTATION)
        except Exception as error:  # any parser failure: the block is unusable, not the image
            note = f"unreadable EXIF block ignored ({type(error).__name__}: {error})"
    if orientation is None:
        xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or b""
        match = XMP_ORIENTATION.search(xmp.encode() if isinstance(xmp, str) else xmp)
        orientation = int(match[1]) if match else 1
    orientation, invalid = _valid(orientation)
    return orientation, note or invalid


def _valid(orientation: object) -> tuple[int, str | None]:
    if orientation in range(1, 9):
        return int(orientation), None
    return 1, f"EXIF orientation {orientation!r} is not one of 1..8: ignored"


def max_file_bytes(pixels: int) -> int:
    """The largest file an image of `pixels` can need: 16 bytes a pixel (16-bit RGBA stored raw,
    twice) plus 64 MiB of metadata. Anything larger is junk or a sparse file."""
    return 16 * pixels + (64 << 20)


def to_rgb(
    image: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND
) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composited over `background`."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and values.max() > 255):
            values = values / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        backdrop = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(backdrop, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class Fitted(NamedTuple):
    image: Image.Image  # RGB, fitted to the bucket (cropped or with its overflow)
    header: Header  # the file's, as `read_header` gives it
    note: str | None  # metadata ignored, from the header or found while decoding


def fitted_image(
    source: bytes | BinaryIO,
    bucket: tuple[int, int],
    crop: str = "none",
    rng: np.random.Generator | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Fitted:
    """Decode `source` (bytes, or a file read only as far as the decoder needs) and fit it to
    `bucket` (width, height); raises on undecodable data."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        header = read_header(image)
        transposed = header.orientation in TRANSPOSED_ORIENTATIONS
        scaled = fit(header.width, header.height, *bucket)
        stored = scaled[::-1] if transposed else scaled  # the fitted size before orienting
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (stored[0] * DRAFT_MARGIN, stored[1] * DRAFT_MARGIN))
        exif_before = "exif" in image.info
        image.load()
        note = header.note
        if image.format == "PNG" and "exif" in image.info and not exif_before:
            note = "eXIf chunk after the image data ignored (the PNG spec puts it before)"
        rgb = to_rgb(image, background)
        enlarging = stored[0] > rgb.width
        rgb = rgb.resize(stored, RESAMPLING[enlarging], reducing_gap=3.0)
    if header.orientation in ORIENTATION_TRANSPOSE:  # after the resize: fewer pixels to move
        rgb = rgb.transpose(ORIENTATION_TRANSPOSE[header.orientation])
    box = CROPS[crop](scaled, bucket, rng)
    return Fitted(rgb if box is None else rgb.crop(box), header, note)


def encode(image: Image.Image, extension: str = "jpg", quality: int = 95) -> bytes:
    """The image in the output format, as bytes."""
    pillow_format, options = ENCODERS[extension]
    buffer = io.BytesIO()
    image.save(buffer, pillow_format, **options(quality))
    return buffer.getvalue()
