"""The sampler's settings (trainer/sample.py, `arb-sample`): a frozen dataclass validated once,
its command line derived from it. Imports no torch, so `--help` and a mistake answer at once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.cli import REQUIRED, HelpFormatter, add_options, check, option, parse
from trainer.config import PromptOptions


@dataclass(frozen=True, kw_only=True)
class SampleConfig(PromptOptions):
    """What trainer/sample.py renders, from which weights: `sample()` takes the render's fields."""

    prompt: str = option(REQUIRED, "the prompt, up to --max-tokens")
    negative: str = option("", "the unconditional prompt")
    out: str = option(REQUIRED, "PNG to write")
    pretrained: str = option("", "diffusers-layout folder (none: tiny random models)")
    hypernetwork: str = option(
        "",
        ".safetensors (ours) or .pt (AUTOMATIC1111); its _ema sibling (--use-ema) is taken when "
        "present",
    )
    unet: str = option(
        "", "a trained U-Net folder (train.py's unet/; unet_ema/ beside it is taken when present)"
    )
    lora: str = option(
        "",
        "LoRA weights: a .safetensors file in diffusers' or kohya-ss's layout, or train.py's "
        "--out-dir (its pytorch_lora_weights_ema.safetensors taken when present)",
    )
    no_ema: bool = option(False, "the raw weights, not the average")
    xl: bool = option(False, "without --pretrained: tiny SDXL")
    width: int = option(512, "image width in pixels")
    height: int = option(512, "image height in pixels")
    original_size: tuple[int, ...] = option(
        (), "SDXL: the size to condition on, H,W (none: the image's)"
    )
    crop_top_left: tuple[int, ...] = option((0, 0), "SDXL: the crop to condition on, TOP,LEFT")
    steps: int = option(28, "DDIM steps")
    scale: float = option(7.0, "classifier-free guidance")
    seed: int = option(0, "the starting noise")

    def __post_init__(self) -> None:
        PromptOptions.__post_init__(self)
        check(
            self,
            {
                "width": (self.width >= 1, "must be >= 1"),
                "height": (self.height >= 1, "must be >= 1"),
                "original_size": (
                    len(self.original_size) in (0, 2)
                    and all(side >= 1 for side in self.original_size),
                    "must be H,W: two sizes in pixels",
                ),
                "crop_top_left": (
                    len(self.crop_top_left) == 2
                    and all(offset >= 0 for offset in self.crop_top_left),
                    "must be TOP,LEFT: two offsets in pixels",
                ),
                "steps": (self.steps >= 1, "must be >= 1"),
            },
        )


def parse_sample(argv: list[str] | None = None, description: str = "") -> SampleConfig:
    """trainer/sample.py's command line; refused by name when invalid."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_options(parser, SampleConfig)
    (config,) = parse(parser, argv, SampleConfig)
    return config
