"""trainer/train.py's `train`, watched from the test side: every micro-step's loss, and a
callback after each micro-step with what the tests look at. Nothing in the trainer knows.

    result = train(config, on_step=lambda step: seen.append(step.batch.keys))
    result["losses"]  # this rank's loss of every micro-step, in order
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple
from unittest import mock

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trainer.train
from trainer.config import Config
from trainer.loader import Batch
from trainer.optimization import Optimization


class Step(NamedTuple):
    """What `on_step` sees after each micro-batch."""

    rank: int
    batch: Batch
    loss: float
    model: nn.Module  # unwrapped from DDP
    lr: float


def train(config: Config, on_step: Callable[[Step], None] | None = None) -> dict:
    """`trainer.train.train(config)`'s result with "losses", the loss of each micro-step this
    rank ran; `on_step` called after each (before the optimizer steps on the group's last)."""
    losses = []
    micro_step = Optimization.micro_step

    def watched(optimization: Optimization, model: nn.Module, batch: Batch, *args, **kwargs):
        loss = micro_step(optimization, model, batch, *args, **kwargs)
        losses.append(loss)
        if on_step is not None:
            rank = dist.get_rank() if dist.is_initialized() else 0
            unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
            on_step(Step(rank, batch, loss, unwrapped, optimization.lr))
        return loss

    with mock.patch.object(Optimization, "micro_step", watched):
        result = trainer.train.train(config)
    return result | {"losses": losses}
