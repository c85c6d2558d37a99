"""Writing one shard: fit and encode its images, write the tar and its index part atomically.

`write_shard` is the unit of work of the write stage. A bad image or caption becomes a
rejection row in the shard's part; only a failure of the output itself raises, so that the
task is retried. Tars are byte-reproducible: members in key order, fixed mtime and owner.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from webdataset import TarWriter

from pipeline.imaging import CROPS, DEFAULT_BACKGROUND, ENCODERS, encode, fitted_image
from pipeline.output import OutputDir
from pipeline.rejects import Reason, Rejected
from pipeline.sources import InputRoot

TAR_MTIME = 0

PART_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("width", pa.int32()),  # source size after EXIF orientation
        ("height", pa.int32()),
        ("bucket", pa.int32()),
        ("bucket_width", pa.int32()),
        ("bucket_height", pa.int32()),
        ("aspect_error", pa.float64()),
        ("stored_width", pa.int32()),
        ("stored_height", pa.int32()),
        ("shard", pa.string()),  # path of the tar relative to OUT
        ("caption", pa.string()),
        ("image_offset", pa.int64()),  # byte offset of the member's data inside the tar
        ("image_size", pa.int64()),
        ("json_offset", pa.int64()),
        ("json_size", pa.int64()),
        ("txt_offset", pa.int64()),  # the caption member: empty when the image has none
        ("txt_size", pa.int64()),
        ("note", pa.string()),  # metadata ignored while reading the image, and why
        ("reject", pa.string()),  # set on write-time rejections, which have no members
        ("message", pa.string()),
    ]
)


@dataclass(frozen=True)
class WriteOptions:
    image_format: str = "jpg"  # a key of imaging.ENCODERS
    quality: int = 95
    crop: str = "none"  # a key of imaging.CROPS: "none" keeps the overflow for the loader
    seed: int = 0  # random crops: image `key` is cropped with rng seeded by (seed, key)
    background: tuple[int, int, int] = DEFAULT_BACKGROUND

    def __post_init__(self) -> None:
        if self.image_format not in ENCODERS:
            raise ValueError(
                f"image_format must be one of {sorted(ENCODERS)}, got {self.image_format!r}"
            )
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {sorted(CROPS)}, got {self.crop!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0..255, got {self.background!r}")


def _read_caption(row: dict, root: InputRoot) -> str | None:
    if row["caption"] is not None:
        return row["caption"]
    if row["caption_source"] is None:
        return None
    return root.read_bytes(row["caption_source"]).decode("utf-8").strip()


def _sample(row: dict, root: InputRoot, options: WriteOptions) -> tuple[dict, dict]:
    """(webdataset sample, its index fields); raises Rejected for an unusable image or caption.

    The image is read only as far as its decoder needs: junk after it is never loaded.
    """
    bucket = (row["bucket_width"], row["bucket_height"])
    rng = np.random.default_rng([options.seed, int(row["key"], 16)])
    try:
        caption = _read_caption(row, root)
        stream = root.open(row["source"])
    except UnicodeDecodeError as error:
        raise Rejected(Reason.CAPTION_ENCODING, f"caption is not UTF-8: {error}") from None
    except OSError as error:
        raise Rejected(Reason.UNREADABLE, f"{type(error).__name__}: {error}") from None
    with stream:
        try:
            fitted = fitted_image(stream, bucket, options.crop, rng, options.background)
        except Exception as error:  # any decoder failure on a corrupt file is that file's alone
            raise Rejected(Reason.CORRUPT, f"{type(error).__name__}: {error}") from None
    header, image = fitted.header, fitted.image
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
        "stored_width": image.width,
        "stored_height": image.height,
        "note": fitted.note,
    }
    metadata = {
        "source": row["source"],
        "width": row["width"],
        "height": row["height"],
        "bucket": row["bucket"],
        "bucket_width": bucket[0],
        "bucket_height": bucket[1],
        "stored_width": image.width,
        "stored_height": image.height,
    }
    sample = {
        "__key__": row["key"],
        options.image_format: encode(image, options.image_format, options.quality),
        "json": json.dumps(metadata, sort_keys=True).encode(),
        "txt": (caption or "").encode(),  # always there: plain webdataset tuples need it
    }
    return sample, fields


def write_shard(
    name: str, rows: pa.Table, root: InputRoot, out: OutputDir, options: WriteOptions
) -> dict:
    """Write shard `name` from `rows` (scan rows plus bucket columns, in key order).

    Returns counts; the shard's index rows and rejections are in its part file.
    """
    filesystem = out.filesystem[0]
    tar_path = out.shard(name)
    temporary_tar = out.temporary(tar_path)
    records = []
    with filesystem.open_output_stream(temporary_tar) as stream:
        writer = TarWriter(stream, mtime=TAR_MTIME, user="arb", group="arb")
        for row in rows.to_pylist():
            try:
                sample, fields = _sample(row, root, options)
            except Rejected as rejected:
                records.append(row | {"reject": rejected.reason.value, "message": rejected.message})
                continue
            writer.write(sample)
            records.append(row | fields | {"shard": f"shards/{name}.tar"})
        writer.close()
    members = _member_offsets(filesystem, temporary_tar)
    columns = {options.image_format: "image", "json": "json", "txt": "txt"}
    for record in records:
        if record.get("reject") is None:
            for extension, column in columns.items():
                offset, size = members.get(f"{record['key']}.{extension}", (None, None))
                record[f"{column}_offset"], record[f"{column}_size"] = offset, size
    out.write_table(out.part(name), pa.Table.from_pylist(records, schema=PART_SCHEMA))
    out.commit(temporary_tar, tar_path)  # last: the shard now counts as finished
    rejected = sum(record.get("reject") is not None for record in records)
    return {"name": name, "written": len(records) - rejected, "rejected": rejected}


def _member_offsets(filesystem, path: str) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size), from the tar's headers only."""
    with filesystem.open_input_file(path) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
        return {member.name: (member.offset_data, member.size) for member in tar}
