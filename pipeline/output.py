"""The prepared dataset's layout on disk (docs/format.md describes it for users).

    OUT/config.json        settings that shape the output; written first, checked on reruns
    OUT/shards/NAME.tar    one bucket per tar, WebDataset samples
    OUT/parts/NAME.parquet index rows (and write-time rejections) of one finished shard
    OUT/index.parquet      every kept image, with byte offsets into its tar
    OUT/rejects.parquet    every rejected file with its reason
    OUT/stats.json, OUT/buckets.png
    OUT/manifest.json      written last: its presence marks a complete dataset

A shard is finished when its tar has its final name: a worker writes the tar and its part
under temporary names, renames the part, and renames the tar last.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sources import split_uri

FORMAT_VERSION = 2  # 2: the index's note and crop columns; a caption member for every sample
READABLE_FORMAT_VERSIONS = (1, 2)  # what the trainer's loader reads (it uses no newer column)
TEMPORARY_MARK = ".tmp-"


@dataclass(frozen=True)
class OutputDir:
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
        return self.path("shards", f"{name}.tar")

    def part(self, name: str) -> str:
        return self.path("parts", f"{name}.parquet")

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
