"""Bucket resolutions and the assignment of images to them (aspect ratio bucketing).

Pure NumPy. The defaults reproduce the bucket list of NovelAI's post exactly; see
`generate_buckets` for the algorithm and `assign_buckets` for the argmin assignment.

Choices made here, with their reasons:

* Bucket order: ascending aspect ratio (width / height, tallest first), ties by ascending area.
  A stable order makes bucket ids comparable between runs, and neighbouring ids being
  neighbouring shapes lets the planner group leftovers of similar shape (see `plan.py`).
* Picking a bucket: the source's `argmin(abs(bucket_aspect - image_aspect))` by default
  (`metric="linear"`); `metric="log"` measures `abs(log(bucket_aspect / image_aspect))`
  instead, which treats an image and its transpose alike (NovelAI's later code does this).
  The two differ only for some images between two buckets: the linear one sends those to the
  lower-aspect (taller) neighbour, so an image and its transpose can get unmirrored buckets.
* Dropping images: judged by the log distance for either metric, so tall and wide images are
  treated alike. The source's linear error never exceeds 0.25 for tall images (the tallest
  bucket is 0.25) but grows without bound for wide ones, so its threshold of 4 drops wide
  images from 8:1 and never a tall one. The default here, ln 2, keeps an image while its aspect
  is within a factor of 2 of its bucket's: with the default buckets that is from 1:8 to 8:1,
  the source's effective limit, now on both sides. Images past it get `REJECT_ASPECT`.
* The reported `aspect_error` is always the source's linear `abs(bucket_aspect - image_aspect)`,
  the figure the post quotes (mean 0.033 per image), so reports stay comparable to it.
* No-upscale mode (kohya-ss's `--bucket_no_upscale`, on a fixed grid): the bucket list becomes
  every resolution whose sides are multiples of `step` within the side and area limits, and an
  image goes to the largest one that fits inside it once the image is shrunk (never enlarged)
  to those limits: each side floored to a multiple of `step`. So a bucket is never larger than
  its image in either side, and fitting only ever downscales and crops less than `step` pixels
  per side. An image with a side under `min_side` after that gets `REJECT_TOO_SMALL`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.cli import HelpFormatter, add_options, check, check_choices, option, parse

REJECT_ASPECT = -1
"""Bucket index of an image whose aspect ratio is too far from every bucket."""
REJECT_TOO_SMALL = -2
"""Bucket index of an image smaller than every bucket it could use without upscaling."""

DEFAULT_MAX_LOG_ASPECT_ERROR = math.log(2.0)

# Each metric is a monotone key on the aspect ratio; distance is the key's absolute difference.
METRICS = {
    "linear": lambda aspect: aspect,
    "log": np.log,
}


@dataclass(frozen=True)
class BucketConfig:
    """Bucket generation and assignment settings; defaults are the source's (SD 1.x, 512px).

    For larger models raise the limits together, e.g. SDXL-style 1024px training:
    `BucketConfig(max_area=1024 * 1024, max_side=2048, min_side=512, square=1024)`.
    """

    max_area: int = option(512 * 768, "largest bucket area in pixels")
    max_side: int = option(1024, "largest bucket side")
    min_side: int = option(256, "smallest bucket side")
    step: int = option(64, "every bucket side is a multiple of this")
    square: int = option(512, "side of the square bucket that is always present")
    no_upscale: bool = option(
        False, "kohya's bucket_no_upscale, on a fixed grid: never enlarge an image"
    )
    metric: str = option("linear", "how the nearest bucket's aspect is measured", tuple(METRICS))
    max_log_aspect_error: float = option(
        DEFAULT_MAX_LOG_ASPECT_ERROR,
        "drop images whose |log(bucket aspect / image aspect)| exceeds this",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        sides = ("max_area", "max_side", "min_side", "step", "square")
        check(
            self,
            {
                name: (_positive_integer(getattr(self, name)), "must be a positive integer")
                for name in sides
            },
        )
        check(
            self,
            {
                name: (
                    getattr(self, name) % self.step == 0,
                    f"must be a multiple of --step ({self.step})",
                )
                for name in ("max_side", "min_side", "square")
            },
        )
        check(
            self,
            {
                "min_side": (
                    self.min_side <= self.max_side,
                    f"exceeds --max-side ({self.max_side})",
                ),
                "max_area": (
                    self.min_side**2 <= self.max_area,
                    f"is below --min-side squared ({self.min_side**2}): no bucket fits",
                ),
                "square": (
                    self.min_side <= self.square <= self.max_side
                    and self.square**2 <= self.max_area,
                    "is outside the side or area limits",
                ),
                "max_log_aspect_error": (self.max_log_aspect_error >= 0, "must be >= 0"),  # NaN too
            },
        )


# Each model family's grid: the bucket step is the VAE's downscale times the denoiser's patch,
# areas ~1 MP from SDXL on. docs/techniques.md's table gives each number with its source.
MEGAPIXEL = {"max_area": 1024 * 1024, "max_side": 2048, "min_side": 512, "square": 1024}
MODEL_GRIDS: dict[str, dict[str, int]] = {
    "sd": {},  # SD 1.x: the source's grid, BucketConfig's defaults (19 buckets)
    "sdxl": MEGAPIXEL | {"step": 64},  # U-Net: VAE f8 x 3 downsamples (33 buckets)
    "sd3": MEGAPIXEL | {"step": 16},  # transformer: VAE f8 x patch 2 (129 buckets)
    "flux": MEGAPIXEL | {"step": 16},  # the same for Flux.1
}


def model_grid(model: str, **overrides: object) -> BucketConfig:
    """The bucket settings of a model family (`MODEL_GRIDS`), with `overrides` taking
    precedence: what `--model` gives and explicit bucket flags change."""
    if model not in MODEL_GRIDS:
        raise ValueError(f"--model must be one of {', '.join(MODEL_GRIDS)}, got {model}")
    return BucketConfig(**(MODEL_GRIDS[model] | overrides))


def _positive_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


class Assignment(NamedTuple):
    """Buckets (B, 2) of (width, height); per image its bucket index (or a REJECT_* code)
    and the source's linear aspect error to that bucket (NaN where no bucket fits)."""

    buckets: np.ndarray
    index: np.ndarray
    aspect_error: np.ndarray


def generate_buckets(config: BucketConfig | None = None) -> np.ndarray:
    """Bucket resolutions as an int64 array (B, 2) of (width, height), sorted by aspect.

    The source's algorithm: for width from min_side to max_side in steps, take the largest
    height (a multiple of step, at most max_side, at least min_side) with width * height <=
    max_area; add those pairs and their transposes, remove duplicates, add the square.
    In no-upscale mode: every (width, height) on the step grid within the same limits.
    """
    config = config or BucketConfig()
    sides = range(config.min_side, config.max_side + 1, config.step)
    pairs = {(config.square, config.square)}
    for width in sides:
        if config.no_upscale:
            heights = [h for h in sides if width * h <= config.max_area]
        else:
            tallest = min(config.max_side, config.max_area // width // config.step * config.step)
            heights = [tallest] if tallest >= config.min_side else []
        for height in heights:
            pairs.update({(width, height), (height, width)})
    return np.array(sorted(pairs, key=lambda wh: (wh[0] / wh[1], wh[0] * wh[1])), dtype=np.int64)


def bucket_aspects(buckets: np.ndarray) -> np.ndarray:
    """Aspect ratio (width / height) of each bucket, float64 (B,)."""
    return buckets[:, 0] / buckets[:, 1]


def _image_sizes(widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sizes = []
    for name, values in (("widths", widths), ("heights", heights)):
        array = np.asarray(values)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{name} must be a 1-D numeric array, got shape {array.shape}")
        if not np.all(array > 0):  # False for NaN too
            bad = array[~(array > 0)][0]
            raise ValueError(f"{name} must be positive numbers, found {bad!r}")
        sizes.append(array)
    if sizes[0].shape != sizes[1].shape:
        raise ValueError(f"widths and heights differ in length: {len(sizes[0])} != {len(sizes[1])}")
    return sizes[0], sizes[1]


def _per_chunk(kernel, widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run `kernel(widths, heights) -> (index, aspect_error)` over cache-sized slices.

    Whole-column temporaries cost more in page faults than in arithmetic at 10M images; slices
    of 64K keep every temporary in cache and reuse the same few small buffers.
    """
    index = np.empty(len(widths), dtype=np.int64)
    aspect_error = np.empty(len(widths), dtype=np.float64)
    for start in range(0, len(widths), 1 << 16):
        part = slice(start, start + (1 << 16))
        index[part], aspect_error[part] = kernel(widths[part], heights[part])
    return index, aspect_error


def _reject_too_far(
    index: np.ndarray,
    bucket_aspect: np.ndarray,
    image_aspect: np.ndarray,
    max_log_aspect_error: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Mark images beyond the log-distance threshold; pair the index with the linear error."""
    with np.errstate(invalid="ignore"):  # NaN bucket aspects: already rejected as too small
        too_far = np.abs(np.log(bucket_aspect / image_aspect)) > max_log_aspect_error
    return np.where(too_far, REJECT_ASPECT, index), np.abs(bucket_aspect - image_aspect)


def assign_buckets(
    widths: np.ndarray,
    heights: np.ndarray,
    buckets: np.ndarray,
    max_log_aspect_error: float = DEFAULT_MAX_LOG_ASPECT_ERROR,
    metric: str = "linear",
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest bucket by aspect ratio for each image: (bucket_index int64 (N,), aspect_error).

    Equal to `argmin(distance(bucket_aspects, image_aspect))` per image (first index on ties),
    computed with a binary search over the bucket aspects (which must be sorted, as
    `generate_buckets` returns them) instead of an (N, B) distance matrix.
    Images whose log aspect distance exceeds `max_log_aspect_error` get `REJECT_ASPECT`.
    `aspect_error` is the source's `abs(bucket_aspect - image_aspect)` for every image.
    """
    widths, heights = _image_sizes(widths, heights)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if not max_log_aspect_error >= 0:
        raise ValueError(f"max_log_aspect_error must be >= 0, got {max_log_aspect_error!r}")
    buckets = np.asarray(buckets)
    if buckets.ndim != 2 or buckets.shape[1] != 2 or len(buckets) == 0 or np.any(buckets <= 0):
        raise ValueError(
            f"buckets must be a non-empty (B, 2) array of positive sizes, got {buckets.shape}"
        )
    aspects = bucket_aspects(buckets)
    if np.any(np.diff(aspects) < 0):
        raise ValueError("buckets must be sorted by aspect ratio, as generate_buckets returns them")
    key = METRICS[metric]
    bucket_keys = key(aspects)
    first_of_run = np.searchsorted(bucket_keys, bucket_keys, side="left")
    last = len(aspects) - 1

    def nearest(widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image_aspect = widths / heights
        image_key = key(image_aspect)
        # The nearest key is one of the two neighbours of the image's insertion point. On a tie
        # argmin takes the lower index: the left neighbour, or the first of a run of equal keys.
        right = np.minimum(np.searchsorted(bucket_keys, image_key), last)
        left = np.maximum(right - 1, 0)
        nearer_left = np.abs(bucket_keys[left] - image_key) <= np.abs(
            bucket_keys[right] - image_key
        )
        index = first_of_run[np.where(nearer_left, left, right)]
        return _reject_too_far(index, aspects[index], image_aspect, max_log_aspect_error)

    return _per_chunk(nearest, widths, heights)


def assign_no_upscale(
    widths: np.ndarray, heights: np.ndarray, config: BucketConfig
) -> tuple[np.ndarray, np.ndarray]:
    """No-upscale assignment into `generate_buckets(config)` (which must be the no-upscale grid).

    Returns (bucket_index int64 (N,), aspect_error float64 (N,)); see the module docstring.
    """
    if not config.no_upscale:
        raise ValueError("assign_no_upscale needs a config with no_upscale=True")
    widths, heights = _image_sizes(widths, heights)
    buckets = generate_buckets(config)
    aspects = np.append(bucket_aspects(buckets), np.nan)  # index -1: no bucket
    step = config.step
    grid = np.full((config.max_side // step + 1,) * 2, -1, dtype=np.int64)
    grid[buckets[:, 0] // step, buckets[:, 1] // step] = np.arange(len(buckets))

    def largest_inside(widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, h = widths.astype(np.float64), heights.astype(np.float64)
        shrink = np.minimum(
            np.minimum(1.0, np.sqrt(config.max_area / (w * h))), config.max_side / np.maximum(w, h)
        )
        # 1e-9 absorbs float error where the shrunk side is an exact multiple of step.
        bucket_w = np.floor(w * shrink / step + 1e-9).astype(np.int64) * step
        bucket_h = np.floor(h * shrink / step + 1e-9).astype(np.int64) * step
        over_area = bucket_w * bucket_h > config.max_area  # the tolerance can overshoot a step
        shrink_width = over_area & (bucket_w >= bucket_h)
        bucket_w -= step * shrink_width
        bucket_h -= step * (over_area & ~shrink_width)
        too_small = (bucket_w < config.min_side) | (bucket_h < config.min_side)
        index = np.where(too_small, -1, grid[bucket_w // step, bucket_h // step])
        index, aspect_error = _reject_too_far(
            index, aspects[index], w / h, config.max_log_aspect_error
        )
        return np.where(too_small, REJECT_TOO_SMALL, index), aspect_error

    return _per_chunk(largest_inside, widths, heights)


def bucketize(
    widths: np.ndarray, heights: np.ndarray, config: BucketConfig | None = None
) -> Assignment:
    """Generate the buckets of `config` and assign every image to one: the call the job makes."""
    config = config or BucketConfig()
    if config.no_upscale:
        index, aspect_error = assign_no_upscale(widths, heights, config)
        return Assignment(generate_buckets(config), index, aspect_error)
    buckets = generate_buckets(config)
    index, aspect_error = assign_buckets(
        widths, heights, buckets, config.max_log_aspect_error, config.metric
    )
    return Assignment(buckets, index, aspect_error)


def main(argv: list[str] | None = None) -> None:
    """Print the bucket table of a configuration (`python -m pipeline.buckets --help`)."""
    parser = argparse.ArgumentParser(description=main.__doc__, formatter_class=HelpFormatter)
    add_options(parser, BucketConfig)
    (config,) = parse(parser, argv, BucketConfig)
    buckets = generate_buckets(config)
    print(f"{len(buckets)} buckets\n  id  width height  aspect")
    for bucket_id, ((width, height), aspect) in enumerate(
        zip(buckets, bucket_aspects(buckets), strict=True)
    ):
        print(f"{bucket_id:4d} {width:6d} {height:6d} {aspect:7.3f}")


if __name__ == "__main__":
    main()
