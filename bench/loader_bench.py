"""The training loader's throughput and time to first batch, against a bare loop in the same run.

    python bench/loader_bench.py                   # 1000 photos prepared once into --workdir

1. Throughput: epochs through `trainer.loader.make_loader` with W workers (0: in the main
   process), float batches delivered, with pooled shared buffers and with plain DataLoader
   batches (`pooled=False`), against W times a bare single-process loop that reads the
   same samples' bytes by offset and decodes them with the same decoder (the loader's overhead
   on top: planning, cropping, re-fitting catch-all batches, tensors, worker IPC, and here the
   float conversion, which a GPU trainer does on the GPU). Each epoch is followed by the bare
   loop over its samples; the medians are reported. The main process converts on one thread,
   leaving the other cores to the workers as a GPU trainer's would; with as many workers as
   cores (W=2 on a 2-core machine) it competes with them for the CPU, so the CPU seconds the
   workers spend a sample are printed too (from /proc): the loader's cost where cores suffice.
2. Time to first batch of an epoch for an index of 1M items (the prepared index repeated):
   reading the index, planning the epoch, starting the workers, loading one batch.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from trainer.augment import CaptionOptions
from trainer.dataset import PreparedData
from trainer.loader import make_loader
from trainer.reader import decode_rgb
from trainer.sampler import EpochBatches


def prepared_dataset(workdir: Path, images: int) -> Path:
    output = workdir / f"loader-prepared-{images}"
    if (output / "manifest.json").exists():
        return output
    import ray

    from pipeline.config import PrepareConfig
    from pipeline.prepare import run

    source = workdir / f"loader-images-{images}"
    rng = np.random.default_rng(0)
    for i in range(images):
        path = source / f"{i:05d}.jpg"
        if not path.exists():
            source.mkdir(parents=True, exist_ok=True)
            width, height = (
                int(v) for v in rng.choice([(1024, 768), (768, 1024), (900, 900), (1280, 544)])
            )
            small = (
                rng.normal(128, 50, (height // 16, width // 16, 3)).clip(0, 255).astype(np.uint8)
            )
            detail = np.asarray(
                Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.float32
            )
            pixels = (detail + rng.normal(0, 6, detail.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run(PrepareConfig(input=str(source), output=str(output), samples_per_shard=100))
    finally:
        ray.shutdown()
    return output


def pillow_decode(data: bytes) -> None:
    Image.open(io.BytesIO(data)).convert("RGB").load()


def bare_rate(data: PreparedData, items: np.ndarray, decode) -> float:
    """Samples/s of one process reading each sample by offset and decoding it, nothing else."""
    rows = pq.read_table(Path(data.root) / "index.parquet").take(items).to_pylist()
    files = {}
    start = time.perf_counter()
    for row in rows:
        stream = files.setdefault(row["shard"], open(Path(data.root) / row["shard"], "rb"))  # noqa: SIM115
        stream.seek(row["image_offset"])
        decode(stream.read(row["image_size"]))
    return len(rows) / (time.perf_counter() - start)


def workers_cpu_seconds() -> float:
    """CPU seconds used so far by this process's live children (the loader's workers)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == os.getpid():  # ppid; then utime and stime, in clock ticks
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Epoch(NamedTuple):
    loader: float  # samples/s
    bare: float  # samples/s of the bare loop over the same samples, right after
    workers_cpu: float  # CPU seconds a sample in the workers (in-process loading: 0)
    trainer_cpu: float  # CPU seconds a sample in the process iterating the loader


AUGMENTED = {
    "flip": 0.5,
    "captions": CaptionOptions(shuffle_tags=True, keep_tokens=1, tag_dropout=0.1),
}


def loader_epochs(
    data: PreparedData,
    batch_size: int,
    workers: int,
    epochs: int,
    pooled: bool = True,
    augmented: bool = False,
    device: str = "cpu",
) -> list[Epoch]:
    """Each epoch through the loader, then a bare loop over the same samples: in turns, so
    that the machine's drift falls on both alike."""
    options = AUGMENTED if augmented else {}
    batches = EpochBatches(data, batch_size, world_size=1, rank=0, seed=0, **options)
    loader = make_loader(data, batches, num_workers=workers, pooled=pooled, device=device)
    next(iter(loader))  # workers started and warm, as in training after the first step
    measured = []
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        start, cpu, children = time.perf_counter(), time.process_time(), workers_cpu_seconds()
        count = sum(len(batch.keys) for batch in loader)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        children = workers_cpu_seconds() - children
        bare = bare_rate(data, batches.plan()[0].items.ravel(), decode_rgb)
        measured.append(Epoch(count / seconds, bare, children / count, cpu / count))
    return measured


def sampler_seconds(data: PreparedData, batch_size: int, options: dict) -> float:
    """Seconds a sample of iterating EpochBatches alone: what the trainer's process decides."""
    batches = EpochBatches(data, batch_size, world_size=1, rank=0, seed=0, **options)
    start, count = time.perf_counter(), 0
    for epoch in range(3):
        batches.set_epoch(epoch)
        count += sum(len(plan.keys) for plan in batches)
    return (time.perf_counter() - start) / count


def first_batch_seconds(prepared: Path, workdir: Path, items: int, batch_size: int) -> float:
    big = workdir / f"loader-index-{items}"
    if not (big / "manifest.json").exists():
        big.mkdir(parents=True, exist_ok=True)
        index = pq.read_table(prepared / "index.parquet")
        repeats = -(-items // len(index))
        tiled = pa.concat_tables([index] * repeats).slice(0, items)
        pq.write_table(tiled, big / "index.parquet")
        shutil.rmtree(big / "shards", ignore_errors=True)
        (big / "shards").symlink_to((prepared / "shards").resolve())
        (big / "manifest.json").write_text((prepared / "manifest.json").read_text())
    start = time.perf_counter()
    data = PreparedData(big)
    batches = EpochBatches(data, batch_size, world_size=8, rank=3, seed=0)
    batches.set_epoch(7)
    next(iter(make_loader(data, batches, num_workers=2)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-bench"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--index-items", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="where batches land (cuda: pinned, async)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    prepared = prepared_dataset(args.workdir, args.images)
    data = PreparedData(prepared)
    plan = EpochBatches(data, args.batch_size, 1, 0, 0).plan()[0]
    pillow = bare_rate(data, plan.items.ravel(), pillow_decode)
    print(f"{len(data)} samples in {prepared}, {plan.catch_all_items} an epoch in catch-all")
    print(f"batches; a bare read-by-offset + decode loop with Pillow: {pillow:.1f} samples/s")
    print(f"\n1. loader throughput, medians of {args.epochs} epochs, each followed by a bare loop")
    print("   over the same samples with the loader's decoder (libjpeg-turbo, simplejpeg):")
    for workers in args.workers:
        epochs = loader_epochs(data, args.batch_size, workers, args.epochs, device=args.device)
        medians = Epoch(*(statistics.median(column) for column in zip(*epochs, strict=True)))
        rate, bare = medians.loader, medians.bare
        ratio = statistics.median(e.loader / (max(workers, 1) * e.bare) for e in epochs)
        print(
            f"   {workers} worker(s): {rate:6.1f} samples/s, bare {bare:6.1f}: {ratio:.2f}x of "
            f"{max(workers, 1)} x bare ({rate / (max(workers, 1) * pillow):.2f}x of Pillow's)"
        )
        if workers:
            print(
                f"      CPU per sample: workers {medians.workers_cpu * 1e3:.2f} ms against the bare"
                f" loop's {1e3 / bare:.2f} ms ({1 / bare / medians.workers_cpu:.2f}x), trainer "
                f"process {medians.trainer_cpu * 1e3:.2f} ms"
            )
            plain = loader_epochs(
                data, args.batch_size, workers, args.epochs, pooled=False, device=args.device
            )
            plain_ratio = statistics.median(e.loader / (workers * e.bare) for e in plain)
            print(
                f"      plain DataLoader batches (pooled=False, a fresh buffer each): "
                f"{statistics.median(e.loader for e in plain):6.1f} samples/s, "
                f"{plain_ratio:.2f}x of {workers} x bare: the pool gives {ratio / plain_ratio:.2f}x"
            )
            augmented = loader_epochs(
                data, args.batch_size, workers, args.epochs, augmented=True, device=args.device
            )
            augmented_ratio = statistics.median(e.loader / (workers * e.bare) for e in augmented)
            print(
                f"      with flips (0.5) and tag shuffling and dropout: "
                f"{statistics.median(e.loader for e in augmented):6.1f} samples/s, "
                f"{augmented_ratio:.2f}x of {workers} x bare: {augmented_ratio / ratio:.2f}x of "
                "the loader without them"
            )
    print("   (the trainer process converts to float on the CPU here, on the GPU in training)")
    sampler_costs = {
        name: sampler_seconds(data, args.batch_size, options)
        for name, options in (("plain", {}), ("augmented", AUGMENTED))
    }
    print(
        f"   the sampler alone (plan, keys, captions, crops, SDXL's conditioning): "
        f"{sampler_costs['plain'] * 1e6:.1f} us a sample, with flips and tag augmentation "
        f"{sampler_costs['augmented'] * 1e6:.1f} us"
    )
    seconds = first_batch_seconds(prepared, args.workdir, args.index_items, args.batch_size)
    print(f"\n2. time to first batch, {args.index_items:,}-item index: {seconds:.2f} s")
    print("   (reading the index, planning the epoch, starting the workers, loading the batch)")


if __name__ == "__main__":
    main()
