"""The near-duplicate search (pipeline/near_dedup.py) against a brute-force reference: every
pair within the distance found, none beyond it, and the greedy keeping, on hashes hypothesis
draws with planted near copies (uniform hashes alone are never near)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.near_dedup import keep, near_pairs, substrings


def brute_pairs(hashes: np.ndarray, distance: int) -> np.ndarray:
    pairs = [
        (i, j)
        for i, j in itertools.combinations(range(len(hashes)), 2)
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= distance
    ]
    return np.array(pairs, np.int64).reshape(-1, 2)


def brute_keep(hashes: np.ndarray, order: np.ndarray, distance: int) -> np.ndarray:
    kept_by = np.full(len(hashes), -1, np.int64)
    kept: list[int] = []
    for image in order:
        near = [k for k in kept if bin(int(hashes[k]) ^ int(hashes[image])).count("1") <= distance]
        if near:
            kept_by[image] = near[0]
        else:
            kept.append(int(image))
    return kept_by


@st.composite
def hash_sets(draw) -> tuple[np.ndarray, int]:
    """Up to 40 hashes, a third of them copies of earlier ones with a few bits flipped (some
    within the distance, some just beyond), and the distance."""
    distance = draw(st.integers(0, 12))
    hashes: list[int] = []
    for _ in range(draw(st.integers(0, 40))):
        if hashes and draw(st.integers(0, 2)) == 0:
            bits = draw(st.sets(st.integers(0, 63), max_size=distance + 2))
            hashes.append(draw(st.sampled_from(hashes)) ^ sum(1 << b for b in bits))
        else:
            hashes.append(draw(st.integers(0, 2**64 - 1)))
    return np.array(hashes, np.uint64), distance


@given(hash_sets())
def test_the_pairs_are_the_brute_force_pairs(case):
    hashes, distance = case
    assert near_pairs(hashes, distance).tolist() == brute_pairs(hashes, distance).tolist()


@given(hash_sets(), st.randoms(use_true_random=False))
def test_keeping_is_the_brute_force_greedy_in_any_order(case, random):
    hashes, distance = case
    order = np.array(random.sample(range(len(hashes)), len(hashes)), np.int64)
    assert keep(hashes, order, distance).tolist() == brute_keep(hashes, order, distance).tolist()


def test_a_rejected_image_names_the_best_kept_one_and_a_chain_keeps_its_far_end():
    a = 0
    b = a ^ 0b111  # 3 bits from a
    c = b ^ (0b111 << 8)  # 3 from b, 6 from a
    hashes = np.array([c, b, a], np.uint64)
    assert keep(hashes, np.array([2, 1, 0]), 4).tolist() == [-1, 2, -1]  # a, then c survives b
    assert keep(hashes, np.array([1, 2, 0]), 4).tolist() == [1, -1, 1]  # b first takes both


def test_a_thousand_equal_hashes_keep_one():
    kept_by = keep(np.zeros(1000, np.uint64), np.arange(1000)[::-1], 0)
    assert kept_by[999] == -1 and (kept_by[:999] == 999).all()


@pytest.mark.parametrize("count", [1, 5, 9, 13, 64])
def test_substrings_cover_the_bits_once(count):
    covered = [shift + bit for shift, width in substrings(64, count) for bit in range(width)]
    assert covered == list(range(64))
    widths = {width for _, width in substrings(64, count)}
    assert max(widths) - min(widths) <= 1


def test_a_distance_outside_the_bits_is_refused():
    with pytest.raises(ValueError, match="distance"):
        near_pairs(np.zeros(2, np.uint64), 64)
