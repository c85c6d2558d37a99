"""The trainer's settings: frozen dataclasses, each validated once, and the command line and TOML
file derived from them (the sampler's: trainer/sample_config.py). Imports no torch, so `--help`
and a mistake in an option answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli import (
    HelpFormatter,
    add_options,
    check,
    check_choices,
    option,
    repeatable,
)
from trainer.augment import CaptionOptions

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")  # diffusers' get_scheduler
LAYOUTS = ("full", "trimmed")  # trainer/prompts.py: how 75-token chunks are laid out
PROMPTS = "prompts (sd, sdxl)"  # the --help group of PromptOptions
LORA = "LoRA (--train-part lora)"
FLOW = "flow matching (sd3, flux)"
MODEL_CHOICES = ("conv", "sd", "sdxl", "sd3", "flux")
UNET_MODELS, FLOW_MODELS = ("sd", "sdxl"), ("sd3", "flux")
# --train-part: what trains on which models (auto: the hypernetwork on sd/sdxl, the source's
# technique; LoRA on sd3/flux)
TRAIN_PARTS = {
    "lora": UNET_MODELS + FLOW_MODELS,
    "hypernetwork": UNET_MODELS,
    "unet": UNET_MODELS,
    "transformer": FLOW_MODELS,
}
# diffusers' compute_density_for_timestep_sampling and compute_loss_weighting_for_sd3 names
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class PromptOptions:
    """How prompts are encoded (trainer/prompts.py): the trainer's and the sampler's."""

    max_tokens: int = option(225, "prompt limit in tokens, a multiple of 75", group=PROMPTS)
    clip_skip: int = option(
        2, "2 = CLIP's penultimate layer (the source's), 1 = the last", (1, 2), group=PROMPTS
    )
    prompt_layout: str = option(
        "full",
        "full 77-state chunks (231 states for 225 tokens, A1111's) or trimmed (227, kohya's)",
        LAYOUTS,
        group=PROMPTS,
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check(
            self,
            {
                "max_tokens": (
                    self.max_tokens > 0 and self.max_tokens % 75 == 0,
                    "must be a positive multiple of 75",
                )
            },
        )


@dataclass(frozen=True)
class HypernetworkConfig:
    """A hypernetwork's structure (trainer/hypernetwork.py builds it). A field an option of the
    trainer sets names it (`flag`): a mistake is refused by that option's name."""

    widths: tuple[int, ...] = (768,)  # context widths (the text encoder's hidden size)
    layer_structure: tuple[float, ...] = field(  # layer sizes as multiples of the width
        default=(1, 2, 1), metadata={"flag": "hypernetwork-structure"}
    )
    activation: str = field(  # one of trainer.hypernetwork.ACTIVATIONS
        default="linear", metadata={"flag": "hypernetwork-activation"}
    )
    layer_norm: bool = field(  # a LayerNorm after every linear layer
        default=False, metadata={"flag": "hypernetwork-layer-norm"}
    )
    dropout: float = field(  # after every hidden layer, in training (dropout_structure's shorthand)
        default=0.0, metadata={"flag": "hypernetwork-dropout"}
    )
    # The dropout after each layer of layer_structure (A1111's; entry 0 is unused): e.g. (0, 0.3,
    # 0, 0) for one after the first hidden layer only. None: from `dropout`.
    dropout_structure: tuple[float, ...] | None = None
    # The activation after the last linear layer too (A1111 files may have it; with it an
    # untrained module is no longer the identity).
    activate_output: bool = False
    per_depth: bool = True  # one pair per U-Net depth (needed by depth_penalty), else shared
    depths: tuple[int, ...] = (0, 1, 2, 3)  # U-Net depths with cross-attention (SD 1.x's)
    depth_penalty: tuple[float, ...] = (1e-2,)  # L2 weight on depth 0, 1, ...; missing: 0

    def __post_init__(self) -> None:
        structure = self.layer_structure
        check(
            self,
            {
                "activation": (
                    self.activation in _activations(),
                    "must be a torch.nn activation's lower-case name, linear or swish",
                ),
                "layer_structure": (
                    len(structure) >= 2 and structure[0] == 1 and structure[-1] == 1,
                    "must start and end with 1 (the module is residual)",
                ),
                "dropout": (0 <= self.dropout < 1, "must be in [0, 1)"),
                "depth_penalty": (all(w >= 0 for w in self.depth_penalty), "must be >= 0 each"),
            },
        )
        if self.dropout_structure is not None:
            if self.dropout:
                raise ValueError("give dropout or dropout_structure, not both")
            if len(self.dropout_structure) != len(structure):
                raise ValueError(
                    f"dropout_structure {list(self.dropout_structure)} needs one entry per "
                    f"layer_structure entry {list(structure)}"
                )
            if not all(0 <= p < 1 for p in self.dropout_structure[1:]):
                raise ValueError(f"dropout_structure {list(self.dropout_structure)}: not in [0, 1)")

    @property
    def dropouts(self) -> tuple[float, ...]:
        """The dropout after each layer of layer_structure: dropout_structure, or from dropout."""
        if self.dropout_structure is not None:
            return self.dropout_structure
        return (0.0, *[self.dropout] * (len(self.layer_structure) - 2), 0.0)


def _activations() -> set[str]:
    """The hypernetwork's activation names (torch.nn's; imported only to check one)."""
    from trainer.hypernetwork import ACTIVATIONS

    return set(ACTIVATIONS)


@dataclass(frozen=True)
class Config(PromptOptions, CaptionOptions):
    """Everything a run needs, validated once: a ValueError names the option at fault. The tag
    and prompt options are CaptionOptions' and PromptOptions' fields; the hypernetwork options'
    defaults and rules HypernetworkConfig's."""

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
    shuffle: str = option(
        "auto",
        "global: the source's shuffle over the whole epoch; shards: windows of "
        "--shuffle-window shards, which a bounded cache serves; auto: shards for remote "
        "--data, else global",
        ("auto", "global", "shards"),
    )
    shuffle_window: int = option(32, "shards a window of --shuffle shards draws its batches from")
    cache_dir: str = option(
        "",
        "node-local folder for remote shards and the index maps (empty: "
        "$XDG_CACHE_HOME/arb-train, else ~/.cache/arb-train)",
    )
    cache_limit: int = option(
        20 * 10**9, "bytes of remote shards the cache keeps (least recently used go first)"
    )
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
    model: str = option(
        "conv",
        "conv: a small denoiser (a smoke test); sd: SD 1.x; sdxl; sd3 and flux: flow-matching "
        "transformers",
        MODEL_CHOICES,
    )
    latents: str = option(
        "auto",
        "auto: train from the dataset's cached latents of the model's VAE when it holds "
        "them (jobs/prepare.py --vae); on: require them; off: from pixels",
        ("auto", "on", "off"),
    )
    text_cache: str = option(
        "auto",
        "auto: the dataset's cached text-encoder outputs of --pretrained when it holds "
        "ones that fit this run (arb-prepare --pretrained; the text encoders are then never "
        "loaded); on: require them; off: encode each step (trainer/text_cache.py)",
        ("auto", "on", "off"),
    )
    channels: int = option(32, "conv: width")
    noise: float = option(0.5, "conv: noise level of the denoising objective")
    pretrained: str = option(
        "", "local diffusers-layout checkpoint folder of --model (empty: tiny random models)"
    )
    train_part: str = option(
        "auto",
        "what trains: LoRA adapters on the frozen denoiser; a hypernetwork on sd/sdxl's frozen "
        "U-Net; the whole unet (sd, sdxl) or transformer (sd3, flux). auto: hypernetwork on "
        "sd/sdxl (the source's), lora on sd3/flux",
        ("auto", *TRAIN_PARTS),
    )
    lora_rank: int = option(4, "the adapters' rank (diffusers' --rank)", group=LORA)
    lora_alpha: float = option(
        0.0, "the adapters' alpha: their scale is alpha / rank (0: the rank, scale 1)", group=LORA
    )
    lora_layers: str = option(
        "",
        "comma-separated module names the adapters go on (empty: the attention projections, "
        "as diffusers' scripts: to_q,to_k,to_v,to_out.0, and the transformers' add_*_proj, "
        "to_add_out)",
        group=LORA,
    )
    weighting_scheme: str = option(
        "logit_normal",
        "timestep density and loss weighting, diffusers' names (none: uniform)",
        WEIGHTING_SCHEMES,
        group=FLOW,
    )
    logit_mean: float = option(0.0, "logit_normal's mean", group=FLOW)
    logit_std: float = option(1.0, "logit_normal's standard deviation", group=FLOW)
    mode_scale: float = option(1.29, "mode's scale", group=FLOW)
    guidance_scale: float = option(
        3.5, "flux: the guidance its guidance embedding is told (a checkpoint with one)", group=FLOW
    )
    max_sequence_length: int = option(
        0, "T5 tokens of a prompt (0: the pipeline's, 256 sd3, 512 flux)", group=FLOW
    )
    caption_dropout: float = option(
        0.1, "share of captions replaced by the empty prompt (after the tag augmentations)"
    )
    hypernetwork_structure: tuple[float, ...] = option(
        HypernetworkConfig.layer_structure,
        "layer sizes in multiples of the context width, e.g. 1,2,1",
    )
    hypernetwork_activation: str = option(
        HypernetworkConfig.activation, "an activation of trainer.hypernetwork"
    )
    hypernetwork_layer_norm: bool = option(
        HypernetworkConfig.layer_norm, "a LayerNorm after every hypernetwork layer"
    )
    hypernetwork_dropout: float = option(
        HypernetworkConfig.dropout, "dropout after every hidden hypernetwork layer"
    )
    hypernetwork_shared: bool = option(
        not HypernetworkConfig.per_depth,
        "one pair per width for all depths (also written as AUTOMATIC1111's hypernetwork.pt)",
    )
    depth_penalty: tuple[float, ...] = option(
        HypernetworkConfig.depth_penalty,
        "L2 weight per U-Net depth, shallowest first, e.g. 0.01,0.005",
    )

    def __post_init__(self) -> None:
        CaptionOptions.__post_init__(self)
        PromptOptions.__post_init__(self)  # and every option's choices
        HypernetworkConfig(
            layer_structure=self.hypernetwork_structure,
            activation=self.hypernetwork_activation,
            dropout=self.hypernetwork_dropout,
            depth_penalty=self.depth_penalty,
        )
        check(
            self,
            {
                "data": (bool(self.data), "give a prepared dataset (jobs/prepare.py --output OUT)"),
                "flip": (0 <= self.flip <= 1, "must be a probability in [0, 1]"),
                "batch_size": (self.batch_size >= 1, "must be >= 1"),
                "epochs": (self.epochs >= 0, "must be >= 0"),
                "max_steps": (self.max_steps >= 0, "must be >= 0"),
                "lr": (self.lr > 0, "must be > 0"),
                "num_workers": (self.num_workers >= 0, "must be >= 0"),
                "shuffle_window": (self.shuffle_window >= 1, "must be >= 1"),
                "cache_limit": (self.cache_limit >= 1, "must be >= 1 (bytes)"),
                "checkpoint_every": (self.checkpoint_every >= 1, "must be >= 1"),
                "log_every": (self.log_every >= 1, "must be >= 1"),
                "lr_warmup_steps": (self.lr_warmup_steps >= 0, "must be >= 0"),
                "gradient_accumulation_steps": (
                    self.gradient_accumulation_steps >= 1,
                    "must be >= 1",
                ),
                "max_grad_norm": (self.max_grad_norm >= 0, "must be >= 0"),
                "ema_decay": (0 < self.ema_decay < 1, "must be in (0, 1)"),
                "validation_steps": (self.validation_steps >= 1, "must be >= 1"),
                "validation_prompt": (
                    not self.validation_prompt or self.model in ("sd", "sdxl"),
                    "needs --model sd or sdxl",
                ),
                "resume": (
                    not (self.resume and self.overwrite),
                    "and --overwrite exclude each other",
                ),
                "caption_dropout": (0 <= self.caption_dropout < 1, "must be in [0, 1)"),
                "train_part": (
                    self.train_part == "auto" or self.model in TRAIN_PARTS[self.train_part],
                    f"{self.train_part} trains on --model "
                    f"{', '.join(TRAIN_PARTS.get(self.train_part, ()))} only",
                ),
                "lora_rank": (self.lora_rank >= 1, "must be >= 1"),
                "lora_alpha": (self.lora_alpha >= 0, "must be >= 0"),
                "max_sequence_length": (self.max_sequence_length >= 0, "must be >= 0"),
            },
        )

    @property
    def trained_part(self) -> str:
        """--train-part with auto resolved for --model."""
        if self.train_part != "auto":
            return self.train_part
        return "lora" if self.model in FLOW_MODELS else "hypernetwork"


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

    values = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(config).items()
        if k != "config"
    }
    (folder / "config.toml").write_text(tomli_w.dumps(values))


def read_saved(folder: Path) -> dict:
    """The config.toml a run left in `folder` ({} where there is none)."""
    try:
        with open(folder / "config.toml", "rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
