"""Reading a prepared dataset for training: the source's per-epoch plan, one resolution a batch.

    data = PreparedData("OUT")
    batches = EpochBatches(data, batch_size=4, world_size=world, rank=rank, seed=0)
    loader = make_loader(data, batches, num_workers=4)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for batch in loader:            # batch.pixels: float [B, 3, H, W] in [-1, 1]
            ...                         # batch.captions, batch.keys, batch.epoch, batch.step

Every rank plans the epoch itself with `pipeline.plan.plan_epoch` (no communication), so every
rank gets the same number of batches, for any world size on the same prepared data. Samples are
read by byte range from the index (no tar scan); only the image, which Pillow decodes, and the
caption, from the index, are used: nothing in a shard is ever unpickled. The random crop of each
image's overflow is seeded by (seed, epoch, key), so a rerun or a resume sees the same pixels.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import simplejpeg
import torch
from PIL import Image

from pipeline.fit import crop_box, fit
from pipeline.output import FORMAT_VERSION
from pipeline.plan import RankPlan, plan_epoch

INDEX_COLUMNS = ["key", "shard", "image_offset", "image_size", "caption", "bucket"]


class PreparedData:
    """The manifest and the index of a prepared dataset, as compact columns."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.exists():
            raise ValueError(f"{self.root} is not a complete prepared dataset: no manifest.json")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.root}: format version {manifest.get('format_version')} unknown"
            )
        self.buckets = np.array(manifest["buckets"], dtype=np.int64)
        self.index = pq.read_table(self.root / "index.parquet", columns=INDEX_COLUMNS)
        self.bucket = self.index["bucket"].to_numpy()

    def __len__(self) -> int:
        return len(self.index)


class Batch(NamedTuple):
    pixels: torch.Tensor  # [B, 3, H, W] float32 in [-1, 1] (uint8 [B, H, W, 3] inside workers)
    captions: list[str]  # "" where an image has no caption
    keys: list[str]
    epoch: int
    step: int  # position of this batch in the rank's epoch; resume from step + 1


class BatchPlan(NamedTuple):
    """What a loader worker needs to load one batch."""

    epoch: int
    step: int
    items: np.ndarray
    bucket: int


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
    ):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        self.data, self.batch_size, self.world_size, self.rank, self.seed = (
            data, batch_size, world_size, rank, seed
        )  # fmt: skip
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Plan `epoch`; begin at `start_step` to resume mid-epoch without replaying it."""
        self.epoch, self.start_step = epoch, start_step

    def plan(self) -> RankPlan:
        return plan_epoch(
            self.data.bucket, self.batch_size, self.world_size, self.rank, self.seed, self.epoch
        )

    def __len__(self) -> int:
        return max(0, len(self.plan()) - self.start_step)

    def __iter__(self):
        plan = self.plan()
        for step in range(self.start_step, len(plan)):
            yield BatchPlan(self.epoch, step, plan.items[step], int(plan.bucket[step]))


def decode_rgb(data: bytes) -> np.ndarray:
    """An encoded image as uint8 RGB (H, W, 3).

    JPEGs go through libjpeg-turbo straight into a NumPy array (simplejpeg): the same pixels as
    Pillow's decoder in two thirds of the time, without Pillow's RGBX-to-RGB copy; other formats
    through Pillow.
    """
    if data[:2] == b"\xff\xd8":
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


class BatchReader(torch.utils.data.Dataset):
    """Loads the batch a BatchPlan names: read by offset, decode, fit, crop, to a tensor."""

    def __init__(self, data: PreparedData, seed: int):
        self.data, self.seed = data, seed
        self._files: dict[str, object] = {}  # open shards, per worker process

    def _read(self, shard: str, offset: int, size: int) -> bytes:
        if shard not in self._files:
            self._files[shard] = open(self.data.root / shard, "rb")  # noqa: SIM115 (kept open)
        stream = self._files[shard]
        stream.seek(offset)
        return stream.read(size)

    def __getitem__(self, batch: BatchPlan) -> Batch:
        """The batch with uint8 pixels [B, H, W, 3]; `Loader` makes them float [B, 3, H, W]."""
        bucket_w, bucket_h = (int(v) for v in self.data.buckets[batch.bucket])
        rows = self.data.index.take(batch.items).to_pylist()
        crops = []
        for row in rows:
            image = decode_rgb(self._read(row["shard"], row["image_offset"], row["image_size"]))
            # Stored fitted to its own bucket; a catch-all batch may ask for another one.
            scaled = fit(image.shape[1], image.shape[0], bucket_w, bucket_h)
            if scaled != (image.shape[1], image.shape[0]):
                image = np.array(Image.fromarray(image).resize(scaled, Image.Resampling.LANCZOS))
            rng = np.random.default_rng([self.seed, batch.epoch, int(row["key"], 16)])
            left, top, right, bottom = crop_box(*scaled, bucket_w, bucket_h, rng)
            crops.append(torch.from_numpy(image[top:bottom, left:right]))
        # Stacked straight into shared memory in a worker, so the hand-off copies nothing more.
        pixels = torch.utils.data.default_collate(crops)
        captions = [row["caption"] or "" for row in rows]
        return Batch(pixels, captions, [row["key"] for row in rows], batch.epoch, batch.step)

    def __len__(self) -> int:  # a DataLoader asks; the sampler decides what is read
        return len(self.data)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] to float [B, 3, H, W] in [-1, 1] (channels-last in memory).

    Converted where the batch lands (the GPU when training on one): uint8 is a quarter of the
    bytes to move between processes and devices, and the contiguous conversion is 5x faster
    than one through a permuted view.
    """
    return pixels.float().mul_(1 / 127.5).sub_(1.0).permute(0, 3, 1, 2)


class Loader:
    """Iterates a DataLoader of uint8 batches and hands them out as float tensors on `device`."""

    def __init__(self, dataloader: torch.utils.data.DataLoader, device: torch.device):
        self.dataloader, self.device = dataloader, device

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self):
        for batch in self.dataloader:
            pixels = batch.pixels.to(self.device, non_blocking=True)
            yield batch._replace(pixels=to_float(pixels))


def make_loader(
    data: PreparedData,
    batches: EpochBatches,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    prefetch_factor: int = 2,
) -> Loader:
    """Whole single-resolution Batches, read by `num_workers` processes, delivered on `device`."""
    device = torch.device(device)
    dataloader = torch.utils.data.DataLoader(
        BatchReader(data, batches.seed),
        sampler=batches,
        batch_size=None,  # the sampler yields whole batches
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=num_workers > 0,
    )
    return Loader(dataloader, device)
