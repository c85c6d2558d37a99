"""The trainer and its loader on a real prepared dataset, with real torchrun (gloo) processes."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SMALL_BUCKETS, prepare_small, ray_started
from images import rgb
from PIL import Image
from torchrun import torchrun as run_torchrun

from pipeline.fit import fit
from trainer.dataset import PreparedData
from trainer.loader import make_loader, to_float
from trainer.reader import POOL_BUFFERS, decode_rgb
from trainer.sampler import EpochBatches

REPO = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, data: Path, work: Path, *args: str) -> dict[int, list[dict]]:
    """Run the trainer under torchrun; each rank's logged batches, in order."""
    log = work / "batches.jsonl"
    done = run_torchrun(
        nproc,
        "tests/logged_train.py",
        str(log),
        f"--data={data}",
        f"--out-dir={work / 'checkpoints'}",
        "--num-workers=1",
        "--channels=8",
        *args,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    by_rank = defaultdict(list)
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        by_rank[entry["rank"]].append(entry)
    return dict(by_rank)


@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory) -> dict[int, list[dict]]:
    return torchrun(
        2,
        prepared,
        tmp_path_factory.mktemp("reference"),
        "--batch-size=3",
        "--epochs=3",
        "--lr=3e-3",
    )


@pytest.mark.slow
def test_two_ranks_run_the_same_steps_on_uneven_buckets(prepared, reference_run):
    n_items = len(PreparedData(prepared))
    assert set(reference_run) == {0, 1}
    assert len(reference_run[0]) == len(reference_run[1]) == 3 * (n_items // 6)
    buckets = {tuple(b) for b in PreparedData(prepared).buckets.tolist()}
    for entries in reference_run.values():
        for entry in entries:
            batch, channels, height, width = entry["shape"]
            assert batch == 3 and channels == 3 and (width, height) in buckets
    for epoch in range(3):
        keys = [
            [k for e in reference_run[r] if e["epoch"] == epoch for k in e["keys"]] for r in (0, 1)
        ]
        assert not set(keys[0]) & set(keys[1]), "ranks are disjoint"
        assert len(set(keys[0]) | set(keys[1])) == n_items - n_items % 6


@pytest.mark.slow
def test_the_loss_falls(reference_run):
    losses = [[e["loss"] for e in reference_run[0] if e["epoch"] == epoch] for epoch in range(3)]
    assert np.mean(losses[2]) < np.mean(losses[0])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 3])
def test_the_same_data_for_other_world_sizes(prepared, tmp_path, world_size):
    runs = torchrun(world_size, prepared, tmp_path, "--batch-size=2", "--epochs=1")
    n_items = len(PreparedData(prepared))
    assert len({len(entries) for entries in runs.values()}) == 1 and len(runs) == world_size
    keys = [k for entries in runs.values() for e in entries for k in e["keys"]]
    assert len(keys) == len(set(keys)) == n_items - n_items % (2 * world_size)


@pytest.mark.slow
def test_resume_continues_with_the_same_batches(prepared, reference_run, tmp_path):
    first = torchrun(
        2, prepared, tmp_path, "--batch-size=3", "--epochs=3", "--lr=3e-3", "--max-steps=4"
    )
    resumed = torchrun(
        2, prepared, tmp_path, "--batch-size=3", "--epochs=3", "--lr=3e-3", "--resume"
    )
    for rank in (0, 1):
        entries = resumed[rank]  # the log holds both runs: the first 4 steps, then the rest
        assert [e["step"] for e in entries[:4]] == [0, 1, 2, 3] and entries[4]["step"] == 4
        seen = [(e["epoch"], e["step"], e["keys"], e["checksum"]) for e in entries]
        expected = [(e["epoch"], e["step"], e["keys"], e["checksum"]) for e in reference_run[rank]]
        assert seen == expected
    assert first.keys() == {0, 1}


@pytest.mark.slow
def test_same_seed_same_batches_and_each_epoch_a_new_order(prepared, reference_run, tmp_path):
    again = torchrun(2, prepared, tmp_path, "--batch-size=3", "--epochs=3", "--lr=3e-3")
    strip = lambda run: [(e["epoch"], e["step"], e["keys"], e["checksum"]) for e in run[0]]  # noqa: E731
    assert strip(again) == strip(reference_run)
    epochs = [[tuple(e["keys"]) for e in reference_run[0] if e["epoch"] == n] for n in range(2)]
    assert epochs[0] != epochs[1]


class _Bomb:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_member_in_a_shard_is_never_run(prepared, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(prepared, data_dir)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Bomb(str(marker)))
    for shard in sorted((data_dir / "shards").glob("*.tar")):
        with tarfile.open(shard, "a") as tar:  # appended: earlier members keep their offsets
            key = tar.getnames()[0].split(".")[0]
            for extension in ("pyd", "pickle"):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = PreparedData(data_dir)
    batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=0)
    loaded = [batch for batch in make_loader(data, batches, num_workers=0)]
    assert sum(len(b.keys) for b in loaded) == len(data) - len(data) % 2
    assert not marker.exists()


def test_loader_batches_and_resume_in_process(prepared):
    data = PreparedData(prepared)
    batches = EpochBatches(data, batch_size=4, world_size=1, rank=0, seed=5)
    loader = make_loader(data, batches, num_workers=2)
    full = list(loader)
    assert all(b.pixels.dtype == torch.float32 and b.pixels.shape[:2] == (4, 3) for b in full)
    assert all(b.pixels.min() >= -1.0 and b.pixels.max() <= 1.0 for b in full)
    assert all(c.startswith("caption ") for b in full for c in b.captions)
    plan = batches.plan()[0]
    for batch, bucket in zip(full, plan.bucket, strict=True):
        assert tuple(batch.pixels.shape[2:][::-1]) == tuple(data.buckets[bucket])
    batches.set_epoch(0, start_step=3)
    tail = list(loader)
    assert [b.step for b in tail] == list(range(3, len(full)))
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(tail, full[3:], strict=True))


@pytest.fixture(scope="module")
def prepared_png(tmp_path_factory) -> Path:
    return prepare_small(tmp_path_factory.mktemp("png"), image_format="png")


@pytest.mark.parametrize("dataset", ["prepared", "prepared_png"])
def test_each_sample_is_a_bucket_sized_window_of_its_stored_image(dataset, request):
    """The crop of the overflow: a window of the stored pixels, moving with the epoch."""
    prepared = request.getfixturevalue(dataset)
    data = PreparedData(prepared)
    batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=3)
    loader = make_loader(data, batches, num_workers=1)
    rows = {row["key"]: row for row in pq.read_table(prepared / "index.parquet").to_pylist()}
    windows, resampled = defaultdict(set), 0
    for epoch in range(4):
        batches.set_epoch(epoch)
        for batch in loader:
            pixels = ((batch.pixels.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8)
            for key, sample in zip(batch.keys, pixels.numpy(), strict=True):
                row = rows[key]
                with open(prepared / row["shard"], "rb") as shard:
                    shard.seek(row["image_offset"])
                    stored = np.asarray(Image.open(io.BytesIO(shard.read(row["image_size"]))))
                (height, width), (bucket_h, bucket_w) = stored.shape[:2], sample.shape[:2]
                scaled = fit(width, height, bucket_w, bucket_h)
                if scaled != (width, height) and not (row["crop_left"] or row["crop_top"]):
                    # re-fitted from the source's size (the stored one could round a pixel apart)
                    scaled = fit(row["width"], row["height"], bucket_w, bucket_h)
                if scaled != (width, height):  # a catch-all member re-fitted to another bucket
                    resampled += 1
                    reference = np.asarray(
                        Image.fromarray(stored).resize(scaled, Image.Resampling.BICUBIC), float
                    )
                    errors = [
                        np.abs(reference[top : top + bucket_h, left : left + bucket_w] - sample)
                        for top in range(scaled[1] - bucket_h + 1)
                        for left in range(scaled[0] - bucket_w + 1)
                    ]
                    assert min(error.mean() for error in errors) < 1.0, "Pillow's bicubic"
                    continue
                found = [
                    (left, top)
                    for top in range(height - bucket_h + 1)
                    for left in range(width - bucket_w + 1)
                    if np.array_equal(stored[top : top + bucket_h, left : left + bucket_w], sample)
                ]
                assert found, f"{key}: not a window of its stored image"
                windows[key].update(found)
    overflowing = [key for key, found in windows.items() if len(found) > 1]
    assert len(windows) == len(data) and 0 < resampled < len(windows)
    assert overflowing, "some crops move from epoch to epoch"
    offsets = [offset for found in windows.values() for offset in found]
    assert any(left for left, _ in offsets) and any(top for _, top in offsets), "both overflows"


def assert_same_batches(delivered: list, expected: list) -> None:
    """(keys, pixels) pairs equal one by one, pixels bit for bit."""
    for (keys, pixels), (expected_keys, expected_pixels) in zip(delivered, expected, strict=True):
        assert keys == expected_keys and torch.equal(pixels, expected_pixels)


def test_workers_reusing_their_buffers_deliver_the_in_process_pixels(prepared):
    """Several epochs of more batches than a worker has pooled buffers: every pixel right."""
    data = PreparedData(prepared)
    expected, delivered = [], []
    for workers, out in ((0, expected), (2, delivered)):
        batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=1)
        loader = make_loader(data, batches, num_workers=workers, prefetch_factor=4)
        for epoch in range(3):
            batches.set_epoch(epoch)
            out.extend((b.keys, b.pixels) for b in loader)
    assert len(delivered) == len(expected) > 3 * POOL_BUFFERS
    assert_same_batches(delivered, expected)


class RecordingDataLoader:
    """Iterates a loader's DataLoader, noting the worker pool (None: one-off) of each buffer."""

    def __init__(self, dataloader):
        self.dataloader, self.pools = dataloader, []

    def __iter__(self):
        for batch, layout in self.dataloader:
            self.pools.append(layout.lease.worker)
            yield batch, layout


def test_leaving_epochs_early_loses_no_pooled_buffer(prepared):
    """Batches in flight when a loop breaks are dropped by the DataLoader, not their buffers."""
    data = PreparedData(prepared)
    delivered = {}
    for workers in (0, 1):
        batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=2)
        loader = make_loader(data, batches, num_workers=workers, prefetch_factor=3)
        loader.dataloader = recording = RecordingDataLoader(loader.dataloader)
        delivered[workers] = []
        for epoch in range(4 * POOL_BUFFERS):
            batches.set_epoch(epoch)
            for step, batch in enumerate(loader):
                delivered[workers].append((batch.keys, batch.pixels))
                if step == 1:
                    break  # with 3 more batches prefetched
    assert None not in recording.pools, "every batch in a pooled buffer"
    assert_same_batches(*delivered.values())


def test_spawned_workers_deliver_the_same_batches(prepared):
    """Workers started with spawn (macOS's default) get everything they need by pickling."""
    data = PreparedData(prepared)
    delivered = {}
    for workers, start_method in ((0, None), (1, "spawn")):
        batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=4)
        loader = make_loader(data, batches, num_workers=workers, start_method=start_method)
        delivered[workers] = []
        for epoch in range(2):
            batches.set_epoch(epoch)
            delivered[workers] += [(b.keys, b.pixels) for b in loader]
    assert_same_batches(*delivered.values())
    # what a spawned worker is sent: how to open the dataset, not a copy of its index
    assert len(pickle.dumps(data)) < 2000
    assert np.array_equal(
        pickle.loads(pickle.dumps(data)).columns.image_offset, data.columns.image_offset
    )


def test_a_dataloader_consumer_that_keeps_its_batches_gets_distinct_buffers(prepared):
    """Without the Loader handing buffers back, workers never overwrite a batch held."""
    data = PreparedData(prepared)
    batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=1)
    expected = [b.pixels for b in make_loader(data, batches, num_workers=0)]
    kept = list(make_loader(data, batches, num_workers=2).dataloader)
    assert len(kept) > POOL_BUFFERS
    buffers = {layout.lease.buffer.untyped_storage().data_ptr() for _, layout in kept}
    assert len(buffers) == len(kept), "every batch in a buffer of its own"
    for (_, layout), pixels in zip(kept, expected, strict=True):
        assert torch.equal(to_float(layout.lease.buffer, layout), pixels)


@pytest.mark.parametrize("pooled", [True, False])
def test_pooled_and_plain_dataloader_batches_are_the_same(prepared, pooled, monkeypatch):
    """The pool is a speed switch: plain DataLoader batches (a fresh buffer each) are the same
    pixels; so are float batches when torch's storage use count (a private API) is missing."""
    data = PreparedData(prepared)
    batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=6)
    expected = [(b.keys, b.pixels.clone()) for b in make_loader(data, batches, num_workers=0)]
    if not pooled:
        monkeypatch.delattr(torch._C, "_storage_Use_Count", raising=False)
    loader = make_loader(data, batches, num_workers=1, pooled=pooled)
    assert (loader.pool is not None) == pooled
    assert_same_batches([(b.keys, b.pixels.clone()) for b in loader], expected)


def test_a_dataset_without_manifest_is_refused(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "half")
    (tmp_path / "half" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest"):
        PreparedData(tmp_path / "half")


@pytest.mark.parametrize("pillow_format", ["JPEG", "PNG", "WEBP"])
def test_decode_rgb_gives_pillows_pixels(pillow_format):
    buffer = io.BytesIO()
    rgb(96, 64, 3).save(buffer, pillow_format)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert np.array_equal(decode_rgb(buffer.getvalue()), expected)
    for scratch_size in (96 * 64 * 3 - 1, 96 * 64 * 3, 100_000):  # short, exact, roomy
        scratch = np.zeros(scratch_size, dtype=np.uint8)
        assert np.array_equal(decode_rgb(buffer.getvalue(), scratch), expected)


@pytest.mark.slow
def test_two_ranks_train_a_hypernetwork_in_step(prepared, tmp_path):
    """The source's use: hypernetworks on a frozen U-Net, DDP over 2 ranks, loss falls."""
    runs = torchrun(
        2,
        prepared,
        tmp_path,
        "--model=sd",
        "--epochs=12",
        "--batch-size=4",
        "--lr=1e-2",
        "--caption-dropout=0",
    )
    first, second = runs[0], runs[1]
    assert len(first) == len(second) >= 36
    for a, b in zip(first, second, strict=True):
        assert a["weights"] == b["weights"], "the ranks' hypernetworks agree after every step"
    losses = np.array([(a["loss"] + b["loss"]) / 2 for a, b in zip(first, second, strict=True)])
    assert losses[-10:].mean() < 0.97 * losses[:10].mean()
    assert (tmp_path / "checkpoints" / "hypernetwork.safetensors").exists()


@pytest.mark.slow
def test_more_shards_than_open_files_allowed(tmp_path):
    """400 shards of one image each, read under `ulimit -n 128` (10M images at 1000 a shard are
    10,000 shards, over the usual 1024): the loader bounds the shards it keeps open."""
    from pipeline.config import PrepareConfig
    from pipeline.prepare import run

    (tmp_path / "images").mkdir()
    for i in range(400):
        pixels = np.full((64, 64, 3), i % 256, np.uint8)
        pixels[..., 1] = i // 256  # 400 distinct images: no two the same bytes (duplicates)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i:03d}.png")
    with ray_started():
        run(
            PrepareConfig(
                input=str(tmp_path / "images"),
                output=str(tmp_path / "out"),
                buckets=SMALL_BUCKETS,
                samples_per_shard=1,
            )
        )
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
        "from trainer.dataset import PreparedData\nfrom trainer.loader import make_loader\n"
        "from trainer.sampler import EpochBatches\n"
        f"data = PreparedData({str(tmp_path / 'out')!r})\n"
        "batches = EpochBatches(data, batch_size=8, world_size=1, rank=0)\n"
        "for workers in (0, 1):\n"
        "    seen = sum(len(b.keys) for b in make_loader(data, batches, num_workers=workers))\n"
        "    assert seen == 400, seen\n"
        "print('read', seen)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "read 400" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_train_sdxl_with_each_batchs_conditioning(prepared, tmp_path):
    """A tiny SDXL, hypernetwork per depth, flips and shuffled tags, 2 ranks in step."""
    runs = torchrun(
        2,
        prepared,
        tmp_path,
        "--model=sdxl",
        "--epochs=2",
        "--batch-size=3",
        "--lr=1e-2",
        "--flip=0.5",
        "--shuffle-tags",
        "--caption-dropout=0",
    )
    first, second = runs[0], runs[1]
    assert len(first) == len(second) > 4
    rows = {row["key"]: row for row in pq.read_table(prepared / "index.parquet").to_pylist()}
    for a, b in zip(first, second, strict=True):
        assert a["weights"] == b["weights"], "the ranks' hypernetworks agree after every step"
        for entry in (a, b):
            assert np.isfinite(entry["loss"])
            for key, size, target in zip(
                entry["keys"], entry["original_size"], entry["target_size"], strict=True
            ):
                assert size == [rows[key]["height"], rows[key]["width"]]
                assert target == entry["shape"][2:]
    assert (tmp_path / "checkpoints" / "hypernetwork.safetensors").exists()
