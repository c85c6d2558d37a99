"""The per-epoch sharding plan: which batches each rank trains on, in which order.

Pure NumPy, no communication: every rank calls `plan_epoch` with the same arguments but its
own `rank` and gets its part of one global plan. The source's seven steps:

1. shuffle the item ids (seeded by `seed` and `epoch` only, the same on every rank);
2. truncate to a multiple of world_size * batch_size (at most world_size * batch_size - 1
   items dropped, the only items an epoch leaves out);
3. take this rank's contiguous 1/world_size of the shuffled ids;
4. walk them in shuffled order, appending each to its bucket's list;
5. move the last `len % batch_size` ids of every bucket to a catch-all list, which is then a
   multiple of batch_size too;
6. serve batches by drawing a bucket with probability proportional to its remaining size.
   Drawing that way and then taking the bucket's next batch yields every order of the batches'
   buckets with the same probability as a uniformly random permutation of all the rank's
   batches (the weight of a bucket is batch_size times its remaining batches), so the plan is
   that permutation, drawn once: simpler, vectorised, and small buckets still spread over the
   whole epoch instead of being used up early;
7. each batch carries its ids and the bucket whose resolution it is fitted to.

Catch-all batches. NovelAI's 2022 code fitted every catch-all batch to 512x512, squashing or
square-cropping images of any shape; its later code dropped the leftovers. Here nothing is
lost and distortion stays small: the leftovers are ordered by bucket id, which is aspect order
(see `buckets.py`), so each catch-all batch holds images of neighbouring shapes, and the batch
is fitted to the bucket of its median member. The median minimises the summed distance to the
members' buckets under any monotone measure of aspect, the linear and the log one alike. Each
member is then fitted the usual way (cover, then crop), so shapes are never squashed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_GLOBAL_SHUFFLE, _BATCH_ORDER, _SHARD_ORDER, _WINDOW_SEED = 1, 2, 3, 4  # independent streams


class PlannedBatch(NamedTuple):
    items: np.ndarray  # (batch_size,) item indices
    bucket: int  # bucket whose resolution the batch is fitted to
    catch_all: bool  # True when the items come from the catch-all list


@dataclass(frozen=True)
class RankPlan:
    """One rank's batches for one epoch, in training order.

    `items` is (n_batches, batch_size) of item indices (int32, or int64 past 2**31 items);
    `bucket` (n_batches,) the bucket each batch is fitted to; `catch_all` (n_batches,) marks
    catch-all batches. `n_batches` is the same on every rank.
    """

    items: np.ndarray
    bucket: np.ndarray
    catch_all: np.ndarray
    dropped: int  # items left out of this epoch by truncation, the same on every rank
    catch_all_items: int  # this rank's items in catch-all batches
    catch_all_aspect_error: float  # their mean |bucket aspect - item aspect|; NaN if unknown
    # The shard-aware shuffle's: the first step of each window of shards; None: one global plan
    window_starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, step: int) -> PlannedBatch:
        return PlannedBatch(self.items[step], int(self.bucket[step]), bool(self.catch_all[step]))

    def __iter__(self):
        return (self[step] for step in range(len(self)))


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be >= {minimum}{upper}, got {value}")
    return int(value)


def _check_bucket_index(bucket_index: np.ndarray) -> np.ndarray:
    array = np.asarray(bucket_index)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(
            f"bucket_index must be a 1-D integer array, got {array.dtype} {array.shape}"
        )
    if array.size and array.min() < 0:
        raise ValueError("bucket_index has negative (rejected) entries: drop them before planning")
    return array


def _id_type(n_items: int) -> type:
    return np.int32 if n_items < 2**31 else np.int64


def shuffled_ids(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """Step 1: the item ids 0..n_items-1 in this epoch's order, identical on every rank."""
    ids = np.arange(n_items, dtype=_id_type(n_items))
    np.random.default_rng([seed, epoch, _GLOBAL_SHUFFLE]).shuffle(ids)
    return ids


def _group_by_bucket(
    ids: np.ndarray, buckets: np.ndarray, n_buckets: int, chunk: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """(`ids` grouped by bucket, each group in its original order; the size of each group).

    A stable counting sort done chunk by chunk, so that its scratch memory (argsort's int64
    order, bincount's int64 copy of the labels) stays a few tens of MiB however many ids.
    """
    chunks = [slice(begin, begin + chunk) for begin in range(0, len(ids), chunk)]
    counts = np.zeros(n_buckets, dtype=np.int64)
    for part in chunks:
        counts += np.bincount(buckets[part], minlength=n_buckets)
    grouped = np.empty_like(ids)
    next_slot = np.concatenate(([0], np.cumsum(counts)[:-1]))
    for part in chunks:
        labels = buckets[part]
        values = ids[part][np.argsort(labels, kind="stable")]
        taken = 0
        for bucket, count in enumerate(np.bincount(labels, minlength=n_buckets)):
            slot = next_slot[bucket]
            grouped[slot : slot + count] = values[taken : taken + count]
            next_slot[bucket] += count
            taken += count
    return grouped, counts


def plan_epoch(
    bucket_index: np.ndarray,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    *,
    item_aspects: np.ndarray | None = None,
    bucket_aspects: np.ndarray | None = None,
) -> RankPlan:
    """This rank's batches for `epoch`, following the source's seven steps (module docstring).

    `bucket_index` (N,) gives each item's bucket id, ids ordered by aspect as `generate_buckets`
    orders them. The plan depends only on (bucket_index, batch_size, world_size, seed, epoch)
    and the rank: the same on every machine, a new order every epoch. Pass `item_aspects` (N,)
    and `bucket_aspects` (B,) to have the catch-all aspect error measured.
    """
    bucket_index = _check_bucket_index(bucket_index)
    batch_size = _check_int("batch_size", batch_size, 1)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0, world_size - 1)
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    if (item_aspects is None) != (bucket_aspects is None):
        raise ValueError("item_aspects and bucket_aspects go together: pass both or neither")

    n_items = len(bucket_index)
    per_rank = n_items // (world_size * batch_size) * batch_size
    id_type = _id_type(n_items)

    # Steps 1-3: one global shuffle, truncated and cut into world_size contiguous parts.
    shuffled = shuffled_ids(n_items, seed, epoch)
    shard = shuffled[rank * per_rank : (rank + 1) * per_rank]
    n_buckets = int(bucket_index.max()) + 1 if n_items else 1
    # The narrowest type for the labels: the radix sort and the gathers get cheaper.
    shard_buckets = bucket_index.astype(np.min_scalar_type(n_buckets - 1), copy=False)[shard]

    # Steps 4-5: the walk appends each id to its bucket's list; the tail of each list that
    # does not fill a batch goes to the catch-all list, which stays in bucket (= aspect) order.
    grouped, counts = _group_by_bucket(shard, shard_buckets, n_buckets)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    del shuffled, shard, shard_buckets
    full = counts // batch_size * batch_size
    leftover_buckets = np.repeat(np.arange(len(counts)), counts - full)
    leftover = np.concatenate(
        [
            grouped[start + kept : start + count]
            for start, kept, count in zip(starts, full, counts, strict=True)
        ]
    )

    # Step 6: one uniformly random order of all batches (equivalent to the weighted draw).
    regular_batches = full // batch_size
    n_regular, n_catch_all = int(regular_batches.sum()), len(leftover) // batch_size
    order = np.random.default_rng([seed, epoch, _BATCH_ORDER, rank]).permutation(
        n_regular + n_catch_all
    )
    items = np.empty((n_regular + n_catch_all, batch_size), dtype=id_type)
    first_batch = np.concatenate(([0], np.cumsum(regular_batches)))
    for bucket in np.flatnonzero(regular_batches):
        rows = order[first_batch[bucket] : first_batch[bucket + 1]]
        start = starts[bucket]
        items[rows] = grouped[start : start + full[bucket]].reshape(-1, batch_size)
    items[order[n_regular:]] = leftover.reshape(-1, batch_size)
    del grouped

    # Step 7: every batch's bucket; a catch-all batch takes its median member's bucket.
    catch_all_bucket = leftover_buckets[(batch_size - 1) // 2 :: batch_size]
    bucket = np.empty(n_regular + n_catch_all, dtype=np.int64)
    bucket[order[:n_regular]] = np.repeat(np.arange(len(counts)), regular_batches)
    bucket[order[n_regular:]] = catch_all_bucket
    catch_all = np.zeros(n_regular + n_catch_all, dtype=bool)
    catch_all[order[n_regular:]] = True

    aspect_error = float("nan")
    if item_aspects is not None and len(leftover):
        fitted_to = np.repeat(catch_all_bucket, batch_size)
        aspect_error = float(
            np.mean(
                np.abs(np.asarray(bucket_aspects)[fitted_to] - np.asarray(item_aspects)[leftover])
            )
        )
    return RankPlan(
        items=items,
        bucket=bucket,
        catch_all=catch_all,
        dropped=n_items - per_rank * world_size,
        catch_all_items=len(leftover),
        catch_all_aspect_error=aspect_error,
    )


DROPPED_WARNING_SHARE = 0.05  # warn when truncation leaves out more of an epoch than this


def epoch_use_warning(images: int, used: int, batch_size: int, world_size: int) -> str | None:
    """Why an epoch leaves out more than DROPPED_WARNING_SHARE of its images; None if it does
    not. The prepare job and the trainer say it in these words."""
    if not images or images - used <= DROPPED_WARNING_SHARE * images:
        return None
    return (
        f"an epoch at batch size {batch_size} x world size {world_size} uses {used} of "
        f"{images} images: every rank needs whole batches"
    )


def plan_epoch_by_shards(
    bucket_index: np.ndarray,
    shard_index: np.ndarray,
    window: int,
    batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
) -> RankPlan:
    """This rank's batches for `epoch`, drawn shard window by shard window: a shuffle a bounded
    cache of remote shards can serve.

    The shards (`shard_index` (N,) gives each item's) are shuffled from (seed, epoch) and cut
    into windows of `window` shards; each window's items are planned with the source's seven
    steps (`plan_epoch`, its own seed), and the windows' batches follow one another. So every
    batch holds one bucket, every rank runs the same steps (each window gives every rank the
    same count), and the steps of a window read at most `window` shards. The cost: each window
    truncates to whole batches on every rank (at most world_size * batch_size - 1 items a
    window, against that many an epoch), and its leftovers fill catch-all batches of their own.
    With one window holding every shard this is `plan_epoch` itself.
    """
    bucket_index = _check_bucket_index(bucket_index)
    window = _check_int("window", window, 1)
    shard_index = np.asarray(shard_index)
    if shard_index.shape != bucket_index.shape:
        raise ValueError(f"shard_index must be ({len(bucket_index)},), got {shard_index.shape}")
    shards = np.unique(shard_index)
    if len(shards) <= window:
        return plan_epoch(bucket_index, batch_size, world_size, rank, seed, epoch)
    order = np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(len(shards))
    place = np.empty(int(shards.max()) + 1, dtype=np.int64)
    place[shards[order]] = np.arange(len(shards))  # each shard's position in the epoch
    windows = (place[shard_index] // window).astype(np.min_scalar_type(len(shards) // window))
    n_windows = int(windows.max()) + 1
    ids = np.arange(len(bucket_index), dtype=_id_type(len(bucket_index)))
    grouped, counts = _group_by_bucket(ids, windows, n_windows)  # each window's items, in order
    plans, first = [], 0
    for number, count in enumerate(counts):
        members = grouped[first : first + count]
        first += count
        window_seed = int(
            np.random.SeedSequence([seed, epoch, _WINDOW_SEED, number]).generate_state(
                1, np.uint32
            )[0]
        )
        part = plan_epoch(bucket_index[members], batch_size, world_size, rank, window_seed, epoch)
        plans.append((members[part.items], part))
    steps = [len(part) for _, part in plans]
    return RankPlan(
        items=np.concatenate([items for items, _ in plans]).astype(ids.dtype, copy=False),
        bucket=np.concatenate([part.bucket for _, part in plans]),
        catch_all=np.concatenate([part.catch_all for _, part in plans]),
        dropped=sum(part.dropped for _, part in plans),
        catch_all_items=sum(part.catch_all_items for _, part in plans),
        catch_all_aspect_error=float("nan"),
        window_starts=np.concatenate(([0], np.cumsum(steps)[:-1])).astype(np.int64),
    )
