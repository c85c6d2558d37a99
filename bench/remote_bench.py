"""Training from an object store against local files, and the index's memory per node.

    python bench/remote_bench.py                      # both sections
    python bench/remote_bench.py --sections 2 --rows 1000000,10000000

1. Throughput from a loopback S3 server (moto's, in a process of its own) against the same
   shards on local disk, one run: samples/s of an epoch through `make_loader` with a cold cache
   and a warm one, for the global and the shard-aware shuffle, the cache's hits and downloads
   (the loader reads in the main process here, `--workers 0`, so that the cache's counts are
   this process's), and the time to the first batch. The cache holds a third of the dataset.
   A warm row is the median of `--repeats` epochs, each beside a local epoch run just before it,
   and its ratio the median of theirs: on a shared machine a ratio of one pair drifts less than
   one of epochs minutes apart. CPU us/batch: this process's CPU time a batch (its threads'
   included), an S3 row's over its local epoch's: what the cache costs a batch, less sensitive
   than the rate to others' load.
   Beside it, reading each image by a ranged GET instead of whole shards.
2. The index: a synthetic index.parquet of R rows with Danbooru-like tag captions (~390
   characters), opened by 8 processes at once: each process's memory over its baseline (PSS,
   which divides shared pages among their users) and the sum, mapped from the node's Arrow IPC
   files (trainer/index_map.py) against each reading index.parquet into its own memory (as the
   trainer did before); and the time to open it.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from loader_bench import prepared_dataset

from trainer.dataset import PreparedData
from trainer.loader import make_loader
from trainer.sampler import EpochBatches
from trainer.storage import NodeCache

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 8


def moto_server(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    raise RuntimeError("moto's server did not start")


def upload(folder: Path, port: int) -> str:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    client.create_bucket(Bucket="bench")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), "bench", f"out/{path.relative_to(folder).as_posix()}")
    return f"s3://bench/out?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


class Epoch(NamedTuple):
    rate: float  # samples/s
    first: float  # seconds to the first batch
    cpu: float  # this process's CPU seconds a batch, its threads' included (--workers 0: all)


def epoch(data, shuffle: str, window: int, workers: int, batch_size: int) -> Epoch:
    batches = EpochBatches(
        data, batch_size, world_size=1, rank=0, seed=0, shuffle=shuffle, window=window
    )
    start, cpu = time.perf_counter(), time.process_time()
    loader, first, samples, count = make_loader(data, batches, num_workers=workers), None, 0, 0
    for batch in loader:
        first = first or time.perf_counter() - start
        samples, count = samples + len(batch.keys), count + 1
    cpu = (time.process_time() - cpu) / count
    return Epoch(samples / (time.perf_counter() - start), first, cpu)


def throughput(
    workdir: Path,
    images: int,
    workers: int,
    batch_size: int,
    window: int,
    shuffles: list[str],
    repeats: int,
) -> None:
    import os

    local = prepared_dataset(workdir, images)
    tars = sorted((local / "shards").glob("*.tar"))
    total = sum(p.stat().st_size for p in tars)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server(port)
    try:
        uri = upload(local, port)
        limit = total // 3
        print(
            f"\n1. {images} images in {len(tars)} shards ({total / 2**20:.0f} MiB), cache limit "
            f"{limit / 2**20:.0f} MiB, batch {batch_size}, --shuffle-window {window}, "
            f"{workers} workers; a warm row: the medians of {repeats} epochs, each ratio to a "
            "local epoch run just before it"
        )
        print(
            f"{'source':<26}{'shuffle':<9}{'samples/s':>10}{'x local':>9}{'first batch':>13}"
            f"{'CPU us/batch':>13}{'hits':>7}{'downloads':>11}"
        )
        for shuffle in shuffles:
            run = partial(
                epoch, shuffle=shuffle, window=window, workers=workers, batch_size=batch_size
            )
            here = PreparedData(local)
            rate, first, cpu = run(here)
            print(
                f"{'local disk':<26}{shuffle:<9}{rate:>10.0f}{1:>9.2f}{first:>12.2f}s"
                f"{1e6 * cpu:>13.0f}"
            )
            for size, states in (
                (limit, ("cold cache", "warm cache")),
                (2 * total, ("cache > data, cold", "cache > data, warm")),
            ):
                cache_dir = workdir / f"remote-cache-{shuffle}"
                shutil.rmtree(cache_dir, ignore_errors=True)
                cache = NodeCache(cache_dir, size)
                data = PreparedData(uri, cache=cache)
                remote_epochs(data, here, cache, states, shuffle, run, repeats)
        print(
            f"randomness: two images of one shard lie {spread(local, 'global', window):.3f} "
            f"of an epoch apart under the global shuffle, {spread(local, 'shards', window):.3f} "
            "under the shard-aware one"
        )
        ranged_reads(local, uri)
    finally:
        server.terminate()
        server.wait()


def remote_epochs(data, here, cache, states, shuffle, run, repeats) -> None:
    """A row per state of `data` through `cache`: samples/s, its ratio to an epoch of `here`
    (local disk) run just before it, the time to the first batch, the CPU time a batch over the
    local epoch's, hits and downloads an epoch. A warm state's figures are the medians of
    `repeats` such pairs: the ratio of a pair cancels the load that others' work puts on the
    machine meanwhile, and CPU time is less sensitive to it than the rate."""
    for state in states:
        before = cache.counts()
        pairs = [(run(here), run(data)) for _ in range(repeats if "warm" in state else 1)]
        fetched = (a - b for a, b in zip(cache.counts(), before, strict=True))
        hits, downloads = (round(count / len(pairs)) for count in fetched)
        remote_rate = statistics.median(remote.rate for _, remote in pairs)
        ratios = sorted(remote.rate / local.rate for local, remote in pairs)
        first = statistics.median(remote.first for _, remote in pairs)
        extra = statistics.median(1e6 * (remote.cpu - local.cpu) for local, remote in pairs)
        span = f"  ratios {ratios[0]:.2f}-{ratios[-1]:.2f}" if len(ratios) > 1 else ""
        print(
            f"{'S3, ' + state:<26}{shuffle:<9}{remote_rate:>10.0f}{statistics.median(ratios):>9.2f}"
            f"{first:>12.2f}s{extra:>+13.0f}{hits:>7}{downloads:>11}{span}"
        )


def spread(local: Path, shuffle: str, window: int) -> float:
    """Mean distance in the epoch, as a share of it, between two images of one shard paired at
    random (a uniform shuffle: 1/3)."""
    data = PreparedData(local)
    batches = EpochBatches(data, 8, world_size=1, rank=0, seed=0, shuffle=shuffle, window=window)
    plan = batches.plan()[0]
    position = np.empty(len(data))
    position[plan.items.ravel()] = np.repeat(np.arange(len(plan)), plan.items.shape[1])
    kept = np.random.default_rng(0).permutation(plan.items.ravel())
    shard = data.columns.shard
    kept = kept[np.argsort(shard[kept], kind="stable")][: len(kept) // 2 * 2].reshape(-1, 2)
    same = shard[kept[:, 0]] == shard[kept[:, 1]]
    return float(np.mean(np.abs(position[kept[same, 0]] - position[kept[same, 1]])) / len(plan))


def ranged_reads(local: Path, uri: str, samples: int = 300) -> None:
    """An image a GET by byte range (no cache), against whole shards."""
    from pipeline.format import split_uri

    index = pq.read_table(local / "index.parquet", columns=["shard", "image_offset", "image_size"])
    rows = np.random.default_rng(0).choice(len(index), min(samples, len(index)), replace=False)
    filesystem, root = split_uri(uri)
    start = time.perf_counter()
    for row in index.take(rows).to_pylist():
        with filesystem.open_input_file(f"{root}/{row['shard']}") as file:
            file.read_at(row["image_size"], row["image_offset"])
    rate = len(rows) / (time.perf_counter() - start)
    print(
        f"ranged GETs, one an image, no decode: {rate:.0f} images/s "
        f"({1000 / rate:.1f} ms each on loopback; an S3 GET's first byte is 10-50 ms)"
    )


def synthetic_index(path: Path, rows: int) -> None:
    """index.parquet of `rows` rows, 1,000 a shard, each caption 30 tags of a 5,000-tag vocabulary
    (390 characters), written in row groups of 1M rows."""
    rng = np.random.default_rng(0)
    vocabulary = np.array([f"tag_{i:07d}, ".encode() for i in range(5000)])  # 13 bytes
    writer = None
    for begin in range(0, rows, 1_000_000):
        count = min(1_000_000, rows - begin)
        text = vocabulary[rng.integers(0, 5000, (count, 30))].tobytes()
        offsets = np.arange(count + 1, dtype=np.int64) * 390
        buffers = pa.py_buffer(offsets), pa.py_buffer(text)
        captions = pa.LargeStringArray.from_buffers(count, *buffers).cast(pa.string())
        ids = np.arange(begin, begin + count)
        zeros = np.zeros(count, np.int32)
        table = pa.table(
            {
                "key": pa.array(np.char.mod("%09d", ids)),
                "caption": captions,
                "shard": pa.array(np.char.mod("shards/%06d.tar", ids // 1000)),
                "image_offset": ids * 100_000,
                "image_size": np.full(count, 90_000),
                "bucket": zeros,
                "width": zeros + 768,
                "height": zeros + 512,
                "stored_width": zeros + 768,
                "stored_height": zeros + 512,
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


OPEN = {
    "mapped": (
        "from trainer.index_map import MappedIndex\nfrom trainer.storage import DatasetFiles, "
        "NodeCache\nindex = MappedIndex(DatasetFiles(FOLDER, NodeCache(FOLDER + '/cache')))\n"
        "keys = index.strings('key', np.arange(0, len(index), 9973))\n"
        "captions = index.strings('caption', np.arange(0, len(index), 9973))\n"
        "touched = sum(int(np.frombuffer(b, np.uint8)[::4096].sum()) for t in (index.numbers, "
        "index.text) for c in t.columns for k in c.chunks for b in k.buffers() if b is not None)\n"
    ),
    "index.parquet per process": (
        "import pyarrow.parquet as pq\nfrom pipeline.format import INDEX_COLUMNS\n"
        "index = pq.read_table(FOLDER + '/index.parquet', columns=INDEX_COLUMNS)\n"
    ),
}
CHILD = (
    "import sys, time, numpy as np\nFOLDER = sys.argv[1]\n"
    "from trainer.index_map import MappedIndex\nimport pyarrow.parquet\n"
    "start = time.perf_counter()\n{open}print(time.perf_counter() - start, flush=True)\n"
    "sys.stdin.read()\n"
)


def available_bytes() -> int:
    with open("/proc/meminfo") as file:
        return next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable"))


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("Pss:"))


def index_memory(workdir: Path, rows: int) -> None:
    folder = workdir / f"index-{rows}"
    if not (folder / "index.parquet").exists():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        synthetic_index(folder / "index.parquet", rows)
        print(f"(built {rows:,} rows in {time.perf_counter() - started:.0f} s)")
    shutil.rmtree(folder / "cache", ignore_errors=True)
    parquet_mib = (folder / "index.parquet").stat().st_size / 2**20
    print(
        f"\n2. index of {rows:,} rows (index.parquet {parquet_mib:.0f} MiB), {PROCESSES} processes"
    )
    baseline = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(open=""), str(folder)],
        cwd=REPO,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    baseline.stdout.readline()
    for name, code in OPEN.items():
        if name == "mapped":  # the first process of the node converts; time it alone
            first = subprocess.run(
                [sys.executable, "-c", CHILD.format(open=code), str(folder)],
                cwd=REPO,
                input="",
                text=True,
                capture_output=True,
            )
            print(f"  first open of the node (converts to Arrow IPC): {float(first.stdout):.1f} s")
        command = [sys.executable, "-c", CHILD.format(open=code), str(folder)]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        # Parquet readers that would not fit in this machine's memory together: one, times 8
        fits = name == "mapped" or rows * 900 * PROCESSES < 0.6 * available_bytes()
        processes = PROCESSES if fits else 1
        children = [
            subprocess.Popen(command, cwd=REPO, text=True, **pipes) for _ in range(processes)
        ]
        try:
            seconds = [float(child.stdout.readline()) for child in children]
            empty = pss_kib(baseline.pid)  # now: the libraries' pages shared as the children's
            grown = [(pss_kib(child.pid) - empty) / 1024 for child in children]
        finally:
            for child in children:
                child.communicate("")
        summed = sum(grown) * PROCESSES / processes
        alone = "" if fits else f" (1 process run: {PROCESSES} would not fit here)"
        print(
            f"  {name:<27} open {statistics.median(seconds):5.2f} s; per process "
            f"{statistics.median(grown):7.0f} MiB; over {PROCESSES}: {summed:7.0f} MiB{alone}"
        )
    baseline.communicate("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-bench"))
    parser.add_argument("--sections", default="1,2")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--window", type=int, default=4, help="--shuffle-window, in shards")
    parser.add_argument("--shuffles", default="global,shards", help="section 1's, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="epochs a warm row's medians are of")
    parser.add_argument("--rows", default="1000000", help="index sizes, comma-separated")
    args = parser.parse_args()
    sections = {int(s) for s in args.sections.split(",")}
    if 1 in sections:
        shuffles = args.shuffles.split(",")
        throughput(
            args.workdir,
            args.images,
            args.workers,
            args.batch_size,
            args.window,
            shuffles,
            args.repeats,
        )
    if 2 in sections:
        for rows in (int(r) for r in args.rows.split(",")):
            index_memory(args.workdir, rows)


if __name__ == "__main__":
    main()
