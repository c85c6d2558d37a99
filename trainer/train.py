"""A thin DDP trainer on a prepared dataset: every batch one resolution, every rank the same steps.

One machine, N processes (gloo on CPU, NCCL on CUDA, chosen automatically):
    torchrun --standalone --nproc_per_node=N trainer/train.py --data OUT
Several machines (run on each, node_rank 0..nnodes-1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HEAD --master_port=29500 \\
        trainer/train.py --data OUT
One process without torchrun:
    python trainer/train.py --data OUT
N ranks on this machine, a mistake answered before any starts (pip install puts it on PATH):
    arb-train --nproc-per-node N --data OUT

Models (`--model`): `conv`, a small fully convolutional denoiser trained to predict the noise
added to an image (any resolution goes through it; a smoke test of the data path); `sd`, a
Stable Diffusion 1.x U-Net conditioned by CLIP with the source's techniques: prompts of up to 225
tokens, the penultimate CLIP layer, and hypernetworks on cross-attention's k and v (trained alone
on the frozen base, the source's use, or `--train-part unet`); `sdxl`, the same on SDXL's U-Net
with its two text encoders and its size and crop conditioning from every batch; `sd3` and `flux`,
their transformers by flow matching (trainer/flow.py). `--train-part lora` trains LoRA adapters
on any of them (trainer/lora.py: files diffusers, AUTOMATIC1111 and ComfyUI load). `--pretrained
DIR` loads a local diffusers-layout checkpoint; without it, tiny random models. A model is what
trainer/models.py's `Model` protocol says (its loss, what trains, what stays frozen, its VAE, its
saved weights), and `MODELS` is the one place another model plugs in. Settings: trainer/config.py;
checkpoints and resume: trainer/checkpoint.py.

Data: `--data A --data B:3` trains on several prepared datasets at once, B's images three times
an epoch (a fractional weight takes that share of an epoch); `--flip`, `--shuffle-tags`,
`--keep-tokens`, `--tag-dropout` are kohya-ss's augmentations, deterministic in (seed, epoch,
image). `--text-cache auto|on|off` trains from the captions' text-encoder outputs cached in the
data (`arb-prepare --pretrained`), the text encoders never loaded: trainer/text_cache.py says
which cache fits. `--data s3://bucket/OUT` (any URI pyarrow opens) reads its shards through a
node-local cache (`--cache-dir`, `--cache-limit`: trainer/storage.py) under the shard-aware
shuffle (`--shuffle`, `--shuffle-window`: pipeline/plan.py's `plan_epoch_by_shards`).

Optimization under diffusers' names (`--mixed-precision`, `--gradient-checkpointing`,
`--gradient-accumulation-steps`, `--lr-scheduler`, `--use-ema`, ...): trainer/optimization.py;
`--logging-dir` (TensorBoard) and `--validation-prompt`: trainer/tracking.py and validation.py;
`--config run.toml` takes any of these options, flags override it.
"""

from __future__ import annotations

import sys

from trainer.config import Config, parse_config

if __name__ == "__main__":  # --help and a mistaken option are answered before torch loads
    CONFIG = parse_config(sys.argv[1:], __doc__)

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import UsageError
from pipeline.format import vae_fingerprint
from pipeline.plan import epoch_use_warning
from trainer import checkpoint
from trainer.dataset import latents_to_use, read_manifest
from trainer.loader import accumulation_groups, make_loader
from trainer.mixture import open_datasets, parse_weighted
from trainer.models import MODELS, save_result
from trainer.optimization import PRECISIONS, Optimization, store_frozen_parts
from trainer.sampler import EpochBatches
from trainer.storage import NodeCache, default_cache_dir, is_remote
from trainer.text_cache import text_cache_to_use
from trainer.tracking import Tracker
from trainer.validation import render_validation


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


def check_usage(config: Config) -> list:
    """The datasets' manifests; a UsageError for a mistake every rank would make: a --data that
    is not a prepared dataset, a --resume with no checkpoint, or an OUT_DIR whose checkpoint this
    run would replace without being told to (--resume or --overwrite)."""
    manifests = [read_manifest(parse_weighted(spec)[0]) for spec in config.data]
    out_dir = Path(config.out_dir)
    saved = out_dir / checkpoint.NAME
    if config.resume and not saved.exists():
        raise UsageError(
            f"--resume: {saved} does not exist: give the --out-dir of the run to continue, "
            "or leave --resume out to start one"
        )
    if not config.resume and not config.overwrite and saved.exists():
        raise UsageError(
            f"--out-dir {out_dir} holds the checkpoint of an earlier run: continue it with "
            f"--resume (--config {out_dir / 'config.toml'} --resume takes its settings), start "
            "over with --overwrite, or give another --out-dir"
        )
    return manifests


def train(config: Config) -> dict:
    """Train as `config` says; a UsageError (before any rank trains) for a mistake in it.
    {"rank": this rank, "steps": the optimizer steps this run took}."""
    started, out_dir = time.perf_counter(), Path(config.out_dir)
    manifests = check_usage(config)  # answered before any model is built or rank waits
    text = text_cache_to_use(config, manifests)  # a text cache per dataset, or None: encode
    rank, world_size, device = setup_distributed()
    master = rank == 0

    # The model (without text encoders when the data's text cache conditions it), and the data
    # as this model reads it (cached latents of its VAE where there are, its text cache)
    torch.manual_seed(config.seed)
    model = MODELS[config.model](config, text is not None)
    vae = model.latent_encoder()  # its fingerprint: of its own weights, before any cast
    fingerprint = None if vae is None else vae_fingerprint(vae)
    # the frozen parts cast before they move: Flux's would first take twice the memory in fp32
    store_frozen_parts(model, PRECISIONS[config.mixed_precision])
    model.to(device)
    latents = latents_to_use(config.latents, fingerprint, manifests)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    data = open_datasets(config.data, latents, NodeCache(cache_dir, config.cache_limit), text)
    _check_buckets(data.buckets[np.unique(data.columns.bucket)], model.bucket_step(), config.model)
    if master and latents:
        print(f"training from cached latents of VAE {latents}", flush=True)
    if master and text:
        print(f"training from the text cache {', '.join(dict.fromkeys(text))}", flush=True)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()

    # This rank's batches: every rank plans the same steps; warnings before the first of them
    remote = any(is_remote(parse_weighted(spec)[0]) for spec in config.data)
    shuffle = {"auto": "shards" if remote else "global"}.get(config.shuffle, config.shuffle)
    batches = EpochBatches(  # rank and world size: torch.distributed's; a Config is CaptionOptions
        data,
        config.batch_size,
        seed=config.seed,
        flip=config.flip,
        captions=config,
        shuffle=shuffle,
        window=config.shuffle_window,
    )
    plan, epoch_items, _ = batches.plan()
    warnings = (
        _epoch_use(
            images=len(epoch_items),
            dropped=plan.dropped,
            batch_size=config.batch_size,
            world_size=world_size,
        ),
        _cache_warning(
            data, shuffle=shuffle, window=config.shuffle_window, limit=config.cache_limit
        ),
    )
    for warning in filter(None, warnings if master else ()):
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    # The optimization; the schedule spans --epochs, whatever --max-steps stops this run at, so
    # a resumed run continues the same schedule
    groups_per_epoch = -(-len(plan) // config.gradient_accumulation_steps)
    optimization = Optimization.build(
        model.trained_module(),
        device,
        lr=config.lr,
        schedule=config.lr_scheduler,
        warmup_steps=config.lr_warmup_steps,
        total_steps=config.epochs * groups_per_epoch,
        precision=config.mixed_precision,
        max_grad_norm=config.max_grad_norm,
        ema_decay=config.ema_decay if config.use_ema else None,
    )
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)

    # Where to begin: (epoch, step), step the epoch's next batch, always the first of a group
    epoch, step = 0, 0
    if config.resume:
        epoch, step = checkpoint.load(
            config, out_dir, model, optimization=optimization, generator=generator
        )
        if epoch >= config.epochs:
            if master:
                print(
                    f"nothing left to train: {out_dir / checkpoint.NAME} has finished epoch "
                    f"{epoch} of --epochs {config.epochs}; give more --epochs to go on training it"
                )
            _close_distributed(world_size)
            return {"rank": rank, "steps": 0}
    ddp = DistributedDataParallel(model) if world_size > 1 else model
    loader = make_loader(data, batches, num_workers=config.num_workers, device=device)
    tracker = Tracker(
        config.logging_dir, master=master, world_size=world_size, log_every=config.log_every
    )

    def save() -> None:
        checkpoint.save(
            config,
            out_dir,
            model,
            optimization=optimization,
            position=(epoch, step),
            generator=generator,
            world_size=world_size,
            master=master,
        )

    def validate() -> None:
        if master and config.validation_prompt:
            with optimization.averaged():
                images = render_validation(
                    model, config, step=optimization.steps, dtype=optimization.dtype
                )
            tracker.images(optimization.steps, images)

    # The loop: for each epoch, for each accumulation group of its batches, the micro-steps and
    # then one optimizer step
    max_steps, steps_run = config.max_steps or math.inf, 0
    while epoch < config.epochs and steps_run < max_steps:
        batches.set_epoch(epoch, step)
        tracker.buckets(epoch, _bucket_counts(batches, data))
        steps = len(batches.plan()[0])  # this epoch's (the shard-aware plan's vary)
        groups = accumulation_groups(loader, config.gradient_accumulation_steps, step, steps)
        for count, group in groups:
            # micro-steps: forward and backward; DDP syncs the gradients on the group's last
            for number, batch in enumerate(group, start=1):
                loss = optimization.micro_step(
                    ddp, batch, generator, last=number == count, group=count
                )
            # the optimizer step: the group's gradient applied
            optimization.step()
            step, steps_run = batch.step + 1, steps_run + 1
            # log: the group's last loss
            tracker.step(
                optimization.steps,
                epoch=epoch,
                loss=loss,
                lr=optimization.lr,
                samples=count * len(batch.keys),
            )
            # checkpoint, validate
            if optimization.steps % config.checkpoint_every == 0:
                save()
            if optimization.steps % config.validation_steps == 0:
                validate()
            if steps_run == max_steps:
                break
        if steps_run < max_steps:  # the epoch ran to its end, not to --max-steps
            epoch, step = epoch + 1, 0

    # The end: the last checkpoint, the trained weights, and what was written
    save()
    if master:
        written = [out_dir / checkpoint.NAME, *save_result(model, out_dir, optimization)]
        if config.validation_prompt:
            written.append(out_dir / "validation")
        if config.logging_dir:
            written.append(Path(config.logging_dir))
        images = tracker.samples * world_size
        ranks = f"{world_size} rank{'s' * (world_size > 1)}"
        print(
            f"done: {steps_run} optimizer steps ({images} images on {ranks}), "
            f"epoch {epoch} of {config.epochs}, in {time.perf_counter() - started:.1f} s; "
            f"wrote {', '.join(map(str, written))}",
            flush=True,
        )
    tracker.close()
    del ddp
    _close_distributed(world_size)
    return {"rank": rank, "steps": steps_run}


def _close_distributed(world_size: int) -> None:
    """Leave the process group. Its DDP wrapper must be gone first: DDP's Reducer holds the
    group, and freed after destroy_process_group it would run gloo's destructor holding the GIL
    while a gloo thread waits for the GIL (a deadlock seen on exit with torch 2.13)."""
    if world_size > 1:
        dist.destroy_process_group()


def _check_buckets(buckets, step: int, model: str) -> None:
    """A UsageError where a side of a bucket that holds images is not a multiple of the model's
    `step` (its VAE's factor, times its patches): data prepared for another model."""
    odd = [f"{w}x{h}" for w, h in buckets if w % step or h % step]
    if odd:
        raise UsageError(
            f"--model {model} needs bucket sides in multiples of {step} pixels; the data has "
            f"{len(odd)} bucket(s) that are not ({', '.join(odd[:4])}): prepare it for this "
            f"model, arb-prepare --model {model}"
        )


def _cache_warning(data, shuffle: str, window: int, limit: int) -> str | None:
    """Where the node cache is too small for the shuffle: shards would be downloaded several
    times an epoch (remote data only). Shard sizes are their images' bytes, from the index."""
    columns = data.columns
    if not any(file.files.remote for file in columns.shard_paths):
        return None
    sizes = np.bincount(
        columns.shard, weights=columns.image_size, minlength=len(columns.shard_paths)
    )
    if shuffle == "global":
        needed, what = sizes.sum(), "the dataset's shards (--shuffle global reads them all along)"
    else:
        needed = 2 * np.sort(sizes)[::-1][:window].sum()
        what = f"two windows of --shuffle-window {window} shards"
    if limit >= needed:
        return None
    return (
        f"--cache-limit {limit:,} bytes holds less than {what}, ~{needed:,.0f} bytes: shards "
        "will be downloaded more than once an epoch"
    )


def _epoch_use(images: int, dropped: int, batch_size: int, world_size: int) -> str | None:
    """The prepare job's warning when an epoch leaves images out (pipeline/plan.py's
    `epoch_use_warning`); a UsageError when it has no batch at all."""
    if dropped == images and images:
        raise UsageError(
            f"an epoch at --batch-size {batch_size} x world size {world_size} needs at least "
            f"{batch_size * world_size} images; the data has {images}: give a smaller --batch-size"
        )
    return epoch_use_warning(images, images - dropped, batch_size, world_size)


def _bucket_counts(batches: EpochBatches, data) -> dict[str, int]:
    """Images per bucket in this rank's epoch."""
    plan = batches.plan()[0]
    counts = np.bincount(plan.bucket, minlength=len(data.buckets)) * batches.batch_size
    return {f"{w}x{h}": int(n) for (w, h), n in zip(data.buckets, counts, strict=True) if n}


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
