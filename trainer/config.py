"""The trainer's settings: one frozen dataclass, validated once, and its command line and TOML
file derived from it. Imports no torch, so `--help` and a mistake in an option answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import HelpFormatter, add_options, check_choices, option, repeatable, typed

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")  # diffusers' get_scheduler
LAYOUTS = ("full", "trimmed")  # trainer/prompts.py: how 75-token chunks are laid out


@dataclass(frozen=True)
class Config:
    """Everything a run needs, validated once: a ValueError names the option at fault."""

    data: tuple[str, ...] = option(
        (),
        "a prepared dataset (jobs/prepare.py --output); repeat for several, PATH:WEIGHT for "
        "repeats (3: three times an epoch, 0.5: half of it)",
    )
    out_dir: str = option("checkpoints", "where rank 0 writes checkpoints and results")
    overwrite: bool = option(False, "start over in an OUT_DIR that holds another run's checkpoint")
    batch_size: int = option(4, "images per batch on each rank")
    epochs: int = option(1, "epochs to train")
    max_steps: int = option(0, "stop after this many optimizer steps of this run (0: all epochs)")
    lr: float = option(1e-3, "AdamW learning rate (the schedule's peak)")
    lr_scheduler: str = option("constant", "diffusers' schedule, over all --epochs", SCHEDULES)
    lr_warmup_steps: int = option(500, "optimizer steps of linear warm-up (the schedules with one)")
    gradient_accumulation_steps: int = option(
        1, "micro-batches whose gradients add up to one optimizer step (DDP syncs once)"
    )
    max_grad_norm: float = option(1.0, "clip the gradient's norm to this (0: no clipping)")
    mixed_precision: str = option(
        "no",
        "autocast for the forward pass (fp16 with a gradient scaler); trained weights stay fp32",
        ("no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = option(False, "recompute the U-Net's activations in backward")
    use_ema: bool = option(False, "keep an exponential moving average of the trained weights")
    ema_decay: float = option(0.9999, "the average's decay per optimizer step")
    seed: int = option(0, "data order, crops and the model's initialisation")
    num_workers: int = option(2, "DataLoader workers per rank (at most its cores minus one)")
    checkpoint_every: int = option(100, "optimizer steps between checkpoints (and one at the end)")
    resume: bool = option(False, "continue from OUT_DIR/checkpoint.pt exactly where it stopped")
    log_every: int = option(10, "optimizer steps between log lines")
    logging_dir: str = option("", "write TensorBoard event files here (rank 0)")
    validation_prompt: tuple[str, ...] = option(
        (), "sd/sdxl: render this prompt at every --validation-steps (repeatable)"
    )
    validation_steps: int = option(100, "optimizer steps between validation images")
    validation_width: int = option(512, "validation images' width in pixels")
    validation_height: int = option(512, "validation images' height in pixels")
    validation_inference_steps: int = option(20, "sampler steps of a validation image")
    config: str = option("", "a TOML file of these options (flags override it)")
    flip: float = option(0.0, "probability of a horizontal flip of each sample")
    shuffle_tags: bool = option(False, "shuffle each caption's comma-separated tags every epoch")
    keep_tokens: int = option(0, "the first N tags stay in place and are never dropped")
    tag_dropout: float = option(0.0, "drop each other tag with this probability")
    model: str = option(
        "conv", "conv: a small denoiser (a smoke test); sd: SD 1.x; sdxl", ("conv", "sd", "sdxl")
    )
    latents: str = option(
        "auto",
        "auto: train from the dataset's cached latents of the model's VAE when it holds "
        "them (jobs/prepare.py --vae); on: require them; off: from pixels",
        ("auto", "on", "off"),
    )
    channels: int = option(32, "conv: width")
    noise: float = option(0.5, "conv: noise level of the denoising objective")
    pretrained: str = option(
        "", "sd: local diffusers-layout checkpoint folder (empty: tiny random models)"
    )
    train_part: str = option(
        "hypernetwork",
        "sd: what trains (a hypernetwork on the frozen U-Net, or the U-Net)",
        ("hypernetwork", "unet"),
    )
    max_tokens: int = option(225, "sd: prompt limit in tokens, a multiple of 75")
    clip_skip: int = option(
        2, "sd: 2 = CLIP's penultimate layer (the source's), 1 = the last", (1, 2)
    )
    prompt_layout: str = option(
        "full",
        "sd: full 77-state chunks (231 states for 225 tokens, A1111's) or trimmed (227, kohya's)",
        LAYOUTS,
    )
    caption_dropout: float = option(
        0.1, "sd: share of captions replaced by the empty prompt (after the tag augmentations)"
    )
    hypernetwork_structure: tuple[float, ...] = option(
        (1.0, 2.0, 1.0), "layer sizes in multiples of the context width, e.g. 1,2,1"
    )
    hypernetwork_activation: str = option("linear", "an activation of trainer.hypernetwork")
    hypernetwork_layer_norm: bool = option(False, "a LayerNorm after every hypernetwork layer")
    hypernetwork_dropout: float = option(0.0, "dropout after every hidden hypernetwork layer")
    hypernetwork_shared: bool = option(
        False, "one pair per width for all depths (also written as AUTOMATIC1111's hypernetwork.pt)"
    )
    depth_penalty: tuple[float, ...] = option(
        (0.01,), "L2 weight per U-Net depth, shallowest first, e.g. 0.01,0.005"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        checks = {
            "data": (bool(self.data), "give a prepared dataset (jobs/prepare.py --output OUT)"),
            "flip": (0 <= self.flip <= 1, "must be a probability in [0, 1]"),
            "keep_tokens": (self.keep_tokens >= 0, "must be >= 0"),
            "tag_dropout": (0 <= self.tag_dropout < 1, "must be in [0, 1)"),
            "batch_size": (self.batch_size >= 1, "must be >= 1"),
            "epochs": (self.epochs >= 0, "must be >= 0"),
            "max_steps": (self.max_steps >= 0, "must be >= 0"),
            "lr": (self.lr > 0, "must be > 0"),
            "num_workers": (self.num_workers >= 0, "must be >= 0"),
            "checkpoint_every": (self.checkpoint_every >= 1, "must be >= 1"),
            "log_every": (self.log_every >= 1, "must be >= 1"),
            "lr_warmup_steps": (self.lr_warmup_steps >= 0, "must be >= 0"),
            "gradient_accumulation_steps": (self.gradient_accumulation_steps >= 1, "must be >= 1"),
            "max_grad_norm": (self.max_grad_norm >= 0, "must be >= 0"),
            "ema_decay": (0 < self.ema_decay < 1, "must be in (0, 1)"),
            "validation_steps": (self.validation_steps >= 1, "must be >= 1"),
            "validation_prompt": (not self.validation_prompt or self.model != "conv",
                                  "needs --model sd or sdxl"),
            "resume": (not (self.resume and self.overwrite), "and --overwrite exclude each other"),
            "max_tokens": (self.max_tokens > 0 and self.max_tokens % 75 == 0,
                           "must be a positive multiple of 75"),
            "caption_dropout": (0 <= self.caption_dropout < 1, "must be in [0, 1)"),
            "hypernetwork_activation": (self.hypernetwork_activation in _activations(),
                                        "must be a torch.nn activation's lower-case name"),
            "hypernetwork_dropout": (0 <= self.hypernetwork_dropout < 1, "must be in [0, 1)"),
            "hypernetwork_structure": (len(self.hypernetwork_structure) >= 2
                                       and self.hypernetwork_structure[0] == 1
                                       and self.hypernetwork_structure[-1] == 1,
                                       "must start and end with 1 (the module is residual)"),
            "depth_penalty": (all(w >= 0 for w in self.depth_penalty), "must be >= 0 each"),
        }  # fmt: skip
        for name, (valid, rule) in checks.items():
            if not valid:
                value = getattr(self, name)
                got = f", got {typed(value)}" if value not in ((), "") else ""
                raise ValueError(f"--{name.replace('_', '-')} {rule}{got}")


def _activations() -> set[str]:
    """The hypernetwork's activation names (torch.nn's; imported only to check one)."""
    from trainer.hypernetwork import ACTIVATIONS

    return set(ACTIVATIONS)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The command line: one option per Config field, its help, choices and default shown."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_options(parser, Config)
    return parser


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """Flags over `--config FILE.toml` over the defaults; refused by name when invalid."""
    parser = build_parser(description)
    known, _ = parser.parse_known_args(argv)
    from_file = _toml_options(known.config, parser) if known.config else {}
    many = repeatable(Config)
    parser.set_defaults(**{k: v for k, v in from_file.items() if k not in many})
    arguments = vars(parser.parse_args(argv))
    for name in many:  # given on the command line: replaces the file's, never appends
        arguments[name] = tuple(arguments[name] or from_file.get(name, ()))
    try:
        return Config(**arguments)
    except ValueError as error:
        parser.error(str(error))


def _toml_options(path: str, parser: argparse.ArgumentParser) -> dict:
    """A TOML file's options (`batch_size = 8` or `batch-size = 8`) as parser defaults."""
    try:
        with open(path, "rb") as file:
            values = tomllib.load(file)
    except OSError as error:
        parser.error(f"--config {path}: {error.strerror.lower()}")
    except tomllib.TOMLDecodeError as error:
        parser.error(f"--config {path} is not valid TOML: {error}")
    names = {item.name for item in dataclasses.fields(Config)}
    options = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(options) - names)
    if unknown:
        parser.error(f"--config {path}: unknown options {', '.join(unknown)}")
    for name in repeatable(Config) & set(options):  # `data = "OUT"`: one dataset, a list of one
        if isinstance(options[name], str):
            options[name] = [options[name]]
    return {name: tuple(v) if isinstance(v, list) else v for name, v in options.items()}


def save_config(config: Config, folder: Path) -> None:
    """The resolved config as TOML (what --config reads back)."""
    import tomli_w

    values = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(config).items() if k != "config"}  # fmt: skip
    (folder / "config.toml").write_text(tomli_w.dumps(values))


def read_saved(folder: Path) -> dict:
    """The config.toml a run left in `folder` ({} where there is none)."""
    try:
        with open(folder / "config.toml", "rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def sample_parser(description: str = "") -> argparse.ArgumentParser:
    """trainer/sample.py's command line."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--prompt", required=True, help="the prompt, up to --max-tokens")
    parser.add_argument("--negative", default="", help="the unconditional prompt")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--pretrained", help="diffusers-layout folder; default: tiny random")
    parser.add_argument(
        "--hypernetwork",
        help=".safetensors (ours) or .pt (AUTOMATIC1111); its "
        "_ema sibling (--use-ema) is taken when present",
    )
    parser.add_argument(
        "--unet",
        help="a trained U-Net folder (train.py's unet/; unet_ema/ beside it is taken when present)",
    )
    parser.add_argument("--no-ema", action="store_true", help="the raw weights, not the average")
    parser.add_argument("--xl", action="store_true", help="without --pretrained: tiny SDXL")
    parser.add_argument("--width", type=int, default=512, help="image width in pixels")
    parser.add_argument("--height", type=int, default=512, help="image height in pixels")
    parser.add_argument(
        "--original-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="SDXL: the size to condition on (none: the image's)",
    )
    parser.add_argument(
        "--crop-top-left",
        type=int,
        nargs=2,
        metavar=("TOP", "LEFT"),
        default=(0, 0),
        help="SDXL: the crop to condition on",
    )
    parser.add_argument("--steps", type=int, default=28, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=7.0, help="classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0, help="the starting noise")
    parser.add_argument("--max-tokens", type=int, default=225, help="prompt limit, x75")
    parser.add_argument("--clip-skip", type=int, default=2, help="2: CLIP's penultimate layer")
    parser.add_argument("--prompt-layout", default="full", choices=LAYOUTS,
                        help="how 75-token chunks are laid out (trainer/prompts.py)")  # fmt: skip
    return parser
