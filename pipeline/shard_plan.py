"""Which images go into which tar: bucket-homogeneous shards with content-derived names.

Pure NumPy. A shard's name is its bucket's resolution plus a digest of the config and its
members' keys, so the same input and config always give the same shards: a rerun after an
interruption finds the finished ones by name and writes only the rest. An incremental run
keeps every earlier shard whose members are all still present and unchanged, and packs only
the remaining images (new, changed, or orphaned by a deletion) into new shards. Within a
bucket, images are packed in key order, or by `places` where given: rows of an input Parquet
file in file order, so that the fit reads each of its row groups once (work_plan.source_walk).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

SHARD_NAME = re.compile(r"[0-9]+x[0-9]+-[0-9a-f]{16}")  # shard_name's: 8 digest bytes in hex


@dataclass(frozen=True)
class Shard:
    name: str  # file stem: "{width}x{height}-{digest}"
    bucket: int
    rows: np.ndarray  # indices into the image columns given to plan_shards, in packing order


def shard_name(bucket_size: tuple[int, int], keys: np.ndarray, salt: str) -> str:
    """The shard's file stem: its resolution and a digest of `salt` and its keys (in any order)."""
    digest = hashlib.blake2b(salt.encode(), digest_size=8)
    digest.update(np.sort(keys).tobytes())
    return f"{bucket_size[0]}x{bucket_size[1]}-{digest.hexdigest()}"


def is_shard_name(name: str) -> bool:
    """Whether a file stem in shards/ or parts/ is one the job wrote: reruns delete only those."""
    return SHARD_NAME.fullmatch(name) is not None


def plan_shards(
    keys: np.ndarray,
    buckets: np.ndarray,
    bucket_sizes: np.ndarray,
    samples_per_shard: int,
    salt: str,
    previous: dict[str, np.ndarray] | None = None,
    places: np.ndarray | None = None,
) -> list[Shard]:
    """Shards for images with `keys` (N,) fixed-width bytes and bucket ids `buckets` (N,).

    `bucket_sizes` (B, 2) gives names their resolution; `salt` (the config's fingerprint)
    goes into every name. `previous` maps earlier shard names to their member keys: such a
    shard is kept as it is when all its keys are among `keys`, in the bucket its name says.
    New shards hold up to `samples_per_shard` images of one bucket (>= 1: PrepareConfig
    validates it), in the order of `places` (N,) int64 then of keys: images with the same place
    (all of them when `places` is None) in key order.
    """
    keys = np.asarray(keys)
    buckets = np.asarray(buckets, dtype=np.int64)
    taken = np.zeros(len(keys), dtype=bool)
    shards = []
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    for name, members in sorted((previous or {}).items()):
        members = np.sort(np.asarray(members, dtype=keys.dtype))
        if len(keys) == 0:
            break
        rows = by_key[np.minimum(np.searchsorted(sorted_keys, members), len(keys) - 1)]
        if not np.array_equal(keys[rows], members):
            continue  # a member was deleted or changed: its survivors are packed anew
        bucket = int(buckets[rows[0]])
        width, height = bucket_sizes[bucket]
        if (
            np.all(buckets[rows] == bucket)
            and name.startswith(f"{width}x{height}-")
            and not taken[rows].any()
        ):
            taken[rows] = True
            shards.append(Shard(name, bucket, rows))

    remaining = np.flatnonzero(~taken)
    place = np.zeros(len(keys), np.int64) if places is None else np.asarray(places, np.int64)
    remaining = remaining[np.lexsort((keys[remaining], place[remaining], buckets[remaining]))]
    bucket_starts = np.flatnonzero(np.r_[True, np.diff(buckets[remaining]) != 0])
    for start, stop in zip(bucket_starts, np.r_[bucket_starts[1:], len(remaining)], strict=True):
        for first in range(start, stop, samples_per_shard):
            rows = remaining[first : min(first + samples_per_shard, stop)]
            bucket = int(buckets[rows[0]])
            shards.append(
                Shard(shard_name(tuple(bucket_sizes[bucket]), keys[rows], salt), bucket, rows)
            )
    return shards
