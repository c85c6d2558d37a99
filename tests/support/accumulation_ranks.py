"""Run by tests/test_training_options.py under torchrun with 2 ranks (gloo): four micro-batches
of 2 on each rank, DDP synchronising once, against one batch of all 16 rows on one model."""

from __future__ import annotations

import torch
import torch.distributed as dist
from line import Line, batch_of
from torch.nn.parallel import DistributedDataParallel

from trainer.optimization import Optimization


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = Line()
    ddp = DistributedDataParallel(model)
    optimization = Optimization.build(model, torch.device("cpu"), 0.1, "constant", 0, 10)
    rows = [slice(4 * rank + 2 * i, 4 * rank + 2 * i + 2) for i in range(2)] * 2
    for position, part in enumerate(rows):  # rows of this rank, twice: 4 micro-batches
        optimization.micro_step(ddp, batch_of(part), None, position == 3, 4)
    optimization.step()
    reference = Line()
    whole = Optimization.build(reference, torch.device("cpu"), 0.1, "constant", 0, 10)
    everything = [slice(0, 4), slice(0, 4), slice(4, 8), slice(4, 8)]  # both ranks' rows
    for position, part in enumerate(everything):
        whole.micro_step(reference, batch_of(part), None, position == 3, 4)
    whole.step()
    for ours, expected in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(ours, expected, atol=1e-6), (ours, expected)
    if rank == 0:
        print("same update")
    del ddp  # its Reducer lets go of the process group first (trainer/train.py says why)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
