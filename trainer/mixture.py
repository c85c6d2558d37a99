"""Several prepared datasets as one, each with its weight: kohya-ss's subsets with repeats.

`Mixture([(subject, 3.0), (style, 1.0), (regularisation, 0.5)])` is a `Dataset` (the loader
reads it as it reads one `PreparedData`) over the union of the datasets' images, and
each epoch lists every image of a dataset of weight w floor(w) times, plus a share w - floor(w)
of them drawn anew each epoch from (seed, epoch): the epoch is planned over that list with the
source's algorithm, so every batch holds one resolution and every rank runs the same steps.

Bucket lists are merged by resolution (a batch of 512x768 images may mix datasets); datasets
prepared for different model scales (largest bucket areas more than 1.25x apart: SD 1.x's
512x768 with SDXL's 1024x1024) are refused, since no trainer wants both in one run.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import UsageError
from trainer.dataset import Columns, Dataset, Latents, PreparedData
from trainer.storage import NodeCache

MAX_AREA_RATIO = 1.25  # between the largest buckets of datasets trained together


def parse_weighted(spec: str) -> tuple[str, float]:
    """ "path" -> (path, 1.0); "path:3" or "path:0.5" -> (path, weight). A URI's port
    (`s3://b/p?endpoint_override=HOST:9000`) is not a weight: give one after it (`...:9000:3`)."""
    path, _, weight = spec.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        return spec, 1.0
    last_option = path.rpartition("?")[2].rpartition("&")[2] if "?" in path else ""
    if not path or (last_option.startswith("endpoint_override=") and ":" not in last_option):
        return spec, 1.0
    if not value > 0:
        raise UsageError(f"--data {spec}: the weight must be > 0")
    return path, value


class Mixture:
    """The union of weighted `PreparedData` (a `Dataset`): their columns concatenated (global
    item ids in dataset order), bucket ids mapped onto the merged bucket list."""

    def __init__(self, parts: list[tuple[PreparedData, float]]):
        if not parts:
            raise ValueError("a mixture needs at least one dataset")
        areas = [int(data.buckets.prod(axis=1).max()) for data, _ in parts]
        if max(areas) > MAX_AREA_RATIO * min(areas):
            described = ", ".join(
                f"{data.root} ({area:,} px)" for (data, _), area in zip(parts, areas, strict=True)
            )
            raise UsageError(
                f"datasets prepared for different model scales (largest bucket areas: "
                f"{described}): prepare them with the same bucket settings"
            )
        resolutions = sorted(
            {tuple(int(v) for v in b) for data, _ in parts for b in data.buckets},
            key=lambda wh: (wh[0] / wh[1], wh[0] * wh[1]),
        )
        number = {resolution: i for i, resolution in enumerate(resolutions)}
        self.buckets = np.array(resolutions, dtype=np.int64)
        self.parts = parts
        self.root = parts[0][0].root
        self.offsets = np.cumsum([0] + [len(data) for data, _ in parts])
        columns = [data.columns for data, _ in parts]
        mapped = [
            np.array([number[tuple(int(v) for v in b)] for b in data.buckets])[data.columns.bucket]
            for data, _ in parts
        ]
        shard, shard_paths = _joined([(c.shard, c.shard_paths) for c in columns])
        self.columns = Columns(
            bucket=np.concatenate(mapped),
            shard_paths=shard_paths,
            shard=shard,
            **{
                name: np.concatenate([getattr(c, name) for c in columns])
                for name in ("image_offset", "image_size", "original", "stored", "prepare_crop")
            },
            latents=_joined_latents([c.latents for c in columns]),
        )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _each_part(self, items: np.ndarray, read) -> list[str]:
        """`read(dataset, local items)` of each item's dataset, in the items' order."""
        items = np.asarray(items)
        part = np.searchsorted(self.offsets, items, side="right") - 1
        out: list[str] = [""] * len(items)
        for number in np.unique(part):
            where = np.flatnonzero(part == number)
            values = read(self.parts[number][0], items[where] - self.offsets[number])
            for position, value in zip(where, values, strict=True):
                out[position] = value
        return out

    def keys(self, items: np.ndarray) -> list[str]:
        return self._each_part(items, PreparedData.keys)

    def captions(self, items: np.ndarray) -> list[str]:
        return self._each_part(items, PreparedData.captions)

    def text_entries(self, items: np.ndarray, seed: int, epoch: int):
        """Each item's entry in its own dataset's text cache (every dataset has one, or none
        does); the first dataset's empty caption (each cache's is the same encoding)."""
        first = self.parts[0][0]
        if first.text is None:
            return None
        entries = self._each_part(
            items, lambda data, local: data.text_entries(local, seed, epoch)[0]
        )
        return entries, first.text.empty()

    def epoch_items(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, copy numbers): this epoch's list, each dataset as often as its weight says."""
        items, copies = [], []
        for part, ((data, weight), first) in enumerate(zip(self.parts, self.offsets, strict=False)):
            ids = np.arange(first, first + len(data), dtype=np.int64)
            whole = math.floor(weight)
            for copy in range(whole):
                items.append(ids)
                copies.append(np.full(len(ids), copy, dtype=np.int64))
            share = round((weight - whole) * len(ids))
            if share:
                rng = np.random.default_rng([seed, epoch, part, 7])
                items.append(np.sort(rng.choice(ids, share, replace=False)))
                copies.append(np.full(share, whole, dtype=np.int64))
        return np.concatenate(items), np.concatenate(copies)


def _joined_latents(parts: list[Latents | None]) -> Latents | None:
    """Every dataset's latents as one (they are opened for all datasets or for none)."""
    if parts[0] is None:
        return None
    shard, paths = _joined([(latents.shard, latents.paths) for latents in parts])
    return Latents(
        parts[0].info,
        paths,
        shard,
        np.concatenate([p.offset for p in parts]),
        np.concatenate([p.size for p in parts]),
    )


def _joined(parts: list[tuple[np.ndarray, list]]) -> tuple[np.ndarray, list]:
    """Per-dataset (file codes, file paths) as one: codes shifted past the files before."""
    firsts = np.cumsum([0] + [len(paths) for _, paths in parts])
    shifted = [codes + first for (codes, _), first in zip(parts, firsts, strict=False)]
    return np.concatenate(shifted), [path for _, paths in parts for path in paths]


def open_datasets(
    specs: tuple[str, ...] | list[str],
    latents: str | None = None,
    cache: NodeCache | None = None,
    text: tuple[str, ...] | None = None,
) -> Dataset:
    """The datasets `--data` names (PATH or PATH:WEIGHT): one as it is, several as a Mixture;
    with the cached latents of the VAE `latents` (a fingerprint), else pixels; with the text
    cache `text[i]` of dataset i (None: captions); remote files and index maps in `cache`."""
    parsed = [parse_weighted(spec) for spec in specs]
    texts = text or (None,) * len(parsed)
    opened = [
        (PreparedData(path, latents, cache, key), weight)
        for (path, weight), key in zip(parsed, texts, strict=True)
    ]
    if len(opened) == 1 and opened[0][1] == 1.0:
        return opened[0][0]
    return Mixture(opened)
