"""Near copies of real-looking images, and different images that look alike: what the
near-duplicate measurements (tests/test_near_dedup.py, bench/near_dedup_bench.py and the
table in docs/format.md) are made of.

A `scene` is a photo-like composition: a sky gradient over ground, a few soft subjects, and
texture at four scales plus grain (compresses and hashes like a photo, not like a flat colour).
Its `layout` seed fixes the composition, its `seed` the content: two scenes of one layout and
different seeds are "the same composition, different content". `COPIES` makes the edits
users' collections hold (re-encodes, resizes, crops, watermarks), each as a file's bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

SIZE = (640, 480)


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float noise with detail at every scale, as bench/corpus.py's photos have."""
    total = np.zeros((height, width, 3), np.float32)
    for scale, amplitude in ((48, 30.0), (12, 16.0), (4, 8.0), (1, 5.0)):
        small = rng.normal(0, 1, (height // scale + 2, width // scale + 2, 3)).astype(np.float32)
        layer = Image.fromarray(np.clip(small * 40 + 128, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        total += (np.asarray(layer, np.float32) - 128) * (amplitude / 40)
    return total


def scene(seed: int, layout: int | None = None, size: tuple[int, int] = SIZE) -> Image.Image:
    """A photo-like RGB image: composition from `layout` (default: `seed`), content from `seed`."""
    width, height = size
    plan = np.random.default_rng(10_000 + (seed if layout is None else layout))
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    horizon = plan.uniform(0.35, 0.7)
    sky_top, sky_low, ground = (plan.uniform(40, 230, 3) for _ in range(3))
    sky = sky_top + (sky_low - sky_top) * np.minimum(y / horizon, 1)
    pixels = np.where(y < horizon, sky, ground + rng.uniform(-40, 40, 3)).astype(np.float32)
    pixels = np.broadcast_to(pixels, (height, width, 3)).copy()
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(4):  # subjects: where from the layout, what colour from the content
        x, cy = plan.uniform(0.1, 0.9) * width, plan.uniform(0.2, 0.9) * height
        r = plan.uniform(0.05, 0.2) * width
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - r, cy - r * 0.8, x + r, cy + r * 0.8), fill=colour)
    blurred = np.asarray(canvas.resize((width // 4, height // 4)).resize(size), np.float32)
    texture = _texture(rng, width, height)  # mostly light and shade, a little colour
    detail = 1.2 * texture[..., :1] + 0.3 * texture
    return Image.fromarray(np.clip(blurred + detail, 0, 255).astype(np.uint8))


def gradient(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """A near-flat image: one vertical colour gradient (a sky, a studio backdrop) with grain and
    a faint texture; `seed` varies the colours a little and the grain: the false positives'
    worst case."""
    width, height = size
    rng = np.random.default_rng(seed)
    top, bottom = np.array([70, 110, 190]) + rng.uniform(-25, 25, 3), np.array([230, 190, 150])
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = top + (bottom - top) * y + 0.3 * _texture(rng, width, height)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def _resized(image: Image.Image, factor: float) -> bytes:
    size = (round(image.width * factor), round(image.height * factor))
    return encoded(image.resize(size, Image.Resampling.LANCZOS), "JPEG", quality=90)


def _cropped(image: Image.Image, share: float, pixels: int = 0) -> bytes:
    """`share` of the width off the left and of the height off the top (or `pixels` each)."""
    left = pixels or round(share * image.width)
    top = pixels or round(share * image.height)
    return encoded(image.crop((left, top, image.width, image.height)), "JPEG", quality=90)


def _text_mark(image: Image.Image) -> bytes:
    """A caption-sized semi-transparent text watermark in the lower right corner."""
    marked = image.convert("RGBA")
    layer = Image.new("RGBA", marked.size, (0, 0, 0, 0))
    font = ImageFont.load_default(size=max(12, image.height // 16))
    ImageDraw.Draw(layer).text(
        (image.width * 0.45, image.height * 0.85),
        "(c) photos.example",
        font=font,
        fill=(255, 255, 255, 170),
    )
    return encoded(Image.alpha_composite(marked, layer).convert("RGB"), "JPEG", quality=90)


def _logo_mark(image: Image.Image) -> bytes:
    """An opaque logo (a disc and a bar, a sixth of the width) in the upper left corner."""
    marked = image.copy()
    draw, side = ImageDraw.Draw(marked), image.width // 6
    draw.ellipse(
        (10, 10, 10 + side, 10 + side), fill=(250, 250, 250), outline=(20, 20, 20), width=4
    )
    draw.rectangle(
        (10 + side // 4, 10 + side // 3, 10 + 3 * side // 4, 10 + side // 2), fill=(200, 30, 30)
    )
    return encoded(marked, "JPEG", quality=90)


COPIES: dict[str, Callable[[Image.Image], bytes]] = {  # edit -> the edited copy's file bytes
    "jpeg q95": lambda image: encoded(image, "JPEG", quality=95),
    "jpeg q75": lambda image: encoded(image, "JPEG", quality=75),
    "jpeg q50": lambda image: encoded(image, "JPEG", quality=50),
    "webp q80": lambda image: encoded(image, "WEBP", quality=80),
    "resized 0.5x": lambda image: _resized(image, 0.5),
    "resized 2x": lambda image: _resized(image, 2.0),
    "cropped 4 px": lambda image: _cropped(image, 0, pixels=4),
    "cropped 2%": lambda image: _cropped(image, 0.02),
    "cropped 5%": lambda image: _cropped(image, 0.05),
    "cropped 10%": lambda image: _cropped(image, 0.10),
    "text watermark": _text_mark,
    "logo watermark": _logo_mark,
    "mirrored": lambda image: encoded(ImageOps.mirror(image), "JPEG", quality=90),
}


def file_hash(data: bytes) -> int:
    """The job's perceptual hash of an image file's bytes, as the scan takes it."""
    from pipeline.imaging import read_header
    from pipeline.perceptual import perceptual_hash

    with Image.open(io.BytesIO(data)) as image:
        header = read_header(image)
    return perceptual_hash(data, header.format, header.orientation)


def bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def copy_distances(images: list[Image.Image]) -> dict[str, list[int]]:
    """Edit -> the bits between each image (a PNG) and its edited copy."""
    originals = [file_hash(encoded(image)) for image in images]
    return {
        edit: [bits(h, file_hash(make(image))) for h, image in zip(originals, images, strict=True)]
        for edit, make in COPIES.items()
    }


def look_alike_distances(count: int) -> dict[str, list[int]]:
    """Kind -> the bits between every two of `count` different images of that kind (JPEGs)."""
    kinds = {
        "different scenes": [scene(100 + s) for s in range(count)],
        "one composition, other content": [scene(200 + s, layout=7) for s in range(count)],
        "near-flat gradients": [gradient(300 + s) for s in range(count)],
    }
    distances = {}
    for kind, images in kinds.items():
        hashes = [file_hash(encoded(image, "JPEG", quality=90)) for image in images]
        distances[kind] = [bits(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    return distances


if __name__ == "__main__":  # the table in docs/format.md: PYTHONPATH=. python tests/support/...
    for name, distances in {
        **{f"{e} (scenes)": d for e, d in copy_distances([scene(s) for s in range(30)]).items()},
        **{
            f"{e} (gradients)": d
            for e, d in copy_distances([gradient(s) for s in range(15)]).items()
        },
        **look_alike_distances(30),
    }.items():
        d = np.array(distances)
        within = " ".join(f"<={n}: {np.mean(d <= n):.0%}" for n in (2, 4, 6, 8))
        print(f"{name:44s} median {np.median(d):4.1f} min {d.min():2d} max {d.max():2d} {within}")
