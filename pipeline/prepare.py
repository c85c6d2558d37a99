"""The prepare job's stages, in the order the data takes them:
list -> scan -> assign -> plan shards -> fit and write -> index -> reports -> manifest.
Near duplicates (--near-dedup) are hashed in the scan and turned away in the assign stage,
before shards are planned, so that none is fitted or written (pipeline/perceptual.py says why).

`run(config)` expects Ray to be started (jobs/prepare.py starts or joins a cluster). The
driver holds the listing and compact per-image columns (sizes, bucket ids, keys), never pixels
or captions' files. Folders are listed, headers scanned and images fitted by Ray tasks sized by
what the run measures (work_plan.py: a few seconds each, whatever the number of images); each
shard is written by one task once the fit tasks holding its pieces are done. The stages' own
work is in their modules (sources, scan, assign, samples, shard_writer); OUT's life cycle, from
its checks to its index, in output.py."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.assign import assign, key_bytes
from pipeline.config import PrepareConfig, fingerprint
from pipeline.distributor import cluster_cpus, fit_then_write, map_unordered
from pipeline.errors import UsageError
from pipeline.format import Manifest, OutputDir, shard_path
from pipeline.inputs import (
    Input,
    absolute,
    check_separate,
    in_containers,
    resolve_input,
)
from pipeline.latents import add_latents
from pipeline.output import (
    begin,
    current_latents,
    finished_shards,
    held_contents,
    held_keys,
    prune,
    with_held_hashes,
    write_index,
)
from pipeline.report import dataset_stats, draw_buckets
from pipeline.report_page import write_report_page
from pipeline.samples import fit_samples
from pipeline.scan import scan_batch
from pipeline.shard_plan import Shard, plan_shards
from pipeline.shard_writer import write_shard
from pipeline.sources import list_folders, list_level
from pipeline.text_cache import add_text, current_text, recipe_settings
from pipeline.work_plan import (
    FIRST_TASK_MS,
    WorkPlan,
    estimate_cost,
    heaviest_first,
    source_walk,
)

LIST_DEPTH = 2  # levels the driver lists itself looking for folders to share out


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


def run(config: PrepareConfig, source: Input | None = None) -> dict:
    """Prepare `config.output` from `config.input` (`source`: it resolved and checked, as
    jobs/prepare.py does before Ray starts); returns the manifest."""
    if source is None:
        source = resolve_input(
            config.input, config.caption_field, config.image_column, config.caption_column
        )
        check_separate(source, config.output)
    config = dataclasses.replace(config, input=source.uri, output=absolute(config.output))
    stages = Stages()
    with stages.stage("list") as listed:
        listing = _list(source, config)
        listed["items"] = len(listing)
    if not len(listing.filter(pc.is_null(listing["reject"]))):
        raise UsageError(
            f"--input {config.input} holds no image files to prepare "
            f"({len(listing)} entries listed, none usable)"
        )
    out = OutputDir(config.output)
    begin(out, config)
    if config.near_dedup and config.incremental:
        listing = with_held_hashes(out, listing)
    with stages.stage("scan") as scan:
        scanned = _scan(listing, source, config)
        scan["items"] = len(scanned)
    del listing
    with stages.stage("assign") as assigned:
        held = held_contents(out) if config.incremental else None
        keys = held_keys(out) if config.incremental and config.near_dedup else None
        accepted, assign_rejects, buckets = assign(scanned, config, held, keys)
        previous = finished_shards(out) if config.incremental else None
        places = _parquet_places(accepted)
        shards = plan_shards(
            key_bytes(accepted["key"]),
            accepted["bucket"].to_numpy(),
            buckets,
            config.samples_per_shard,
            fingerprint(config.settings()),
            previous,
            places,
        )
        assigned["items"] = len(accepted)
    scanned_keys = np.sort(key_bytes(scanned["key"]))
    del scanned
    with stages.stage("fit") as fitted:
        fitted["items"], fitted["image_seconds"] = _write(
            shards, accepted, places, source, out, config
        )
    del accepted
    input_fingerprint = hashlib.blake2b(scanned_keys.tobytes(), digest_size=8).hexdigest()
    manifest = _finish(
        out, config, shards, assign_rejects, buckets, input_fingerprint, stages.timings, source
    )
    if config.vae or config.pretrained:  # after the images: the dataset is complete
        manifest = add_companions(out, config)
    return manifest


def add_companions(out: OutputDir, config: PrepareConfig) -> Manifest:
    """The latents of --vae, or the latents and the text cache of --pretrained, added to the
    complete OUT."""
    manifest = add_latents(out, config.vae or config.pretrained, config.max_in_flight)
    if config.pretrained:
        settings = recipe_settings(
            config.model,
            config.max_sequence_length,
            config.caption_variants,
            config.tags,
            config.write.seed,
            config.text_dtype,
        )
        manifest = add_text(out, config.pretrained, settings, config.max_in_flight)
    return manifest


def _list(source: Input, config: PrepareConfig) -> pa.Table:
    """The input's listing, sorted by source: the top levels listed here until there are
    folders enough for every CPU (a tree under one images/ folder is looked into), the folders
    below them listed by tasks, several per CPU."""
    rows, folders = list_level(source)
    tables, cpus = [rows], cluster_cpus()
    for _ in range(LIST_DEPTH):
        if len(folders) >= 2 * cpus:
            break
        deeper = []
        for folder in folders:
            rows, below = list_level(source, folder)
            tables.append(rows)
            deeper += below
        folders = deeper
    if folders:
        chunks = np.array_split(np.array(folders, dtype=object), min(len(folders), 4 * cpus))
        for _, table, _ in map_unordered(
            list_folders,
            ((None, (source, chunk.tolist())) for chunk in chunks),
            description="list",
            total_items=None,
            items_of=len,
            max_in_flight=config.max_in_flight,
        ):
            tables.append(table)
    return pa.concat_tables(tables).sort_by("source")


def _scan(listing: pa.Table, source: Input, config: PrepareConfig) -> pa.Table:
    """Every listed file's header, in tasks sized by what the tasks before them took: the
    first ones of files_per_scan_task files (a local header takes ~0.1 ms, one from an object
    store a round trip), the rest of a few seconds each."""
    count = len(listing)
    prior = np.full(count, FIRST_TASK_MS / config.files_per_scan_task)
    # A tar or a Parquet file of images is read whole, a row per sample: its own kind,
    # priced by its bytes (50 MB/s)
    tars = in_containers(listing["source"])
    sizes = listing["size"].fill_null(0).to_numpy(zero_copy_only=False)
    prior[tars] = np.maximum(prior[tars], sizes[tars] / 50_000)
    plan = WorkPlan([np.arange(count)], prior, tars.astype(np.int64), cluster_cpus())
    tasks = (
        (
            task,
            (
                listing.slice(task.start, task.stop - task.start),
                source,
                config.max_pixels,
                config.dedup,
                config.near_dedup,
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


def _parquet_places(images: pa.Table) -> np.ndarray:
    """Each image's place among the rows of input Parquet files (by file, then row), -1 for
    the others: shards pack and the fit reads those rows in file order (shard_plan.py)."""
    in_parquet = pc.is_valid(images["source_row"]).to_numpy(zero_copy_only=False)
    if not in_parquet.any():
        return np.full(len(images), -1, np.int64)
    rows = pa.table(
        {"archive": images["archive"].fill_null(""), "row": images["source_row"].fill_null(0)}
    )
    order = pc.sort_indices(rows, [("archive", "ascending"), ("row", "ascending")]).to_numpy()
    places = np.empty(len(images), np.int64)
    places[order] = np.arange(len(images))
    return np.where(in_parquet, places, -1)


def _write(
    shards: list[Shard],
    accepted: pa.Table,
    places: np.ndarray,
    source: Input,
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
            yield task, (tables, source, config.write), groups, last

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


def _finish(
    out: OutputDir,
    config: PrepareConfig,
    shards: list[Shard],
    assign_rejects: pa.Table,
    buckets: np.ndarray,
    input_fingerprint: str,
    timings: dict[str, dict],
    source: Input,
) -> Manifest:
    """Index, rejects, pruning, reports, and the manifest last: the dataset is complete."""
    names = sorted(shard.name for shard in shards)  # the manifest's order
    columns, write_rejects = write_index(out, names)
    rejects = pa.concat_tables([assign_rejects, write_rejects]).sort_by("source")
    out.write_table(out.path("rejects.parquet"), rejects)
    prune(out, set(names))
    stats = dataset_stats(
        columns, buckets, rejects, config.batch_size, config.world_size, config.write.seed
    )
    stats["stages"] = timings
    out.write_json(out.path("stats.json"), stats)
    out.write_bytes(out.path("buckets.png"), draw_buckets(stats))
    write_report_page(out, stats, buckets, config.write.seed, source)
    manifest = Manifest(
        settings=config.settings(),
        buckets=buckets.tolist(),
        counts={"images": stats["images"], "rejected": stats["rejected"], "shards": len(names)},
        shards=[shard_path(name) for name in names],
        trainer={
            "batch_size": config.batch_size,
            "world_size": config.world_size,
            "seed": config.write.seed,
        },
        input={"uri": config.input, "fingerprint": input_fingerprint},
        latents=current_latents(out, set(names)),
        text=current_text(out),
    )
    manifest.write(out)
    return manifest
