"""Orientation metadata in every format that carries it: scan and writer agree, pixels upright.

Each file shows the same upright picture (red, green / blue, white quadrants) through its
format's orientation metadata; the prepared sample must show it upright, at the size the index
records, in the bucket of that size.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from conftest import SMALL_BUCKETS
from images import (
    QUADRANT_COLOURS,
    damaged_exif_jpeg,
    oriented_file,
    quadrant_colours,
    quadrants,
    stored_for,
)
from PIL import Image

from pipeline.config import PrepareConfig
from pipeline.prepare import run

pytestmark = pytest.mark.usefixtures("local_ray")

UPRIGHT = quadrants(120, 80)  # fits SMALL_BUCKETS' 96x64 exactly: no crop
HONOURED = [
    (kind, orientation) for kind in ("jpeg", "png", "tiff", "webp") for orientation in (2, 3, 6, 8)
] + [("jpeg-xmp", 6), ("png-xmp", 8)]
EXTENSIONS = {
    "jpeg": "jpg",
    "jpeg-xmp": "jpg",
    "png": "png",
    "png-late": "png",
    "png-xmp": "png",
    "tiff": "tif",
    "webp": "webp",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orientation")
    images = folder / "images"
    images.mkdir()
    for kind, orientation in [*HONOURED, ("png-late", 6)]:
        name = f"{kind}-{orientation}.{EXTENSIONS[kind]}"
        (images / name).write_bytes(oriented_file(kind, UPRIGHT, orientation))
    (images / "damaged-exif.jpg").write_bytes(damaged_exif_jpeg(UPRIGHT))
    run(PrepareConfig(input=str(images), output=str(folder / "out"), buckets=SMALL_BUCKETS))
    rows = pq.read_table(folder / "out" / "index.parquet").to_pylist()
    return folder / "out", {row["source"]: row for row in rows}


def stored_image(out, row) -> Image.Image:
    with open(out / row["shard"], "rb") as tar:
        tar.seek(row["image_offset"])
        return Image.open(io.BytesIO(tar.read(row["image_size"]))).convert("RGB")


def close(colours, expected) -> bool:
    return all(
        abs(a - b) <= 40
        for got, want in zip(colours, expected, strict=True)
        for a, b in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("kind, orientation", HONOURED)
def test_stored_upright_at_the_size_the_index_records(prepared, kind, orientation):
    out, rows = prepared
    row = rows[f"{kind}-{orientation}.{EXTENSIONS[kind]}"]
    assert (row["width"], row["height"]) == UPRIGHT.size
    assert (row["bucket_width"], row["bucket_height"]) == (96, 64)
    image = stored_image(out, row)
    assert image.size == (row["stored_width"], row["stored_height"]) == (96, 64)
    assert close(quadrant_colours(image), QUADRANT_COLOURS), quadrant_colours(image)


def test_a_png_exif_chunk_after_the_image_data_is_ignored(prepared):
    out, rows = prepared
    row = rows["png-late-6.png"]
    stored = stored_for(UPRIGHT, 6)  # shown as stored: the PNG spec puts eXIf before IDAT
    assert (row["width"], row["height"]) == stored.size
    image = stored_image(out, row)
    assert image.size == (row["stored_width"], row["stored_height"])
    expected = quadrant_colours(stored.resize(image.size))
    assert close(quadrant_colours(image), expected)


def test_damaged_exif_costs_the_metadata_not_the_image(prepared):
    out, rows = prepared
    row = rows["damaged-exif.jpg"]
    assert (row["width"], row["height"]) == UPRIGHT.size
    assert close(quadrant_colours(stored_image(out, row)), QUADRANT_COLOURS)
    assert "EXIF" in row["note"]
