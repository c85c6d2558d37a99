"""What importing a module loads, in a fresh interpreter: the core is NumPy and the standard
library alone; the format, which a training process reads a dataset with, loads neither
libvips, Ray, torch, webdataset, Pillow nor a stage of the job; the trainer loads the core and
the format, never libvips, Ray or a stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE = [
    "pipeline.buckets",
    "pipeline.fit",
    "pipeline.near_dedup",
    "pipeline.plan",
    "pipeline.shard_plan",
    "pipeline.work_plan",
]
HEAVY = {"pyvips", "cv2", "ray", "torch", "webdataset", "PIL", "diffusers"}


def loaded(statement: str) -> set[str]:
    """The names in sys.modules after `statement` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", f"import sys\n{statement}\nprint(*sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(done.stdout.split())


@pytest.fixture(scope="module")
def at_start() -> set[str]:
    """What the interpreter holds before any import (site hooks, the editable install's)."""
    return loaded("pass")


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_numpy_and_the_standard_library_alone(module, at_start):
    imported = loaded(f"import {module}") - at_start
    packages = {name.split(".")[0] for name in imported} - set(sys.stdlib_module_names)
    assert packages <= {"numpy", "pipeline"}
    assert {name for name in imported if name.startswith("pipeline.")} <= {*CORE, "pipeline.cli"}


def test_the_format_loads_nothing_heavy_and_no_stage(at_start):
    imported = loaded("import pipeline.format") - at_start
    assert not {name.split(".")[0] for name in imported} & HEAVY
    assert {name for name in imported if name.startswith("pipeline.")} == {"pipeline.format"}


STAGES = {
    "pipeline.inputs",
    "pipeline.sources",
    "pipeline.readers",
    "pipeline.scan",
    "pipeline.perceptual",
    "pipeline.assign",
    "pipeline.imaging",
    "pipeline.samples",
    "pipeline.shard_writer",
    "pipeline.text_cache",
    "pipeline.text_encoders",
    "pipeline.output",
    "pipeline.latents",
    "pipeline.distributor",
    "pipeline.prepare",
    "pipeline.report",
    "pipeline.rejects",
    "pipeline.job",
}


def test_the_trainer_imports_the_core_and_the_format_never_a_stage(at_start):
    imported = loaded("import trainer.train") - at_start
    assert not {"pyvips", "cv2", "ray", "webdataset"} & {name.split(".")[0] for name in imported}
    assert not STAGES & imported, STAGES & imported
