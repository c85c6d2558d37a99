"""Several prepared datasets as one, each with its weight: kohya-ss's subsets with repeats.

`Mixture([(subject, 3.0), (style, 1.0), (regularisation, 0.5)])` presents the columns of a
`PreparedData` (the loader reads it the same way) over the union of the datasets' images, and
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
import pyarrow as pa

from pipeline.errors import UsageError
from trainer.data import PreparedData

MAX_AREA_RATIO = 1.25  # between the largest buckets of datasets trained together


def parse_weighted(spec: str) -> tuple[str, float]:
    """ "path" -> (path, 1.0); "path:3" or "path:0.5" -> (path, weight)."""
    path, _, weight = spec.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        return spec, 1.0
    if not path:
        return spec, 1.0
    if not value > 0:
        raise UsageError(f"--data {spec}: the weight must be > 0")
    return path, value


class Mixture:
    """The union of weighted `PreparedData`, with their columns concatenated (global item ids
    in dataset order) and bucket ids mapped onto the merged bucket list."""

    def __init__(self, parts: list[tuple[PreparedData, float]]):
        if not parts:
            raise ValueError("a mixture needs at least one dataset")
        areas = [int(data.buckets.prod(axis=1).max()) for data, _ in parts]
        if max(areas) > MAX_AREA_RATIO * min(areas):
            described = ", ".join(f"{data.root} ({area:,} px)" for (data, _), area in
                                  zip(parts, areas, strict=True))  # fmt: skip
            raise UsageError(
                f"datasets prepared for different model scales (largest bucket areas: "
                f"{described}): prepare them with the same bucket settings"
            )
        resolutions = sorted({tuple(int(v) for v in b) for data, _ in parts for b in data.buckets},
                             key=lambda wh: (wh[0] / wh[1], wh[0] * wh[1]))  # fmt: skip
        number = {resolution: i for i, resolution in enumerate(resolutions)}
        self.buckets = np.array(resolutions, dtype=np.int64)
        self.parts = parts
        self.root = parts[0][0].root
        self.offsets = np.cumsum([0] + [len(data) for data, _ in parts])
        mapped = [
            np.array([number[tuple(int(v) for v in b)] for b in data.buckets])[data.bucket]
            for data, _ in parts
        ]
        self.bucket = np.concatenate(mapped)
        self.shard, self.shard_paths = _joined([(d.shard, d.shard_paths) for d, _ in parts])
        for column in ("image_offset", "image_size", "original", "stored", "prepare_crop"):
            setattr(self, column, np.concatenate([getattr(data, column) for data, _ in parts]))
        self._keys = pa.chunked_array([c for d, _ in parts for c in d.index["key"].chunks])
        self._captions = pa.chunked_array([c for d, _ in parts for c in d.index["caption"].chunks])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def manifest(self):
        """The first dataset's (latents are used only when every dataset has them)."""
        return self.parts[0][0].manifest

    @property
    def latents(self) -> dict | None:
        return self.parts[0][0].latents

    def use_latents(self, fingerprint: str) -> None:
        """Every dataset's latents of the VAE `fingerprint` (PreparedData.use_latents)."""
        for data, _ in self.parts:
            data.use_latents(fingerprint)
        self.latent_shard, self.latent_paths = _joined(
            [(data.latent_shard, data.latent_paths) for data, _ in self.parts]
        )
        for column in ("latent_offset", "latent_size"):
            setattr(self, column, np.concatenate([getattr(d, column) for d, _ in self.parts]))

    def keys(self, items: np.ndarray) -> list[str]:
        return self._keys.take(items).to_pylist()

    def captions(self, items: np.ndarray) -> list[str]:
        return [c or "" for c in self._captions.take(items).to_pylist()]

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


def _joined(parts: list[tuple[np.ndarray, list]]) -> tuple[np.ndarray, list]:
    """Per-dataset (file codes, file paths) as one: codes shifted past the files before."""
    firsts = np.cumsum([0] + [len(paths) for _, paths in parts])
    shifted = [codes + first for (codes, _), first in zip(parts, firsts, strict=False)]
    return np.concatenate(shifted), [path for _, paths in parts for path in paths]


def open_datasets(specs: tuple[str, ...] | list[str]) -> PreparedData | Mixture:
    """The datasets `--data` names (PATH or PATH:WEIGHT): one as it is, several as a Mixture."""
    parsed = [parse_weighted(spec) for spec in specs]
    if len(parsed) == 1 and parsed[0][1] == 1.0:
        return PreparedData(parsed[0][0])
    return Mixture([(PreparedData(path), weight) for path, weight in parsed])
