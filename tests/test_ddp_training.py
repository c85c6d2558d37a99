"""The trainer on a real prepared dataset under real torchrun (gloo) processes: every rank
the same steps, resumes, world sizes, hypernetworks and SDXL in step."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from torchrun import logged_training

from trainer.dataset import PreparedData

REPO = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, data: Path, work: Path, *args: str) -> dict[int, list[dict]]:
    """Run the trainer under torchrun; each rank's logged batches, in order."""
    by_rank = defaultdict(list)
    for entry in logged_training(
        nproc,
        work / "batches.jsonl",
        f"--data={data}",
        f"--out-dir={work / 'checkpoints'}",
        "--num-workers=1",
        "--channels=8",
        *args,
    ):
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
