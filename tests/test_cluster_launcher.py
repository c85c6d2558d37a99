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
INSTALLED_FROM = (
    "import importlib.metadata as m;"
    "print(m.distribution('arb-pipeline').read_text('direct_url.json'))"
)


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_the_onprem_config_is_cluster_yaml_but_for_provider_and_login():
    cloud, onprem = load("cluster.yaml"), load("cluster-onprem.yaml")
    assert onprem["provider"]["type"] == "local" and "ssh_user" in onprem["auth"]
    shared = set(cloud) - PROVIDER_KEYS
    assert shared <= set(onprem), f"missing from cluster-onprem.yaml: {shared - set(onprem)}"
    assert {key: onprem[key] for key in shared} == {key: cloud[key] for key in shared}
    assert set(onprem) - PROVIDER_KEYS == shared, "cluster-onprem.yaml has settings of its own"


def installed_from(python: str | Path, cwd: Path) -> str:
    """Where `python`'s environment has arb-pipeline from (pip's direct_url.json)."""
    found = subprocess.run(
        [python, "-c", INSTALLED_FROM], cwd=cwd, capture_output=True, text=True, check=True
    )
    return found.stdout


@pytest.fixture
def head_home(tmp_path):
    """The head's home for the test's login, so that the launcher's files (the synced project,
    bootstrap files, the submitted script) and setup_commands' pip install land in the test's
    own home and venv, not in root's. The venv sees this environment's packages (ray and the
    dependencies: nothing to download) but installs nothing into it."""
    home = tmp_path / "home"
    venv = home / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True
    )
    # The head's `ray`, in the venv so that its workers import the project from there (root's
    # own `ray` is pyenv's, which the login shell's PATH leaves out)
    ray = venv / "bin" / "ray"
    ray.write_text(f'#!/bin/sh\nexec {venv}/bin/python3 -m ray.scripts.scripts "$@"\n')
    ray.chmod(0o755)
    # Ray's commands run in a login shell (/etc/profile resets root's PATH, then ~/.profile) that
    # sources ~/.bashrc; sshd starts sessions in passwd's home (/root), so the shell moves here
    # and any relative path lands in this home too (Ray's own paths are all ~/).
    (home / ".profile").write_text(f'export PATH="{venv}/bin:$PATH"\ncd "$HOME"\n')
    (home / ".bashrc").touch()
    return home


@pytest.fixture
def ssh_login(tmp_path, head_home):
    """Root's SSH login to this machine over no network at all: Ray's SSH client runs sshd in
    inetd mode as its ProxyCommand (Ray's launcher has no port option, and a server on port 22
    could clash with the machine's own), with `head_home` for HOME (SetEnv overrides the one from
    passwd). Keys made for the test. Its `auth` block for Ray."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if os.geteuid() != 0:
        pytest.skip("needs root: sshd logs the launcher in as root")
    if not os.path.exists(sshd) or not shutil.which("rsync"):
        pytest.skip("needs sshd and rsync: apt-get install openssh-server rsync (.ci/run does)")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys / name], check=True
        )
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    config = keys / "sshd_config"
    config.write_text(
        f"HostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSetEnv HOME={head_home}\n"
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
            subprocess.run(
                ["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "x"],
                capture_output=True,
                check=False,
            )
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
    found = subprocess.run(
        ["pgrep", "-a", "-f", "raylet|gcs_server"], capture_output=True, text=True
    ).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


@pytest.mark.slow
def test_ray_up_submit_and_down_on_premises(ssh_login, head_home, tmp_path):
    if _ray_processes():
        pytest.skip("a Ray cluster runs on this machine already")
    real_home = sorted(os.listdir(Path.home()))
    real_install = installed_from(sys.executable, tmp_path)
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
        synced = head_home / "arb-pipeline"
        assert (synced / "pipeline" / "prepare.py").exists(), "file_mounts synced the project"
        installed = installed_from(head_home / "venv" / "bin" / "python3", tmp_path)
        assert json.loads(installed)["url"] == synced.as_uri(), "setup_commands installed it"
        submitted = _ray(
            "submit",
            str(config_path),
            "jobs/prepare.py",
            "--",
            "--input",
            str(REPO / "examples" / "images"),
            "--output",
            str(output),
            "--batch-size",
            "4",
        )
        log = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, log[-6000:]
        assert "Connecting to existing Ray cluster" in log, "the job joined the launched cluster"
        assert "Started a local Ray instance" not in log
        counts = json.loads((output / "manifest.json").read_text())["counts"]
        assert counts == {"images": 12, "rejected": 1, "shards": 7}
    finally:
        down = _ray("down", "-y", str(config_path))
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(), "ray down leaves no Ray process"
    assert sorted(os.listdir(Path.home())) == real_home, "the launcher wrote into the real home"
    assert installed_from(sys.executable, tmp_path) == real_install, "and installed into this env"
