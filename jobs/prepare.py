"""Prepare an image dataset for aspect-ratio-bucketed training: the job users run or submit.

    python jobs/prepare.py --input IMAGES --output OUT                  # embedded local Ray
    RAY_ADDRESS=ray://head:10001 python jobs/prepare.py ...             # join a running cluster
    ray job submit --working-dir . -- python jobs/prepare.py ...        # submit to a cluster
    ray submit cluster.yaml jobs/prepare.py -- --input s3://... --output s3://...

See docs/format.md for what OUT holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ray

from pipeline.buckets import METRICS, BucketConfig
from pipeline.imaging import CROPS, ENCODERS
from pipeline.prepare import PrepareConfig, run
from pipeline.scan import DEFAULT_MAX_PIXELS
from pipeline.shard_writer import WriteOptions


def parse_args(argv: list[str] | None = None) -> tuple[PrepareConfig, argparse.Namespace]:
    bucket_defaults, write_defaults = BucketConfig(), WriteOptions()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", required=True, help="image folder, URL (s3://, gs://), or .parquet/.csv listing"
    )
    parser.add_argument("--output", required=True, help="folder or URL for the prepared dataset")
    buckets = parser.add_argument_group("buckets")
    buckets.add_argument("--max-area", type=int, default=bucket_defaults.max_area)
    buckets.add_argument("--max-side", type=int, default=bucket_defaults.max_side)
    buckets.add_argument("--min-side", type=int, default=bucket_defaults.min_side)
    buckets.add_argument("--step", type=int, default=bucket_defaults.step)
    buckets.add_argument("--square", type=int, default=bucket_defaults.square)
    buckets.add_argument(
        "--no-upscale", action="store_true", help="kohya's bucket_no_upscale, on a fixed grid"
    )
    buckets.add_argument("--metric", choices=sorted(METRICS), default=bucket_defaults.metric)
    buckets.add_argument(
        "--max-log-aspect-error", type=float, default=bucket_defaults.max_log_aspect_error,
        help="drop images whose |log(bucket aspect / image aspect)| exceeds this (default ln 2)",
    )  # fmt: skip
    images = parser.add_argument_group("images")
    images.add_argument("--format", choices=sorted(ENCODERS), default=write_defaults.image_format)
    images.add_argument("--quality", type=int, default=write_defaults.quality)
    images.add_argument(
        "--crop", choices=sorted(CROPS), default=write_defaults.crop,
        help="none: store the fitted image with its overflow for a random crop at load time",
    )  # fmt: skip
    images.add_argument(
        "--background",
        default=",".join(map(str, write_defaults.background)),
        help="R,G,B under transparency",
    )
    images.add_argument("--max-upscale", type=float, default=2.0)
    images.add_argument(
        "--max-crop", type=float, default=0.5, help="largest share of area a fit may crop"
    )
    images.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    layout = parser.add_argument_group("output")
    layout.add_argument("--samples-per-shard", type=int, default=1000)
    layout.add_argument("--seed", type=int, default=write_defaults.seed)
    layout.add_argument(
        "--batch-size", type=int, default=32, help="recorded for the trainer and the epoch report"
    )
    layout.add_argument(
        "--world-size", type=int, default=1, help="recorded for the trainer and the epoch report"
    )
    layout.add_argument(
        "--incremental", action="store_true", help="add new and changed images to a complete OUT"
    )
    layout.add_argument("--overwrite", action="store_true", help="rebuild OUT from scratch")
    cluster = parser.add_argument_group("ray")
    cluster.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="default: $RAY_ADDRESS, else local",
    )
    cluster.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray"
    )
    cluster.add_argument("--files-per-scan-task", type=int, default=500)
    cluster.add_argument("--max-in-flight", type=int, default=None)
    args = parser.parse_args(argv)
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
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        manifest = run(config)
    except ValueError as error:  # a refused OUT: say why, no traceback
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
