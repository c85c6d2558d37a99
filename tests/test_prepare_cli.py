"""jobs/prepare.py as a new user meets it: mistakes answered clearly before Ray starts, and a
summary at the end of every run."""

from __future__ import annotations

import dataclasses
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from images import rgb, save

REPO = Path(__file__).resolve().parent.parent


def prepare(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/prepare.py", *args, "--num-cpus=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def four_images(folder: Path) -> Path:
    for i, size in enumerate([(800, 600), (600, 800), (700, 700), (900, 600)]):
        save(rgb(*size, i), folder / f"image {i}.jpg", quality=85)
    return folder


def refused_before_ray(done: subprocess.CompletedProcess, output: Path) -> str:
    assert done.returncode == 2, done.stderr
    assert "Started a local Ray" not in done.stderr, "answered before Ray starts"
    assert "Traceback" not in done.stderr
    assert not output.exists(), "nothing is created"
    return done.stderr


def test_a_missing_input_is_named(tmp_path):
    message = refused_before_ray(
        prepare("--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")),
        tmp_path / "out",
    )
    assert str(tmp_path / "nowhere") in message and "does not exist" in message


def test_an_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not an image")
    message = refused_before_ray(
        prepare("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")),
        tmp_path / "out",
    )
    assert str(tmp_path / "empty") in message and "no image files" in message


def test_a_file_that_is_not_a_listing_is_named(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8 not really")
    message = refused_before_ray(
        prepare("--input", str(tmp_path / "photo.jpg"), "--output", str(tmp_path / "out")),
        tmp_path / "out",
    )
    assert "photo.jpg" in message and ".parquet" in message and ".csv" in message


@pytest.mark.parametrize("inside", ["output in input", "input in output"])
def test_output_and_input_must_not_nest(tmp_path, inside):
    if inside == "output in input":
        images, output = four_images(tmp_path / "images"), tmp_path / "images" / "prepared"
    else:
        images, output = four_images(tmp_path / "out" / "images"), tmp_path / "out"
    done = prepare("--input", str(images), "--output", str(output))
    assert done.returncode == 2 and "inside" in done.stderr, done.stderr
    assert "Started a local Ray" not in done.stderr
    assert not (output / "config.json").exists()


@pytest.mark.slow
def test_a_run_ends_with_a_summary_and_warns_when_an_epoch_drops_images(tmp_path):
    images, output = four_images(tmp_path / "images"), tmp_path / "out"
    for i in range(6):
        (images / f"broken {i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    done = prepare("--input", str(images), "--output", str(output), "--batch-size", "32")
    assert done.returncode == 0, done.stderr
    summary = done.stdout
    assert "4 images kept" in summary
    assert "6 rejected" in summary and "corrupt 6" in summary
    for i in range(5):
        assert f"broken {i}.jpg (corrupt) is an image whose header" in summary, summary
    assert "broken 5.jpg" not in summary and "... and 1 more" in summary
    listing = re.search(r"as CSV: (python3 .*)", summary)
    assert listing, "the summary says how to list every rejected file"
    listed = subprocess.run(listing[1], shell=True, capture_output=True, text=True, timeout=60)
    assert all(f'"broken {i}.jpg","corrupt"' in listed.stdout for i in range(6)), listed
    assert str(output) in summary
    assert re.search(r"epoch .*0 of 4 images", summary)
    assert "warning" in summary.lower() and "--batch-size" in summary
    assert "Token authentication" not in done.stderr, "Ray's notice of its default is dropped"
    assert not re.search(r"\d+\.\d+/\d+\.\d+", done.stderr), "progress counts are integers"
    assert re.search(r"\b10/10\b", done.stderr), "the scan counts its 10 files"
    stats = json.loads((output / "stats.json").read_text())
    assert stats["warnings"] and stats["epoch"]["images_used"] == 0

    again = prepare("--input", str(images), "--output", str(output), "--quality", "80")
    assert again.returncode == 2
    assert "write.quality: 95 -> 80" in again.stderr, again.stderr


def test_model_sets_its_familys_grid_and_a_bucket_flag_overrides_it(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.buckets import bucketize, model_grid

    images, output = four_images(tmp_path / "images"), tmp_path / "out"
    done = prepare(
        "--input", str(images), "--output", str(output), "--model", "sdxl", "--square", "768"
    )
    assert done.returncode == 0, done.stderr
    settings = json.loads((output / "config.json").read_text())
    assert settings["model"] == "sdxl"
    assert settings["buckets"] == dataclasses.asdict(model_grid("sdxl", square=768))
    index = pq.read_table(output / "index.parquet").to_pylist()
    expected = bucketize(
        [row["width"] for row in index],
        [row["height"] for row in index],
        model_grid("sdxl", square=768),
    )
    stored = [(row["bucket_width"], row["bucket_height"]) for row in index]
    assert stored == [tuple(expected.buckets[i]) for i in expected.index]
    assert (768, 768) in stored  # the square image, in the overridden square bucket


HEAVY = ("ray", "torch", "pyvips", "cv2", "webdataset", "diffusers")  # seconds to import, together


@pytest.mark.parametrize("script", ["jobs/prepare.py", "trainer/train.py", "trainer/sample.py"])
def test_help_answers_before_anything_heavy_is_imported(script):
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print('IMPORTED', sorted(set({HEAVY!r}) & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip().endswith("IMPORTED []"), done.stdout[-300:] + done.stderr
    assert "usage:" in done.stdout
    assert not re.search(r"default: [(\[]|default: \)|\(default: \)", done.stdout), (
        "defaults as typed: 1,2,1, not (1.0, 2.0, 1.0)"
    )


def test_the_help_shows_choices_and_defaults_as_typed():
    sys.path.insert(0, str(REPO))
    from trainer.config import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--model {conv,sd,sdxl,sd3,flux}" in text
    assert "--mixed-precision {no,fp16,bf16}" in text
    assert "(default: 1,2,1)" in text and "(default: 0.001)" in text
    assert "(default: )" not in text


def test_every_option_is_explained():
    sys.path.insert(0, str(REPO))
    from trainer.config import build_parser

    for parser in (
        runpy.run_path(str(REPO / "jobs" / "prepare.py"))["build_parser"](),
        build_parser(),
    ):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{action.option_strings} has no help text"
            if action.default not in (None, "", (), False) and not action.required:
                assert "default" in formatter._expand_help(action), action.option_strings


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--model", "gan"], "--model"),
        (["--max-tokens", "100"], "--max-tokens"),
        (["--hypernetwork-structure", "2,1"], "--hypernetwork-structure"),
        ([], "--data"),
    ],
)
def test_the_trainer_refuses_bad_options_by_name_before_building_anything(flags, named):
    done = subprocess.run(
        [sys.executable, "trainer/train.py", *(["--data", "x"] if flags else []), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
