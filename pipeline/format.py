"""The prepared dataset's format, in one place: what the job writes and the trainer reads.

docs/format.md describes it for users; tests/test_format.py keeps the two in step (every
schema's columns and types, the version). Writers (shard_writer, latents, prepare) and readers
(the trainer) take the layout, the schemas and the tar conventions from here. It imports
pyarrow alone, no stage, so a training process that reads a dataset loads neither libvips,
Ray, torch nor webdataset (tests/test_purity.py).

    OUT/config.json        settings that shape the output; written first, checked on reruns
    OUT/shards/NAME.tar    one bucket per tar, WebDataset samples
    OUT/parts/NAME.parquet index rows (and write-time rejections) of one finished shard
    OUT/index.parquet      every kept image, with byte offsets into its tar
    OUT/rejects.parquet    every rejected file with its reason
    OUT/stats.json, OUT/buckets.png, OUT/report.html
    OUT/latents/FINGERPRINT/{NAME.tar, parts/NAME.parquet, index.parquet, vae.json}
    OUT/text/FINGERPRINT/{NAME.tar, parts/NAME.parquet, index.parquet, text.json}
    OUT/manifest.json      written last: its presence marks a complete dataset

A shard, of images or of latents, is finished when its tar has its final name: its writer
writes the tar and its part under temporary names, renames the part, and renames the tar last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import tarfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import numpy as np

# 2: the index's note and crop columns, a caption member for every sample; 3: its source_row;
# 4: its dhash
FORMAT_VERSION = 4
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4)  # what the trainer's loader reads (it uses no newer column)
TEMPORARY_MARK = ".tmp-"

# Tar members: fixed mtime, owner and mode, so the same samples give byte-identical tars.
TAR_MTIME = 0
TAR_OWNER = "arb"
TAR_MODE = 0o444

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("source_row", pa.int64()),  # the row of an input Parquet file; null for other sources
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("content_hash", pa.string()),  # xxh3-128 of the file's bytes; null: --no-dedup
        ("dhash", pa.uint64()),  # perceptual hash (perceptual.py); null: no --near-dedup
        ("width", pa.int32()),  # source size after EXIF orientation
        ("height", pa.int32()),
        ("bucket", pa.int32()),
        ("bucket_width", pa.int32()),
        ("bucket_height", pa.int32()),
        ("aspect_error", pa.float64()),
        ("stored_width", pa.int32()),
        ("stored_height", pa.int32()),
        ("crop_left", pa.int32()),  # where the stored image lies in the fitted one (--crop)
        ("crop_top", pa.int32()),
        ("shard", pa.string()),  # path of the tar relative to OUT
        ("caption", pa.string()),
        ("image_offset", pa.int64()),  # byte offset of the member's data inside the tar
        ("image_size", pa.int64()),
        ("json_offset", pa.int64()),
        ("json_size", pa.int64()),
        ("txt_offset", pa.int64()),  # the caption member: empty when the image has none
        ("txt_size", pa.int64()),
        ("note", pa.string()),  # metadata ignored while reading the image, and why
    ]
)
PART_SCHEMA = pa.schema(
    [
        *INDEX_SCHEMA,
        ("reject", pa.string()),  # set on write-time rejections, which have no members
        ("message", pa.string()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("reason", pa.string()),  # a pipeline.rejects.Reason's value
        ("message", pa.string()),  # for people, with the numbers
        ("key", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
    ]
)
LATENT_INDEX_SCHEMA = pa.schema(  # a latent shard's part, and the latents' index.parquet
    [
        ("key", pa.string()),
        ("latent_shard", pa.string()),  # path of the latent tar relative to OUT
        ("latent_offset", pa.int64()),  # where the float16 data starts (after the .npy header)
        ("latent_size", pa.int64()),
        ("latent_channels", pa.int32()),
        ("latent_height", pa.int32()),  # in latents: stored height // factor
        ("latent_width", pa.int32()),
    ]
)
TEXT_INDEX_SCHEMA = pa.schema(  # a text shard's part, and the text cache's index.parquet
    [
        ("caption_digest", pa.string()),  # caption_digest(the image's caption)
        ("variant", pa.int32()),  # 0..N-1 (--caption-variants N); 0 alone with N = 0
        ("text", pa.string()),  # what was encoded: the caption, or its variant
        ("text_shard", pa.string()),  # path of the text tar relative to OUT
        ("text_offset", pa.int64()),  # where the member's safetensors bytes start
        ("text_size", pa.int64()),
        ("tokens", pa.int32()),  # the text's real tokens (T5's incl. </s>; CLIP's without ends)
        ("sequence_length", pa.int32()),  # rows stored of the main sequence (context or t5)
    ]
)
JSON_MEMBER_FIELDS = (
    "source",
    "width",
    "height",
    "bucket",
    "bucket_width",
    "bucket_height",
    "stored_width",
    "stored_height",
)

# The index columns the trainer's loader reads (lists: pyarrow's read_table takes no tuple).
INDEX_COLUMNS = [
    "key",
    "shard",
    "image_offset",
    "image_size",
    "caption",
    "bucket",
    "width",
    "height",
    "stored_width",
    "stored_height",
]
CROP_COLUMNS = ["crop_left", "crop_top"]  # format 2: where --crop cut the stored image


def split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a path or URL and the path inside it, without a trailing slash."""
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return filesystem, path.rstrip("/")


def shard_path(name: str) -> str:
    """Shard `name`'s tar relative to OUT, as the index and the manifest name it."""
    return f"shards/{name}.tar"


def latents_folder(fingerprint: str) -> str:
    """The folder of one VAE's latents relative to OUT, as vae.json and the manifest name it."""
    return f"latents/{fingerprint}"


def text_folder(fingerprint: str) -> str:
    """The folder of one text cache relative to OUT, as text.json and the manifest name it."""
    return f"text/{fingerprint}"


# The text cache's recipes (pipeline/text_cache.py writes them, trainer/text_cache.py reads
# them): the subfolders of a diffusers checkpoint each family's recipe reads, the fixed
# settings of the chunked CLIP recipes (sd, sdxl), and the T5 recipes' default length.
FAMILY_PARTS = {
    "sd": ("text_encoder", "tokenizer"),
    "sdxl": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "sd3": (
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    ),
    "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
CHUNKED = {"max_tokens": 225, "clip_skip": 2, "layout": "full"}
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # T5 tokens: diffusers' pipelines' defaults
FAMILY_PIPELINES = {  # each family's diffusers pipeline: a checkpoint's model_index.json class
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


def checkpoint_family(folder) -> str | None:
    """The family whose pipeline a local checkpoint folder's model_index.json names; None
    without one, or for a pipeline of no family here."""
    from pathlib import Path

    index = Path(folder) / "model_index.json"
    if not index.exists():
        return None
    named = json.loads(index.read_text()).get("_class_name")
    return next((family for family, kind in FAMILY_PIPELINES.items() if kind == named), None)


def caption_digest(caption: str | None) -> str:
    """32 hex digits of a caption's UTF-8 text (None, no caption, is the empty caption): how
    the text cache's index.parquet finds a caption (`caption_digest` column)."""
    return hashlib.blake2b((caption or "").encode(), digest_size=16).hexdigest()


def pick_variant(seed: int, epoch: int, key: str, variants: int) -> int:
    """Which of a caption's `variants` cached variants (text cache, --caption-variants N) the
    trainer uses for image `key` in `epoch`: every variant once in each run of `variants`
    epochs, in an order shuffled per (seed, key, run). Deterministic in its arguments; 0 when
    there is one variant (or none: variants 0 means the caption alone)."""
    if variants <= 1:
        return 0
    run, place = divmod(epoch, variants)
    digest = hashlib.blake2b(f"variant:{seed}:{key}:{run}".encode(), digest_size=8).digest()
    order = list(range(variants))
    random.Random(int.from_bytes(digest, "little")).shuffle(order)
    return order[place]


def text_fingerprint(folder: str, parts: Iterable[str], settings: dict) -> str:
    """16 hex digits of a text cache's recipe `settings` and the bytes of every file in the
    checkpoint `folder`'s `parts` (its text_encoder*/ and tokenizer*/ subfolders): the same
    weights, tokenizers and settings, the same name. Files are hashed, not loaded: the driver
    and the trainer compute it without torch (a renamed or re-saved file makes a new one)."""
    from pathlib import Path

    digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8)
    root = Path(folder)
    for part in sorted(parts):
        for path in sorted(p for p in (root / part).rglob("*") if p.is_file()):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            with open(path, "rb") as stream:
                while chunk := stream.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()


def is_jpeg(data: bytes) -> bool:
    """Whether an encoded image is a JPEG (its start-of-image marker): readers decode those
    with libjpeg-turbo."""
    return data[:2] == b"\xff\xd8"


def write_tar(
    stream: BinaryIO, samples: Iterable[tuple[str, dict[str, bytes | np.ndarray]]]
) -> dict[str, tuple[int, int]]:
    """(key, {extension: bytes or a 1-D uint8 array}) samples as members KEY.EXTENSION, in the
    order given, extensions sorted (WebDataset's TarWriter's layout), with TAR_MTIME,
    TAR_OWNER, TAR_MODE.
    Returns each member's (data offset, size), known as it is written: the tar is never read
    back (on an object store that was a ranged read per member)."""
    offsets = {}
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for key, members in samples:
            for extension in sorted(members):
                data = members[extension]
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
                info.uname = info.gname = TAR_OWNER
                tar.addfile(info, io.BytesIO(data))
                padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                offsets[info.name] = (tar.offset - padded, len(data))  # after its header(s)
    return offsets


@dataclass(frozen=True)
class OutputDir:
    """OUT: where each file of the layout lies, and writes into it that are atomic."""

    uri: str

    @cached_property
    def _split(self) -> tuple[pafs.FileSystem, str]:
        return split_uri(self.uri)

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._split[0]

    @property
    def root(self) -> str:
        """OUT's path inside its filesystem."""
        return self._split[1]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def shard(self, name: str) -> str:
        return self.path(shard_path(name))

    def part(self, name: str) -> str:
        return self.path("parts", f"{name}.parquet")

    def latent_shard(self, folder: str, name: str) -> str:
        """Image shard `name`'s latents in `folder` (`latents_folder`)."""
        return self.path(folder, f"{name}.tar")

    def latent_part(self, folder: str, name: str) -> str:
        return self.path(folder, "parts", f"{name}.parquet")

    def delete_temporaries_in(self, folder: str) -> None:
        """Leftovers of killed workers in `folder` (a latents or text folder) and its parts/."""
        filesystem = self.filesystem
        for where in (self.path(folder), self.path(folder, "parts")):
            for info in filesystem.get_file_info(pafs.FileSelector(where, allow_not_found=True)):
                if TEMPORARY_MARK in info.base_name and info.type == pafs.FileType.File:
                    filesystem.delete_file(info.path)

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type == pafs.FileType.File

    def make_dirs(self) -> None:
        for folder in ("shards", "parts"):
            self.filesystem.create_dir(self.path(folder), recursive=True)

    def temporary(self, path: str) -> str:
        """A unique name beside `path`: attempts of the same shard never share one."""
        return f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"

    def commit(self, temporary: str, path: str) -> None:
        self.filesystem.move(temporary, path)

    def write_bytes(self, path: str, data: bytes) -> None:
        temporary = self.temporary(path)
        with self.filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        self.commit(temporary, path)

    def write_json(self, path: str, value: object) -> None:
        self.write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, path: str) -> object | None:
        if not self.exists(path):
            return None
        with self.filesystem.open_input_file(path) as stream:
            return json.loads(stream.readall())

    def write_table(self, path: str, table: pa.Table) -> None:
        temporary = self.temporary(path)
        pq.write_table(table, temporary, filesystem=self.filesystem)
        self.commit(temporary, path)

    def write_shard(
        self,
        tar_path: str,
        part_path: str,
        samples: Iterable[tuple[str, dict[str, bytes]]],
        part_of: Callable[[dict[str, tuple[int, int]]], pa.Table],
    ) -> None:
        """A tar of `samples` (`write_tar`) and its part, the table `part_of` makes from the
        tar's members (name -> (data offset, size)): part renamed first, tar last, so the shard
        is finished once its tar has its final name."""
        temporary = self.temporary(tar_path)
        with self.filesystem.open_output_stream(temporary) as stream:
            offsets = write_tar(stream, samples)
        self.write_table(part_path, part_of(offsets))
        self.commit(temporary, tar_path)

    def list_names(self, folder: str, suffix: str) -> list[str]:
        """Stems of the finished files in `folder` ending in `suffix`, temporaries excluded."""
        filesystem = self.filesystem
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        return sorted(
            info.base_name[: -len(suffix)]
            for info in filesystem.get_file_info(selector)
            if info.base_name.endswith(suffix) and TEMPORARY_MARK not in info.base_name
        )

    def list_folders(self, folder: str) -> list[str]:
        """Names of the folders in `folder`."""
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)

    def delete(self, path: str) -> None:
        if self.exists(path):
            self.filesystem.delete_file(path)

    def delete_temporaries(self) -> None:
        """Leftovers of killed workers: never renamed, so never mistaken for finished files."""
        filesystem = self.filesystem
        for folder in (self.path("shards"), self.path("parts"), self.path()):
            for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                if TEMPORARY_MARK in info.base_name and info.type == pafs.FileType.File:
                    filesystem.delete_file(info.path)


@dataclass(frozen=True)
class Manifest:
    """manifest.json, written last by the job and read first by the trainer (docs/format.md)."""

    settings: dict  # as config.json: the settings that shape the output
    buckets: list[list[int]]  # [width, height] per bucket id, ordered by aspect
    counts: dict[str, int]  # images, rejected, shards
    shards: list[str]  # tar paths relative to OUT, in the index's order
    trainer: dict[str, int]  # batch_size, world_size, seed given to the job
    input: dict[str, str]  # uri, fingerprint of every scanned file's key
    # VAE fingerprint -> its latents (pipeline/latents.py): scaling_factor, shift_factor,
    # channels, latents (how many), path (the folder under OUT)
    latents: dict[str, dict] = dataclasses.field(default_factory=dict)
    # text fingerprint -> its text cache (pipeline/text_cache.py): text.json less the fingerprint
    text: dict[str, dict] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def write(self, out: OutputDir) -> None:
        out.write_json(out.path("manifest.json"), dataclasses.asdict(self))

    @classmethod
    def read(cls, out: OutputDir) -> Manifest | None:
        """OUT's manifest; None when OUT is not complete; ValueError for a version unknown."""
        fields = out.read_json(out.path("manifest.json"))
        if fields is None:
            return None
        if fields.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"{out.uri}: format version {fields.get('format_version')} unknown")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in fields.items() if name in names})


def vae_fingerprint(vae) -> str:
    """16 hex digits of a VAE's config and weights: the same VAE, the same name, anywhere, so
    the latents' folder and the trainer's check agree. `vae` is any torch module with a
    `config` (diffusers' AutoencoderKL); torch is imported here only, by whoever has one."""
    import torch

    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
