"""Shared test settings: hypothesis examples sized for a 2-core CI machine, and the trainer's
default cache (its index maps) in a temporary folder, for this process and what it starts.

HYPOTHESIS_PROFILE=thorough runs twenty times as many examples.
"""

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

_CACHE = tempfile.mkdtemp(prefix="arb-tests-cache-")  # never $HOME/.cache
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

from hypothesis import settings

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pytest  # noqa: E402
from images import rgb, save  # noqa: E402

from pipeline.buckets import BucketConfig  # noqa: E402
from pipeline.config import PrepareConfig, WriteOptions  # noqa: E402
from pipeline.prepare import run  # noqa: E402


@contextlib.contextmanager
def ray_started():
    """A real local Ray with 2 CPUs (this machine has 2 cores), unless one is running already."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """Ray for the module's tests."""
    with ray_started():
        yield


SMALL_BUCKETS = BucketConfig(max_area=96 * 64, max_side=128, min_side=32, step=32, square=64)
# Very uneven buckets, none a multiple of the batch sizes used: 17 wide, 7 tall, 4 square, 3 long.
SHAPES = [(96, 64)] * 17 + [(64, 96)] * 7 + [(64, 64)] * 4 + [(128, 32)] * 3


def prepare_small(folder: Path, image_format: str = "jpg") -> Path:
    """SHAPES prepared into folder/out with SMALL_BUCKETS, shards written as `image_format`."""
    for i, (width, height) in enumerate(SHAPES):
        overflow = (i % 3, i % 4 == 3)  # stored a pixel or two wider or taller than the bucket
        save(
            rgb(width + overflow[0], height + overflow[1], i),
            folder / "images" / f"img{i:02d}.jpg",
            quality=90,
        )
        (folder / "images" / f"img{i:02d}.txt").write_text(f"caption {i}")
    with ray_started():
        run(
            PrepareConfig(
                input=str(folder / "images"),
                output=str(folder / "out"),
                buckets=SMALL_BUCKETS,
                samples_per_shard=5,
                write=WriteOptions(image_format=image_format),
            )
        )
    return folder / "out"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_small(tmp_path_factory.mktemp("trainer"))
