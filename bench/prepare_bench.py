"""The prepare job's speed and memory on data that looks real, each against a baseline measured
in the same run.

    python bench/prepare_bench.py                     # the whole corpus (bench/corpus.py), ~10 min
    python bench/prepare_bench.py --scale 0.25 --no-huge --tiny 2000 20000   # a quicker look

1. per format class, one core: our fit-and-encode (`imaging.fitted_image` + `encode`, q95)
   against a naive Pillow loop (open, convert RGB, Lanczos, centre crop, q95) and against the
   Pillow engine (the previous path: draft decoding, composite, bicubic), with PSNR against a
   full-quality reference (full decode, colour-managed to sRGB, composited, float Lanczos);
2. scan, one process: `scan.scan_batch` against a bare `Image.open(path).size` loop;
3. the whole job on a local Ray with 2 CPUs against the naive loop over the same files (the sum
   of section 1's naive times) and against the job on 1 CPU, with the peak memory summed over
   the job's processes (RSS, and PSS, which counts shared pages once);
4. the driver's peak memory per image scanned, from runs on two numbers of tiny files.
Corpora are generated once into --workdir (kept between runs).
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
from corpus import make_corpus
from PIL import Image
from processes import watch

from pipeline.buckets import BucketConfig, bucketize
from pipeline.fit import crop_box, fit
from pipeline.imaging import _pillow_pixels, encode, fitted_image, read_header
from pipeline.inputs import resolve_input
from pipeline.scan import scan_batch
from pipeline.sources import list_input

PSNR_FILES = 3  # per class: references are full decodes and float resizes
HUGE = 300_000_000  # pixels over which the Pillow paths and the reference are skipped


def bucket_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        header = read_header(image)
    buckets, index, _ = bucketize(np.array([header.width]), np.array([header.height]))
    return tuple(int(v) for v in buckets[index[0]])


def centre(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    return image.crop(crop_box(*image.size, *bucket))


def naive(path: Path, bucket: tuple[int, int]) -> bytes:
    image = Image.open(path).convert("RGB")
    return encode(centre(image.resize(fit(*image.size, *bucket), Image.Resampling.LANCZOS), bucket))


def ours(path: Path, bucket: tuple[int, int]) -> bytes:
    return encode(fitted_image(str(path), bucket, "center").image)


def pillow_engine(path: Path, bucket: tuple[int, int]) -> bytes:
    with Image.open(path) as image:
        header = read_header(image)
    scaled = fit(header.width, header.height, *bucket)
    pixels, _ = _pillow_pixels(str(path), header, scaled, (255, 255, 255))
    return encode(centre(Image.fromarray(pixels), bucket))


def reference(path: Path, bucket: tuple[int, int]) -> np.ndarray:
    """Full decode, to sRGB through any profile, composited on white, float Lanczos, cropped."""
    image = pyvips.Image.new_from_file(str(path))
    if image.interpretation == "cmyk" or image.get_typeof("icc-profile-data"):
        image = image.icc_transform("srgb", embedded=True, input_profile="cmyk")
    image = image.colourspace("srgb")
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    pixels = image.numpy().astype(np.float32)
    scaled = fit(pixels.shape[1], pixels.shape[0], *bucket)
    channels = [
        np.asarray(Image.fromarray(pixels[..., c], "F").resize(scaled, Image.Resampling.LANCZOS))
        for c in range(3)
    ]
    left, top, right, bottom = crop_box(*scaled, *bucket)
    return np.stack(channels, -1)[top:bottom, left:right]


def psnr(encoded: bytes, expected: np.ndarray) -> float:
    got = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), np.float64)
    mse = np.mean((got - np.clip(expected, 0, 255)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse else float("inf")


def per_class(corpus: dict[str, list[Path]]) -> float:
    """Section 1; returns the naive loop's seconds over the whole corpus."""
    print("\n1. fit and encode, one core, per class: img/s, x naive, PSNR against the reference")
    print(
        f"   {'class':12s} {'files':>5s}  {'naive':>18s}  {'ours (libvips)':>24s}  "
        f"{'Pillow engine':>24s}"
    )
    naive_total = 0.0
    for name, files in corpus.items():
        buckets = [bucket_of(path) for path in files]
        huge = any(np.prod(Image.open(p).size) > HUGE for p in files)
        runs = {"naive": naive, "ours": ours} | ({} if huge else {"pillow": pillow_engine})
        seconds, outputs = {}, {}
        for run, function in runs.items():
            start = time.process_time()  # one core: CPU time of this process
            outputs[run] = [function(p, b) for p, b in zip(files, buckets, strict=True)]
            seconds[run] = time.process_time() - start
        naive_total += seconds["naive"]
        quality = {run: "" for run in runs}
        if not huge:
            references = [reference(p, b) for p, b in zip(files, buckets, strict=True)][:PSNR_FILES]
            for run in runs:
                values = [psnr(o, r) for o, r in zip(outputs[run], references, strict=False)]
                quality[run] = f"{np.mean(values):5.2f} dB"
        cells = []
        for run in ("naive", "ours", "pillow"):
            if run not in runs:
                cells.append(f"{'(skipped: huge)':>24s}")
                continue
            rate = len(files) / seconds[run]
            ratio = "" if run == "naive" else f" {seconds['naive'] / seconds[run]:5.2f}x"
            cells.append(f"{rate:7.2f}/s{ratio} {quality[run]:>8s}")
        print(f"   {name:12s} {len(files):5d}  " + "  ".join(cells))
    return naive_total


def scan_speed(folder: Path, repeats: int = 3) -> None:
    root = resolve_input(str(folder))
    listing = list_input(root)
    paths = [folder / s for s in listing["source"].to_pylist()]
    bare, scanned = [], []
    for _ in range(repeats):  # interleaved, best of each: the page cache is warm for both
        start = time.perf_counter()
        for path in paths:
            Image.open(path).size  # noqa: B018
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        scan_batch(listing, root)
        scanned.append(time.perf_counter() - start)
    n = len(paths)
    print(f"\n2. scan, one process, {n} files (best of {repeats}):")
    print(f"   bare Image.open(p).size  {n / min(bare):8.0f} files/s")
    print(
        f"   scan.scan_batch          {n / min(scanned):8.0f} files/s  "
        f"{min(bare) / min(scanned):5.2f}x of bare"
    )


def job_once(input_folder: Path, cpus: int, tiny: bool = False) -> dict:
    """The whole job in a fresh process with a local Ray of `cpus` CPUs; peak memory of its tree."""
    output = input_folder.parent / f"out-{input_folder.name}-{cpus}"
    command = [sys.executable, __file__, "--job", str(input_folder), str(output), str(cpus)]
    watched = watch([*command, *(["--tiny-buckets"] if tiny else [])], interval=0.5)
    if watched.returncode:
        raise RuntimeError(f"job failed with {watched.returncode}: {watched.stderr[-2000:]}")
    result = json.loads(watched.stdout.strip().splitlines()[-1])
    return result | {
        "rss": watched.peak_rss,
        "pss": watched.peak_pss,
        "driver_rss": watched.driver_rss,
    }


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
    config = PrepareConfig(input=input_folder, output=output, buckets=buckets, overwrite=True)
    start = time.perf_counter()
    manifest = run(config)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "images": manifest.counts["images"]}))


def whole_job(folder: Path, naive_seconds: float) -> None:
    one, two = (job_once(folder, cpus) for cpus in (1, 2))
    measured = not np.isnan(naive_seconds)
    naive = f"naive loop {naive_seconds:.1f} s on one core" if measured else "section 1 not run"
    print(f"\n3. whole job, {two['images']} images kept (default settings); {naive}:")
    for cpus, result in ((1, one), (2, two)):
        rss, pss = result["rss"] / 2**30, result["pss"] / 2**30
        ratio = f"{naive_seconds / result['seconds']:5.2f}x naive  " if measured else ""
        print(
            f"   {cpus} CPU{'s' if cpus > 1 else ' '} {result['seconds']:6.1f} s  {ratio}peak "
            f"memory of the job's processes: RSS {rss:.2f} GiB, PSS {pss:.2f} GiB"
        )
    print(f"   2 CPUs against 1: {one['seconds'] / two['seconds']:.2f}x")


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


def driver_memory(workdir: Path, counts: list[int]) -> None:
    small, large = (job_once(tiny_files(workdir, n), 2, tiny=True) for n in counts)
    slope = (large["driver_rss"] - small["driver_rss"]) / (counts[1] - counts[0])
    print("\n4. driver peak memory (RSS of the driver process, sampled every 0.2 s):")
    for n, result in zip(counts, (small, large), strict=True):
        print(
            f"   {n:>7,d} files  {result['driver_rss'] / 2**20:7.1f} MiB  "
            f"({result['images']:,} kept)"
        )
    print(f"   per extra image scanned: {slope:.0f} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-bench"))
    parser.add_argument("--scale", type=float, default=1.0, help="files per class x this")
    parser.add_argument("--no-huge", action="store_true", help="leave out the 625 MP PNG")
    parser.add_argument("--tiny", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--job", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--tiny-buckets", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job_child(args.job[0], args.job[1], int(args.job[2]), args.tiny_buckets)
        return

    root = args.workdir / f"real-{args.scale:g}{'-nohuge' if args.no_huge else ''}"
    corpus = make_corpus(args.workdir / "real", args.scale, huge=not args.no_huge)
    _link(corpus, root)  # the job's input: just this run's files
    pixels = sum(np.prod(Image.open(p).size) for files in corpus.values() for p in files)
    count = sum(len(files) for files in corpus.values())
    print(f"corpus: {count} files, {pixels / 1e6:,.0f} MP in all, in {root}")
    naive_seconds = per_class(corpus) if 1 in args.sections else float("nan")
    if 2 in args.sections:
        scan_speed(root)
    if 3 in args.sections:  # against the naive loop when section 1 ran in the same run
        whole_job(root, naive_seconds)
    if 4 in args.sections:
        driver_memory(args.workdir, args.tiny)


def _link(corpus: dict[str, list[Path]], root: Path) -> None:
    """root/CLASS/FILE as hard links to the generated files."""
    for name, files in corpus.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for path in files:
            if not (root / name / path.name).exists():
                os.link(path, root / name / path.name)


if __name__ == "__main__":
    main()
