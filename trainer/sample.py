"""Render an image from a prompt with classifier-free guidance, with or without a hypernetwork
or LoRA adapters.

    python trainer/sample.py --pretrained SD_FOLDER --prompt "..." --out image.png \\
        [--hypernetwork out/hypernetwork.safetensors | --lora out/] [--negative "..."] [--scale 7]

The prompt and the unconditional (negative) prompt are encoded in one batch, so both get the
same number of 75-token chunks; the guided prediction is uc + (prompt - uc) * scale. An SDXL
checkpoint (one with text_encoder_2/) is also told the original size, crop and target size you
choose (`--original-size`, `--crop-top-left`; by default the image's size and no crop: a whole,
uncropped picture). Without --pretrained, tiny random models (`--xl` for SDXL's; a smoke test:
the image is noise). An SD3 or Flux checkpoint renders through its diffusers pipeline, with
`--lora` loaded by its `load_lora_weights` (--scale: its guidance, --steps its sampler's).
"""

from __future__ import annotations

from pathlib import Path

from trainer.sample_config import SampleConfig, parse_sample

if __name__ == "__main__":  # --help and a mistaken option are answered before torch loads
    CONFIG = parse_sample(description=__doc__)

import numpy as np  # the imports that take seconds
import torch
from diffusers import DDIMScheduler
from PIL import Image

from trainer.diffusion import Parts, load_parts, time_ids, tiny_parts
from trainer.hypernetwork import Hypernetwork
from trainer.hypernetwork import load as load_hypernetwork


@torch.no_grad()
def sample(
    parts: Parts, config: SampleConfig, hypernetwork: Hypernetwork | None = None
) -> Image.Image:
    """One image of `config.prompt`: DDIM steps on the U-Net with classifier-free guidance.

    SDXL parts are conditioned on `config.original_size` (height, width; none: the image's),
    `config.crop_top_left` (top, left) and the image's size as the target. The hypernetwork
    renders in eval mode (no dropout) whatever its mode; its mode is restored.
    """
    device = next(parts.unet.parameters()).device
    height, width, scale = config.height, config.width, config.scale
    training = hypernetwork is not None and hypernetwork.training
    handles = hypernetwork.to(device).eval().attach(parts.unet) if hypernetwork is not None else []
    try:
        prompts = parts.prompt_encoder(config.max_tokens, config.clip_skip, config.prompt_layout)
        context, pooled = prompts.encode([config.negative, config.prompt])  # unconditional first
        added = None
        if pooled is not None:
            sizes = [config.original_size or (height, width), config.crop_top_left, (height, width)]
            ids = time_ids(*(torch.tensor([size, size]) for size in sizes)).to(device)
            added = {"text_embeds": pooled, "time_ids": ids}
        scheduler = DDIMScheduler.from_config(parts.scheduler.config)
        scheduler.set_timesteps(config.steps)
        factor = 2 ** (len(parts.vae.config.block_out_channels) - 1) if parts.vae else 1
        channels = parts.unet.config.in_channels
        generator = torch.Generator().manual_seed(config.seed)
        shape = (1, channels, height // factor, width // factor)
        latents = torch.randn(shape, generator=generator).to(device)
        latents = latents * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
            prediction = parts.unet(
                model_input, timestep, encoder_hidden_states=context, added_cond_kwargs=added
            ).sample
            uc, c = prediction.chunk(2)
            latents = scheduler.step(uc + (c - uc) * scale, timestep, latents).prev_sample
        if parts.vae is not None:
            with torch.autocast(latents.device.type, enabled=False):  # the VAE's own dtype
                scaled = (latents / parts.vae.config.scaling_factor).to(parts.vae.dtype)
                pixels = parts.vae.decode(scaled).sample
        else:
            pixels = latents
    finally:
        for handle in handles:
            handle.remove()
        if training:
            hypernetwork.train()
    image = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()))


def averaged(path: Path, raw: bool = False) -> Path:
    """The EMA weights saved beside `path` (hypernetwork_ema.safetensors, unet_ema/) when
    there are, unless `raw`; else `path`."""
    ema = path.with_name(f"{path.stem}_ema{path.suffix}")
    if not raw and ema.exists():
        print(f"using the averaged weights {ema}")
        return ema
    return path


def lora_file(path: Path, raw: bool = False) -> Path:
    """The LoRA file `path` names: itself, or train.py's in the folder (its average first)."""
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    return averaged(path, raw)


def add_lora(unet, path: Path, xl: bool) -> None:
    """LoRA weights into the U-Net, read as diffusers' SD pipelines read them (its layout,
    kohya-ss's or others', converted; alpha kept)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    state, alphas, metadata = kind.lora_state_dict(str(path), return_lora_metadata=True)
    kind.load_lora_into_unet(state, alphas, unet, metadata=metadata)


def flow_sample(config: SampleConfig, device: torch.device) -> Image.Image | None:
    """An SD3 or Flux checkpoint's image through its own diffusers pipeline; None for others."""
    from diffusers import DiffusionPipeline

    from pipeline.format import checkpoint_family

    if checkpoint_family(config.pretrained) not in ("sd3", "flux"):
        return None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as its model cards
    pipeline = DiffusionPipeline.from_pretrained(
        config.pretrained, torch_dtype=dtype, local_files_only=True
    )
    if config.lora:
        pipeline.load_lora_weights(str(lora_file(Path(config.lora), config.no_ema)))
    return pipeline.to(device)(
        config.prompt,
        height=config.height,
        width=config.width,
        num_inference_steps=config.steps,
        guidance_scale=config.scale,
        generator=torch.Generator().manual_seed(config.seed),
    ).images[0]


def main(config: SampleConfig) -> None:
    """Render the image the parsed command line asks for."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image = flow_sample(config, device) if config.pretrained else None
    if image is None:
        image = unet_sample(config, device)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({image.width}x{image.height})")


def unet_sample(config: SampleConfig, device: torch.device) -> Image.Image:
    """SD 1.x's or SDXL's image, with the hypernetwork or LoRA the config names."""
    if config.pretrained:
        parts = load_parts(config.pretrained)
    else:  # latent space, as SD: any image size
        parts = tiny_parts(config.seed, with_vae=True, xl=config.xl)
    if config.unet:
        from diffusers import UNet2DConditionModel

        folder = averaged(Path(config.unet), config.no_ema)
        parts.unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
    if config.lora:
        add_lora(parts.unet, lora_file(Path(config.lora), config.no_ema), parts.xl)
    for module in (parts.unet, parts.text_encoder, parts.text_encoder_2, parts.vae):
        if module is not None:
            module.to(device).eval()
    hypernetwork = None
    if config.hypernetwork:
        hypernetwork = load_hypernetwork(averaged(Path(config.hypernetwork), config.no_ema))
    return sample(parts, config, hypernetwork)


if __name__ == "__main__":
    main(CONFIG)
