"""Tasks cut by measured cost, decoupled from shards: invariants over random layouts, and the
schedule they give a cluster whose real costs are far from the prior."""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.work_plan import (
    FIRST_TASK_MS,
    MAX_TASK_MS,
    MIN_TASK_MS,
    WorkPlan,
    estimate_cost,
    heaviest_first,
    source_walk,
    task_budget,
)


@st.composite
def layouts(draw):
    """Groups (row indices into a cost column) with costs from cheap to unsplittably big, two
    kinds of row, and how far each kind's real cost is from its prior."""
    sizes = draw(st.lists(st.integers(1, 30), min_size=1, max_size=12))
    n = sum(sizes)
    prior = np.array(draw(st.lists(st.floats(0.5, 5_000), min_size=n, max_size=n)))
    kinds = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    order = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(n)
    group_rows = np.split(order, np.cumsum(sizes)[:-1])
    error = np.array(draw(st.lists(st.floats(0.1, 10), min_size=2, max_size=2)))
    return group_rows, prior, kinds, error, draw(st.integers(1, 64))


def run_plan(plan: WorkPlan, real: np.ndarray, group_rows, observe_every: int = 1):
    """Cut every task, observing the real cost of each `observe_every`-th."""
    tasks = []
    while (task := plan.next_task()) is not None:
        tasks.append(task)
        if len(tasks) % observe_every == 0:
            rows = np.concatenate([group_rows[p.group][p.start : p.stop] for p in task.pieces])
            plan.observe(task, real[rows])
    return tasks


@given(layouts())
@settings(deadline=None)
def test_every_row_once_in_group_order_and_each_group_closed_once(layout):
    group_rows, prior, kinds, error, cpus = layout
    plan = WorkPlan(group_rows, prior, kinds, cpus)
    tasks = run_plan(plan, prior * error[kinds], group_rows)
    walked = [(p.group, i) for task in tasks for p in task.pieces for i in range(p.start, p.stop)]
    expected = [(group, i) for group, rows in enumerate(group_rows) for i in range(len(rows))]
    assert walked == expected, "every row once, groups and rows in order"
    closing = [p.group for task in tasks for p in task.pieces if p.last]
    assert closing == list(range(len(group_rows))), "each group's last piece says so, once"
    assert all(p.stop > p.start for task in tasks for p in task.pieces)
    positions = [(task.start, task.stop) for task in tasks]
    assert positions[0][0] == 0 and positions[-1][1] == len(prior)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(positions))


def placed_layout(layout, share: float, seed: int):
    """The layout with places in a source for a share of its rows (the rest -1), each group's
    rows sorted by place as plan_shards packs them."""
    group_rows, prior, kinds, error, cpus = layout
    rng = np.random.default_rng(seed)
    n = len(prior)
    places = np.where(rng.random(n) < share, rng.permutation(n), -1)
    group_rows = [rows[np.argsort(places[rows], kind="stable")] for rows in group_rows]
    return group_rows, prior, kinds, error, cpus, places


@given(layouts(), st.floats(0, 1), st.integers(0, 2**32 - 1))
@settings(deadline=None)
def test_a_source_walk_reads_each_source_in_order_and_closes_each_group_last(layout, share, seed):
    """Groups (shards) interleaved along their rows' places (a Parquet file's rows): tasks take
    the placed rows in place order; each group's pieces still come in order, with the one that
    says `last` submitted after the others; the calibration still sees each row's own kind."""
    group_rows, prior, kinds, error, cpus, places = placed_layout(layout, share, seed)
    walk = source_walk(group_rows, places)
    assert np.array_equal(np.sort(walk), np.arange(len(prior)))
    plan = WorkPlan(group_rows, prior, kinds, cpus, walk)
    tasks = run_plan(plan, prior * error[kinds], group_rows)
    pieces = [p for task in tasks for p in task.pieces]
    for group, rows in enumerate(group_rows):
        own = [p for p in pieces if p.group == group]
        assert [i for p in own for i in range(p.start, p.stop)] == list(range(len(rows)))
        assert [p.last for p in own] == [False] * (len(own) - 1) + [True]
    taken = np.concatenate([group_rows[p.group][p.start : p.stop] for p in pieces])
    assert sorted(taken.tolist()) == list(range(len(prior)))
    read = places[walk][places[walk] >= 0]
    assert np.array_equal(read, np.sort(read)), "placed rows in place order"
    for task in tasks:  # each task's placed rows are one stretch of the walk's
        rows = np.concatenate([group_rows[p.group][p.start : p.stop] for p in task.pieces])
        assert set(rows.tolist()) == set(walk[task.start : task.stop].tolist())
    seen = np.unique(kinds)
    assert np.allclose(plan.scale()[seen], error[seen]), "each kind measured as itself"


def test_a_walk_that_breaks_a_groups_order_is_refused():
    groups = [np.array([0, 1]), np.array([2, 3])]
    prior, kinds = np.ones(4), np.zeros(4, np.int64)
    WorkPlan(groups, prior, kinds, 2, np.array([0, 2, 1, 3]))  # interleaved, each in order
    for walk in ([1, 0, 2, 3], [0, 1, 2], [0, 1, 2, 2]):
        with pytest.raises(ValueError, match="the walk must take every row"):
            WorkPlan(groups, prior, kinds, 2, np.array(walk))


@given(layouts())
@settings(deadline=None)
def test_a_task_is_over_its_budget_only_when_it_is_one_row(layout):
    group_rows, prior, kinds, error, cpus = layout
    real = prior * error[kinds]
    plan = WorkPlan(group_rows, prior, kinds, cpus)
    while True:
        budget = task_budget(plan.remaining(), cpus) if plan.measured() else FIRST_TASK_MS
        if (task := plan.next_task()) is None:
            break
        rows = np.concatenate([group_rows[p.group][p.start : p.stop] for p in task.pieces])
        estimate = prior[rows] * plan.scale()[kinds[rows]]
        assert np.isclose(task.cost, estimate.sum())
        assert task.cost <= budget * (1 + 1e-9) or len(rows) == 1
        plan.observe(task, real[rows])


def test_calibration_sizes_tasks_by_what_they_really_take():
    """Prior 5x low for JPEGs (what the fixed rates did on small JPEGs) and 3x high for PNGs:
    once the first tasks are measured, every task is within MAX_TASK_MS of real time."""
    n = 100_000
    rng = np.random.default_rng(0)
    formats = np.where(rng.random(n) < 0.8, "JPEG", "PNG")
    pixels = rng.integers(150_000, 2_000_000, n)
    prior, kinds = estimate_cost(pixels, formats)
    real = prior * np.where(formats == "JPEG", 5.0, 1 / 3)
    groups = np.array_split(np.arange(n), 100)
    plan = WorkPlan(groups, prior, kinds, cpus=2)
    tasks = run_plan(plan, real, groups)
    reals = [real[t.start : t.stop].sum() for t in tasks]  # one group order: positions = rows
    assert max(reals[:1]) <= 5 * FIRST_TASK_MS, "before any measurement: the prior's error"
    assert max(reals[1:]) <= MAX_TASK_MS * 1.05, "measured: within the limit in real time"
    assert np.median(reals) > MAX_TASK_MS / 2, "not needlessly small either"
    assert reals[-1] < MAX_TASK_MS / 4, "tasks shrink as the work runs out"


def simulate(tasks_of: WorkPlan, real: np.ndarray, cpus: int, in_flight: int) -> tuple:
    """A cluster of `cpus` running tasks as the driver submits them (at most `in_flight` at
    once) and reporting each when it ends: (makespan, busy time)."""
    clock, free_at, pending, busy = 0.0, [0.0] * cpus, [], 0.0
    heapq.heapify(free_at)

    def submit() -> bool:
        task = tasks_of.next_task()
        if task is None:
            return False
        start = heapq.heappop(free_at)
        cost = float(real[task.start : task.stop].sum()) + 2.0  # 2 ms to schedule a task
        heapq.heappush(free_at, max(start, clock) + cost)
        heapq.heappush(pending, (max(start, clock) + cost, task.start, task))
        return True

    more = True
    while more and len(pending) < in_flight:
        more = submit()
    while pending:
        clock, _, task = heapq.heappop(pending)
        tasks_of.observe(task, real[task.start : task.stop])
        busy += float(real[task.start : task.stop].sum())
        while more and len(pending) < in_flight:
            more = submit()
    return clock, busy


@settings(deadline=None, max_examples=20)
@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 8, 64]))
def test_the_cores_stay_busy_to_the_end(seed, cpus):
    """100k images whose real costs are 5x the prior and spread 10x: the run ends within 10% of
    a perfect split of the work, whatever the mix."""
    rng = np.random.default_rng(seed)
    n = 100_000
    prior, kinds = estimate_cost(rng.integers(150_000, 500_000, n), np.full(n, "JPEG"))
    real = prior * 5 * rng.lognormal(0, 0.6, n)
    plan = WorkPlan(np.array_split(np.arange(n), 100), prior, kinds, cpus)
    makespan, busy = simulate(plan, real, cpus, in_flight=2 * cpus)
    assert busy / (cpus * makespan) >= 0.9


def test_a_group_of_big_images_is_spread_over_tasks():
    """The case that held a core for minutes: one shard with eleven 168 MP PNGs among photos."""
    pixels = np.array([168_000_000] * 11 + [12_000_000] * 4 + [8_000_000] * 200)
    formats = np.array(["PNG"] * 11 + ["JPEG"] * 204)
    prior, kinds = estimate_cost(pixels, formats)
    groups = [np.arange(15), np.arange(15, 215)]
    plan = WorkPlan([groups[i] for i in heaviest_first(groups, prior)], prior, kinds, cpus=2)
    tasks = run_plan(plan, prior, groups)
    assert len(tasks) >= 8
    assert max(task.cost for task in tasks) < prior.sum() / 5, "no task holds the shard's work"


def test_groups_with_the_costliest_row_come_first():
    cost = np.array([1.0, 1.0, 1.0, 50.0, 2.0, 2.0, 2.0, 2.0])
    groups = [np.array([0, 1, 2]), np.array([3]), np.array([4, 5, 6, 7])]
    assert heaviest_first(groups, cost) == [1, 2, 0]


def test_budget_limits():
    assert task_budget(10.0, cpus=64) == MIN_TASK_MS
    assert task_budget(8_000.0, cpus=2) == 1_000.0
    assert task_budget(1e12, cpus=2) == MAX_TASK_MS


def test_prior_cost_and_kinds():
    prior, kinds = estimate_cost(np.array([1_000_000, 1_000_000, 10]), ["PNG", "JPEG", "BMP"])
    assert prior[0] > prior[1] and prior[2] > 0
    assert len(set(kinds.tolist())) == 3
