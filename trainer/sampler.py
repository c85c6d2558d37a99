"""Which batches a rank trains on: the source's per-epoch plan (pipeline/plan.py) over a
`Dataset`, each batch with the crops, flips, captions and SDXL conditioning of its samples
(trainer/augment.py), and where their cached text entries lie (a text cache: each caption's
variant, trainer/text_cache.py), decided in the trainer's process from the index alone.

    batches = EpochBatches(data, batch_size=4, world_size=world, rank=rank, seed=0)
    batches.set_epoch(epoch, start_step)    # planned once an epoch; resume mid-epoch
    for plan in batches: ...                # BatchPlan, what a loader worker reads

Every rank plans the epoch itself (no communication), so every rank gets the same number of
batches, for any world size on the same prepared data.

`shuffle="global"` is the source's plan over the whole epoch; `shuffle="shards"` the shard-aware
one (`pipeline.plan.plan_epoch_by_shards`): windows of `window` shards, which a node's cache of
remote shards can hold. Each batch names the remote shards of the batch PREFETCH_STEPS later
(and, at a window's first step, of the next window) for the loader workers to download meanwhile.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pipeline.plan import RankPlan, plan_epoch, plan_epoch_by_shards
from trainer.augment import CaptionOptions, caption, view
from trainer.dataset import Dataset
from trainer.storage import FileRef
from trainer.text_cache import TextEntry

SHUFFLES = ("global", "shards")
PREFETCH_STEPS = 8  # how far ahead of a batch its remote shards are asked for


class BatchPlan(NamedTuple):
    """What a loader worker needs to load one batch.

    Keys and captions come from the index in the trainer's process: in a worker, between
    decodes that flush its caches, a pyarrow take costs 10x what it does here (measured).
    """

    epoch: int
    step: int
    items: np.ndarray
    bucket: int
    keys: list[str]
    captions: list[str]  # "" where an image has no caption
    iteration: int  # how many times the sampler has been iterated, this one included
    sizes: list[tuple[int, int]]  # (width, height) each stored image is fitted to
    crops: list[tuple[int, int]]  # (left, top) of each window in it (trainer/augment.py)
    flips: list[bool]
    conditioning: np.ndarray  # [B, 3, 2]: original_size, crop_top_left, target_size
    latent: bool  # cached latents instead of pixels
    prefetch: tuple[FileRef, ...] = ()  # remote files later batches read: download them now
    text: tuple[TextEntry, ...] = ()  # each caption's cached entry (a text cache); () encodes
    empty_text: TextEntry | None = None  # the empty caption's: dropout and padding


class EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of the current epoch, from `start_step` on: a DataLoader sampler.

    `world_size` and `rank` default to torch.distributed's when it is initialised, else 1 and 0.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        world_size: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        flip: float = 0.0,
        captions: CaptionOptions | None = None,
        shuffle: str = "global",
        window: int = 32,
    ):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        self.data, self.batch_size, self.world_size, self.rank, self.seed = (
            data,
            batch_size,
            world_size,
            rank,
            seed,
        )
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
        self.flip, self.caption_options = flip, captions or CaptionOptions()
        self.shuffle, self.window = shuffle, window
        self.epoch, self.start_step, self.iterations = 0, 0, 0
        self._planned: tuple | None = None  # (epoch, plan, items, copies) of the last planned

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Serve `epoch`; begin at `start_step` to resume mid-epoch without replaying it."""
        self.epoch, self.start_step = epoch, start_step

    def plan(self) -> tuple[RankPlan, np.ndarray, np.ndarray]:
        """This rank's plan over the epoch's list, and the list: (items, copy numbers); planned
        once an epoch (a plan of 10M items takes seconds)."""
        if self._planned is None or self._planned[0] != self.epoch:
            items, copies = self.data.epoch_items(self.seed, self.epoch)
            columns, shape = (
                self.data.columns,
                (self.batch_size, self.world_size, self.rank, self.seed, self.epoch),
            )
            if self.shuffle == "shards":
                plan = plan_epoch_by_shards(
                    columns.bucket[items], columns.shard[items], self.window, *shape
                )
            else:
                plan = plan_epoch(columns.bucket[items], *shape)
            self._planned = self.epoch, plan, items, copies
        return self._planned[1:]

    def __len__(self) -> int:
        return max(0, len(self.plan()[0]) - self.start_step)

    def __iter__(self):
        self.iterations += 1
        iteration, (plan, epoch_items, epoch_copies) = self.iterations, self.plan()
        starts = [] if plan.window_starts is None else [*plan.window_starts.tolist(), len(plan)]
        following = zip(starts, starts[1:], starts[2:], strict=False)
        next_window = {start: range(a, b) for start, a, b in following}
        remote = any(file.files.remote for file in self.data.columns.shard_paths)
        for step in range(self.start_step, len(plan)):
            items, copies = epoch_items[plan.items[step]], epoch_copies[plan.items[step]]
            batch = self._batch(step, items, copies, int(plan.bucket[step]), iteration)
            if remote:
                ahead = [*next_window.get(step, ()), step + PREFETCH_STEPS]
                if step == self.start_step:  # the first batches, before any is read
                    ahead += range(step + 1, step + PREFETCH_STEPS)
                files = {
                    file
                    for later in ahead
                    if later < len(plan)
                    for file in self._files(plan, epoch_items, later)
                }
                batch = batch._replace(prefetch=tuple(sorted(files, key=lambda f: f.name)))
            yield batch

    def _latent(self, items: np.ndarray, bucket: int) -> bool:
        """Whether a batch reads cached latents: where there are some and every image is in its
        own bucket (a catch-all re-fit reads pixels)."""
        latents = self.data.columns.latents
        return latents is not None and bool(np.all(self.data.columns.bucket[items] == bucket))

    def _files(self, plan: RankPlan, epoch_items: np.ndarray, step: int) -> set[FileRef]:
        """The remote files the batch at `step` reads."""
        items, columns = epoch_items[plan.items[step]], self.data.columns
        if self._latent(items, int(plan.bucket[step])):
            codes, files = columns.latents.shard[items], columns.latents.paths
        else:
            codes, files = columns.shard[items], columns.shard_paths
        return {files[code] for code in np.unique(codes) if files[code].files.remote}

    def _batch(self, step: int, items, copies, bucket: int, iteration: int) -> BatchPlan:
        data, seed, epoch = self.data, self.seed, self.epoch
        columns = data.columns
        keys = data.keys(items)
        cached = data.text_entries(items, seed, epoch)  # the variants are the tag augmentation
        entries, empty = cached or ((), None)
        captions = [entry.text for entry in entries] or [
            caption(text, self.caption_options, seed, epoch, key, int(copy))
            for text, key, copy in zip(data.captions(items), keys, copies, strict=True)
        ]
        size = tuple(int(v) for v in data.buckets[bucket])
        latents, latent = columns.latents, self._latent(items, bucket)
        views = [
            view(
                tuple(columns.stored[item]),
                tuple(data.buckets[columns.bucket[item]]),
                size,
                tuple(columns.original[item]),
                tuple(columns.prepare_crop[item]),
                seed,
                epoch,
                key,
                int(copy),
                self.flip,
                latents.info["factor"] if latent else 1,
            )
            for item, key, copy in zip(items, keys, copies, strict=True)
        ]
        conditioning = np.array(
            [(v.original_size, v.crop_top_left, v.target_size) for v in views], dtype=np.int64
        )
        return BatchPlan(
            epoch,
            step,
            items,
            bucket,
            keys,
            captions,
            iteration,
            [v.size for v in views],
            [v.crop for v in views],
            [v.flip for v in views],
            conditioning,
            latent,
            text=tuple(entries),
            empty_text=empty,
        )
