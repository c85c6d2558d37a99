"""A thin DDP trainer on a prepared dataset: every batch one resolution, every rank the same steps.

One machine, N processes (gloo on CPU, NCCL on CUDA, chosen automatically):
    torchrun --standalone --nproc_per_node=N trainer/train.py --data OUT
Several machines (run on each, node_rank 0..nnodes-1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HEAD --master_port=29500 \\
        trainer/train.py --data OUT
One process without torchrun:
    python trainer/train.py --data OUT

Models (`--model`): `conv`, a small fully convolutional denoiser trained to predict the noise
added to an image (any resolution goes through it; a smoke test of the data path); `sd`, a
Stable Diffusion 1.x U-Net conditioned by CLIP with the source's techniques: prompts of up to 225
tokens, the penultimate CLIP layer, and hypernetworks on cross-attention's k and v (trained alone
on the frozen base, the source's use, or `--train-part unet`); `sdxl`, the same on SDXL's U-Net
with its two text encoders and its size and crop conditioning from every batch. `--pretrained
DIR` loads a local diffusers-layout checkpoint; without it, tiny random models. Every model's
forward(batch, generator) returns its loss, so `MODELS` is the one place another model plugs in.

Data: `--data A --data B:3` trains on several prepared datasets at once, B's images three times
an epoch (fractional weights take a share a epoch); `--flip`, `--shuffle-tags`, `--keep-tokens`,
`--tag-dropout` are kohya-ss's augmentations, deterministic in (seed, epoch, image).

Optimization under diffusers' names (`--mixed-precision`, `--gradient-checkpointing`,
`--gradient-accumulation-steps`, `--lr-scheduler`, `--use-ema`, ...): trainer/optimization.py;
`--logging-dir` (TensorBoard) and `--validation-prompt`: trainer/tracking.py and validation.py;
`--config run.toml` takes any of these options, flags override it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tomli_w
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.cli import HelpFormatter
from pipeline.latents import vae_fingerprint
from trainer.augment import CaptionOptions
from trainer.data import Batch, EpochBatches, make_loader
from trainer.hypernetwork import ACTIVATIONS
from trainer.mixture import open_datasets
from trainer.optimization import PRECISIONS, SCHEDULES, Optimization, store_frozen_parts
from trainer.prompts import LAYOUTS
from trainer.tracking import Tracker
from trainer.validation import render_validation

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _option(default, help: str):
    """A Config field with its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    """Everything a run needs, validated once: a ValueError names the option at fault."""

    data: tuple[str, ...] = _option(
        (),
        "a prepared dataset (jobs/prepare.py --output); repeat for several, PATH:WEIGHT for "
        "repeats (3: three times an epoch, 0.5: half of it)",
    )
    out_dir: str = _option("checkpoints", "where rank 0 writes checkpoints and results")
    batch_size: int = _option(4, "images per batch on each rank")
    epochs: int = _option(1, "epochs to train")
    max_steps: int = _option(0, "stop after this many optimizer steps of this run (0: all epochs)")
    lr: float = _option(1e-3, "AdamW learning rate (the schedule's peak)")
    lr_scheduler: str = _option(
        "constant",
        "constant, constant_with_warmup, linear or cosine (diffusers' schedules), "
        "over all --epochs",
    )
    lr_warmup_steps: int = _option(
        500, "optimizer steps of linear warm-up (the schedules with one)"
    )
    gradient_accumulation_steps: int = _option(
        1, "micro-batches whose gradients add up to one optimizer step (DDP syncs once)"
    )
    max_grad_norm: float = _option(1.0, "clip the gradient's norm to this (0: no clipping)")
    mixed_precision: str = _option(
        "no",
        "no, fp16 (with a gradient scaler) or bf16: autocast "
        "for the forward pass; trained weights stay fp32",
    )
    gradient_checkpointing: bool = _option(False, "recompute the U-Net's activations in backward")
    use_ema: bool = _option(False, "keep an exponential moving average of the trained weights")
    ema_decay: float = _option(0.9999, "the average's decay per optimizer step")
    seed: int = _option(0, "data order, crops and the model's initialisation")
    num_workers: int = _option(2, "DataLoader workers per rank (at most its cores minus one)")
    checkpoint_every: int = _option(100, "optimizer steps between checkpoints (and one at the end)")
    resume: bool = _option(False, "continue from OUT_DIR/checkpoint.pt exactly where it stopped")
    log_every: int = _option(10, "optimizer steps between log lines")
    logging_dir: str = _option("", "write TensorBoard event files here (rank 0)")
    validation_prompt: tuple[str, ...] = _option(
        (), "sd/sdxl: render this prompt at every --validation-steps (repeatable)"
    )
    validation_steps: int = _option(100, "optimizer steps between validation images")
    validation_width: int = _option(512, "validation images' width in pixels")
    validation_height: int = _option(512, "validation images' height in pixels")
    validation_inference_steps: int = _option(20, "sampler steps of a validation image")
    config: str = _option("", "a TOML file of these options (flags override it)")
    flip: float = _option(0.0, "probability of a horizontal flip of each sample")
    shuffle_tags: bool = _option(False, "shuffle each caption's comma-separated tags every epoch")
    keep_tokens: int = _option(0, "the first N tags stay in place and are never dropped")
    tag_dropout: float = _option(0.0, "drop each other tag with this probability")
    model: str = _option("conv", "conv (a small denoiser, a smoke test), sd or sdxl")
    latents: str = _option(
        "auto",
        "auto: train from the dataset's cached latents of the model's VAE when it holds "
        "them (jobs/prepare.py --vae); on: require them; off: from pixels",
    )
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
    caption_dropout: float = _option(
        0.1, "sd: share of captions replaced by the empty prompt (after the tag augmentations)"
    )
    hypernetwork_structure: tuple[float, ...] = _option(
        (1.0, 2.0, 1.0), "layer sizes in multiples of the context width, e.g. 1,2,1"
    )
    hypernetwork_activation: str = _option("linear", "an activation of trainer.hypernetwork")
    hypernetwork_layer_norm: bool = _option(False, "a LayerNorm after every hypernetwork layer")
    hypernetwork_dropout: float = _option(0.0, "dropout after every hidden hypernetwork layer")
    hypernetwork_shared: bool = _option(
        False, "one pair per width for all depths (also written as AUTOMATIC1111's hypernetwork.pt)"
    )
    depth_penalty: tuple[float, ...] = _option(
        (0.01,), "L2 weight per U-Net depth, shallowest first, e.g. 0.01,0.005"
    )

    def __post_init__(self) -> None:
        checks = {
            "data": (bool(self.data), "give a prepared dataset"),
            "flip": (0 <= self.flip <= 1, "must be a probability in [0, 1]"),
            "keep_tokens": (self.keep_tokens >= 0, "must be >= 0"),
            "tag_dropout": (0 <= self.tag_dropout < 1, "must be in [0, 1)"),
            "batch_size": (self.batch_size >= 1, "must be >= 1"),
            "epochs": (self.epochs >= 0, "must be >= 0"),
            "max_steps": (self.max_steps >= 0, "must be >= 0"),
            "lr": (self.lr > 0, "must be > 0"),
            "num_workers": (self.num_workers >= 0, "must be >= 0"),
            "checkpoint_every": (self.checkpoint_every >= 1, "must be >= 1"),
            "log_every": (self.log_every >= 1, "must be >= 1"),
            "model": (self.model in MODELS, f"must be one of {sorted(MODELS)}"),
            "latents": (self.latents in ("auto", "on", "off"), "must be auto, on or off"),
            "lr_scheduler": (self.lr_scheduler in SCHEDULES, f"must be one of {SCHEDULES}"),
            "lr_warmup_steps": (self.lr_warmup_steps >= 0, "must be >= 0"),
            "gradient_accumulation_steps": (self.gradient_accumulation_steps >= 1, "must be >= 1"),
            "max_grad_norm": (self.max_grad_norm >= 0, "must be >= 0"),
            "mixed_precision": (self.mixed_precision in PRECISIONS,
                                f"must be one of {sorted(PRECISIONS)}"),
            "ema_decay": (0 < self.ema_decay < 1, "must be in (0, 1)"),
            "validation_steps": (self.validation_steps >= 1, "must be >= 1"),
            "validation_prompt": (not self.validation_prompt or self.model != "conv",
                                  "needs --model sd or sdxl"),
            "train_part": (self.train_part in TRAIN_PARTS, f"must be one of {sorted(TRAIN_PARTS)}"),
            "max_tokens": (self.max_tokens > 0 and self.max_tokens % 75 == 0,
                           "must be a positive multiple of 75"),
            "clip_skip": (self.clip_skip in (1, 2), "must be 1 or 2"),
            "prompt_layout": (self.prompt_layout in LAYOUTS, f"must be one of {LAYOUTS}"),
            "caption_dropout": (0 <= self.caption_dropout < 1, "must be in [0, 1)"),
            "hypernetwork_activation": (self.hypernetwork_activation in ACTIVATIONS,
                                        "must be an activation of trainer.hypernetwork"),
            "hypernetwork_dropout": (0 <= self.hypernetwork_dropout < 1, "must be in [0, 1)"),
            "hypernetwork_structure": (len(self.hypernetwork_structure) >= 2
                                       and self.hypernetwork_structure[0] == 1
                                       and self.hypernetwork_structure[-1] == 1,
                                       "must start and end with 1 (the module is residual)"),
            "depth_penalty": (all(w >= 0 for w in self.depth_penalty), "must be >= 0 each"),
        }  # fmt: skip
        for name, (valid, rule) in checks.items():
            if not valid:
                flag = f"--{name.replace('_', '-')}"
                raise ValueError(f"{flag} {rule}, got {getattr(self, name)!r}")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(value) for value in text.split(",") if value)


def _repeatable() -> set[str]:
    """The Config fields given once per value on the command line (`--data A --data B`)."""
    types = typing.get_type_hints(Config)
    return {name for name, kind in types.items() if kind == tuple[str, ...]}


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per Config field, its help and default shown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    types, repeatable = typing.get_type_hints(Config), _repeatable()
    parsers = {int: int, float: float, str: str, tuple[float, ...]: _floats}
    for option in dataclasses.fields(Config):
        name, help = f"--{option.name.replace('_', '-')}", option.metadata["help"]
        if types[option.name] is bool:
            parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=False, help=help
            )  # --no-X turns off what a --config file turns on
        elif option.name in repeatable:
            parser.add_argument(name, action="append", default=None, help=help)
        else:
            parser.add_argument(
                name, type=parsers[types[option.name]], default=option.default, help=help
            )
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags over `--config FILE.toml` over the defaults; refused by name when invalid."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    from_file = _toml_options(known.config, parser) if known.config else {}
    repeatable = _repeatable()
    parser.set_defaults(**{k: v for k, v in from_file.items() if k not in repeatable})
    arguments = vars(parser.parse_args(argv))
    for name in repeatable:  # given on the command line: replaces the file's, never appends
        arguments[name] = tuple(arguments[name] or from_file.get(name, ()))
    try:
        return Config(**arguments)
    except ValueError as error:
        parser.error(str(error))


def _toml_options(path: str, parser: argparse.ArgumentParser) -> dict:
    """A TOML file's options (`batch_size = 8` or `batch-size = 8`) as parser defaults."""
    with open(path, "rb") as file:
        values = tomllib.load(file)
    names = {field.name for field in dataclasses.fields(Config)}
    options = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(options) - names)
    if unknown:
        parser.error(f"--config {path}: unknown options {unknown}")
    for name in _repeatable() & set(options):  # `data = "OUT"` is one dataset, as a list of one
        if isinstance(options[name], str):
            options[name] = [options[name]]
    return {name: tuple(v) if isinstance(v, list) else v for name, v in options.items()}


def save_config(config: Config, folder: Path) -> None:
    """The resolved config as TOML (what --config reads back)."""
    values = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(config).items() if k != "config"}  # fmt: skip
    (folder / "config.toml").write_text(tomli_w.dumps(values))


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

    def forward(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        pixels = batch.pixels
        noise = torch.randn(pixels.shape, generator=generator).to(pixels.device)
        return nn.functional.mse_loss(self.net(pixels + self.noise * noise), noise)


def _conv(config: Config) -> nn.Module:
    return ConvDenoiser(config.channels, config.noise)


def _stable_diffusion(config: Config) -> nn.Module:
    from trainer.diffusion import Diffusion, load_parts, tiny_parts

    xl = config.model == "sdxl"
    parts = (
        load_parts(config.pretrained)
        if config.pretrained
        else tiny_parts(config.seed, with_vae=True, xl=xl)  # latent space: any image size
    )
    if parts.xl != xl:
        kind, model = ("an SDXL", "sdxl") if parts.xl else ("an SD 1.x", "sd")
        raise ValueError(
            f"--pretrained {config.pretrained} is {kind} checkpoint: use --model {model}"
        )
    prompts = parts.prompt_encoder(config.max_tokens, config.clip_skip, config.prompt_layout)
    hypernetwork = TRAIN_PARTS[config.train_part](config, parts.unet)
    return Diffusion(parts, prompts, hypernetwork, config.caption_dropout)


def _hypernetwork(config: Config, unet: nn.Module) -> nn.Module:
    """A new hypernetwork for `unet` (which stays frozen)."""
    from trainer.hypernetwork import Hypernetwork, HypernetworkConfig, cross_attentions

    return Hypernetwork(
        HypernetworkConfig(
            widths=(unet.config.cross_attention_dim,),
            layer_structure=config.hypernetwork_structure,
            activation=config.hypernetwork_activation,
            layer_norm=config.hypernetwork_layer_norm,
            dropout=config.hypernetwork_dropout,
            per_depth=not config.hypernetwork_shared,
            depths=tuple(sorted({depth for _, depth, _ in cross_attentions(unet)})),
            depth_penalty=config.depth_penalty,
        )
    )


MODELS: dict[str, Callable[[Config], nn.Module]] = {  # forward(pixels, captions, generator): loss
    "conv": _conv,
    "sd": _stable_diffusion,
    "sdxl": _stable_diffusion,
}
TRAIN_PARTS: dict[str, Callable[[Config, nn.Module], nn.Module | None]] = {  # sd: what trains
    "hypernetwork": _hypernetwork,
    "unet": lambda config, unet: None,  # the U-Net itself
}


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (a frozen base model is not copied into checkpoints)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in model.state_dict().items() if name in trained}


def save_result(model: nn.Module, out_dir: Path, optimization: Optimization) -> None:
    """The trained hypernetwork or U-Net, in the formats other tools read; with --use-ema, the
    average beside it (`hypernetwork_ema.*`, `unet_ema/`), which trainer/sample.py prefers."""
    names = [("", contextlib.nullcontext())]
    if optimization.ema is not None:
        names.append(("_ema", optimization.averaged(model)))
    for suffix, weights in names:
        with weights:
            hypernetwork = getattr(model, "hypernetwork", None)
            if hypernetwork is not None:
                hypernetwork.save(out_dir / f"hypernetwork{suffix}.safetensors")
                if not hypernetwork.config.per_depth:
                    hypernetwork.save(out_dir / f"hypernetwork{suffix}.pt")
            elif hasattr(model, "unet"):
                model.unet.save_pretrained(out_dir / f"unet{suffix}")


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


def _choose_latents(config: Config, model: nn.Module, data, master: bool) -> None:
    """Train from the dataset's cached latents of the model's own VAE, as --latents says."""
    vae = getattr(model, "vae", None)
    if config.latents == "off" or (vae is None and config.latents == "auto"):
        return
    if vae is None:
        raise ValueError("--latents on: this model has no VAE (give --pretrained with a vae/)")
    fingerprint = vae_fingerprint(vae)
    if config.latents == "on" or fingerprint in data.manifest.latents:
        data.use_latents(fingerprint)  # refuses, naming the VAEs the dataset holds latents of
        if master:
            print(f"training from cached latents of VAE {fingerprint}", flush=True)


class Step(NamedTuple):
    """What `train`'s `on_step` callback sees after each micro-batch."""

    rank: int
    batch: Batch
    loss: float
    model: nn.Module  # unwrapped from DDP
    lr: float


def train(config: Config, on_step: Callable[[Step], None] | None = None) -> dict:
    rank, world_size, device = setup_distributed()
    master = rank == 0
    data = open_datasets(config.data)  # a wrong path is refused before any model is built
    torch.manual_seed(config.seed)
    model = MODELS[config.model](config).to(device)
    _choose_latents(config, model, data, master)  # the VAE's fingerprint: of its own weights
    store_frozen_parts(model, PRECISIONS[config.mixed_precision])
    if config.gradient_checkpointing and hasattr(model, "unet"):
        model.unet.enable_gradient_checkpointing()
    captions = CaptionOptions(config.shuffle_tags, config.keep_tokens, config.tag_dropout)
    batches = EpochBatches(  # rank and world size: torch.distributed's
        data, config.batch_size, seed=config.seed, flip=config.flip, captions=captions
    )
    per_epoch, group = len(batches.plan()[0]), config.gradient_accumulation_steps
    total = config.epochs * -(-per_epoch // group)  # the schedule spans --epochs, whatever
    # --max-steps stops this run at: a resumed run continues the same schedule
    optimization = Optimization.build(
        model, device, config.lr, config.lr_scheduler, config.lr_warmup_steps, total,
        config.mixed_precision, config.max_grad_norm, config.ema_decay if config.use_ema else None,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    out_dir = Path(config.out_dir)
    epoch, step = 0, 0  # step: the next batch of the epoch, always the start of a group
    if config.resume:
        epoch, step = _resume(out_dir / "checkpoint.pt", model, optimization, generator)
    ddp = DistributedDataParallel(model) if world_size > 1 else model
    loader = make_loader(data, batches, config.num_workers, device)
    tracker = Tracker(config.logging_dir, master, world_size, config.log_every)

    def save() -> None:
        states = _gathered(_random_state(generator), world_size)
        if master:
            out_dir.mkdir(parents=True, exist_ok=True)
            state = {"model": trained_state(model), "optimization": optimization.state_dict(),
                     "epoch": epoch, "step": step, "generators": states}  # fmt: skip
            torch.save(state, out_dir / "checkpoint.tmp")
            (out_dir / "checkpoint.tmp").replace(out_dir / "checkpoint.pt")
            save_config(config, out_dir)

    def validate() -> None:
        if master and config.validation_prompt:
            with optimization.averaged(model):
                images = render_validation(model, config, optimization.steps, optimization.dtype)
            tracker.images(optimization.steps, images)

    steps_run, losses, done = 0, [], False
    while epoch < config.epochs and not done:
        batches.set_epoch(epoch, step)
        tracker.buckets(epoch, _bucket_counts(batches, data))
        for batch in loader:
            position = batch.step % group
            size = min(group, per_epoch - (batch.step - position))  # the epoch's last: smaller
            losses.append(optimization.micro_step(ddp, batch, generator, position == size - 1,
                                                  size))  # fmt: skip
            if on_step is not None:
                on_step(Step(rank, batch, losses[-1], model, optimization.lr))
            if position < size - 1:
                continue
            optimization.step(model)
            step, steps_run = batch.step + 1, steps_run + 1
            samples = size * len(batch.keys)
            tracker.step(optimization.steps, epoch, losses[-1], optimization.lr, samples)
            if optimization.steps % config.checkpoint_every == 0:
                save()
            if optimization.steps % config.validation_steps == 0:
                validate()
            if config.max_steps and steps_run >= config.max_steps:
                done = True
                break
        else:
            epoch, step = epoch + 1, 0
    save()
    if master:
        save_result(model, out_dir, optimization)
    tracker.close()
    if world_size > 1:
        # DDP's Reducer holds the process group. Freed after destroy_process_group, it would run
        # gloo's destructor holding the GIL while a gloo thread waits for the GIL: a deadlock
        # seen on exit with torch 2.13. So it lets go first, while the group still lives.
        del ddp
        dist.destroy_process_group()
    return {"rank": rank, "steps": steps_run, "losses": losses}


def _resume(path: Path, model, optimization: Optimization, generator) -> tuple[int, int]:
    """Weights, optimizer, schedule, scaler, EMA and this rank's random state from `path`;
    (epoch, step) to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    loaded = model.load_state_dict(state["model"], strict=False)
    if loaded.unexpected_keys or set(trained_state(model)) - set(state["model"]):
        raise ValueError(f"{path} was written by another model configuration")
    optimization.load_state_dict(state["optimization"])
    generators = state["generators"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    if len(generators) == (dist.get_world_size() if dist.is_initialized() else 1):
        _set_random_state(generator, generators[rank])
    return state["epoch"], state["step"]


def _random_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This rank's random state: the loss's generator and torch's own (dropout draws from it)."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_random_state(generator: torch.Generator, state) -> None:
    if isinstance(state, torch.Tensor):  # a checkpoint of before torch's own state was kept
        generator.set_state(state)
        return
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gathered(value, world_size: int) -> list:
    """Every rank's `value` (for rank 0 to save), in rank order."""
    if world_size == 1:
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def _bucket_counts(batches: EpochBatches, data) -> dict[str, int]:
    """Images per bucket in this rank's epoch."""
    plan = batches.plan()[0]
    counts = np.bincount(plan.bucket, minlength=len(data.buckets)) * batches.batch_size
    return {f"{w}x{h}": int(n) for (w, h), n in zip(data.buckets, counts, strict=True) if n}


if __name__ == "__main__":
    train(parse_config())
