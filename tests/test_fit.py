"""Fitting an image to its bucket: cover the bucket keeping aspect, then crop the overflow."""

import hashlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.buckets import bucketize
from pipeline.fit import crop_box, fit

sides = st.integers(min_value=1, max_value=20_000)
bucket_sides = st.integers(min_value=1, max_value=2048)


@given(sides, sides, bucket_sides, bucket_sides)
def test_fit_covers_the_bucket_with_one_side_exact(width, height, bucket_w, bucket_h):
    scaled_w, scaled_h = fit(width, height, bucket_w, bucket_h)
    assert scaled_w >= bucket_w and scaled_h >= bucket_h, "never a pixel short"
    # One side is the bucket's; the other is its exact scaled size rounded to the nearest pixel.
    width_exact = scaled_w == bucket_w and abs(scaled_h - height * bucket_w / width) <= 0.5
    height_exact = scaled_h == bucket_h and abs(scaled_w - width * bucket_h / height) <= 0.5
    assert width_exact or height_exact


@given(st.lists(st.tuples(sides, sides, bucket_sides, bucket_sides), min_size=1, max_size=30))
def test_fit_on_arrays_equals_fit_per_image(rows):
    widths, heights, bucket_ws, bucket_hs = np.array(rows).T
    scaled_w, scaled_h = fit(widths, heights, bucket_ws, bucket_hs)
    assert list(zip(scaled_w.tolist(), scaled_h.tolist(), strict=True)) == [
        fit(*row) for row in rows
    ]


def test_fit_examples():
    assert fit(1024, 1024, 512, 512) == (512, 512)
    assert fit(1000, 1500, 512, 768) == (512, 768)
    assert fit(1920, 1080, 1024, 576) == (1024, 576)
    assert fit(4000, 3000, 704, 512) == (704, 528)  # width binds, height overflows 16 px
    assert fit(100, 300, 256, 1024) == (341, 1024)  # upscaling when the image is small


def test_fit_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="positive"):
        fit(0, 10, 64, 64)


@given(sides, sides, bucket_sides, bucket_sides, st.integers(0, 2**32))
def test_crop_box_is_bucket_sized_and_inside_the_image(width, height, bucket_w, bucket_h, seed):
    scaled_w, scaled_h = fit(width, height, bucket_w, bucket_h)
    digest = hashlib.blake2b(str(seed).encode(), digest_size=16).digest()
    for rng in (None, np.random.default_rng(seed), digest):
        left, top, right, bottom = crop_box(scaled_w, scaled_h, bucket_w, bucket_h, rng)
        assert (right - left, bottom - top) == (bucket_w, bucket_h)
        assert left >= 0 and right <= scaled_w and top >= 0 and bottom <= scaled_h


def test_crop_box_centre_and_random():
    assert crop_box(532, 512, 512, 512) == (10, 0, 522, 512)
    lefts = {crop_box(532, 512, 512, 512, np.random.default_rng(s))[0] for s in range(200)}
    assert lefts == set(range(21)), "every offset of the overflow is reachable"
    digests = [hashlib.blake2b(bytes([s]), digest_size=16).digest() for s in range(200)]
    assert {crop_box(532, 512, 512, 512, d)[0] for d in digests} == set(range(21))
    assert {crop_box(512, 540, 512, 512, d)[1] for d in digests} == set(range(29))
    first = crop_box(600, 700, 512, 512, np.random.default_rng(7))
    assert first == crop_box(600, 700, 512, 512, np.random.default_rng(7)), "seeded"


def test_crop_box_refuses_an_image_smaller_than_the_bucket():
    with pytest.raises(ValueError, match="fit it first"):
        crop_box(500, 512, 512, 512)


def test_typical_crop_is_small():
    """The post: crops usually remove fewer than 32 pixels. Photos and screens hold to it."""
    widths = np.array([4000, 3000, 1920, 1080, 2048, 1536, 3024, 4032, 1200, 800])
    heights = np.array([3000, 4000, 1080, 1920, 1536, 2048, 4032, 3024, 800, 1200])
    assignment = bucketize(widths, heights)
    bucket_w, bucket_h = assignment.buckets[assignment.index].T
    scaled_w, scaled_h = fit(widths, heights, bucket_w, bucket_h)
    overflow = np.maximum(scaled_w - bucket_w, scaled_h - bucket_h)
    assert np.all(overflow < 32), overflow
