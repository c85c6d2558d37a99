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
and NovelAI users share, `{width: (k_state, v_state), "layer_structure": ..., ...}` (shared pairs
only), read with `torch.load(weights_only=True)`, which refuses pickled code. A `.pt` is read as
A1111 reads it (modules/hypernetworks/hypernetwork.py, `Hypernetwork.load`): its defaults for
missing fields, its dropout structure derived from older files' flags, NovelAI's `linear1` /
`linear2` key names; and written as A1111's `save` writes it, in a form its pre-load check
(modules/safe.py, `check_pt`) accepts.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from trainer.config import HypernetworkConfig  # the structure, its defaults and rules


def _activations() -> dict[str, type[nn.Module] | None]:
    """AUTOMATIC1111's activation names, built as it builds them (`HypernetworkModule`): "linear"
    (none) and "swish" (Hardswish), then every class of torch.nn.modules.activation, lower-cased
    (threshold and multiheadattention among them: they need arguments, so neither tool builds them).
    """
    module = nn.modules.activation
    classes = inspect.getmembers(module, inspect.isclass)
    torch_names = {name.lower(): cls for name, cls in classes if cls.__module__ == module.__name__}
    return {"linear": None, "swish": nn.Hardswish, **torch_names}


ACTIVATIONS = _activations()


class HypernetworkModule(nn.Module):
    """x + mlp(x), the MLP laid out as AUTOMATIC1111 lays it out (its state dicts load as is).

    After each linear layer, in this order: the activation (not after the last unless
    activate_output), a LayerNorm (layer_norm), a Dropout (where dropouts has one); the indices
    of `linear` are A1111's. The last linear layer starts at zero, so without activate_output an
    untrained module is the identity.
    """

    def __init__(self, width: int, config: HypernetworkConfig):
        super().__init__()
        sizes = [int(width * multiple) for multiple in config.layer_structure]
        activation = ACTIVATIONS[config.activation]
        layers: list[nn.Module] = []
        for i, (size_in, size_out) in enumerate(itertools.pairwise(sizes), start=1):
            last = i == len(sizes) - 1
            layers.append(nn.Linear(size_in, size_out))
            if activation is not None and (config.activate_output or not last):
                layers.append(activation())
            if config.layer_norm:
                layers.append(nn.LayerNorm(size_out))
            if config.dropouts[i] > 0:
                layers.append(nn.Dropout(config.dropouts[i]))
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

        Every layer of a depth gets the same context, so each module rewrites it once per U-Net
        forward (SD 1.x: 8 module calls, not 32), in the U-Net's forward pre-hook: outside the
        blocks that --gradient-checkpointing recomputes, so a recomputed block looks its
        rewritten context up as the forward did. A layer called with another context (outside
        a U-Net forward) has it rewritten on the spot.
        """
        attached: dict[int, HypernetworkModule] = {}
        rewritten: dict[int, torch.Tensor] = {}  # id(module) -> its output, for `seen` context
        seen: list[torch.Tensor] = []  # the context of the U-Net's latest forward

        def rewrite_all(_unet, args, kwargs):
            context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            seen[:] = [context]
            rewritten.clear()
            if context is not None:
                for key, module in attached.items():
                    if module.linear[0].in_features == context.shape[-1]:
                        rewritten[key] = module(context)

        def rewrite(module: HypernetworkModule):
            def hook(_projection, args):
                context = args[0]
                known = seen and seen[0] is context and id(module) in rewritten
                return (rewritten[id(module)] if known else module(context), *args[1:])

            return hook

        handles = [unet.register_forward_pre_hook(rewrite_all, with_kwargs=True)]
        for name, depth, attention in cross_attentions(unet):
            width = attention.to_k.in_features
            key = self.key(width, depth)
            if key not in self.pairs:
                raise ValueError(f"{name}: no hypernetwork for context width {width} ({key})")
            projections = (attention.to_k, attention.to_v)
            for projection, module in zip(projections, self.pairs[key], strict=True):
                attached[id(module)] = module
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
        """`.safetensors` (with the config), or AUTOMATIC1111's `.pt` (shared pairs only).

        The `.pt` is in torch's legacy (non-zip) format: A1111 checks a zip's member names
        before loading it (modules/safe.py, `check_pt`) and refuses the `.format_version` and
        `.storage_alignment` that torch.save's zip now holds; a legacy file it unpickles with
        its restricted unpickler instead, which passes. `name` is the file's stem: A1111 keeps
        loaded hypernetworks by name and takes the file's `name` for it.
        """
        path = Path(path)
        if path.suffix == ".pt":
            state = self.a1111_state(path.stem)
            torch.save(state, path, _use_new_zipfile_serialization=False)
            return
        config = json.dumps(dataclasses.asdict(self.config))
        data = safetensors_bytes(self.state_dict(), metadata={"hypernetwork_config": config})
        # Not save_file: safetensors 0.8 writes a temporary file that the tempfile crate makes
        # 0600 whatever the umask, and renames it into place. The same with a plain open honours it.
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(data)
        temporary.replace(path)

    def a1111_state(self, name: str) -> dict:
        """What A1111's `Hypernetwork.save` writes, less what it alone knows (step, checkpoint)."""
        if self.config.per_depth:
            raise ValueError("AUTOMATIC1111's format holds one pair per width: use per_depth=False")
        state: dict = {int(k): tuple(m.state_dict() for m in p) for k, p in self.pairs.items()}
        dropouts = list(self.config.dropouts)
        state.update(
            name=name,
            layer_structure=list(self.config.layer_structure),
            activation_func=self.config.activation,
            is_layer_norm=self.config.layer_norm,
            weight_initialization="Normal",
            activate_output=self.config.activate_output,
            use_dropout=any(dropouts),
            dropout_structure=dropouts,
            # what older A1111 releases build their layers from (with use_dropout)
            last_layer_dropout=dropouts[-2] != 0,
        )
        return state


def load(path: str | Path) -> Hypernetwork:
    """A hypernetwork from `.safetensors` (ours) or `.pt` (AUTOMATIC1111 / NovelAI), in eval mode
    (no dropout): ready for inference; call `.train()` to train it further."""
    path = Path(path)
    if path.suffix == ".pt":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: refused, it holds more than weights: {error}") from None
        return from_a1111(state).eval()
    with safe_open(path, framework="pt") as file:
        fields = json.loads(file.metadata()["hypernetwork_config"])
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    config = HypernetworkConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    )
    hypernetwork = Hypernetwork(config)
    hypernetwork.load_state_dict(tensors)
    return hypernetwork.eval()


def from_a1111(state: dict) -> Hypernetwork:
    """A hypernetwork from an AUTOMATIC1111 / NovelAI state (one pair per width), read as A1111's
    `Hypernetwork.load` reads it: its defaults for missing fields (an activated output layer
    included), its dropout structure for files without one, NovelAI's key names."""
    widths = tuple(sorted(k for k in state if isinstance(k, int)))
    layer_structure = tuple(state.get("layer_structure") or (1, 2, 1))
    config = HypernetworkConfig(
        widths=widths,
        layer_structure=layer_structure,
        activation=state.get("activation_func") or "linear",
        layer_norm=bool(state.get("is_layer_norm", False)),
        dropout_structure=_a1111_dropout_structure(state, len(layer_structure)),
        activate_output=bool(state.get("activate_output", True)),
        per_depth=False,
        depth_penalty=(),
    )
    hypernetwork = Hypernetwork(config)
    for width in widths:
        for module, module_state in zip(hypernetwork.pairs[str(width)], state[width], strict=True):
            module.load_state_dict(_a1111_names(module_state))
    return hypernetwork


def _a1111_dropout_structure(state: dict, layers: int) -> tuple[float, ...]:
    """The file's dropout_structure, else the one A1111 derives for it (`parse_dropout_structure`)
    from the flags older releases built their layers from: with use_dropout, 0.3 after every
    hidden layer but the last, and after the last too with last_layer_dropout."""
    if state.get("dropout_structure") is not None:
        return tuple(state["dropout_structure"])
    if not state.get("use_dropout", False):
        return (0.0,) * layers
    last = 0.3 if state.get("last_layer_dropout", False) else 0.0
    # for layer_structure [1, 1] A1111 derives three entries and reads the first two
    return (0.0, *[0.3] * (layers - 3), last, 0.0)[:layers]


# NovelAI's names for the two linear layers of its (1, 2, 1) modules, renamed as A1111 renames
# them (`HypernetworkModule.fix_old_state_dict`)
_NOVELAI_NAMES = {
    f"linear{n}.{p}": f"linear.{n - 1}.{p}" for n in (1, 2) for p in ("weight", "bias")
}


def _a1111_names(module_state: dict) -> dict:
    return {_NOVELAI_NAMES.get(key, key): tensor for key, tensor in module_state.items()}
