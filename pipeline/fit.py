"""Fitting an image to its bucket: the resize size and the crop box (the source's way).

Plain rescaling to the bucket would distort the image, so it is scaled keeping its aspect
until it covers the bucket, one side exactly the bucket's and the other equal or larger, and
the overflowing side is then cropped, at random in training or centred. Pure NumPy.
"""

from __future__ import annotations

import numpy as np


def fit(width, height, bucket_w, bucket_h):
    """Size (scaled_w, scaled_h) that keeps the image's aspect and just covers the bucket.

    Works on ints or on arrays (broadcast). The side that needs the larger scale factor becomes
    exactly the bucket's; the other is rounded to the nearest pixel, which can never fall short
    of the bucket's side since the exact value is already at least that integer.
    """
    w, h, bw, bh = (np.asarray(v, dtype=np.int64) for v in (width, height, bucket_w, bucket_h))
    if np.any(w <= 0) or np.any(h <= 0) or np.any(bw <= 0) or np.any(bh <= 0):
        raise ValueError("width, height, bucket_w and bucket_h must all be positive")
    width_binds = bw * h >= bh * w  # bw / w >= bh / h, compared exactly in integers
    scaled_w = np.where(width_binds, bw, (2 * w * bh + h) // (2 * h))  # round(w * bh / h)
    scaled_h = np.where(width_binds, (2 * h * bw + w) // (2 * w), bh)  # round(h * bw / w)
    if scaled_w.ndim == 0:
        return int(scaled_w), int(scaled_h)
    return scaled_w, scaled_h


def crop_box(
    scaled_w: int,
    scaled_h: int,
    bucket_w: int,
    bucket_h: int,
    rng: np.random.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a bucket-sized crop, as Pillow's `Image.crop` takes it.

    Random offsets along the overflow when `rng` is given (the source's random crop), else
    centred. The overflow is usually under 32 pixels, so the crop removes little.
    """
    overflow_x, overflow_y = scaled_w - bucket_w, scaled_h - bucket_h
    if overflow_x < 0 or overflow_y < 0:
        raise ValueError(
            f"image {scaled_w}x{scaled_h} does not cover bucket {bucket_w}x{bucket_h}: fit it first"
        )
    if rng is None:
        left, top = overflow_x // 2, overflow_y // 2
    else:
        left, top = (int(v) for v in rng.integers(0, (overflow_x + 1, overflow_y + 1)))
    return left, top, left + bucket_w, top + bucket_h
