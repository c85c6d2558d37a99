"""The prepare job's stages, in the order the data takes them:
list -> scan -> assign -> plan shards -> write -> index -> report -> manifest.

`run(config)` expects Ray to be started (jobs/prepare.py starts or joins a cluster). The
driver holds the listing and compact per-image columns (sizes, bucket ids, keys), never pixels
or captions' files. Folders are listed, headers scanned and images fitted by Ray tasks sized by
what the run measures (work_plan.py: a few seconds each, whatever the number of images); each
shard is written by one task once the fit tasks holding its pieces are done.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import sys
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.buckets import REJECT_ASPECT, bucketize
from pipeline.config import PrepareConfig, fingerprint
from pipeline.distributor import cluster_cpus, fit_then_write, map_unordered
from pipeline.errors import UsageError
from pipeline.fit import fit_measures
from pipeline.format import (
    INDEX_SCHEMA,
    REJECTS_SCHEMA,
    Manifest,
    OutputDir,
    latents_folder,
    shard_path,
)
from pipeline.latents import add_latents
from pipeline.rejects import Reason, rejects_table
from pipeline.report import dataset_stats, draw_buckets
from pipeline.samples import fit_samples
from pipeline.scan import scan_batch
from pipeline.shard_plan import Shard, is_shard_name, plan_shards
from pipeline.shard_writer import write_shard
from pipeline.sources import (
    ARCHIVE_EXTENSION,
    PARQUET_EXTENSION,
    InputRoot,
    absolute,
    check_input,
    check_separate,
    input_root,
    list_folders,
    list_level,
)
from pipeline.work_plan import (
    FIRST_TASK_MS,
    WorkPlan,
    estimate_cost,
    heaviest_first,
    source_walk,
)

BUCKET_COLUMNS = ("bucket", "bucket_width", "bucket_height", "aspect_error")
JOB_FOLDERS = (("shards", ".tar"), ("parts", ".parquet"))  # of files named by shard_name


class Stages:
    """When each stage started, how long it took and how many items it handled: stats.json's
    `stages`, and the summary's timing line."""

    def __init__(self) -> None:
        self.timings: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time the block; it may set the entry's "items"."""
        entry = {"started": time.time(), "seconds": 0.0, "items": None}
        start = time.perf_counter()
        yield entry
        entry["seconds"] = time.perf_counter() - start
        self.timings[name] = entry


def run(config: PrepareConfig) -> dict:
    """Prepare `config.output` from `config.input`; returns the manifest."""
    config = dataclasses.replace(
        config, input=absolute(config.input), output=absolute(config.output)
    )
    check_input(config.input)
    check_separate(config.input, config.output)
    stages = Stages()
    with stages.stage("list") as listed:
        listing = _list(config.input, config)
        listed["items"] = len(listing)
    if not len(listing.filter(pc.is_null(listing["reject"]))):
        raise UsageError(
            f"--input {config.input} holds no image files to prepare "
            f"({len(listing)} entries listed, none usable)"
        )
    out = OutputDir(config.output)
    _begin(out, config)
    root = input_root(config.input, config.caption_field, config.image_column,
                      config.caption_column)  # fmt: skip
    with stages.stage("scan") as scan:
        scanned = _scan(listing, root, config)
        scan["items"] = len(scanned)
    del listing
    with stages.stage("assign") as assign:
        held = _held_contents(out) if config.incremental else None
        accepted, assign_rejects, buckets = _assign(scanned, config, held)
        previous = _finished_shards(out) if config.incremental else None
        places = _parquet_places(accepted)
        shards = plan_shards(
            _keys(accepted["key"]),
            accepted["bucket"].to_numpy(),
            buckets,
            config.samples_per_shard,
            fingerprint(config.settings()),
            previous,
            places,
        )
        assign["items"] = len(accepted)
    scanned_keys = np.sort(_keys(scanned["key"]))
    del scanned
    with stages.stage("fit") as fitted:
        fitted["items"], fitted["image_seconds"] = _write(
            shards, accepted, places, root, out, config
        )
    del accepted
    input_fingerprint = hashlib.blake2b(scanned_keys.tobytes(), digest_size=8).hexdigest()
    manifest = _finish(
        out, config, shards, assign_rejects, buckets, input_fingerprint, stages.timings
    )
    if config.vae:  # latents after the images: the dataset is complete, its latents added
        manifest = add_latents(out, config.vae, config.max_in_flight)
    return manifest


def _write(
    shards: list[Shard],
    accepted: pa.Table,
    places: np.ndarray,
    root: InputRoot,
    out: OutputDir,
    config: PrepareConfig,
) -> tuple[int, float]:
    """Fit the images of every shard not finished yet, in tasks sized by what the tasks before
    them took (work_plan.py), Parquet rows in file order (`places`), and write each shard once
    all its pieces are fitted; returns the images fitted and the seconds the workers spent on
    them."""
    finished = set(out.list_names("shards", ".tar"))
    todo = [shard for shard in shards if shard.name not in finished]
    if not todo:
        return 0, 0.0
    pixels = pc.multiply(accepted["width"].cast(pa.int64()), accepted["height"].cast(pa.int64()))
    formats = accepted["format"].to_numpy(zero_copy_only=False)
    prior, kinds = estimate_cost(pixels.to_numpy(), formats)
    todo = [todo[i] for i in heaviest_first([shard.rows for shard in todo], prior)]
    shard_rows = [shard.rows for shard in todo]
    walk = source_walk(shard_rows, places)
    plan = WorkPlan(shard_rows, prior, kinds, cluster_cpus(), walk)

    def fit_tasks():
        while (task := plan.next_task()) is not None:
            tables = [accepted.take(shard_rows[p.group][p.start : p.stop]) for p in task.pieces]
            groups, last = [p.group for p in task.pieces], [p.last for p in task.pieces]
            yield task, (tables, root, config.write), groups, last

    image_seconds = 0.0

    def fitted(task, milliseconds: np.ndarray) -> int:
        nonlocal image_seconds
        plan.observe(task, milliseconds)
        image_seconds += float(milliseconds.sum()) / 1000
        return len(milliseconds)

    images = sum(len(rows) for rows in shard_rows)
    results = fit_then_write(
        fit_samples,
        fit_tasks(),
        write_shard,
        [(shard.name, out) for shard in todo],
        total_items=images,
        on_fitted=fitted,
        max_in_flight=config.max_in_flight,
    )
    collections.deque(results, maxlen=0)  # run them all; results are in the shards' parts
    return images, image_seconds


def _parquet_places(images: pa.Table) -> np.ndarray:
    """Each image's place among the rows of input Parquet files (by file, then row), -1 for
    the others: shards pack and the fit reads those rows in file order (shard_plan.py)."""
    archives = images["archive"].fill_null("")
    in_parquet = pc.ends_with(pc.utf8_lower(archives), PARQUET_EXTENSION).to_numpy(
        zero_copy_only=False
    )
    if not in_parquet.any():
        return np.full(len(images), -1, np.int64)
    order = pc.sort_indices(
        pa.table({"archive": archives, "row": images["member_offset"].fill_null(0)}),
        sort_keys=[("archive", "ascending"), ("row", "ascending")],
    ).to_numpy()
    places = np.empty(len(images), np.int64)
    places[order] = np.arange(len(images))
    return np.where(in_parquet, places, -1)


def _keys(column: pa.ChunkedArray) -> np.ndarray:
    """The non-null keys as fixed-width bytes (N,) 'S20', built without a Python object each."""
    fixed = pc.cast(pc.drop_null(column).combine_chunks(), pa.binary(20))
    if len(fixed) == 0:
        return np.empty(0, dtype="S20")
    return np.frombuffer(
        fixed.buffers()[1], dtype="S20", count=len(fixed), offset=20 * fixed.offset
    )


def _begin(out: OutputDir, config: PrepareConfig) -> None:
    """Refuse an OUT this run must not touch; mark OUT incomplete until the manifest is back."""
    settings = config.settings()
    written_with = out.read_json(out.path("config.json"))
    complete = out.exists(out.path("manifest.json"))
    if config.overwrite:
        _clear(out)
    elif written_with is not None and written_with != settings:
        old, new = _flat(written_with), _flat(settings)
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


def _flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as {"write.quality": 95, ...}."""
    flat = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _clear(out: OutputDir) -> None:
    """Delete what a prepare run writes, and nothing else that OUT may hold."""
    for folder, suffix in JOB_FOLDERS:
        for name in filter(is_shard_name, out.list_names(folder, suffix)):
            out.delete(out.path(folder, name + suffix))
    for name in (
        "manifest.json",
        "config.json",
        "index.parquet",
        "rejects.parquet",
        "stats.json",
        "buckets.png",
    ):
        out.delete(out.path(name))
    out.delete_temporaries()


LIST_DEPTH = 2  # levels the driver lists itself looking for folders to share out


def _list(uri: str, config: PrepareConfig) -> pa.Table:
    """The input's listing, sorted by source: the top levels listed here until there are
    folders enough for every CPU (a tree under one images/ folder is looked into), the folders
    below them listed by tasks, several per CPU."""
    field = config.caption_field
    rows, folders = list_level(uri, "", field)
    tables, cpus = [rows], cluster_cpus()
    for _ in range(LIST_DEPTH):
        if len(folders) >= 2 * cpus:
            break
        deeper = []
        for folder in folders:
            rows, below = list_level(uri, folder, field)
            tables.append(rows)
            deeper += below
        folders = deeper
    if folders:
        chunks = np.array_split(np.array(folders, dtype=object), min(len(folders), 4 * cpus))
        for _, table, _ in map_unordered(
            list_folders,
            ((None, (uri, chunk.tolist(), field)) for chunk in chunks),
            description="list",
            total_items=None,
            items_of=len,
            max_in_flight=config.max_in_flight,
        ):
            tables.append(table)
    return pa.concat_tables(tables).sort_by("source")


def _scan(listing: pa.Table, root: InputRoot, config: PrepareConfig) -> pa.Table:
    """Every listed file's header, in tasks sized by what the tasks before them took: the
    first ones of files_per_scan_task files (a local header takes ~0.1 ms, one from an object
    store a round trip), the rest of a few seconds each."""
    count = len(listing)
    prior = np.full(count, FIRST_TASK_MS / config.files_per_scan_task)
    # A tar or a Parquet file of images is read whole, a row per sample: its own kind,
    # priced by its bytes (50 MB/s)
    names = pc.utf8_lower(listing["source"])
    tars = pc.or_(pc.ends_with(names, ARCHIVE_EXTENSION), pc.ends_with(names, PARQUET_EXTENSION))
    tars = tars.to_numpy(zero_copy_only=False)
    sizes = listing["size"].fill_null(0).to_numpy(zero_copy_only=False)
    prior[tars] = np.maximum(prior[tars], sizes[tars] / 50_000)
    plan = WorkPlan([np.arange(count)], prior, tars.astype(np.int64), cluster_cpus())
    tasks = (
        (
            task,
            (
                listing.slice(task.start, task.stop - task.start),
                root,
                config.max_pixels,
                config.dedup,
            ),
        )
        for task in iter(plan.next_task, None)
    )
    tables = {}
    for task, table, milliseconds in map_unordered(
        scan_batch,
        tasks,
        description="scan",
        total_items=count,
        items_of=len,
        max_in_flight=config.max_in_flight,
    ):
        listed = task.stop - task.start  # a tar is one listed file, and a row per sample
        plan.observe(task, np.full(listed, milliseconds / max(1, listed)))
        tables[task.start] = table
    # the listing's order (by source) without a sorted copy: tasks are slices of it
    return pa.concat_tables([tables[start] for start in sorted(tables)])


def _copy_keys(table: pa.Table) -> pa.ChunkedArray:
    """Each row's content hash and source as one string (null where not hashed)."""
    return pc.binary_join_element_wise(table["content_hash"], table["source"], "\0")


def _held_contents(out: OutputDir) -> pa.ChunkedArray | None:
    """`_copy_keys` of the images a complete OUT holds (None before content hashes were
    indexed): an incremental run keeps those copies of a duplicate."""
    path = out.path("index.parquet")
    if not out.exists(path):
        return None
    index = pq.read_table(path, filesystem=out.filesystem)
    return _copy_keys(index) if "content_hash" in index.column_names else None


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
        in_out = pc.is_in(_copy_keys(candidates.take(hashed)), value_set=held.combine_chunks())
        is_held = in_out.to_numpy(zero_copy_only=False)
    order = hashed[np.lexsort((hashed, ~is_held))]  # held copies first, then listing order
    rank = np.empty(len(candidates), dtype=np.int64)
    rank[hashed] = np.arange(len(hashed))
    _, first, group = np.unique(labels[rank[order]], return_index=True, return_inverse=True)
    keeper = order[first][group]  # the kept copy of each row in `order`
    repeat = source_codes[keeper] != source_codes[order]  # a file listed twice: no copy of itself
    kept_by[order[repeat]] = candidates["source"].take(keeper[repeat]).to_pylist()
    return kept_by


def _assign(
    scanned: pa.Table, config: PrepareConfig, held: pa.ChunkedArray | None = None
) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """(accepted images with their bucket columns, rejections so far, the bucket list)."""
    failed, candidates = _split(scanned, pc.is_null(scanned["reject"]).combine_chunks())
    width = candidates["width"].to_numpy(zero_copy_only=False).astype(np.int64)
    height = candidates["height"].to_numpy(zero_copy_only=False).astype(np.int64)
    buckets, index, aspect_error = bucketize(width, height, config.buckets)
    bucket_w, bucket_h = buckets[index, 0], buckets[index, 1]  # rejected rows: any bucket
    upscale, cropped = fit_measures(width, height, bucket_w, bucket_h)

    duplicate = np.ones(len(width), dtype=bool)  # a listing may name a file twice: keep one
    duplicate[np.unique(_keys(candidates["key"]), return_index=True)[1]] = False
    copy_of = _content_duplicates(candidates, held)

    reasons = np.full(len(width), None, dtype=object)
    messages = np.full(len(width), None, dtype=object)
    checks = [  # the first failed check names the reason; a bucket must exist to fit to it
        (Reason.DUPLICATE, duplicate, lambda i: "the same file is listed more than once"),
        (Reason.DUPLICATE_CONTENT, copy_of != None,  # noqa: E711 (element-wise)
         lambda i: f"the same bytes as {copy_of[i]}, which is kept"),
        (Reason.ASPECT, index == REJECT_ASPECT,
         lambda i: f"aspect {width[i] / height[i]:.3f} is too far from every bucket"),
        (Reason.TOO_SMALL, index < 0,
         lambda i: f"{width[i]}x{height[i]} is under every bucket it could use without upscaling"),
        (Reason.UPSCALE, upscale > config.max_upscale,
         lambda i: f"needs {upscale[i]:.2f}x upscaling, over max_upscale={config.max_upscale}"),
        (Reason.CROP, cropped > config.max_crop,
         lambda i: f"fit crops {cropped[i]:.0%} of the area, over max_crop={config.max_crop:.0%}"),
    ]  # fmt: skip
    for reason, failed_check, message in reversed(checks):
        for i in np.flatnonzero(failed_check):
            reasons[i], messages[i] = reason.value, message(i)
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


def _split(table: pa.Table, kept: pa.BooleanArray) -> tuple[pa.Table, pa.Table]:
    """(rows not kept, rows kept): without a copy of the table when every row is kept, as
    nearly every row is (at a million images a copy is a hundred megabytes)."""
    if pc.all(kept).as_py() is not False:
        return table.schema.empty_table(), table
    return table.filter(pc.invert(kept)), table.filter(kept)


def _finished_shards(out: OutputDir) -> dict[str, np.ndarray]:
    """Every finished shard's member keys, from the shards' parts."""
    previous = {}
    for name in out.list_names("shards", ".tar"):
        if out.exists(out.part(name)):
            part = pq.read_table(
                out.part(name), columns=["key", "reject"], filesystem=out.filesystem
            )
            kept = part.filter(pc.is_null(part["reject"]))["key"]
            previous[name] = _keys(kept)
    return previous


def _finish(
    out: OutputDir,
    config: PrepareConfig,
    shards: list[Shard],
    assign_rejects: pa.Table,
    buckets: np.ndarray,
    input_fingerprint: str,
    timings: dict[str, dict],
) -> Manifest:
    """Index, rejects, pruning, report, and the manifest last: the dataset is complete."""
    names = sorted(shard.name for shard in shards)  # the manifest's order
    columns, write_rejects = _write_index(out, names)
    rejects = pa.concat_tables([assign_rejects, write_rejects]).sort_by("source")
    out.write_table(out.path("rejects.parquet"), rejects)
    _prune(out, set(names))
    stats = dataset_stats(
        columns, buckets, rejects, config.batch_size, config.world_size, config.write.seed
    )
    stats["stages"] = timings
    out.write_json(out.path("stats.json"), stats)
    out.write_bytes(out.path("buckets.png"), draw_buckets(stats))
    manifest = Manifest(
        settings=config.settings(),
        buckets=buckets.tolist(),
        counts={"images": stats["images"], "rejected": stats["rejected"], "shards": len(names)},
        shards=[shard_path(name) for name in names],
        trainer={"batch_size": config.batch_size, "world_size": config.world_size,
                 "seed": config.write.seed},
        input={"uri": config.input, "fingerprint": input_fingerprint},
        latents=_current_latents(out, set(names)),
    )  # fmt: skip
    manifest.write(out)
    return manifest


def _current_latents(out: OutputDir, names: set[str]) -> dict:
    """The complete latents whose shards are still this dataset's (an incremental run that
    replaced shards leaves a VAE's latents out until `--vae` adds the new ones)."""
    current = {}
    for folder in out.list_folders("latents"):
        info = out.read_json(out.path(latents_folder(folder), "vae.json"))
        if info and set(out.list_names(latents_folder(folder), ".tar")) == names:
            current[folder] = {key: value for key, value in info.items() if key != "fingerprint"}
    return current


STATS_COLUMNS = ["width", "height", "bucket", "aspect_error"]


def _write_index(out: OutputDir, names: list[str]) -> tuple[dict[str, np.ndarray], pa.Table]:
    """index.parquet from the shards' parts, one part at a time (the driver never holds the
    index); returns the kept images' numeric columns for the report, and the write-time
    rejections."""
    index_path = out.path("index.parquet")
    temporary = out.temporary(index_path)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in STATS_COLUMNS}
    rejected = [REJECTS_SCHEMA.empty_table()]
    with pq.ParquetWriter(temporary, INDEX_SCHEMA, filesystem=out.filesystem) as writer:
        for name in names:
            part = pq.read_table(out.part(name), filesystem=out.filesystem)
            kept = part.filter(pc.is_null(part["reject"]))
            writer.write_table(kept.select(INDEX_SCHEMA.names))
            for column in STATS_COLUMNS:
                columns[column].append(kept[column].to_numpy())
            failed = part.filter(pc.is_valid(part["reject"]))
            rejected.append(rejects_table(failed, failed["reject"], failed["message"]))
    out.commit(temporary, index_path)
    numbers = {name: np.concatenate(parts) if parts else np.zeros(0, np.int64)
               for name, parts in columns.items()}  # fmt: skip
    return numbers, pa.concat_tables(rejected)


def _prune(out: OutputDir, names: set[str]) -> None:
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
