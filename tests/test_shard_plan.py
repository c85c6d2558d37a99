"""Which images go into which tar: invariants of plan_shards over random inputs, the shards an
incremental run keeps, and Parquet rows packed in file order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.shard_plan import is_shard_name, plan_shards

SIZES = np.array([[512, 512], [576, 448], [448, 576]])


@st.composite
def images(draw):
    """Distinct keys, bucket ids, a shard size and, for some images, places in a source."""
    n = draw(st.integers(0, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keys = np.unique(rng.integers(0, 2**62, n * 2).astype("S20"))[:n]
    keys = rng.permutation(keys)
    buckets = rng.integers(0, len(SIZES), len(keys))
    places = np.where(rng.random(len(keys)) < draw(st.floats(0, 1)), rng.permutation(len(keys)), -1)
    return keys, buckets, draw(st.integers(1, 40)), places


@given(images())
@settings(deadline=None)
def test_every_image_once_in_a_shard_of_its_bucket(data):
    keys, buckets, per_shard, places = data
    shards = plan_shards(keys, buckets, SIZES, per_shard, "salt", places=places)
    rows = np.concatenate([shard.rows for shard in shards] + [np.zeros(0, np.int64)])
    assert np.array_equal(np.sort(rows), np.arange(len(keys))), "every image exactly once"
    for shard in shards:
        assert np.all(buckets[shard.rows] == shard.bucket) and len(shard.rows) <= per_shard
        width, height = SIZES[shard.bucket]
        assert shard.name.startswith(f"{width}x{height}-") and is_shard_name(shard.name)
        # packed by place, then key; a shard that is not its bucket's last is full
        packing = list(zip(places[shard.rows], keys[shard.rows], strict=True))
        assert packing == sorted(packing)
    assert len({shard.name for shard in shards}) == len(shards)
    for number, shard in enumerate(shards):  # only a bucket's last shard may be short
        ends_bucket = number == len(shards) - 1 or shards[number + 1].bucket != shard.bucket
        assert len(shard.rows) == per_shard or ends_bucket


@given(images())
@settings(deadline=None)
def test_the_same_images_in_any_order_give_the_same_shards(data):
    keys, buckets, per_shard, places = data
    shuffle = np.random.default_rng(len(keys)).permutation(len(keys))
    first = plan_shards(keys, buckets, SIZES, per_shard, "salt", places=places)
    again = plan_shards(
        keys[shuffle], buckets[shuffle], SIZES, per_shard, "salt", places=places[shuffle]
    )
    assert [s.name for s in first] == [s.name for s in again]
    assert all(
        np.array_equal(keys[a.rows], keys[shuffle][b.rows])
        for a, b in zip(first, again, strict=True)
    )
    other_salt = plan_shards(keys, buckets, SIZES, per_shard, "other", places=places)
    assert not {s.name for s in first} & {s.name for s in other_salt}


def test_an_incremental_plan_keeps_the_shards_whose_members_are_all_there():
    keys = np.array([f"{i:020d}" for i in range(10)], dtype="S20")
    buckets = np.zeros(10, np.int64)
    before = plan_shards(keys[:8], buckets[:8], SIZES, 4, "salt")  # two full shards
    previous = {shard.name: keys[:8][shard.rows] for shard in before}
    # image 0 is gone; images 8 and 9 are new
    after = plan_shards(keys[1:], buckets[1:], SIZES, 4, "salt", previous)
    assert after[0].name == before[1].name, "the shard with all its members is kept"
    packed = [sorted(keys[1:][s.rows].tolist()) for s in after[1:]]
    assert packed == [[keys[i] for i in (1, 2, 3, 8)], [keys[9]]]  # the rest packed anew


def test_parquet_rows_are_packed_in_file_order_and_other_images_by_key():
    """Rows of a Parquet file (places >= 0) go to shards by their place, so that a shard's
    rows are one stretch of the file per bucket; loose images keep key order, before them."""
    rng = np.random.default_rng(0)
    keys = rng.permutation(np.array([f"{i:020d}" for i in range(12)], dtype="S20"))
    buckets = np.zeros(12, np.int64)
    places = np.array([-1, -1, -1, -1, 7, 6, 5, 4, 3, 2, 1, 0])
    shards = plan_shards(keys, buckets, SIZES, 4, "salt", places=places)
    assert sorted(keys[shards[0].rows].tolist()) == sorted(keys[:4].tolist())
    assert [places[s.rows].tolist() for s in shards[1:]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
