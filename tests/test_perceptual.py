"""The perceptual hash (pipeline/perceptual.py) on near copies of real-looking images: what
docs/format.md's table says --near-dedup catches at its default distance, and that different
images which look alike stay far apart. On a subset of the documented images (the whole table:
`PYTHONPATH=. python tests/support/near_copies.py`)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from images import stored_for, tagged
from near_copies import (
    COPIES,
    bits,
    copy_distances,
    encoded,
    file_hash,
    gradient,
    look_alike_distances,
    scene,
)
from PIL import Image

from pipeline.config import DEFAULT_NEAR_DEDUP_DISTANCE as DISTANCE

CAUGHT = [  # edits whose copies of every scene are within the default distance
    "jpeg q95",
    "jpeg q75",
    "jpeg q50",
    "webp q80",
    "resized 0.5x",
    "resized 2x",
    "cropped 4 px",
    "text watermark",
    "logo watermark",
]
MISSED = ["cropped 5%", "cropped 10%", "mirrored"]  # beyond it for every image


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[int]]:
    return copy_distances([scene(seed) for seed in range(8)])


@pytest.fixture(scope="module")
def gradients() -> dict[str, list[int]]:
    return copy_distances([gradient(seed) for seed in range(5)])


@pytest.mark.parametrize("edit", CAUGHT)
def test_re_encodes_resizes_small_crops_and_watermarks_of_a_scene_are_caught(scenes, edit):
    assert max(scenes[edit]) <= DISTANCE


@pytest.mark.parametrize("edit", CAUGHT[:7])
def test_copies_of_near_flat_images_move_at_most_a_bit_past_it(gradients, edit):
    assert max(gradients[edit]) <= DISTANCE + 1  # docs: 73-100% within, 5 bits at most


@pytest.mark.parametrize("edit", MISSED)
def test_crops_of_five_percent_and_more_and_mirror_images_are_missed(scenes, gradients, edit):
    assert min(scenes[edit] + gradients[edit]) > DISTANCE


def test_a_two_percent_crop_is_caught_within_twice_the_distance(scenes):
    assert max(scenes["cropped 2%"]) <= 2 * DISTANCE + 1  # docs: 9 bits at most


def test_different_images_that_look_alike_are_far_apart():
    for kind, distances in look_alike_distances(10).items():
        assert min(distances) > 4 * DISTANCE, kind  # docs: 17 bits at least


def test_every_format_and_mode_hashes_as_the_same_picture():
    picture = scene(3)
    reference = file_hash(encoded(picture))
    copies = {
        "jpeg": encoded(picture, "JPEG", quality=90),
        "webp": encoded(picture, "WEBP", quality=90),
        "tiff": encoded(picture, "TIFF"),
        "bmp": encoded(picture, "BMP"),
        "rgba png": encoded(picture.convert("RGBA")),
        "grey png": encoded(picture.convert("L")),
        "16-bit png": encoded(Image.fromarray(np.asarray(picture.convert("L"), np.uint16) * 257)),
    }
    assert {name: bits(reference, file_hash(data)) for name, data in copies.items()} == {
        name: pytest.approx(0, abs=2) for name in copies
    }


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_rotated_photo_hashes_as_shown(orientation):
    upright = scene(5)
    stored = tagged(stored_for(upright, orientation), orientation)
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=90, exif=stored.info["exif"])
    assert bits(file_hash(buffer.getvalue()), file_hash(encoded(upright))) <= 1


def test_the_copies_cover_the_edits_the_docs_name():
    assert set(CAUGHT + MISSED + ["cropped 2%"]) == set(COPIES)
