"""The perceptual hash of an image for --near-dedup: imagehash's dHash (64 bits) of a small grey
thumbnail, decoded as cheaply as the format allows. The scan takes it (pipeline/scan.py), the
assign stage compares it (pipeline/near_dedup.py), the index keeps it (`dhash`).

Why in the scan, though the scan reads only headers and the fit decodes anyway: the hashes
must all be known before shards are planned, or a near duplicate would be fitted and written
into a tar before it is known to be one (and every tar sample must be in the index; rewriting
the shards that hold one would cost more). A hash taken in the fit would cost ~0.6 ms an image;
taken here it costs a second decode, kept small: a JPEG is decoded grey at 1/8 scale (libjpeg's
DCT scaling through Pillow's draft mode: the entropy decoding alone), other formats through
libvips' thumbnail (a WebP decoded scaled, PNG and TIFF streamed). Measured per image against
its fit (bench/near_dedup_bench.py, bench/README.md): 65% for a 4K baseline JPEG, 40% for a
CMYK one, 86-95% for progressive JPEG, WebP, PNG and TIFF, whose decoders cannot skip much. So
--near-dedup is off by default, and an --incremental run decodes only new and changed files:
an unchanged file's hash comes from OUT's index (output.with_held_hashes).

Why dHash: measured on near copies of real-looking scenes (tests/support/near_copies.py,
tests/test_perceptual.py), imagehash's dHash and pHash both keep re-encodes, resizes and
small crops within 4 bits, and put no two different images, not even two near-flat
gradients or two scenes of one composition, closer than 17; dHash also keeps a corner logo
within 4 bits where pHash moves it 6 to 12. aHash and wHash give every pair of near-flat
gradients the same hash. OpenCV's img_hash is in opencv-contrib only.

Orientation is applied (a phone's rotated JPEG hashes as shown); colour profiles are not (a
grey thumbnail of the stored values: a profile shifts tones a little, which dHash, built on the
signs of neighbours' differences, hardly sees); transparency goes over white.
"""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pyvips
from PIL import Image

from pipeline.imaging import ORIENTED, to_rgb

THUMBNAIL = 256  # the thumbnail's side, about; dHash resizes it to 9x8


def perceptual_hash(source: str | bytes, format: str, orientation: int = 1) -> int:
    """dHash of the image in `source` (a local path or the file's bytes; `format` and
    `orientation` as `imaging.read_header` gives them) as shown: an unsigned 64-bit integer,
    imagehash's hex read as a number. Raises on undecodable pixels."""
    grey = _DECODERS.get(format, _vips_grey)(source)
    if orientation in ORIENTED:
        grey = ORIENTED[orientation](grey[..., None])[..., 0]
    return int(str(imagehash.dhash(Image.fromarray(np.ascontiguousarray(grey)))), 16)


def _jpeg_grey(source: str | bytes) -> np.ndarray:
    """A JPEG's luma at the smallest DCT scale that still covers THUMBNAIL (at most 1/8)."""
    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        image.draft("L", (THUMBNAIL, THUMBNAIL))
        return np.asarray(image.convert("L"))


def _vips_grey(source: str | bytes) -> np.ndarray:
    """libvips' thumbnail (shrink on load where the format can), flattened over white, as grey:
    the luma a JPEG stores (libvips' own b-w differs by a few levels, and dHash by bits)."""
    options = {"height": THUMBNAIL, "size": "down", "no_rotate": True, "fail_on": "error"}
    if isinstance(source, str):
        image = pyvips.Image.thumbnail(source, THUMBNAIL, **options)
    else:
        image = pyvips.Image.thumbnail_buffer(source, THUMBNAIL, **options)
    if image.hasalpha():
        depth = 65535 if image.format == "ushort" else 255
        image = image.flatten(background=[depth] * (image.bands - 1), max_alpha=depth)
    if image.format != "uchar" or image.interpretation not in ("srgb", "b-w"):
        image = image.colourspace("srgb")  # 8 bits, from 16, CMYK or anything else
    pixels = image.numpy()  # (H, W) grey or (H, W, 3): luma as JPEG's and Pillow's (BT.601)
    return np.asarray(Image.fromarray(pixels).convert("L")) if pixels.ndim == 3 else pixels


def _pillow_grey(source: str | bytes) -> np.ndarray:
    """Pillow, for what libvips does not load (BMP)."""
    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        return np.asarray(to_rgb(image).convert("L"))


_DECODERS = {"JPEG": _jpeg_grey, "MPO": _jpeg_grey, "BMP": _pillow_grey}  # else _vips_grey
