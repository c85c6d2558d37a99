"""The prepare job at scale: 10k, 100k and 1M ordinary small JPEGs, against baselines measured in
the same run.

    python bench/scale_bench.py                                 # 10k and 100k small JPEGs, ~25 min
    python bench/scale_bench.py --sizes 10000 1000000 --tiny    # 1M thumbnails, ~30 min
    python bench/scale_bench.py --sizes 10000 --ray-data        # and a plain Ray Data pipeline
                                                  # (pip install -e '.[bench]': Ray Data's needs)
    python bench/scale_bench.py --sizes 100000 --shapes files parquet tars
                                                  # the same images in Parquet files and tars

The corpus costs no disk: 24 distinct photo-like JPEGs (512x384 to 800x600, each with a .txt
caption) hard-linked under N names in folders of 1,000, made once into --workdir. `--tiny` makes
them 128x96-class thumbnails with buckets to match, so that a million fit in half an hour here.
`--shapes` adds the same N images as Parquet files of 10,000 rows in row groups of 100 (as
`datasets` writes images: `{bytes, path}` structs and a text column) and as WebDataset tars of
10,000 samples; these cost their bytes on disk, written once.

For each N, the job as users run it (jobs/prepare.py, an embedded local Ray of --cpus CPUs,
default settings, --batch-size 32 --world-size 8), but --no-dedup: the hard links are copies of
24 files, which the content check would reject but for 24 (its cost on distinct files:
bench/inputs_bench.py). Watched from /proc every second:
- images/s over the whole job, and over its fit stage (stats.json's stage timings);
- utilisation during fit: CPU seconds of all the job's processes / (CPUs x the stage's wall);
- peak RSS of the driver and of the largest worker (and its PSS: the object store's shared
  pages counted once);
- the per-core ratio: the job's images/s per CPU against one core running the bare engine loop
  (libvips thumbnail to the bucket + JPEG q95, nothing else), and the whole job against the naive
  one-process Pillow loop (open, RGB, Lanczos, centre crop, q95), both timed here on a sample of
  the same files.
Then the largest corpus's listing by the job against one process walking it alone, the scan's
files/s per CPU, throughput at the largest N against the smallest, and the driver's bytes per
image between them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyvips
from corpus import photo
from PIL import Image
from processes import watch

from pipeline.buckets import BucketConfig, bucketize
from pipeline.fit import crop_box, fit
from pipeline.imaging import encode

ROOT = Path(__file__).resolve().parent.parent
SMALL_SIZES = [
    (512, 384),
    (384, 512),
    (640, 480),
    (480, 640),
    (600, 600),
    (768, 512),
    (512, 768),
    (800, 600),
]
DISTINCT = 24
TINY_BUCKETS = BucketConfig(max_area=96 * 128, max_side=256, min_side=64, step=32, square=96)
BASELINE_SAMPLE = 480  # files timed for the one-core loops (the corpus repeats 24 files)


def distinct_files(workdir: Path, tiny: bool) -> list[Path]:
    folder = workdir / ("distinct-tiny" if tiny else "distinct")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(DISTINCT):
        width, height = SMALL_SIZES[i % len(SMALL_SIZES)]
        size = (width // 4, height // 4) if tiny else (width, height)
        path = folder / f"{i:02d}.jpg"
        if not path.exists():
            photo(i, size).save(path, quality=90)
            path.with_suffix(".txt").write_text(f"a photo, number {i}, {size[0]}x{size[1]}")
        files.append(path)
    return files


def corpus(workdir: Path, count: int, tiny: bool) -> Path:
    """count images (and their captions) as hard links to the distinct files."""
    folder = workdir / f"{'tiny' if tiny else 'jpeg'}-{count}"
    marker = workdir / f"{folder.name}.complete"
    if marker.exists():
        return folder
    files = distinct_files(workdir, tiny)
    start = time.perf_counter()
    for i in range(count):
        sub = folder / f"{i // 1000:05d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        image = files[i % DISTINCT]
        for source, suffix in ((image, ".jpg"), (image.with_suffix(".txt"), ".txt")):
            target = sub / f"{i:08d}{suffix}"
            if not target.exists():
                os.link(source, target)
    marker.touch()
    print(f"made {folder} ({count:,} images) in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


ROWS_PER_FILE = 10_000  # of the Parquet and tar shapes
ROW_GROUP = 100  # rows: what `datasets` writes for images


def packed_corpus(workdir: Path, count: int, tiny: bool, shape: str) -> Path:
    """The corpus's images and captions as Parquet files or tars of ROWS_PER_FILE, made once,
    a row group (or a sample) at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset

    folder = workdir / f"{shape}-{'tiny' if tiny else 'jpeg'}-{count}"
    marker = workdir / f"{folder.name}.complete"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    files = distinct_files(workdir, tiny)
    images = [path.read_bytes() for path in files]
    captions = [path.with_suffix(".txt").read_text() for path in files]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    start = time.perf_counter()
    for first in range(0, count, ROWS_PER_FILE):
        rows = range(first, min(count, first + ROWS_PER_FILE))
        if shape == "tars":
            with webdataset.TarWriter(str(folder / f"{first // ROWS_PER_FILE:05d}.tar")) as sink:
                for i in rows:
                    sink.write(
                        {
                            "__key__": f"{i:08d}",
                            "jpg": images[i % DISTINCT],
                            "txt": captions[i % DISTINCT],
                        }
                    )
            continue
        schema = pa.schema([("image", image_type), ("text", pa.string())])
        name = folder / f"train-{first // ROWS_PER_FILE:05d}.parquet"
        with pq.ParquetWriter(name, schema) as writer:
            for group in range(rows.start, rows.stop, ROW_GROUP):
                numbers = range(group, min(rows.stop, group + ROW_GROUP))
                structs = [{"bytes": images[i % DISTINCT], "path": f"{i:08d}.jpg"} for i in numbers]
                texts = [captions[i % DISTINCT] for i in numbers]
                writer.write_table(
                    pa.table({"image": pa.array(structs, image_type), "text": texts}, schema=schema)
                )
    marker.touch()
    print(f"made {folder} ({count:,} images) in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def bucket_config(tiny: bool) -> BucketConfig:
    return TINY_BUCKETS if tiny else BucketConfig()


def buckets_of(files: list[Path], config: BucketConfig) -> list[tuple[int, int]]:
    sizes = np.array([Image.open(path).size for path in files])
    buckets, index, _ = bucketize(sizes[:, 0], sizes[:, 1], config)
    return [tuple(int(v) for v in buckets[i]) for i in index]


def bare_engine(path: Path, bucket: tuple[int, int]) -> bytes:
    image = pyvips.Image.thumbnail(str(path), bucket[0], height=bucket[1], crop="centre")
    return image.jpegsave_buffer(Q=95)


def naive(path: Path, bucket: tuple[int, int]) -> bytes:
    image = Image.open(path).convert("RGB")
    scaled = image.resize(fit(*image.size, *bucket), Image.Resampling.LANCZOS)
    return encode(scaled.crop(crop_box(*scaled.size, *bucket)))


def per_image_ms(function, files: list[Path], buckets: list[tuple[int, int]]) -> float:
    """CPU milliseconds of one core per image, best of three passes over a sample."""
    sample = [(files[i % len(files)], buckets[i % len(files)]) for i in range(BASELINE_SAMPLE)]
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for path, bucket in sample:
            function(path, bucket)
        best = min(best, time.process_time() - start)
    return 1000 * best / len(sample)


def bucket_flags(config: BucketConfig) -> list[str]:
    return [
        f"--max-area={config.max_area}",
        f"--max-side={config.max_side}",
        f"--min-side={config.min_side}",
        f"--step={config.step}",
        f"--square={config.square}",
    ]


def run_job(folder: Path, cpus: int, tiny: bool) -> dict:
    output = folder.parent / f"out-{folder.name}"
    command = [
        sys.executable,
        str(ROOT / "jobs" / "prepare.py"),
        "--input",
        str(folder),
        "--output",
        str(output),
        "--overwrite",
        f"--num-cpus={cpus}",
        "--batch-size=32",
        "--world-size=8",
        "--no-dedup",
        *bucket_flags(bucket_config(tiny)),
    ]
    watched = watch(command)
    if watched.returncode:
        raise RuntimeError(f"the job failed ({watched.returncode}): {watched.stderr[-3000:]}")
    stats = json.loads((output / "stats.json").read_text())
    stages = stats.get("stages", {})
    fit_stage = stages.get("fit")
    if fit_stage:
        start, seconds = fit_stage["started"], fit_stage["seconds"]
    else:  # a job without stage timings: the whole run
        start, seconds = watched.times[0], watched.seconds
    return {
        "images": stats["images"],
        "seconds": watched.seconds,
        "fit_seconds": seconds,
        "busy": watched.busy(start, start + seconds) / cpus,
        "driver_rss": watched.driver_rss,
        "worker_rss": watched.worker_rss,
        "worker_pss": watched.worker_pss,
        "peak_pss": watched.peak_pss,
        "stages": stages,
    }


def ray_data_child(folder: str, output: str, cpus: int, tiny: bool) -> None:
    """What a Ray user would write for the same job: read the files, fit with Pillow, group by
    bucket, write tars of 1,000 samples with webdataset's TarWriter."""
    import ray
    import webdataset

    from pipeline.buckets import assign_buckets, generate_buckets

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    buckets = generate_buckets(bucket_config(tiny))

    def fit_row(row: dict) -> dict:
        image = Image.open(io.BytesIO(row["bytes"])).convert("RGB")
        index, _ = assign_buckets(np.array([image.width]), np.array([image.height]), buckets)
        bucket = tuple(int(v) for v in buckets[index[0]])
        scaled = image.resize(fit(*image.size, *bucket), Image.Resampling.LANCZOS)
        jpeg = encode(scaled.crop(crop_box(*scaled.size, *bucket)))
        caption = Path(row["path"]).with_suffix(".txt").read_text()
        return {
            "key": Path(row["path"]).stem,
            "bucket": f"{bucket[0]}x{bucket[1]}",
            "jpg": jpeg,
            "txt": caption,
        }

    def write_group(group: dict) -> dict:
        name = group["bucket"][0]
        for start in range(0, len(group["key"]), 1000):
            with webdataset.TarWriter(f"{output}/{name}-{start // 1000:05d}.tar") as sink:
                for i in range(start, min(start + 1000, len(group["key"]))):
                    sink.write(
                        {"__key__": group["key"][i], "jpg": group["jpg"][i], "txt": group["txt"][i]}
                    )
        return {"bucket": [name], "images": [len(group["key"])]}

    os.makedirs(output, exist_ok=True)
    start = time.perf_counter()
    data = ray.data.read_binary_files(folder, include_paths=True, file_extensions=["jpg"])
    written = data.map(fit_row).groupby("bucket").map_groups(write_group, batch_format="numpy")
    images = sum(row["images"] for row in written.take_all())
    print(json.dumps({"images": images, "seconds": time.perf_counter() - start}))


def run_ray_data(folder: Path, cpus: int, tiny: bool) -> dict:
    output = folder.parent / f"ray-data-{folder.name}"
    command = [sys.executable, __file__, "--ray-data-child", str(folder), str(output), str(cpus)]
    watched = watch([*command, *(["--tiny"] if tiny else [])])
    if watched.returncode:
        raise RuntimeError(f"Ray Data failed ({watched.returncode}): {watched.stderr[-3000:]}")
    result = json.loads(watched.stdout.strip().splitlines()[-1])
    return result | {
        "seconds": watched.seconds,
        "driver_rss": watched.driver_rss,
        "worker_rss": watched.worker_rss,
    }


def listing_and_scan(args: argparse.Namespace, results: dict) -> None:
    """The largest corpus's listing by the job (its folders shared out to tasks) against one
    process walking it alone, and the scan's files/s per CPU."""
    from pipeline.inputs import resolve_input
    from pipeline.sources import list_input

    count = max(results)
    stages = results[count]["stages"]
    if "list" not in stages:
        return
    folder = corpus(args.workdir, count, args.tiny)
    start = time.perf_counter()
    entries = len(list_input(resolve_input(str(folder))))
    alone = time.perf_counter() - start
    job = stages["list"]["seconds"]
    scan_rate = stages["scan"]["items"] / stages["scan"]["seconds"] / args.cpus
    print(
        f"listing {count:,} images ({2 * count:,} files with their captions): the job "
        f"{job:.1f} s ({entries / job:,.0f} images/s), one process alone {alone:.1f} s: "
        f"{alone / job:.2f}x; scan {scan_rate:,.0f} files/s per CPU"
    )


def print_result(
    label: str, result: dict, count: int, cpus: int, bare_ms: float, naive_ms: float
) -> None:
    rate = result["images"] / result["seconds"]
    per_core = rate / cpus / (1000 / bare_ms)
    naive_ratio = (count * naive_ms / 1000) / result["seconds"]
    print(
        f"   {label:>16s} {result['seconds']:7.1f} {rate:7.0f} "
        f"{result['images'] / result['fit_seconds']:9.0f} {result['busy']:8.0%} "
        f"{per_core:7.2f}x {naive_ratio:6.2f}x {result['driver_rss'] / 2**20:6.0f} MiB "
        f"{result['worker_rss'] / 2**20:6.0f}/{result['worker_pss'] / 2**20:.0f} MiB "
        f"{result['peak_pss'] / 2**30:6.2f} GiB",
        flush=True,
    )
    ordered = sorted(result["stages"].items(), key=lambda item: item[1]["started"])
    stages = ", ".join(f"{name} {stage['seconds']:.1f} s" for name, stage in ordered)
    if stages:
        work = result["stages"]["fit"].get("image_seconds")
        cpu_seconds = cpus * result["fit_seconds"]
        share = f"; images {work / cpu_seconds:.0%} of the fit stage's CPU" if work else ""
        print(f"             stages: {stages}{share}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-scale"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="128x96-class images, tiny buckets")
    parser.add_argument("--ray-data", action="store_true", help="also a plain Ray Data pipeline")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["files"],
        choices=["files", "parquet", "tars"],
        help="input shapes to run",
    )
    parser.add_argument("--ray-data-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_data_child:
        folder, output, cpus = args.ray_data_child
        ray_data_child(folder, output, int(cpus), args.tiny)
        return

    files = distinct_files(args.workdir, args.tiny)
    buckets = buckets_of(files, bucket_config(args.tiny))
    bare_ms = per_image_ms(bare_engine, files, buckets)
    naive_ms = per_image_ms(naive, files, buckets)
    kind = "128x96-class thumbnails" if args.tiny else "512x384-class JPEGs"
    print(
        f"{DISTINCT} distinct {kind}; one core, {BASELINE_SAMPLE} files, best of 3: bare "
        f"engine loop {bare_ms:.2f} ms an image, naive loop {naive_ms:.2f} ms"
    )
    print(f"the job on a local Ray of {args.cpus} CPUs:")
    print(
        f"   {'images':>16s} {'wall s':>7s} {'img/s':>7s} {'fit img/s':>9s} {'fit busy':>8s} "
        f"{'per core':>8s} {'x naive':>7s} {'driver':>9s} {'worker RSS/PSS':>16s} "
        f"{'all PSS':>10s}"
    )
    results, by_shape = {}, {}
    for count in args.sizes:
        for shape in args.shapes:
            folder = (
                corpus(args.workdir, count, args.tiny)
                if shape == "files"
                else packed_corpus(args.workdir, count, args.tiny, shape)
            )
            result = by_shape[count, shape] = run_job(folder, args.cpus, args.tiny)
            if shape == "files":
                results[count] = result
            print_result(f"{count:,d} {shape}", result, count, args.cpus, bare_ms, naive_ms)
        for shape in (s for s in args.shapes if s != "files" and count in results):
            ratio = results[count]["seconds"] / by_shape[count, shape]["seconds"]
            print(f"   {shape} at {count:,}: {ratio:.2f}x the images/s of loose files", flush=True)
    listing_and_scan(args, results)
    if len(results) > 1:
        small, large = min(results), max(results)
        rates = {n: results[n]["images"] / results[n]["seconds"] for n in (small, large)}
        slope = (results[large]["driver_rss"] - results[small]["driver_rss"]) / (large - small)
        print(
            f"throughput at {large:,} against {small:,}: {rates[large] / rates[small]:.2f}x; "
            f"driver peak grows {slope:.0f} bytes an image"
        )
    if args.ray_data:
        for count in args.sizes[:1]:
            folder = corpus(args.workdir, count, args.tiny)
            plain = run_ray_data(folder, args.cpus, args.tiny)
            ours = results[count]
            print(
                f"plain Ray Data pipeline, {count:,} images: {plain['seconds']:.1f} s "
                f"({plain['images'] / plain['seconds']:.0f} img/s; driver "
                f"{plain['driver_rss'] / 2**20:.0f} MiB, largest worker "
                f"{plain['worker_rss'] / 2**20:.0f} MiB); the job is "
                f"{plain['seconds'] / ours['seconds']:.2f}x faster"
            )


if __name__ == "__main__":
    main()
