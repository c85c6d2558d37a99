"""A corpus of bad inputs: each becomes a rejection with its reason; every good image is kept."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from images import rgb, save
from PIL import Image

from pipeline.config import PrepareConfig
from pipeline.fit import fit
from pipeline.prepare import run

pytestmark = pytest.mark.usefixtures("local_ray")


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    rgb(width, height, seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    rgb(width, height).save(buffer, "PNG")
    return buffer.getvalue()


def build_corpus(root, outside):
    """(files expected kept, {source: expected rejection reason})."""
    (root / "nested" / "deeper").mkdir(parents=True)
    bad = {}

    def write(name: str, data: bytes, reason: str | None = None) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        if reason:
            bad[name] = reason

    write("truncated.jpg", jpeg_bytes(800, 600)[:5000], "corrupt")
    write("truncated.png", png_bytes(700, 700)[:3000], "corrupt")
    write("zero bytes.jpg", b"", "not_an_image")
    write("text.jpg", b"this is a text file with a .jpg name\n", "not_an_image")
    write("page.webp", b"<!doctype html><html><body>404</body></html>", "not_an_image")
    write("image named.txt", png_bytes(64, 64), "orphan_caption")
    write("layers.psd", b"8BPS" + b"\0" * 100, "unsupported_format")
    ppm = io.BytesIO()
    rgb(600, 600).save(ppm, "PPM")
    write("netpbm.png", ppm.getvalue(), "unsupported_format")
    icon = io.BytesIO()
    rgb(64, 64).save(icon, "ICO")
    write("favicon.png", icon.getvalue(), "unsupported_format")
    write("huge.jpg", jpeg_bytes(2400, 1800), "too_many_pixels")  # over max_pixels=4M below
    write("one pixel.png", png_bytes(1, 1), "upscale")
    write("needle 1x5000.png", png_bytes(1, 5000), "aspect")
    write("banner 5000x1.png", png_bytes(5000, 1), "aspect")
    write("thumbnail.jpg", jpeg_bytes(200, 200), "upscale")  # 2.56x to 512x512, max_upscale 2
    write("panorama.jpg", jpeg_bytes(3000, 500), "crop")  # 6:1 into 4:1 crops 33% > max_crop
    write("bad caption.jpg", jpeg_bytes(640, 480, 3))
    (root / "bad caption.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    bad["bad caption.jpg"] = "caption_encoding"
    os.symlink(root / "does-not-exist.jpg", root / "dangling.jpg")
    bad["dangling.jpg"] = "unreadable"
    os.symlink(root / "loop.jpg", root / "loop.jpg")
    bad["loop.jpg"] = "unreadable"
    (outside / "secret.jpg").write_bytes(jpeg_bytes(800, 800))
    os.symlink(outside / "secret.jpg", root / "escape.jpg")
    bad["escape.jpg"] = "outside_root"
    os.mkfifo(root / "pipe.jpg")
    bad["pipe.jpg"] = "not_a_file"
    # A name from an old Latin-1 archive: not UTF-8, shown with the byte escaped.
    with open(os.fsencode(root) + b"/caf\xe9 old archive.jpg", "wb") as file:
        file.write(jpeg_bytes(640, 480, 6))
    bad["caf\\xe9 old archive.jpg"] = "bad_name"
    # A JPEG followed by 3 GB of nothing (a sparse file): refused from its size, never read.
    with open(root / "junk tail.jpg", "wb") as file:
        file.write(jpeg_bytes(640, 480, 7))
        file.truncate(3 << 30)
    bad["junk tail.jpg"] = "file_too_large"

    good = {
        "with spaces in name.jpg": jpeg_bytes(800, 600, 1),
        "ünïcødé 画像.png": png_bytes(600, 800),
        "my.photo.v2.final.jpg": jpeg_bytes(1024, 768, 2),
        "UPPER.JPG": jpeg_bytes(768, 1024, 4),
        "nested/deeper/ok.webp": None,
    }
    for name, data in good.items():
        if data is None:
            save(rgb(900, 900, 5), root / name, quality=80)
        else:
            write(name, data)
    os.symlink(root / "UPPER.JPG", root / "nested" / "link inside root.jpg")
    bad["nested/link inside root.jpg"] = "duplicate_content"  # UPPER.JPG's bytes: it is kept
    write("Shouting.JPG", jpeg_bytes(768, 1024, 8))  # upper-case sidecars are sidecars too
    (root / "Shouting.TXT").write_text("an upper-case caption sidecar")
    write("Mixed.png", png_bytes(600, 600))
    (root / "Mixed.Caption").write_text("a mixed-case caption sidecar")
    good |= {"Shouting.JPG": None, "Mixed.png": None}
    assert len(bad) >= 20
    return set(good), bad


def test_bad_inputs_are_rejected_with_their_reasons(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    good, bad = build_corpus(root, outside)
    output = tmp_path / "out"
    config = PrepareConfig(
        input=str(root),
        output=str(output),
        max_pixels=4_000_000,
        max_crop=0.25,
        samples_per_shard=3,
    )
    run(config)
    rejects = {r["source"]: r for r in pq.read_table(output / "rejects.parquet").to_pylist()}
    assert {source: r["reason"] for source, r in rejects.items()} == bad
    assert all(r["message"] for r in rejects.values()), "every rejection says why"
    index = pq.read_table(output / "index.parquet").to_pylist()
    assert {row["source"] for row in index} == good
    assert all("." not in row["key"] and "/" not in row["key"] for row in index)
    captions = {row["source"]: row["caption"] for row in index}
    assert captions["Shouting.JPG"] == "an upper-case caption sidecar"
    assert captions["Mixed.png"] == "a mixed-case caption sidecar"
    listed = [row["source"] for row in index] + list(rejects)
    assert len(listed) == len(set(listed)) == len(good) + len(bad), "every input exactly once"


def test_unusable_listing_rows_are_rejections_one_each(tmp_path):
    """A listing names anything: each bad row is one rejection with its own reason."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.jpg").write_bytes(jpeg_bytes(800, 600))
    (images / "a folder.jpg").mkdir()
    os.mkfifo(images / "fifo.jpg")
    rows = {
        str(images / "good.jpg"): None,
        str(images / "missing.jpg"): "unreadable",
        str(images / "a folder.jpg"): "not_a_file",
        str(images / "fifo.jpg"): "not_a_file",
        "/dev/zero": "not_a_file",
        str(images / "nul\0byte.jpg"): "bad_path",
        "http://example.com/cat.jpg": "bad_path",
        "ftp://example.com/cat.jpg": "bad_path",
    }
    listing = tmp_path / "listing.parquet"
    pq.write_table(pa.table({"path": list(rows)}), listing)
    run(PrepareConfig(input=str(listing), output=str(tmp_path / "out")))
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert {r["source"]: r["reason"] for r in rejects} == {
        path: reason for path, reason in rows.items() if reason
    }
    messages = {r["source"]: r["message"] for r in rejects}
    assert "no such file" in messages[str(images / "missing.jpg")]
    assert "directory" in messages[str(images / "a folder.jpg")]
    assert "http" in messages["http://example.com/cat.jpg"]
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    assert [row["source"] for row in index] == [str(images / "good.jpg")]


def test_default_pixel_limit_accepts_a_170_megapixel_wallpaper(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16000, 10667), (40, 90, 160)).save(root / "wallpaper.jpg", quality=80)
    output = tmp_path / "out"
    run(PrepareConfig(input=str(root), output=str(output)))
    (row,) = pq.read_table(output / "index.parquet").to_pylist()
    assert (row["width"], row["height"]) == (16000, 10667)
    assert (row["bucket_width"], row["bucket_height"]) == (768, 512)
    assert (row["stored_width"], row["stored_height"]) == fit(16000, 10667, 768, 512)
