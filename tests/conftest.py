"""Shared test settings: hypothesis examples sized for a 2-core CI machine, and the trainer's
default cache (its index maps) in a temporary folder, and S3 test credentials, for this process
and what it starts (Ray workers, torchrun ranks).

HYPOTHESIS_PROFILE=thorough runs twenty times as many examples.
"""

import atexit
import contextlib
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

_CACHE = tempfile.mkdtemp(prefix="arb-tests-cache-")  # never $HOME/.cache
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# The S3 tests' credentials, as users give them, from the start: the session's Ray (started
# once) and the torchrun ranks inherit them; every S3 URI names the loopback server (s3_server).
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
os.environ.update(S3_CREDENTIALS)

from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pytest  # noqa: E402
from images import datasets_parquet, jpeg_bytes, rgb, save  # noqa: E402

from pipeline.buckets import BucketConfig  # noqa: E402
from pipeline.config import PrepareConfig, WriteOptions  # noqa: E402
from pipeline.prepare import run  # noqa: E402

# Modules that run Ray clusters of their own: they stop the session's Ray, so they run last.
OWN_CLUSTERS = ("test_cluster.py", "test_cluster_launcher.py")


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: item.path.name in OWN_CLUSTERS)  # stable: otherwise as collected


@contextlib.contextmanager
def ray_started():
    """The session's local Ray with 2 CPUs (this machine has 2 cores): started on first use and
    shut down once, when the session ends (`stop_ray`). Ray is not restarted within a process:
    its core worker's native threads outlive `ray.shutdown()`, and a process that started Ray
    again and again has crashed at interpreter exit; a start also costs seconds."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


def stop_ray() -> None:
    """Shut the session's Ray down, if it runs: before a test starts a cluster of its own."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus) -> None:
    stop_ray()


@pytest.fixture(scope="module")
def local_ray():
    """Ray for the module's tests."""
    with ray_started():
        yield


SMALL_BUCKETS = BucketConfig(max_area=96 * 64, max_side=128, min_side=32, step=32, square=64)
# Very uneven buckets, none a multiple of the batch sizes used: 17 wide, 7 tall, 4 square, 3 long.
SHAPES = [(96, 64)] * 17 + [(64, 96)] * 7 + [(64, 64)] * 4 + [(128, 32)] * 3


def prepare_small(folder: Path, image_format: str = "jpg", shapes: list = SHAPES) -> Path:
    """`shapes` prepared into folder/out with SMALL_BUCKETS, shards written as `image_format`."""
    for i, (width, height) in enumerate(shapes):
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


def prepare_mixed(folder: Path) -> Path:
    """Every kind of input and outcome a user meets, prepared into folder/out with
    SMALL_BUCKETS (stored uncropped, with overflow): loose files of four shapes, two exact
    copies of one, a corrupt file, an image too wide for every bucket, a WebDataset tar and a
    Parquet file of images (with a row that is no image)."""
    import webdataset

    images = folder / "images"
    shapes = [(96, 64), (100, 64), (64, 96), (64, 64), (130, 32), (96, 70)]
    for i, (width, height) in enumerate(shapes):
        save(rgb(width, height, i), images / f"img{i}.jpg", quality=90)
    (images / "copies").mkdir()
    (images / "copies" / "img1 again.jpg").write_bytes((images / "img1.jpg").read_bytes())
    (images / "img1-copy.jpg").write_bytes((images / "img1.jpg").read_bytes())
    (images / "broken.jpg").write_bytes((images / "img0.jpg").read_bytes()[:200])
    save(rgb(400, 40, 9), images / "very wide.png")
    with webdataset.TarWriter(str(images / "web.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg_bytes(64, 96, 20 + i), "txt": "tar"})
    rows = [jpeg_bytes(96, 64, 30 + i) for i in range(3)] + [b"not an image"]
    datasets_parquet(images / "rows.parquet", rows, ["row"] * 4, row_group_size=2)
    with ray_started():
        run(
            PrepareConfig(
                input=str(images),
                output=str(folder / "out"),
                buckets=SMALL_BUCKETS,
                batch_size=2,
                world_size=2,
            )
        )
    return folder / "out"


@pytest.fixture(scope="module")
def prepared_mixed(tmp_path_factory) -> Path:
    return prepare_mixed(tmp_path_factory.mktemp("mixed"))


class S3Server(NamedTuple):
    """A moto S3 server on loopback: its boto3 client, and the URI options that reach it."""

    client: object
    # endpoint_override=127.0.0.1:PORT&scheme=http&region=us-east-1&allow_delayed_open=true:
    # the last makes pyarrow write small files with one PutObject; its multipart uploads' last
    # call fails against moto 5.2 (pyarrow 26 finds an error in moto's 200 answer)
    options: str

    def uri(self, bucket: str, prefix: str) -> str:
        return f"s3://{bucket}/{prefix}?{self.options}"

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file under `folder` to s3://bucket/prefix/...; the prefix's URI."""
        self.client.create_bucket(Bucket=bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return self.uri(bucket, prefix)


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 for the session (S3_CREDENTIALS reach it)."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    try:
        yield S3Server(
            client,
            f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
            "&allow_delayed_open=true",
        )
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random diffusers checkpoints of sd, sdxl, sd3 and flux (trainer/tiny.py),
    built and saved once for the session: family -> folder."""
    from trainer.tiny import build

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build(family, root / family) for family in ("sd", "sdxl", "sd3", "flux")}
