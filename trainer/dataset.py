"""A prepared dataset as the loader reads it: the manifest, and the index as compact columns.

    data = PreparedData("OUT")                         # batches of pixels
    data = PreparedData("OUT", latents=fingerprint)    # the cached latents of that VAE

`Dataset` is what the sampler and the workers rely on; `PreparedData` is one prepared dataset,
`trainer.mixture.Mixture` several with weights. Which latents a dataset serves is chosen when
it is opened (`latents_to_use` says which), never switched on later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import IMAGE_EXTENSIONS
from pipeline.errors import UsageError
from pipeline.format import CROP_COLUMNS, INDEX_COLUMNS, Manifest, OutputDir


@dataclass(frozen=True)
class Latents:
    """Where each sample's cached latents lie: the VAE's entry in the manifest (its
    `fingerprint`, `factor`, `scaling_factor`, ...), and per sample a file code into `paths`,
    a byte offset and a size."""

    info: dict
    paths: list[Path]
    shard: np.ndarray  # (N,) int
    offset: np.ndarray  # (N,) int64
    size: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class Columns:
    """What the sampler and the workers read of each sample, as NumPy columns over the items.
    Pairs are (width, height)."""

    bucket: np.ndarray  # (N,) bucket id, into the dataset's `buckets`
    shard_paths: list[Path]
    shard: np.ndarray  # (N,) file code into shard_paths
    image_offset: np.ndarray  # (N,) int64: where the image's bytes start in its tar
    image_size: np.ndarray  # (N,) int64
    original: np.ndarray  # (N, 2): the source's size after EXIF orientation
    stored: np.ndarray  # (N, 2): the stored image's
    prepare_crop: np.ndarray  # (N, 2): its (left, top) in its fitted source (--crop), else 0
    latents: Latents | None  # cached latents of the VAE chosen when opened; None: pixels


class Dataset(Protocol):
    """What the loader reads: one prepared dataset or a mixture of several."""

    root: Path
    buckets: np.ndarray  # (B, 2) int64: (width, height) of each bucket id, in aspect order
    columns: Columns

    def __len__(self) -> int: ...

    def keys(self, items: np.ndarray) -> list[str]: ...

    def captions(self, items: np.ndarray) -> list[str]:
        """The items' captions, "" where an image has none."""
        ...

    def epoch_items(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, copy numbers) an epoch is planned over, deterministic in (seed, epoch)."""
        ...


def read_manifest(root: str | Path) -> Manifest:
    """OUT's manifest; a UsageError saying what to do where there is none."""
    manifest = Manifest.read(OutputDir(str(Path(root).resolve())))
    if manifest is None:
        raise not_prepared(Path(root))
    return manifest


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


def latents_to_use(choice: str, fingerprint: str | None, manifests: list[Manifest]) -> str | None:
    """The VAE fingerprint whose cached latents to train from, as --latents `choice` says
    (auto: when every dataset holds them; on: required; off: never), None for pixels."""
    if choice == "off" or (fingerprint is None and choice == "auto"):
        return None
    if fingerprint is None:
        raise UsageError("--latents on: this model has no VAE (give --pretrained with a vae/)")
    held = all(fingerprint in manifest.latents for manifest in manifests)
    return fingerprint if choice == "on" or held else None


def _dictionary(column: pa.ChunkedArray, root: Path) -> tuple[np.ndarray, list[Path]]:
    """A column of relative file names as (codes, paths under `root`)."""
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices.to_numpy(), [root / name for name in encoded.dictionary.to_pylist()]


class PreparedData:
    """One prepared dataset: its manifest, buckets and index columns."""

    def __init__(self, root: str | Path, latents: str | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.buckets = np.array(self.manifest.buckets, dtype=np.int64)
        path = self.root / "index.parquet"
        cropped = set(CROP_COLUMNS) <= set(pq.read_schema(path).names)
        self.index = pq.read_table(path, columns=INDEX_COLUMNS + (CROP_COLUMNS * cropped))
        shard, shard_paths = _dictionary(self.index["shard"], self.root)
        stored = self._pairs("stored_width", "stored_height")
        self.columns = Columns(
            bucket=self.index["bucket"].to_numpy(),
            shard_paths=shard_paths,
            shard=shard,
            image_offset=self.index["image_offset"].to_numpy(),
            image_size=self.index["image_size"].to_numpy(),
            original=self._pairs("width", "height"),
            stored=stored,
            prepare_crop=self._pairs(*CROP_COLUMNS) if cropped else np.zeros_like(stored),
            latents=None if latents is None else self._latents(latents),
        )

    def _latents(self, fingerprint: str) -> Latents:
        """Where the latents of the VAE `fingerprint` lie (pipeline/latents.py); a UsageError
        says which VAEs the dataset has latents of."""
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
        shard, paths = _dictionary(table["latent_shard"], self.root)
        offset, size = table["latent_offset"].to_numpy(), table["latent_size"].to_numpy()
        return Latents(entry | {"fingerprint": fingerprint}, paths, shard, offset, size)

    def _pairs(self, first: str, second: str) -> np.ndarray:
        return np.stack([self.index[first].to_numpy(), self.index[second].to_numpy()], axis=1)

    def __len__(self) -> int:
        return len(self.index)

    def keys(self, items: np.ndarray) -> list[str]:
        return self.index["key"].take(items).to_pylist()

    def captions(self, items: np.ndarray) -> list[str]:
        return [c or "" for c in self.index["caption"].take(items).to_pylist()]

    def epoch_items(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Every image once."""
        return np.arange(len(self), dtype=np.int64), np.zeros(len(self), dtype=np.int64)
