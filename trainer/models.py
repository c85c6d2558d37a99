"""The models the trainer trains, behind one small protocol: `MODELS` builds them by --model.

A model is an `nn.Module` whose forward(batch, generator) returns its loss (so DDP wraps it like
any model) and which says what trains, what stays frozen, which VAE (if any) makes its latents,
and how its trained weights are saved for other tools. `conv` is a small denoiser (a smoke test
of the data path); `sd` and `sdxl` are trainer/diffusion.py's Stable Diffusion models, `sd3`
and `flux` trainer/flow.py's flow-matching transformers; `--train-part` picks what trains on them
(`ADAPTERS`: a hypernetwork, LoRA adapters, or the whole denoiser).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from pipeline.errors import UsageError
from trainer.config import Config
from trainer.loader import Batch
from trainer.optimization import PRECISIONS, Optimization


class Model(Protocol):
    """What the trainer needs of a model."""

    def __call__(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The loss on `batch` (nn.Module's call of forward)."""
        ...

    def trained_module(self) -> nn.Module:
        """The part that trains: what the optimizer, the EMA and checkpoints hold."""
        ...

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen parts, stored in the low precision under --mixed-precision."""
        ...

    def latent_encoder(self) -> nn.Module | None:
        """The VAE whose latents it denoises (cached latents must be of it); None: pixels."""
        ...

    def bucket_step(self) -> int:
        """Every bucket side must be a multiple of this many pixels."""
        ...

    def enable_gradient_checkpointing(self) -> None: ...

    def save_weights(self, out_dir: Path, suffix: str = "") -> list[Path]:
        """The trained weights in the formats other tools read; the paths written."""
        ...


class ConvDenoiser(nn.Module):
    """A small fully convolutional denoiser: it sees pixels + noise and must name the noise."""

    def __init__(self, channels: int, noise: float):
        super().__init__()
        c, self.noise = channels, noise
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, 3, 3, padding=1),
        )

    def forward(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        pixels = batch.pixels
        noise = torch.randn(pixels.shape, generator=generator).to(pixels.device)
        return nn.functional.mse_loss(self.net(pixels + self.noise * noise), noise)

    def trained_module(self) -> nn.Module:
        return self

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def latent_encoder(self) -> nn.Module | None:
        return None

    def bucket_step(self) -> int:
        return 1

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to recompute: four convolutions."""

    def save_weights(self, out_dir: Path, suffix: str = "") -> list[Path]:
        """Nothing beside the checkpoint: no other tool reads this model."""
        return []


def _conv(config: Config, cached_text: bool = False) -> Model:
    return ConvDenoiser(config.channels, config.noise)


def _stable_diffusion(config: Config, cached_text: bool = False) -> Model:
    """`cached_text`: the batches carry the text cache's entries, so the text encoders are
    never loaded (a text cache needs --pretrained: trainer/text_cache.py)."""
    from trainer.diffusion import Diffusion, load_parts, tiny_parts

    xl = config.model == "sdxl"
    parts = (
        load_parts(config.pretrained, text_encoders=not cached_text)
        if config.pretrained
        else tiny_parts(config.seed, with_vae=True, xl=xl)  # latent space: any image size
    )
    if parts.xl != xl:
        kind, model = ("an SDXL", "sdxl") if parts.xl else ("an SD 1.x", "sd")
        raise UsageError(
            f"--pretrained {config.pretrained} is {kind} checkpoint: use --model {model}"
        )
    options = (config.max_tokens, config.clip_skip, config.prompt_layout)
    prompts = None if cached_text else parts.prompt_encoder(*options)
    adapter = ADAPTERS[config.trained_part](config, parts.unet)
    return Diffusion(
        parts,
        prompts,
        adapter,
        config.caption_dropout,
        config.max_tokens,
        config.prompt_layout,
    )


def _hypernetwork(config: Config, unet: nn.Module) -> nn.Module:
    """A new hypernetwork for `unet` (which stays frozen)."""
    from trainer.hypernetwork import Hypernetwork, HypernetworkConfig, cross_attentions

    return Hypernetwork(
        HypernetworkConfig(
            widths=(unet.config.cross_attention_dim,),
            layer_structure=config.hypernetwork_structure,
            activation=config.hypernetwork_activation,
            layer_norm=config.hypernetwork_layer_norm,
            dropout=config.hypernetwork_dropout,
            per_depth=not config.hypernetwork_shared,
            depths=tuple(sorted({depth for _, depth, _ in cross_attentions(unet)})),
            depth_penalty=config.depth_penalty,
        )
    )


def _lora(config: Config, denoiser: nn.Module) -> nn.Module:
    """LoRA adapters added to `denoiser` (which stays frozen): their weights."""
    from trainer.lora import add_lora

    return add_lora(denoiser, config.lora_rank, config.lora_alpha, config.lora_layers)


def _flow_matching(config: Config, cached_text: bool = False) -> Model:
    """SD3 or Flux.1 (trainer/flow.py); text encoders only where the batches carry no cache."""
    from trainer.flow import FlowMatching, load_flow_parts

    dtype = PRECISIONS[config.mixed_precision]  # store_frozen_parts' cast, done as they load
    frozen = {"text": dtype} | ({"transformer": dtype} if config.trained_part == "lora" else {})
    parts = load_flow_parts(
        config.pretrained,
        config.model,
        config.seed,
        not cached_text,
        config.max_sequence_length,
        frozen,
    )
    adapter = ADAPTERS[config.trained_part](config, parts.transformer)
    return FlowMatching(parts, adapter, config)


# --model's choices, built from the config and whether the batches carry cached text
MODELS: dict[str, Callable[[Config, bool], Model]] = {
    "conv": _conv,
    "sd": _stable_diffusion,
    "sdxl": _stable_diffusion,
    "sd3": _flow_matching,
    "flux": _flow_matching,
}
# --train-part's: the module that trains beside the frozen denoiser (None: the denoiser itself)
ADAPTERS: dict[str, Callable[[Config, nn.Module], nn.Module | None]] = {
    "hypernetwork": _hypernetwork,
    "lora": _lora,
    "unet": lambda config, denoiser: None,
    "transformer": lambda config, denoiser: None,
}


def save_result(model: Model, out_dir: Path, optimization: Optimization) -> list[Path]:
    """The trained weights (`Model.save_weights`) and, with --use-ema, their average beside them
    (`_ema` names, which trainer/sample.py prefers). The paths written."""
    written = model.save_weights(out_dir)
    if optimization.ema is not None:
        with optimization.averaged():
            written += model.save_weights(out_dir, "_ema")
    return written
