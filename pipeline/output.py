"""OUT's life cycle in a prepare run: refused or begun (marked incomplete), cleared by
--overwrite, read back by --incremental and resumed runs, its index gathered from the shards'
parts, and pruned of what the run does not keep. Where each file lies, and the atomic writes,
are format.py's `OutputDir`; docs/format.md's "Reruns" section says what a user relies on.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.assign import copy_keys, key_bytes
from pipeline.config import PrepareConfig
from pipeline.errors import UsageError
from pipeline.format import (
    FORMAT_VERSION,
    INDEX_SCHEMA,
    REJECTS_SCHEMA,
    OutputDir,
    latents_folder,
)
from pipeline.rejects import rejects_table
from pipeline.shard_plan import is_shard_name

JOB_FOLDERS = (("shards", ".tar"), ("parts", ".parquet"))  # of files named by shard_name
JOB_FILES = (
    "manifest.json",
    "config.json",
    "index.parquet",
    "rejects.parquet",
    "stats.json",
    "buckets.png",
    "report.html",
)
STATS_COLUMNS = ["width", "height", "bucket", "aspect_error"]  # the index's, for the report
# OUTs a run resumes or adds to: version 2's parts have no source_row, 3's no dhash
# (`_read_part` adds them)
RESUMABLE_FORMAT_VERSIONS = (2, 3, FORMAT_VERSION)
JOIN_COLUMNS = ["source", "size", "mtime_ns"]  # a file's identity in a listing and the index
PARQUET_ROW = r"\.(?i:parquet)/(?P<row>[0-9]+)$"  # an input Parquet row's source: FILE/ROW


def begin(out: OutputDir, config: PrepareConfig) -> None:
    """Refuse an OUT this run must not touch; mark OUT incomplete until the manifest is back."""
    settings = config.settings()
    written_with = out.read_json(out.path("config.json"))
    if written_with is not None and written_with.get("format_version") in RESUMABLE_FORMAT_VERSIONS:
        written_with |= {"format_version": FORMAT_VERSION}  # its parts converted on read
    complete = out.exists(out.path("manifest.json"))
    if config.overwrite:
        clear(out)
    elif written_with is not None and written_with != settings:
        old, new = flat_settings(written_with), flat_settings(settings)
        changed = [
            f"{name}: {old.get(name, '(unset)')} -> {new.get(name, '(unset)')}"
            for name in sorted(old.keys() | new.keys())
            if old.get(name) != new.get(name)
        ]
        raise UsageError(
            f"{config.output} was prepared with other settings ({'; '.join(changed)}); "
            "pass --overwrite to rebuild it, or rerun with the old values"
        )
    elif complete and not config.incremental:
        raise UsageError(
            f"{config.output} already holds a complete dataset: pass --incremental to add new and "
            "changed images, or --overwrite to rebuild it"
        )
    out.make_dirs()
    out.delete(out.path("manifest.json"))
    out.write_json(out.path("config.json"), settings)


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """Nested settings as {"write.quality": 95, ...}."""
    flat = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            flat |= flat_settings(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def clear(out: OutputDir) -> None:
    """Delete what a prepare run writes, and nothing else that OUT may hold."""
    for folder, suffix in JOB_FOLDERS:
        for name in filter(is_shard_name, out.list_names(folder, suffix)):
            out.delete(out.path(folder, name + suffix))
    for name in JOB_FILES:
        out.delete(out.path(name))
    out.delete_temporaries()


def held_contents(out: OutputDir) -> pa.ChunkedArray | None:
    """`copy_keys` of the images a complete OUT holds (None before content hashes were
    indexed): an incremental run keeps those copies of a duplicate."""
    path = out.path("index.parquet")
    if not out.exists(path):
        return None
    index = pq.read_table(path, filesystem=out.filesystem)
    return copy_keys(index) if "content_hash" in index.column_names else None


def held_keys(out: OutputDir) -> np.ndarray | None:
    """The `key_bytes` of the images a complete OUT holds (None without an index): an
    incremental run keeps those of a cluster of near duplicates."""
    path = out.path("index.parquet")
    if not out.exists(path):
        return None
    return key_bytes(pq.read_table(path, columns=["key"], filesystem=out.filesystem)["key"])


def with_held_hashes(out: OutputDir, listing: pa.Table) -> pa.Table:
    """`listing` with a `dhash` column: the perceptual hash OUT's index holds for each file
    listed with the same source, size and mtime (the same bytes, as keys assume), null for
    the others (new, changed, inside a container, or listed without a size), which the scan
    hashes: an incremental run decodes only those."""
    path = out.path("index.parquet")
    if not out.exists(path):
        return listing.append_column("dhash", pa.nulls(len(listing), pa.uint64()))
    index = pq.read_table(path, columns=[*JOIN_COLUMNS, "dhash"], filesystem=out.filesystem)
    held = (
        index.filter(pc.is_valid(index["dhash"]))
        .group_by(JOIN_COLUMNS)
        .aggregate(
            [("dhash", "min")]  # one row per file (a listing may name a file twice)
        )
    )
    numbered = listing.append_column("row", pa.array(np.arange(len(listing))))
    joined = numbered.join(held, JOIN_COLUMNS, join_type="left outer").sort_by("row")
    return listing.append_column("dhash", joined["dhash_min"])


def finished_shards(out: OutputDir) -> dict[str, np.ndarray]:
    """Every finished shard's member keys (`key_bytes`), from the shards' parts."""
    previous = {}
    for name in out.list_names("shards", ".tar"):
        if out.exists(out.part(name)):
            part = pq.read_table(
                out.part(name), columns=["key", "reject"], filesystem=out.filesystem
            )
            kept = part.filter(pc.is_null(part["reject"]))["key"]
            previous[name] = key_bytes(kept)
    return previous


def write_index(out: OutputDir, names: list[str]) -> tuple[dict[str, np.ndarray], pa.Table]:
    """index.parquet from the shards' parts, one part at a time (the driver never holds the
    index); returns the kept images' STATS_COLUMNS for the report, and the write-time
    rejections."""
    index_path = out.path("index.parquet")
    temporary = out.temporary(index_path)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in STATS_COLUMNS}
    rejected = [REJECTS_SCHEMA.empty_table()]
    with pq.ParquetWriter(temporary, INDEX_SCHEMA, filesystem=out.filesystem) as writer:
        for name in names:
            part = _read_part(out, name)
            kept = part.filter(pc.is_null(part["reject"]))
            writer.write_table(kept.select(INDEX_SCHEMA.names))
            for column in STATS_COLUMNS:
                columns[column].append(kept[column].to_numpy())
            failed = part.filter(pc.is_valid(part["reject"]))
            rejected.append(rejects_table(failed, failed["reject"], failed["message"]))
    out.commit(temporary, index_path)
    numbers = {
        name: np.concatenate(parts) if parts else np.zeros(0, np.int64)
        for name, parts in columns.items()
    }
    return numbers, pa.concat_tables(rejected)


def _read_part(out: OutputDir, name: str) -> pa.Table:
    """Shard `name`'s part in this version's shape: one of format 2 has no `source_row`, which
    its Parquet rows' sources (FILE.parquet/ROW) give; one of format 2 or 3 no `dhash` (it was
    written without --near-dedup, which a change of settings would have rebuilt)."""
    part = pq.read_table(out.part(name), filesystem=out.filesystem)
    if "source_row" not in part.column_names:
        rows = pc.struct_field(pc.extract_regex(part["source"], PARQUET_ROW), "row")
        part = part.append_column("source_row", rows.cast(pa.int64()))
    if "dhash" not in part.column_names:
        part = part.append_column("dhash", pa.nulls(len(part), pa.uint64()))
    return part


def prune(out: OutputDir, names: set[str]) -> None:
    """Delete the shards and parts of earlier runs that this one does not keep, and leftovers;
    name on stderr the files there that the job did not write, and leave them."""
    for folder, suffix in JOB_FOLDERS:
        for name in out.list_names(folder, suffix):
            if not is_shard_name(name):
                print(
                    f"prepare: warning: left {out.uri}/{folder}/{name}{suffix} alone: the job "
                    f"did not write it (it names its files WIDTHxHEIGHT-DIGEST{suffix}) and "
                    "the dataset does not include it",
                    file=sys.stderr,
                )
            elif name not in names:
                out.delete(out.path(folder, name + suffix))
    out.delete_temporaries()


def current_latents(out: OutputDir, names: set[str]) -> dict:
    """The complete latents whose shards are still this dataset's (an incremental run that
    replaced shards leaves a VAE's latents out until `--vae` adds the new ones)."""
    current = {}
    for folder in out.list_folders("latents"):
        info = out.read_json(out.path(latents_folder(folder), "vae.json"))
        if info and set(out.list_names(latents_folder(folder), ".tar")) == names:
            current[folder] = {key: value for key, value in info.items() if key != "fingerprint"}
    return current
