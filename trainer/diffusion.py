"""Stable Diffusion 1.x and SDXL models for the trainer: a diffusers U-Net conditioned by CLIP.

`load_parts(folder)` reads a checkpoint in diffusers layout from a local folder (unet/,
text_encoder/, and vae/, scheduler/, tokenizer/ where present; SDXL's text_encoder_2/ and
tokenizer_2/ make it SDXL); `tiny_parts()` builds tiny random-initialised ones of either
architecture for tests and smoke runs. Nothing is ever downloaded.

SDXL's U-Net is also told each sample's original size, crop and target size (its "time ids",
from the batch: trainer/augment.py) and the pooled text embedding of its second encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.hypernetwork import Hypernetwork
from trainer.lora import LoraWeights, save_lora
from trainer.prompts import END, START, PromptEncoder, SDXLPromptEncoder, Tokenizer
from trainer.text_cache import chunked_conditioning

SDXL_PAD = 0  # SDXL's second tokenizer pads with "!", id 0


@dataclass
class Parts:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel | None  # None: loaded without (a text cache conditions it)
    vae: AutoencoderKL | None  # None: the U-Net works on pixels
    scheduler: DDPMScheduler
    tokenizer: Tokenizer | None
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's second encoder
    tokenizer_2: Tokenizer | None = None

    @property
    def xl(self) -> bool:
        """SDXL's U-Net: told the pooled text embedding and the time ids."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    def prompt_encoder(self, max_tokens: int, clip_skip: int, layout: str):
        """The prompt encoder for these parts: `encode(texts)` gives (context, pooled or None).
        The values are a validated PromptOptions' (trainer/config.py)."""
        if self.xl:
            return SDXLPromptEncoder(
                (self.tokenizer, self.tokenizer_2),
                (self.text_encoder, self.text_encoder_2),
                max_tokens,
                clip_skip,
                layout,
            )
        return PromptEncoder(self.tokenizer, self.text_encoder, max_tokens, clip_skip, layout)


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion 1.x's training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def _tiny_clip(width: int, projection: bool = False) -> nn.Module:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=START,
        eos_token_id=END,
        pad_token_id=END,
        projection_dim=width,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_parts(seed: int = 0, with_vae: bool = False, width: int = 32, xl: bool = False) -> Parts:
    """Tiny random models of SD 1.x's architecture, or SDXL's (`xl`: two text encoders, added
    time and text embeddings), CLIP's vocabulary and all, for tests.

    Without a VAE the U-Net works on pixels, with its first level attention-free (as SD's VAE
    spares SD): small images only, as in tests.
    """
    torch.manual_seed(seed)
    text_encoder = _tiny_clip(width)
    text_encoder_2 = _tiny_clip(width, projection=True) if xl else None
    vae = None
    if with_vae:  # four levels: SD's factor of 8
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            latent_channels=4,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    channels = 4 if with_vae else 3
    added = {}
    if xl:  # SDXL's: text embeds and six time ids, each time id embedded in 8 (256 in SDXL)
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": width + 6 * 8,
        }
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32, 64),
        norm_num_groups=8,
        cross_attention_dim=2 * width if xl else width,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        **added,
    )
    second = Tokenizer(pad=SDXL_PAD) if xl else None
    return Parts(unet, text_encoder, vae, sd_scheduler(), Tokenizer(), text_encoder_2, second)


def load_parts(folder: str | Path, text_encoders: bool = True) -> Parts:
    """A Stable Diffusion checkpoint in diffusers layout, from a local folder only; without its
    text encoders and tokenizers (never read) when `text_encoders` is False."""
    folder = Path(folder)
    needed = ("unet", "text_encoder") if text_encoders else ("unet",)
    if not all((folder / part).is_dir() for part in needed):
        raise ValueError(f"{folder}: not a diffusers checkpoint (no {'/ or '.join(needed)}/)")
    local = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **local)
    text_encoder, tokenizer, text_encoder_2, tokenizer_2 = None, None, None, None
    if text_encoders:
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **local)
        tokenizer = Tokenizer(folder)
    if text_encoders and (folder / "text_encoder_2").is_dir():  # SDXL
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2", **local
        )
        tokenizer_2 = Tokenizer(folder, "tokenizer_2", pad=SDXL_PAD)
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
    return Parts(unet, text_encoder, vae, scheduler, tokenizer, text_encoder_2, tokenizer_2)


def save_parts(parts: Parts, folder: str | Path) -> None:
    """Write `parts` in diffusers layout (what `load_parts` reads)."""
    folder = Path(folder)
    parts.unet.save_pretrained(folder / "unet")
    if parts.text_encoder is not None:
        parts.text_encoder.save_pretrained(folder / "text_encoder")
    if parts.text_encoder_2 is not None:
        parts.text_encoder_2.save_pretrained(folder / "text_encoder_2")
    parts.scheduler.save_pretrained(folder / "scheduler")
    if parts.vae is not None:
        parts.vae.save_pretrained(folder / "vae")


def time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor
) -> torch.Tensor:
    """SDXL's added time ids [B, 6]: original (h, w), crop (top, left), target (h, w), in pixels,
    as diffusers' SDXL pipeline and training script build them."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


@torch.no_grad()
def vae_sample(vae: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    """A sample of `vae`'s distribution of the batch's pixels, or of the cached one (the same
    draw from `generator` either way), unscaled, float32."""
    if batch.latent_mean is None:
        with torch.autocast(batch.pixels.device.type, enabled=False):  # the VAE's dtype
            pixels = batch.pixels.to(vae.dtype)
            return vae.encode(pixels).latent_dist.sample(generator).float()
    # as DiagonalGaussianDistribution.sample draws: on the CPU, then moved
    mean, std = batch.latent_mean.float(), batch.latent_std.float()
    return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)


class Diffusion(nn.Module):
    """Noise-prediction training of the U-Net, or of a hypernetwork or LoRA adapters (`adapter`)
    on the frozen U-Net.

    `forward(batch, generator)` returns the loss, so DistributedDataParallel wraps it like any
    model. The text encoders and the VAE stay frozen, as in the source's training. `prompts`
    None: no text encoders, the batches carry cached text (trainer/text_cache.py), cut at
    `max_tokens` and laid out as `layout` says.
    """

    def __init__(
        self,
        parts: Parts,
        prompts: PromptEncoder | SDXLPromptEncoder | None,
        adapter: Hypernetwork | LoraWeights | None = None,
        caption_dropout: float = 0.0,
        max_tokens: int = 225,
        layout: str = "full",
    ):
        super().__init__()
        self.max_tokens, self.layout = max_tokens, layout
        self.parts = parts  # what the sampler renders with (validation images)
        self.unet, self.text_encoder, self.vae = parts.unet, parts.text_encoder, parts.vae
        self.text_encoder_2 = parts.text_encoder_2
        self.scheduler, self.prompts, self.caption_dropout = (
            parts.scheduler,
            prompts,
            caption_dropout,
        )
        self.hypernetwork = adapter if isinstance(adapter, Hypernetwork) else None
        self.lora = adapter if isinstance(adapter, LoraWeights) else None  # in the U-Net already
        for module in self.frozen_modules():
            module.requires_grad_(False)
        if self.lora is not None:  # its parameters, in the frozen U-Net's layers, train
            self.lora.requires_grad_(True)
        if self.hypernetwork is not None:
            self.hypernetwork.attach(self.unet)

    def trained_module(self) -> nn.Module:
        """The hypernetwork or the adapters on the frozen U-Net, or the U-Net."""
        adapter = self.hypernetwork if self.hypernetwork is not None else self.lora
        return adapter if adapter is not None else self.unet

    def frozen_modules(self) -> list[nn.Module]:
        parts = (
            self.text_encoder,
            self.text_encoder_2,
            self.vae,
            self.unet if self.trained_module() is not self.unet else None,
        )
        return [module for module in parts if module is not None]

    def latent_encoder(self) -> nn.Module | None:
        return self.vae

    def bucket_step(self) -> int:
        """The VAE's factor (the U-Net itself copes with any latent size)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def enable_gradient_checkpointing(self) -> None:
        """The U-Net's (the text encoders never train here)."""
        self.unet.enable_gradient_checkpointing()

    def save_weights(self, out_dir: Path, suffix: str = "") -> list[Path]:
        """A hypernetwork as `.safetensors` (and AUTOMATIC1111's `.pt` when shared across
        depths); LoRA adapters as trainer/lora.py says; a U-Net as a diffusers folder."""
        if self.lora is not None:
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

            kind = StableDiffusionXLPipeline if self.parts.xl else StableDiffusionPipeline
            return save_lora(self.unet, kind, out_dir, suffix, kohya=True)
        if self.hypernetwork is None:
            self.unet.save_pretrained(out_dir / f"unet{suffix}")
            return [out_dir / f"unet{suffix}"]
        shared = not self.hypernetwork.config.per_depth
        paths = [
            out_dir / f"hypernetwork{suffix}{extension}"
            for extension in (".safetensors",) + (".pt",) * shared
        ]
        for path in paths:
            self.hypernetwork.save(path)
        return paths

    def latents(self, batch, generator: torch.Generator) -> torch.Tensor:
        """What the U-Net denoises: the VAE's sample of the batch (`vae_sample`), scaled;
        pixels without a VAE."""
        if self.vae is None:
            return batch.pixels
        return vae_sample(self.vae, batch, generator) * self.vae.config.scaling_factor

    def forward(self, batch, generator: torch.Generator) -> torch.Tensor:
        """The loss on a `trainer.loader.Batch` (pixels or latents, captions or their cached
        encoding; SDXL: its size conditioning)."""
        captions = batch.captions
        dropped = torch.rand(len(captions), generator=generator) < self.caption_dropout
        if batch.text is None:
            kept = [c if not drop else "" for drop, c in zip(dropped, captions, strict=True)]
            context, pooled = self.prompts.encode(kept)
        else:
            context, pooled = chunked_conditioning(
                batch.text, dropped, self.max_tokens, self.layout
            )
        latents = self.latents(batch, generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        added = None
        if pooled is not None:
            ids = time_ids(batch.original_size, batch.crop_top_left, batch.target_size)
            added = {"text_embeds": pooled, "time_ids": ids.to(latents.device)}
        prediction = self.unet(
            noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added
        ).sample
        loss = nn.functional.mse_loss(prediction.float(), target.float())
        if self.hypernetwork is not None:
            loss = loss + self.hypernetwork.penalty()
        return loss
