"""The per-epoch sharding plan: the invariants DDP training relies on."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.buckets import bucket_aspects, bucketize, generate_buckets
from pipeline.plan import _group_by_bucket, plan_epoch, plan_epoch_by_shards, shuffled_ids


@st.composite
def datasets(draw):
    """Bucket ids with empty buckets, one-item buckets and very uneven sizes."""
    n_buckets = draw(st.integers(1, 19))
    sizes = draw(
        st.lists(
            st.sampled_from([0, 0, 1, 1, 2, 3, 7, 31, 64, 100, 257]),
            min_size=n_buckets,
            max_size=n_buckets,
        )
    )
    index = np.repeat(np.arange(n_buckets), sizes)
    return np.random.default_rng(draw(st.integers(0, 1000))).permutation(index)


def all_ranks(bucket_index, batch_size, world_size, seed=0, epoch=0):
    return [
        plan_epoch(bucket_index, batch_size, world_size, r, seed, epoch) for r in range(world_size)
    ]


@given(
    datasets(), st.integers(1, 64), st.integers(1, 16), st.integers(0, 2**32), st.integers(0, 100)
)
def test_plan_invariants(bucket_index, batch_size, world_size, seed, epoch):
    plans = all_ranks(bucket_index, batch_size, world_size, seed, epoch)
    n_items = len(bucket_index)

    assert len({len(p) for p in plans}) == 1, "every rank runs the same number of batches"
    for plan in plans:
        assert plan.items.shape == (len(plan), batch_size), "every batch is full"
        regular = ~plan.catch_all
        members = bucket_index[plan.items[regular]]
        assert np.all(members == plan.bucket[regular][:, None]), "a regular batch is one bucket"
        for items, bucket in zip(
            plan.items[plan.catch_all], plan.bucket[plan.catch_all], strict=True
        ):
            median = np.sort(bucket_index[items])[(batch_size - 1) // 2]
            assert bucket == median, "a catch-all batch is fitted to its median member's bucket"

    seen = np.concatenate([p.items.ravel() for p in plans])
    assert len(np.unique(seen)) == len(seen), "ranks are disjoint and nothing repeats"
    dropped = n_items - len(seen)
    assert dropped == plans[0].dropped == n_items % (world_size * batch_size)
    assert dropped <= world_size * batch_size - 1


@given(datasets(), st.integers(1, 64), st.integers(1, 16))
def test_only_what_does_not_fill_a_batch_goes_to_catch_all(bucket_index, batch_size, world_size):
    for plan in all_ranks(bucket_index, batch_size, world_size):
        counts = np.bincount(bucket_index[plan.items.ravel()], minlength=19)
        in_catch_all = np.bincount(bucket_index[plan.items[plan.catch_all].ravel()], minlength=19)
        assert np.array_equal(in_catch_all, counts % batch_size)
        assert plan.catch_all_items == in_catch_all.sum() == plan.catch_all.sum() * batch_size


def source_walk(bucket_index, batch_size, world_size, rank, seed, epoch):
    """Steps 1-5 of the post with lists: the batches and catch-all items it must yield."""
    ids = shuffled_ids(len(bucket_index), seed, epoch).tolist()
    ids = ids[: len(ids) - len(ids) % (world_size * batch_size)]
    per_rank = len(ids) // world_size
    lists = {}
    for item in ids[rank * per_rank : (rank + 1) * per_rank]:
        lists.setdefault(int(bucket_index[item]), []).append(item)
    batches, catch_all = set(), set()
    for items in lists.values():
        extra = len(items) % batch_size
        catch_all.update(items[len(items) - extra :])
        for start in range(0, len(items) - extra, batch_size):
            batches.add(tuple(items[start : start + batch_size]))
    return batches, catch_all


@given(datasets(), st.integers(1, 16), st.integers(1, 4), st.integers(0, 2**16))
def test_batches_are_the_source_walk(bucket_index, batch_size, world_size, seed):
    for rank in range(world_size):
        plan = plan_epoch(bucket_index, batch_size, world_size, rank, seed, 3)
        batches, catch_all = source_walk(bucket_index, batch_size, world_size, rank, seed, 3)
        assert {tuple(b) for b in plan.items[~plan.catch_all].tolist()} == batches
        assert set(plan.items[plan.catch_all].ravel().tolist()) == catch_all


def test_deterministic_per_seed_and_epoch_and_new_each_epoch():
    bucket_index = np.random.default_rng(0).integers(0, 19, 5000)
    first = plan_epoch(bucket_index, 8, 4, 1, seed=42, epoch=0)
    again = plan_epoch(bucket_index, 8, 4, 1, seed=42, epoch=0)
    assert np.array_equal(first.items, again.items) and np.array_equal(first.bucket, again.bucket)
    for other in (
        plan_epoch(bucket_index, 8, 4, 1, 42, 1),
        plan_epoch(bucket_index, 8, 4, 1, 43, 0),
    ):
        assert not np.array_equal(first.items, other.items)
        assert set(first.items.ravel()) != set(other.items.ravel()), (
            "a new shard, not just a new order"
        )


def test_small_buckets_are_spread_over_the_epoch():
    """A weighted draw keeps a small bucket's batches spread out; an unweighted one would use
    them up in the first part of the epoch."""
    bucket_index = np.repeat([0, 1], [40 * 8, 4000 * 8])  # 40 small batches among 4040
    positions = []
    for epoch in range(20):
        plan = plan_epoch(bucket_index, 8, 1, 0, seed=0, epoch=epoch)
        positions.append(np.flatnonzero(plan.bucket == 0) / len(plan))
    positions = np.concatenate(positions)
    assert len(positions) == 800
    assert 0.45 < positions.mean() < 0.55
    assert 0.2 < np.mean(positions > 0.75) < 0.3, "a quarter of them in the last quarter"


def test_catch_all_batches_hold_neighbouring_shapes():
    # Leftovers of every bucket: ordered by bucket (= aspect), cut into batches, so no two
    # catch-all batches interleave their buckets, and wide leftovers get a wide resolution.
    bucket_index = np.repeat(np.arange(19), 3)
    plan = plan_epoch(bucket_index, 4, 1, 0, seed=0, epoch=0)
    assert plan.catch_all.all() and len(plan) == 14
    ranges = sorted((bucket_index[b].min(), bucket_index[b].max()) for b in plan.items)
    for (_, high), (low, _) in itertools.pairwise(ranges):
        assert high <= low
    widest = plan.items[np.argmax(plan.bucket)]
    assert set(bucket_index[widest]) <= {17, 18}


def test_catch_all_aspect_error_is_reported_and_beats_a_square():
    rng = np.random.default_rng(3)
    widths, heights = rng.integers(200, 4000, (2, 3001))
    assignment = bucketize(widths, heights)
    kept = assignment.index >= 0
    aspects = bucket_aspects(assignment.buckets)
    item_aspects = (widths / heights)[kept]
    plan = plan_epoch(
        assignment.index[kept], 16, 2, 0, 0, 0, item_aspects=item_aspects, bucket_aspects=aspects
    )
    members = plan.items[plan.catch_all]
    expected = np.abs(aspects[plan.bucket[plan.catch_all]][:, None] - item_aspects[members]).mean()
    assert plan.catch_all_items == members.size > 0
    assert plan.catch_all_aspect_error == pytest.approx(expected)
    square_error = np.abs(1.0 - item_aspects[members]).mean()  # NovelAI 2022: all to 512x512
    assert plan.catch_all_aspect_error < square_error / 2
    assert np.isnan(plan_epoch(assignment.index[kept], 16, 2, 0, 0, 0).catch_all_aspect_error)


def test_iteration_yields_batches_in_order():
    plan = plan_epoch(np.arange(10) % 3, 2, 1, 0, 0, 0)
    batches = list(plan)
    assert len(batches) == len(plan) == 5
    assert all(np.array_equal(b.items, plan.items[i]) for i, b in enumerate(batches))
    assert [b.bucket for b in batches] == plan.bucket.tolist()
    assert isinstance(batches[0].bucket, int) and isinstance(batches[0].catch_all, bool)


def test_fewer_items_than_one_global_batch():
    for plan in all_ranks(np.zeros(5, dtype=int), 4, 2):
        assert len(plan) == 0 and plan.dropped == 5
    assert len(plan_epoch(np.array([], dtype=int), 4, 2, 0, 0, 0)) == 0


@given(st.lists(st.integers(0, 5), max_size=200), st.integers(1, 7))
def test_chunked_grouping_is_a_stable_sort(labels, chunk):
    labels = np.array(labels, dtype=np.uint8)
    ids = np.random.default_rng(0).permutation(len(labels)).astype(np.int32)
    grouped, counts = _group_by_bucket(ids, labels, 6, chunk=chunk)
    assert np.array_equal(grouped, ids[np.argsort(labels, kind="stable")])
    assert np.array_equal(counts, np.bincount(labels, minlength=6))


def test_plans_a_large_dataset_over_the_real_buckets():
    bucket_index = np.random.default_rng(0).integers(0, len(generate_buckets()), 5_000_000)
    plans = all_ranks(bucket_index, 32, 3)
    assert len({len(p) for p in plans}) == 1
    seen = np.concatenate([p.items.ravel() for p in plans])
    assert len(np.unique(seen)) == len(seen) == 5_000_000 - 5_000_000 % 96


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"world_size": 0}, "world_size"),
        ({"rank": 4}, "rank"),
        ({"rank": -1}, "rank"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"epoch": -2}, "epoch"),
        ({"bucket_index": np.array([0, -1, 2])}, "rejected"),
        ({"bucket_index": np.array([0.5, 1.0])}, "bucket_index"),
        ({"bucket_index": np.zeros((2, 2), dtype=int)}, "bucket_index"),
        ({"item_aspects": np.ones(4)}, "bucket_aspects"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    arguments = {
        "bucket_index": np.zeros(4, dtype=int),
        "batch_size": 2,
        "world_size": 4,
        "rank": 0,
        "seed": 0,
        "epoch": 0,
    } | kwargs
    with pytest.raises(ValueError, match=name):
        plan_epoch(**arguments)


@st.composite
def sharded(draw):
    """Bucket ids and shard ids as the job writes them: each shard one bucket, up to `size`
    items, shards numbered bucket by bucket."""
    bucket_index = draw(datasets())
    size = draw(st.integers(1, 40))
    order = np.argsort(bucket_index, kind="stable")
    shard_index = np.empty(len(bucket_index), dtype=np.int64)
    next_shard = 0
    for bucket in np.unique(bucket_index):
        members = order[bucket_index[order] == bucket]
        shard_index[members] = next_shard + np.arange(len(members)) // size
        next_shard += -(-len(members) // size)
    return bucket_index, shard_index


def window_plans(bucket_index, shard_index, window, batch_size, world_size, seed=0, epoch=0):
    return [
        plan_epoch_by_shards(
            bucket_index, shard_index, window, batch_size, world_size, rank, seed, epoch
        )
        for rank in range(world_size)
    ]


@given(
    sharded(),
    st.integers(1, 6),
    st.integers(1, 8),
    st.integers(1, 4),
    st.integers(0, 2**16),
    st.integers(0, 20),
)
def test_the_shard_aware_plan_keeps_the_sources_invariants(
    data, window, batch_size, world_size, seed, epoch
):
    bucket_index, shard_index = data
    plans = window_plans(bucket_index, shard_index, window, batch_size, world_size, seed, epoch)
    assert len({len(plan) for plan in plans}) == 1, "every rank runs the same number of steps"
    seen = np.concatenate([plan.items.ravel() for plan in plans])
    assert len(np.unique(seen)) == len(seen), "a permutation of the kept items"
    assert len(seen) + plans[0].dropped == len(bucket_index)
    n_windows = -(-len(np.unique(shard_index)) // window)
    assert plans[0].dropped <= n_windows * (world_size * batch_size - 1)
    for plan in plans:
        assert plan.items.shape == (len(plan), batch_size)
        regular = ~plan.catch_all
        assert np.all(bucket_index[plan.items[regular]] == plan.bucket[regular][:, None])
    # The window bound: the steps of a window, on all ranks together, read <= `window` shards
    for plan in plans[1:]:
        assert plan.window_starts is None or np.array_equal(
            plan.window_starts, plans[0].window_starts
        )
    starts = plans[0].window_starts
    bounds = [0, len(plans[0])] if starts is None else [*starts, len(plans[0])]
    for begin, end in itertools.pairwise(bounds):
        touched = np.unique(
            np.concatenate([shard_index[p.items[begin:end]].ravel() for p in plans])
        )
        assert len(touched) <= window


@given(sharded(), st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**16))
def test_the_shard_aware_plan_is_deterministic_and_its_windows_do_not_depend_on_world_size(
    data, window, batch_size, seed
):
    bucket_index, shard_index = data
    first = window_plans(bucket_index, shard_index, window, batch_size, 2, seed, 3)
    again = window_plans(bucket_index, shard_index, window, batch_size, 2, seed, 3)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.items, b.items) and np.array_equal(a.bucket, b.bucket)

    def window_shards(plans):
        starts = plans[0].window_starts
        bounds = [0, len(plans[0])] if starts is None else [*starts, len(plans[0])]
        return [
            set(shard_index[np.concatenate([p.items[a:b].ravel() for p in plans])].tolist())
            for a, b in itertools.pairwise(bounds)
        ]

    # Elastic: under any world size, the k-th window draws from the same shards
    by_world = [
        window_shards(window_plans(bucket_index, shard_index, window, 1, world, seed, 3))
        for world in (1, 3)
    ]
    for one, three in zip(*by_world, strict=True):
        assert three <= one


def test_one_window_of_every_shard_is_the_global_plan():
    rng = np.random.default_rng(0)
    bucket_index = rng.integers(0, 6, 2000)
    shard_index = np.argsort(np.argsort(bucket_index, kind="stable")) // 50
    for rank in range(3):
        windowed = plan_epoch_by_shards(bucket_index, shard_index, 10**6, 4, 3, rank, 7, 2)
        assert np.array_equal(windowed.items, plan_epoch(bucket_index, 4, 3, rank, 7, 2).items)


def test_shard_windows_change_every_epoch_and_spread_a_shard_less_than_the_global_shuffle():
    """What the shard-aware shuffle costs in randomness: how far apart in the epoch two images
    of one shard land (as a share of the epoch; ~1/3 for a uniform shuffle)."""
    rng = np.random.default_rng(1)
    bucket_index = rng.integers(0, 8, 40_000)
    shard_index = np.argsort(np.argsort(bucket_index, kind="stable")) // 500  # 80 shards

    def spread(plan) -> float:
        position = np.empty(len(bucket_index))
        position[plan.items.ravel()] = np.repeat(np.arange(len(plan)), plan.items.shape[1])
        kept = np.random.default_rng(2).permutation(plan.items.ravel())  # random partners
        pairs = kept[np.argsort(shard_index[kept], kind="stable")].reshape(-1, 2)
        same = shard_index[pairs[:, 0]] == shard_index[pairs[:, 1]]
        return float(
            np.mean(np.abs(position[pairs[same, 0]] - position[pairs[same, 1]])) / len(plan)
        )

    global_plan = plan_epoch(bucket_index, 8, 1, 0, 0, 0)
    windowed = [plan_epoch_by_shards(bucket_index, shard_index, 8, 8, 1, 0, 0, e) for e in (0, 1)]
    assert not np.array_equal(windowed[0].items, windowed[1].items)
    assert 0.25 < spread(global_plan) < 0.4
    assert spread(windowed[0]) < 0.1 < spread(global_plan)
