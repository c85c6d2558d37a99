"""Checkpoints: what a run needs to continue exactly where it stopped, in OUT_DIR/checkpoint.pt
beside the resolved config (OUT_DIR/config.toml).

Rank 0 writes the trained parameters (a frozen base model is not copied), the optimizer, the
schedule, the gradient scaler and the EMA (`Optimization.state_dict`), the (epoch, step) to
continue from, and every rank's random state, gathered; each rank restores its own. Written to
a temporary name and renamed: a killed save never leaves a half-written checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.cli import typed
from pipeline.errors import UsageError
from trainer.config import Config, read_saved, save_config
from trainer.optimization import Optimization

NAME = "checkpoint.pt"


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (a frozen base model is not copied into checkpoints)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in model.state_dict().items() if name in trained}


def save(
    config: Config,
    out_dir: Path,
    model: nn.Module,
    optimization: Optimization,
    position: tuple[int, int],
    generator: torch.Generator,
    world_size: int,
    master: bool,
) -> None:
    """The checkpoint at `position` (epoch, the next step) and the config beside it; every rank
    calls it (their random states are gathered), rank 0 writes."""
    states = _gathered(_random_state(generator), world_size)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": trained_state(model),
            "optimization": optimization.state_dict(),
            "epoch": position[0],
            "step": position[1],
            "generators": states,
        }
        torch.save(state, out_dir / "checkpoint.tmp")
        (out_dir / "checkpoint.tmp").replace(out_dir / NAME)
        save_config(config, out_dir)


def load(
    config: Config, out_dir: Path, model: nn.Module, optimization: Optimization, generator
) -> tuple[int, int]:
    """Weights, optimizer, schedule, scaler, EMA and this rank's random state from OUT_DIR's
    checkpoint; (epoch, step) to continue from. A UsageError names the settings a checkpoint
    of another model configuration was written with."""
    path = out_dir / NAME
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        loaded = model.load_state_dict(state["model"], strict=False)
        other = loaded.unexpected_keys or set(trained_state(model)) - set(state["model"])
    except RuntimeError:  # parameters of other shapes
        other = True
    if other:
        raise UsageError(
            f"{path} was written by another model configuration"
            f"{_differences(config, read_saved(out_dir))}: resume with its own "
            f"settings, --config {out_dir / 'config.toml'} --resume"
        )
    optimization.load_state_dict(state["optimization"])
    generators = state["generators"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    if len(generators) == (dist.get_world_size() if dist.is_initialized() else 1):
        _set_random_state(generator, generators[rank])
    return state["epoch"], state["step"]


def _random_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This rank's random state: the loss's generator and torch's own (dropout draws from it)."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_random_state(generator: torch.Generator, state) -> None:
    if isinstance(state, torch.Tensor):  # a checkpoint of before torch's own state was kept
        generator.set_state(state)
        return
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gathered(value, world_size: int) -> list:
    """Every rank's `value` (for rank 0 to save), in rank order."""
    if world_size == 1:
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value)
    return values


RUN_ONLY = {"resume", "overwrite", "config"}  # settings that say how to run, not what


def _differences(config: Config, saved: dict) -> str:
    """ ", which ran with --x A (this run: B), ..." for the settings a saved run differs in."""
    current = {key: typed(value) for key, value in vars(config).items() if key not in RUN_ONLY}
    differ = [
        f"--{key.replace('_', '-')} {typed(saved[key])} (this run: {value or 'none'})"
        for key, value in current.items()
        if key in saved and typed(saved[key]) != value
    ]
    return f", which ran with {', '.join(differ)}" if differ else ""
