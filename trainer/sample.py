"""Render an image from a prompt with classifier-free guidance, with or without a hypernetwork.

    python trainer/sample.py --pretrained SD_FOLDER --prompt "..." --out image.png \\
        [--hypernetwork out/hypernetwork.safetensors] [--negative "..."] [--scale 7]

The prompt and the unconditional (negative) prompt are encoded in one batch, so both get the
same number of 75-token chunks; the guided prediction is uc + (prompt - uc) * scale. Without
--pretrained, tiny random models (a smoke test: the image is noise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from trainer.diffusion import Parts, load_parts, tiny_parts
from trainer.hypernetwork import Hypernetwork
from trainer.hypernetwork import load as load_hypernetwork
from trainer.prompts import PromptEncoder


@torch.no_grad()
def sample(
    parts: Parts,
    prompt: str,
    negative: str = "",
    width: int = 512,
    height: int = 512,
    steps: int = 28,
    scale: float = 7.0,
    seed: int = 0,
    hypernetwork: Hypernetwork | None = None,
    max_tokens: int = 225,
    clip_skip: int = 2,
    layout: str = "full",
) -> Image.Image:
    """One image from `prompt`: DDIM steps on the U-Net with classifier-free guidance.

    The hypernetwork renders in eval mode (no dropout) whatever its mode; its mode is restored.
    """
    device = next(parts.unet.parameters()).device
    training = hypernetwork is not None and hypernetwork.training
    handles = hypernetwork.to(device).eval().attach(parts.unet) if hypernetwork is not None else []
    try:
        encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, max_tokens, clip_skip, layout)
        unconditional, conditional = encoder([negative, prompt]).chunk(2)
        scheduler = DDIMScheduler.from_config(parts.scheduler.config)
        scheduler.set_timesteps(steps)
        factor = 2 ** (len(parts.vae.config.block_out_channels) - 1) if parts.vae else 1
        channels = parts.unet.config.in_channels
        generator = torch.Generator().manual_seed(seed)
        shape = (1, channels, height // factor, width // factor)
        latents = torch.randn(shape, generator=generator).to(device)
        latents = latents * scheduler.init_noise_sigma
        context = torch.cat([unconditional, conditional])
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
            uc, c = parts.unet(model_input, timestep, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(uc + (c - uc) * scale, timestep, latents).prev_sample
        if parts.vae is not None:
            pixels = parts.vae.decode(latents / parts.vae.config.scaling_factor).sample
        else:
            pixels = latents
    finally:
        for handle in handles:
            handle.remove()
        if training:
            hypernetwork.train()
    image = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative", default="", help="the unconditional prompt")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--pretrained", help="diffusers-layout folder; default: tiny random")
    parser.add_argument("--hypernetwork", help=".safetensors (ours) or .pt (AUTOMATIC1111)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--scale", type=float, default=7.0, help="classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=225)
    parser.add_argument("--clip-skip", type=int, default=2)
    parser.add_argument("--prompt-layout", default="full", choices=["full", "trimmed"])
    args = parser.parse_args(argv)
    parts = load_parts(args.pretrained) if args.pretrained else tiny_parts(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for module in (parts.unet, parts.text_encoder, parts.vae):
        if module is not None:
            module.to(device).eval()
    hypernetwork = load_hypernetwork(args.hypernetwork) if args.hypernetwork else None
    image = sample(
        parts, args.prompt, args.negative, args.width, args.height, args.steps, args.scale,
        args.seed, hypernetwork, args.max_tokens, args.clip_skip, args.prompt_layout,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
