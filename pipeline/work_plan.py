"""Cutting a stage's rows into tasks of bounded real duration, sized by what the run measures.

Pure NumPy. The rows come in groups that a later step needs whole (the fit stage's shards: a
shard is written by one task once all its pieces are fitted), but a task is cut by cost, not by
group: a group of eleven 168-megapixel PNGs is spread over many tasks, one task may fit the end
of one shard and the start of the next, and a shard of a thousand small JPEGs is not one long
task at the tail of the run.

Tasks are cut one at a time, as the driver submits them, in milliseconds of one core: a
prior estimate per row (for images: source pixels times a per-format decoding rate, plus a
fixed part) times a scale per kind of row (the format) that the run measures as its tasks come
back. Before anything is measured the first tasks are short, because a prior can be several
times off (the fixed rates once put a 512x384 JPEG at 3.6 ms where it cost 20 ms); after that
each task holds a TASKS_PER_CPU-th of each CPU's share of the work left (guided
self-scheduling: the last tasks are short, so no CPU idles long while another finishes), within
MIN_TASK_MS and MAX_TASK_MS: the progress bars move every few seconds and a worker holds a few
seconds of output, whatever the number of images.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

NS_PER_PIXEL = {"JPEG": 3.0, "MPO": 3.0, "WEBP": 9.0, "TIFF": 9.0, "PNG": 15.0, "GIF": 15.0}
DEFAULT_NS_PER_PIXEL = 15.0  # BMP and anything else: decoded whole
MS_PER_IMAGE = 3.0  # resize, encode, read and write overheads of one image
TASKS_PER_CPU = 4  # of the work left: no task is more than a small share of it
FIRST_TASK_MS = 1_000.0  # by the prior, while nothing is measured
MIN_TASK_MS = 250.0  # below this a task costs more to schedule than to run
MAX_TASK_MS = 2_000.0  # progress every few seconds; a task's output stays small (in Ray's object
# store until its shard is written: at 5 s, 100k small JPEGs took a worker to 929 MiB RSS, at 2 s
# 644 MiB, the fit no slower)
WINDOW = 4096  # rows looked at for a task's end before looking further


class Piece(NamedTuple):
    group: int  # position in the group list given to WorkPlan
    start: int  # the rows group_rows[group][start:stop]
    stop: int
    last: bool  # the group's last piece: the group can be written once all its pieces are


class Task(NamedTuple):
    pieces: tuple[Piece, ...]  # in the walk's order; a group's piece may continue in the next
    cost: float  # estimated milliseconds, as calibrated when the task was cut
    start: int  # its rows' positions in the walk
    stop: int


def estimate_cost(pixels: np.ndarray, formats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prior milliseconds to fit each image, and each image's kind for calibration (an index
    into the sorted distinct formats): `pixels` (N,) source pixels, `formats` (N,) Pillow
    format names."""
    names, kinds = np.unique(np.asarray(formats, dtype=object).astype(str), return_inverse=True)
    rates = np.array([NS_PER_PIXEL.get(name, DEFAULT_NS_PER_PIXEL) for name in names])
    prior = np.asarray(pixels, np.float64) * rates[kinds].reshape(-1) * 1e-6 + MS_PER_IMAGE
    return prior, kinds.reshape(-1)


def task_budget(remaining_ms: float, cpus: int) -> float:
    """Milliseconds the next task may hold: a TASKS_PER_CPU-th of each CPU's share of the work
    left, within the limits."""
    share = remaining_ms / (TASKS_PER_CPU * max(1, cpus))
    return float(np.clip(share, MIN_TASK_MS, MAX_TASK_MS))


def heaviest_first(group_rows: list[np.ndarray], cost: np.ndarray) -> list[int]:
    """Group order for the fit stage: groups holding the costliest single row first (a row
    cannot be split, so it must not start last), then by total cost."""
    keys = [(-float(cost[rows].max(initial=0)), -float(cost[rows].sum())) for rows in group_rows]
    return sorted(range(len(group_rows)), key=lambda group: keys[group])


def source_walk(group_rows: list[np.ndarray], places: np.ndarray) -> np.ndarray:
    """The rows in the order the fit takes them (WorkPlan's `walk`): the groups holding no
    placed row (`places` (N,) < 0) one after another, as given; then every row of the others
    by place, the groups interleaved, so that a task reads a stretch of each source (a Parquet
    file's row groups once each) and a group closes as soon as its last stretch is read.
    Each group's rows must be in place order (plan_shards packs them so)."""
    places = np.asarray(places, np.int64)
    placed = [bool(len(rows)) and int(places[rows].max()) >= 0 for rows in group_rows]
    walked = [rows for rows, is_placed in zip(group_rows, placed, strict=True) if not is_placed]
    interleaved = [rows for rows, is_placed in zip(group_rows, placed, strict=True) if is_placed]
    if interleaved:
        rows = np.concatenate(interleaved).astype(np.int64)
        group = np.repeat(np.arange(len(interleaved)), [len(r) for r in interleaved])
        walked.append(rows[np.lexsort((group, places[rows]))])  # stable: each group in order
    return np.concatenate([*walked, np.zeros(0, np.int64)]).astype(np.int64)


class WorkPlan:
    """The tasks of one stage, cut as they are asked for (`next_task`) and sized by the
    measurements of the tasks done so far (`observe`).

    `group_rows[g]` holds indices into `prior` and `kinds` (N,); tasks take the rows in the
    order of `walk` (every row once, each group's in its order: `source_walk`), by default the
    groups one after another as given. Every row is in exactly one piece, pieces keep each
    group's order, and a task exceeds its budget only when it is a single row.
    """

    def __init__(
        self,
        group_rows: list[np.ndarray],
        prior: np.ndarray,
        kinds: np.ndarray,
        cpus: int,
        walk: np.ndarray | None = None,
    ) -> None:
        lengths = np.array([len(rows) for rows in group_rows], np.int64)
        rows = np.concatenate([*group_rows, np.zeros(0, np.int64)]).astype(np.int64)
        order = rows if walk is None else np.asarray(walk, np.int64)
        position = np.full(len(prior), -1, np.int64)  # each row's in the groups' rows
        position[rows] = np.arange(len(rows))
        walked = position[order]
        if len(order) != len(rows) or np.any(walked < 0):
            raise ValueError("the walk must take every row of the groups once")
        group_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._group = np.repeat(np.arange(len(group_rows)), lengths)[walked]  # per walk position
        self._offset = walked - group_start[self._group]  # in its group
        by_group = np.argsort(self._group, kind="stable")
        same_group = np.diff(self._group[by_group]) == 0
        if np.any(np.diff(self._offset[by_group])[same_group] != 1):
            raise ValueError("the walk must take every row once, each group's in its order")
        self._group_rows = group_rows
        self._lengths = lengths
        self._kind_of_row = np.asarray(kinds, np.int64)
        self._prior = np.asarray(prior, np.float64)[order]  # per walk position
        self._kind = self._kind_of_row[order]
        self._kinds = int(self._kind.max(initial=-1)) + 1
        self._left = np.bincount(self._kind, self._prior, self._kinds)  # prior ms not yet cut
        self._measured = np.zeros(self._kinds)  # ms measured, per kind
        self._measured_prior = np.zeros(self._kinds)  # the prior of the rows measured
        self._cpus = cpus
        self._cursor = 0

    def scale(self) -> np.ndarray:
        """Measured over prior cost, per kind: each kind's own once a row of it is measured,
        else all kinds' together, else 1."""
        total = self._measured.sum() / self._measured_prior.sum() if self.measured() else 1.0
        seen = self._measured_prior > 0
        return np.where(seen, self._measured / np.where(seen, self._measured_prior, 1), total)

    def measured(self) -> bool:
        return bool(self._measured_prior.sum() > 0)

    def remaining(self) -> float:
        """Estimated milliseconds of the rows not yet in a task."""
        return float(self._left @ self.scale())

    def next_task(self) -> Task | None:
        """The next task, or None when every row is in one."""
        total = len(self._prior)
        if self._cursor >= total:
            return None
        scale = self.scale()
        budget = task_budget(self.remaining(), self._cpus) if self.measured() else FIRST_TASK_MS
        start, window = self._cursor, WINDOW
        while True:
            stop = min(total, start + window)
            spent = np.cumsum(self._prior[start:stop] * scale[self._kind[start:stop]])
            taken = int(np.searchsorted(spent, budget, side="right"))
            if taken < stop - start or stop == total:
                break
            window *= 4
        taken = max(1, taken)
        end = start + taken
        self._cursor = end
        self._left -= np.bincount(self._kind[start:end], self._prior[start:end], self._kinds)
        return Task(self._pieces(start, end), float(spent[taken - 1]), start, end)

    def _pieces(self, start: int, end: int) -> tuple[Piece, ...]:
        """A piece per group the walk's positions start..end touch, in the order it touches
        them: each group's rows there are a run of its own (the walk keeps each group's order)."""
        groups, offsets = self._group[start:end], self._offset[start:end]
        touched, first, counts = np.unique(groups, return_index=True, return_counts=True)
        pieces = []
        for i in np.argsort(first):  # a group's first row here is its lowest
            group, piece_start = int(touched[i]), int(offsets[first[i]])
            piece_stop = piece_start + int(counts[i])
            last = bool(piece_stop == self._lengths[group])
            pieces.append(Piece(group, piece_start, piece_stop, last))
        return tuple(pieces)

    def observe(self, task: Task, milliseconds: np.ndarray) -> None:
        """What `task`'s rows took, piece by piece in the task's order (N,): the sizes of the
        tasks cut from now on."""
        rows = np.concatenate([self._group_rows[p.group][p.start : p.stop] for p in task.pieces])
        kinds = self._kind_of_row[rows.astype(np.int64)]  # in the pieces' order, as measured
        self._measured += np.bincount(kinds, np.asarray(milliseconds, np.float64), self._kinds)
        walked = slice(task.start, task.stop)  # the same rows: their prior in any order
        self._measured_prior += np.bincount(self._kind[walked], self._prior[walked], self._kinds)
