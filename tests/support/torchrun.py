"""Run a script under a real torchrun, stopping it and its ranks if it overruns: a timed-out
launcher must not leave rank processes behind that hold our pipes (the test would wait on them
forever) or the rendezvous port of the next test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def torchrun(
    nproc: int, script: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=nproc script args` in the
    repository; its output captured."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
        *args,
    ]
    with subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as overrun:
            _stop(process)
            raise overrun
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def logged_training(nproc: int, log: Path, *args: str, timeout: float = 240) -> list[dict]:
    """tests/support/logged_train.py under torchrun with the trainer's `args`, logging to `log`:
    every rank's logged batches in the order they were logged; a failed run fails the test."""
    done = torchrun(nproc, "tests/support/logged_train.py", str(log), *args, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM first: torchrun then stops its ranks, which run in sessions of their own (a
    killed launcher would leave them running, holding our pipes); then SIGKILL to the group."""
    process.terminate()
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
