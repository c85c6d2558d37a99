"""Assigning the scanned images: duplicates turned away, a bucket for each of the others, and
the fit's limits checked; the assign stage's work, in the driver, in Arrow and NumPy columns.

An image is rejected for the first check it fails (a duplicate path, duplicate bytes, an aspect
no bucket fits, too small, too much upscaling, too much crop), with a message naming the
numbers, or the copy of its bytes that is kept. With --near-dedup, the images that pass them
all are searched for near duplicates last (pipeline/near_dedup.py), so that the image kept
for a cluster is one the dataset takes. No Ray, no I/O: tests/test_assign.py runs it on
tables built in memory.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.buckets import REJECT_ASPECT, bucketize
from pipeline.config import PrepareConfig
from pipeline.fit import fit_measures
from pipeline.near_dedup import keep
from pipeline.rejects import Reason, copy_message, rejects_table

BUCKET_COLUMNS = ("bucket", "bucket_width", "bucket_height", "aspect_error")


def assign(
    scanned: pa.Table,
    config: PrepareConfig,
    held: pa.ChunkedArray | None = None,
    held_keys: np.ndarray | None = None,
) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """(accepted images with their BUCKET_COLUMNS, rejections so far, the bucket list (B, 2)).

    `scanned` is the scan's table, sorted by source; `held` the `copy_keys` of the images an
    incremental run's OUT holds, whose copies of a duplicate are kept, and `held_keys` their
    `key_bytes`, which are kept of a cluster of near duplicates."""
    failed, candidates = _split(scanned, pc.is_null(scanned["reject"]).combine_chunks())
    width = candidates["width"].to_numpy(zero_copy_only=False).astype(np.int64)
    height = candidates["height"].to_numpy(zero_copy_only=False).astype(np.int64)
    buckets, index, aspect_error = bucketize(width, height, config.buckets)
    bucket_w, bucket_h = buckets[index, 0], buckets[index, 1]  # rejected rows: any bucket
    upscale, cropped = fit_measures(width, height, bucket_w, bucket_h)

    duplicate = np.ones(len(width), dtype=bool)  # a listing may name a file twice: keep one
    duplicate[np.unique(key_bytes(candidates["key"]), return_index=True)[1]] = False
    copy_of = _content_duplicates(candidates, held)

    reasons = np.full(len(width), None, dtype=object)
    messages = np.full(len(width), None, dtype=object)
    checks = [  # the first failed check names the reason; a bucket must exist to fit to it
        (Reason.DUPLICATE, duplicate, lambda i: "the same file is listed more than once"),
        (
            Reason.DUPLICATE_CONTENT,
            copy_of != None,  # noqa: E711 (element-wise)
            lambda i: copy_message("the same bytes", copy_of[i]),
        ),
        (
            Reason.ASPECT,
            index == REJECT_ASPECT,
            lambda i: f"aspect {width[i] / height[i]:.3f} is too far from every bucket",
        ),
        (
            Reason.TOO_SMALL,
            index < 0,
            lambda i: (
                f"{width[i]}x{height[i]} is under every bucket it could use without upscaling"
            ),
        ),
        (
            Reason.UPSCALE,
            upscale > config.max_upscale,
            lambda i: f"needs {upscale[i]:.2f}x upscaling, over max_upscale={config.max_upscale}",
        ),
        (
            Reason.CROP,
            cropped > config.max_crop,
            lambda i: (
                f"fit crops {cropped[i]:.0%} of the area, over max_crop={config.max_crop:.0%}"
            ),
        ),
    ]
    for reason, failed_check, message in reversed(checks):
        for i in np.flatnonzero(failed_check):
            reasons[i], messages[i] = reason.value, message(i)
    if config.near_dedup:
        _near_duplicates(candidates, reasons, messages, held_keys, config.near_dedup_distance)
    ok = reasons == None  # noqa: E711 (element-wise comparison)
    rejected, accepted = _split(candidates, pa.array(ok.astype(bool)))
    for name, values in zip(BUCKET_COLUMNS, (index, bucket_w, bucket_h, aspect_error), strict=True):
        column_type = pa.float64() if name == "aspect_error" else pa.int32()
        accepted = accepted.append_column(name, pa.array(values[ok], column_type))
    rejects = pa.concat_tables(
        [
            rejects_table(failed, failed["reject"], failed["message"]),
            rejects_table(rejected, reasons[~ok], messages[~ok]),
        ]
    )
    return accepted, rejects, buckets


def copy_keys(table: pa.Table) -> pa.ChunkedArray:
    """Each row's content hash and source as one string (null where not hashed): what names a
    copy of some bytes, in the scan's table and in OUT's index alike."""
    return pc.binary_join_element_wise(table["content_hash"], table["source"], "\0")


def _content_duplicates(candidates: pa.Table, held: pa.ChunkedArray | None) -> np.ndarray:
    """For each candidate, the source of the copy of its bytes that is kept, or None for the
    kept ones: the copy OUT holds (`held`) if it is still a candidate, else the first by
    source (the listing's order), so reruns keep the same copy. A file a listing names twice
    (with two captions) is two samples, no copy of itself. In Arrow and fixed-width NumPy
    columns: no Python string an image in the driver."""
    kept_by = np.full(len(candidates), None, dtype=object)
    hashes = candidates["content_hash"]
    hashed = np.flatnonzero(pc.is_valid(hashes).to_numpy(zero_copy_only=False))
    if not len(hashed):  # --no-dedup
        return kept_by
    labels = hashes.take(hashed).cast(pa.binary()).to_numpy(zero_copy_only=False).astype("S32")
    source_codes = candidates["source"].combine_chunks().dictionary_encode().indices.to_numpy()
    is_held = np.zeros(len(hashed), dtype=bool)
    if held is not None:
        in_out = pc.is_in(copy_keys(candidates.take(hashed)), value_set=held.combine_chunks())
        is_held = in_out.to_numpy(zero_copy_only=False)
    order = hashed[np.lexsort((hashed, ~is_held))]  # held copies first, then listing order
    rank = np.empty(len(candidates), dtype=np.int64)
    rank[hashed] = np.arange(len(hashed))
    _, first, group = np.unique(labels[rank[order]], return_index=True, return_inverse=True)
    keeper = order[first][group]  # the kept copy of each row in `order`
    repeat = source_codes[keeper] != source_codes[order]  # a file listed twice: no copy of itself
    kept_by[order[repeat]] = candidates["source"].take(keeper[repeat]).to_pylist()
    return kept_by


def _near_duplicates(
    candidates: pa.Table,
    reasons: np.ndarray,
    messages: np.ndarray,
    held_keys: np.ndarray | None,
    distance: int,
) -> None:
    """Reject, in `reasons` and `messages`, each image not rejected yet whose `dhash` is within
    `distance` bits of one kept before it, best first: the ones OUT holds, then by most
    pixels, most bytes, and source (the table's order). Deterministic: the order and the
    hashes decide, not the scan's scheduling."""
    hashed = pc.is_valid(candidates["dhash"]).to_numpy(zero_copy_only=False)
    open_ = np.flatnonzero((reasons == None) & hashed)  # noqa: E711 (element-wise)
    if len(open_) < 2:
        return
    hashes = candidates["dhash"].take(open_).to_numpy().astype(np.uint64)
    is_held = np.zeros(len(open_), bool)
    if held_keys is not None:
        is_held = np.isin(key_bytes(candidates["key"].take(open_)), held_keys)
    columns = candidates.select(["width", "height", "size"]).take(open_)
    pixels = columns["width"].to_numpy().astype(np.int64) * columns["height"].to_numpy()
    order = np.lexsort((open_, -columns["size"].to_numpy(), -pixels, ~is_held))
    kept_by = keep(hashes, order, distance)
    near = np.flatnonzero(kept_by >= 0)
    bits = np.bitwise_count(hashes[near] ^ hashes[kept_by[near]])
    kept_sources = candidates["source"].take(open_[kept_by[near]]).to_pylist()
    own_sources = candidates["source"].take(open_[near]).to_pylist()
    for image, kept, own, differ in zip(
        open_[near], kept_sources, own_sources, bits.tolist(), strict=True
    ):
        if kept == own:  # a file a listing names twice (two captions): no copy of itself
            continue
        reasons[image] = Reason.NEAR_DUPLICATE.value
        likeness = (
            f"a near copy ({differ} of 64 bits of their perceptual hashes differ, at most "
            f"near_dedup_distance={distance})"
        )
        messages[image] = copy_message(likeness, kept)


def key_bytes(column: pa.ChunkedArray) -> np.ndarray:
    """The non-null keys as fixed-width bytes (N,) 'S20', built without a Python object each."""
    fixed = pc.cast(pc.drop_null(column).combine_chunks(), pa.binary(20))
    if len(fixed) == 0:
        return np.empty(0, dtype="S20")
    return np.frombuffer(
        fixed.buffers()[1], dtype="S20", count=len(fixed), offset=20 * fixed.offset
    )


def _split(table: pa.Table, kept: pa.BooleanArray) -> tuple[pa.Table, pa.Table]:
    """(rows not kept, rows kept): without a copy of the table when every row is kept, as
    nearly every row is (at a million images a copy is a hundred megabytes)."""
    if pc.all(kept).as_py() is not False:
        return table.schema.empty_table(), table
    return table.filter(pc.invert(kept)), table.filter(kept)
