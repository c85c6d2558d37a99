"""Real image files for tests, made with Pillow in the modes and shapes users have."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, PngImagePlugin


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


def datasets_parquet(
    path: Path, images: list[bytes | None], captions: list[str], row_group_size: int
) -> Path:
    """Images (None: a row without bytes) and captions as `datasets` writes an `Image` feature
    and a text column: `{bytes, path}` structs in `image`, the captions in `text`."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    structs = [{"bytes": data, "path": f"{i}.jpg"} for i, data in enumerate(images)]
    table = pa.table({"image": pa.array(structs, image_type), "text": captions})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def save(image: Image.Image, path: Path, format: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format, **options)
    return path


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(detailed(width, height, seed))


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG file's bytes, of `rgb(width, height, seed)`."""
    buffer = io.BytesIO()
    rgb(width, height, seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


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


QUADRANT_COLOURS = ((255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 255))  # TL, TR, BL, BR


def quadrants(width: int, height: int) -> Image.Image:
    """An image whose way up shows: red, green / blue, white quadrants."""
    pixels = np.empty((height, width, 3), np.uint8)
    top, left = height // 2, width // 2
    for (rows, columns), colour in zip(
        [
            (slice(0, top), slice(0, left)),
            (slice(0, top), slice(left, None)),
            (slice(top, None), slice(0, left)),
            (slice(top, None), slice(left, None)),
        ],
        QUADRANT_COLOURS,
        strict=True,
    ):
        pixels[rows, columns] = colour
    return Image.fromarray(pixels)


def quadrant_colours(image: Image.Image) -> list[tuple[int, ...]]:
    """The colour at the centre of each quadrant of `image`: TL, TR, BL, BR."""
    width, height = image.size
    points = [
        (width // 4, height // 4),
        (3 * width // 4, height // 4),
        (width // 4, 3 * height // 4),
        (3 * width // 4, 3 * height // 4),
    ]
    return [image.convert("RGB").getpixel(point) for point in points]


def stored_for(upright: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores so that applying EXIF `orientation` shows `upright`."""
    for transpose in [None, *Image.Transpose]:
        stored = upright if transpose is None else upright.transpose(transpose)
        shown = ImageOps.exif_transpose(tagged(stored, orientation))
        if np.array_equal(np.asarray(shown), np.asarray(upright)):
            return stored
    raise AssertionError(f"no transpose undoes orientation {orientation}")


def tagged(image: Image.Image, orientation: int) -> Image.Image:
    """A copy of `image` whose EXIF says `orientation` (for ImageOps.exif_transpose)."""
    tagged = image.copy()
    exif = tagged.getexif()
    exif[0x0112] = orientation
    tagged.info["exif"] = exif.tobytes()
    return tagged


def xmp_orientation(orientation: int) -> bytes:
    return (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description '
        b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="%d"/>'
        b"</rdf:RDF></x:xmpmeta>" % orientation
    )


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk bytes) of a PNG, in file order."""
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append((data[position + 4 : position + 8], data[position : position + 12 + length]))
        position += 12 + length
    return chunks


def oriented_file(kind: str, upright: Image.Image, orientation: int) -> bytes:
    """File bytes of `kind` whose metadata says `orientation` and which shows `upright`.

    Kinds: jpeg, png (eXIf before IDAT), png-late (eXIf after IDAT), tiff, webp, jpeg-xmp
    (orientation in XMP only), png-xmp.
    """
    stored = stored_for(upright, orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    if kind == "jpeg":
        stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    elif kind in ("png", "png-late"):
        stored.save(buffer, "PNG", exif=exif.tobytes())
    elif kind == "tiff":
        stored.save(buffer, "TIFF", exif=exif)
    elif kind == "webp":
        stored.save(buffer, "WEBP", lossless=True, exif=exif.tobytes())
    elif kind == "jpeg-xmp":
        stored.save(buffer, "JPEG", quality=95, xmp=xmp_orientation(orientation))
    elif kind == "png-xmp":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp_orientation(orientation).decode())
        stored.save(buffer, "PNG", pnginfo=info)
    else:
        raise ValueError(kind)
    data = buffer.getvalue()
    if kind == "png-late":  # move eXIf behind the image data
        chunks = png_chunks(data)
        exif_chunk = next(chunk for name, chunk in chunks if name == b"eXIf")
        rest = [chunk for name, chunk in chunks if name not in (b"eXIf", b"IEND")]
        data = data[:8] + b"".join(rest) + exif_chunk + chunks[-1][1]
    return data


def damaged_exif_jpeg(image: Image.Image) -> bytes:
    """A JPEG whose APP1 EXIF block is garbage; its pixels decode fine."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=b"Exif\x00\x00" + b"\x13\x37" * 40)
    return buffer.getvalue()
