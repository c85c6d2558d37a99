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
an epoch (a fractional weight takes that share of an epoch); `--flip`, `--shuffle-tags`,
`--keep-tokens`, `--tag-dropout` are kohya-ss's augmentations, deterministic in (seed, epoch,
image).

Optimization under diffusers' names (`--mixed-precision`, `--gradient-checkpointing`,
`--gradient-accumulation-steps`, `--lr-scheduler`, `--use-ema`, ...): trainer/optimization.py;
`--logging-dir` (TensorBoard) and `--validation-prompt`: trainer/tracking.py and validation.py;
`--config run.toml` takes any of these options, flags override it.
"""

from __future__ import annotations

import sys

from trainer.config import Config, parse_config, read_saved, save_config

if __name__ == "__main__":  # --help and a mistaken option are answered before torch loads
    CONFIG = parse_config(sys.argv[1:], __doc__)

import contextlib  # the imports that take seconds
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.cli import typed
from pipeline.errors import UsageError
from pipeline.format import vae_fingerprint
from pipeline.report import epoch_use_warning
from trainer.augment import CaptionOptions
from trainer.dataset import latents_to_use, read_manifest
from trainer.loader import Batch, make_loader
from trainer.mixture import open_datasets, parse_weighted
from trainer.optimization import PRECISIONS, Optimization, store_frozen_parts
from trainer.sampler import EpochBatches
from trainer.tracking import Tracker
from trainer.validation import render_validation


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


def save_result(model: nn.Module, out_dir: Path, optimization: Optimization) -> list[Path]:
    """The trained hypernetwork or U-Net, in the formats other tools read; with --use-ema, the
    average beside it (`hypernetwork_ema.*`, `unet_ema/`), which trainer/sample.py prefers.
    The paths written."""
    written, names = [], [("", contextlib.nullcontext())]
    if optimization.ema is not None:
        names.append(("_ema", optimization.averaged(model)))
    for suffix, weights in names:
        with weights:
            hypernetwork = getattr(model, "hypernetwork", None)
            if hypernetwork is not None:
                formats = (".safetensors",) + ((".pt",) * (not hypernetwork.config.per_depth))
                for extension in formats:
                    written.append(out_dir / f"hypernetwork{suffix}{extension}")
                    hypernetwork.save(written[-1])
            elif hasattr(model, "unet"):
                written.append(out_dir / f"unet{suffix}")
                model.unet.save_pretrained(written[-1])
    return written


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


class Step(NamedTuple):
    """What `train`'s `on_step` callback sees after each micro-batch."""

    rank: int
    batch: Batch
    loss: float
    model: nn.Module  # unwrapped from DDP
    lr: float


def check_usage(config: Config) -> list:
    """The datasets' manifests; a UsageError for a mistake every rank would make: a --data that
    is not a prepared dataset, a --resume with no checkpoint, or an OUT_DIR whose checkpoint this
    run would replace without being told to (--resume or --overwrite)."""
    manifests = [read_manifest(parse_weighted(spec)[0]) for spec in config.data]
    out_dir = Path(config.out_dir)
    checkpoint = out_dir / "checkpoint.pt"
    if config.resume and not checkpoint.exists():
        raise UsageError(
            f"--resume: {checkpoint} does not exist: give the --out-dir of the run to continue, "
            "or leave --resume out to start one"
        )
    if not config.resume and not config.overwrite and checkpoint.exists():
        raise UsageError(
            f"--out-dir {out_dir} holds the checkpoint of an earlier run: continue it with "
            f"--resume (--config {out_dir / 'config.toml'} --resume takes its settings), start "
            "over with --overwrite, or give another --out-dir"
        )
    return manifests


def train(config: Config, on_step: Callable[[Step], None] | None = None) -> dict:
    """Train as `config` says; a UsageError (before any rank trains) for a mistake in it."""
    started, out_dir = time.perf_counter(), Path(config.out_dir)
    manifests = check_usage(config)  # answered before any model is built or rank waits
    rank, world_size, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(config.seed)
    model = MODELS[config.model](config).to(device)
    vae = getattr(model, "vae", None)  # its fingerprint: of its own weights, before any cast
    latents = latents_to_use(config.latents, vae and vae_fingerprint(vae), manifests)
    data = open_datasets(config.data, latents)
    if master and latents:
        print(f"training from cached latents of VAE {latents}", flush=True)
    store_frozen_parts(model, PRECISIONS[config.mixed_precision])
    if config.gradient_checkpointing and hasattr(model, "unet"):
        model.unet.enable_gradient_checkpointing()
    captions = CaptionOptions(config.shuffle_tags, config.keep_tokens, config.tag_dropout)
    batches = EpochBatches(  # rank and world size: torch.distributed's
        data, config.batch_size, seed=config.seed, flip=config.flip, captions=captions
    )
    plan, epoch_items, _ = batches.plan()
    warning = _epoch_use(len(epoch_items), plan.dropped, config.batch_size, world_size)
    if master and warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    per_epoch, group = len(plan), config.gradient_accumulation_steps
    total = config.epochs * -(-per_epoch // group)  # the schedule spans --epochs, whatever
    # --max-steps stops this run at: a resumed run continues the same schedule
    optimization = Optimization.build(
        model, device, config.lr, config.lr_scheduler, config.lr_warmup_steps, total,
        config.mixed_precision, config.max_grad_norm, config.ema_decay if config.use_ema else None,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    epoch, step = 0, 0  # step: the next batch of the epoch, always the start of a group
    if config.resume:
        epoch, step = _resume(config, out_dir, model, optimization, generator)
        if epoch >= config.epochs:
            if master:
                print(f"nothing left to train: {out_dir / 'checkpoint.pt'} has finished epoch "
                      f"{epoch} of --epochs {config.epochs}; give more --epochs to go on "
                      "training it")  # fmt: skip
            _close_distributed(world_size)
            return {"rank": rank, "steps": 0, "losses": []}
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
        written = [out_dir / "checkpoint.pt", *save_result(model, out_dir, optimization)]
        if config.validation_prompt:
            written.append(out_dir / "validation")
        if config.logging_dir:
            written.append(Path(config.logging_dir))
        images = tracker.samples * world_size
        ranks = f"{world_size} rank{'s' * (world_size > 1)}"
        print(f"done: {steps_run} optimizer steps ({images} images on {ranks}), "
              f"epoch {epoch} of {config.epochs}, in {time.perf_counter() - started:.1f} s; "
              f"wrote {', '.join(map(str, written))}", flush=True)  # fmt: skip
    tracker.close()
    del ddp
    _close_distributed(world_size)
    return {"rank": rank, "steps": steps_run, "losses": losses}


def _close_distributed(world_size: int) -> None:
    """Leave the process group. Its DDP wrapper must be gone first: DDP's Reducer holds the
    group, and freed after destroy_process_group it would run gloo's destructor holding the GIL
    while a gloo thread waits for the GIL (a deadlock seen on exit with torch 2.13)."""
    if world_size > 1:
        dist.destroy_process_group()


def _epoch_use(images: int, dropped: int, batch_size: int, world_size: int) -> str | None:
    """The prepare job's warning when an epoch leaves images out, with what batch size would
    not; a UsageError when it has no batch at all."""
    if dropped == images and images:
        raise UsageError(
            f"an epoch at --batch-size {batch_size} x world size {world_size} needs at least "
            f"{batch_size * world_size} images; the data has {images}: give a smaller --batch-size"
        )
    warning = epoch_use_warning(images, images - dropped, batch_size, world_size)
    if warning is None:
        return None
    fits = [b for b in range(batch_size - 1, 0, -1) if epoch_use_warning(
        images, images - images % (b * world_size), b, world_size) is None]  # fmt: skip
    advice = f"--batch-size {fits[0]} would use {images - images % (fits[0] * world_size)}"
    return f"{warning}: {advice}" if fits else warning


def _resume(config: Config, out_dir: Path, model, optimization: Optimization, generator
            ) -> tuple[int, int]:  # fmt: skip
    """Weights, optimizer, schedule, scaler, EMA and this rank's random state from OUT_DIR's
    checkpoint; (epoch, step) to continue from."""
    path = out_dir / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        loaded = model.load_state_dict(state["model"], strict=False)
        other = loaded.unexpected_keys or set(trained_state(model)) - set(state["model"])
    except RuntimeError:  # parameters of other shapes
        other = True
    if other:
        raise UsageError(f"{path} was written by another model configuration"
                         f"{_differences(config, read_saved(out_dir))}: resume with its own "
                         f"settings, --config {out_dir / 'config.toml'} --resume")  # fmt: skip
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


RUN_ONLY = {"resume", "overwrite", "config"}  # settings that say how to run, not what


def _differences(config: Config, saved: dict) -> str:
    """ ", which ran with --x A (this run: B), ..." for the settings a saved run differs in."""
    current = {key: typed(value) for key, value in vars(config).items() if key not in RUN_ONLY}
    differ = [
        f"--{key.replace('_', '-')} {typed(saved[key])} (this run: {value or 'none'})"
        for key, value in current.items()
        if key in saved and typed(saved[key]) != value
    ]
    return f", which ran with {', '.join(differ)}" if differ else ""


def main(config: Config) -> int:
    """Train; a mistake in what was asked is one line from rank 0 and exit status 2."""
    try:
        train(config)
    except UsageError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(CONFIG))
