"""The prepare job on several Ray nodes, and as a job submitted to a running cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from images import rgb, save
from ray.cluster_utils import Cluster

from pipeline.config import PrepareConfig
from pipeline.prepare import run

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def make_images(folder: Path, count: int) -> set[str]:
    for i in range(count):
        width, height = (1400, 1050) if i % 2 else (1050, 1400)
        save(rgb(width, height, i), folder / f"image {i:03d}.jpg", quality=85)
    return {f"image {i:03d}.jpg" for i in range(count)}


def sample_counts(output: Path) -> Counter:
    counts = Counter()
    for path in (output / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            counts.update(m.name.split(".")[0] for m in tar if m.name.endswith(".jpg"))
    return counts


@pytest.fixture
def three_nodes():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_a_node_lost_mid_write_loses_and_duplicates_nothing(three_nodes, tmp_path):
    cluster, workers = three_nodes
    images = make_images(tmp_path / "images", 40)
    output = tmp_path / "out"
    config = PrepareConfig(input=str(tmp_path / "images"), output=str(output), samples_per_shard=2)
    failure: list[BaseException] = []

    def job():
        try:
            run(config)
        except BaseException as error:  # surfaced by the assertion below
            failure.append(error)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 120
    while len(list((output / "shards").glob("*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    cluster.remove_node(workers[1])  # tasks running there die with it and are retried
    thread.join(timeout=300)
    assert not thread.is_alive() and not failure, failure

    index = pq.read_table(output / "index.parquet").to_pylist()
    assert sorted(row["source"] for row in index) == sorted(images)
    assert sample_counts(output) == Counter(row["key"] for row in index), (
        "each image in one tar, once"
    )
    assert not list(output.rglob("*.tmp-*")), "no half-written file is left"
    assert (output / "manifest.json").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_job_submit_against_a_started_cluster(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    images = make_images(tmp_path / "images", 6)
    output = tmp_path / "out"
    dashboard = free_port()
    # Ray 2.5x starts clusters with token auth; the job CLI must be told to send the token.
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "token"
    }
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run(
        [
            *ray_cli,
            "start",
            "--head",
            "--num-cpus=2",
            f"--port={free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
        ],
        check=True,
        env=environment,
        capture_output=True,
        timeout=180,
    )
    try:
        submitted = subprocess.run(
            [
                *ray_cli,
                "job",
                "submit",
                f"--address=http://127.0.0.1:{dashboard}",
                f"--working-dir={REPO}",
                "--",
                sys.executable,
                "jobs/prepare.py",
                f"--input={tmp_path / 'images'}",
                f"--output={output}",
            ],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run(
            [*ray_cli, "stop", "--force"], env=environment, capture_output=True, timeout=120
        )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout
    assert json.loads((output / "manifest.json").read_text())["counts"]["images"] == len(images)


def test_the_readme_command_on_the_example_images(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    output = tmp_path / "example"
    command = [
        sys.executable,
        "jobs/prepare.py",
        "--input",
        "examples/images",
        "--output",
        str(output),
    ]
    for _ in range(2):  # the second run shows --overwrite makes the command safe to repeat
        done = subprocess.run(
            [*command, "--overwrite", "--num-cpus=2"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((output / "manifest.json").read_text())["counts"] == {
        "images": 12,
        "rejected": 1,
        "shards": 7,
    }
    assert "12 images kept" in done.stdout and "corrupt 1" in done.stdout
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--incremental" in refused.stderr
