"""The assign stage alone, on a scan's table built in memory (no Ray, no files): what a user
relies on from it, a duplicate rejected naming the copy kept, the copy OUT holds kept on an
incremental run, an aspect no bucket fits rejected, and the rest given their buckets."""

from __future__ import annotations

import pyarrow as pa
from conftest import SMALL_BUCKETS

from pipeline.assign import BUCKET_COLUMNS, assign, copy_keys, key_bytes
from pipeline.config import PrepareConfig
from pipeline.scan import SCAN_SCHEMA

CONFIG = PrepareConfig(input="images", output="out", buckets=SMALL_BUCKETS)


def scanned(*images: tuple[str, int, int, str | None]) -> pa.Table:
    """A scan's table, sorted by source: (source, width, height, content hash) per image."""
    rows = [
        {
            "source": source,
            "key": f"{i:020x}",
            "size": 100,
            "mtime_ns": 0,
            "width": width,
            "height": height,
            "format": "JPEG",
            "mode": "RGB",
            "orientation": 1,
            "content_hash": digest,
        }
        for i, (source, width, height, digest) in enumerate(sorted(images))
    ]
    return pa.Table.from_pylist(rows, SCAN_SCHEMA)


def rejected(rejects: pa.Table) -> dict[str, tuple[str, str]]:
    return {row["source"]: (row["reason"], row["message"]) for row in rejects.to_pylist()}


def test_a_copy_of_the_same_bytes_is_rejected_naming_the_first_by_source_which_is_kept():
    accepted, rejects, _ = assign(
        scanned(("b.jpg", 96, 64, "1" * 32), ("a.jpg", 96, 64, "1" * 32), ("c.jpg", 64, 96, None)),
        CONFIG,
    )
    assert accepted["source"].to_pylist() == ["a.jpg", "c.jpg"]
    assert rejected(rejects) == {
        "b.jpg": ("duplicate_content", "the same bytes as a.jpg, which is kept")
    }


def test_the_copy_out_already_holds_is_kept_over_the_first_by_source():
    table = scanned(("a.jpg", 96, 64, "1" * 32), ("b.jpg", 96, 64, "1" * 32))
    held = copy_keys(table.filter(pa.compute.equal(table["source"], "b.jpg")))
    accepted, rejects, _ = assign(table, CONFIG, held)
    assert accepted["source"].to_pylist() == ["b.jpg"]
    assert rejected(rejects)["a.jpg"] == (
        "duplicate_content",
        "the same bytes as b.jpg, which is kept",
    )


def test_an_aspect_too_far_from_every_bucket_is_rejected_and_the_rest_get_their_buckets():
    accepted, rejects, buckets = assign(
        scanned(("panorama.jpg", 1000, 64, None), ("wide.jpg", 96, 64, None)), CONFIG
    )
    reason, message = rejected(rejects)["panorama.jpg"]
    assert reason == "aspect" and message.startswith("aspect 15.625 is too far")
    assert accepted["source"].to_pylist() == ["wide.jpg"]
    (row,) = accepted.select(BUCKET_COLUMNS).to_pylist()
    assert (row["bucket_width"], row["bucket_height"]) == (96, 64)
    assert buckets[row["bucket"]].tolist() == [96, 64]


NEAR = PrepareConfig(input="images", output="out", buckets=SMALL_BUCKETS, near_dedup=True)


def hashed(*images: tuple[str, int, int, int, int]) -> pa.Table:
    """A scan's table with perceptual hashes: (source, width, height, size, dhash) per image."""
    table = scanned(*((source, width, height, None) for source, width, height, _, _ in images))
    by_source = {source: (size, dhash) for source, _, _, size, dhash in images}
    sources = table["source"].to_pylist()
    table = table.set_column(
        table.schema.get_field_index("size"), "size", pa.array([by_source[s][0] for s in sources])
    )
    return table.set_column(
        table.schema.get_field_index("dhash"),
        "dhash",
        pa.array([by_source[s][1] for s in sources], pa.uint64()),
    )


def test_a_near_copy_is_rejected_naming_the_largest_image_which_is_kept():
    table = hashed(
        ("a.jpg", 96, 64, 900, 0xF10),  # 3 bits from d, 1 from c
        ("b.jpg", 96, 64, 800, 0xFFFF_FFFF_0000_0000),  # far from all
        ("c.jpg", 192, 128, 500, 0xF00),  # 2 bits from d
        ("d.jpg", 192, 128, 700, 0xF03),  # as many pixels as c, more bytes: kept first
    )
    accepted, rejects, _ = assign(table, NEAR)
    assert accepted["source"].to_pylist() == ["b.jpg", "d.jpg"]
    reasons = rejected(rejects)
    assert {source: reason for source, (reason, _) in reasons.items()} == {
        "a.jpg": "near_duplicate",
        "c.jpg": "near_duplicate",
    }
    assert reasons["c.jpg"][1].startswith("a near copy (2 of 64 bits")
    assert assign(table, CONFIG)[0]["source"].to_pylist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def test_the_image_out_holds_is_kept_over_a_larger_near_copy():
    table = hashed(("old.jpg", 96, 64, 100, 0), ("new.jpg", 192, 128, 900, 1))
    held = key_bytes(table.filter(pa.compute.equal(table["source"], "old.jpg"))["key"])
    accepted, rejects, _ = assign(table, NEAR, held_keys=held)
    assert accepted["source"].to_pylist() == ["old.jpg"]
    assert rejected(rejects)["new.jpg"][1].endswith(" as old.jpg, which is kept")


def test_an_image_rejected_for_another_reason_keeps_none_of_its_near_copies():
    table = hashed(("panorama.jpg", 1000, 64, 900, 0), ("wide.jpg", 96, 64, 100, 0))
    accepted, rejects, _ = assign(table, NEAR)
    assert accepted["source"].to_pylist() == ["wide.jpg"]
    assert rejected(rejects)["panorama.jpg"][0] == "aspect"
