"""What the test session itself guarantees: one local Ray a process, started on first use and
never restarted (a process that started Ray again and again has crashed at interpreter exit),
and a session over several modules that use it exiting with status 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray
from conftest import ray_started

REPO = Path(__file__).resolve().parent.parent


def test_ray_is_started_once_a_session():
    with ray_started():
        first = ray.get_runtime_context().get_node_id()
    assert ray.is_initialized(), "leaving the block keeps the session's Ray"
    with ray_started():
        assert ray.get_runtime_context().get_node_id() == first


@pytest.mark.slow
def test_a_session_over_modules_that_use_ray_exits_with_status_0(tmp_path):
    modules = ["tests/test_bad_inputs.py", "tests/test_orientation.py", "tests/test_assign.py"]
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "faulthandler",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'run'}",
            *modules,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
