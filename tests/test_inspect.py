"""arb-inspect as a user runs it, a real process on a real prepared OUT: where a file went, why
one was rejected, that one was never seen, and what OUT holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent


def inspect(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.inspect", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )


def answers(stdout: str) -> dict[str, str]:
    """Each path's answer: its first line's verdict and the lines below it, by path."""
    found, path = {}, None
    for line in stdout.splitlines():
        if not line.startswith("  "):
            path, verdict = line.rsplit(": ", 1)
            found[path] = verdict
        else:
            found[path] += "\n" + line
    return found


def row_of(out: Path, source: str) -> dict:
    (row,) = [r for r in pq.read_table(out / "index.parquet").to_pylist() if r["source"] == source]
    return row


def test_kept_rejected_and_never_seen_files_are_told_apart(prepared_mixed):
    out = str(prepared_mixed)
    paths = [
        "copies/img1 again.jpg",  # kept, stored with overflow
        "img1.jpg",  # an exact copy of it
        "broken.jpg",
        "web.tar/000000001.jpg",  # a tar member
        "rows.parquet/000000002",  # a Parquet row
        "rows.parquet/3",  # another, its number as people write it
        "never.jpg",
    ]
    done = inspect(out, *paths)
    assert done.returncode == 1, done.stderr  # one was never seen
    told = answers(done.stdout)
    assert list(told) == paths
    kept = told["copies/img1 again.jpg"]
    row = row_of(prepared_mixed, "copies/img1 again.jpg")
    assert kept.startswith("kept")
    assert f"bucket 96x64 (#{row['bucket']}), stored 100x64" in kept
    assert "crop box (0, 0, 100, 64) of the fitted 100x64" in kept
    assert "96x64 window at x 0..4, y 0..0" in kept
    assert f"{row['shard']}, member {row['key']}.jpg" in kept
    copy = told["img1.jpg"]
    assert copy.startswith("rejected") and "duplicate_content" in copy
    assert "the same bytes as copies/img1 again.jpg, which is kept" in copy
    assert told["broken.jpg"].startswith("rejected") and "corrupt" in told["broken.jpg"]
    member = row_of(prepared_mixed, "web.tar/000000001.jpg")
    assert told["web.tar/000000001.jpg"].startswith("kept")
    assert f"member {member['key']}.jpg" in told["web.tar/000000001.jpg"]
    assert "caption: 'tar'" in told["web.tar/000000001.jpg"]
    assert told["rows.parquet/000000002"].startswith("kept")
    assert told["rows.parquet/3"].startswith("rejected")
    assert "not_an_image" in told["rows.parquet/3"]
    assert told["never.jpg"].startswith("never seen")


def test_absolute_and_dotted_paths_are_found(prepared_mixed):
    images = prepared_mixed.parent / "images"
    absolute, dotted, from_here = str(images / "img0.jpg"), "./img2.jpg", "images/img3.jpg"
    done = inspect(str(prepared_mixed), absolute, dotted, from_here, cwd=prepared_mixed.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    told = answers(done.stdout)
    assert all(verdict.startswith("kept") for verdict in told.values()), done.stdout
    assert "source img0.jpg, 96x64" in told[absolute]
    assert "source img3.jpg, 64x64" in told[from_here]


def test_the_summary_says_what_out_holds(prepared_mixed):
    done = inspect(str(prepared_mixed))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == "12 images in 4 buckets, 4 shards"
    assert "  96x64: 6" in lines
    assert "5 rejected: aspect 1, corrupt 1, duplicate_content 2, not_an_image 1" in lines
    assert any(line.startswith("settings: ") and "write.crop=none" in line for line in lines)


def test_a_folder_that_is_no_dataset_is_a_usage_error(tmp_path, prepared_mixed):
    done = inspect(str(tmp_path), "img0.jpg")
    assert done.returncode == 2 and "not a prepared dataset" in done.stderr
    assert "Traceback" not in done.stderr
    (tmp_path / "config.json").write_text("{}")
    done = inspect(str(tmp_path))
    assert done.returncode == 2 and "incomplete" in done.stderr
