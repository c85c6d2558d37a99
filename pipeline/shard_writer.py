"""Writing one shard: its fitted samples into a tar, and its index part, atomically.

`write_shard` is the unit of work of the write stage; the samples come fitted and encoded from
the fit stage (samples.py) through Ray's object store. Only a failure of the output raises, so
that the task is retried. Tars are byte-reproducible (pipeline/format.py's `write_tar`): members
in key order, fixed mtime and owner.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.format import PART_SCHEMA, OutputDir, shard_path


def write_shard(name: str, out: OutputDir, *pieces: list[dict]) -> dict:
    """Write shard `name` from its fitted records (`samples.fit_samples`' pieces), in key order.

    Returns counts; the shard's index rows and rejections are in its part file.
    """
    records = sorted((record for piece in pieces for record in piece), key=lambda r: r["key"])
    kept = [record for record in records if record.get("reject") is None]

    def part_of(offsets: dict[str, tuple[int, int]]) -> pa.Table:
        for record in kept:
            record["shard"] = shard_path(name)
            for extension in record.pop("members"):
                column = extension if extension in ("json", "txt") else "image"
                offset, size = offsets[f"{record['key']}.{extension}"]
                record[f"{column}_offset"], record[f"{column}_size"] = offset, size
        return pa.Table.from_pylist(records, schema=PART_SCHEMA)

    samples = [(record["key"], record["members"]) for record in kept]
    out.write_shard(out.shard(name), out.part(name), samples, part_of)
    return {"name": name, "written": len(kept), "rejected": len(records) - len(kept)}
