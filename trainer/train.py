"""A thin DDP trainer on a prepared dataset: every batch one resolution, every rank the same steps.

One machine, N processes (gloo on CPU, NCCL on CUDA, chosen automatically):
    torchrun --standalone --nproc_per_node=N trainer/train.py --data OUT
Several machines (run on each, node_rank 0..nnodes-1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HEAD --master_port=29500 \\
        trainer/train.py --data OUT
One process without torchrun:
    python trainer/train.py --data OUT

Models (`--model`): `conv`, a small fully convolutional denoiser trained to predict the noise
added to an image (any resolution goes through it; a smoke test of the data path), and `sd`, a
Stable Diffusion 1.x U-Net conditioned by CLIP with the source's techniques: prompts of up to 225
tokens, the penultimate CLIP layer, and hypernetworks on cross-attention's k and v (trained alone
on the frozen base, the source's use, or `--train-part unet`). `--pretrained DIR` loads a local
diffusers-layout checkpoint; without it, tiny random models. Every model's forward returns its
loss, so `build_model` is the one place another model plugs in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.data import EpochBatches, PreparedData, make_loader


def _option(default, help: str):
    """A Config field with its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    data: str = _option("", "a prepared dataset (jobs/prepare.py --output)")
    out_dir: str = _option("checkpoints", "where rank 0 writes checkpoints and results")
    batch_size: int = _option(4, "images per batch on each rank")
    epochs: int = _option(1, "epochs to train")
    max_steps: int = _option(0, "stop after this many steps of this run (0: all epochs)")
    lr: float = _option(1e-3, "AdamW learning rate")
    seed: int = _option(0, "data order, crops and the model's initialisation")
    num_workers: int = _option(2, "DataLoader workers per rank (at most its cores minus one)")
    checkpoint_every: int = _option(100, "steps between checkpoints (and one at the end)")
    resume: bool = _option(False, "continue from OUT_DIR/checkpoint.pt exactly where it stopped")
    log_every: int = _option(10, "steps between log lines")
    model: str = _option("conv", "conv (a small denoiser, a smoke test) or sd (U-Net + CLIP)")
    channels: int = _option(32, "conv: width")
    noise: float = _option(0.5, "conv: noise level of the denoising objective")
    pretrained: str = _option(
        "", "sd: local diffusers-layout checkpoint folder (empty: tiny random models)"
    )
    train_part: str = _option("hypernetwork", "sd: hypernetwork (U-Net frozen) or unet")
    max_tokens: int = _option(225, "sd: prompt limit in tokens, a multiple of 75")
    clip_skip: int = _option(2, "sd: 2 = CLIP's penultimate layer (the source's), 1 = the last")
    prompt_layout: str = _option(
        "full",
        "sd: full 77-state chunks (231 states for 225 tokens, A1111's) or trimmed (227, kohya's)",
    )
    caption_dropout: float = _option(0.1, "sd: share of captions replaced by the empty prompt")
    hypernetwork_structure: str = _option("1,2,1", "layer sizes in multiples of the context width")
    hypernetwork_activation: str = _option("linear", "an activation of trainer.hypernetwork")
    hypernetwork_layer_norm: bool = _option(False, "a LayerNorm after every hypernetwork layer")
    hypernetwork_dropout: float = _option(0.0, "dropout after every hidden hypernetwork layer")
    hypernetwork_shared: bool = _option(
        False, "one pair per width for all depths (also written as AUTOMATIC1111's hypernetwork.pt)"
    )
    depth_penalty: str = _option("0.01", "L2 weight per U-Net depth, shallowest first")
    batch_log: str = _option("", "tests: every rank appends each batch's keys and shape here")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per Config field, its help and default shown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    for option in dataclasses.fields(Config):
        name = f"--{option.name.replace('_', '-')}"
        if option.type == "bool":
            parser.add_argument(name, action="store_true", help=option.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[option.type]
            parser.add_argument(
                name, type=kind, default=option.default, help=option.metadata["help"]
            )
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every optional option's help; the module docstring as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.required else super()._get_help_string(action)


def parse_config(argv: list[str] | None = None) -> Config:
    return Config(**vars(build_parser().parse_args(argv)))


class ConvDenoiser(nn.Module):
    """A small fully convolutional denoiser: it sees pixels + noise and must name the noise."""

    def __init__(self, channels: int, noise: float):
        super().__init__()
        c, self.noise = channels, noise
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, 3, 3, padding=1),
        )  # fmt: skip

    def forward(self, pixels: torch.Tensor, captions: list[str], generator: torch.Generator):
        noise = torch.randn(pixels.shape, generator=generator).to(pixels.device)
        return nn.functional.mse_loss(self.net(pixels + self.noise * noise), noise)


def build_model(config: Config) -> nn.Module:
    """The model to train; its forward(pixels, captions, generator) returns the loss."""
    if config.model == "conv":
        return ConvDenoiser(config.channels, config.noise)
    if config.model != "sd":
        raise ValueError(f"--model must be conv or sd, not {config.model!r}")
    from trainer.diffusion import Diffusion, load_parts, tiny_parts
    from trainer.hypernetwork import Hypernetwork, HypernetworkConfig, cross_attentions
    from trainer.prompts import PromptEncoder

    parts = load_parts(config.pretrained) if config.pretrained else tiny_parts(config.seed)
    prompts = PromptEncoder(
        parts.tokenizer, parts.text_encoder, config.max_tokens, config.clip_skip,
        config.prompt_layout,
    )  # fmt: skip
    hypernetwork = None
    if config.train_part == "hypernetwork":
        hypernetwork = Hypernetwork(
            HypernetworkConfig(
                widths=(parts.unet.config.cross_attention_dim,),
                layer_structure=tuple(float(v) for v in config.hypernetwork_structure.split(",")),
                activation=config.hypernetwork_activation,
                layer_norm=config.hypernetwork_layer_norm,
                dropout=config.hypernetwork_dropout,
                per_depth=not config.hypernetwork_shared,
                depths=tuple(sorted({depth for _, depth, _ in cross_attentions(parts.unet)})),
                depth_penalty=tuple(float(v) for v in config.depth_penalty.split(",") if v),
            )
        )
    elif config.train_part != "unet":
        raise ValueError(f"--train-part must be hypernetwork or unet, not {config.train_part!r}")
    return Diffusion(parts, prompts, hypernetwork, config.caption_dropout)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (a frozen base model is not copied into checkpoints)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in model.state_dict().items() if name in trained}


def save_result(model: nn.Module, out_dir: Path) -> None:
    """The trained hypernetwork or U-Net, in the formats other tools read."""
    hypernetwork = getattr(model, "hypernetwork", None)
    if hypernetwork is not None:
        hypernetwork.save(out_dir / "hypernetwork.safetensors")
        if not hypernetwork.config.per_depth:
            hypernetwork.save(out_dir / "hypernetwork.pt")
    elif hasattr(model, "unet"):
        model.unet.save_pretrained(out_dir / "unet")


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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    checkpoint_path = Path(config.out_dir) / "checkpoint.pt"
    epoch, step = 0, 0
    if config.resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        loaded = model.load_state_dict(state["model"], strict=False)
        if loaded.unexpected_keys or set(trained_state(model)) - set(state["model"]):
            raise ValueError(f"{checkpoint_path} was written by another model configuration")
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
            state = {"model": trained_state(model), "optimizer": optimizer.state_dict(),
                     "epoch": epoch, "step": step, "seed": config.seed}  # fmt: skip
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)

    steps_run, losses, started = 0, [], time.perf_counter()
    while epoch < config.epochs and not (config.max_steps and steps_run >= config.max_steps):
        batches.set_epoch(epoch, step)
        for batch in loader:
            loss = ddp(batch.pixels, batch.captions, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, steps_run = batch.step + 1, steps_run + 1
            losses.append(loss.item())
            if config.batch_log:
                trained = trained_state(model)
                with open(config.batch_log, "a") as log:
                    log.write(json.dumps({
                        "rank": rank, "epoch": epoch, "step": batch.step, "keys": batch.keys,
                        "shape": list(batch.pixels.shape), "loss": losses[-1],
                        "checksum": float(batch.pixels.double().sum()),
                        "weights": sum(float(t.double().sum()) for t in trained.values()),
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
    if master:
        save_result(model, checkpoint_path.parent)
    if world_size > 1:
        dist.destroy_process_group()
    return {"rank": rank, "steps": steps_run, "losses": losses}


if __name__ == "__main__":
    train(parse_config())
