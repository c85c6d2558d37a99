"""The prepare job end to end on a real local Ray and real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import SMALL_BUCKETS
from images import all_modes, rgb, save
from PIL import Image

import pipeline.prepare as prepare_module
from pipeline.buckets import bucket_aspects
from pipeline.config import PrepareConfig, WriteOptions
from pipeline.fit import fit
from pipeline.inputs import resolve_input
from pipeline.plan import plan_epoch
from pipeline.prepare import run
from pipeline.sources import list_input

pytestmark = pytest.mark.usefixtures("local_ray")


def prepare(input: Path | str, output: Path, **settings) -> dict:
    return run(PrepareConfig(input=str(input), output=str(output), samples_per_shard=4, **settings))


def index_of(output: Path) -> list[dict]:
    return pq.read_table(output / "index.parquet").to_pylist()


def rejects_of(output: Path) -> dict[str, str]:
    return {r["source"]: r["reason"] for r in pq.read_table(output / "rejects.parquet").to_pylist()}


def tar_members(output: Path) -> dict[str, dict[str, bytes]]:
    """Every tar's members by name, read with plain tarfile."""
    shards = {}
    for path in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            shards[path.name] = {m.name: tar.extractfile(m).read() for m in tar}
    return shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    files = all_modes(folder / "modes")
    for name, path in files.items():
        if name != "small.jpg":
            path.with_suffix(".txt").write_text(f"a picture named {name}, tags: one, two")
    (folder / "modes" / "small.caption").write_text("a caption from a .caption sidecar")
    for i in range(12):  # more of one shape, so buckets hold several shards
        save(rgb(800 + 8 * i, 600, 100 + i), folder / "many" / f"landscape {i}.jpg", quality=85)
    return folder


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("prepared") / "out"
    prepare(corpus, output, batch_size=4, world_size=2)
    return output


def test_every_image_is_in_the_index_with_its_caption(corpus, prepared):
    rows = {row["source"]: row for row in index_of(prepared)}
    sources = {
        p.relative_to(corpus).as_posix()
        for p in corpus.rglob("*")
        if p.suffix not in (".txt", ".caption") and p.is_file()
    }
    assert set(rows) == sources
    assert rows["modes/small.jpg"]["caption"] == "a caption from a .caption sidecar"
    assert rows["modes/rgb.jpg"]["caption"] == "a picture named rgb.jpg, tags: one, two"
    assert rows["many/landscape 3.jpg"]["caption"] is None
    assert json.loads((prepared / "manifest.json").read_text())["counts"]["images"] == len(sources)


def test_exif_orientation_is_applied_before_bucketing(prepared):
    rows = {row["source"]: row for row in index_of(prepared)}
    phone = rows["modes/phone.jpg"]
    assert (phone["width"], phone["height"]) == (900, 1200)
    assert phone["bucket_width"] < phone["bucket_height"], "a portrait bucket"


def test_tars_are_bucket_homogeneous_and_sizes_match_fit(prepared):
    rows = {row["key"]: row for row in index_of(prepared)}
    for name, members in tar_members(prepared).items():
        bucket_size = name.split("-")[0]
        for member, data in members.items():
            key, extension = member.split(".", 1)
            row = rows[key]
            assert f"{row['bucket_width']}x{row['bucket_height']}" == bucket_size
            if extension == "jpg":
                image = Image.open(io_bytes(data))
                assert image.mode == "RGB"
                assert image.size == fit(
                    row["width"], row["height"], row["bucket_width"], row["bucket_height"]
                )
                assert image.size == (row["stored_width"], row["stored_height"])


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def test_index_offsets_read_members_without_scanning(prepared):
    for row in index_of(prepared):
        with open(prepared / row["shard"], "rb") as tar:
            tar.seek(row["json_offset"])
            metadata = json.loads(tar.read(row["json_size"]))
            tar.seek(row["image_offset"])
            image = Image.open(io_bytes(tar.read(row["image_size"])))
        assert metadata["source"] == row["source"] and metadata["bucket"] == row["bucket"]
        assert image.size == (row["stored_width"], row["stored_height"])
        if row["caption"] is not None:
            with open(prepared / row["shard"], "rb") as tar:
                tar.seek(row["txt_offset"])
                assert tar.read(row["txt_size"]).decode() == row["caption"]


def test_plain_webdataset_and_tar_read_every_sample(prepared):
    keys = {row["key"] for row in index_of(prepared)}
    urls = [str(p) for p in sorted((prepared / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert {s["__key__"] for s in samples} == keys
    assert all(s["jpg"].mode == "RGB" for s in samples)
    listed = subprocess.run(
        ["tar", "-tf", urls[0]], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed and all(name.count(".") == 1 and "/" not in name for name in listed)


def test_transparency_is_composited_on_the_background(prepared):
    rows = {row["source"]: row for row in index_of(prepared)}
    row = rows["modes/rgba.png"]  # alpha 0 in the top rows: the white default background
    with open(prepared / row["shard"], "rb") as tar:
        tar.seek(row["image_offset"])
        image = Image.open(io_bytes(tar.read(row["image_size"])))
    assert min(image.getpixel((image.width // 2, 0))) > 240


def test_reports_match_the_planner(prepared):
    stats = json.loads((prepared / "stats.json").read_text())
    manifest = json.loads((prepared / "manifest.json").read_text())
    index = pq.read_table(prepared / "index.parquet")
    bucket = index["bucket"].to_numpy()
    aspects = index["width"].to_numpy() / index["height"].to_numpy()
    buckets = np.array(manifest["buckets"])
    plans = [
        plan_epoch(
            bucket, 4, 2, r, 0, 0, item_aspects=aspects, bucket_aspects=bucket_aspects(buckets)
        )
        for r in range(2)
    ]
    epoch = stats["epoch"]
    assert epoch["catch_all_images"] == sum(p.catch_all_items for p in plans)
    assert epoch["images_dropped"] == plans[0].dropped == len(index) % 8
    assert epoch["images_used"] == len(index) - epoch["images_dropped"]
    assert sum(b["images"] for b in stats["buckets"]) == stats["images"] == len(index)
    assert stats["aspect_error"]["max"] == pytest.approx(index["aspect_error"].to_numpy().max())
    assert (prepared / "buckets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_is_byte_identical(corpus, prepared, tmp_path):
    again = tmp_path / "again"
    prepare(corpus, again, batch_size=4, world_size=2)
    first, second = tar_members(prepared), tar_members(again)
    assert first.keys() == second.keys()
    for name in first:
        assert (prepared / "shards" / name).read_bytes() == (again / "shards" / name).read_bytes()
    assert index_of(prepared) == index_of(again)


def test_resume_after_an_interruption_keeps_finished_shards(corpus, prepared, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(prepared, output)
    # What a kill mid-write leaves: no manifest or index, some shards missing, a half tar.
    for name in ("manifest.json", "index.parquet", "rejects.parquet", "stats.json"):
        (output / name).unlink()
    tars = sorted((output / "shards").glob("*.tar"))
    for lost in tars[::2]:
        lost.unlink()
        (output / "parts" / f"{lost.stem}.parquet").unlink()
    (output / "shards" / f"{tars[0].name}.tmp-deadbeef").write_bytes(b"half a tar")
    kept = {p: p.stat().st_mtime_ns for p in tars[1::2]}

    prepare(corpus, output, batch_size=4, world_size=2)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "finished shards are not rewritten"
    assert not list(output.rglob("*.tmp-*"))
    for name in tar_members(prepared):
        assert (output / "shards" / name).read_bytes() == (prepared / "shards" / name).read_bytes()
    assert index_of(output) == index_of(prepared)


def test_reruns_delete_only_the_jobs_own_files(corpus, prepared, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(prepared, output)
    stale = [
        output / "shards" / "64x64-0123456789abcdef.tar",  # named as the job names them
        output / "parts" / "64x64-0123456789abcdef.parquet",
    ]
    foreign = [output / "shards" / "my.tar", output / "parts" / "notes.parquet"]
    for path in stale + foreign:
        path.write_bytes(b"not the job's")
    (output / "manifest.json").unlink()  # a rerun after an interruption

    prepare(corpus, output, batch_size=4, world_size=2)
    assert not any(path.exists() for path in stale), "a shard of an earlier run is pruned"
    assert all(path.read_bytes() == b"not the job's" for path in foreign)
    warned = capsys.readouterr().err
    assert f"{output}/shards/my.tar" in warned and f"{output}/parts/notes.parquet" in warned

    prepare(corpus, output, batch_size=4, world_size=2, overwrite=True)
    assert all(path.read_bytes() == b"not the job's" for path in foreign), "--overwrite too"
    assert "shards/my.tar" not in json.loads((output / "manifest.json").read_text())["shards"]


def test_incremental_processes_only_new_and_changed_images(corpus, tmp_path):
    source = tmp_path / "images"
    shutil.copytree(corpus / "many", source)
    output = tmp_path / "out"
    prepare(source, output)
    before = {p.name: p.stat().st_mtime_ns for p in (output / "shards").glob("*.tar")}
    touched = {
        Path(r["shard"]).name
        for r in index_of(output)
        if r["source"] in ("landscape 0.jpg", "landscape 5.jpg")
    }

    (source / "landscape 0.jpg").unlink()  # deleted
    save(rgb(810, 600, 999), source / "landscape 5.jpg", quality=85)  # changed
    save(rgb(600, 900, 7), source / "new portrait.jpg", quality=85)  # new
    with pytest.raises(ValueError, match="--incremental"):
        prepare(source, output)
    prepare(source, output, incremental=True)

    rows = index_of(output)
    assert sorted(r["source"] for r in rows) == sorted(p.name for p in source.iterdir())
    after = {p.name: p.stat().st_mtime_ns for p in (output / "shards").glob("*.tar")}
    untouched = {name for name in before if after.get(name) == before[name]}
    assert untouched == set(before) - touched, "only the shards of the deleted and changed images"
    assert not touched & set(after), "shards holding a deleted or changed image are replaced"
    members = [
        m.split(".")[0]
        for shard in tar_members(output).values()
        for m in shard
        if m.endswith(".jpg")
    ]
    assert sorted(members) == sorted(r["key"] for r in rows), (
        "every tar sample is in the index once"
    )
    assert json.loads((output / "manifest.json").read_text())["counts"]["images"] == len(rows)


def test_other_settings_are_refused_unless_overwrite(corpus, tmp_path):
    output = tmp_path / "out"
    prepare(corpus / "many", output)
    with pytest.raises(
        ValueError, match=r"other settings \(write.quality: 95 -> 80\).*--overwrite"
    ):
        prepare(corpus / "many", output, write=WriteOptions(quality=80))
    manifest = prepare(corpus / "many", output, write=WriteOptions(quality=80), overwrite=True)
    assert manifest.settings["write"]["quality"] == 80


def test_crop_at_prepare_time_stores_exact_bucket_sizes(corpus, tmp_path):
    output = tmp_path / "out"
    prepare(corpus / "modes", output, write=WriteOptions(crop="random", image_format="webp"))
    rows = index_of(output)
    assert rows and all(
        (r["stored_width"], r["stored_height"]) == (r["bucket_width"], r["bucket_height"])
        for r in rows
    )
    assert all(
        name.endswith((".webp", ".json", ".txt"))
        for s in tar_members(output).values()
        for name in s
    )


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_listing_file_with_captions(corpus, tmp_path, kind):
    paths = sorted(str(p) for p in (corpus / "many").glob("*.jpg"))[:5]
    captions = [f"caption {i}" for i in range(5)]
    # The first row again: a duplicate. The second with another caption: a second sample.
    table = pa.table(
        {
            "path": [*paths, paths[0], paths[1], None],
            "caption": [*captions, captions[0], "other words", "a row without a path"],
        }
    )
    listing = tmp_path / f"listing.{kind}"
    pq.write_table(table, listing) if kind == "parquet" else pa_csv.write_csv(table, listing)
    output = tmp_path / "out"
    prepare(listing, output)
    rows = index_of(output)
    expected = [*zip(paths, captions, strict=True), (paths[1], "other words")]
    assert sorted((r["source"], r["caption"]) for r in rows) == sorted(expected)
    assert sorted(rejects_of(output).items()) == [("", "no_path"), (paths[0], "duplicate")]


def test_file_urls_for_input_and_output(corpus, tmp_path):
    output = tmp_path / "out"
    manifest = prepare(f"file://{corpus / 'many'}", f"file://{output}")
    assert manifest.counts["images"] == 12
    assert {row["source"] for row in index_of(output)} == {f"landscape {i}.jpg" for i in range(12)}


def test_a_deep_tree_is_listed_by_tasks_as_one_process_lists_it(tmp_path):
    """The job lists the top levels itself, two deep when there are few folders, and shares the
    folders below out to tasks: the same rows as one process walking the tree, every folder's
    captions paired, every image in the index."""
    root = tmp_path / "tree"
    folders = ["", "a", "a/b", "a/b/c", *[f"a/b/d{j}" for j in range(6)], "a/b/d0/e/f"]
    for i, folder in enumerate(folders):
        save(rgb(96 + i, 64, i), root / folder / f"img{i}.jpg")
        (root / folder / f"img{i}.txt").write_text(f"caption {i}")
    (root / "a" / "b" / "d3" / "orphan.txt").write_text("no image")
    source = resolve_input(str(root))
    listed = prepare_module._list(source, PrepareConfig(input=str(root), output="unused"))
    assert listed.equals(list_input(source))
    output = tmp_path / "out"
    prepare(root, output, buckets=SMALL_BUCKETS)
    captions = {row["source"]: row["caption"] for row in index_of(output)}
    assert captions == {
        f"{folder}/img{i}.jpg".lstrip("/"): f"caption {i}" for i, folder in enumerate(folders)
    }
    assert rejects_of(output) == {"a/b/d3/orphan.txt": "orphan_caption"}


def test_index_lists_shards_in_the_manifests_order(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    shards = [row["shard"] for row in index_of(prepared)]
    in_order = list(dict.fromkeys(shards))
    assert in_order == manifest["shards"]
    assert all(
        a["key"] < b["key"]
        for a, b in zip(index_of(prepared), index_of(prepared)[1:], strict=False)
        if a["shard"] == b["shard"]
    )


def test_plain_webdataset_tuples(prepared):
    """Every sample has a caption member (empty when there is none): to_tuple works on all."""
    urls = [str(p) for p in sorted((prepared / "shards").glob("*.tar"))]
    pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt"))
    assert len(pairs) == len(index_of(prepared))
    assert "" in {caption for _, caption in pairs}, "uncaptioned images have an empty caption"


def readme_webdataset_snippet() -> str:
    """The README's plain webdataset code, its loop body made to collect the batches."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Plain webdataset")[1]
    code = section.split("```python\n")[1].split("```")[0]
    body = "        ...  # pixels: uint8 [4, H, W, 3]\n"
    assert body in code, "the snippet's loop body is where the test expects it"
    return code.replace(body, "        batches.append((pixels, captions))\n")


@pytest.mark.filterwarnings("error:.*shardshuffle")  # webdataset's warning when it is unset
def test_the_readmes_webdataset_snippet_makes_bucket_sized_batches(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prepared").symlink_to(prepared)
    batches = []
    exec(readme_webdataset_snippet(), {"batches": batches})
    assert sum(len(captions) for _, captions in batches) == len(index_of(prepared))
    for pixels, captions in batches:
        assert pixels.dtype == np.uint8 and pixels.ndim == 4 and len(captions) == len(pixels)
    shapes = {(r["bucket_height"], r["bucket_width"]) for r in index_of(prepared)}
    assert {pixels.shape[1:3] for pixels, _ in batches} == shapes


def test_the_readmes_webdataset_snippet_fails_without_a_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no prepared/ here
    with pytest.raises(FileNotFoundError, match=r"prepared/manifest\.json"):
        exec(readme_webdataset_snippet(), {"batches": []})
