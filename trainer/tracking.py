"""What a run reports: a line on stdout at the first step and every few after it, and with
`--logging-dir` TensorBoard event files (loss, learning rate, samples/s, images/s per rank,
per-bucket counts each epoch, validation images). Rank 0 alone reports; the others only train."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image


class Tracker:
    def __init__(self, logging_dir: str, master: bool, world_size: int, log_every: int):
        self.master, self.world_size, self.log_every = master, world_size, log_every
        self.writer = None
        if master and logging_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(logging_dir)
        self.started, self.samples = time.perf_counter(), 0

    def step(self, step: int, epoch: int, loss: float, lr: float, samples: int) -> None:
        """After optimizer step `step`, which saw `samples` images on this rank."""
        self.samples += samples
        if not self.master:
            return
        rate = self.samples / (time.perf_counter() - self.started)  # this rank's images/s
        if self.writer is not None:
            for name, value in (
                ("loss", loss),
                ("lr", lr),
                ("images_per_s_per_rank", rate),
                ("samples_per_s", rate * self.world_size),
            ):
                self.writer.add_scalar(f"train/{name}", value, step)
        if step == 1 or step % self.log_every == 0:  # a first line at once, then every few
            total = rate * self.world_size
            line = f"epoch {epoch} step {step} loss {loss:.4f} lr {lr:.3g} {total:.1f} img/s"
            print(f"{line} ({self.world_size} ranks)", flush=True)

    def buckets(self, epoch: int, counts: dict[str, int]) -> None:
        """Images per bucket resolution in this epoch on rank 0."""
        if self.writer is not None:
            for bucket, count in counts.items():
                self.writer.add_scalar(f"buckets/{bucket}", count, epoch)

    def images(self, step: int, images: list[Image.Image]) -> None:
        if self.writer is not None:
            for number, image in enumerate(images):
                self.writer.add_image(
                    f"validation/{number}", np.asarray(image), step, dataformats="HWC"
                )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
