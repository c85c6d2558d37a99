"""A prepared dataset as the loader reads it: the manifest, and the index as compact columns.

    data = PreparedData("OUT")                         # batches of pixels
    data = PreparedData("OUT", latents=fingerprint)    # the cached latents of that VAE
    data = PreparedData("s3://bucket/OUT", cache=NodeCache("/local/cache", 50 * 2**30))
    data = PreparedData("OUT", text=fingerprint)       # each caption's cached text entry

The index is mapped from the node's cache (trainer/index_map.py): the processes of a node share
one copy. Shards of a local OUT are read in place, a remote one's through the cache
(trainer/storage.py).

`Dataset` is what the sampler and the workers rely on; `PreparedData` is one prepared dataset,
`trainer.mixture.Mixture` several with weights. Which latents a dataset serves is chosen when
it is opened (`latents_to_use` says which), never switched on later; so is its text cache
(trainer/text_cache.py's `text_cache_to_use`), looked up in the trainer's process alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.config import IMAGE_EXTENSIONS
from pipeline.errors import UsageError
from pipeline.format import Manifest, OutputDir
from trainer.index_map import MappedIndex, column, shard_names
from trainer.storage import DatasetFiles, FileRef, NodeCache, is_remote
from trainer.text_cache import TextEntries, TextEntry


@dataclass(frozen=True)
class Latents:
    """Where each sample's cached latents lie: the VAE's entry in the manifest (its
    `fingerprint`, `factor`, `scaling_factor`, ...), and per sample a file code into `paths`,
    a byte offset and a size."""

    info: dict
    paths: list[FileRef]
    shard: np.ndarray  # (N,) int
    offset: np.ndarray  # (N,) int64
    size: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class Columns:
    """What the sampler and the workers read of each sample, as NumPy columns over the items.
    Pairs are (width, height)."""

    bucket: np.ndarray  # (N,) bucket id, into the dataset's `buckets`
    shard_paths: list[FileRef]
    shard: np.ndarray  # (N,) file code into shard_paths
    image_offset: np.ndarray  # (N,) int64: where the image's bytes start in its tar
    image_size: np.ndarray  # (N,) int64
    original: np.ndarray  # (N, 2): the source's size after EXIF orientation
    stored: np.ndarray  # (N, 2): the stored image's
    prepare_crop: np.ndarray  # (N, 2): its (left, top) in its fitted source (--crop), else 0
    latents: Latents | None  # cached latents of the VAE chosen when opened; None: pixels


class Dataset(Protocol):
    """What the loader reads: one prepared dataset or a mixture of several."""

    root: str
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

    def text_entries(
        self, items: np.ndarray, seed: int, epoch: int
    ) -> tuple[list[TextEntry], TextEntry] | None:
        """The items' cached text entries and the empty caption's; None without a text cache."""
        ...


def dataset_uri(root: str | Path) -> str:
    """A --data as the cache names it: a URI as given, a local path made absolute."""
    return str(root) if is_remote(str(root)) else str(Path(root).resolve())


def read_manifest(root: str | Path) -> Manifest:
    """OUT's manifest; a UsageError saying what to do where there is none."""
    uri = dataset_uri(root)
    try:
        manifest = Manifest.read(OutputDir(uri))
    except OSError as error:  # a store that cannot be reached, a bucket that does not exist
        raise UsageError(f"--data {root}: cannot be read: {error}") from error
    if manifest is None:
        raise not_prepared(root)
    return manifest


def not_prepared(given: str | Path) -> UsageError:
    """What to do about a --data that holds no manifest.json: nothing there, a preparation that
    did not finish, or images that were never prepared."""
    run = "python jobs/prepare.py --input IMAGES --output OUT"
    if is_remote(str(given)):
        return UsageError(
            f"--data {given}: no manifest.json there (it is written last): give the --output "
            f"of `{run}`; if that run did not finish, rerun it: it keeps the finished shards"
        )
    root = Path(given)
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
    return UsageError(
        f"--data {root} is not a prepared dataset (no manifest.json): give the OUT of `{run}`"
    )


def latents_to_use(choice: str, fingerprint: str | None, manifests: list[Manifest]) -> str | None:
    """The VAE fingerprint whose cached latents to train from, as --latents `choice` says
    (auto: when every dataset holds them; on: required; off: never), None for pixels."""
    if choice == "off" or (fingerprint is None and choice == "auto"):
        return None
    if fingerprint is None:
        raise UsageError("--latents on: this model has no VAE (give --pretrained with a vae/)")
    held = all(fingerprint in manifest.latents for manifest in manifests)
    return fingerprint if choice == "on" or held else None


class PreparedData:
    """One prepared dataset: its manifest, buckets and index columns (views of the node's map
    of its index). `cache`: where remote shards and the index maps go (None: the default
    folder, `storage.default_cache_dir`)."""

    def __init__(
        self,
        root: str | Path,
        latents: str | None = None,
        cache: NodeCache | None = None,
        text: str | None = None,
    ):
        self.root, self._arguments = str(root), (root, latents, cache)
        self.manifest = read_manifest(root)
        settled = json.dumps(dataclasses.asdict(self.manifest), sort_keys=True).encode()
        version = hashlib.sha256(settled).hexdigest()[:12]
        self.files = DatasetFiles(dataset_uri(root), cache, version)
        self.buckets = np.array(self.manifest.buckets, dtype=np.int64)
        try:
            self.files.cache_folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"the index maps go to {self.files.cache_folder}, which cannot be "
                f"made ({error.strerror}): give --cache-dir a folder of this "
                "node's disk"
            ) from error
        self.index = MappedIndex(self.files)
        index = self.index
        self.columns = Columns(
            bucket=index.column("bucket"),
            shard_paths=[FileRef(self.files, name) for name in index.shards],
            shard=index.column("shard"),
            image_offset=index.column("image_offset"),
            image_size=index.column("image_size"),
            original=index.pairs("original"),
            stored=index.pairs("stored"),
            prepare_crop=index.pairs("prepare_crop"),
            latents=None if latents is None else self._latents(latents),
        )
        self.text = None if text is None else self._text(text)

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
        table = self.index.latents(self.files, entry["path"], fingerprint)
        paths = [FileRef(self.files, name) for name in shard_names(table)]
        return Latents(
            entry | {"fingerprint": fingerprint},
            paths,
            column(table, "latent_shard"),
            column(table, "latent_offset"),
            column(table, "latent_size"),
        )

    def _text(self, fingerprint: str) -> TextEntries:
        """The text cache `fingerprint`'s entries; a UsageError where the dataset lacks it."""
        entry = self.manifest.text.get(fingerprint)
        if entry is None:
            held = ", ".join(self.manifest.text) or "none"
            raise UsageError(
                f"{self.root} holds no text cache {fingerprint} (it holds: {held}): make it with "
                f"arb-prepare --output {self.root} --pretrained CKPT, or give --text-cache off"
            )
        return TextEntries(self.files, entry)

    def __reduce__(self):
        """Opened anew where it is unpickled (a spawned loader worker): the maps are mapped
        again, not copied through the pickle; without its text cache, which only the sampler
        looks up (a worker gets each entry's place in its `BatchPlan`)."""
        return PreparedData, self._arguments

    def __len__(self) -> int:
        return len(self.index)

    def keys(self, items: np.ndarray) -> list[str]:
        return self.index.strings("key", items)

    def captions(self, items: np.ndarray) -> list[str]:
        return [c or "" for c in self.index.strings("caption", items)]

    def epoch_items(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Every image once."""
        return np.arange(len(self), dtype=np.int64), np.zeros(len(self), dtype=np.int64)

    def text_entries(
        self, items: np.ndarray, seed: int, epoch: int
    ) -> tuple[list[TextEntry], TextEntry] | None:
        if self.text is None:
            return None
        entries = self.text.entries(self.captions(items), self.keys(items), seed, epoch)
        return entries, self.text.empty()
