"""The cluster launcher path for real: `ray up`, `ray submit jobs/prepare.py`, `ray down` over
SSH to this machine with cluster.yaml's settings and cluster-onprem.yaml's provider, and the
on-premises config in step with cluster.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROVIDER_KEYS = {"provider", "auth", "available_node_types", "head_node_type"}
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
# What the launcher writes into the head's home: the synced project, its bootstrap files, the
# submitted script.
LEFT_IN_HOME = ("arb-pipeline", "ray_bootstrap_config.yaml", "ray_bootstrap_key.pem", "prepare.py")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_the_onprem_config_is_cluster_yaml_but_for_provider_and_login():
    cloud, onprem = load("cluster.yaml"), load("cluster-onprem.yaml")
    assert onprem["provider"]["type"] == "local" and "ssh_user" in onprem["auth"]
    shared = set(cloud) - PROVIDER_KEYS
    assert shared <= set(onprem), f"missing from cluster-onprem.yaml: {shared - set(onprem)}"
    assert {key: onprem[key] for key in shared} == {key: cloud[key] for key in shared}
    assert set(onprem) - PROVIDER_KEYS == shared, "cluster-onprem.yaml has settings of its own"


@pytest.fixture
def ssh_login(tmp_path):
    """Root's SSH login to this machine over no network at all: Ray's SSH client runs sshd in
    inetd mode as its ProxyCommand (Ray's launcher has no port option, and a server on port 22
    could clash with the machine's own). Keys made for the test. Its `auth` block for Ray."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if os.geteuid() != 0:
        pytest.skip("needs root: sshd logs the launcher in as root")
    if not os.path.exists(sshd) or not shutil.which("rsync"):
        pytest.skip("needs sshd and rsync: apt-get install openssh-server rsync (.ci/run does)")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys / name],
                       check=True)  # fmt: skip
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    config = keys / "sshd_config"
    config.write_text(
        f"HostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    yield {
        "ssh_user": "root",
        "ssh_private_key": str(keys / "client"),
        "ssh_proxy_command": f"{sshd} -i -f {config}",
    }
    # Ray keeps a master connection open for 10 s: close it now, which ends the server's side
    for socket_path in Path("/tmp").glob("ray_ssh_*/*/*"):
        if socket_path.is_socket():
            subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "x"],
                           capture_output=True, check=False)  # fmt: skip
    deadline = time.monotonic() + 20
    while subprocess.run(["pgrep", "-f", str(config)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the test's SSH server does not end"
        time.sleep(0.2)


def _ray(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return subprocess.run(
        [*RAY, *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout
    )


def _ray_processes() -> list[str]:
    found = subprocess.run(["pgrep", "-a", "-f", "raylet|gcs_server"], capture_output=True,
                           text=True).stdout  # fmt: skip
    return [line for line in found.splitlines() if "pgrep" not in line]


@pytest.mark.slow
def test_ray_up_submit_and_down_on_premises(ssh_login, tmp_path):
    if _ray_processes():
        pytest.skip("a Ray cluster runs on this machine already")
    left_in_home = [Path.home() / name for name in LEFT_IN_HOME]
    if any(path.exists() for path in left_in_home):
        pytest.skip(f"one of {LEFT_IN_HOME} is in {Path.home()} already: not ours to replace")
    # cluster.yaml's own settings (mounts, setup, start commands) with the on-premises provider
    config = {key: value for key, value in load("cluster.yaml").items() if key not in PROVIDER_KEYS}
    config["cluster_name"] = f"arb-test-{os.getpid()}"
    config["provider"] = load("cluster-onprem.yaml")["provider"] | {
        "head_ip": "127.0.0.1",
        "worker_ips": [],
    }
    config["auth"] = ssh_login
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "prepared"
    try:
        up = _ray("up", "-y", "--no-config-cache", str(config_path))
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        submitted = _ray(
            "submit", str(config_path), "jobs/prepare.py", "--",
            "--input", str(REPO / "examples" / "images"), "--output", str(output),
            "--batch-size", "4",
        )  # fmt: skip
        log = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, log[-6000:]
        assert "Connecting to existing Ray cluster" in log, "the job joined the launched cluster"
        assert "Started a local Ray instance" not in log
        counts = json.loads((output / "manifest.json").read_text())["counts"]
        assert counts == {"images": 12, "rejected": 1, "shards": 7}
    finally:
        down = _ray("down", "-y", str(config_path))
        # setup_commands installed the project from the synced copy: point it back here
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "-e", str(REPO)], check=True)  # fmt: skip
        for path in left_in_home:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(), "ray down leaves no Ray process"
