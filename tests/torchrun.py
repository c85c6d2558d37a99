"""Run a script under a real torchrun, killing its whole process group if it overruns: a timed-out
launcher must not leave rank processes behind that hold the rendezvous port for the next test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def torchrun(
    nproc: int, script: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=nproc script args` in the
    repository; its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script, *args]  # fmt: skip
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
