"""report.html as a user opens it: in a real headless Chromium, every bucket of the index shown
with its images loaded, the crop windows where the index puts them, the rejections and the
duplicate groups listed. The screenshot is kept ($ARB_TEST_ARTIFACTS, which .ci/run sets)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_BUCKETS, ray_started
from images import rgb, save

from pipeline.config import PrepareConfig
from pipeline.format import OutputDir
from pipeline.prepare import run
from pipeline.rejects import copy_message, kept_copy
from pipeline.report_page import SAMPLES_PER_BUCKET, crop_windows, write_report_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium or chromium-browser on PATH (apt-get install chromium; .ci/run does)",
)


def chromium(page: Path, tmp_path: Path, *args: str) -> str:
    """Chromium headless on `page` once it has loaded, its profile and caches in tmp_path."""
    home = tmp_path / "chromium-home"
    home.mkdir(exist_ok=True)
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            f"--user-data-dir={home / 'profile'}",
            "--virtual-time-budget=10000",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "config")},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []
        self.text = ""

    def find_all(self, tag: str, class_: str | None = None) -> list[Element]:
        found = []
        for child in self.children:
            classes = child.attrs.get("class", "").split()
            if child.tag == tag and (class_ is None or class_ in classes):
                found.append(child)
            found += child.find_all(tag, class_)
        return found

    def all_text(self) -> str:
        return self.text + "".join(child.all_text() for child in self.children)


class Tree(HTMLParser):
    """The dumped DOM as Elements: enough of a parser for the page's own markup."""

    VOID = frozenset({"img", "meta", "br", "hr", "link", "input"})

    def __init__(self, text: str):
        super().__init__()
        self.root = self.current = Element("document", {}, None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in self.VOID:
            self.current = element

    def handle_endtag(self, tag):
        element = self.current
        while element is not None and element.tag != tag:
            element = element.parent
        if element is not None and element.parent is not None:
            self.current = element.parent

    def handle_data(self, data):
        self.current.text += data


@pytest.fixture(scope="module")
def shown(prepared_mixed, tmp_path_factory) -> Element:
    """The page's DOM after Chromium loaded it and its script ran."""
    folder = tmp_path_factory.mktemp("chromium")
    return Tree(chromium(prepared_mixed / "report.html", folder, "--dump-dom")).root


def test_crop_windows_are_the_first_and_last_a_random_crop_can_take():
    assert crop_windows((100, 70), (96, 64)) == [(0, 0, 96, 64), (4, 6, 96, 64)]
    assert crop_windows((96, 64), (96, 64)) == [(0, 0, 96, 64)]  # stored cropped: the image


@needs_chromium
def test_every_bucket_is_shown_with_its_images_loaded(prepared_mixed, shown):
    body = shown.find_all("body")[0]
    assert body.attrs["data-broken"] == "0", "every image decodes in the browser"
    assert int(body.attrs["data-images"]) == len(shown.find_all("img")) > 0
    index = pq.read_table(prepared_mixed / "index.parquet").to_pylist()
    counts: dict[int, int] = {}
    for row in index:
        counts[row["bucket"]] = counts.get(row["bucket"], 0) + 1
    sections = {int(s.attrs["data-bucket"]): s for s in shown.find_all("section", "bucket")}
    assert sorted(sections) == sorted(counts)
    for bucket, section in sections.items():
        assert int(section.attrs["data-images"]) == counts[bucket]
        figures = section.find_all("figure", "sample")
        assert len(figures) == min(SAMPLES_PER_BUCKET, counts[bucket])
        assert all(len(figure.find_all("img")) == 1 for figure in figures)


@needs_chromium
def test_crop_windows_are_drawn_where_the_index_says(prepared_mixed, shown):
    rows = {row["key"]: row for row in pq.read_table(prepared_mixed / "index.parquet").to_pylist()}
    figures = shown.find_all("figure", "sample")
    overflowing = 0
    for figure in figures:
        row = rows[figure.attrs["data-key"]]
        stored_w, stored_h = row["stored_width"], row["stored_height"]
        bucket_w, bucket_h = row["bucket_width"], row["bucket_height"]
        svg = figure.find_all("svg")[0]
        assert svg.attrs["viewbox"] == f"0 0 {stored_w} {stored_h}"  # stored pixels
        drawn = {
            tuple(int(rect.attrs[name]) for name in ("x", "y", "width", "height"))
            for rect in figure.find_all("rect", "window")
        }
        # a random crop's window: anywhere from offset 0 to the overflow, bucket-sized
        assert drawn == {
            (0, 0, bucket_w, bucket_h),
            (stored_w - bucket_w, stored_h - bucket_h, bucket_w, bucket_h),
        }
        overflowing += (stored_w, stored_h) != (bucket_w, bucket_h)
        assert row["source"] in figure.attrs["title"]
        assert f"{row['width']}x{row['height']} source" in figure.attrs["title"]
    assert overflowing >= 2, "the dataset has images stored with overflow"
    assert {f.attrs["data-key"] for f in figures} == set(rows), "small buckets: all shown"


@needs_chromium
def test_rejections_and_duplicate_groups_are_listed(prepared_mixed, shown):
    rejects = pq.read_table(prepared_mixed / "rejects.parquet").to_pylist()
    reasons = {r.attrs["data-reason"]: r for r in shown.find_all("div", "reason")}
    assert sorted(reasons) == sorted({r["reason"] for r in rejects})
    for row in rejects:
        reason = reasons[row["reason"]]
        assert int(reason.attrs["data-count"]) == sum(r["reason"] == row["reason"] for r in rejects)
        listed = {i.attrs["data-source"]: i for i in reason.find_all("li", "rejected")}
        assert row["message"] in listed[row["source"]].all_text()
    listed = {i.attrs["data-source"]: i for i in shown.find_all("li", "rejected")}
    assert listed["very wide.png"].find_all("img"), "a thumbnail where the file decodes"
    assert not listed["broken.jpg"].find_all("img")
    (group,) = shown.find_all("div", "group")
    assert group.attrs["data-kept"] == "copies/img1 again.jpg"
    (kept,) = group.find_all("li", "kept")
    assert kept.attrs["data-source"] == "copies/img1 again.jpg" and kept.find_all("img")
    assert "kept" in kept.all_text()
    copies = {c.attrs["data-source"] for c in group.find_all("li", "copy")}
    assert copies == {"img1.jpg", "img1-copy.jpg"}


@needs_chromium
def test_the_screenshot_is_kept(prepared_mixed, tmp_path):
    screenshot = tmp_path / "report.png"
    chromium(
        prepared_mixed / "report.html",
        tmp_path,
        f"--screenshot={screenshot}",
        "--window-size=1200,2400",
    )
    assert screenshot.stat().st_size > 10_000
    if artifacts := os.environ.get("ARB_TEST_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artifacts) / "report.png")


def test_an_incremental_run_rebuilds_the_page(prepared_mixed, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(prepared_mixed.parent / "images", images)
    shutil.copytree(prepared_mixed, tmp_path / "out")
    save(rgb(64, 64, 99), images / "new.jpg", quality=90)
    before = (tmp_path / "out" / "report.html").read_text()
    with ray_started():
        run(
            PrepareConfig(
                input=str(images),
                output=str(tmp_path / "out"),
                buckets=SMALL_BUCKETS,
                batch_size=2,
                world_size=2,
                incremental=True,
            )
        )
    after = (tmp_path / "out" / "report.html").read_text()
    assert "<h1>12 images in 4 buckets" in before and "<h1>13 images in 4 buckets" in after


def test_copies_name_the_copy_kept():
    assert kept_copy("a.jpg", "duplicate_content", copy_message("the same bytes", "b c.jpg")) == (
        "b c.jpg"
    )
    near = copy_message("nearly the same picture", "x/b.jpg")
    assert kept_copy("a.jpg", "near_duplicate", near) == "x/b.jpg"
    assert kept_copy("a.jpg", "duplicate", "the same file is listed more than once") == "a.jpg"
    assert kept_copy("a.jpg", "corrupt", "OSError: ..., which is kept") is None


def test_near_duplicates_are_grouped_with_the_copy_kept(prepared_mixed, tmp_path):
    """A `near_duplicate` rejection (the near-dedup check's) naming its kept image is grouped
    as exact copies are."""
    out = tmp_path / "out"
    shutil.copytree(prepared_mixed, out)
    rejects = pq.read_table(out / "rejects.parquet")
    near = {
        "source": ["img0 resized.jpg"],
        "reason": ["near_duplicate"],
        "message": [copy_message("nearly the same picture", "img0.jpg")],
        "key": [None],
        "size": [None],
        "mtime_ns": [None],
    }
    rejects = pa.concat_tables([rejects, pa.table(near, schema=rejects.schema)])
    pq.write_table(rejects.sort_by("source"), out / "rejects.parquet")
    stats = json.loads((out / "stats.json").read_text())
    stats["rejections_by_reason"]["near_duplicate"] = 1
    manifest = json.loads((out / "manifest.json").read_text())
    write_report_page(OutputDir(str(out)), stats, np.array(manifest["buckets"]), 0, None)
    page = Tree((out / "report.html").read_text()).root
    groups = {group.attrs["data-kept"]: group for group in page.find_all("div", "group")}
    assert set(groups) == {"copies/img1 again.jpg", "img0.jpg"}
    (kept,) = groups["img0.jpg"].find_all("li", "kept")
    assert kept.find_all("img"), "the kept image, from its shard"
    copies = [c.attrs["data-source"] for c in groups["img0.jpg"].find_all("li", "copy")]
    assert copies == ["img0 resized.jpg"]
