"""The input shapes' costs, each against its baseline in the same run.

    python bench/inputs_bench.py                   # 2,000 photo-sized JPEGs made once
    python bench/inputs_bench.py --input DIR       # your own files (section 1)

1. What finding exact duplicates costs the scan: `scan_batch` over the same files with and
   without content hashes, one process, alternating runs (medians).
2. The whole job (embedded Ray, 2 CPUs) on the same images as WebDataset tars of 500 samples
   (webdataset's TarWriter, a txt caption each) and as Parquet files of 500 rows in row groups
   of 100 (`datasets.Image` structs and a text column, as `datasets` writes images), against
   them as loose files with .txt sidecars: images/s of each, best of two runs; and the largest
   worker's peak memory in each shape's runs.

The scan reads ~64 KiB of each file for its header; hashing reads the whole file (xxh3-128,
streamed a MiB at a time): the cost is the rest of the file's read and the hash. xxh3 was
chosen by measurement here: 8.6-9.7 GB/s against 0.9 for blake2b and 0.7 for md5.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.inputs import resolve_input
from pipeline.scan import scan_batch
from pipeline.sources import list_input

ASPECTS = (
    [(1024, 768)] * 4
    + [(768, 1024)] * 3
    + [(1024, 1024)] * 2
    + [(1216, 832), (832, 1216), (1344, 768)]
)


def photos(folder: Path, count: int) -> Path:
    """`count` JPEGs with noise (~250 KB each: a web photo), made once; of several aspects,
    landscape most, as a scraped set is: a Parquet file's rows fall into several buckets."""
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.normal(128, 60, (48, 64, 3)).clip(0, 255).astype(np.uint8)
            size = ASPECTS[rng.integers(len(ASPECTS))]
            image = np.asarray(Image.fromarray(small).resize(size), np.float32)
            noisy = (image + rng.normal(0, 8, image.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(path, quality=90)
    return folder


def job_rate(source: Path, output: Path) -> float:
    """Images/s of the whole prepare job from `source` (a fresh OUT each run)."""
    from pipeline.config import PrepareConfig
    from pipeline.prepare import run

    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    manifest = run(PrepareConfig(input=str(source), output=str(output)))
    return manifest.counts["images"] / (time.perf_counter() - start)


def tars_against_files(folder: Path, workdir: Path, per_tar: int = 500) -> None:
    import ray
    import webdataset

    loose, tars, parquets = workdir / "loose", workdir / "tars", workdir / "parquet"
    files = sorted(folder.glob("*.jpg"))
    if not tars.exists():
        for path in files:
            (loose / path.name).parent.mkdir(parents=True, exist_ok=True)
            if not (loose / path.name).exists():
                os.link(path, loose / path.name)
            (loose / path.name).with_suffix(".txt").write_text(f"a caption for {path.stem}")
        tars.mkdir()
        for first in range(0, len(files), per_tar):
            with webdataset.TarWriter(str(tars / f"{first // per_tar:05d}.tar")) as sink:
                for path in files[first : first + per_tar]:
                    sink.write(
                        {
                            "__key__": path.stem,
                            "jpg": path.read_bytes(),
                            "txt": f"a caption for {path.stem}",
                        }
                    )
    if not parquets.exists():  # as datasets writes images: row groups of 100
        parquets.mkdir()
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        for first in range(0, len(files), per_tar):
            chunk = files[first : first + per_tar]
            images = [{"bytes": path.read_bytes(), "path": path.name} for path in chunk]
            texts = [f"a caption for {path.stem}" for path in chunk]
            table = pa.table({"image": pa.array(images, image_type), "text": texts})
            name = parquets / f"train-{first // per_tar:05d}.parquet"
            pq.write_table(table, name, row_group_size=100)
    shapes = (("files", loose), ("tars", tars), ("parquet", parquets))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rates = {
            name: max(job_rate(source, workdir / f"out-{name}") for _ in range(2))
            for name, source in shapes
        }
    finally:
        ray.shutdown()
    files_rate = rates["files"]
    print(
        f"\n2. the job on {len(files)} images: loose files {files_rate:.0f} images/s; tars "
        f"of {per_tar} {rates['tars']:.0f} ({rates['tars'] / files_rate:.2f}x); Parquet, row "
        f"groups of 100, {rates['parquet']:.0f} ({rates['parquet'] / files_rate:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="1,2")
    args = parser.parse_args()
    sections = {int(s) for s in args.sections.split(",")}
    folder = args.input or photos(Path("/tmp/arb-bench/dedup-photos"), args.count)
    if 1 in sections:
        hash_cost(folder, args.repeats)
    if 2 in sections:
        tars_against_files(folder, Path("/tmp/arb-bench/input-shapes"))


def hash_cost(folder: Path, repeats: int) -> None:
    root = resolve_input(str(folder))
    listing = list_input(root)
    megabytes = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 1e6
    seconds = {True: [], False: []}
    for _ in range(repeats):
        for dedup in (False, True):
            start = time.perf_counter()
            scan_batch(listing, root, dedup=dedup)
            seconds[dedup].append(time.perf_counter() - start)
    plain, hashed = (statistics.median(seconds[d]) for d in (False, True))
    files = len(listing)
    print(f"\n1. {files} files, {megabytes:.0f} MB (page cache warm), one process")
    print(
        f"scan without hashes {plain * 1e3 / files:.3f} ms a file, with {hashed * 1e3 / files:.3f}"
        f" ms ({hashed / plain:.2f}x; +{(hashed - plain) * 1e3 / files:.3f} ms, "
        f"{megabytes / (hashed - plain):.0f} MB/s hashed)"
    )


if __name__ == "__main__":
    main()
