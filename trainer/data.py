"""Reading a prepared dataset for training: the source's per-epoch plan, one resolution a batch.

    data = PreparedData("OUT")          # or trainer.mixture.Mixture: several, with weights
    batches = EpochBatches(data, batch_size=4, world_size=world, rank=rank, seed=0)
    loader = make_loader(data, batches, num_workers=4)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for batch in loader:            # batch.pixels: float [B, 3, H, W] in [-1, 1]
            ...                         # batch.captions, batch.keys, SDXL's batch.original_size...

Every rank plans the epoch itself with `pipeline.plan.plan_epoch` (no communication), so every
rank gets the same number of batches, for any world size on the same prepared data. Samples are
read by byte range from the index (no tar scan); only the image, decoded by libjpeg-turbo or
Pillow, and the caption, from the index, are used: nothing in a shard is ever unpickled. Crops,
flips, caption augmentations and SDXL's conditioning are decided in the trainer's process from
the index (trainer/augment.py), seeded by (seed, epoch, key), so a rerun or a resume sees the
same pixels and captions.
"""

from __future__ import annotations

import collections
import io
import itertools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import simplejpeg
import torch
from PIL import Image

from pipeline.errors import UsageError
from pipeline.fit import fit
from pipeline.output import Manifest, OutputDir
from pipeline.plan import RankPlan, plan_epoch
from pipeline.sources import IMAGE_EXTENSIONS
from trainer.augment import CaptionOptions, caption, view
from trainer.batch_pool import Lease, TrainerPool, WorkerPool

POOL_BUFFERS = 8  # shared batch buffers per worker: enough for prefetch_factor up to 6
FLOAT_BUFFERS = 3  # reused float batches on the CPU: the one trained on, the next, one spare
INDEX_COLUMNS = ["key", "shard", "image_offset", "image_size", "caption", "bucket", "width",
                 "height", "stored_width", "stored_height"]  # fmt: skip
CROP_COLUMNS = ["crop_left", "crop_top"]  # format 2: where --crop cut the stored image
OPEN_SHARDS = 16  # shard files a worker keeps open: 10M images are 10,000 shards, over ulimit -n


class PreparedData:
    """The manifest and the index of a prepared dataset, as compact columns."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = Manifest.read(OutputDir(str(self.root.resolve())))
        if manifest is None:
            raise not_prepared(self.root)
        self.manifest = manifest
        self.buckets = np.array(manifest.buckets, dtype=np.int64)
        self.latents: dict | None = None  # the VAE whose latents batches carry (use_latents)
        path = self.root / "index.parquet"
        cropped = set(CROP_COLUMNS) <= set(pq.read_schema(path).names)
        self.index = pq.read_table(path, columns=INDEX_COLUMNS + (CROP_COLUMNS * cropped))
        self.bucket = self.index["bucket"].to_numpy()
        # Where each sample's image lies, as numbers: what a worker reads per sample.
        shards = self.index["shard"].combine_chunks().dictionary_encode()
        self.shard_paths = [self.root / name for name in shards.dictionary.to_pylist()]
        self.shard = shards.indices.to_numpy()
        self.image_offset = self.index["image_offset"].to_numpy()
        self.image_size = self.index["image_size"].to_numpy()
        # What the sampler decides crops and conditioning from: (width, height) pairs.
        self.original = self._pairs("width", "height")
        self.stored = self._pairs("stored_width", "stored_height")
        self.prepare_crop = self._pairs(*CROP_COLUMNS) if cropped else np.zeros_like(self.stored)

    def use_latents(self, fingerprint: str) -> None:
        """Batches of images in their own bucket carry the latents of the VAE `fingerprint`
        (pipeline/latents.py) instead of pixels; a ValueError says which VAEs the dataset has."""
        entry = self.manifest.latents.get(fingerprint)
        if entry is None:
            held = ", ".join(self.manifest.latents) or "none"
            raise UsageError(
                f"{self.root} holds no latents of this VAE ({fingerprint}; it holds: {held}): "
                f"prepare them with jobs/prepare.py --output {self.root} --vae YOUR_VAE, or "
                "train from pixels with --latents off"
            )
        table = pq.read_table(self.root / entry["path"] / "index.parquet")
        if table["key"] != self.index["key"]:
            raise ValueError(f"{self.root}: latents of {fingerprint} do not match the index")
        shards = table["latent_shard"].combine_chunks().dictionary_encode()
        self.latent_paths = [self.root / name for name in shards.dictionary.to_pylist()]
        self.latent_shard = shards.indices.to_numpy()
        self.latent_offset = table["latent_offset"].to_numpy()
        self.latent_size = table["latent_size"].to_numpy()
        self.latents = entry | {"fingerprint": fingerprint}

    def _pairs(self, first: str, second: str) -> np.ndarray:
        return np.stack([self.index[first].to_numpy(), self.index[second].to_numpy()], axis=1)

    def __len__(self) -> int:
        return len(self.index)

    def keys(self, items: np.ndarray) -> list[str]:
        return self.index["key"].take(items).to_pylist()

    def captions(self, items: np.ndarray) -> list[str]:
        """ "" where an image has no caption."""
        return [c or "" for c in self.index["caption"].take(items).to_pylist()]

    def epoch_items(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, copy numbers) of an epoch: every image once."""
        return np.arange(len(self), dtype=np.int64), np.zeros(len(self), dtype=np.int64)


def not_prepared(root: Path) -> UsageError:
    """What to do about a --data that holds no manifest.json: nothing there, a preparation that
    did not finish, or images that were never prepared."""
    run = "python jobs/prepare.py --input IMAGES --output OUT"
    if not root.exists():
        return UsageError(f"--data {root}: no such folder: give the OUT of `{run}`")
    names = {path.name for path in root.iterdir()} if root.is_dir() else set()
    if names & {"config.json", "shards", "parts"}:
        return UsageError(
            f"--data {root}: its preparation did not finish (no manifest.json, which is written "
            "last): rerun the jobs/prepare.py command that wrote it, with the same --input and "
            f"--output {root}; it keeps the finished shards"
        )
    if any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in names):
        return UsageError(
            f"--data {root} holds images, not a prepared dataset: prepare them first with "
            f"`python jobs/prepare.py --input {root} --output OUT`, then train with --data OUT"
        )
    return UsageError(f"--data {root} is not a prepared dataset (no manifest.json): give the "
                      f"OUT of `{run}`")  # fmt: skip


class Batch(NamedTuple):
    pixels: torch.Tensor | None  # [B, 3, H, W] float32 in [-1, 1]; None from a worker
    captions: list[str]  # "" where an image has no caption; tags augmented if asked
    keys: list[str]
    epoch: int
    step: int  # position of this batch in the rank's epoch; resume from step + 1
    # SDXL's micro-conditioning, int64 [B, 2] each, as diffusers names it (trainer/augment.py),
    # NumPy from a worker (a tensor would cross in a shared-memory file of its own):
    original_size: torch.Tensor  # (height, width) of each source
    crop_top_left: torch.Tensor  # (top, left) of its window in the fitted source
    target_size: torch.Tensor  # (height, width) of the bucket
    flipped: torch.Tensor  # bool [B]: mirrored left to right (--flip)
    # Cached latents (PreparedData.use_latents): the VAE's mean and std of each window, float16
    # [B, C, H/8, W/8] on the device (from a worker: both in latent_mean, [B, 2, C, h, w]);
    # None, and pixels set, for a batch of pixels.
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None

    def as_tensors(self, pixels: torch.Tensor | None, device: torch.device) -> Batch:
        """This batch from a worker, with its pixels, latents and conditioning as tensors."""
        latents = {}
        if self.latent_mean is not None:  # [B, 2, C, h, w] from the worker
            staged = torch.from_numpy(self.latent_mean)
            staged = staged.pin_memory() if device.type == "cuda" else staged
            mean, std = staged.to(device, non_blocking=True).unbind(1)
            latents = {"latent_mean": mean, "latent_std": std}
        return self._replace(
            pixels=pixels,
            original_size=torch.from_numpy(self.original_size),
            crop_top_left=torch.from_numpy(self.crop_top_left),
            target_size=torch.from_numpy(self.target_size),
            flipped=torch.from_numpy(self.flipped),
            **latents,
        )


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


class EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of the current epoch, from `start_step` on: a DataLoader sampler.

    `world_size` and `rank` default to torch.distributed's when it is initialised, else 1 and 0.
    """

    def __init__(
        self,
        data: PreparedData,
        batch_size: int,
        world_size: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        flip: float = 0.0,
        captions: CaptionOptions | None = None,
    ):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if not 0 <= flip <= 1:
            raise ValueError(f"--flip must be a probability in [0, 1], got {flip}")
        self.data, self.batch_size, self.world_size, self.rank, self.seed = (
            data, batch_size, world_size, rank, seed
        )  # fmt: skip
        self.flip, self.caption_options = flip, captions or CaptionOptions()
        self.epoch, self.start_step, self.iterations = 0, 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Plan `epoch`; begin at `start_step` to resume mid-epoch without replaying it."""
        self.epoch, self.start_step = epoch, start_step

    def plan(self) -> tuple[RankPlan, np.ndarray, np.ndarray]:
        """This rank's plan over the epoch's list, and the list: (items, copy numbers)."""
        items, copies = self.data.epoch_items(self.seed, self.epoch)
        plan = plan_epoch(
            self.data.bucket[items], self.batch_size, self.world_size, self.rank, self.seed,
            self.epoch,
        )  # fmt: skip
        return plan, items, copies

    def __len__(self) -> int:
        return max(0, len(self.plan()[0]) - self.start_step)

    def __iter__(self):
        self.iterations += 1
        iteration, (plan, epoch_items, epoch_copies) = self.iterations, self.plan()
        for step in range(self.start_step, len(plan)):
            items, copies = epoch_items[plan.items[step]], epoch_copies[plan.items[step]]
            bucket = int(plan.bucket[step])
            yield self._batch(step, items, copies, bucket, iteration)

    def _batch(self, step: int, items, copies, bucket: int, iteration: int) -> BatchPlan:
        data, seed, epoch = self.data, self.seed, self.epoch
        keys = data.keys(items)
        captions = [
            caption(text, self.caption_options, seed, epoch, key, int(copy))
            for text, key, copy in zip(data.captions(items), keys, copies, strict=True)
        ]
        size = tuple(int(v) for v in data.buckets[bucket])
        # Cached latents where every image is in its own bucket (a catch-all re-fit: pixels)
        latent = data.latents is not None and bool(np.all(data.bucket[items] == bucket))
        views = [
            view(tuple(data.stored[item]), tuple(data.buckets[data.bucket[item]]), size,
                 tuple(data.original[item]), tuple(data.prepare_crop[item]), seed, epoch, key,
                 int(copy), self.flip, data.latents["factor"] if latent else 1)
            for item, key, copy in zip(items, keys, copies, strict=True)
        ]  # fmt: skip
        conditioning = np.array(
            [(v.original_size, v.crop_top_left, v.target_size) for v in views], dtype=np.int64
        )
        return BatchPlan(
            epoch, step, items, bucket, keys, captions, iteration,
            [v.size for v in views], [v.crop for v in views], [v.flip for v in views],
            conditioning, latent,
        )  # fmt: skip


def decode_rgb(data: bytes, scratch: np.ndarray | None = None) -> np.ndarray:
    """An encoded image as uint8 RGB (H, W, 3), a view into `scratch` if it is a JPEG that fits.

    JPEGs go through libjpeg-turbo straight into a NumPy array (simplejpeg): the same pixels as
    Pillow's decoder in two thirds of the time, without Pillow's RGBX-to-RGB copy; other formats
    through Pillow. A reused `scratch` spares the page faults of a fresh array (3%, measured).
    """
    if data[:2] == b"\xff\xd8":
        if scratch is not None:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            scratch = scratch if scratch.nbytes >= height * width * 3 else None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=scratch)
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


class PixelLayout(NamedTuple):
    """Where a worker wrote a batch's uint8 pixels in a flat buffer.

    Sample i is the (H, W, 3) window that starts at byte `starts[i]` of the buffer and whose
    rows lie `row_bytes[i]` apart: a JPEG is decoded in place with its overflow, and the random
    crop is taken by the copy that converts the batch to float where it lands (`to_float`).
    """

    shape: tuple[int, int, int, int]  # B, H, W, 3
    starts: tuple[int, ...]
    row_bytes: tuple[int, ...]
    size: int  # bytes used, from the buffer's start
    lease: Lease  # the buffer, or its number in its worker's pool (batch_pool.py)
    flips: tuple[bool, ...]  # windows to mirror left to right as they are converted


class BatchReader(torch.utils.data.Dataset):
    """Loads the batch a BatchPlan names: read by offset, decode (fit), into one flat buffer.

    With `returns` (one queue per worker, from `make_loader`), a worker writes its batches into
    buffers of its `WorkerPool` (batch_pool.py), lent to the trainer and handed back; without,
    into a fresh buffer a batch, which the DataLoader moves to shared memory to cross.
    """

    def __init__(self, data: PreparedData, returns: list | None = None):
        self.data, self.returns = data, returns
        self._files: collections.OrderedDict = collections.OrderedDict()  # shard -> open file
        self._pool: WorkerPool | None = None  # in a worker process, made on its first batch
        self._scratch = np.empty(0, dtype=np.uint8)  # JPEGs to re-fit
        self._largest_sample = int(data.buckets.prod(axis=1).max()) * 3

    def _read(self, item: int) -> bytes:
        """An image's bytes."""
        data = self.data
        path = data.shard_paths[data.shard[item]]
        return self._read_range(path, int(data.image_offset[item]), int(data.image_size[item]))

    def _read_range(self, path: Path, offset: int, size: int) -> bytes:
        """Bytes of a shard; the OPEN_SHARDS shards used last stay open (an open and close
        costs ~3 us, measured; a decode ~2 ms: a miss costs nothing that shows)."""
        if path in self._files:
            self._files.move_to_end(path)
        else:
            if len(self._files) >= OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
            self._files[path] = open(path, "rb")  # noqa: SIM115 (kept open)
        stream = self._files[path]
        stream.seek(offset)
        return stream.read(size)

    def _latents(self, batch: BatchPlan) -> np.ndarray:
        """The cached latents' windows, flipped where asked: float16 [B, 2, C, h, w]."""
        data = self.data
        grid = data.latents["factor"]  # pixels a latent stands for
        bucket_w, bucket_h = (int(v) // grid for v in data.buckets[batch.bucket])
        windows = []
        for item, (left, top), flip in zip(batch.items, batch.crops, batch.flips, strict=True):
            path = data.latent_paths[data.latent_shard[item]]
            raw = self._read_range(path, int(data.latent_offset[item]), int(data.latent_size[item]))
            stored_w, stored_h = (int(v) // grid for v in data.stored[item])
            latent = np.frombuffer(raw, np.float16).reshape(2, -1, stored_h, stored_w)
            row, column = top // grid, left // grid
            window = latent[:, :, row : row + bucket_h, column : column + bucket_w]
            windows.append(window[..., ::-1] if flip else window)
        return np.stack(windows)

    def _output(self, size: int, count: int, iteration: int) -> tuple[torch.Tensor, Lease]:
        """A flat uint8 buffer of at least `size` bytes for a batch of `count`, and its lease."""
        worker = torch.utils.data.get_worker_info()
        if worker is None or self.returns is None:
            buffer = torch.empty(size, dtype=torch.uint8)
            return buffer, Lease(None, -1, 0, buffer)
        if self._pool is None:
            room = count * self._largest_sample  # the largest batch: buffers never regrow
            self._pool = WorkerPool(worker.id, self.returns[worker.id], POOL_BUFFERS, room)
        return self._pool.lend(size, iteration)

    def _fitted(
        self,
        data: bytes,
        bucket: tuple[int, int],
        scaled: tuple[int, int],
        crop: tuple[int, int],
        out: np.ndarray,
    ):
        """Decode an image not decoded in place (not a JPEG, or asked for another bucket than
        the one it was stored for), fit it to `scaled` (width, height) if it is not that size,
        and write its bucket-sized window at `crop` (left, top) to `out`."""
        bucket_w, bucket_h = bucket
        image = decode_rgb(data, self._scratch)
        if image.size > self._scratch.size:  # decoded afresh: grow the scratch for the next
            self._scratch = np.empty(image.size, dtype=np.uint8)
        height, width = image.shape[:2]
        left, top = crop
        target = out.reshape(bucket_h, bucket_w, 3)
        if scaled == (width, height):  # not a JPEG: a Pillow-decoded array, cropped
            target[:] = image[top : top + bucket_h, left : left + bucket_w]
            return
        # Stored fitted to its own bucket; a catch-all batch asks for another one. Torch's
        # uint8 bicubic with antialiasing: Pillow's filter, 4x faster than its Lanczos (measured).
        resized = torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0),
            size=scaled[::-1],
            mode="bicubic",
            antialias=True,
        )
        window = resized[0].permute(1, 2, 0)[top : top + bucket_h, left : left + bucket_w]
        target[:] = window.numpy()

    def __getitem__(self, batch: BatchPlan) -> tuple[Batch, PixelLayout]:
        """The batch without its pixels, and where they lie (see `PixelLayout`, `Loader`).

        A JPEG stored at a size that covers the bucket (the prepare job's fitted size, or a
        catch-all batch asking for its own bucket) is decoded straight into the buffer, overflow
        and all, and its window is described; anything else is decoded and re-fitted into a
        bucket-sized place. Windows are the sampler's (`BatchPlan.crops`).
        """
        conditioning = batch.conditioning
        described = Batch(
            None, batch.captions, batch.keys, batch.epoch, batch.step, conditioning[:, 0],
            conditioning[:, 1], conditioning[:, 2], np.array(batch.flips, dtype=bool),
        )  # fmt: skip
        if batch.latent:
            return described._replace(latent_mean=self._latents(batch)), None
        bucket = tuple(int(v) for v in self.data.buckets[batch.bucket])
        encoded = [self._read(int(item)) for item in batch.items]
        sizes = [_in_place_size(data, bucket) for data in encoded]  # None: re-fit
        places = [bucket if size is None else size for size in sizes]  # (width, height)
        ends = list(itertools.accumulate(width * height * 3 for width, height in places))
        buffer, lease = self._output(ends[-1], len(batch.items), batch.iteration)
        flat = buffer.numpy()
        starts, row_bytes = [], []
        for data, size, (width, height), scaled, crop, end in zip(
            encoded, sizes, places, batch.sizes, batch.crops, ends, strict=True
        ):
            begin = end - width * height * 3
            if size is None:  # re-fitted into a bucket-sized place: all of it is the window
                self._fitted(data, bucket, scaled, crop, flat[begin:end])
                left = top = 0
            else:
                decode_rgb(data, flat[begin:end])
                left, top = crop
            starts.append(begin + (top * width + left) * 3)
            row_bytes.append(width * 3)
        shape = (len(batch.items), bucket[1], bucket[0], 3)
        layout = PixelLayout(
            shape, tuple(starts), tuple(row_bytes), ends[-1], lease, tuple(batch.flips)
        )
        return described, layout

    def __len__(self) -> int:  # a DataLoader asks; the sampler decides what is read
        return len(self.data)


def _in_place_size(data: bytes, bucket: tuple[int, int]) -> tuple[int, int] | None:
    """(width, height) of a JPEG whose stored size covers `bucket` with nothing to resample."""
    if data[:2] != b"\xff\xd8":
        return None
    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    return (width, height) if fit(width, height, *bucket) == (width, height) else None


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
                yield batch.as_tensors(None, self.device)
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
            yield batch.as_tensors(pixels, self.device)


def _as_loaded(loaded: tuple[Batch, PixelLayout]) -> tuple[Batch, PixelLayout]:
    """The DataLoader's collate function: a BatchReader item is a whole batch already (the
    default walks it converting NumPy arrays, 40 us a batch for nothing)."""
    return loaded


def make_loader(
    data: PreparedData,
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
