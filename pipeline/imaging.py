"""One image from a file to encoded bucket-fitted bytes: decode, colour, flatten, resize, orient,
crop.

Fitting follows `fit.py`: scale keeping the aspect until the bucket is covered, then crop the
overflow now (`center`, `random`) or leave it for the loader to crop at random at training time
(`none`, the source's way). The output is always 8-bit sRGB with EXIF orientation applied and
transparency composited over the background.

The engine is chosen per format (`ENGINES`) by bench/prepare_bench.py on a corpus that looks like
real data, one core, against a naive Pillow loop, with PSNR against a full-quality reference
(figures in bench/README.md):

- libvips (pyvips) for JPEG, PNG, WebP, TIFF and GIF: one engine for every class, the fastest
  or within noise of it where colour is right. JPEGs and WebPs shrink on load (libjpeg's DCT
  scaling by 2, 4 or 8; libwebp's scaled decode) to the smallest size that still covers the
  fitted one; PNG and TIFF stream in sequential access, so memory follows the output and a few
  rows of input, not the pixel count. Transparency is composited first, in the image's own
  bands and depth; embedded ICC profiles other than sRGB and CMYK go to sRGB through the
  profile (libvips' CMYK profile when none is embedded), noted in the index; Lanczos-3 does the
  rest. PNGs are bound by decoding (zlib), so no engine gains much on them.
- simplejpeg (libjpeg-turbo) decodes the common JPEG (8-bit YCbCr or grey, no profile or sRGB)
  in libvips' place, at the same DCT scale, before the same Lanczos-3: the same pixels for
  less. It fails on any libjpeg warning, where libvips fails on errors only: such files, and
  CMYK or colour-managed JPEGs, go to libvips as before.
- Pillow for BMP, which libvips does not load.
- OpenCV's bicubic (a = -0.75, pixel centres aligned) for images to enlarge, which are small:
  libvips' upsizing is a fraction of a pixel off and Pillow's Lanczos is the slowest step of a
  small JPEG; OpenCV's is nearly as sharp for a fraction of the time.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import NamedTuple

import cv2
import numpy as np
import pyvips
import simplejpeg
from PIL import Image, ImageCms

from pipeline.config import CROP_MODES, DEFAULT_BACKGROUND, IMAGE_FORMATS
from pipeline.fit import crop_box, fit

EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 or 270 degrees
ORIENTED = {  # orientation -> the stored pixels (H, W, C) as shown, as exif_transpose does it
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
SHRINK_ON_LOAD = {"JPEG": "shrink", "MPO": "shrink", "WEBP": "scale"}  # format -> load option

CROPS = {
    "none": lambda size, bucket, rng: None,
    "center": lambda size, bucket, rng: crop_box(*size, *bucket),
    "random": lambda size, bucket, rng: crop_box(*size, *bucket, rng),
}


def _pillow_encoder(pillow_format: str, options: Callable[[int], dict]) -> Callable:
    def encode(pixels: np.ndarray, quality: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, pillow_format, **options(quality))
        return buffer.getvalue()

    return encode


def _opencv_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """libjpeg-turbo through OpenCV: the bytes Pillow writes at the same quality (4:2:0,
    baseline), without Pillow's copy of the array into an image (1.9 against 2.6 ms a 704x512
    photo here)."""
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode the image as JPEG")
    return data.tobytes()


ENCODERS = {  # extension -> encode(uint8 (H, W, 3) RGB, quality) -> bytes
    "jpg": _opencv_jpeg,
    "webp": _pillow_encoder("WEBP", lambda quality: {"quality": quality, "method": 4}),
    "png": _pillow_encoder("PNG", lambda quality: {"compress_level": 6}),
}
assert set(CROPS) == set(CROP_MODES) and set(ENCODERS) == set(IMAGE_FORMATS), "config.py's names"

# Our own limit (scan's max_pixels) replaces Pillow's decompression-bomb guard, whose default
# would refuse real 170 MP wallpapers; larger images are rejected before a pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
pyvips.concurrency_set(1)  # one thread per image: the job runs one task per CPU
pyvips.cache_set_max(0)  # every image is seen once: nothing to gain from libvips' cache
cv2.setNumThreads(1)


class Header(NamedTuple):
    """What the scan and the writer both take from a file's header, decided in one place."""

    width: int  # after orientation: the size the image is shown at
    height: int
    orientation: int  # the EXIF orientation of the stored pixels (1: shown as stored)
    format: str
    mode: str
    profile: str | None  # the embedded ICC profile's description, if any
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
    precedes the image data, as the PNG spec places it: a later one is ignored), else from XMP's
    tiff:Orientation, else from a TIFF's own tag. A damaged block or a value outside 1..8 costs
    the metadata (orientation 1, noted), never the image.
    """
    orientation, note = _orientation(image)
    width, height = image.size
    already_oriented = image.format == "TIFF" and PILLOW_ORIENTS_TIFF  # Pillow's size is shown
    if orientation in TRANSPOSED_ORIENTATIONS and not already_oriented:
        width, height = height, width
    profile, profile_note = _profile(image.info.get("icc_profile"))
    note = "; ".join(n for n in (note, profile_note) if n) or None
    return Header(width, height, orientation, image.format, image.mode, profile, note)


def _orientation(image: Image.Image) -> tuple[int, str | None]:
    if image.format == "TIFF":
        return _valid(image.tag_v2.get(EXIF_ORIENTATION, 1))
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


def _profile(data: bytes | None) -> tuple[str | None, str | None]:
    """(description of an embedded ICC profile, note if it cannot be read)."""
    if not data:
        return None, None
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(data)).profile.profile_description, None
    except Exception as error:  # a damaged profile costs the colour management, not the image
        return None, f"unreadable ICC profile ignored ({type(error).__name__}: {error})"


def max_file_bytes(pixels: int) -> int:
    """The largest file an image of `pixels` can need: 16 bytes a pixel (16-bit RGBA stored raw,
    twice) plus 64 MiB of metadata. Anything larger is junk or a sparse file."""
    return 16 * pixels + (64 << 20)


class Fitted(NamedTuple):
    pixels: np.ndarray  # uint8 (H, W, 3) RGB, fitted to the bucket (cropped or with overflow)
    header: Header  # the file's, as `read_header` gives it
    note: str | None  # metadata ignored or colour converted, and how
    crop: tuple[int, int]  # (left, top) of `pixels` in the fitted image: (0, 0) when uncropped

    @property
    def image(self) -> Image.Image:
        """The pixels as a Pillow image (a copy)."""
        return Image.fromarray(self.pixels)


def fitted_image(
    source: str | bytes,
    bucket: tuple[int, int],
    crop: str = "none",
    rng: np.random.Generator | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Fitted:
    """Decode `source` (a local path, read only as far as the decoder needs, or the file's
    bytes) and fit it to `bucket` (width, height); raises on undecodable data."""
    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        header = read_header(image)
    scaled = fit(header.width, header.height, *bucket)
    stored = scaled[::-1] if header.orientation in TRANSPOSED_ORIENTATIONS else scaled
    engine = ENGINES.get(header.format, _pillow_pixels)
    pixels, colour_note = engine(source, header, stored, background)
    if pixels.shape != (stored[1], stored[0], 3):
        raise ValueError(f"{engine.__name__} gave {pixels.shape}, not {stored}: a bug")
    if header.orientation in ORIENTED:  # after the resize: fewer pixels to move
        pixels = ORIENTED[header.orientation](pixels)
    box = CROPS[crop](scaled, bucket, rng)
    left, top = 0, 0
    if box is not None:
        left, top, right, bottom = box
        pixels = pixels[top:bottom, left:right]
    note = "; ".join(n for n in (header.note, colour_note) if n) or None
    return Fitted(np.ascontiguousarray(pixels), header, note, (left, top))


Engine = Callable[
    [str | bytes, Header, tuple[int, int], tuple[int, int, int]], tuple[np.ndarray, str | None]
]


def _vips_pixels(
    source: str | bytes, header: Header, stored: tuple[int, int], background
) -> tuple[np.ndarray, str | None]:
    """libvips: shrink on load where the format can, stream the rest, sRGB, flatten, Lanczos-3 to
    `stored` (width, height, before orientation); uint8 (H, W, 3) and a colour note."""
    width, height = _as_stored(header)
    options = {"access": "sequential", "fail_on": "error"}
    factor = _shrink_factor((width, height), stored) if header.format in SHRINK_ON_LOAD else 1
    if factor > 1:
        option = SHRINK_ON_LOAD[header.format]
        options[option] = factor if option == "shrink" else 1 / factor
    if isinstance(source, str):
        image = pyvips.Image.new_from_file(source, **options)
    else:
        image = pyvips.Image.new_from_buffer(source, "", **options)
    image, note = _colour_managed(image, header)
    if image.hasalpha():  # composited first, in the image's own bands and depth: exact, cheapest
        if image.bands == 2 and len(set(background)) > 1:
            image = image.colourspace("srgb")  # a grey image over a coloured background
        depth = 257 if image.format == "ushort" else 1
        image = image.flatten(
            background=[c * depth for c in background[: image.bands - 1]], max_alpha=255 * depth
        )
    if stored[0] > image.width or stored[1] > image.height:
        return enlarge(_srgb(image).numpy(), stored), note
    return _srgb(_lanczos(image, stored)).numpy(), note  # grey and 16-bit: at the output's size


def _jpeg_pixels(
    source: str | bytes, header: Header, stored: tuple[int, int], background
) -> tuple[np.ndarray, str | None]:
    """libjpeg-turbo through simplejpeg for the common JPEG (8-bit YCbCr or grey, sRGB or no
    profile), decoded at the same DCT scale libvips would use, then resized as libvips does:
    the same pixels, without libvips' slower decode (1.2 against 2.6 ms a 512x384 photo).
    simplejpeg is strict, failing on any libjpeg warning; such a file, and every other JPEG,
    goes to libvips, which decides what is an error as it always has."""
    if header.mode not in ("RGB", "L") or _foreign(header.profile):
        return _vips_pixels(source, header, stored, background)
    width, height = _as_stored(header)
    factor = _shrink_factor((width, height), stored)
    if isinstance(source, str):
        with open(source, "rb") as file:
            data = file.read()
    else:
        data = source
    try:
        pixels = simplejpeg.decode_jpeg(
            data,
            "RGB",
            min_width=-(-width // factor),
            min_height=-(-height // factor),
            min_factor=factor,
        )
    except ValueError:
        return _vips_pixels(source, header, stored, background)
    pixels = pixels[: height // factor, : width // factor]  # libvips drops a partial last pixel
    if stored[0] > pixels.shape[1] or stored[1] > pixels.shape[0]:
        return enlarge(pixels, stored), None
    image = pyvips.Image.new_from_array(pixels)
    return _lanczos(image, stored).numpy(), None


def _as_stored(header: Header) -> tuple[int, int]:
    """(width, height) of the stored pixels, before orientation."""
    if header.orientation in TRANSPOSED_ORIENTATIONS:
        return header.height, header.width
    return header.width, header.height


def _lanczos(image: pyvips.Image, stored: tuple[int, int]) -> pyvips.Image:
    """libvips' Lanczos-3 to `stored` (width, height): the resize of every image it shrinks."""
    return image.resize(stored[0] / image.width, vscale=stored[1] / image.height, kernel="lanczos3")


def enlarge(pixels: np.ndarray, stored: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) resized to `stored` (width, height) where that enlarges it: OpenCV's
    bicubic (see the module's notes)."""
    return cv2.resize(pixels, stored, interpolation=cv2.INTER_CUBIC)


def _shrink_factor(size: tuple[int, int], stored: tuple[int, int]) -> int:
    """The largest of 1, 2, 4, 8 at which a decoder's ceil-divided size still covers `stored`."""
    factor = 1
    while factor < 8 and all(
        -(-side // (2 * factor)) >= want for side, want in zip(size, stored, strict=True)
    ):
        factor *= 2
    return factor


def _colour_managed(image: pyvips.Image, header: Header) -> tuple[pyvips.Image, str | None]:
    """sRGB through the embedded profile when it is not sRGB, through a CMYK profile for CMYK;
    anything else as it is (grey and 16-bit images are converted after the resize)."""
    cmyk = image.interpretation == "cmyk"
    if not (cmyk or _foreign(header.profile)):
        return image, None
    through = f"its ICC profile {header.profile!r}" if header.profile else "a CMYK profile"
    try:
        image = image.icc_transform("srgb", embedded=True, input_profile="cmyk" if cmyk else "srgb")
    except pyvips.Error as error:
        return _srgb(image), f"ICC profile unusable, colour converted without it ({error})"
    return image, f"{'CMYK' if cmyk else 'colour'} converted to sRGB through {through}"


def _foreign(profile: str | None) -> bool:
    """Whether an embedded profile (its description) asks for a conversion to sRGB."""
    return profile is not None and "srgb" not in profile.lower()


def _srgb(image: pyvips.Image) -> pyvips.Image:
    """8-bit sRGB, alpha kept: grey, 16-bit and other interpretations converted."""
    if image.interpretation == "srgb" and image.format == "uchar":
        return image
    return image.colourspace("srgb")


def _pillow_pixels(
    source: str | bytes, header: Header, stored: tuple[int, int], background
) -> tuple[np.ndarray, None]:
    """Pillow: decode (JPEGs at a reduced size), composite, bicubic (Lanczos when enlarging), for
    what libvips does not load; the previous engine, which the benchmark compares."""
    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        if image.format in ("JPEG", "MPO"):  # libjpeg's DCT scaling, like libvips' shrink
            image.draft("RGB", stored)
        rgb = to_rgb(image, background)
        if stored[0] > rgb.width or stored[1] > rgb.height:
            return enlarge(np.asarray(rgb), stored), None
        resized = rgb.resize(stored, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(resized), None


ENGINES: dict[str, Engine] = {  # Header.format -> engine; any other format: _pillow_pixels
    "JPEG": _jpeg_pixels,
    "MPO": _jpeg_pixels,
    "PNG": _vips_pixels,
    "WEBP": _vips_pixels,
    "TIFF": _vips_pixels,
    "GIF": _vips_pixels,
}


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


def encode(image: np.ndarray | Image.Image, extension: str = "jpg", quality: int = 95) -> bytes:
    """The image (uint8 (H, W, 3) RGB, or an RGB Pillow image) in the output format, as bytes."""
    pixels = np.ascontiguousarray(image if isinstance(image, np.ndarray) else np.asarray(image))
    return ENCODERS[extension](pixels, quality)
