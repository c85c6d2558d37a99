"""What the loader does to each sample, decided in the trainer's process from the index alone:
the crop of the overflow, the flip, the caption's tags, and SDXL's size and crop conditioning.

Everything is deterministic in (seed, epoch, key, copy): a rerun or a resume sees the same
pixels and captions, and each epoch new ones. `copy` numbers the repeats of an image within an
epoch (several datasets with repeats: trainer/mixture.py), so that repeats differ; it is 0, and
left out of the seeds, for an image seen once. Pure Python and NumPy: no I/O, no torch.

Conditioning follows diffusers' SDXL training: `original_size` is the source's (height, width)
after EXIF orientation; `target_size` the bucket's (height, width); `crop_top_left` the (top,
left) of the delivered window in the source scaled to cover the bucket, measured after the flip
(diffusers flips the resized image, then crops). A window is always exactly that crop, for every
path: a stored image with its overflow cropped here; one cropped by the prepare job (`--crop`,
its offset is in the index); a catch-all member re-fitted to its batch's bucket (the stored
image scaled to the source's cover size for that bucket). One exception: a catch-all member
whose stored image the prepare job cropped holds only its own bucket's window of the source, so
re-fitted to another bucket it is a zoomed window; its crop_top_left is then measured in the
fitted source scaled by that zoom.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import NamedTuple

from pipeline.cli import check, option
from pipeline.fit import crop_box, fit

TAGS = "caption tags (kohya-ss's augmentations)"  # the trainer's --help group of these options


@dataclass(frozen=True)
class CaptionOptions:
    """kohya-ss's caption augmentations, on comma-separated tags (trainer/config.py's Config
    takes these fields and their options)."""

    shuffle_tags: bool = option(
        False, "shuffle each caption's comma-separated tags every epoch", group=TAGS
    )
    keep_tokens: int = option(0, "the first N tags stay in place and are never dropped", group=TAGS)
    tag_dropout: float = option(0.0, "drop each other tag with this probability", group=TAGS)

    def __post_init__(self) -> None:
        check(
            self,
            {
                "keep_tokens": (self.keep_tokens >= 0, "must be >= 0"),
                "tag_dropout": (0 <= self.tag_dropout < 1, "must be in [0, 1)"),
            },
        )

    @property
    def active(self) -> bool:
        return self.shuffle_tags or self.tag_dropout > 0


def _seed_text(seed: int, epoch: int, key: str, copy: int) -> str:
    return f"{seed}:{epoch}:{key}" + (f":{copy}" if copy else "")


def caption(text: str, options: CaptionOptions, seed: int, epoch: int, key: str, copy: int = 0):
    """`text` with its tags shuffled and dropped as `options` say, kept tokens first."""
    if not options.active or not text:
        return text
    tags = [tag.strip() for tag in text.split(",")]
    kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens :]
    digest = hashlib.blake2b(f"tags:{_seed_text(seed, epoch, key, copy)}".encode(), digest_size=8)
    rng = random.Random(int.from_bytes(digest.digest(), "little"))
    if options.tag_dropout:
        rest = [tag for tag in rest if rng.random() >= options.tag_dropout]
    if options.shuffle_tags:
        rng.shuffle(rest)
    return ", ".join(kept + rest)


class View(NamedTuple):
    """How one sample is cut from its stored image, and what SDXL is told of it."""

    size: tuple[int, int]  # (width, height) the stored image is fitted to: itself, or re-fitted
    crop: tuple[int, int]  # (left, top) of the window in it
    flip: bool  # mirrored left to right after the crop
    original_size: tuple[int, int]  # (height, width) of the source
    crop_top_left: tuple[int, int]  # (top, left) in the fitted source, after the flip
    target_size: tuple[int, int]  # (height, width) of the bucket


def view(
    stored: tuple[int, int],
    stored_bucket: tuple[int, int],
    bucket: tuple[int, int],
    original: tuple[int, int],
    prepare_crop: tuple[int, int],
    seed: int,
    epoch: int,
    key: str,
    copy: int = 0,
    flip_probability: float = 0.0,
    grid: int = 1,
) -> View:
    """The view of one sample: sizes are (width, height), `stored_bucket` the bucket the image
    was prepared for, `bucket` the one its batch asks for, `prepare_crop` the (left, top) of the
    stored image in its fitted source (the index's crop_left, crop_top). `grid` 8: a window of
    cached latents, its offsets on the latent grid of the stored image (its own bucket only)."""
    seeded = _seed_text(seed, epoch, key, copy)
    bucket_w, bucket_h = bucket
    scaled_w, scaled_h = fit(*stored, bucket_w, bucket_h)  # == stored in its own bucket
    if (scaled_w, scaled_h) != tuple(stored) and not any(prepare_crop):
        # Re-fitted straight to the source's cover size: the window is then exactly a crop of
        # the source fitted to `bucket` (fitting the stored size could round a pixel apart).
        scaled_w, scaled_h = fit(*original, bucket_w, bucket_h)
    digest = hashlib.blake2b(seeded.encode(), digest_size=16).digest()
    if grid > 1:  # the latents cover the stored image cut to the grid from its top-left
        cells = crop_box(
            scaled_w // grid, scaled_h // grid, bucket_w // grid, bucket_h // grid, digest
        )
        left, top = cells[0] * grid, cells[1] * grid
    else:
        left, top = crop_box(scaled_w, scaled_h, bucket_w, bucket_h, digest)[:2]
    flip = flip_probability > 0 and _uniform(f"flip:{seeded}") < flip_probability
    # The fitted source at this scale: the prepare job's fit, scaled as the stored image is.
    fitted_w = fit(*original, *stored_bucket)[0]
    scale_w, scale_h = scaled_w / stored[0], scaled_h / stored[1]
    source_left = round(prepare_crop[0] * scale_w) + left
    source_top = round(prepare_crop[1] * scale_h) + top
    if flip:
        source_left = round(fitted_w * scale_w) - bucket_w - source_left
    return View(
        (scaled_w, scaled_h),
        (left, top),
        flip,
        original[::-1],
        (source_top, source_left),
        bucket[::-1],
    )


def _uniform(text: str) -> float:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64
