"""Validation images: the prompts of `--validation-prompt` rendered with the weights of the
moment (the average with --use-ema), at fixed seeds and size, saved as PNGs and logged."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from trainer.sample import sample
from trainer.sample_config import SampleConfig


def render_validation(model: nn.Module, config, step: int, dtype) -> list[Image.Image]:
    """One image a prompt, seed `config.seed + i`, in OUT_DIR/validation/step-N-i.png."""
    folder = Path(config.out_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    training = model.training
    model.eval()
    images = []
    try:
        device_type = next(model.parameters()).device.type
        with torch.autocast(device_type, dtype, enabled=dtype is not None):
            for number, prompt in enumerate(config.validation_prompt):
                render = SampleConfig(
                    prompt=prompt,
                    out=str(folder / f"step-{step}-{number}.png"),
                    width=config.validation_width,
                    height=config.validation_height,
                    steps=config.validation_inference_steps,
                    seed=config.seed + number,
                    max_tokens=config.max_tokens,
                    clip_skip=config.clip_skip,
                    prompt_layout=config.prompt_layout,
                )
                image = sample(model.parts, render)
                image.save(render.out)
                images.append(image)
    finally:
        model.train(training)
    return images
