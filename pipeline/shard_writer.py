"""Writing one shard: its fitted samples into a tar, and its index part, atomically.

`write_shard` is the unit of work of the write stage; the samples come fitted and encoded from
the fit stage (samples.py) through Ray's object store. Only a failure of the output raises, so
that the task is retried. Tars are byte-reproducible: members in key order, fixed mtime and owner.
"""

from __future__ import annotations

import tarfile

import pyarrow as pa
from webdataset import TarWriter

from pipeline.output import OutputDir

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
        ("crop_left", pa.int32()),  # where the stored image lies in the fitted one (--crop)
        ("crop_top", pa.int32()),
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


def write_shard(name: str, out: OutputDir, *pieces: list[dict]) -> dict:
    """Write shard `name` from its fitted records (`samples.fit_samples`' pieces, in key order).

    Returns counts; the shard's index rows and rejections are in its part file.
    """
    filesystem = out.filesystem
    tar_path = out.shard(name)
    temporary_tar = out.temporary(tar_path)
    records = [record for piece in pieces for record in piece]
    with filesystem.open_output_stream(temporary_tar) as stream:
        writer = TarWriter(stream, mtime=TAR_MTIME, user="arb", group="arb")
        for record in records:
            if record.get("reject") is None:
                writer.write({"__key__": record["key"], **record["members"]})
        writer.close()
    offsets = _member_offsets(filesystem, temporary_tar)
    for record in records:
        if record.get("reject") is None:
            record["shard"] = f"shards/{name}.tar"
            for extension in record.pop("members"):
                column = extension if extension in ("json", "txt") else "image"
                offset, size = offsets[f"{record['key']}.{extension}"]
                record[f"{column}_offset"], record[f"{column}_size"] = offset, size
    out.write_table(out.part(name), pa.Table.from_pylist(records, schema=PART_SCHEMA))
    out.commit(temporary_tar, tar_path)  # last: the shard now counts as finished
    rejected = sum(record.get("reject") is not None for record in records)
    return {"name": name, "written": len(records) - rejected, "rejected": rejected}


def _member_offsets(filesystem, path: str) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size), from the tar's headers only."""
    with filesystem.open_input_file(path) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
        return {member.name: (member.offset_data, member.size) for member in tar}
