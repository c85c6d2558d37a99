"""The prepare job's speed and memory, each against a baseline measured in the same run.

    python bench/prepare_bench.py                 # 300 photos + 20 PNGs, 10k/100k tiny files
    python bench/prepare_bench.py --photos 60 --tiny 2000 20000   # a quicker look

1. fit-and-encode, one process: `imaging.fitted_image` + `encode` (draft decoding, q95) against
   a naive PIL loop (full decode, convert, LANCZOS resize, centre crop, save with defaults),
   with the PSNR of both against a full-quality reference (full decode, LANCZOS, no encoding);
2. scan, one process: `scan.scan_batch` against a bare `Image.open(path).size` loop;
3. the whole job on a local Ray with 2 CPUs against the same with 1;
4. the driver's peak memory per image scanned, from runs on two numbers of tiny files.
Corpora are generated once into --workdir (kept between runs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.buckets import BucketConfig, bucketize
from pipeline.fit import crop_box, fit
from pipeline.imaging import encode, fitted_image
from pipeline.scan import scan_batch
from pipeline.sources import input_root, list_input


def photo(seed: int) -> Image.Image:
    """A multi-megapixel image with detail at every scale, like a photo (1/f spectrum)."""
    rng = np.random.default_rng(seed)
    width, height = (
        int(v)
        for v in rng.choice([(4000, 3000), (3000, 4000), (3264, 2448), (2592, 1944), (4032, 2268)])
    )
    image = np.zeros((height, width, 3), np.float32)
    for scale, amplitude in ((96, 80.0), (24, 40.0), (6, 16.0), (2, 6.0)):
        small = rng.normal(0, 1, (height // scale + 1, width // scale + 1, 3)).astype(np.float32)
        layer = Image.fromarray(np.clip(small * 40 + 128, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        image += (np.asarray(layer, np.float32) - 128) * (amplitude / 40)
    return Image.fromarray(np.clip(image + 128, 0, 255).astype(np.uint8))


def make_photo(args: tuple[Path, int]) -> None:
    folder, seed = args
    path = folder / f"photo-{seed:04d}.jpg"
    if not path.exists():
        photo(seed).save(path, quality=90)


def make_png(args: tuple[Path, int]) -> None:
    folder, seed = args
    path = folder / f"art-{seed:04d}.png"
    if not path.exists():
        image = photo(10_000 + seed).quantize(64).convert("RGB")  # flat-ish art, large PNG
        image.save(path, compress_level=6)


def corpus(workdir: Path, photos: int, pngs: int) -> Path:
    folder = workdir / f"photos-v2-{photos}-{pngs}"
    folder.mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(make_photo, [(folder, i) for i in range(photos)])
        pool.map(make_png, [(folder, i) for i in range(pngs)])
    return folder


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse else float("inf")


def fit_and_encode(files: list[Path], reference_every: int) -> None:
    sizes = [Image.open(p).size for p in files]
    buckets, index, _ = bucketize(
        np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes]), BucketConfig()
    )
    targets = [tuple(int(v) for v in buckets[i]) for i in index]

    def naive(path: Path, bucket, quality: int | None) -> bytes:
        image = Image.open(path).convert("RGB")
        scaled = fit(*image.size, *bucket)
        image = image.resize(scaled, Image.Resampling.LANCZOS).crop(crop_box(*scaled, *bucket))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **({} if quality is None else {"quality": quality}))
        return buffer.getvalue()

    def ours(path: Path, bucket) -> bytes:
        return encode(fitted_image(path.read_bytes(), bucket, "center").image, "jpg", 95)

    runs = {
        "ours (draft, q95)": lambda p, b: ours(p, b),
        "naive (PIL defaults)": lambda p, b: naive(p, b, None),
        "naive at q95": lambda p, b: naive(p, b, 95),
    }
    outputs, rates = {}, {}
    for name, function in runs.items():
        start = time.perf_counter()
        outputs[name] = [function(p, b) for p, b in zip(files, targets, strict=True)]
        rates[name] = len(files) / (time.perf_counter() - start)
    quality = {name: [] for name in runs}
    for i in range(0, len(files), reference_every):
        image = Image.open(files[i]).convert("RGB")
        scaled = fit(*image.size, *targets[i])
        reference = np.asarray(
            image.resize(scaled, Image.Resampling.LANCZOS).crop(crop_box(*scaled, *targets[i]))
        )
        for name in runs:
            quality[name].append(
                psnr(np.asarray(Image.open(io.BytesIO(outputs[name][i]))), reference)
            )
    base = rates["naive (PIL defaults)"]
    print(
        f"\n1. fit and encode, one process, {len(files)} images "
        f"(PSNR on every {reference_every}th):"
    )
    for name in runs:
        print(
            f"   {name:22s} {rates[name]:6.2f} img/s  {rates[name] / base:5.2f}x  "
            f"PSNR {np.mean(quality[name]):5.2f} dB"
        )


def scan_speed(folder: Path, repeats: int = 3) -> None:
    listing = list_input(str(folder))
    root = input_root(str(folder))
    paths = [folder / s for s in listing["source"].to_pylist()]
    bare, ours = [], []
    for _ in range(repeats):  # interleaved, best of each: the page cache is warm for both
        start = time.perf_counter()
        for path in paths:
            Image.open(path).size  # noqa: B018
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        scan_batch(listing, root)
        ours.append(time.perf_counter() - start)
    n = len(paths)
    print(f"\n2. scan, one process, {n} files (best of {repeats}):")
    print(f"   bare Image.open(p).size  {n / min(bare):8.0f} files/s")
    print(
        f"   scan.scan_batch          {n / min(ours):8.0f} files/s  "
        f"{min(bare) / min(ours):5.2f}x of bare"
    )


def job_once(input_folder: str, cpus: int, tiny: bool) -> dict:
    """Run the whole job in a fresh process with a local Ray of `cpus` CPUs."""
    output = Path(input_folder).parent / f"out-{Path(input_folder).name}-{cpus}"
    command = [sys.executable, __file__, "--job", input_folder, str(output), str(cpus)] + (
        ["--tiny-buckets"] if tiny else []
    )
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def job_child(input_folder: str, output: str, cpus: int, tiny: bool) -> None:
    import ray

    from pipeline.config import PrepareConfig
    from pipeline.prepare import run

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    buckets = (
        BucketConfig(max_area=64 * 64, max_side=128, min_side=32, step=32, square=64)
        if tiny
        else BucketConfig()
    )
    # Photos: 32 per shard, so that two workers have enough tasks to share (each shard is one).
    per_shard = 500 if tiny else 32
    config = PrepareConfig(
        input=input_folder,
        output=output,
        buckets=buckets,
        overwrite=True,
        samples_per_shard=per_shard,
    )
    start = time.perf_counter()
    manifest = run(config)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"seconds": seconds, "peak_kib": peak_kib, "images": manifest["counts"]["images"]}
        )
    )


def tiny_files(workdir: Path, count: int) -> Path:
    folder = workdir / f"tiny-{count}"
    marker = folder / ".complete"
    if not marker.exists():
        rng = np.random.default_rng(count)
        for i in range(count):
            sub = folder / f"{i // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (64, 48 + 16 * (i % 3), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(sub / f"{i:06d}.png")
        marker.touch()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-bench"))
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--pngs", type=int, default=20)
    parser.add_argument("--tiny", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--psnr-every", type=int, default=10)
    parser.add_argument("--job", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--tiny-buckets", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job_child(args.job[0], args.job[1], int(args.job[2]), args.tiny_buckets)
        return

    folder = corpus(args.workdir, args.photos, args.pngs)
    files = sorted(folder.glob("*.*"))
    megapixels = np.mean([np.prod(Image.open(p).size) for p in files]) / 1e6
    print(f"corpus: {len(files)} files, {megapixels:.1f} MP on average, in {folder}")
    fit_and_encode(files, args.psnr_every)
    scan_speed(folder)

    one, two = (job_once(str(folder), cpus, tiny=False) for cpus in (1, 2))
    print(f"\n3. whole job, {one['images']} images kept:")
    print(f"   1 CPU  {one['images'] / one['seconds']:6.2f} img/s")
    print(
        f"   2 CPUs {two['images'] / two['seconds']:6.2f} img/s  "
        f"{one['seconds'] / two['seconds']:5.2f}x"
    )

    small, large = (job_once(str(tiny_files(args.workdir, n)), 2, tiny=True) for n in args.tiny)
    n_small, n_large = args.tiny
    slope = (large["peak_kib"] - small["peak_kib"]) * 1024 / (n_large - n_small)
    print("\n4. driver peak memory (ru_maxrss of the driver process):")
    print(
        f"   {n_small:>7,d} files  {small['peak_kib'] / 1024:7.1f} MiB  ({small['images']:,} kept)"
    )
    print(
        f"   {n_large:>7,d} files  {large['peak_kib'] / 1024:7.1f} MiB  ({large['images']:,} kept)"
    )
    print(f"   per extra image scanned: {slope:.0f} bytes")


if __name__ == "__main__":
    main()
