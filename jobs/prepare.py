"""Prepare an image dataset for aspect-ratio-bucketed training: the job users run or submit.

    python jobs/prepare.py --input IMAGES --output OUT                  # embedded local Ray
    RAY_ADDRESS=ray://head:10001 python jobs/prepare.py ...             # join a running cluster
    ray job submit --working-dir . -- python jobs/prepare.py ...        # submit to a cluster
    ray submit cluster.yaml jobs/prepare.py -- --input s3://... --output s3://...

See docs/format.md for what OUT holds.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.buckets import METRICS, BucketConfig
from pipeline.cli import HelpFormatter
from pipeline.config import CROP_MODES, IMAGE_FORMATS, PrepareConfig, WriteOptions
from pipeline.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default is the configs' own."""
    config, buckets, write = PrepareConfig("", ""), BucketConfig(), WriteOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--input",
        help="image folder, URL (s3://, gs://), or .parquet/.csv listing; leave it out with --vae "
        "to add latents to a prepared OUT",
    )
    parser.add_argument("--output", required=True, help="folder or URL for the prepared dataset")
    group = parser.add_argument_group("buckets (the source's defaults: SD 1.x at 512x768)")
    group.add_argument(
        "--max-area", type=int, default=buckets.max_area, help="largest bucket area in pixels"
    )
    group.add_argument("--max-side", type=int, default=buckets.max_side, help="largest bucket side")
    group.add_argument(
        "--min-side", type=int, default=buckets.min_side, help="smallest bucket side"
    )
    group.add_argument(
        "--step", type=int, default=buckets.step, help="every bucket side is a multiple of this"
    )
    group.add_argument(
        "--square",
        type=int,
        default=buckets.square,
        help="side of the square bucket that is always present",
    )
    group.add_argument(
        "--no-upscale",
        action="store_true",
        default=buckets.no_upscale,
        help="kohya's bucket_no_upscale, on a fixed grid: never enlarge an image",
    )
    group.add_argument(
        "--metric",
        choices=sorted(METRICS),
        default=buckets.metric,
        help="how the nearest bucket's aspect is measured",
    )
    group.add_argument(
        "--max-log-aspect-error",
        type=float,
        default=buckets.max_log_aspect_error,
        help="drop images whose |log(bucket aspect / image aspect)| exceeds this",
    )
    group = parser.add_argument_group("images")
    group.add_argument(
        "--format",
        choices=IMAGE_FORMATS,
        default=write.image_format,
        help="how stored images are encoded",
    )
    group.add_argument(
        "--quality", type=int, default=write.quality, help="JPEG/WebP quality of stored images"
    )
    group.add_argument(
        "--crop",
        choices=CROP_MODES,
        default=write.crop,
        help="none: store each image with its overflow for a random crop at load "
        "time (the source's way); center/random: store it cropped",
    )
    group.add_argument(
        "--background",
        default=",".join(map(str, write.background)),
        help="R,G,B composited under transparency",
    )
    group.add_argument(
        "--max-upscale",
        type=float,
        default=config.max_upscale,
        help="reject images that must be enlarged more than this factor",
    )
    group.add_argument(
        "--max-crop",
        type=float,
        default=config.max_crop,
        help="reject images whose fit crops more than this share of their area",
    )
    group.add_argument(
        "--max-pixels",
        type=int,
        default=config.max_pixels,
        help="reject images with more pixels, before decoding them",
    )
    group = parser.add_argument_group("output")
    group.add_argument(
        "--samples-per-shard",
        type=int,
        default=config.samples_per_shard,
        help="images per tar (one bucket per tar)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=write.seed,
        help="seed of prepare-time random crops and of the epoch report",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=config.batch_size,
        help="per-rank batch size you will train with: shapes the epoch report",
    )
    group.add_argument(
        "--world-size",
        type=int,
        default=config.world_size,
        help="number of ranks you will train with: shapes the epoch report",
    )
    group.add_argument(
        "--incremental",
        action="store_true",
        default=config.incremental,
        help="add new and changed images to a complete OUT",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        default=config.overwrite,
        help="rebuild OUT from scratch",
    )
    group.add_argument(
        "--vae", default=config.vae,
        help="a diffusers AutoencoderKL folder (or a checkpoint with vae/): encode every stored "
        "image's latents too (pipeline/latents.py)",
    )  # fmt: skip
    group = parser.add_argument_group("ray")
    group.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="a running cluster to join ($RAY_ADDRESS); none: an embedded local Ray",
    )
    group.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs of the embedded local Ray (none: all of this machine's)",
    )
    group.add_argument(
        "--files-per-scan-task",
        type=int,
        default=config.files_per_scan_task,
        help="files whose headers one scan task reads",
    )
    group.add_argument("--max-in-flight", type=int, default=config.max_in_flight,
                       help="tasks submitted at once (none: two per cluster CPU)")  # fmt: skip
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[PrepareConfig | None, argparse.Namespace]:
    """The job's config; None when only latents are to be added (no --input, a --vae)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input is None:
        if not args.vae:
            parser.error("--input is required (only adding latents with --vae goes without)")
        return None, args
    try:
        config = PrepareConfig(
            input=args.input,
            output=args.output,
            buckets=BucketConfig(
                max_area=args.max_area, max_side=args.max_side, min_side=args.min_side,
                step=args.step, square=args.square, no_upscale=args.no_upscale, metric=args.metric,
                max_log_aspect_error=args.max_log_aspect_error,
            ),
            write=WriteOptions(
                image_format=args.format, quality=args.quality, crop=args.crop, seed=args.seed,
                background=tuple(int(v) for v in args.background.split(",")),
            ),
            max_upscale=args.max_upscale, max_crop=args.max_crop, max_pixels=args.max_pixels,
            samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
            world_size=args.world_size,
            incremental=args.incremental, overwrite=args.overwrite,
            files_per_scan_task=args.files_per_scan_task, max_in_flight=args.max_in_flight,
            vae=args.vae,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    from pipeline.latents import add_latents, vae_folder  # here: --help answers at once
    from pipeline.output import OutputDir
    from pipeline.sources import absolute, check_input, check_separate

    try:  # local mistakes are answered before Ray starts
        if config is not None:
            check_input(config.input)
            check_separate(config.input, config.output)
        if args.vae:
            vae_folder(args.vae)
    except UsageError as error:
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    import ray  # here, not at the top: --help and the checks above answer at once

    from pipeline.prepare import run
    from pipeline.report import summary

    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        # Ray turns token auth on for a new local cluster (it listens on every interface, not on
        # loopback only) and warns on every run that it did: keep the auth, drop the notice.
        # Not RAY_AUTH_MODE=token: `ray submit` lands here too, joining a cluster without auth.
        import logging

        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    out = OutputDir(absolute(args.output))
    try:
        manifest = add_latents(out, args.vae, args.max_in_flight) if config is None else run(config)
    except UsageError as error:  # a refused OUT, an input with nothing to prepare
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    print(summary(out.read_json(out.path("stats.json")), len(manifest.shards), out.uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
