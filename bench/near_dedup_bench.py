"""--near-dedup's costs, each against a baseline measured in the same run.

    python bench/near_dedup_bench.py                          # ~3 min
    python bench/near_dedup_bench.py --classes jpeg --hashes 100000   # a quicker look

1. per format class of bench/corpus.py, one core: the scan's perceptual hash
   (`perceptual.perceptual_hash`: a small decode and dHash) against the fit of the same file
   (`imaging.fitted_image` + `encode` to its bucket, q95), which every kept image costs;
2. the near-duplicate search (`near_dedup.near_pairs`, multi-index hashing) over --hashes
   uniform random 64-bit hashes with --planted near copies (a few bits flipped), at the
   default distance, against a brute-force scan (XOR and popcount of every pair, NumPy, in
   blocks) over a --sample of them, extrapolated by (N / sample)^2; and `near_dedup.keep`,
   the whole of what the assign stage adds. Every time is the best of 2 runs after a warm-up.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from corpus import make_corpus
from PIL import Image

from pipeline.buckets import bucketize
from pipeline.config import DEFAULT_NEAR_DEDUP_DISTANCE
from pipeline.imaging import encode, fitted_image, read_header
from pipeline.near_dedup import keep, near_pairs
from pipeline.perceptual import perceptual_hash

FILES = 6  # per class


def per_class(corpus: dict[str, list[Path]], classes: list[str]) -> None:
    print("1. perceptual hash against the fit, per image, one core")
    print(f"   {'class':<12} {'hash':>9} {'fit':>9} {'hash/fit':>9}")
    for name in classes:
        files = corpus[name][:FILES]
        headers = []
        for path in files:
            with Image.open(path) as image:
                headers.append(read_header(image))
        sizes = np.array([[h.width, h.height] for h in headers])
        buckets, index, _ = bucketize(sizes[:, 0], sizes[:, 1])
        jobs = [
            (str(path), header, tuple(int(v) for v in buckets[i]))
            for path, header, i in zip(files, headers, index, strict=True)
        ]
        hashed = best_of(hash_all, jobs) / len(files)
        fitted = best_of(fit_all, jobs) / len(files)
        print(f"   {name:<12} {1000 * hashed:7.1f}ms {1000 * fitted:7.1f}ms {hashed / fitted:8.0%}")


def hash_all(jobs: list) -> None:
    for path, header, _ in jobs:
        perceptual_hash(path, header.format, header.orientation)


def fit_all(jobs: list) -> None:
    for path, _, bucket in jobs:
        encode(fitted_image(path, bucket).pixels)


def best_of(function, jobs, repeats: int = 2) -> float:
    """The fastest of `repeats` runs of `function(jobs)`, after one to warm up, in seconds:
    the machine is shared, and the fastest run is the one least disturbed."""
    function(jobs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(jobs)
        times.append(time.perf_counter() - start)
    return min(times)


def planted(count: int, pairs: int, distance: int, seed: int = 0) -> tuple[np.ndarray, set]:
    """`count` uniform hashes, the last `pairs` of them copies of earlier ones with 1..distance
    bits flipped; the planted (i, j)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, count, dtype=np.uint64)
    originals = rng.choice(count - pairs, pairs, replace=False)
    copies = np.arange(count - pairs, count)
    for original, copy in zip(originals, copies, strict=True):
        flips = rng.choice(64, rng.integers(1, distance + 1), replace=False)
        hashes[copy] = hashes[original] ^ np.uint64(sum(1 << int(b) for b in flips))
    return hashes, {(int(a), int(b)) for a, b in zip(originals, copies, strict=True)}


def brute_force(hashes: np.ndarray, distance: int, block: int = 2048) -> int:
    """Pairs within `distance` by comparing every pair (blocks of rows against the rest)."""
    found = 0
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block, None]
        rest = hashes[None, start:]
        close = np.bitwise_count(rows ^ rest) <= distance
        found += int(np.triu(close, 1).sum())
    return found


def search(count: int, pairs: int, sample: int, distance: int) -> None:
    print(
        f"2. near-duplicate search, {count:,} hashes ({pairs:,} planted pairs), distance {distance}"
    )
    hashes, expected = planted(count, pairs, distance)
    found = near_pairs(hashes, distance)
    found_set = {tuple(pair) for pair in found.tolist()}
    mih = best_of(lambda h: near_pairs(h, distance), hashes)
    print(
        f"   multi-index hashing: {mih:.2f} s, {len(found):,} pairs, "
        f"{len(expected & found_set):,} of {len(expected):,} planted"
    )
    kept = best_of(lambda h: keep(h, np.arange(count), distance), hashes, repeats=1)
    print(f"   keep (search and greedy choice): {kept:.2f} s")
    subset = hashes[:sample]
    brute = best_of(lambda h: brute_force(h, distance), subset)
    extrapolated = brute * (count / sample) ** 2
    print(
        f"   brute force: {brute:.2f} s over {sample:,}, extrapolated to {count:,}: "
        f"{extrapolated:,.0f} s ({extrapolated / mih:,.0f}x multi-index hashing)"
    )
    small = best_of(lambda h: near_pairs(h, distance), subset)
    print(
        f"   at {sample:,} hashes: multi-index hashing {small:.3f} s, {brute / small:,.0f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-bench"))
    parser.add_argument(
        "--classes", nargs="+", default=["jpeg", "progressive", "webp", "png", "tiff", "cmyk"]
    )
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--planted", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument("--distance", type=int, default=DEFAULT_NEAR_DEDUP_DISTANCE)
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if 1 in args.sections:
        per_class(make_corpus(args.workdir / "real", 0.25, huge=False), args.classes)
    if 2 in args.sections:
        search(args.hashes, args.planted, args.sample, args.distance)


if __name__ == "__main__":
    main()
