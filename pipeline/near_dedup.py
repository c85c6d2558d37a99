"""Near duplicates among 64-bit perceptual hashes: which pairs lie within a Hamming distance,
and which image of each cluster is kept. Pure NumPy, no I/O; the assign stage calls it
(pipeline/assign.py) with the hashes the scan took (pipeline/perceptual.py).

The search is multi-index hashing (Norouzi, Punjani and Fleet, 2012): the 64 bits are cut into
m = distance + 1 substrings, and by pigeonhole two hashes within `distance` bits agree exactly
on at least one of them. Each substring's values are sorted once; only hashes that share a
value are compared (a popcount of their XOR). Work and memory follow the candidate pairs,
about N^2 / 2 * m / 2^(64/m) for N uniform hashes, never the N^2 / 2 of a pairwise scan: at
distance 4 (13-bit substrings) 1/1400 of the pairs; 1M hashes take ~3 s, 1/600 of a
brute-force scan's time (bench/near_dedup_bench.py, bench/README.md). Larger distances mean
shorter substrings and more candidates: at 8 the substrings are 7 bits and a million hashes
make ~3e10 candidates, so the job's default is 4 (docs/format.md lists what each distance
catches). Many equal hashes (blank images) are one bucket whose pairs are all compared: a
thousand blank images cost half a million comparisons a substring.

Keeping is greedy in a given order (the best image first): an image is kept unless a hash
within `distance` of it was kept before it, and a rejected one names the first kept image
within reach. The result depends on the hashes and the order alone, never on how the scan's
work was scheduled.
"""

from __future__ import annotations

import itertools

import numpy as np

PAIRS_PER_STEP = 1 << 22  # candidate pairs compared at once: bounds the search's memory


def substrings(bits: int, count: int) -> list[tuple[int, int]]:
    """(shift, width) of `count` disjoint substrings covering `bits` bits, widths differing
    by at most one (the wider ones first)."""
    widths = [bits // count + (i < bits % count) for i in range(count)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def near_pairs(hashes: np.ndarray, distance: int) -> np.ndarray:
    """Every pair (i, j), i < j, of `hashes` (N,) uint64 within `distance` bits of each other:
    (P, 2) int64, sorted by i then j. `distance` in 0..63."""
    hashes = np.asarray(hashes, np.uint64)
    if not 0 <= distance < 64:
        raise ValueError(f"distance must be in 0..63, not {distance}")
    found = [np.empty((0, 2), np.int64)]
    for shift, width in substrings(64, distance + 1):
        values = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(values, kind="stable")
        found += _bucket_pairs(hashes[order], order, values[order], distance)
    pairs = np.concatenate(found)
    if not len(pairs):
        return pairs
    return np.unique(pairs, axis=0)  # a pair that agrees on several substrings once


def _bucket_pairs(
    sorted_hashes: np.ndarray, order: np.ndarray, sorted_values: np.ndarray, distance: int
) -> list[np.ndarray]:
    """The pairs within `distance` among hashes that share a substring value: positions p and
    p + step of the sorted order, for step 1, 2, ... while some bucket is still longer than
    the step (the positions that still have a partner that far on are kept, so a step costs
    what it compares). The hashes come in that order too: reads near each other in memory."""
    end = np.searchsorted(sorted_values, sorted_values, side="right")  # each bucket's end
    positions = np.flatnonzero(end - np.arange(len(order)) > 1)
    found, step = [], 1
    while len(positions):
        for chunk in np.array_split(positions, -(-len(positions) // PAIRS_PER_STEP)):
            close = chunk[
                np.bitwise_count(sorted_hashes[chunk] ^ sorted_hashes[chunk + step]) <= distance
            ]
            found.append(np.sort(np.stack([order[close], order[close + step]], axis=1), axis=1))
        step += 1
        positions = positions[end[positions] - positions > step]
    return found


def keep(hashes: np.ndarray, order: np.ndarray, distance: int) -> np.ndarray:
    """For each of `hashes` (N,) uint64, the index of the kept image it is a near duplicate of,
    or -1 where it is kept: (N,) int64. `order` (N,) is a permutation of the indices, the best
    image first; an image is kept unless one within `distance` bits was kept before it, and
    names the first such one in `order`. Deterministic in (hashes, order, distance)."""
    rank = np.empty(len(order), np.int64)
    rank[np.asarray(order)] = np.arange(len(order))
    kept_by = np.full(len(hashes), -1, np.int64)
    pairs = near_pairs(hashes, distance)
    if not len(pairs):
        return kept_by
    ahead = np.where((rank[pairs[:, 0]] < rank[pairs[:, 1]])[:, None], pairs, pairs[:, ::-1])
    ahead = ahead[np.lexsort((rank[ahead[:, 0]], rank[ahead[:, 1]]))]  # by the later's rank
    _, starts = np.unique(rank[ahead[:, 1]], return_index=True)
    # only an image with a better neighbour can be rejected, decided in rank order once its
    # better neighbours are: a loop over the near duplicates, not over the dataset
    for start, stop in itertools.pairwise([*starts.tolist(), len(ahead)]):
        neighbours = ahead[start:stop, 0]
        kept = neighbours[kept_by[neighbours] < 0]
        if len(kept):
            kept_by[ahead[start, 1]] = kept[0]
    return kept_by
