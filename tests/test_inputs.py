"""Datasets in the shapes people hold them: JSON caption sidecars, diffusers' metadata.jsonl,
and exact duplicates found by content, kept stably across reruns and incremental runs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_BUCKETS
from images import datasets_parquet, rgb, save
from PIL import Image

from pipeline.config import PrepareConfig
from pipeline.format import FORMAT_VERSION
from pipeline.inputs import resolve_input
from pipeline.prepare import run
from pipeline.readers import read_image
from pipeline.report import summary
from pipeline.sources import LISTING_SCHEMA


def prepare(images: Path, output: Path, **options) -> tuple[dict, dict]:
    """(caption by source of the kept images, (reason, message) by source of the rejected)."""
    run(PrepareConfig(input=str(images), output=str(output), buckets=SMALL_BUCKETS, **options))
    kept = {
        row["source"]: row["caption"] for row in pq.read_table(output / "index.parquet").to_pylist()
    }
    rejected = {
        row["source"]: (row["reason"], row["message"])
        for row in pq.read_table(output / "rejects.parquet").to_pylist()
    }
    return kept, rejected


def test_json_sidecars_and_metadata_jsonl_give_captions(local_ray, tmp_path):
    images = tmp_path / "images"
    for i, name in enumerate(["a", "b", "c", "d", "e", "f"]):
        save(rgb(96, 64, i), images / f"{name}.jpg", quality=90)
    save(rgb(64, 96, 9), images / "sub" / "g.jpg", quality=90)
    (images / "a.json").write_text(json.dumps({"caption": "a cat", "url": "http://x"}))
    (images / "b.json").write_text(json.dumps({"tags": ["1girl", "solo", "smile"]}))
    (images / "c.json").write_text("{not json")
    (images / "d.txt").write_text("from the txt")  # a sidecar wins over metadata.jsonl
    (images / "metadata.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"file_name": "d.jpg", "text": "from metadata"}),
                json.dumps({"file_name": "e.jpg", "text": "e from metadata"}),
                "broken line",
                "",
            ]
        )
    )
    (images / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "g.jpg", "text": "g below"})
    )
    (images / "orphan.json").write_text("{}")
    kept, rejected = prepare(images, tmp_path / "out")
    assert kept == {
        "a.jpg": "a cat",
        "b.jpg": "1girl, solo, smile",
        "d.jpg": "from the txt",
        "e.jpg": "e from metadata",
        "f.jpg": None,
        "sub/g.jpg": "g below",
    }
    assert rejected["c.jpg"][0] == "bad_caption" and "c.json" in rejected["c.jpg"][1]
    assert rejected["metadata.jsonl"][0] == "bad_caption"
    assert "line 3" in rejected["metadata.jsonl"][1]
    assert rejected["orphan.json"][0] == "orphan_caption"
    assert set(kept) | set(rejected) == {
        "a.jpg",
        "b.jpg",
        "c.jpg",
        "d.jpg",
        "e.jpg",
        "f.jpg",
        "sub/g.jpg",
        "metadata.jsonl",
        "orphan.json",
        "d.txt",
    } - {"d.txt"}


def test_the_caption_field_is_chosen(local_ray, tmp_path):
    images = tmp_path / "images"
    save(rgb(96, 64, 0), images / "a.jpg", quality=90)
    (images / "a.json").write_text(json.dumps({"caption": "short", "long_caption": "a long one"}))
    kept, _ = prepare(images, tmp_path / "out", caption_field="long_caption")
    assert kept == {"a.jpg": "a long one"}


def test_exact_duplicates_are_rejected_naming_the_copy_kept(local_ray, tmp_path):
    images = tmp_path / "images"
    for i in range(4):
        save(rgb(96, 64, i), images / f"{i}.jpg", quality=90)
    shutil.copy(images / "1.jpg", images / "1-copy.jpg")
    (images / "sub").mkdir()
    shutil.copy(images / "1.jpg", images / "sub" / "again.jpg")
    shutil.copy(images / "2.jpg", images / "2-reupload.jpg")
    kept, rejected = prepare(images, tmp_path / "out")
    assert sorted(kept) == ["0.jpg", "1-copy.jpg", "2-reupload.jpg", "3.jpg"]  # first by path
    assert rejected == {
        "1.jpg": ("duplicate_content", "the same bytes as 1-copy.jpg, which is kept"),
        "sub/again.jpg": ("duplicate_content", "the same bytes as 1-copy.jpg, which is kept"),
        "2.jpg": ("duplicate_content", "the same bytes as 2-reupload.jpg, which is kept"),
    }
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rejections_by_reason"]["duplicate_content"] == 3
    said = summary(stats, 1, str(tmp_path / "out"))  # the run's summary names the kept copy
    assert "  1.jpg (duplicate_content) " in said and "1-copy.jpg, which is kept\n" in said
    assert "duplicate_content 3" in said
    again = prepare(images, tmp_path / "out", incremental=True)  # the same copies kept
    assert again == (kept, rejected)
    everything, none_rejected = prepare(images, tmp_path / "all", dedup=False)
    assert len(everything) == 7 and not none_rejected


def test_an_incremental_run_keeps_the_copy_out_holds(local_ray, tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        save(rgb(96, 64, i), images / f"b{i}.jpg", quality=90)
    prepare(images, tmp_path / "out")
    shutil.copy(images / "b1.jpg", images / "a-copy.jpg")  # sorts first, but OUT holds b1
    kept, rejected = prepare(images, tmp_path / "out", incremental=True)
    assert sorted(kept) == ["b0.jpg", "b1.jpg", "b2.jpg"]
    assert rejected == {
        "a-copy.jpg": ("duplicate_content", "the same bytes as b1.jpg, which is kept")
    }


@pytest.mark.parametrize("dedup", [True, False])
def test_content_hashes_are_in_the_index(local_ray, tmp_path, dedup):
    images = tmp_path / "images"
    save(rgb(96, 64, 0), images / "a.jpg", quality=90)
    prepare(images, tmp_path / "out", dedup=dedup)
    hashes = pq.read_table(tmp_path / "out" / "index.parquet")["content_hash"].to_pylist()
    if dedup:
        import xxhash

        expected = xxhash.xxh3_128_hexdigest((images / "a.jpg").read_bytes())
        assert hashes == [expected]
    else:
        assert hashes == [None]


def jpeg(width: int, height: int, seed: int) -> bytes:
    data = io.BytesIO()
    rgb(width, height, seed).save(data, "JPEG", quality=90)
    return data.getvalue()


def test_webdataset_tars_are_read_by_member_with_their_captions(local_ray, tmp_path):
    """An img2dataset-shaped folder: tars written by webdataset's TarWriter with jpg, txt and
    json members, beside each its parquet and stats file; a truncated tar, a member that is not
    an image, a sample without one; the same image as a loose file: a duplicate across shapes."""
    import webdataset

    images = tmp_path / "images"
    images.mkdir()
    with webdataset.TarWriter(str(images / "00000.tar")) as sink:
        sink.write(
            {
                "__key__": "000000000",
                "jpg": jpeg(96, 64, 0),
                "txt": "a red square",
                "json": json.dumps({"caption": "ignored: txt wins", "url": "http://x"}),
            }
        )
        sink.write(
            {
                "__key__": "000000001",
                "jpg": jpeg(64, 96, 1),
                "json": json.dumps({"caption": "from the json", "width": 64}),
            }
        )
        sink.write({"__key__": "000000002", "jpg": b"not a jpeg at all", "txt": "broken"})
        sink.write({"__key__": "000000003", "txt": "no image in this sample"})
        sink.write({"__key__": "000000004", "png": png(64, 64)})
    pq.write_table(pa.table({"key": ["000000000"], "caption": ["x"]}), images / "00000.parquet")
    (images / "00000_stats.json").write_text(json.dumps({"count": 5}))
    with webdataset.TarWriter(str(images / "00001.tar")) as sink:
        for i in range(5, 9):
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg(96, 64, i), "txt": f"caption {i}"})
    whole = (images / "00001.tar").read_bytes()
    (images / "00001.tar").write_bytes(whole[: len(whole) * 2 // 3])  # cut inside a member
    (images / "loose.jpg").write_bytes(jpeg(96, 64, 0))  # member 000000000's bytes
    kept, rejected = prepare(images, tmp_path / "out")
    assert kept["00000.tar/000000000.jpg"] == "a red square"
    assert kept["00000.tar/000000001.jpg"] == "from the json"
    assert kept["00000.tar/000000004.png"] is None
    assert {"00001.tar/000000005.jpg", "00001.tar/000000006.jpg"} <= set(kept)
    assert rejected["loose.jpg"] == (
        "duplicate_content",
        "the same bytes as 00000.tar/000000000.jpg, which is kept",
    )
    assert rejected["00000.tar/000000002.jpg"][0] == "not_an_image"
    assert rejected["00000.tar/000000003"][0] == "not_an_image"
    assert rejected["00001.tar"][0] == "corrupt" and "ends early" in rejected["00001.tar"][1]
    assert not any("parquet" in source or "stats" in source for source in rejected)
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    # the stored samples are the members' images, fitted: read one back from its shard
    row = next(r for r in index if r["source"] == "00000.tar/000000001.jpg")
    with open(tmp_path / "out" / row["shard"], "rb") as shard:
        shard.seek(row["image_offset"])
        stored = Image.open(io.BytesIO(shard.read(row["image_size"])))
        assert stored.size == (row["stored_width"], row["stored_height"])
    # keys are stable: a rerun (incremental, nothing new) keeps every shard and key
    again = prepare(images, tmp_path / "out", incremental=True)
    assert again == (kept, rejected)
    assert {r["key"] for r in pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()} == {
        r["key"] for r in index
    }


def png(width: int, height: int) -> bytes:
    data = io.BytesIO()
    rgb(width, height, 3).save(data, "PNG")
    return data.getvalue()


def test_parquet_files_with_image_bytes_as_datasets_writes_them(local_ray, tmp_path):
    """A Hugging Face-style folder: Parquet files whose `image` column holds `{bytes, path}`
    structs (datasets.Image's storage) and a `text` column, small row groups; a row with null
    bytes, a row that is not an image; a duplicate of a loose file; --input one .parquet too."""
    images = tmp_path / "images"
    (images / "data").mkdir(parents=True)
    rows: list[bytes | None] = [jpeg(96, 64, 60 + i) for i in range(5)]
    rows[2], rows[3] = None, b"garbage"
    datasets_parquet(
        images / "data" / "train-00000-of-00001.parquet",
        rows,
        [f"row {i}" for i in range(5)],
        row_group_size=2,
    )
    (images / "loose.jpg").write_bytes(jpeg(96, 64, 64))  # row 4's bytes
    kept, rejected = prepare(images, tmp_path / "out")
    name = "data/train-00000-of-00001.parquet"
    assert kept == {
        f"{name}/000000000": "row 0",
        f"{name}/000000001": "row 1",
        f"{name}/000000004": "row 4",
    }
    assert rejected[f"{name}/000000002"] == ("not_an_image", "a Parquet row without image bytes")
    assert rejected[f"{name}/000000003"][0] == "not_an_image"
    message = f"the same bytes as {name}/000000004, which is kept"
    assert rejected["loose.jpg"] == ("duplicate_content", message)
    # One Parquet file as --input, a binary column under another name
    single = tmp_path / "single.parquet"
    pq.write_table(pa.table({"png_bytes": [png(64, 64)], "caption": ["a png"]}), single)
    kept, rejected = prepare(single, tmp_path / "single-out", image_column="png_bytes")
    assert kept == {"single.parquet/000000000": "a png"} and not rejected
    _, rejected = prepare(single, tmp_path / "no-column")
    assert rejected["single.parquet"][0] == "unsupported_format"
    assert "--image-column" in rejected["single.parquet"][1]


def test_parquet_rows_are_read_in_any_order_from_row_groups_of_any_size(tmp_path):
    """A fit task asks for rows in file order, skipping some; a retried or later task may ask
    for rows behind. Row groups of one row, of many (past a read batch), and a null."""
    from pipeline.readers import PARQUET_BATCH_ROWS

    values = [f"image {i}".encode() for i in range(3 * PARQUET_BATCH_ROWS + 7)]
    values[5] = None
    sizes = [1, 1, 2 * PARQUET_BATCH_ROWS + 5, 3, len(values)]  # the last takes the rest
    with pq.ParquetWriter(tmp_path / "data.parquet", pa.schema([("image", pa.binary())])) as out:
        first = 0
        for size in sizes:
            out.write_table(pa.table({"image": values[first : first + size]}, out.schema))
            first += size
            if first >= len(values):
                break
    assert pq.ParquetFile(tmp_path / "data.parquet").num_row_groups == 5
    source = resolve_input(str(tmp_path))
    rows = [0, 1, 2, 5, 70, 71, PARQUET_BATCH_ROWS * 2 + 6, len(values) - 1, 3, 0, 150, 140]
    row = {"archive": "data.parquet", "source": "data.parquet/x", "size": None}
    assert [read_image(source, row | {"source_row": i}) for i in rows] == [values[i] for i in rows]
    with pytest.raises(OSError, match="is not in the file"):  # the file changed since the scan
        read_image(source, row | {"source_row": len(values)})


def test_a_damaged_row_group_costs_its_rows_and_no_others(local_ray, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    path = images / "train.parquet"
    datasets_parquet(
        path, [jpeg(96, 64, i) for i in range(6)], [f"row {i}" for i in range(6)], row_group_size=2
    )
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)  # rows 2-3's image bytes
    with open(path, "r+b") as damaged:
        damaged.seek(chunk.data_page_offset)
        damaged.write(b"\xff" * 32)  # its page header
    with pytest.raises((OSError, pa.ArrowException)):
        pq.ParquetFile(path).read_row_group(1)
    kept, rejected = prepare(images, tmp_path / "out")
    assert kept == {f"train.parquet/{i:09d}": f"row {i}" for i in (0, 1, 4, 5)}
    assert set(rejected) == {"train.parquet/000000002", "train.parquet/000000003"}
    reason, message = rejected["train.parquet/000000002"]
    assert reason == "corrupt" and message.startswith("its row group (1) is damaged: OSError")


def test_a_row_group_of_many_images_too_large_to_read_costs_its_rows(tmp_path, monkeypatch):
    """A row group of several images over the limit costs its rows, each a rejection saying
    how to rewrite the file; the file's other row groups, and a row group of one image of any
    size, are read."""
    import pipeline.scan as scan

    images = [jpeg(96, 64, i) for i in range(7)]
    whole = pq.read_table(datasets_parquet(tmp_path / "rows.parquet", images, ["a"] * 7, 7))
    path = tmp_path / "big-groups.parquet"
    with pq.ParquetWriter(path, whole.schema) as writer:
        for start, count in ((0, 4), (4, 1), (5, 2)):  # row groups of 4 images, of 1 and of 2
            writer.write_table(whole.slice(start, count))
    metadata = pq.ParquetFile(path).metadata
    size = metadata.row_group(1).total_byte_size  # one image's and its caption's
    monkeypatch.setattr(scan, "MAX_ROW_GROUP_BYTES", size // 2)  # under one image
    listing = pa.Table.from_pylist(
        [{"source": path.name, "size": path.stat().st_size, "mtime_ns": 0}], LISTING_SCHEMA
    )
    rows = scan.scan_batch(listing, resolve_input(str(tmp_path))).to_pylist()
    assert [row["source"] for row in rows] == [f"{path.name}/{i:09d}" for i in range(7)]
    too_large = ["unsupported_format"]
    assert [row["reject"] for row in rows] == too_large * 4 + [None] + too_large * 2
    assert "rewrite the file with fewer rows a row group" in rows[0]["message"]
    monkeypatch.setattr(scan, "MAX_ROW_GROUP_BYTES", metadata.row_group(0).total_byte_size * 2)
    assert not any(
        row["reject"] for row in scan.scan_batch(listing, resolve_input(str(tmp_path))).to_pylist()
    )


def test_a_dataset_saved_by_hugging_face_datasets(local_ray, tmp_path, monkeypatch):
    """What `datasets` itself writes (`Dataset.to_parquet` with an `Image` feature and its
    schema metadata, in batches of 100 rows: row groups of 100, as the Hub's image datasets
    hold them), offline and with its cache in the test's folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    shapes = [(96, 64), (64, 96), (64, 64)]
    images = [{"bytes": jpeg(*shapes[i % 3], i), "path": f"{i}.jpg"} for i in range(230)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"image": images, "text": [f"image {i}" for i in range(230)]}, features=features
    )
    (tmp_path / "hub" / "data").mkdir(parents=True)
    path = tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"
    dataset.to_parquet(str(path), batch_size=100)
    written = pq.ParquetFile(path)
    assert written.num_row_groups == 3 and b"huggingface" in written.schema_arrow.metadata
    kept, rejected = prepare(tmp_path / "hub", tmp_path / "out")
    name = "data/train-00000-of-00001.parquet"
    assert kept == {f"{name}/{i:09d}": f"image {i}" for i in range(230)} and not rejected


def as_format_2(output: Path) -> None:
    """Rewrite a prepared OUT into the shape format 2 gave it: no `source_row` (nor version 4's
    `dhash`) in the index or the parts, version 2 in config.json and manifest.json."""
    for path in [output / "index.parquet", *(output / "parts").glob("*.parquet")]:
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["source_row", "dhash"]), path)
    for name in ("config.json", "manifest.json"):
        written = json.loads((output / name).read_text())
        (output / name).write_text(json.dumps(written | {"format_version": 2}))


def test_an_out_of_format_2_is_read_by_the_trainer_and_added_to_by_an_incremental_run(
    local_ray, tmp_path
):
    from trainer.dataset import PreparedData

    images = tmp_path / "images"
    images.mkdir()
    datasets_parquet(
        images / "rows.parquet",
        [jpeg(96, 64, i) for i in range(3)],
        [f"row {i}" for i in range(3)],
        row_group_size=2,
    )
    save(rgb(64, 96, 7), images / "loose.jpg", quality=90)
    output = tmp_path / "out"
    prepare(images, output)
    rows = {f"rows.parquet/{i:09d}": i for i in range(3)} | {"loose.jpg": None}
    index = pq.read_table(output / "index.parquet").to_pylist()
    assert {row["source"]: row["source_row"] for row in index} == rows
    as_format_2(output)
    shards = sorted(path.name for path in (output / "shards").iterdir())

    data = PreparedData(output)
    assert data.manifest.format_version == 2 and len(data) == 4
    assert sorted(data.captions(np.arange(4))) == ["", "row 0", "row 1", "row 2"]

    save(rgb(96, 64, 8), images / "new.jpg", quality=90)
    kept, rejected = prepare(images, output, incremental=True)
    assert set(kept) == {*rows, "new.jpg"} and not rejected
    index = pq.read_table(output / "index.parquet").to_pylist()
    assert {row["source"]: row["source_row"] for row in index} == rows | {"new.jpg": None}
    assert set(shards) <= {path.name for path in (output / "shards").iterdir()}  # kept
    assert json.loads((output / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
