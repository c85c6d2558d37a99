"""Speed and peak memory of the bucketing core at internet scale, against plain Python loops.

    python bench/plan_bench.py                      # 100M items planned, 10M sizes assigned
    python bench/plan_bench.py --plan-items 1e6 --assign-items 1e6   # a quick look

The baselines are the straightforward implementations (the source's per-image argmin in a
Python loop; the seven planning steps with lists, dicts and a weighted draw per batch),
measured on --baseline-items in the same run; the comparison is per item.
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc

import numpy as np

from pipeline.buckets import assign_buckets, bucket_aspects, generate_buckets
from pipeline.plan import plan_epoch


def python_assign(widths, heights, buckets, max_log_aspect_error):
    aspects = bucket_aspects(buckets)
    index, errors = [], []
    for width, height in zip(widths.tolist(), heights.tolist(), strict=True):
        aspect = width / height
        bucket = int(np.abs(aspects - aspect).argmin())
        error = abs(aspects[bucket] - aspect)
        index.append(
            bucket if abs(np.log(aspects[bucket] / aspect)) <= max_log_aspect_error else -1
        )
        errors.append(error)
    return index, errors


def python_plan(bucket_index, batch_size, world_size, rank, seed, epoch):
    rng = random.Random(f"{seed}-{epoch}")
    ids = list(range(len(bucket_index)))
    rng.shuffle(ids)
    ids = ids[: len(ids) - len(ids) % (world_size * batch_size)]
    per_rank = len(ids) // world_size
    lists: dict[object, list[int]] = {}
    for item in ids[rank * per_rank : (rank + 1) * per_rank]:
        lists.setdefault(bucket_index[item], []).append(item)
    catch_all: list[int] = []
    for items in lists.values():
        extra = len(items) % batch_size
        if extra:
            catch_all.extend(items[-extra:])
            del items[-extra:]
    lists = {bucket: items for bucket, items in lists.items() if items}
    if catch_all:
        lists["catch_all"] = catch_all
    batches = []
    while lists:
        keys = list(lists)
        bucket = rng.choices(keys, weights=[len(lists[k]) for k in keys])[0]
        batches.append((lists[bucket][:batch_size], bucket))
        del lists[bucket][:batch_size]
        if not lists[bucket]:
            del lists[bucket]
    return batches


def measure(function, *args, **kwargs):
    """(seconds, peak MiB allocated during the call) of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    function(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak


def skewed_bucket_ids(n_items, n_buckets, rng, chunk=10_000_000):
    """Bucket ids with a long-tailed popularity, built in chunks to keep memory flat."""
    weights = 1.0 / np.arange(1, n_buckets + 1) ** 1.2
    cumulative = np.cumsum(weights / weights.sum())
    ids = np.empty(n_items, dtype=np.uint8)
    for start in range(0, n_items, chunk):
        size = min(chunk, n_items - start)
        ids[start : start + size] = np.searchsorted(cumulative, rng.random(size), side="right")
    return np.minimum(ids, n_buckets - 1)


def report(name, seconds, peak, items, baseline_seconds, baseline_items):
    rate = items / seconds
    baseline_rate = baseline_items / baseline_seconds
    print(
        f"{name:7s} {items:>12,d} items {seconds:8.2f} s  peak {peak:8.0f} MiB  "
        f"{rate / 1e6:8.2f} M items/s  | python loop {baseline_items:,d} items "
        f"{baseline_seconds:6.2f} s {baseline_rate / 1e6:7.3f} M items/s  "
        f"| speed-up {rate / baseline_rate:,.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plan-items", type=float, default=100e6)
    parser.add_argument("--assign-items", type=float, default=10e6)
    parser.add_argument("--baseline-items", type=float, default=200e3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args()
    plan_items, assign_items, baseline_items = (
        int(args.plan_items),
        int(args.assign_items),
        int(args.baseline_items),
    )
    rng = np.random.default_rng(0)
    buckets = generate_buckets()

    widths = rng.integers(64, 4096, assign_items)
    heights = rng.integers(64, 4096, assign_items)
    base_s, _ = measure(
        python_assign, widths[:baseline_items], heights[:baseline_items], buckets, np.log(2)
    )
    seconds, peak = measure(assign_buckets, widths, heights, buckets)
    report("assign", seconds, peak, assign_items, base_s, baseline_items)
    del widths, heights

    bucket_index = skewed_bucket_ids(plan_items, len(buckets), rng)
    plan_args = (args.batch_size, args.world_size, 0, 0, 0)
    base_s, _ = measure(python_plan, bucket_index[:baseline_items].tolist(), *plan_args)
    seconds, peak = measure(plan_epoch, bucket_index, *plan_args)
    report("plan", seconds, peak, plan_items, base_s, baseline_items)
    print(
        f"(plan: batch size {args.batch_size}, world size {args.world_size}, rank 0; "
        f"input column {bucket_index.nbytes / 2**20:.0f} MiB not counted in the peak)"
    )


if __name__ == "__main__":
    main()
