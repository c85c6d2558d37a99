"""The index as every rank and loader worker of a node reads it: converted once per node from
`index.parquet` into uncompressed Arrow IPC files in the cache, then memory-mapped. The columns
are views of the map, so the processes of a node share one copy in the page cache where reading
the Parquet file held one each (1M rows with tag captions: ~1 GB a process; bench/remote_bench.py).

    numbers.arrow  one record batch: bucket, shard (a code into the schema's `shards`),
                   image_offset, image_size, and (width, height) pairs as fixed-size lists:
                   original, stored, prepare_crop
    text.arrow     key, caption (large strings), a record batch per Parquet row group
    latents-FINGERPRINT.arrow   latent_shard (a code into `shards`), latent_offset, latent_size

A conversion runs under a lock and is renamed into place whole (trainer/storage.py), so the
first process of a node converts and the others wait and map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.format import CROP_COLUMNS
from trainer.storage import LOCK_SUFFIX, DatasetFiles, locked, write_atomically

PAIRS = {
    "original": ("width", "height"),
    "stored": ("stored_width", "stored_height"),
    "prepare_crop": tuple(CROP_COLUMNS),
}
TEXT_COLUMNS = ["key", "caption"]


def _mapped(path: Path, build) -> pa.Table:
    """The IPC file at `path` (made by `build(temporary path)` if it is not there), mapped."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_name(path.name + LOCK_SUFFIX)):
            if not path.exists():
                write_atomically(path, build)
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _write_one_batch(table: pa.Table, shards: list[str], to: Path) -> None:
    schema = table.schema.with_metadata({"shards": json.dumps(shards)})
    with pa.OSFile(str(to), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table.combine_chunks().replace_schema_metadata(schema.metadata))


def _codes(column: pa.ChunkedArray) -> tuple[pa.Array, list[str]]:
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices, encoded.dictionary.to_pylist()


class MappedIndex:
    """One dataset's index, mapped: NumPy views of its numbers, strings read when asked."""

    def __init__(self, files: DatasetFiles):
        folder = files.cache_folder
        self.numbers = _mapped(folder / "numbers.arrow", lambda to: self._numbers(files, to))
        self.text = _mapped(folder / "text.arrow", lambda to: self._text(files, to))
        self.shards = shard_names(self.numbers)
        lengths = [len(chunk) for chunk in self.text["key"].chunks]
        self._starts = np.concatenate(([0], np.cumsum(lengths)))

    @staticmethod
    def _numbers(files: DatasetFiles, to: Path) -> None:
        parquet = files.parquet("index.parquet")
        cropped = set(CROP_COLUMNS) <= set(parquet.schema_arrow.names)
        needed = [
            "bucket",
            "shard",
            "image_offset",
            "image_size",
            "width",
            "height",
            "stored_width",
            "stored_height",
        ] + CROP_COLUMNS * cropped
        index = parquet.read(columns=needed)
        codes, shards = _codes(index["shard"])
        columns = {
            name: index[name].combine_chunks() for name in ("bucket", "image_offset", "image_size")
        }
        columns["shard"] = codes
        for name, (first, second) in PAIRS.items():
            if first in index.column_names:
                pair = np.stack([index[first].to_numpy(), index[second].to_numpy()], axis=1)
            else:  # format 1: no crop columns, every crop at (0, 0)
                pair = np.zeros((len(index), 2), dtype=np.int32)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(pair.ravel()), 2)
        _write_one_batch(pa.table(columns), shards, to)

    @staticmethod
    def _text(files: DatasetFiles, to: Path) -> None:
        parquet = files.parquet("index.parquet")
        schema = pa.schema([(name, pa.large_string()) for name in TEXT_COLUMNS])
        with pa.OSFile(str(to), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for group in range(parquet.num_row_groups):  # bounded memory: a row group at a time
                table = parquet.read_row_group(group, columns=TEXT_COLUMNS)
                writer.write_table(table.cast(schema))

    def __len__(self) -> int:
        return self.numbers.num_rows

    def column(self, name: str) -> np.ndarray:
        """A number column, a view of the map."""
        return column(self.numbers, name)

    def pairs(self, name: str) -> np.ndarray:
        """(N, 2) pairs (`PAIRS`), a view of the map."""
        chunks = self.numbers[name].chunks
        if not chunks:
            return np.zeros((0, 2), dtype=np.int32)
        return chunks[0].values.to_numpy(zero_copy_only=True).reshape(-1, 2)

    def strings(self, name: str, items: np.ndarray) -> list[str | None]:
        """Column `name` of text.arrow at `items`: a few rows read from the map."""
        chunks = self.text[name].chunks
        which = np.searchsorted(self._starts, items, side="right") - 1
        starts = self._starts
        return [chunks[c][int(i - starts[c])].as_py() for c, i in zip(which, items, strict=True)]

    def latents(self, files: DatasetFiles, folder: str, fingerprint: str) -> pa.Table:
        """The latents' columns of the VAE `fingerprint` (their index in `folder`), mapped;
        a ValueError if their keys are not the index's."""

        def build(to: Path) -> None:
            table = files.parquet(f"{folder}/index.parquet").read()
            keys = self.text["key"]
            if table["key"].cast(pa.large_string()) != keys:
                raise ValueError(f"{files.uri}: latents of {fingerprint} do not match the index")
            codes, shards = _codes(table["latent_shard"])
            columns = {
                "latent_shard": codes,
                "latent_offset": table["latent_offset"],
                "latent_size": table["latent_size"],
            }
            _write_one_batch(pa.table(columns), shards, to)

        return _mapped(files.cache_folder / f"latents-{fingerprint}.arrow", build)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A number column of a one-batch mapped table, a view of the map."""
    chunks = table[name].chunks
    if not chunks:  # no rows: no batch
        return np.zeros(0, dtype=table.schema.field(name).type.to_pandas_dtype())
    return chunks[0].to_numpy(zero_copy_only=True)


def shard_names(table: pa.Table) -> list[str]:
    """The shard paths a mapped table's codes point into (relative to the dataset's root)."""
    return json.loads(table.schema.metadata[b"shards"])
