"""Splitting the fit work into tasks of bounded estimated cost, decoupled from the shards.

Pure NumPy. A shard is written whole by one task, but its images are fitted by as many tasks as
their cost needs, and one task may fit the end of one shard and the start of the next: so a
shard of eleven 168-megapixel PNGs no longer holds a core for minutes while the others idle,
and a thousand-image shard is not one long task at the tail of a big cluster's run.

Cost is an estimate in milliseconds of one core: source pixels times a per-format rate (what
decoding costs: JPEG's entropy decoding is paid on every source pixel even when the DCT scales
down), plus a fixed part for resizing and encoding the fitted image. Rates are from
bench/prepare_bench.py's corpus on this project's 2-core machine; only their ratios matter.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

NS_PER_PIXEL = {"JPEG": 3.0, "MPO": 3.0, "WEBP": 9.0, "TIFF": 9.0, "PNG": 15.0, "GIF": 15.0}
DEFAULT_NS_PER_PIXEL = 15.0  # BMP and anything else: decoded whole
MS_PER_IMAGE = 3.0  # resize, encode, read and write overheads of one image
TASKS_PER_CPU = 4  # of the work left: no task is more than a small share of it
MIN_TASK_MS = 250.0  # below this a task costs more to schedule than to run
MAX_TASK_MS = 30_000.0  # a retried task loses little; its output waits in the object store


class Piece(NamedTuple):
    shard: int  # position in the shard list given to plan_tasks
    start: int  # the rows shard_rows[shard][start:stop]
    stop: int


class Task(NamedTuple):
    pieces: tuple[Piece, ...]  # in shard order; the last may continue in the next task
    cost: float  # estimated milliseconds


def estimate_cost(pixels: np.ndarray, formats: np.ndarray) -> np.ndarray:
    """Estimated milliseconds to fit each image: `pixels` (N,) source pixels, `formats` (N,)
    Pillow format names."""
    rates = np.array([NS_PER_PIXEL.get(f, DEFAULT_NS_PER_PIXEL) for f in formats], np.float64)
    return np.asarray(pixels, np.float64) * rates * 1e-6 + MS_PER_IMAGE


def task_budget(remaining_cost: float, cpus: int) -> float:
    """Milliseconds the next task may hold: a TASKS_PER_CPU-th of each CPU's share of the work
    left, within the limits. Tasks shrink as the work runs out (guided self-scheduling), so the
    last ones are short and no CPU idles long while another finishes."""
    share = remaining_cost / (TASKS_PER_CPU * max(1, cpus))
    return float(np.clip(share, MIN_TASK_MS, MAX_TASK_MS))


def heaviest_first(shard_rows: list[np.ndarray], cost: np.ndarray) -> list[int]:
    """Shard order for the write stage: shards holding the costliest single image first (an
    image cannot be split, so it must not start last), then by total cost."""
    keys = [(-float(cost[rows].max(initial=0)), -float(cost[rows].sum())) for rows in shard_rows]
    return sorted(range(len(shard_rows)), key=lambda shard: keys[shard])


def plan_tasks(shard_rows: list[np.ndarray], cost: np.ndarray, cpus: int) -> list[Task]:
    """Cut the shards' rows, in the order given, into tasks of at most `task_budget` estimated
    cost each, for a cluster of `cpus`.

    `shard_rows[s]` holds indices into `cost` (N,). Every row is in exactly one piece, pieces
    keep each shard's order, and a task exceeds its budget only when it is a single image.
    """
    tasks: list[Task] = []
    pieces: list[Piece] = []
    remaining = float(sum(cost[rows].sum() for rows in shard_rows))
    budget, spent = task_budget(remaining, cpus), 0.0
    for shard, rows in enumerate(shard_rows):
        start = 0
        for position, row_cost in enumerate(cost[rows]):
            if spent and spent + row_cost > budget:
                if position > start:
                    pieces.append(Piece(shard, start, position))
                tasks.append(Task(tuple(pieces), spent))
                remaining -= spent
                pieces, spent, start = [], 0.0, position
                budget = task_budget(remaining, cpus)
            spent += float(row_cost)
        if len(rows) > start:
            pieces.append(Piece(shard, start, len(rows)))
    if pieces:
        tasks.append(Task(tuple(pieces), spent))
    return tasks
