"""Fitting an image to its bucket: the resize size and the crop box (the source's way).

Plain rescaling to the bucket would distort the image, so it is scaled keeping its aspect
until it covers the bucket, one side exactly the bucket's and the other equal or larger, and
the overflowing side is then cropped, at random in training or centred. Pure NumPy.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def fit(
    width: ArrayLike, height: ArrayLike, bucket_w: ArrayLike, bucket_h: ArrayLike
) -> tuple[int, int] | tuple[np.ndarray, np.ndarray]:
    """Size (scaled_w, scaled_h) that keeps the image's aspect and just covers the bucket.

    Works on ints or on arrays (broadcast). The side that needs the larger scale factor becomes
    exactly the bucket's; the other is rounded to the nearest pixel, which can never fall short
    of the bucket's side since the exact value is already at least that integer.
    """
    values = (width, height, bucket_w, bucket_h)
    scalars = all(isinstance(v, (int, np.integer)) for v in values)
    if scalars:  # plain ints for one image: a loader calls this per sample
        w, h, bw, bh = (int(v) for v in values)
        positive = min(w, h, bw, bh) > 0
    else:
        w, h, bw, bh = (np.asarray(v, dtype=np.int64) for v in values)
        positive = all(np.all(v > 0) for v in (w, h, bw, bh))
    if not positive:
        raise ValueError("width, height, bucket_w and bucket_h must all be positive")
    width_binds = bw * h >= bh * w  # bw / w >= bh / h, compared exactly in integers
    rounded_w = (2 * w * bh + h) // (2 * h)  # round(w * bh / h)
    rounded_h = (2 * h * bw + w) // (2 * w)  # round(h * bw / w)
    if scalars:
        return (bw, rounded_h) if width_binds else (rounded_w, bh)
    return np.where(width_binds, bw, rounded_w), np.where(width_binds, rounded_h, bh)


def fit_measures(
    width: np.ndarray, height: np.ndarray, bucket_w: np.ndarray, bucket_h: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(upscale factor, share of the area the crop removes) of fitting each image (N,) to its
    bucket: what the job's limits check and what its report summarises."""
    width = np.asarray(width, dtype=np.int64)
    if not len(width):
        return np.zeros(0), np.zeros(0)
    scaled_w, scaled_h = fit(width, height, bucket_w, bucket_h)
    area = np.asarray(bucket_w, np.int64) * np.asarray(bucket_h, np.int64)
    return scaled_w / width, 1.0 - area / (scaled_w * scaled_h)


def crop_box(
    scaled_w: int,
    scaled_h: int,
    bucket_w: int,
    bucket_h: int,
    rng: np.random.Generator | bytes | None = None,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a bucket-sized crop, as Pillow's `Image.crop` takes it.

    Random offsets along the overflow when `rng` is given (the source's random crop), else
    centred. `rng` is a Generator or a random digest of at least 16 bytes (two uniform 64-bit
    draws): a keyed hash seeds a crop per sample in a microsecond, a Generator takes 80. The
    overflow is usually under 32 pixels, so the crop removes little.
    """
    overflow_x, overflow_y = scaled_w - bucket_w, scaled_h - bucket_h
    if overflow_x < 0 or overflow_y < 0:
        raise ValueError(
            f"image {scaled_w}x{scaled_h} does not cover bucket {bucket_w}x{bucket_h}: fit it first"
        )
    if rng is None:
        left, top = overflow_x // 2, overflow_y // 2
    elif isinstance(rng, bytes):
        left = int.from_bytes(rng[:8], "little") % (overflow_x + 1)
        top = int.from_bytes(rng[8:16], "little") % (overflow_y + 1)
    else:
        left, top = (int(v) for v in rng.integers(0, (overflow_x + 1, overflow_y + 1)))
    return left, top, left + bucket_w, top + bucket_h
