"""A tiny VAE of another class diffusers ships, for the latent stage's tests (the four
families' tiny checkpoints are trainer/tiny.py's)."""

from __future__ import annotations

from pathlib import Path

import torch


def other_vae(name: str, folder: Path) -> Path:
    """A tiny VAE of another class diffusers ships (Flux.2's, Qwen-Image's), saved in `folder`."""
    import diffusers

    torch.manual_seed(0)
    if name == "AutoencoderKLFlux2":
        vae = diffusers.AutoencoderKLFlux2(
            block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            norm_num_groups=8,
            up_block_types=("UpDecoderBlock2D",) * 2,
        )
    else:  # video-shaped: [B, C, T, H, W]
        vae = diffusers.AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )
    vae.save_pretrained(folder)
    return folder
