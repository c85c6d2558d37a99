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

import json
import uuid
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sources import split_uri

FORMAT_VERSION = 2  # 2: the index's note column; a caption member for every sample
READABLE_FORMAT_VERSIONS = (1, 2)  # what the trainer's loader reads (it uses no newer column)
TEMPORARY_MARK = ".tmp-"


@dataclass(frozen=True)
class OutputDir:
    uri: str

    @cached_property
    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        return split_uri(self.uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.filesystem[1], *parts])

    def shard(self, name: str) -> str:
        return self.path("shards", f"{name}.tar")

    def part(self, name: str) -> str:
        return self.path("parts", f"{name}.parquet")

    def exists(self, path: str) -> bool:
        return self.filesystem[0].get_file_info(path).type == pafs.FileType.File

    def make_dirs(self) -> None:
        for folder in ("shards", "parts"):
            self.filesystem[0].create_dir(self.path(folder), recursive=True)

    def temporary(self, path: str) -> str:
        """A unique name beside `path`: attempts of the same shard never share one."""
        return f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"

    def commit(self, temporary: str, path: str) -> None:
        self.filesystem[0].move(temporary, path)

    def write_bytes(self, path: str, data: bytes) -> None:
        temporary = self.temporary(path)
        with self.filesystem[0].open_output_stream(temporary) as stream:
            stream.write(data)
        self.commit(temporary, path)

    def write_json(self, path: str, value: object) -> None:
        self.write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, path: str) -> object | None:
        if not self.exists(path):
            return None
        with self.filesystem[0].open_input_file(path) as stream:
            return json.loads(stream.readall())

    def write_table(self, path: str, table: pa.Table) -> None:
        temporary = self.temporary(path)
        pq.write_table(table, temporary, filesystem=self.filesystem[0])
        self.commit(temporary, path)

    def list_names(self, folder: str, suffix: str) -> list[str]:
        """Stems of the finished files in `folder` ending in `suffix`, temporaries excluded."""
        filesystem = self.filesystem[0]
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        return sorted(
            info.base_name[: -len(suffix)]
            for info in filesystem.get_file_info(selector)
            if info.base_name.endswith(suffix) and TEMPORARY_MARK not in info.base_name
        )

    def delete(self, path: str) -> None:
        if self.exists(path):
            self.filesystem[0].delete_file(path)

    def delete_temporaries(self) -> None:
        """Leftovers of killed workers: never renamed, so never mistaken for finished files."""
        filesystem = self.filesystem[0]
        for folder in (self.path("shards"), self.path("parts"), self.path()):
            for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                if TEMPORARY_MARK in info.base_name and info.type == pafs.FileType.File:
                    filesystem.delete_file(info.path)
