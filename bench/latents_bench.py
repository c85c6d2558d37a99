"""Latents prepared once against pixels every step, in one run, on the CPU with a tiny VAE.

    python bench/latents_bench.py                 # 96 photos at SD 1.x's buckets, ~3 minutes

1. the VAE stage: images a second per CPU actor (one actor: Ray with 1 CPU);
2. bytes read from disk per sample: the stored JPEG against the cached latents (mean and std,
   float16);
3. training steps a second of the same tiny SD model on the same data from pixels (its VAE
   encodes every batch) against from the cached latents.
A GPU's figure for SD 1.x's real VAE (random weights: the speed is the architecture's) is in
the project's notes: ~100 images/s at 512x768 in float16 on an H100.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import ray
from corpus import photo

from pipeline.config import PrepareConfig
from pipeline.format import OutputDir
from pipeline.latents import add_latents
from pipeline.prepare import run
from trainer.dataset import PreparedData
from trainer.diffusion import save_parts, tiny_parts
from trainer.train import Config, train


def dataset(workdir: Path, images: int) -> Path:
    source = workdir / f"latents-images-{images}"
    for i in range(images):
        path = source / f"{i:04d}.jpg"
        if not path.exists():
            source.mkdir(parents=True, exist_ok=True)
            size = [(800, 600), (600, 800), (700, 700)][i % 3]
            photo(i, size).save(path, quality=90)
    return source


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/arb-bench"))
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    source = dataset(args.workdir, args.images)
    checkpoint = args.workdir / "latents-vae"
    if not (checkpoint / "vae").exists():
        save_parts(tiny_parts(seed=0, with_vae=True), checkpoint)
    output = args.workdir / f"latents-out-{args.images}"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    run(PrepareConfig(input=str(source), output=str(output), overwrite=True))
    start = time.perf_counter()
    manifest = add_latents(OutputDir(str(output)), str(checkpoint))
    seconds = time.perf_counter() - start
    ray.shutdown()
    (fingerprint,) = manifest.latents
    images = manifest.counts["images"]
    print(
        f"1. VAE stage, one CPU actor: {images / seconds:.1f} images/s "
        f"({images} images in {seconds:.1f} s, loading the VAE included)"
    )

    data = PreparedData(output, latents=fingerprint)
    columns = data.columns
    jpeg, latent = float(np.mean(columns.image_size)), float(np.mean(columns.latents.size))
    print(
        f"2. bytes read a sample: JPEG {jpeg / 1024:.0f} KiB, latents {latent / 1024:.0f} KiB "
        f"({latent / jpeg:.2f}x)"
    )

    rates = {}
    for mode in ("off", "on"):
        config = Config(
            data=(str(output),),
            model="sd",
            pretrained=str(checkpoint),
            latents=mode,
            batch_size=4,
            max_steps=args.steps,
            epochs=100,
            num_workers=1,
            log_every=10**6,
            out_dir=str(args.workdir / f"latents-ckpt-{mode}"),
            checkpoint_every=10**6,
            overwrite=True,
        )
        start = time.perf_counter()
        steps = train(config)["steps"]
        rates[mode] = steps / (time.perf_counter() - start)
    print(
        f"3. training steps/s, same model and data: from pixels {rates['off']:.2f}, "
        f"from latents {rates['on']:.2f} ({rates['on'] / rates['off']:.2f}x)"
    )


if __name__ == "__main__":
    main()
