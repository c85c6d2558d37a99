"""The loader: workers' batches (trainer/reader.py) handed out as float tensors on the device.

data = PreparedData("OUT")
batches = EpochBatches(data, batch_size=4, world_size=world, rank=rank, seed=0)
loader = make_loader(data, batches, num_workers=4, device="cuda")
for epoch in range(epochs):
    batches.set_epoch(epoch)
    for batch in loader:            # batch.pixels: float [B, 3, H, W] in [-1, 1]
        ...                         # batch.captions, batch.keys, SDXL's batch.original_size...
    for count, group in accumulation_groups(loader, 4, 0, len(batches.plan()[0])):
        ...                         # groups of 4 batches as they load (the last smaller)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from trainer.batch_pool import TrainerPool
from trainer.dataset import Dataset
from trainer.reader import BatchReader, LoadedBatch, PixelLayout
from trainer.sampler import EpochBatches
from trainer.text_cache import CachedText

FLOAT_BUFFERS = 3  # reused float batches on the CPU: the one trained on, the next, one spare


class Batch(NamedTuple):
    """A batch as the training step sees it: tensors on the device."""

    pixels: torch.Tensor | None  # [B, 3, H, W] float32 in [-1, 1]; None: cached latents
    captions: list[str]  # "" where an image has no caption; tags augmented if asked
    keys: list[str]
    epoch: int
    step: int  # position of this batch in the rank's epoch; resume from step + 1
    # SDXL's micro-conditioning, int64 [B, 2] each, as diffusers names it (trainer/augment.py):
    original_size: torch.Tensor  # (height, width) of each source
    crop_top_left: torch.Tensor  # (top, left) of its window in the fitted source
    target_size: torch.Tensor  # (height, width) of the bucket
    flipped: torch.Tensor  # bool [B]: mirrored left to right (--flip)
    # Cached latents (a dataset opened with latents): the VAE's mean and std of each window,
    # float16 [B, C, H/8, W/8] on the device; None, and pixels set, for a batch of pixels.
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    # Cached text-encoder outputs (a dataset opened with a text cache: trainer/text_cache.py),
    # on the device; None: the model encodes `captions`.
    text: CachedText | None = None


def to_batch(loaded: LoadedBatch, pixels: torch.Tensor | None, device: torch.device) -> Batch:
    """A worker's batch with its pixels, latents, cached text and conditioning as tensors."""
    latents = {}
    if loaded.latents is not None:
        staged = torch.from_numpy(loaded.latents)
        staged = staged.pin_memory() if device.type == "cuda" else staged
        mean, std = staged.to(device, non_blocking=True).unbind(1)
        latents = {"latent_mean": mean, "latent_std": std}
    conditioning = torch.from_numpy(loaded.conditioning)
    return Batch(
        pixels,
        loaded.captions,
        loaded.keys,
        loaded.epoch,
        loaded.step,
        conditioning[:, 0],
        conditioning[:, 1],
        conditioning[:, 2],
        torch.from_numpy(loaded.flipped),
        **latents,
        text=None if loaded.text is None else loaded.text.to(device),
    )


def to_float(
    buffer: torch.Tensor, layout: PixelLayout, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The batch `layout` describes in `buffer` as float [B, 3, H, W] in [-1, 1].

    Converted where the batch lands (the GPU when training on one): uint8 is a quarter of the
    bytes to move between processes and devices. The copy that converts also crops, so no
    process copies the pixels twice; it is contiguous (channels-last in memory), 5x faster than
    one through a permuted view. `out`, a float buffer of at least as many elements, spares the
    page faults of a fresh batch: on the CPU they cost 3x the conversion.
    """
    if out is None:
        out = torch.empty(layout.shape, device=buffer.device)
    out = out[: math.prod(layout.shape)].view(layout.shape)
    base = buffer.storage_offset()
    for sample, start, row, flip in zip(
        out, layout.starts, layout.row_bytes, layout.flips, strict=True
    ):
        window = buffer.as_strided(layout.shape[1:], (row, 3, 1), base + start)
        sample.copy_(window.flip(1) if flip else window)
    return out.mul_(1 / 127.5).sub_(1.0).permute(0, 3, 1, 2)


def _held_elsewhere(tensor: torch.Tensor) -> bool:
    """Whether anything but `tensor` itself holds its memory: a view, a batch, autograd.

    Torch's storage use count (what its CUDA-graph trees check); without it, assume held.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    # Counted: the tensor, and the storage object made to ask.
    return use_count is None or use_count(tensor.untyped_storage()._cdata) > 2


class Loader:
    """Iterates a DataLoader of uint8 batches and hands them out as float tensors on `device`.

    With a `TrainerPool` (batch_pool.py), each batch's buffer goes back to its worker once
    converted. On the CPU, float batches are written into a few reused buffers, each reused once
    nothing holds a batch in it.
    """

    def __init__(
        self,
        dataloader: torch.utils.data.DataLoader,
        device: torch.device,
        pool: TrainerPool | None = None,
    ):
        self.dataloader, self.device, self.pool = dataloader, device, pool
        self._floats: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.dataloader)

    def _float_buffer(self, numel: int) -> torch.Tensor | None:
        if self.device.type != "cpu":
            return None  # the device's caching allocator reuses memory
        for number, buffer in enumerate(self._floats):
            if not _held_elsewhere(buffer):
                if buffer.numel() < numel:
                    buffer = self._floats[number] = torch.empty(numel)
                return buffer
        if len(self._floats) < FLOAT_BUFFERS:
            self._floats.append(torch.empty(numel))
            return self._floats[-1]
        return None

    def __iter__(self):
        if self.pool is not None:
            self.pool.attach()
        for batch, layout in self.dataloader:
            if layout is None:  # cached latents, no pixels
                yield to_batch(batch, None, self.device)
                continue
            lease = layout.lease
            buffer = self.pool.buffer(lease) if self.pool is not None else lease.buffer
            buffer = buffer[: layout.size]
            if self.device.type == "cuda":  # staged in pinned memory: copied to the GPU async
                buffer = buffer.pin_memory()
            buffer = buffer.to(self.device, non_blocking=True)
            pixels = to_float(buffer, layout, self._float_buffer(math.prod(layout.shape)))
            if self.pool is not None:  # converted or copied off: free to write again
                self.pool.hand_back(lease)
            yield to_batch(batch, pixels, self.device)


def accumulation_groups(
    batches: Iterable[Batch], size: int, start: int, end: int
) -> Iterator[tuple[int, Iterator[Batch]]]:
    """An epoch's batches (steps `start`..`end` - 1) in gradient accumulation groups of `size`:
    steps 0..size-1, then size..2*size-1, ...; each as (its number of batches, its batches as
    they load). The epoch's last group is smaller where its batches do not fill one, and so is a
    first group that a resume with another `size` enters midway. One batch is held at a time."""
    for index, group in itertools.groupby(batches, key=lambda batch: batch.step // size):
        yield min((index + 1) * size, end) - max(index * size, start), group


def _as_loaded(loaded: tuple[LoadedBatch, PixelLayout]) -> tuple[LoadedBatch, PixelLayout]:
    """The DataLoader's collate function: a BatchReader item is a whole batch already (the
    default walks it converting NumPy arrays, 40 us a batch for nothing)."""
    return loaded


def make_loader(
    data: Dataset,
    batches: EpochBatches,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    prefetch_factor: int = 2,
    start_method: str | None = None,
    pooled: bool = True,
) -> Loader:
    """Whole single-resolution Batches, read by `num_workers` processes, delivered on `device`.

    A worker keeps a core busy decoding; the trainer's process needs one too (on the CPU it
    converts every batch to float), so give each rank at most its share of cores minus one.
    `start_method` starts the workers ("fork", "spawn", "forkserver"); None: the platform's.
    `pooled`: workers lend reused shared buffers (batch_pool.py); False: a fresh buffer a batch,
    the DataLoader's own way (the benchmark's baseline).
    """
    device = torch.device(device)
    context = torch.multiprocessing.get_context(start_method)
    returns = [context.Queue() for _ in range(num_workers)] if num_workers and pooled else None
    dataloader = torch.utils.data.DataLoader(
        BatchReader(data, returns),
        sampler=batches,
        batch_size=None,  # the sampler yields whole batches
        collate_fn=_as_loaded,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=num_workers > 0,
        multiprocessing_context=context if num_workers else None,
        # its own, for each iteration's worker seed: torch's global state is the model's
        # (dropout), which a resume restores and an extra draw per epoch would shift
        generator=torch.Generator().manual_seed(0),
    )
    return Loader(dataloader, device, TrainerPool(returns) if returns else None)
