"""The assign stage alone, on a scan's table built in memory (no Ray, no files): what a user
relies on from it, a duplicate rejected naming the copy kept, the copy OUT holds kept on an
incremental run, an aspect no bucket fits rejected, and the rest given their buckets."""

from __future__ import annotations

import pyarrow as pa
from conftest import SMALL_BUCKETS

from pipeline.assign import BUCKET_COLUMNS, assign, copy_keys
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
