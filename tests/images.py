"""Real image files for tests, made with Pillow in the modes and shapes users have."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def detailed(width: int, height: int, seed: int = 0) -> np.ndarray:
    """RGB pixels with gradients and noise: compresses like a photo, not like a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / (7 + seed % 5)),
            127 + 100 * np.cos(y / 11),
            127 + 100 * np.sin((x + y) / 17),
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def save(image: Image.Image, path: Path, format: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format, **options)
    return path


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(detailed(width, height, seed))


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    """JPEG bytes of `image` stored as is, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def all_modes(folder: Path) -> dict[str, Path]:
    """One file per mode users have, each a bit different in size; name -> path."""
    files = {}
    files["rgb.jpg"] = save(rgb(900, 600, 1), folder / "rgb.jpg", quality=90)
    rgba = rgb(640, 960, 2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((640, 960)))
    files["rgba.png"] = save(rgba, folder / "rgba.png")
    palette = rgb(700, 700, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    files["palette.png"] = save(palette, folder / "palette.png", transparency=0)
    files["la.png"] = save(rgb(500, 800, 4).convert("LA"), folder / "la.png")
    files["gray.png"] = save(rgb(800, 500, 5).convert("L"), folder / "gray.png")
    files["cmyk.jpg"] = save(rgb(1000, 750, 6).convert("CMYK"), folder / "cmyk.jpg", quality=90)
    sixteen = (detailed(600, 900, 7)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    files["gray16.png"] = save(Image.fromarray(sixteen), folder / "gray16.png")
    files["photo.webp"] = save(rgb(1200, 800, 8), folder / "photo.webp", quality=85)
    files["scan.bmp"] = save(rgb(600, 800, 9), folder / "scan.bmp")
    frames = [rgb(640, 480, 10 + i).convert("P") for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    files["anim.gif"] = folder / "anim.gif"
    files["print.tiff"] = save(rgb(768, 1024, 11), folder / "print.tiff")
    rotated = folder / "phone.jpg"  # stored landscape 1200x900, shown portrait (orientation 6)
    rotated.write_bytes(with_orientation(rgb(1200, 900, 12), 6))
    files["phone.jpg"] = rotated
    files["wide.png"] = save(rgb(2048, 512, 13), folder / "wide.png")
    files["tall.jpg"] = save(rgb(300, 1100, 14), folder / "tall.jpg", quality=90)
    files["small.jpg"] = save(rgb(300, 300, 15), folder / "small.jpg", quality=90)
    return files
