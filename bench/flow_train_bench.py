"""A flow-matching model's LoRA steps/s on 2 CPU ranks from the prepared caches (latents and
text) against encoding on the fly (VAE and text encoders each step): the same data, seed and
steps, in the same run.

    python bench/flow_train_bench.py --model flux --images 32 --steps 12

The tests' tiny checkpoint (trainer/tiny.py), images with 40-tag captions of its vocabulary in
two buckets, prepared with `--pretrained` (latents and an fp16 text cache, 64 T5 tokens). Each
arm is a 2-rank gloo torchrun of this file (`--rank-run`), batch 2, one loader worker a rank;
steps/s is rank 0's, from the end of its first optimizer step to the end of its last.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
LENGTH = 64  # T5 tokens


def prepare(folder: Path, checkpoint: Path, images: int, model: str) -> Path:
    import ray
    from images import rgb, save

    from pipeline.config import BucketConfig, PrepareConfig
    from pipeline.prepare import run
    from trainer.tiny import WORDS

    rng = random.Random(0)
    for i in range(images):
        width, height = (96, 64) if i % 2 else (64, 96)
        save(rgb(width, height, i), folder / "images" / f"{i:03d}.jpg", quality=90)
        (folder / "images" / f"{i:03d}.txt").write_text(", ".join(rng.choices(WORDS, k=40)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run(
            PrepareConfig(
                input=str(folder / "images"),
                output=str(folder / "out"),
                model=model,
                buckets=BucketConfig(
                    max_area=96 * 64, max_side=128, min_side=32, step=32, square=64
                ),
                pretrained=str(checkpoint),
                text_dtype="fp16",
                max_sequence_length=LENGTH,
            )
        )
    finally:
        ray.shutdown()
    return folder / "out"


def rank_run(argv: list[str]) -> None:
    """One rank of an arm (under torchrun): train, and rank 0 prints its steps/s."""
    import torch.distributed as dist

    from trainer.config import parse_config
    from trainer.optimization import Optimization
    from trainer.train import train

    ends, step = [], Optimization.step

    def timed(optimization) -> None:
        step(optimization)
        ends.append(time.perf_counter())

    with mock.patch.object(Optimization, "step", timed):
        result = train(parse_config(argv))
    if result["rank"] == 0:
        print(f"steps/s {(len(ends) - 1) / (ends[-1] - ends[0]):.4f}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def arm(out: Path, checkpoint: Path, model: str, mode: str, steps: int, folder: Path) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", __file__, "--rank-run", f"--data={out}"]
    command += [f"--model={model}", f"--pretrained={checkpoint}", "--train-part=lora"]
    command += [f"--text-cache={mode}", f"--latents={mode}", f"--max-sequence-length={LENGTH}"]
    command += ["--batch-size=2", f"--max-steps={steps}", f"--epochs={steps}", "--num-workers=1"]
    command += ["--checkpoint-every=1000000", f"--out-dir={folder / mode}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("steps/s ")]
    if done.returncode or not lines:
        raise SystemExit(done.stderr[-3000:])
    return float(lines[0].split()[1])


def main() -> None:
    if sys.argv[1:2] == ["--rank-run"]:
        rank_run(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("flux", "sd3"), default="flux")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per arm")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "support"))  # the tests' images
    from trainer.tiny import build

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        checkpoint = build(args.model, folder / args.model)
        out = prepare(folder, checkpoint, args.images, args.model)
        rates = {m: arm(out, checkpoint, args.model, m, args.steps, folder) for m in ("off", "on")}
    print(
        f"tiny {args.model} LoRA, 2 gloo ranks, batch 2, 40-tag captions, {LENGTH} T5 tokens: "
        f"encoding on the fly {rates['off']:.2f} steps/s, from the caches {rates['on']:.2f} "
        f"steps/s ({rates['on'] / rates['off']:.2f}x)"
    )


if __name__ == "__main__":
    main()
