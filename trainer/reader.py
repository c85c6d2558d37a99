"""A loader worker's side: the batch a `BatchPlan` names, read by byte range from the shards
and decoded straight into a shared buffer (or its cached latents read), as a `LoadedBatch` and
the `PixelLayout` of its pixels.

Only the image, decoded by libjpeg-turbo or Pillow, the latents (raw float16) and cached text
entries (safetensors) are read: nothing in a shard is ever unpickled.
"""

from __future__ import annotations

import io
import itertools
from typing import NamedTuple

import numpy as np
import simplejpeg
import torch
from PIL import Image

from pipeline.fit import fit
from pipeline.format import is_jpeg
from trainer.batch_pool import Lease, WorkerPool
from trainer.dataset import Dataset
from trainer.sampler import BatchPlan
from trainer.storage import FileRef, OpenFiles
from trainer.text_cache import CachedText, read_entries

POOL_BUFFERS = 8  # shared batch buffers per worker: enough for prefetch_factor up to 6
OPEN_SHARDS = 16  # shard files a worker keeps open: 10M images are 10,000 shards, over ulimit -n


class LoadedBatch(NamedTuple):
    """A batch as a worker hands it over, NumPy only (a tensor would cross in a shared-memory
    file of its own); its pixels are in the buffer its `PixelLayout` describes."""

    captions: list[str]
    keys: list[str]
    epoch: int
    step: int
    conditioning: np.ndarray  # int64 [B, 3, 2]: original_size, crop_top_left, target_size
    flipped: np.ndarray  # bool [B]
    latents: np.ndarray | None = None  # float16 [B, 2, C, h, w]: the VAE's mean and std
    text: CachedText | None = None  # cached text entries, padded (a few tensors a batch)


def decode_rgb(data: bytes, scratch: np.ndarray | None = None) -> np.ndarray:
    """An encoded image as uint8 RGB (H, W, 3), a view into `scratch` if it is a JPEG that fits.

    JPEGs go through libjpeg-turbo straight into a NumPy array (simplejpeg): the same pixels as
    Pillow's decoder in two thirds of the time, without Pillow's RGBX-to-RGB copy; other formats
    through Pillow. A reused `scratch` spares the page faults of a fresh array (3%, measured).
    """
    if is_jpeg(data):
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

    def __init__(self, data: Dataset, returns: list | None = None):
        self.data, self.returns = data, returns
        self._files = OpenFiles(OPEN_SHARDS)
        self._pool: WorkerPool | None = None  # in a worker process, made on its first batch
        self._scratch = np.empty(0, dtype=np.uint8)  # JPEGs to re-fit
        self._largest_sample = int(data.buckets.prod(axis=1).max()) * 3

    def _read(self, item: int) -> bytes:
        """An image's bytes."""
        columns = self.data.columns
        path = columns.shard_paths[columns.shard[item]]
        return self._read_range(
            path, int(columns.image_offset[item]), int(columns.image_size[item])
        )

    def _read_range(self, file: FileRef, offset: int, size: int) -> bytes:
        """Bytes of a shard; the OPEN_SHARDS shards used last stay open (trainer/storage.py's
        `OpenFiles`: a remote dataset's shard is fetched into the node's cache when opened)."""
        return self._files.read(file, offset, size)

    def _latents(self, batch: BatchPlan) -> np.ndarray:
        """The cached latents' windows, flipped where asked: float16 [B, 2, C, h, w]."""
        columns, latents = self.data.columns, self.data.columns.latents
        grid = latents.info["factor"]  # pixels a latent stands for
        bucket_w, bucket_h = (int(v) // grid for v in self.data.buckets[batch.bucket])
        windows = []
        for item, (left, top), flip in zip(batch.items, batch.crops, batch.flips, strict=True):
            path = latents.paths[latents.shard[item]]
            raw = self._read_range(path, int(latents.offset[item]), int(latents.size[item]))
            stored_w, stored_h = (int(v) // grid for v in columns.stored[item])
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

    def __getitem__(self, batch: BatchPlan) -> tuple[LoadedBatch, PixelLayout | None]:
        """The batch without its pixels, and where they lie (see `PixelLayout`, `Loader`).

        A JPEG stored at a size that covers the bucket (the prepare job's fitted size, or a
        catch-all batch asking for its own bucket) is decoded straight into the buffer, overflow
        and all, and its window is described; anything else is decoded and re-fitted into a
        bucket-sized place. Windows are the sampler's (`BatchPlan.crops`).
        """
        self._files.sweep()  # remote shards held open: let go once evicted, marked used
        for file in batch.prefetch:  # a later batch's remote shards, downloaded meanwhile
            if file not in self._files:  # open: in the cache already
                file.prefetch()
        described = LoadedBatch(
            batch.captions,
            batch.keys,
            batch.epoch,
            batch.step,
            batch.conditioning,
            np.array(batch.flips, dtype=bool),
        )
        if batch.text:
            text = read_entries(self._read_range, batch.text, batch.empty_text)
            described = described._replace(text=text)
        if batch.latent:
            return described._replace(latents=self._latents(batch)), None
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
    if not is_jpeg(data):
        return None
    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    return (width, height) if fit(width, height, *bucket) == (width, height) else None
