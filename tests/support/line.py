"""A toy model and its batches, for the accumulation tests: in-process
(tests/test_training_options.py) and under torchrun (accumulation_ranks.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class Line(nn.Module):
    """A toy model: the mean squared error of a linear map; forward(batch, generator)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 2)

    def forward(self, batch, generator):
        return nn.functional.mse_loss(self.layer(batch.pixels), batch.target)


def batch_of(rows: slice) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
    return SimpleNamespace(pixels=inputs[rows], target=targets[rows])
