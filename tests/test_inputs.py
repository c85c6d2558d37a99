"""Datasets in the shapes people hold them: JSON caption sidecars, diffusers' metadata.jsonl,
and exact duplicates found by content, kept stably across reruns and incremental runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SMALL_BUCKETS
from images import rgb, save

from pipeline.config import PrepareConfig
from pipeline.prepare import run


def prepare(images: Path, output: Path, **options) -> tuple[dict, dict]:
    """(caption by source of the kept images, (reason, message) by source of the rejected)."""
    run(PrepareConfig(input=str(images), output=str(output), buckets=SMALL_BUCKETS, **options))
    kept = {
        row["source"]: row["caption"] for row in pq.read_table(output / "index.parquet").to_pylist()
    }
    rejected = {row["source"]: (row["reason"], row["message"])
                for row in pq.read_table(output / "rejects.parquet").to_pylist()}  # fmt: skip
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
    (images / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "g.jpg",
                                                               "text": "g below"}))  # fmt: skip
    (images / "orphan.json").write_text("{}")
    kept, rejected = prepare(images, tmp_path / "out")
    assert kept == {"a.jpg": "a cat", "b.jpg": "1girl, solo, smile", "d.jpg": "from the txt",
                    "e.jpg": "e from metadata", "f.jpg": None, "sub/g.jpg": "g below"}  # fmt: skip
    assert rejected["c.jpg"][0] == "bad_caption" and "c.json" in rejected["c.jpg"][1]
    assert rejected["metadata.jsonl"][0] == "bad_caption"
    assert "line 3" in rejected["metadata.jsonl"][1]
    assert rejected["orphan.json"][0] == "orphan_caption"
    assert set(kept) | set(rejected) == {
        "a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "sub/g.jpg", "metadata.jsonl",
        "orphan.json", "d.txt",
    } - {"d.txt"}  # fmt: skip


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
