"""Training from an object store: a dataset prepared to s3:// (moto's server on 127.0.0.1) reads
as its local copy through the node cache; downloads are atomic, once per node, evicted least
recently used; the index mapped once per node is held once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_BUCKETS, prepare_small, ray_started
from images import rgb, save
from torchrun import REPO, logged_training

from pipeline.config import PrepareConfig
from pipeline.errors import UsageError
from pipeline.prepare import run
from trainer import storage
from trainer.dataset import PreparedData
from trainer.index_map import MappedIndex
from trainer.loader import make_loader
from trainer.mixture import open_datasets
from trainer.sampler import EpochBatches
from trainer.storage import CHUNK_BYTES, PARTIAL_MARK, DatasetFiles, FileRef, NodeCache, OpenFiles


@pytest.fixture(scope="module")
def datasets(s3_server, tmp_path_factory) -> tuple[Path, str]:
    """The small example prepared to a local OUT and, by the job itself, to s3://prepared/out."""
    folder = tmp_path_factory.mktemp("remote")
    local = prepare_small(folder)
    s3_server.client.create_bucket(Bucket="prepared")
    uri = s3_server.uri("prepared", "out")
    with ray_started():
        run(
            PrepareConfig(
                input=str(folder / "images"), output=uri, buckets=SMALL_BUCKETS, samples_per_shard=5
            )
        )
    return local, uri


def shard_bytes(local: Path) -> list[int]:
    return sorted(path.stat().st_size for path in (local / "shards").glob("*.tar"))


def loaded(data, shuffle: str, workers: int, epochs: int = 2) -> list[tuple]:
    """(epoch, step, bucket shape, keys, pixel sum) of every batch of a rank of 2."""
    batches = EpochBatches(
        data, batch_size=2, world_size=2, rank=1, seed=5, shuffle=shuffle, window=2
    )
    loader, seen = make_loader(data, batches, num_workers=workers), []
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        seen += [
            (b.epoch, b.step, tuple(b.pixels.shape), tuple(b.keys), float(b.pixels.double().sum()))
            for b in loader
        ]
    return seen


def test_a_remote_dataset_loads_the_batches_of_its_local_copy(datasets, tmp_path):
    local, uri = datasets
    sizes = shard_bytes(local)
    limit = sum(sizes[-3:])  # three shards of the seven: the window's two and one more
    cache = NodeCache(tmp_path / "cache", limit)
    remote, here = PreparedData(uri, cache=cache), PreparedData(local)
    assert [f.name for f in remote.columns.shard_paths] == [
        f.name for f in here.columns.shard_paths
    ]
    for name in ("bucket", "shard", "image_offset", "image_size", "original", "stored"):
        assert np.array_equal(getattr(remote.columns, name), getattr(here.columns, name)), name
    items = np.arange(len(here))
    assert remote.keys(items) == here.keys(items) and remote.captions(items) == here.captions(items)
    for shuffle in ("shards", "global"):
        assert loaded(remote, shuffle, workers=0) == loaded(here, shuffle, workers=0), shuffle
    hits, downloads = cache.counts()
    assert downloads >= len(sizes) and hits > 0
    cached = [p for p in (tmp_path / "cache").rglob("*.tar") if PARTIAL_MARK not in p.name]
    assert sum(p.stat().st_size for p in cached) <= limit, "the cache keeps to its limit"
    assert len(cached) < len(sizes)
    # Loader workers fetch (and prefetch) through the same cache, from a cold one too
    cold = PreparedData(uri, cache=NodeCache(tmp_path / "cold", limit))
    assert loaded(cold, "shards", workers=1) == loaded(here, "shards", workers=0)


def test_the_shard_aware_shuffle_downloads_each_shard_once_an_epoch(s3_server, tmp_path):
    """200 images in 10 shards, a cache of 4: the global shuffle's batches read from anywhere
    (most reads of a shard a download), windows of 2 shards download each shard about once."""
    for i in range(200):
        save(rgb(64, 64, i), tmp_path / "images" / f"{i:03d}.jpg", quality=90)
    s3_server.client.create_bucket(Bucket="windows")
    uri = s3_server.uri("windows", "out")
    with ray_started():
        run(
            PrepareConfig(
                input=str(tmp_path / "images"),
                output=uri,
                buckets=SMALL_BUCKETS,
                samples_per_shard=20,
            )
        )
    listed = s3_server.client.list_objects_v2(Bucket="windows", Prefix="out/shards/")
    sizes = [entry["Size"] for entry in listed["Contents"] if entry["Key"].endswith(".tar")]
    assert len(sizes) == 10
    downloads = {}
    for shuffle in ("global", "shards"):
        cache = NodeCache(tmp_path / shuffle, limit=4 * max(sizes))  # room for two windows
        data = PreparedData(uri, cache=cache)
        batches = EpochBatches(data, batch_size=4, world_size=1, rank=0, shuffle=shuffle, window=2)
        for batch in make_loader(data, batches, num_workers=0):
            assert len(batch.keys) == 4
        downloads[shuffle] = cache.counts()[1]
    assert downloads["shards"] <= 12 and downloads["global"] > 5 * 10, downloads


def test_several_datasets_remote_and_local_with_weights(datasets, tmp_path):
    local, uri = datasets
    cache = NodeCache(tmp_path / "cache", 10**9)
    mixed = open_datasets([str(local), f"{uri}:2"], cache=cache)
    assert len(mixed.epoch_items(0, 0)[0]) == 3 * len(PreparedData(local))
    batches = EpochBatches(mixed, batch_size=2, world_size=1, rank=0, shuffle="shards", window=3)
    for batch in make_loader(mixed, batches, num_workers=0):
        assert batch.pixels.shape[0] == 2


def test_a_uri_without_a_prepared_dataset_is_a_usage_error(s3_server):
    with pytest.raises(UsageError, match=r"no manifest\.json there .*rerun it"):
        PreparedData(s3_server.uri("prepared", "nothing-here"))


def test_a_killed_download_leaves_no_complete_looking_file(s3_server, tmp_path):
    s3_server.client.create_bucket(Bucket="big")
    payload = np.random.default_rng(0).bytes(96 << 20)
    s3_server.client.put_object(Bucket="big", Key="out/shards/big.tar", Body=payload)
    uri = s3_server.uri("big", "out")
    code = (
        "from trainer.storage import DatasetFiles, NodeCache\n"
        f"DatasetFiles({uri!r}, NodeCache({str(tmp_path)!r})).local('shards/big.tar')\n"
    )
    files = DatasetFiles(uri, NodeCache(tmp_path))
    final = files.cache_folder / "shards" / "big.tar"
    with subprocess.Popen([sys.executable, "-c", code], cwd=REPO) as child:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = (
                list(final.parent.glob(f"big.tar{PARTIAL_MARK}*")) if final.parent.exists() else []
            )
            if partial and partial[0].stat().st_size >= CHUNK_BYTES:
                break
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
    assert partial, "the download was under way when killed"
    assert not final.exists(), "a killed download is never under the file's own name"
    assert files.local("shards/big.tar").read_bytes() == payload, "the next fetch completes it"
    assert not list(final.parent.glob(f"*{PARTIAL_MARK}*")), "and deletes the killed one's"


def test_two_processes_asking_for_one_shard_download_it_once(s3_server, tmp_path):
    s3_server.client.create_bucket(Bucket="shared")
    payload = np.random.default_rng(1).bytes(32 << 20)
    s3_server.client.put_object(Bucket="shared", Key="out/shards/a.tar", Body=payload)
    uri, go = s3_server.uri("shared", "out"), tmp_path / "go"
    code = (
        "import os, time\nfrom trainer.storage import DatasetFiles, NodeCache\n"
        f"cache = NodeCache({str(tmp_path / 'cache')!r})\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        f"path = DatasetFiles({uri!r}, cache).local('shards/a.tar')\n"
        "print(cache.counts()[1], os.path.getsize(path))\n"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    time.sleep(3)  # both started, waiting
    go.touch()
    outputs = [child.communicate(timeout=120)[0].split() for child in children]
    assert sorted(int(downloads) for downloads, _ in outputs) == [0, 1]
    assert {int(size) for _, size in outputs} == {len(payload)}


def test_the_least_recently_used_files_are_evicted_past_the_limit(s3_server, tmp_path):
    s3_server.client.create_bucket(Bucket="lru")
    for name in "abcd":
        s3_server.client.put_object(Bucket="lru", Key=f"out/{name}.tar", Body=b"x" * 1000)
    files = DatasetFiles(s3_server.uri("lru", "out"), NodeCache(tmp_path, limit=2500))
    for name in "abc":
        files.local(f"{name}.tar")
        time.sleep(0.01)  # distinct mtimes
    held = {p.name for p in files.cache_folder.glob("*.tar")}
    assert held == {"b.tar", "c.tar"}
    files.local("b.tar")  # used: now the newest
    time.sleep(0.01)
    files.local("d.tar")
    assert {p.name for p in files.cache_folder.glob("*.tar")} == {"b.tar", "d.tar"}


def test_a_held_file_evicted_by_another_process_reads_whole_then_is_let_go(
    s3_server, tmp_path, monkeypatch
):
    """A reader's open shard outlives its eviction (POSIX keeps the unlinked inode) until its
    next sweep closes it, and the next read downloads it again; a shard's first read after a
    sweep due marks it used through its handle, and one not read between two is closed."""
    s3_server.client.create_bucket(Bucket="held")
    s3_server.client.put_object(Bucket="held", Key="out/a.tar", Body=bytes(range(256)) * 40)
    cache = NodeCache(tmp_path / "cache", limit=10**6)
    files = DatasetFiles(s3_server.uri("held", "out"), cache)
    held, shard, path = OpenFiles(4), FileRef(files, "a.tar"), files.cache_folder / "a.tar"
    assert held.read(shard, 10, 3) == bytes([10, 11, 12]) and cache.counts() == (0, 1)
    NodeCache(cache.folder, limit=0).evict()  # another rank of the node, its cache full
    assert not path.exists()
    assert held.read(shard, 5000, 2) == bytes([136, 137]) and cache.counts() == (0, 1)
    held.sweep()
    assert shard not in held, "evicted: let go"
    assert held.read(shard, 255, 2) == bytes([255, 0]) and cache.counts() == (0, 2)
    monkeypatch.setattr(storage, "TOUCH_SECONDS", 0.0)  # every sweep is due
    held.sweep()
    assert shard in held, "read since the last sweep: kept"
    os.utime(path, (0, 0))  # as if last used long ago
    assert held.read(shard, 1, 1) == bytes([1])
    assert path.stat().st_mtime > 0, "its first read after a sweep marks it used"
    held.sweep()
    held.sweep()
    assert shard not in held, "not read since: closed"


@pytest.mark.slow
def test_two_ranks_train_from_s3_with_the_batches_of_a_local_copy(datasets, tmp_path):
    """torchrun, 2 ranks, a cache smaller than the dataset, the shard-aware shuffle: the steps,
    keys and pixels of training from the local copy under the same shuffle."""
    local, uri = datasets
    limit = sum(shard_bytes(local)[-3:])
    runs = {}
    for name, data in (("local", str(local)), ("remote", uri)):
        entries = logged_training(
            2,
            tmp_path / f"{name}.jsonl",
            f"--data={data}",
            "--shuffle=shards",
            "--shuffle-window=2",
            f"--cache-dir={tmp_path / 'cache'}",
            f"--cache-limit={limit}",
            f"--out-dir={tmp_path / name}",
            "--num-workers=1",
            "--channels=8",
            "--epochs=2",
            "--batch-size=2",
        )
        by_rank = defaultdict(list)
        for entry in entries:
            by_rank[entry["rank"]].append(
                (entry["epoch"], entry["step"], entry["keys"], entry["checksum"], entry["loss"])
            )
            assert len({tuple(size) for size in entry["target_size"]}) == 1, "one resolution"
        runs[name] = dict(by_rank)
    assert runs["remote"] == runs["local"]
    assert len(runs["remote"][0]) == len(runs["remote"][1]) > 4
    cached = [p for p in (tmp_path / "cache").rglob("*.tar") if PARTIAL_MARK not in p.name]
    assert sum(p.stat().st_size for p in cached) <= limit


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("Pss:"))


@pytest.mark.slow
def test_processes_mapping_the_index_hold_about_one_copy(tmp_path):
    """4 processes map a 1M-row index and read every byte of it: their PSS grows by about one
    copy in all (<= 1.3x the map's bytes), where each Parquet reader holds its own."""
    rows = 1_000_000
    rng = np.random.default_rng(0)
    words = np.array([f"tag_{i:04d}" for i in range(5000)])
    captions = [", ".join(words[rng.integers(0, 5000, 20)]) for _ in range(rows)]
    names = ("bucket", "width", "height", "stored_width", "stored_height")
    numbers = {name: np.zeros(rows, np.int32) for name in names}
    table = pa.table(
        {
            "key": [f"{i:08d}" for i in range(rows)],
            "caption": captions,
            "shard": [f"shards/{i // 1000:05d}.tar" for i in range(rows)],
            "image_offset": np.arange(rows, dtype=np.int64),
            "image_size": np.ones(rows, np.int64),
            **numbers,
        }
    )
    pq.write_table(table, tmp_path / "index.parquet")
    del table, captions
    files = DatasetFiles(str(tmp_path), NodeCache(tmp_path / "cache"))
    MappedIndex(files)  # converted once, here
    mapped_bytes = sum(p.stat().st_size for p in files.cache_folder.glob("*.arrow"))

    def started(*args: str) -> subprocess.Popen:
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        child = subprocess.Popen(
            [sys.executable, "tests/support/map_index.py", *args], cwd=REPO, text=True, **pipes
        )
        assert child.stdout.readline().strip() in ("mapped", "ready")
        return child

    children = [started(str(tmp_path), str(tmp_path / "cache")) for _ in range(4)]
    empty = started()
    try:
        grown = sum(pss_kib(child.pid) - pss_kib(empty.pid) for child in children) * 1024
    finally:
        for child in [*children, empty]:
            child.communicate("")
    assert grown <= 1.3 * mapped_bytes, (grown, mapped_bytes)


def test_the_shard_aware_sampler_resumes_at_any_step_and_names_shards_to_prefetch(
    datasets, tmp_path
):
    local, uri = datasets
    for root, remote in ((str(local), False), (uri, True)):
        data = PreparedData(root, cache=NodeCache(tmp_path / "cache"))
        batches = EpochBatches(
            data, batch_size=2, world_size=2, rank=0, seed=1, shuffle="shards", window=2
        )
        batches.set_epoch(1)
        full = [(b.step, b.keys) for b in batches]
        assert all(bool(b.prefetch) == remote for b in list(batches)[:1])
        for start in range(len(full)):
            batches.set_epoch(1, start)
            assert [(b.step, b.keys) for b in batches] == full[start:]


def test_a_cache_too_small_for_the_shuffle_is_warned_of(datasets, tmp_path):
    from trainer.train import _cache_warning

    local, uri = datasets
    remote = PreparedData(uri, cache=NodeCache(tmp_path / "cache"))
    assert _cache_warning(PreparedData(local), "global", 2, 1) is None, "local data: no cache"
    assert _cache_warning(remote, "shards", 2, 10**9) is None
    assert "two windows of --shuffle-window 2 shards" in _cache_warning(remote, "shards", 2, 1000)
    assert "--shuffle global reads them all" in _cache_warning(remote, "global", 2, 1000)


def test_a_run_from_s3_resumes_where_it_stopped(datasets, tmp_path):
    """Stopped after 3 steps and resumed: the steps after are the uninterrupted run's."""
    from recorded import train

    from trainer.train import Config

    _, uri = datasets
    seen = {}

    def run_training(name: str, **options) -> None:
        base = {
            "data": (uri,),
            "out_dir": str(tmp_path / name),
            "num_workers": 0,
            "batch_size": 2,
            "channels": 8,
            "log_every": 1000,
            "epochs": 1,
            "cache_dir": str(tmp_path / "cache"),
        }
        train(
            Config(**(base | options)),
            on_step=lambda step: seen.setdefault(name, []).append(step.batch.keys),
        )

    run_training("whole")
    run_training("parts", max_steps=3)
    run_training("parts", resume=True)
    assert seen["parts"] == seen["whole"] and len(seen["whole"]) > 4


def test_a_cache_dir_that_cannot_be_made_is_a_usage_error(datasets, tmp_path):
    local, _ = datasets
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UsageError, match=r"cannot be made .*give --cache-dir"):
        PreparedData(local, cache=NodeCache(tmp_path / "a-file" / "cache"))
