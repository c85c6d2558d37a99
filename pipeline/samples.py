"""Turning listed images into shard samples: read, fit, encode; the fit stage's unit of work.

`fit_samples` takes pieces of shards (runs of their rows, see work_plan.py) and returns for each
piece its records in the same order, a sample's tar members with its index fields or a
rejection with its reason, and what each image took. A bad image or caption is that file's
rejection; only a failure of the infrastructure raises, so that the task is retried.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings

import numpy as np
import pyarrow as pa

from pipeline.config import WriteOptions
from pipeline.format import JSON_MEMBER_FIELDS
from pipeline.imaging import encode, fitted_image
from pipeline.inputs import Input
from pipeline.readers import read_bytes, read_image
from pipeline.rejects import Reason, Rejected
from pipeline.sources import json_caption


def fit_samples(
    pieces: list[pa.Table], source: Input, options: WriteOptions
) -> tuple[list[list], np.ndarray]:
    """Each piece's records: its rows with the sample's `members` and index fields added, or
    with `reject` and `message` set; and the milliseconds each image took, in order (the work
    plan sizes the next tasks from them).

    Images inside archives are fitted in the archive's order (`_read_order`): a Parquet row
    group is read once for all the task's rows in it, not once a row, a tar front to back."""
    rows = [row for piece in pieces for row in piece.to_pylist()]
    records: list[dict | None] = [None] * len(rows)
    milliseconds = np.zeros(len(rows), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's and libvips' warnings on odd but usable files
        for i in sorted(range(len(rows)), key=lambda i: _read_order(rows[i], i)):
            start = time.perf_counter()
            records[i] = _record(rows[i], source, options)
            milliseconds[i] = 1000 * (time.perf_counter() - start)
    bounds = np.cumsum([0, *(len(piece) for piece in pieces)])
    return [records[a:b] for a, b in itertools.pairwise(bounds)], milliseconds


def _read_order(row: dict, position: int) -> tuple[str, int, int]:
    """Where a row's image lies: loose files keep their order, archive members go by archive
    and place in it (a tar's byte offset, a Parquet file's row)."""
    place = row.get("source_row")
    return row.get("archive") or "", row.get("member_offset") or place or 0, position


def _record(row: dict, source: Input, options: WriteOptions) -> dict:
    try:
        members, fields = _sample(row, source, options)
    except Rejected as rejected:
        return row | {"reject": rejected.reason.value, "message": rejected.message}
    return row | fields | {"members": members}


def _read_caption(row: dict, source: Input) -> str | None:
    """The listing's caption, else the sidecar's (a .json one's `json_caption`)."""
    if row["caption"] is not None:
        return row["caption"]
    if row["caption_source"] is None:
        return None
    text = read_bytes(source, row["caption_source"]).decode("utf-8")
    if not row["caption_source"].lower().endswith(".json"):
        return text.strip()
    try:
        return json_caption(json.loads(text), source.caption_field)
    except ValueError as error:
        raise Rejected(Reason.BAD_CAPTION, f"{row['caption_source']}: {error}") from None


def _sample(row: dict, source: Input, options: WriteOptions) -> tuple[dict, dict]:
    """(tar members by extension, index fields); raises Rejected for an unusable image or
    caption. A local image is read only as far as its decoder needs."""
    bucket = (row["bucket_width"], row["bucket_height"])
    rng = (
        np.random.default_rng([options.seed, int(row["key"], 16)])
        if options.crop == "random"
        else None
    )
    try:
        caption = _read_caption(row, source)
        image = read_image(source, row)
    except UnicodeDecodeError as error:
        raise Rejected(Reason.CAPTION_ENCODING, f"caption is not UTF-8: {error}") from None
    except (OSError, pa.ArrowException) as error:  # a file gone, a Parquet input damaged
        raise Rejected(Reason.UNREADABLE, f"{type(error).__name__}: {error}") from None
    try:
        fitted = fitted_image(image, bucket, options.crop, rng, options.background)
    except Exception as error:  # any decoder failure on a corrupt file is that file's alone
        raise Rejected(Reason.CORRUPT, f"{type(error).__name__}: {error}") from None
    header, pixels = fitted.header, fitted.pixels
    if (header.width, header.height, header.orientation) != (
        row["width"],
        row["height"],
        row["orientation"],
    ):
        raise Rejected(
            Reason.CHANGED,
            f"scanned as {row['width']}x{row['height']} (orientation {row['orientation']}), "
            f"now {header.width}x{header.height} (orientation {header.orientation})",
        )
    fields = {
        "caption": caption,
        "stored_width": pixels.shape[1],
        "stored_height": pixels.shape[0],
        "crop_left": fitted.crop[0],
        "crop_top": fitted.crop[1],
        "note": fitted.note,
    }
    described = row | fields
    metadata = {name: described[name] for name in JSON_MEMBER_FIELDS}
    members = {  # the image as an array: Ray hands arrays to the writer without a copy
        options.image_format: np.frombuffer(
            encode(pixels, options.image_format, options.quality), np.uint8
        ),
        "json": json.dumps(metadata, sort_keys=True).encode(),
        "txt": (caption or "").encode(),  # always there: plain webdataset tuples need it
    }
    return members, fields
