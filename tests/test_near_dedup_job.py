"""The prepare job with --near-dedup end to end, on a real local Ray and real files: a near copy
rejected naming the image kept, in no tar; the hashes in the index; an --incremental run that
turns a new near copy away against the image OUT already holds, its shards untouched."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_BUCKETS
from images import datasets_parquet
from near_copies import COPIES, encoded, file_hash, scene

from pipeline.config import PrepareConfig
from pipeline.inputs import resolve_input
from pipeline.prepare import run
from pipeline.scan import scan_batch
from pipeline.sources import list_input

pytestmark = pytest.mark.usefixtures("local_ray")
SIZE = (256, 192)


def prepare(images: Path, output: Path, **settings) -> None:
    run(
        PrepareConfig(
            input=str(images),
            output=str(output),
            buckets=SMALL_BUCKETS,
            samples_per_shard=2,
            near_dedup=True,
            **settings,
        )
    )


def rejects_of(output: Path) -> dict[str, tuple[str, str]]:
    rows = pq.read_table(output / "rejects.parquet").to_pylist()
    return {row["source"]: (row["reason"], row["message"]) for row in rows}


def tar_keys(output: Path) -> set[str]:
    keys = set()
    for path in (output / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            keys |= {member.name.split(".")[0] for member in tar}
    return keys


def test_near_copies_are_rejected_naming_the_kept_image_also_on_an_incremental_run(tmp_path):
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    pictures = [scene(seed, size=SIZE) for seed in range(4)]
    for i, picture in enumerate(pictures):
        (images / f"scene {i}.jpg").write_bytes(encoded(picture, "JPEG", quality=90))
    (images / "small copy.webp").write_bytes(  # fewer pixels than scene 0: rejected
        encoded(pictures[0].resize((128, 96)), "WEBP", quality=80)
    )
    (images / "cropped.jpg").write_bytes(COPIES["cropped 10%"](pictures[1]))  # missed: kept
    (images / "upload of scene 2.jpg").write_bytes((images / "scene 2.jpg").read_bytes())
    prepare(images, output)

    rejects = rejects_of(output)
    assert {source: reason for source, (reason, _) in rejects.items()} == {
        "small copy.webp": "near_duplicate",
        "upload of scene 2.jpg": "duplicate_content",
    }
    assert rejects["small copy.webp"][1].endswith(" as scene 0.jpg, which is kept")
    index = pq.read_table(output / "index.parquet").to_pylist()
    kept = {row["source"] for row in index}
    assert kept == {"scene 0.jpg", "scene 1.jpg", "scene 2.jpg", "scene 3.jpg", "cropped.jpg"}
    assert tar_keys(output) == {row["key"] for row in index}, "a near copy is in no tar"
    assert {row["source"]: row["dhash"] for row in index} == {
        source: file_hash((images / source).read_bytes()) for source in kept
    }

    shards = {path.name: path.stat().st_mtime_ns for path in (output / "shards").glob("*.tar")}
    larger = pictures[2].resize((384, 288))  # more pixels than scene 2, which OUT holds
    (images / "later copy.jpg").write_bytes(encoded(larger, "JPEG", quality=60))
    prepare(images, output, incremental=True)

    rejects = rejects_of(output)
    assert rejects["later copy.jpg"][0] == "near_duplicate"
    assert rejects["later copy.jpg"][1].endswith(" as scene 2.jpg, which is kept")
    assert {row["source"] for row in pq.read_table(output / "index.parquet").to_pylist()} == kept
    after = {path.name: path.stat().st_mtime_ns for path in (output / "shards").glob("*.tar")}
    assert after == shards, "no shard rewritten: the new image is turned away before planning"


def test_near_dedup_is_a_setting_of_the_output(tmp_path):
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    (images / "a.jpg").write_bytes(encoded(scene(0, size=SIZE), "JPEG", quality=90))
    prepare(images, output)
    with pytest.raises(ValueError, match="near_dedup_distance: 4 -> 8"):
        prepare(images, output, incremental=True, near_dedup_distance=8)


def test_an_incremental_run_takes_unchanged_files_hashes_from_the_index(tmp_path):
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for seed in range(2):
        (images / f"scene {seed}.jpg").write_bytes(encoded(scene(seed, size=SIZE), "JPEG"))
    prepare(images, output)
    newcomer = encoded(scene(9, size=SIZE), "JPEG")  # looks like neither
    index = pq.read_table(output / "index.parquet")
    marked = [
        file_hash(newcomer) if source == "scene 1.jpg" else dhash
        for source, dhash in zip(
            index["source"].to_pylist(), index["dhash"].to_pylist(), strict=True
        )
    ]
    pq.write_table(  # as if scene 1 had hashed like the newcomer: only the index says so
        index.set_column(
            index.schema.get_field_index("dhash"), "dhash", pa.array(marked, pa.uint64())
        ),
        output / "index.parquet",
    )
    (images / "newcomer.jpg").write_bytes(newcomer)
    prepare(images, output, incremental=True)
    assert rejects_of(output)["newcomer.jpg"][1].endswith(" as scene 1.jpg, which is kept")


def test_rows_of_a_parquet_input_are_hashed_in_the_scan_too(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    first, second = scene(0, size=SIZE), scene(1, size=SIZE)
    datasets_parquet(
        images / "rows.parquet",
        [
            encoded(first, "JPEG", quality=90),
            encoded(second, "JPEG", quality=90),
            encoded(first.resize((128, 96)), "WEBP", quality=80),
        ],
        ["first", "second", "first again, smaller"],
        row_group_size=2,
    )
    prepare(images, tmp_path / "out")
    (source,) = rejects_of(tmp_path / "out")
    assert source == "rows.parquet/000000002"
    reason, message = rejects_of(tmp_path / "out")[source]
    assert reason == "near_duplicate"
    assert message.endswith(" as rows.parquet/000000000, which is kept")


def test_a_file_whose_pixels_do_not_decode_is_rejected_in_the_scan(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    whole = encoded(scene(0, size=SIZE), "PNG")
    (images / "cut.png").write_bytes(whole[: len(whole) // 2])  # a header, half the pixels
    (images / "fine.png").write_bytes(whole)
    source = resolve_input(str(images))
    scanned = scan_batch(list_input(source), source, near_dedup=True).to_pylist()
    rows = {row["source"]: row for row in scanned}
    assert rows["cut.png"]["reject"] == "corrupt" and rows["cut.png"]["dhash"] is None
    assert rows["fine.png"]["reject"] is None and rows["fine.png"]["dhash"] == file_hash(whole)
