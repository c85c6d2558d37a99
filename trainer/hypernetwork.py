"""Hypernetworks in NovelAI's sense: small residual MLPs on cross-attention's key and value inputs.

For every context width (768 for SD 1.x) a pair of modules, one for the key input and one for the
value input, rewrites the text context before the U-Net's cross-attention projects it: k =
to_k(context + mlp_k(context)), v likewise. Queries and self-attention are left alone. The last
linear layer starts at zero, so an untrained hypernetwork leaves the U-Net's output unchanged.

`per_depth=True` gives each depth of the U-Net (0 = the shallowest, highest-resolution level) its
own pair, so that `depth_penalty` can hold back the shallow layers, which the source found to
overfit first: an L2 penalty on each depth's weights. `per_depth=False` shares one pair per
width across depths, as AUTOMATIC1111 and NovelAI files do.

Files: `.safetensors` (tensors, with the config in the metadata), and the `.pt` that AUTOMATIC1111
and NovelAI users share, `{width: [k_state, v_state], "layer_structure": ..., ...}` (shared pairs
only), read with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

ACTIVATIONS = {  # AUTOMATIC1111's names
    "linear": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class HypernetworkConfig:
    widths: tuple[int, ...] = (768,)  # context widths (the text encoder's hidden size)
    layer_structure: tuple[float, ...] = (1, 2, 1)  # layer sizes as multiples of the width
    activation: str = "linear"  # one of ACTIVATIONS
    layer_norm: bool = False  # a LayerNorm after every linear layer
    dropout: float = 0.0  # after every hidden layer, in training
    per_depth: bool = True  # one pair per U-Net depth (needed by depth_penalty), else shared
    depths: tuple[int, ...] = (0, 1, 2, 3)  # U-Net depths with cross-attention (SD 1.x's)
    depth_penalty: tuple[float, ...] = (1e-2,)  # L2 weight on depth 0, 1, ...; missing: 0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: one of {sorted(ACTIVATIONS)}")
        structure = self.layer_structure
        if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
            raise ValueError("layer_structure must start and end with 1 (the module is residual)")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")


class HypernetworkModule(nn.Module):
    """x + mlp(x), the MLP laid out as AUTOMATIC1111 lays it out (its state dicts load as is)."""

    def __init__(self, width: int, config: HypernetworkConfig):
        super().__init__()
        sizes = [int(width * multiple) for multiple in config.layer_structure]
        layers: list[nn.Module] = []
        for i, (size_in, size_out) in enumerate(itertools.pairwise(sizes)):
            last = i == len(sizes) - 2
            layers.append(nn.Linear(size_in, size_out))
            if ACTIVATIONS[config.activation] is not None and not last:
                layers.append(ACTIVATIONS[config.activation]())
            if config.layer_norm:
                layers.append(nn.LayerNorm(size_out))
            if config.dropout > 0 and not last:
                layers.append(nn.Dropout(config.dropout))
        self.linear = nn.Sequential(*layers)
        for layer in self.linear:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        last_linear = [layer for layer in self.linear if isinstance(layer, nn.Linear)][-1]
        nn.init.zeros_(last_linear.weight)  # untrained: output == input, exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


def _depth(name: str, down_blocks: int) -> int:
    """Resolution level of a U-Net submodule from its name: 0 is the shallowest."""
    if match := re.match(r"down_blocks\.(\d+)\.", name):
        return int(match.group(1))
    if match := re.match(r"up_blocks\.(\d+)\.", name):
        return down_blocks - 1 - int(match.group(1))
    return down_blocks - 1  # the mid block: the deepest


def cross_attentions(unet: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(name, depth, module) of every cross-attention layer of a diffusers U-Net."""
    down_blocks = len(unet.down_blocks)
    return [
        (name, _depth(name, down_blocks), module)
        for name, module in unet.named_modules()
        if getattr(module, "is_cross_attention", False)
    ]


class Hypernetwork(nn.Module):
    """(key module, value module) pairs, keyed "768" (shared) or "768@0" (width@depth)."""

    def __init__(self, config: HypernetworkConfig):
        super().__init__()
        self.config = config
        self.pairs = nn.ModuleDict()
        for width in config.widths:
            for depth in config.depths if config.per_depth else [None]:
                pair = [HypernetworkModule(width, config) for _ in ("k", "v")]
                self.pairs[self.key(width, depth)] = nn.ModuleList(pair)

    def key(self, width: int, depth: int | None) -> str:
        return f"{width}" if depth is None or not self.config.per_depth else f"{width}@{depth}"

    def attach(self, unet: nn.Module) -> list:
        """Hook the pairs onto `unet`'s cross-attention key and value inputs; handles to detach.

        Within one U-Net forward every layer of a depth gets the same context, so each module
        rewrites it once and the layers share the result (SD 1.x: 8 module calls, not 32).
        """
        rewritten: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def forget(*_):
            rewritten.clear()

        def rewrite(module: HypernetworkModule):
            def hook(_projection, args):
                done = rewritten.get(id(module))
                if done is None or done[0] is not args[0]:
                    done = rewritten[id(module)] = (args[0], module(args[0]))
                return (done[1], *args[1:])

            return hook

        handles = [unet.register_forward_pre_hook(forget), unet.register_forward_hook(forget)]
        for name, depth, attention in cross_attentions(unet):
            width = attention.to_k.in_features
            key = self.key(width, depth)
            if key not in self.pairs:
                raise ValueError(f"{name}: no hypernetwork for context width {width} ({key})")
            projections = (attention.to_k, attention.to_v)
            for projection, module in zip(projections, self.pairs[key], strict=True):
                handles.append(projection.register_forward_pre_hook(rewrite(module)))
        return handles

    def penalty(self) -> torch.Tensor:
        """Sum over depths of depth_penalty[depth] * the squared weights of that depth's pairs."""
        total = torch.zeros((), device=next(self.parameters()).device)
        if not self.config.per_depth:
            return total
        for depth, weight in enumerate(self.config.depth_penalty):
            if weight and depth in self.config.depths:
                for width in self.config.widths:
                    pair = self.pairs[self.key(width, depth)]
                    total = total + weight * sum(p.square().sum() for p in pair.parameters())
        return total

    def save(self, path: str | Path) -> None:
        """`.safetensors` (with the config), or AUTOMATIC1111's `.pt` (shared pairs only)."""
        path = Path(path)
        if path.suffix == ".pt":
            torch.save(self.a1111_state(), path)
            return
        config = json.dumps(dataclasses.asdict(self.config))
        save_file(self.state_dict(), path, metadata={"hypernetwork_config": config})

    def a1111_state(self, name: str = "hypernetwork") -> dict:
        if self.config.per_depth:
            raise ValueError("AUTOMATIC1111's format holds one pair per width: use per_depth=False")
        state: dict = {int(k): [m.state_dict() for m in pair] for k, pair in self.pairs.items()}
        state.update(
            name=name,
            layer_structure=list(self.config.layer_structure),
            activation_func=self.config.activation,
            is_layer_norm=self.config.layer_norm,
            weight_initialization="Normal",
            use_dropout=self.config.dropout > 0,
            dropout_structure=_dropout_structure(self.config),
            activate_output=False,
            last_layer_dropout=False,
        )
        return state


def _dropout_structure(config: HypernetworkConfig) -> list[float]:
    inner = [config.dropout] * (len(config.layer_structure) - 2)
    return [0.0, *inner, 0.0]


def load(path: str | Path) -> Hypernetwork:
    """A hypernetwork from `.safetensors` (ours) or `.pt` (AUTOMATIC1111 / NovelAI)."""
    path = Path(path)
    if path.suffix == ".pt":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: refused, it holds more than weights: {error}") from None
        return from_a1111(state)
    with safe_open(path, framework="pt") as file:
        fields = json.loads(file.metadata()["hypernetwork_config"])
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    config = HypernetworkConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in fields.items()})  # fmt: skip
    hypernetwork = Hypernetwork(config)
    hypernetwork.load_state_dict(tensors)
    return hypernetwork


def from_a1111(state: dict) -> Hypernetwork:
    """A hypernetwork from an AUTOMATIC1111 / NovelAI state (one pair per width)."""
    widths = tuple(sorted(k for k in state if isinstance(k, int)))
    dropouts = set(state.get("dropout_structure") or [0.0])
    dropout = max(dropouts) if state.get("use_dropout") else 0.0
    if state.get("use_dropout") and len(dropouts - {0.0}) > 1:
        raise ValueError(f"per-layer dropout {state['dropout_structure']} is not supported")
    if state.get("activate_output"):
        raise ValueError("an activated output layer is not supported (it is not residual)")
    config = HypernetworkConfig(
        widths=widths,
        layer_structure=tuple(state.get("layer_structure") or (1, 2, 1)),
        activation=state.get("activation_func") or "linear",
        layer_norm=bool(state.get("is_layer_norm")),
        dropout=dropout,
        per_depth=False,
        depth_penalty=(),
    )
    hypernetwork = Hypernetwork(config)
    for width in widths:
        for module, module_state in zip(hypernetwork.pairs[str(width)], state[width], strict=True):
            module.load_state_dict(module_state)
    return hypernetwork
