"""report.html's cost: the seconds to build it and its bytes, against the job without it, at
each N (a ratio from the same run), and what it weighs.

    python bench/report_bench.py                        # 10k and 100k small JPEGs, ~6 min
    python bench/report_bench.py --sizes 100000 --dedup # 99,952 exact copies rejected too

The corpus costs no disk: DISTINCT photo-like JPEGs of ~0.2 MP in aspects spread over the sd
grid's (so most buckets hold images and get a contact sheet), each with a .txt caption,
hard-linked under N names in folders of 1,000, made once into --workdir. The job runs as users
run it (pipeline.prepare.run on an embedded local Ray of --cpus CPUs, default settings,
--batch-size 32 --world-size 8) with the page turned off, --no-dedup unless --dedup (the links
are copies of DISTINCT files: with dedup all but DISTINCT are rejected, which fills the page's
rejections and duplicate groups instead of its buckets). Then the page alone is built on the
finished OUT, best of --repeats: its seconds against the job's, its bytes against OUT's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from corpus import photo

DISTINCT = 48
AREA = 512 * 384


def distinct_files(workdir: Path) -> list[Path]:
    """DISTINCT photos, their aspects spaced evenly in log from 1:2.5 to 2.5:1."""
    folder = workdir / "distinct-aspects"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, aspect in enumerate(np.exp(np.linspace(np.log(0.4), np.log(2.5), DISTINCT))):
        size = (round((AREA * aspect) ** 0.5), round((AREA / aspect) ** 0.5))
        path = folder / f"{i:02d}.jpg"
        if not path.exists():
            photo(i, size).save(path, quality=90)
            path.with_suffix(".txt").write_text(f"a photo, number {i}, {size[0]}x{size[1]}")
        files.append(path)
    return files


def corpus(workdir: Path, count: int) -> Path:
    """count images (and their captions) as hard links to the distinct files."""
    folder = workdir / f"aspects-{count}"
    marker = workdir / f"{folder.name}.complete"
    if marker.exists():
        return folder
    files = distinct_files(workdir)
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
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure(folder: Path, output: Path, dedup: bool, repeats: int) -> dict:
    """The job without the page, then the page alone on its OUT (best of `repeats`)."""
    import pipeline.prepare
    from pipeline.config import PrepareConfig
    from pipeline.format import Manifest, OutputDir
    from pipeline.inputs import resolve_input
    from pipeline.report_page import write_report_page

    config = PrepareConfig(
        input=str(folder),
        output=str(output),
        overwrite=True,
        batch_size=32,
        world_size=8,
        dedup=dedup,
    )
    pipeline.prepare.write_report_page = lambda *args: None  # the job without the page
    start = time.perf_counter()
    pipeline.prepare.run(config)
    job = time.perf_counter() - start
    out = OutputDir(str(output))
    stats = json.loads((output / "stats.json").read_text())
    buckets = np.array(Manifest.read(out).buckets)
    source = resolve_input(str(folder))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        write_report_page(out, stats, buckets, config.write.seed, source)
        times.append(time.perf_counter() - start)
    page = (output / "report.html").stat().st_size
    return {
        "images": stats["images"],
        "rejected": stats["rejected"],
        "buckets": sum(bucket["images"] > 0 for bucket in stats["buckets"]),
        "job_seconds": job,
        "report_seconds": min(times),
        "report_bytes": page,
        "out_bytes": folder_bytes(output) - page,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-report-bench"))
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dedup", action="store_true", help="keep the job's content dedup on")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    for count in args.sizes:
        folder = corpus(args.workdir, count)
        result = measure(folder, args.workdir / f"out-{count}", args.dedup, args.repeats)
        print(
            f"{count:,} images ({result['images']:,} kept in {result['buckets']} buckets, "
            f"{result['rejected']:,} rejected): the job without the page "
            f"{result['job_seconds']:.1f} s; "
            f"report.html {result['report_seconds']:.2f} s "
            f"({result['report_seconds'] / result['job_seconds']:.2%} of the job), "
            f"{result['report_bytes'] / 1024:,.0f} KiB "
            f"({result['report_bytes'] / result['out_bytes']:.4%} of OUT's "
            f"{result['out_bytes'] / 2**20:,.0f} MiB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
