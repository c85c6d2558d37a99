"""SD3 and Flux.1 for the trainer: rectified-flow training of a diffusers transformer, as
diffusers' `train_dreambooth_lora_sd3.py` and `_flux.py` do it.

Each step draws u from the timestep density (`--weighting-scheme` logit_normal, mode or none,
i.e. uniform: diffusers' `compute_density_for_timestep_sampling`), shifts it to sigma with the
checkpoint's scheduler, noises the latents x as (1 - sigma) x + sigma noise and regresses the
transformer's prediction on noise - x, weighted as `compute_loss_weighting_for_sd3` says. The
shift is the scheduler's: SD3's fixed `shift` (3.0), or, where it shifts dynamically (Flux),
`time_shift(mu)` with mu from the batch's own image token count (`calculate_shift`), so every
bucket, a sequence of its own length, gets its resolution's shift. The draw is continuous (the
scripts index 1000 discrete sigmas), from the run's generator.

Flux packs the latents 2x2 into tokens with their position ids per bucket (its pipeline's
`_pack_latents`, `_prepare_latent_image_ids`), and a checkpoint with a guidance embedding is told
`--guidance-scale`. Latents are the VAE's, `(x - shift_factor) * scaling_factor`; prompts
trainer/flow_prompts.py's, from the text cache or encoded each step. `--pretrained` reads a
diffusers checkpoint folder; without it, tiny random models (trainer/tiny.py).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from torch import nn

from pipeline.errors import UsageError
from pipeline.format import FAMILY_PIPELINES, MAX_SEQUENCE_LENGTH, checkpoint_family
from trainer.diffusion import vae_sample
from trainer.flow_prompts import PipelineEncoder, flow_conditioning
from trainer.lora import LoraWeights, save_lora
from trainer.text_cache import stacked

TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
MIN_SIGMA = 1e-3


@dataclass
class FlowParts:
    family: str
    transformer: nn.Module
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    text: PipelineEncoder | None  # None: loaded without (a text cache conditions it)
    max_sequence_length: int


def load_flow_parts(
    pretrained: str,
    family: str,
    seed: int,
    text_encoders: bool = True,
    length: int = 0,
    frozen: dict | None = None,
) -> FlowParts:
    """`family`'s parts from the diffusers checkpoint folder `pretrained`, its text encoders
    only where `text_encoders`; without `pretrained`, tiny random ones (seeded: every rank
    builds the same). `length`: T5 tokens (0: the pipeline's default). `frozen`: the dtype
    a frozen "transformer" and the "text" encoders load in (none: as saved, fp32): Flux's
    12 B transformer and T5-XXL never pass through memory in fp32 on each rank."""
    length, frozen = length or MAX_SEQUENCE_LENGTH[family], frozen or {}
    if not pretrained:
        from trainer.tiny import build

        with tempfile.TemporaryDirectory() as scratch:
            folder = build(family, Path(scratch) / family, seed)
            return _load(folder, family, text_encoders, length, frozen)
    return _load(Path(pretrained).expanduser(), family, text_encoders, length, frozen)


def _load(folder: Path, family: str, text_encoders: bool, length: int, frozen: dict) -> FlowParts:
    import diffusers

    if not (folder / "transformer").is_dir() or not (folder / "vae").is_dir():
        raise UsageError(f"--pretrained {folder}: not a diffusers checkpoint of --model {family}")
    other = checkpoint_family(folder)
    if other is not None and other != family:
        raise UsageError(f"--pretrained {folder} is a {other} checkpoint: use --model {other}")
    local = {"local_files_only": True}
    kind = getattr(diffusers, TRANSFORMERS[family])
    transformer = kind.from_pretrained(
        folder / "transformer", torch_dtype=frozen.get("transformer"), **local
    )
    vae = AutoencoderKL.from_pretrained(folder / "vae", **local)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler", **local)
    settings = {"family": family, "max_sequence_length": length}
    text = None
    if text_encoders:
        text = PipelineEncoder(folder, settings, torch.device("cpu"), frozen.get("text"))
    return FlowParts(family, transformer, vae, scheduler, text, length)


class FlowMatching(nn.Module):
    """Flow-matching training of the transformer, or of LoRA adapters (`adapter`) on it frozen.
    `forward(batch, generator)` returns the loss (trainer/models.py's `Model`)."""

    def __init__(self, parts: FlowParts, adapter: LoraWeights | None, config):
        super().__init__()
        self.family, self.length = parts.family, parts.max_sequence_length
        self.transformer, self.vae, self.scheduler = parts.transformer, parts.vae, parts.scheduler
        self.text = parts.text
        encoders = [] if parts.text is None else parts.text.encoders()
        self.text_encoders = nn.ModuleList(encoders)  # moved with the model, stored frozen
        self.lora = adapter
        self.caption_dropout = config.caption_dropout
        self.weighting = config.weighting_scheme
        self.density = (config.logit_mean, config.logit_std, config.mode_scale)
        self.guidance_scale = config.guidance_scale
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        if adapter is not None:
            adapter.requires_grad_(True)

    def trained_module(self) -> nn.Module:
        return self.lora if self.lora is not None else self.transformer

    def frozen_modules(self) -> list[nn.Module]:
        frozen = [*self.text_encoders, self.vae]
        return frozen + [self.transformer] * (self.lora is not None)

    def latent_encoder(self) -> nn.Module:
        return self.vae

    def bucket_step(self) -> int:
        """Every bucket side a multiple of this: the VAE's factor times the 2x2 patches."""
        return self.factor * 2

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def save_weights(self, out_dir: Path, suffix: str = "") -> list[Path]:
        """LoRA adapters in diffusers' layout (trainer/lora.py); a transformer as a folder."""
        if self.lora is None:
            self.transformer.save_pretrained(out_dir / f"transformer{suffix}")
            return [out_dir / f"transformer{suffix}"]
        import diffusers

        kind = getattr(diffusers, FAMILY_PIPELINES[self.family])
        return save_lora(self.transformer, kind, out_dir, suffix, kohya=False)

    def latents(self, batch, generator: torch.Generator) -> torch.Tensor:
        config = self.vae.config
        shift = config.get("shift_factor") or 0.0
        return (vae_sample(self.vae, batch, generator) - shift) * config.scaling_factor

    def sigmas(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """u in [0, 1] shifted as the scheduler shifts: dynamically by the image's token count
        (latent `height` x `width` in 2x2 patches), or by its fixed `shift`."""
        config = self.scheduler.config
        if config.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(
                (height // 2) * (width // 2),
                config.base_image_seq_len,
                config.max_image_seq_len,
                config.base_shift,
                config.max_shift,
            )
            return self.scheduler.time_shift(mu, 1.0, u)
        return config.shift * u / (1 + (config.shift - 1) * u)

    def conditioning(self, batch, generator: torch.Generator):
        """(context, pooled): the cached entries, or the captions encoded (with the empty one,
        which dropped captions take); caption dropout drawn from `generator` either way."""
        dropped = torch.rand(len(batch.captions), generator=generator) < self.caption_dropout
        text = batch.text
        if text is None:
            encoded = [tensors for tensors, _ in self.text.encode([*batch.captions, ""])]
            text = stacked(encoded[:-1], encoded[-1])
        return flow_conditioning(text, dropped, self.length)

    def forward(self, batch, generator: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        context, pooled = self.conditioning(batch, generator)
        latents = self.latents(batch, generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        mean, std, mode_scale = self.density
        u = compute_density_for_timestep_sampling(
            self.weighting, len(latents), mean, std, mode_scale, generator=generator
        )
        # sigma 0 (u = 0 can be drawn) would weigh infinitely under sigma_sqrt: the scripts'
        # smallest of their 1000 discrete sigmas is the floor
        sigmas = self.sigmas(u, *latents.shape[-2:]).clamp(MIN_SIGMA, 1).to(latents.device)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        prediction = PREDICTIONS[self.family](self, noisy, sigmas, context, pooled)
        weighting = compute_loss_weighting_for_sd3(self.weighting, s)
        return (weighting * (prediction.float() - (noise - latents)) ** 2).mean()


def _predict_sd3(model: FlowMatching, noisy, sigmas, context, pooled) -> torch.Tensor:
    return model.transformer(
        hidden_states=noisy,
        timestep=sigmas * 1000,
        encoder_hidden_states=context,
        pooled_projections=pooled,
        return_dict=False,
    )[0]


def _predict_flux(model: FlowMatching, noisy, sigmas, context, pooled) -> torch.Tensor:
    """The packed latents in, the prediction unpacked: 2x2 patches, their ids per bucket."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    text_ids = torch.zeros(context.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = None
    if model.transformer.config.guidance_embeds:
        guidance = torch.full((b,), model.guidance_scale, device=noisy.device)
    prediction = model.transformer(
        hidden_states=packed,
        timestep=sigmas,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=context,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    factor = model.factor
    return FluxPipeline._unpack_latents(prediction, h * factor, w * factor, factor)


PREDICTIONS = {"sd3": _predict_sd3, "flux": _predict_flux}  # the transformer's call per family
