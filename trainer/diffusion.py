"""A Stable Diffusion 1.x-style model for the trainer: a diffusers U-Net conditioned by CLIP.

`load_parts(folder)` reads a checkpoint in diffusers layout from a local folder (unet/,
text_encoder/, and vae/, scheduler/, tokenizer/ where present); `tiny_parts()` builds tiny
random-initialised ones for tests and smoke runs. Nothing is ever downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.hypernetwork import Hypernetwork
from trainer.prompts import END, START, PromptEncoder, Tokenizer


@dataclass
class Parts:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    vae: AutoencoderKL | None  # None: the U-Net works on pixels
    scheduler: DDPMScheduler
    tokenizer: Tokenizer


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion 1.x's training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def tiny_parts(seed: int = 0, with_vae: bool = False, width: int = 32) -> Parts:
    """Tiny random models of SD 1.x's architecture (CLIP vocabulary and all), for tests.

    Without a VAE the U-Net works on pixels, with its first level attention-free (as SD's VAE
    spares SD): small images only, as in tests.
    """
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=START, eos_token_id=END, pad_token_id=END,
        )
    )  # fmt: skip
    vae = None
    if with_vae:
        vae = AutoencoderKL(
            block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )  # fmt: skip
    channels = 4 if with_vae else 3
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=8, cross_attention_dim=width,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    return Parts(unet, text_encoder, vae, sd_scheduler(), Tokenizer())


def load_parts(folder: str | Path) -> Parts:
    """A Stable Diffusion checkpoint in diffusers layout, from a local folder only."""
    folder = Path(folder)
    if not (folder / "unet").is_dir() or not (folder / "text_encoder").is_dir():
        raise ValueError(f"{folder}: not a diffusers checkpoint (no unet/ or text_encoder/)")
    local = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **local)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **local)
    vae = (
        AutoencoderKL.from_pretrained(folder / "vae", **local)
        if (folder / "vae").is_dir()
        else None
    )
    scheduler = (
        DDPMScheduler.from_pretrained(folder / "scheduler", **local)
        if (folder / "scheduler").is_dir()
        else sd_scheduler()
    )
    return Parts(unet, text_encoder, vae, scheduler, Tokenizer(folder))


def save_parts(parts: Parts, folder: str | Path) -> None:
    """Write `parts` in diffusers layout (what `load_parts` reads)."""
    folder = Path(folder)
    parts.unet.save_pretrained(folder / "unet")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    parts.scheduler.save_pretrained(folder / "scheduler")
    if parts.vae is not None:
        parts.vae.save_pretrained(folder / "vae")


class Diffusion(nn.Module):
    """Noise-prediction training of the U-Net, or of a hypernetwork on the frozen U-Net.

    `forward` returns the loss, so DistributedDataParallel wraps it like any model. The text
    encoder and the VAE stay frozen, as in the source's training.
    """

    def __init__(
        self,
        parts: Parts,
        prompts: PromptEncoder,
        hypernetwork: Hypernetwork | None = None,
        caption_dropout: float = 0.0,
    ):
        super().__init__()
        self.unet, self.text_encoder, self.vae = parts.unet, parts.text_encoder, parts.vae
        self.scheduler, self.prompts, self.caption_dropout = (
            parts.scheduler, prompts, caption_dropout
        )  # fmt: skip
        self.hypernetwork = hypernetwork
        for frozen in (self.text_encoder, self.vae, self.unet if hypernetwork else None):
            if frozen is not None:
                frozen.requires_grad_(False)
        if hypernetwork is not None:
            hypernetwork.attach(self.unet)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.vae is None:
            return pixels
        distribution = self.vae.encode(pixels).latent_dist
        return distribution.sample(generator) * self.vae.config.scaling_factor

    def forward(
        self, pixels: torch.Tensor, captions: list[str], generator: torch.Generator
    ) -> torch.Tensor:
        dropped = torch.rand(len(captions), generator=generator) < self.caption_dropout
        kept = ["" if drop else caption for drop, caption in zip(dropped, captions, strict=True)]
        context = self.prompts(kept)
        latents = self.latents(pixels, generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = nn.functional.mse_loss(prediction.float(), target.float())
        if self.hypernetwork is not None:
            loss = loss + self.hypernetwork.penalty()
        return loss
