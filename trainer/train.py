"""A thin DDP trainer on a prepared dataset: every batch one resolution, every rank the same steps.

One machine, N processes (gloo on CPU, NCCL on CUDA, chosen automatically):
    torchrun --standalone --nproc_per_node=N trainer/train.py --data OUT
Several machines (run on each, node_rank 0..nnodes-1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HEAD --master_port=29500 \\
        trainer/train.py --data OUT
One process without torchrun:
    python trainer/train.py --data OUT

The default model is a small fully convolutional denoiser trained to predict the noise added to
an image (the objective of a diffusion model at one noise level), so any resolution goes through
it and its loss falls on real prepared data. `build_model` and `loss_of` are the two places a real
diffusion model plugs in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.data import EpochBatches, PreparedData, make_loader


@dataclass(frozen=True)
class Config:
    data: str = ""  # a prepared dataset (jobs/prepare.py --output)
    out_dir: str = "checkpoints"  # checkpoints are written here by rank 0
    batch_size: int = 4  # per rank
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps of this run (0: all epochs)
    lr: float = 1e-3
    seed: int = 0  # data order, crops and the model's initialisation
    num_workers: int = 2  # DataLoader workers per rank
    checkpoint_every: int = 100  # steps; a checkpoint is also written at the end
    resume: bool = False  # continue from out_dir/checkpoint.pt exactly where it stopped
    log_every: int = 10  # steps between log lines
    channels: int = 32  # width of the default model
    noise: float = 0.5  # noise level of the denoising objective
    batch_log: str = ""  # if set, every rank appends each batch's keys and shape here (JSONL)


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(Config):
        if field.type == "bool":
            parser.add_argument(f"--{field.name.replace('_', '-')}", action="store_true")
        else:
            kind = {"int": int, "float": float, "str": str}[field.type]
            parser.add_argument(
                f"--{field.name.replace('_', '-')}", type=kind, default=field.default
            )
    return Config(**vars(parser.parse_args(argv)))


def build_model(config: Config) -> nn.Module:
    """A small fully convolutional denoiser: any image size in, the same size out."""
    c = config.channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.SiLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
        nn.Conv2d(c, 3, 3, padding=1),
    )  # fmt: skip


def loss_of(
    model: nn.Module, pixels: torch.Tensor, config: Config, generator: torch.Generator
) -> torch.Tensor:
    """Noise-prediction loss: the model sees pixels + noise and must name the noise."""
    noise = torch.randn(pixels.shape, generator=generator, device="cpu").to(pixels.device)
    return nn.functional.mse_loss(model(pixels + config.noise * noise), noise)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process without it."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def train(config: Config) -> dict:
    rank, world_size, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    checkpoint_path = Path(config.out_dir) / "checkpoint.pt"
    epoch, step = 0, 0
    if config.resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step = state["epoch"], state["step"]
    ddp = DistributedDataParallel(model) if world_size > 1 else model

    data = PreparedData(config.data)
    batches = EpochBatches(data, config.batch_size, seed=config.seed)  # rank: torch.distributed's
    loader = make_loader(data, batches, config.num_workers, device)
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)

    def save() -> None:
        if master:
            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "epoch": epoch, "step": step, "seed": config.seed}  # fmt: skip
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)

    steps_run, losses, started = 0, [], time.perf_counter()
    while epoch < config.epochs and not (config.max_steps and steps_run >= config.max_steps):
        batches.set_epoch(epoch, step)
        for batch in loader:
            loss = loss_of(ddp, batch.pixels, config, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, steps_run = batch.step + 1, steps_run + 1
            losses.append(loss.item())
            if config.batch_log:
                with open(config.batch_log, "a") as log:
                    log.write(json.dumps({
                        "rank": rank, "epoch": epoch, "step": batch.step, "keys": batch.keys,
                        "shape": list(batch.pixels.shape), "loss": losses[-1],
                        "checksum": float(batch.pixels.double().sum()),
                    }) + "\n")  # fmt: skip
            if steps_run % config.log_every == 0:
                rate = steps_run / (time.perf_counter() - started)
                print(
                    f"rank {rank} epoch {epoch} step {step} loss {losses[-1]:.4f} "
                    f"{rate:.2f} steps/s {rate * config.batch_size:.1f} img/s",
                    flush=True,
                )
            if steps_run % config.checkpoint_every == 0:
                save()
            if config.max_steps and steps_run >= config.max_steps:
                break
        else:
            epoch, step = epoch + 1, 0
    save()
    if world_size > 1:
        dist.destroy_process_group()
    return {"rank": rank, "steps": steps_run, "losses": losses}


if __name__ == "__main__":
    train(parse_config())
