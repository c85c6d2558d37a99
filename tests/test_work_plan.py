"""Fit tasks of bounded cost, decoupled from shards: invariants over random shard layouts."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.work_plan import (
    MIN_TASK_MS,
    estimate_cost,
    heaviest_first,
    plan_tasks,
    task_budget,
)


@st.composite
def layouts(draw):
    """Shards (row indices into a cost column) with costs from cheap to unsplittably big."""
    sizes = draw(st.lists(st.integers(1, 30), min_size=1, max_size=12))
    n = sum(sizes)
    costs = np.array(draw(st.lists(st.floats(0.5, 5_000), min_size=n, max_size=n)))
    order = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(n)
    shard_rows = np.split(order, np.cumsum(sizes)[:-1])
    cpus = draw(st.integers(1, 64))
    return shard_rows, costs, cpus


@given(layouts())
def test_every_row_once_in_shard_order_and_within_budget(layout):
    shard_rows, cost, cpus = layout
    tasks = plan_tasks(shard_rows, cost, cpus)
    walked = [
        (piece.shard, position)
        for task in tasks
        for piece in task.pieces
        for position in range(piece.start, piece.stop)
    ]
    expected = [(shard, i) for shard, rows in enumerate(shard_rows) for i in range(len(rows))]
    assert walked == expected, "every row once, shards and rows in order"
    remaining = cost.sum()
    for task in tasks:
        rows = np.concatenate([shard_rows[p.shard][p.start : p.stop] for p in task.pieces])
        assert np.isclose(task.cost, cost[rows].sum())
        budget = task_budget(remaining, cpus)
        assert task.cost <= budget + 1e-6 or len(rows) == 1, "over budget only alone"
        assert all(p.stop > p.start for p in task.pieces)
        remaining -= task.cost


def test_a_shard_of_big_images_is_spread_over_tasks():
    """The case that held a core for minutes: one shard with eleven 168 MP PNGs among photos."""
    pixels = np.array([168_000_000] * 11 + [12_000_000] * 4 + [8_000_000] * 200)
    formats = np.array(["PNG"] * 11 + ["JPEG"] * 204)
    cost = estimate_cost(pixels, formats)
    shard_rows = [np.arange(15), np.arange(15, 215)]
    tasks = plan_tasks([shard_rows[i] for i in heaviest_first(shard_rows, cost)], cost, cpus=2)
    assert len(tasks) >= 8
    assert max(task.cost for task in tasks) <= max(task_budget(cost.sum(), 2), cost.max())
    assert max(task.cost for task in tasks) < cost.sum() / 5, "no task holds the shard's work"
    assert tasks[-1].cost < tasks[0].cost / 4, "tasks shrink as the work runs out"


def test_shards_with_the_costliest_image_come_first():
    cost = np.array([1.0, 1.0, 1.0, 50.0, 2.0, 2.0, 2.0, 2.0])
    shard_rows = [np.array([0, 1, 2]), np.array([3]), np.array([4, 5, 6, 7])]
    assert heaviest_first(shard_rows, cost) == [1, 2, 0]


def test_budget_limits():
    assert task_budget(10.0, cpus=64) == MIN_TASK_MS
    assert task_budget(8_000.0, cpus=2) == 1_000.0
    assert task_budget(1e12, cpus=2) == 30_000.0
