"""LoRA adapters on a frozen denoiser (a U-Net or a transformer), through peft as diffusers'
training scripts add them, saved in the files other tools load.

    OUT_DIR/pytorch_lora_weights.safetensors   diffusers' layout (peft keys under `unet.` or
                                               `transformer.`, the adapter's config in the
                                               file's metadata): `pipeline.load_lora_weights(
                                               OUT_DIR)` reads it, alpha and all
    OUT_DIR/lora_kohya.safetensors             sd, sdxl: kohya-ss's layout (`lora_unet_*`
                                               keys, `lora_down`/`lora_up`, an `alpha` each),
                                               what AUTOMATIC1111 and ComfyUI load

With --use-ema, the average is saved beside them with an `_ema` suffix. The adapters' weights
train in fp32 (with the base stored in bf16 or fp16 under --mixed-precision) and are what
checkpoints, the optimizer and the EMA hold (`LoraWeights`), never the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # a U-Net's attention projections
JOINT_ATTENTION = (*ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # + text
WEIGHTS = "pytorch_lora_weights"  # diffusers' LORA_WEIGHT_NAME_SAFE, without .safetensors
KOHYA = "lora_kohya"


class LoraWeights(nn.Module):
    """The adapters' parameters (the same tensors the denoiser's peft layers use), as one module:
    what the optimizer, the EMA and checkpoints hold. Names are the denoiser's, dots as `__`."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        trained = {n: p for n, p in denoiser.named_parameters() if "lora_" in n and p.requires_grad}
        self.weights = nn.ParameterDict({n.replace(".", "__"): p for n, p in trained.items()})


def add_lora(denoiser: nn.Module, rank: int, alpha: float, layers: str) -> LoraWeights:
    """Adapters of `rank` on the `layers` (comma-separated names; empty: the attention
    projections) of the frozen `denoiser` (a diffusers model); their weights."""
    from peft import LoraConfig

    joint = hasattr(denoiser.config, "joint_attention_dim")  # SD3's and Flux's transformers
    targets = [name for name in layers.split(",") if name] or list(
        JOINT_ATTENTION if joint else ATTENTION
    )
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets
    )
    try:
        denoiser.add_adapter(config)
    except ValueError as error:  # peft: no module matched
        raise ValueError(f"--lora-layers {','.join(targets)}: {error}") from error
    return LoraWeights(denoiser)


def save_lora(
    denoiser: nn.Module, pipeline_class: type, out_dir: Path, suffix: str, kohya: bool
) -> list[Path]:
    """The adapters of `denoiser` as `pipeline_class.save_lora_weights` writes them (with the
    adapter's config, so alpha is kept), and in kohya-ss's layout where `kohya`; the paths."""
    from peft.utils import get_peft_model_state_dict

    state = {
        name: t.detach().float().cpu() for name, t in get_peft_model_state_dict(denoiser).items()
    }
    part = "unet" if hasattr(pipeline_class, "unet_name") else "transformer"
    metadata = denoiser.peft_config["default"].to_dict()
    path = out_dir / f"{WEIGHTS}{suffix}.safetensors"
    pipeline_class.save_lora_weights(
        out_dir,
        weight_name=path.name,
        **{f"{part}_lora_layers": state, f"{part}_lora_adapter_metadata": metadata},
    )
    if not kohya:
        return [path]
    kohya_path = out_dir / f"{KOHYA}{suffix}.safetensors"
    save_kohya(state, metadata, kohya_path)
    return [path, kohya_path]


def save_kohya(state: dict[str, torch.Tensor], metadata: dict, path: Path) -> None:
    """A U-Net's peft adapter state as kohya-ss's networks.lora writes it: diffusers' own
    conversion (`convert_state_dict_to_kohya`), with the adapter's alpha (it assumes the rank)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    converted = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    alpha = float(metadata["lora_alpha"])
    for key in converted:
        if key.endswith(".alpha"):
            converted[key] = torch.tensor(alpha)
    rank = int(metadata["r"])
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
    save_file(converted, path, metadata=header | {"ss_network_alpha": f"{alpha:g}"})
