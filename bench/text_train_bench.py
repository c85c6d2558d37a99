"""The trainer's steps/s from the text cache against encoding the captions each step: the same
model, data, seed and steps, in the same run.

    python bench/text_train_bench.py --images 32 --steps 16            # the tests' tiny sd
    python bench/text_train_bench.py --images 32 --steps 16 --clip-l   # CLIP-L's text encoder

A tiny sd checkpoint (tests/checkpoints.py: CLIP 32 wide, 2 layers, a two-level U-Net), or with
`--clip-l` the same U-Net told by a random text encoder of CLIP ViT-L/14's architecture (768
wide, 12 layers: SD 1.x's), and images with 40-tag captions of its vocabulary (2 chunks each),
prepared with `--pretrained` (latents and an fp16 text cache) on 2 CPU actors. Each arm trains
`--steps` optimizer steps from the cached latents (batch 4, caption dropout 0.1, one loader
worker); steps/s is measured from the end of the first step to the end of the last (model
load and the first step's warm-up left out).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent


def clip_l_checkpoint(folder: Path) -> Path:
    """The tiny sd checkpoint's U-Net and VAE with a CLIP-L-sized random text encoder."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.tiny import clip_tokenizer, sd_scheduler, unet, vae

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder.parent / ".clip-l-tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipeline = diffusers.StableDiffusionPipeline(
        tokenizer=tokenizer,
        text_encoder=CLIPTextModel(config),
        vae=vae(4),
        unet=unet(768),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def prepare(folder: Path, checkpoint: Path, images: int) -> Path:
    import ray
    from images import rgb, save

    from pipeline.buckets import BucketConfig
    from pipeline.config import PrepareConfig
    from pipeline.prepare import run
    from trainer.tiny import WORDS

    rng = random.Random(0)
    for i in range(images):
        save(rgb(96, 64, i), folder / "images" / f"{i:03d}.jpg", quality=90)
        (folder / "images" / f"{i:03d}.txt").write_text(", ".join(rng.choices(WORDS, k=40)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run(
            PrepareConfig(
                input=str(folder / "images"),
                output=str(folder / "out"),
                buckets=BucketConfig(
                    max_area=96 * 64, max_side=128, min_side=32, step=32, square=64
                ),
                pretrained=str(checkpoint),
                text_dtype="fp16",
            )
        )
    finally:
        ray.shutdown()
    return folder / "out"


def steps_per_second(out: Path, checkpoint: Path, mode: str, steps: int, folder: Path) -> float:
    """Optimizer steps/s of a run with --text-cache `mode`, after its first step."""
    from trainer.config import Config
    from trainer.optimization import Optimization
    from trainer.train import train

    ends, step = [], Optimization.step

    def timed(optimization) -> None:
        step(optimization)
        ends.append(time.perf_counter())

    config = Config(
        data=(str(out),),
        model="sd",
        pretrained=str(checkpoint),
        text_cache=mode,
        latents="on",
        batch_size=4,
        max_steps=steps,
        epochs=steps,
        num_workers=1,
        caption_dropout=0.1,
        checkpoint_every=10**6,
        out_dir=str(folder / f"run-{mode}"),
    )
    with mock.patch.object(Optimization, "step", timed):
        train(config)
    return (len(ends) - 1) / (ends[-1] - ends[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per arm")
    parser.add_argument("--clip-l", action="store_true", help="CLIP-L's text architecture")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "support"))  # the tests' checkpoints and images
    from trainer.tiny import build

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        checkpoint = clip_l_checkpoint(folder / "sd") if args.clip_l else build("sd", folder / "sd")
        out = prepare(folder, checkpoint, args.images)
        rates = {
            mode: steps_per_second(out, checkpoint, mode, args.steps, folder)
            for mode in ("off", "on")
        }
    text = (
        "CLIP-L's architecture (768 wide, 12 layers)" if args.clip_l else "CLIP 32 wide, 2 layers"
    )
    print(
        f"tiny sd U-Net, {text}, batch 4, 40-tag captions (2 chunks): encoding each step "
        f"{rates['off']:.2f} steps/s, from the text cache {rates['on']:.2f} steps/s "
        f"({rates['on'] / rates['off']:.2f}x)"
    )


if __name__ == "__main__":
    main()
