"""The prepare job reading its input from an object store: a real S3-protocol server (moto's,
on 127.0.0.1), the input tree's folders listed by tasks, headers read by ranged reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SMALL_BUCKETS, ray_started
from images import datasets_parquet, rgb

import pipeline.prepare as prepare_module
from pipeline.config import PrepareConfig
from pipeline.inputs import resolve_input
from pipeline.prepare import run
from pipeline.sources import list_input

FOLDERS = ["", "a", *[f"a/{name}" for name in "bcdef"], "a/b/deeper"]


@pytest.fixture(scope="module")
def bucket_uri(s3_server):
    """s3://inputs/tree on the moto server (the endpoint in the URI, the credentials in the
    environment, as users give them), and a local Ray started after them."""
    client = s3_server.client
    client.create_bucket(Bucket="inputs")
    for i, folder in enumerate(FOLDERS):
        prefix = f"tree/{folder}/".replace("//", "/")
        data = io.BytesIO()
        rgb(96 + i, 64, i).save(data, "JPEG", quality=90)
        client.put_object(Bucket="inputs", Key=f"{prefix}img{i}.jpg", Body=data.getvalue())
        client.put_object(Bucket="inputs", Key=f"{prefix}img{i}.txt", Body=f"caption {i}".encode())
    client.put_object(Bucket="inputs", Key="tree/a/c/notes.md", Body=b"not an image")
    with ray_started():
        yield s3_server.uri("inputs", "tree")


def test_the_folders_of_a_prefix_are_listed_by_tasks_as_one_process_lists_them(bucket_uri):
    source = resolve_input(bucket_uri)
    listed = prepare_module._list(source, PrepareConfig(input=bucket_uri, output="unused"))
    assert listed.equals(list_input(source))
    sources = listed["source"].to_pylist()
    assert sorted(sources) == sources
    assert len(sources) == len(FOLDERS) + 1  # the images (sidecars join their rows), the stray
    assert "a/b/deeper/img7.jpg" in sources


def test_the_job_prepares_an_input_on_an_object_store(bucket_uri, tmp_path):
    output = tmp_path / "out"
    run(PrepareConfig(input=bucket_uri, output=str(output), buckets=SMALL_BUCKETS))
    index = pq.read_table(output / "index.parquet").to_pylist()
    captions = {row["source"]: row["caption"] for row in index}
    assert captions == {
        f"{folder}/img{i}.jpg".lstrip("/"): f"caption {i}" for i, folder in enumerate(FOLDERS)
    }
    rejects = pq.read_table(output / "rejects.parquet").to_pylist()
    assert [(r["source"], r["reason"]) for r in rejects] == [("a/c/notes.md", "unsupported_format")]


def test_webdataset_tars_on_an_object_store_are_read_by_ranges(bucket_uri, s3_server, tmp_path):
    """Tars on S3: the scan streams each once, the fit reads each member by a ranged GET; the
    same samples and captions as from the local folder."""
    import webdataset

    folder = tmp_path / "tars"
    folder.mkdir()
    with webdataset.TarWriter(str(folder / "00000.tar")) as sink:
        for i in range(6):
            data = io.BytesIO()
            rgb(96, 64, 40 + i).save(data, "JPEG", quality=90)
            sink.write({"__key__": f"{i:05d}", "jpg": data.getvalue(), "txt": f"member {i}"})
    uri = s3_server.upload(folder, "tars", "in")
    indexes = {}
    for name, source in (("local", str(folder)), ("s3", uri)):
        run(PrepareConfig(input=source, output=str(tmp_path / name), buckets=SMALL_BUCKETS))
        index = pq.read_table(tmp_path / name / "index.parquet").to_pylist()
        indexes[name] = sorted((r["source"], r["caption"], r["content_hash"]) for r in index)
    assert indexes["s3"] == indexes["local"]
    assert [caption for _, caption, _ in indexes["s3"]] == [f"member {i}" for i in range(6)]


def add_images(folder: Path, shape: str, batch: int) -> list[Path]:
    """Six images of three buckets in `shape` under `folder`, as batch `batch` of a dataset that
    grows: a tar of them, a Parquet file (row groups of 2) or loose files named in the folder's
    metadata.jsonl (which grows). Returns the files written or rewritten."""
    import webdataset

    images = []
    for i in range(6):
        data = io.BytesIO()
        rgb(*[(96, 64), (64, 96), (64, 64)][i % 3], 10 * batch + i).save(data, "JPEG")
        images.append((f"{batch}-{i}", data.getvalue(), f"batch {batch} image {i}"))
    if shape == "tars":
        with webdataset.TarWriter(str(folder / f"{batch:05d}.tar")) as sink:
            for key, data, caption in images:
                sink.write({"__key__": key, "jpg": data, "txt": caption})
        return [folder / f"{batch:05d}.tar"]
    if shape == "parquet":
        path = folder / f"train-{batch:05d}.parquet"
        captions = [caption for _, _, caption in images]
        return [datasets_parquet(path, [data for _, data, _ in images], captions, 2)]
    with open(folder / "metadata.jsonl", "a") as lines:
        for key, data, caption in images:
            (folder / f"{key}.jpg").write_bytes(data)
            lines.write(json.dumps({"file_name": f"{key}.jpg", "text": caption}) + "\n")
    return [folder / f"{key}.jpg" for key, _, _ in images] + [folder / "metadata.jsonl"]


@pytest.mark.parametrize("shape", ["tars", "parquet", "jsonl"])
def test_every_input_shape_on_an_object_store_resumes_and_grows_incrementally(
    bucket_uri, s3_server, tmp_path, shape
):
    """Tars, Parquet files of image bytes and a metadata.jsonl folder, read from S3: captions
    kept; a run killed after some shards resumes to the same dataset without refitting them;
    an incremental run over a grown input keeps every earlier shard and key."""
    folder, output = tmp_path / "input", tmp_path / "out"
    folder.mkdir()
    bucket = f"shape-{shape}"
    s3_server.client.create_bucket(Bucket=bucket)

    def upload(paths: list[Path]) -> None:  # only these: an object's mtime is its upload's
        for path in paths:
            key = f"in/{path.name}"
            s3_server.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())

    def prepare(**options) -> dict:
        run(
            PrepareConfig(
                input=s3_server.uri(bucket, "in"),
                output=str(output),
                buckets=SMALL_BUCKETS,
                samples_per_shard=2,
                **options,
            )
        )
        index = pq.read_table(output / "index.parquet").to_pylist()
        return {row["key"]: (row["caption"], row["shard"]) for row in index}

    upload(add_images(folder, shape, 0))
    first = prepare()
    assert sorted(caption for caption, _ in first.values()) == [
        f"batch 0 image {i}" for i in range(6)
    ]
    shards = sorted({shard for _, shard in first.values()})
    assert len(shards) == 3, "two images of each bucket a shard"
    # killed after one shard: no manifest, no index, the other shards missing
    (output / "manifest.json").unlink()
    (output / "index.parquet").unlink()
    for shard in shards[1:]:
        (output / shard).unlink()
    finished = (output / shards[0]).stat().st_mtime_ns
    assert prepare() == first
    assert (output / shards[0]).stat().st_mtime_ns == finished, "a finished shard is not redone"
    upload(add_images(folder, shape, 1))
    grown = prepare(incremental=True)
    assert grown.items() >= first.items(), "every earlier image keeps its key and shard"
    assert len(grown) == 12
