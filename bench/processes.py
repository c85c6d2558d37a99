"""Watching a command and every process it starts, from /proc: peak memory by role (the driver,
Ray's workers, Ray's own services) and the CPU time of the whole tree over time, so that a bench
can say how busy the cores were during one stage of a job."""

from __future__ import annotations

import bisect
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

TICKS = os.sysconf("SC_CLK_TCK")
PSS_EVERY = 5  # samples: PSS, which is dear to read, on every fifth


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack += [int(child) for child in children.read().split()]
        except OSError:
            continue
    return pids


PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int) -> int:
    """Resident bytes of a process, cheaply (statm); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes; 0 when it is gone. PSS walks the page tables (smaps):
    a few ms for a Ray worker that maps the object store, so the watcher reads it less often."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            fields = dict(line.split(":", 1) for line in rollup if ":" in line)
        return (int(fields["Rss"].split()[0]) * 1024, int(fields["Pss"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        return 0, 0


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return None


def is_ray_worker(pid: int) -> bool:
    """A Ray worker: its title is ray::IDLE or ray::TASK while it lives."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read()
    except OSError:
        return False
    return command.startswith(b"ray::") or b"default_worker.py" in command


@dataclass
class Watched:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    times: list[float] = field(default_factory=list)  # unix time of each sample
    cpu: list[float] = field(default_factory=list)  # the tree's CPU seconds so far, at each
    peak_rss: int = 0  # summed over the tree
    peak_pss: int = 0
    driver_rss: int = 0  # the command's own process
    worker_rss: int = 0  # the largest single worker
    worker_pss: int = 0
    workers: int = 0  # the most workers alive at once

    def busy(self, start: float, end: float) -> float:
        """Share of `cores` x wall the tree was busy between two unix times: CPU seconds spent
        over that window (interpolated between samples) per second."""
        spent = self._cpu_at(end) - self._cpu_at(start)
        return spent / max(end - start, 1e-9)

    def _cpu_at(self, moment: float) -> float:
        i = bisect.bisect_left(self.times, moment)
        if i == 0:
            return self.cpu[0]
        if i >= len(self.times):
            return self.cpu[-1]
        t0, t1, c0, c1 = self.times[i - 1], self.times[i], self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * (moment - t0) / max(t1 - t0, 1e-9)


def watch(command: list[str], interval: float = 1.0, **popen) -> Watched:
    """Run `command` to its end, sampling its process tree every `interval` seconds."""
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    result = Watched(0, "", "", 0.0)
    last_cpu: dict[int, float] = {}  # a process that exits keeps what it spent

    def sample() -> None:
        samples = 0
        while child.poll() is None:
            pids = tree(child.pid)
            with_pss = samples % PSS_EVERY == 0
            usage = {pid: memory(pid) if with_pss else (rss(pid), 0) for pid in pids}
            for pid in pids:
                if (spent := cpu_seconds(pid)) is not None:
                    last_cpu[pid] = spent
            result.times.append(time.time())
            result.cpu.append(sum(last_cpu.values()))
            result.peak_rss = max(result.peak_rss, sum(u[0] for u in usage.values()))
            result.peak_pss = max(result.peak_pss, sum(u[1] for u in usage.values()))
            result.driver_rss = max(result.driver_rss, usage[child.pid][0])
            workers = [usage[pid] for pid in pids if is_ray_worker(pid)]
            result.workers = max(result.workers, len(workers))
            result.worker_rss = max([result.worker_rss, *(w[0] for w in workers)])
            result.worker_pss = max([result.worker_pss, *(w[1] for w in workers)])
            samples += 1
            time.sleep(interval)

    sampler = threading.Thread(target=sample)
    sampler.start()
    result.stdout, result.stderr = child.communicate()
    sampler.join()
    result.returncode, result.seconds = child.returncode, time.perf_counter() - start
    if not result.times:
        result.times, result.cpu = [time.time()], [0.0]
    return result
