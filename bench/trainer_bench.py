"""The trainer's mixed precision and gradient checkpointing, measured in one run.

    python bench/trainer_bench.py                  # ~5 minutes on 2 CPU cores
    python bench/trainer_bench.py --device cuda    # the same on a GPU

1. optimizer steps a second of the tiny SD model (its whole U-Net trained, `--train-part unet`)
   on a small prepared dataset, `--mixed-precision bf16` against `no` (fp32): rounds that
   alternate the two, medians, the first steps of each run (start-up) left out;
2. the memory one forward + backward of the full SD 1.x U-Net takes (random weights: the
   architecture's figure; 860M parameters, fp32 weights and gradients) at 64x64 latents, with
   `--gradient-checkpointing` against without: the peak over what the model already held, each
   in a fresh process (on the CPU the peak resident set, on CUDA the allocator's peak);
3. the time and memory of that U-Net step under bf16 autocast against fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray
from corpus import photo

from pipeline.buckets import BucketConfig
from pipeline.config import PrepareConfig
from pipeline.prepare import run
from trainer.optimization import PRECISIONS
from trainer.train import Config, train

SMALL_BUCKETS = BucketConfig(max_area=96 * 64, max_side=128, min_side=32, step=32, square=64)


def dataset(workdir: Path, images: int) -> Path:
    """`images` small photos in three aspect ratios, prepared at small buckets."""
    source, output = workdir / f"trainer-images-{images}", workdir / f"trainer-out-{images}"
    for i in range(images):
        path = source / f"{i:04d}.jpg"
        if not path.exists():
            source.mkdir(parents=True, exist_ok=True)
            photo(i, [(150, 100), (100, 150), (120, 120)][i % 3]).save(path, quality=90)
            path.with_suffix(".txt").write_text(f"a photo number {i}")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    run(PrepareConfig(input=str(source), output=str(output), buckets=SMALL_BUCKETS, overwrite=True))
    ray.shutdown()
    return output


def steps_per_second(data: Path, workdir: Path, precision: str, steps: int, skip: int) -> float:
    """Steps a second after the first `skip` of a run of `skip + steps`."""
    stamps = []
    config = Config(
        data=(str(data),),
        model="sd",
        train_part="unet",
        mixed_precision=precision,
        batch_size=8,
        max_steps=skip + steps,
        epochs=1000,
        num_workers=1,
        log_every=10**6,
        checkpoint_every=10**6,
        out_dir=str(workdir / f"trainer-ckpt-{precision}"),
        overwrite=True,
    )
    train(config, on_step=lambda step: stamps.append(time.perf_counter()))
    return steps / (stamps[-1] - stamps[skip - 1])


def unet_memory(checkpointing: bool, device: str, batch: int, precision: str = "no") -> dict:
    """In this process: the full SD 1.x U-Net's forward + backward at 64x64 latents, the second
    of two (the first allocates what every step reuses); what the forward holds, the peak, and
    the time, in bytes over what the model held before and seconds."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).to(device)  # SD 1.x's configuration
    if checkpointing:
        unet.enable_gradient_checkpointing()
    latents = torch.randn(batch, 4, 64, 64, device=device)
    context = torch.randn(batch, 77, 768, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    memory = _CudaMemory() if device == "cuda" else _ResidentMemory()
    for _ in range(2):
        unet.zero_grad(set_to_none=True)
        before = memory.reset()
        start = time.perf_counter()
        with torch.autocast(device, PRECISIONS[precision], enabled=precision != "no"):
            loss = unet(latents, timesteps, context).sample.float().pow(2).mean()
        held = memory.now() - before
        loss.backward()
        peak = memory.peak() - before
        seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in unet.parameters())
    return {"held": held, "peak": peak, "seconds": seconds, "params": parameters}


class _ResidentMemory:
    """The process's resident set (VmRSS), its peak (VmHWM) restarting at `reset`."""

    def reset(self) -> int:
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
        return self.now()

    def now(self) -> int:
        return self._field("VmRSS")

    def peak(self) -> int:
        return self._field("VmHWM")

    @staticmethod
    def _field(name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {name} in /proc/self/status")


class _CudaMemory:
    """Bytes held by torch's CUDA allocator and their peak since `reset`."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda

    def reset(self) -> int:
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()
        return self.now()

    def now(self) -> int:
        self.cuda.synchronize()
        return self.cuda.memory_allocated()

    def peak(self) -> int:
        self.cuda.synchronize()
        return self.cuda.max_memory_allocated()


def in_fresh_process(checkpointing: bool, device: str, batch: int, precision: str = "no") -> dict:
    command = [
        sys.executable,
        __file__,
        "--unet-memory",
        str(int(checkpointing)),
        "--device",
        device,
        "--batch",
        str(batch),
        "--precision",
        precision,
    ]
    # glibc maps every block over 128 KiB on its own and unmaps it when freed: the resident
    # set is then what tensors hold, not what malloc kept of an earlier step
    environment = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-bench"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20, help="measured steps a run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each precision")
    parser.add_argument("--batch", type=int, default=1, help="U-Net batch for the memory figure")
    parser.add_argument("--skip-speed", action="store_true", help="the memory figure alone")
    parser.add_argument("--unet-memory", type=int, help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unet_memory is not None:
        step = unet_memory(bool(args.unet_memory), args.device, args.batch, args.precision)
        print(json.dumps(step))
        return

    if not args.skip_speed:
        data = dataset(args.workdir, args.images)
        rates = {"no": [], "bf16": []}
        for _ in range(args.rounds):
            for precision in rates:
                rate = steps_per_second(data, args.workdir, precision, args.steps, skip=3)
                rates[precision].append(rate)
        fp32, bf16 = (statistics.median(rates[p]) for p in ("no", "bf16"))
        runs = " / ".join(str(np.round(rates[p], 2).tolist()) for p in rates)
        print(
            f"1. tiny SD, U-Net trained, batch 8, {args.device}: fp32 {fp32:.2f} steps/s, "
            f"bf16 autocast {bf16:.2f} steps/s ({bf16 / fp32:.2f}x); runs {runs}"
        )

    plain, checkpointed = (in_fresh_process(c, args.device, args.batch) for c in (False, True))
    gib, grads = 2**30, plain["params"] * 4 / 2**30
    print(
        f"2. SD 1.x U-Net ({plain['params'] / 1e6:.0f}M parameters), fp32, batch {args.batch}, "
        f"64x64 latents, forward + backward on {args.device}, without -> with gradient "
        "checkpointing, over what the model held before:"
    )
    for name, key in (("held after the forward", "held"), ("peak in the backward", "peak")):
        a, b = plain[key] / gib, checkpointed[key] / gib
        print(f"   {name}: {a:.2f} -> {b:.2f} GiB ({b / a:.2f}x, {a - b:.2f} GiB saved)")
    print(
        f"   (the peak includes {grads:.2f} GiB of fp32 gradients); time a step "
        f"{plain['seconds']:.1f} -> {checkpointed['seconds']:.1f} s "
        f"({checkpointed['seconds'] / plain['seconds']:.2f}x)"
    )

    bf16 = in_fresh_process(False, args.device, args.batch, "bf16")
    time_ratio = bf16["seconds"] / plain["seconds"]
    print(
        f"3. the same U-Net step under bf16 autocast against fp32 (no checkpointing): time "
        f"{plain['seconds']:.1f} -> {bf16['seconds']:.1f} s ({time_ratio:.2f}x), held after "
        f"the forward {plain['held'] / gib:.2f} -> {bf16['held'] / gib:.2f} GiB"
    )


if __name__ == "__main__":
    main()
