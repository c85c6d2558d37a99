"""The prepare job's settings: one frozen dataclass, validated once; the CLI takes its defaults.

Kept free of Ray, of the stages and of pyvips, so that `jobs/prepare.py --help` and a mistake
in a setting are answered at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from pipeline.buckets import BucketConfig
from pipeline.output import FORMAT_VERSION

# A guard against decompression bombs, checked from the header before any decoding. libvips
# streams PNG and TIFF, so a worker's memory does not grow with the pixel count (a 625 MP PNG
# peaks at 0.2 GB): gigapixel scans and panoramas pass.
DEFAULT_MAX_PIXELS = 1_000_000_000
DEFAULT_BACKGROUND = (255, 255, 255)  # white under transparency: what viewers and sites show
IMAGE_FORMATS = ("jpg", "png", "webp")  # how stored images are encoded: imaging.ENCODERS
CROP_MODES = ("none", "center", "random")  # imaging.CROPS


@dataclass(frozen=True)
class WriteOptions:
    image_format: str = "jpg"  # one of IMAGE_FORMATS
    quality: int = 95
    crop: str = "none"  # one of CROP_MODES: "none" keeps the overflow for the loader
    seed: int = 0  # random crops: image `key` is cropped with rng seeded by (seed, key)
    background: tuple[int, int, int] = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}"
            )
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0..255, got {self.background!r}")


@dataclass(frozen=True)
class PrepareConfig:
    """Everything a prepare run needs; validated once, here."""

    input: str  # directory, URL, or .parquet/.csv listing
    output: str  # directory or URL of the prepared dataset
    buckets: BucketConfig = field(default_factory=BucketConfig)
    write: WriteOptions = field(default_factory=WriteOptions)
    max_upscale: float = 2.0  # reject images that must be enlarged by more than this factor
    max_crop: float = 0.5  # reject images whose fit crops more than this share of their area
    max_pixels: int = DEFAULT_MAX_PIXELS  # reject larger images before decoding them
    samples_per_shard: int = 1000
    batch_size: int = 32  # for the trainer and the epoch report; not part of the output
    world_size: int = 1
    incremental: bool = False  # update a complete dataset with new or changed images
    overwrite: bool = False  # rebuild OUT from scratch, whatever it holds
    vae: str = ""  # a diffusers AutoencoderKL folder: latents of every image (pipeline/latents.py)
    files_per_scan_task: int = 500
    max_in_flight: int | None = None  # tasks submitted at once; default 2 per cluster CPU

    def __post_init__(self) -> None:
        checks = {
            "max_upscale": self.max_upscale >= 1,
            "max_crop": 0 <= self.max_crop <= 1,
            "max_pixels": self.max_pixels >= 1,
            "samples_per_shard": self.samples_per_shard >= 1,
            "batch_size": self.batch_size >= 1,
            "world_size": self.world_size >= 1,
            "files_per_scan_task": self.files_per_scan_task >= 1,
            "max_in_flight": self.max_in_flight is None or self.max_in_flight >= 1,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")
        if self.incremental and self.overwrite:
            raise ValueError("incremental and overwrite exclude each other")

    def settings(self) -> dict:
        """The settings that shape the output: OUT is rebuilt when one of them changes."""
        return {
            "format_version": FORMAT_VERSION,
            "buckets": dataclasses.asdict(self.buckets),
            "write": dataclasses.asdict(self.write) | {"background": list(self.write.background)},
            "max_upscale": self.max_upscale,
            "max_crop": self.max_crop,
            "max_pixels": self.max_pixels,
            "samples_per_shard": self.samples_per_shard,
        }


def fingerprint(value: object) -> str:
    """16 hex digits of a JSON-able value: names shards and inputs."""
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=8).hexdigest()
