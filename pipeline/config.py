"""The prepare job's settings: frozen dataclasses, each validated once, whose fields are the
job's command line too (pipeline/job.py derives it: pipeline/cli.py).

Kept free of Ray, of the stages and of pyvips, so that `jobs/prepare.py --help` and a mistake
in a setting are answered at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from pipeline.buckets import MODEL_GRIDS, BucketConfig
from pipeline.cli import REQUIRED, check, check_choices, option
from pipeline.format import FORMAT_VERSION
from trainer.augment import CaptionOptions

# A guard against decompression bombs, checked from the header before any decoding. libvips
# streams PNG and TIFF, so a worker's memory does not grow with the pixel count (a 625 MP PNG
# peaks at 0.2 GB): gigapixel scans and panoramas pass.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 1_000_000_000
DEFAULT_NEAR_DEDUP_DISTANCE = 4  # bits of dHash: docs/format.md's measurements
MAX_NEAR_DEDUP_DISTANCE = 16  # 17 substrings of 3-4 bits: the search is nearly pairwise beyond
DEFAULT_BACKGROUND = (255, 255, 255)  # white under transparency: what viewers and sites show
IMAGE_FORMATS = ("jpg", "png", "webp")  # how stored images are encoded: imaging.ENCODERS
CROP_MODES = ("none", "center", "random")  # imaging.CROPS


# The job's --help lists its options in these groups (pipeline/job.py)
BUCKETS = "buckets (--model's grid; sd: the source's, 512x768)"
IMAGES, OUTPUT, RAY = "images", "output", "ray"
TEXT = "text-encoder cache (--pretrained; pipeline/text_cache.py)"
TEXT_DTYPES = ("bf16", "fp16")  # bf16: T5's activations overflow fp16 (docs/format.md)


@dataclass(frozen=True)
class WriteOptions:
    """How every kept image is stored."""

    image_format: str = option(
        "jpg", "how stored images are encoded", IMAGE_FORMATS, flag="format", group=IMAGES
    )
    quality: int = option(95, "JPEG/WebP quality of stored images", group=IMAGES)
    crop: str = option(
        "none",
        "none: store each image with its overflow for a random crop at load time (the source's "
        "way); center/random: store it cropped",
        CROP_MODES,
        group=IMAGES,
    )
    seed: int = option(  # image `key` is cropped with an rng seeded by (seed, key)
        0, "seed of prepare-time random crops and of the epoch report", group=OUTPUT
    )
    background: tuple[int, ...] = option(
        DEFAULT_BACKGROUND, "R,G,B composited under transparency", group=IMAGES
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check(
            self,
            {
                "quality": (1 <= self.quality <= 100, "must be in 1..100"),
                "background": (
                    len(self.background) == 3 and all(0 <= c <= 255 for c in self.background),
                    "must be R,G,B, each in 0..255",
                ),
            },
        )


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Everything a prepare run needs; validated once, here."""

    input: str = option(
        "",
        "image folder, URL (s3://, gs://), or .parquet/.csv listing; leave it out with --vae "
        "to add latents to a prepared OUT",
    )
    output: str = option(REQUIRED, "folder or URL for the prepared dataset")
    model: str = option(
        "sd",
        "the model family to prepare for: its bucket grid (docs/techniques.md), which the bucket "
        "options below override",
        tuple(MODEL_GRIDS),
        group=BUCKETS,
    )
    buckets: BucketConfig = field(default_factory=BucketConfig, metadata={"group": BUCKETS})
    write: WriteOptions = field(default_factory=WriteOptions)
    max_upscale: float = option(
        2.0, "reject images that must be enlarged more than this factor", group=IMAGES
    )
    max_crop: float = option(
        0.5, "reject images whose fit crops more than this share of their area", group=IMAGES
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS, "reject images with more pixels, before decoding them", group=IMAGES
    )
    dedup: bool = option(
        True,
        "reject exact duplicates (the same bytes, hashed in the scan): the first by path is "
        "kept, or the copy OUT holds",
        group=IMAGES,
    )
    near_dedup: bool = option(
        False,
        "reject near duplicates (re-encodes, resizes, small crops, watermarks: a perceptual hash "
        "taken in the scan, which costs a small decode of every image): the one with the most "
        "pixels, then bytes, then the first by path is kept, or the one OUT holds",
        group=IMAGES,
    )
    near_dedup_distance: int = option(
        DEFAULT_NEAR_DEDUP_DISTANCE,
        "with --near-dedup, the most bits of 64 two images' hashes may differ by to be near "
        "duplicates (docs/format.md: what each distance catches; the search slows as it grows)",
        group=IMAGES,
    )
    caption_field: str = option(
        "",
        "the field JSON captions are read from (.json sidecars, metadata.jsonl); empty: the "
        "first of text, caption, tags",
        group=IMAGES,
    )
    image_column: str = option(
        "image",
        "the image column of Parquet inputs (a datasets.Image struct or binary)",
        group=IMAGES,
    )
    caption_column: str = option(
        "",
        "the caption column of Parquet inputs; empty: the first of text, caption",
        group=IMAGES,
    )
    samples_per_shard: int = option(1000, "images per tar (one bucket per tar)", group=OUTPUT)
    batch_size: int = option(  # for the trainer and the epoch report; not part of the output
        32, "per-rank batch size you will train with: shapes the epoch report", group=OUTPUT
    )
    world_size: int = option(
        1, "number of ranks you will train with: shapes the epoch report", group=OUTPUT
    )
    incremental: bool = option(False, "add new and changed images to a complete OUT", group=OUTPUT)
    overwrite: bool = option(False, "rebuild OUT from scratch", group=OUTPUT)
    vae: str = option(
        "",
        "a diffusers AutoencoderKL folder (or a checkpoint with vae/): encode every stored "
        "image's latents too (pipeline/latents.py)",
        group=OUTPUT,
    )
    pretrained: str = option(
        "",
        "a diffusers checkpoint folder: latents from its vae/ (as --vae) and text-encoder "
        "outputs of every caption by --model's recipe from its text_encoder*/ and tokenizer*/",
        group=TEXT,
    )
    text_dtype: str = option(
        "bf16", "how cached text-encoder outputs are stored", TEXT_DTYPES, group=TEXT
    )
    max_sequence_length: int | None = option(
        None, "T5 tokens encoded (sd3, flux; none: diffusers' default, 256 and 512)", group=TEXT
    )
    caption_variants: int = option(
        0,
        "cache N variants of each caption, the trainer's tag augmentations below (seeded by "
        "--seed, the variant and the caption), and the empty caption; 0: the caption alone",
        group=TEXT,
    )
    tags: CaptionOptions = field(default_factory=CaptionOptions)
    files_per_scan_task: int = option(
        500,
        "files whose headers each of the first scan tasks reads; later tasks are sized from the "
        "time those took",
        group=RAY,
    )
    max_in_flight: int | None = option(
        None, "tasks submitted at once (none: two per cluster CPU)", group=RAY
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check(
            self,
            {
                "input": (
                    bool(self.input or self.vae or self.pretrained),
                    "is required (only adding latents or text with --vae, --pretrained goes "
                    "without)",
                ),
                "vae": (
                    not (self.vae and self.pretrained),
                    "and --pretrained exclude each other (--pretrained takes CKPT/vae)",
                ),
                "max_sequence_length": (
                    self.max_sequence_length is None or self.max_sequence_length >= 1,
                    "must be >= 1",
                ),
                "caption_variants": (
                    self.caption_variants >= (1 if self.tags.active else 0),
                    "must be >= 1 with --shuffle-tags or --tag-dropout (and >= 0)",
                ),
                "max_upscale": (self.max_upscale >= 1, "must be >= 1"),
                "max_crop": (0 <= self.max_crop <= 1, "must be in [0, 1]"),
                "max_pixels": (self.max_pixels >= 1, "must be >= 1"),
                "near_dedup_distance": (
                    0 <= self.near_dedup_distance <= MAX_NEAR_DEDUP_DISTANCE,
                    f"must be in 0..{MAX_NEAR_DEDUP_DISTANCE}",
                ),
                "samples_per_shard": (self.samples_per_shard >= 1, "must be >= 1"),
                "batch_size": (self.batch_size >= 1, "must be >= 1"),
                "world_size": (self.world_size >= 1, "must be >= 1"),
                "files_per_scan_task": (self.files_per_scan_task >= 1, "must be >= 1"),
                "max_in_flight": (
                    self.max_in_flight is None or self.max_in_flight >= 1,
                    "must be >= 1",
                ),
                "incremental": (
                    not (self.incremental and self.overwrite),
                    "and --overwrite exclude each other",
                ),
            },
        )

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
        } | {  # left out at their defaults: an OUT prepared before them keeps its settings
            name: value
            for name, value, default in (
                ("model", self.model, "sd"),
                ("dedup", self.dedup, True),
                ("near_dedup", self.near_dedup, False),
                (
                    "near_dedup_distance",
                    self.near_dedup_distance if self.near_dedup else None,
                    None,
                ),
                ("caption_field", self.caption_field, ""),
                ("image_column", self.image_column, "image"),
                ("caption_column", self.caption_column, ""),
            )
            if value != default
        }


def fingerprint(value: object) -> str:
    """16 hex digits of a JSON-able value: names shards and inputs."""
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=8).hexdigest()
