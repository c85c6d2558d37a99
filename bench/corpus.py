"""A generated image corpus that looks like real fine-tuning data, for the prepare benchmarks.

Classes, as a wallpaper-and-clip-art collection has them: 4K photos as baseline and progressive
JPEGs (a fifth progressive), WebP photos, CMYK and ICC-tagged (Display P3) JPEGs, LZW TIFFs,
clip-art PNGs around 1.3 MP (RGBA, palette + tRNS, grey + alpha), a dozen PNGs over 100 MP of
one aspect ratio (they land in one bucket: one shard, before work was balanced by cost), and
optionally PNGs over 600 MP. Photos have detail at every scale (a 1/f spectrum) plus sensor
grain; big PNGs are smooth colour fields with faint grain, half of them with alpha, which
libvips decodes at ~12 ns a pixel (the real 168 MP wallpapers this corpus stands for: ~10).
Files are made once into a folder per class and kept between runs.
"""

from __future__ import annotations

import io
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHOTO_SIZES = [(3840, 2160), (4000, 3000), (3000, 4000), (2560, 1440), (3264, 2448)]
BIG_PNG_SIZE = (12000, 9000)  # 108 MP, 4:3: one bucket
HUGE_PNG_SIZE = (25000, 25000)  # 625 MP


def photo(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A photo-like RGB image: layered noise at four scales and grain."""
    rng = np.random.default_rng(seed)
    width, height = size or PHOTO_SIZES[seed % len(PHOTO_SIZES)]
    image = np.zeros((height, width, 3), np.float32)
    for scale, amplitude in ((96, 80.0), (24, 40.0), (6, 16.0), (2, 6.0)):
        small = rng.normal(0, 1, (height // scale + 1, width // scale + 1, 3)).astype(np.float32)
        layer = Image.fromarray(np.clip(small * 40 + 128, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        image += (np.asarray(layer, np.float32) - 128) * (amplitude / 40)
    return Image.fromarray(np.clip(image + 128, 0, 255).astype(np.uint8))


def clip_art(seed: int) -> Image.Image:
    """RGBA clip art around 1.3 MP: antialiased shapes in flat colours on transparency."""
    rng = np.random.default_rng(seed)
    width, height = [(1400, 950), (1000, 1300), (1200, 1200), (1600, 900)][seed % 4]
    canvas = Image.new("RGBA", (width * 2, height * 2), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for _ in range(40):
        x, y = rng.integers(0, width * 2, 2)[0], rng.integers(0, height * 2)
        r = int(rng.integers(40, 500))
        colour = (*(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(160, 256)))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r, x + r, y + r // 2), fill=colour, outline=(0, 0, 0, 255), width=6)
    art = np.asarray(canvas.resize((width, height), Image.Resampling.LANCZOS), np.float32)
    shading = np.asarray(photo(seed, (width, height)).convert("L"), np.float32) / 255  # soft light
    grain = rng.normal(0, 3, (height, width, 1)).astype(np.float32)
    art[..., :3] = art[..., :3] * (0.7 + 0.5 * shading[..., None]) + grain
    return Image.fromarray(np.clip(art, 0, 255).astype(np.uint8), "RGBA")


def _save_photo(args: tuple[Path, int, str]) -> Path:
    folder, seed, kind = args
    extension = {"webp": "webp", "tiff": "tif"}.get(kind, "jpg")
    path = folder / f"{kind}-{seed:04d}.{extension}"
    if path.exists():
        return path
    image = photo(seed)
    if kind == "progressive":
        image.save(path, quality=90, progressive=True)
    elif kind == "webp":
        image.save(path, quality=85, method=4)
    elif kind == "tiff":
        image.save(path, compression="tiff_lzw")
    elif kind == "cmyk":
        image.convert("CMYK").save(path, quality=90)
    elif kind == "icc":
        _save_p3(image, path)
    else:
        image.save(path, quality=90)
    return path


def _save_p3(image: Image.Image, path: Path) -> None:
    """A JPEG in Display P3 with its profile embedded (libvips ships the profile)."""
    import pyvips

    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    source = pyvips.Image.new_from_buffer(buffer.getvalue(), "")
    source.icc_transform("p3", input_profile="srgb", embedded=False).jpegsave(
        str(path), Q=90, keep="icc"
    )


def _save_clip_art(args: tuple[Path, int]) -> Path:
    folder, seed = args
    kind = ("rgba", "palette", "la")[seed % 3]
    path = folder / f"clipart-{kind}-{seed:04d}.png"
    if path.exists():
        return path
    art = clip_art(seed)
    if kind == "palette":  # palette with a transparent index, as GIF-era clip art has
        alpha = np.asarray(art)[..., 3]
        quantised = art.convert("RGB").quantize(63)
        indices = np.asarray(quantised).copy()
        indices[alpha < 128] = 63
        palette = [*quantised.getpalette()[: 63 * 3], 0, 0, 0]
        paletted = Image.fromarray(indices, "P")
        paletted.putpalette(palette)
        paletted.save(path, transparency=63)
    elif kind == "la":
        art.convert("LA").save(path)
    else:
        art.save(path)
    return path


def _save_big_png(args: tuple[Path, int, tuple[int, int]]) -> Path:
    """A big PNG streamed by libvips (never whole in memory): smooth colour and grain."""
    import pyvips

    folder, seed, (width, height) = args
    alpha = seed % 2 == 0
    path = folder / f"big-{width}x{height}-{seed:02d}{'-rgba' if alpha else ''}.png"
    if path.exists():
        return path
    fields = [
        pyvips.Image.perlin(width // 8, height // 8, cell_size=64, seed=seed * 4 + b)
        for b in range(4 if alpha else 3)
    ]
    base = (fields[0].bandjoin(fields[1:]) * 120 + 128).resize(8, kernel="linear")
    grain = pyvips.Image.gaussnoise(base.width, base.height, sigma=1, mean=0, seed=seed)
    image = (base + grain).cast("uchar").copy(interpretation="srgb")
    temporary = path.with_suffix(".tmp.png")
    image.pngsave(str(temporary), compression=6)
    temporary.rename(path)
    return path


CLASSES = {  # name -> (count at scale 1, how to make file number i in folder)
    "jpeg": (48, lambda folder, i: (_save_photo, (folder, i, "baseline"))),
    "progressive": (12, lambda folder, i: (_save_photo, (folder, i, "progressive"))),
    "webp": (12, lambda folder, i: (_save_photo, (folder, i, "webp"))),
    "cmyk": (3, lambda folder, i: (_save_photo, (folder, i, "cmyk"))),
    "icc": (3, lambda folder, i: (_save_photo, (folder, i, "icc"))),
    "tiff": (4, lambda folder, i: (_save_photo, (folder, i, "tiff"))),
    "png": (30, lambda folder, i: (_save_clip_art, (folder, i))),
    "png-100mp": (12, lambda folder, i: (_save_big_png, (folder, i, BIG_PNG_SIZE))),
    "png-600mp": (1, lambda folder, i: (_save_big_png, (folder, i, HUGE_PNG_SIZE))),
}


def _make(job) -> Path:
    function, args = job
    return function(args)


def make_corpus(root: Path, scale: float = 1.0, huge: bool = True) -> dict[str, list[Path]]:
    """Every class's files under root/CLASS/ (made if missing); class -> sorted paths."""
    jobs, classes = [], []
    for name, (count, job) in CLASSES.items():
        if name == "png-600mp" and not huge:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(max(1, round(count * scale))):
            jobs.append(job(root / name, i))
            classes.append(name)
    with Pool(min(2, os.cpu_count() or 1)) as pool:  # big PNGs take GBs each to generate
        paths = pool.map(_make, jobs, chunksize=1)
    corpus: dict[str, list[Path]] = {}
    for name, path in zip(classes, paths, strict=True):
        corpus.setdefault(name, []).append(path)
    return corpus
