"""The trainer's essentials under diffusers' names: mixed precision, accumulation, schedules, EMA,
TensorBoard, validation images, config files, and a resume that continues exactly."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from torch import nn
from torchrun import torchrun

from trainer.checkpoint import trained_state
from trainer.diffusion import Diffusion, tiny_parts
from trainer.hypernetwork import Hypernetwork, HypernetworkConfig
from trainer.optimization import Optimization, store_frozen_parts
from trainer.train import Config, parse_config, train

REPO = Path(__file__).resolve().parent.parent


def config(prepared: Path, tmp_path: Path, **options) -> Config:
    base = {
        "data": (str(prepared),),
        "out_dir": str(tmp_path / "out"),
        "num_workers": 0,
        "batch_size": 2,
        "lr_warmup_steps": 0,
        "log_every": 1000,
    }
    return Config(**(base | options))


def test_bf16_on_the_cpu_trains_with_fp32_master_weights(prepared, tmp_path):
    seen = {}

    def check(step):
        trained = step.model.trained_module()
        seen["trained"] = {p.dtype for p in trained.parameters()}
        seen["frozen"] = {p.dtype for p in step.model.unet.parameters()}

    result = train(
        config(
            prepared, tmp_path, model="sd", mixed_precision="bf16", max_steps=3, caption_dropout=0.0
        ),
        on_step=check,
    )
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert seen == {"trained": {torch.float32}, "frozen": {torch.bfloat16}}


def test_fp16_scales_the_loss_and_trains_finite(prepared, tmp_path):
    """fp16 under a gradient scaler; the VAE stays fp32 (SDXL's overflows in fp16)."""
    dtypes = {}

    def check(step):
        dtypes.update(vae=step.model.vae.dtype, text_encoder=step.model.text_encoder.dtype)

    result = train(
        config(
            prepared, tmp_path, model="sd", mixed_precision="fp16", max_steps=2, caption_dropout=0.0
        ),
        on_step=check,
    )
    assert dtypes == {"vae": torch.float32, "text_encoder": torch.float16}
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert state["optimization"]["scaler"]["scale"] > 1, "fp16 runs under a gradient scaler"
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert all(t.dtype == torch.float32 for t in state["model"].values())


def test_storing_the_frozen_parts_in_bf16_leaves_diffusers_quiet(caplog):
    """diffusers' dtype casts warn of modules to keep in fp32, even of none: a confusing line per
    part in every mixed-precision run."""
    parts = tiny_parts(seed=0, with_vae=True)
    hypernetwork = Hypernetwork(HypernetworkConfig(widths=(parts.text_encoder.config.hidden_size,)))
    model = Diffusion(parts, parts.prompt_encoder(225, 2, "full"), hypernetwork)
    diffusers_logger = logging.getLogger("diffusers")  # it does not propagate to the root logger
    diffusers_logger.addHandler(caplog.handler)
    try:
        store_frozen_parts(model, torch.bfloat16)
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    dtypes = {name: {p.dtype for p in part.parameters()} for name, part in model.named_children()}
    assert dtypes == {
        "unet": {torch.bfloat16},
        "text_encoder": {torch.bfloat16},
        "vae": {torch.bfloat16},
        "hypernetwork": {torch.float32},
    }
    assert [r.getMessage() for r in caplog.records if r.name.startswith("diffusers")] == []


@pytest.mark.parametrize("part", ["unet", "hypernetwork"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_training(prepared, tmp_path, part):
    """The same losses and trained weights with and without; with a hypernetwork too, whose
    rewritten contexts are shared by the layers of a depth (recomputed blocks must find them)."""
    runs, flags, weights = {}, {}, {}
    for checkpointing in (False, True):

        def check(step, checkpointing=checkpointing):
            flags[checkpointing] = step.model.unet.is_gradient_checkpointing

        out = tmp_path / str(checkpointing)
        options = config(
            prepared,
            out,
            model="sd",
            train_part=part,
            max_steps=3,
            lr=0.05,
            gradient_checkpointing=checkpointing,
            caption_dropout=0.0,
        )
        runs[checkpointing] = train(options, on_step=check)["losses"]
        weights[checkpointing] = torch.load(out / "out" / "checkpoint.pt", weights_only=True)
    assert flags == {False: False, True: True}
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
    for name, value in weights[False]["model"].items():
        assert torch.allclose(weights[True]["model"][name], value, atol=1e-6), name


class Line(nn.Module):
    """A toy model: the mean squared error of a linear map; forward(batch, generator)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 2)

    def forward(self, batch, generator):
        return nn.functional.mse_loss(self.layer(batch.pixels), batch.target)


def batch_of(rows: slice) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
    return SimpleNamespace(pixels=inputs[rows], target=targets[rows])


def updated(groups: list[list[slice]]) -> torch.Tensor:
    model = Line()
    optimization = Optimization.build(model, torch.device("cpu"), 0.1, "constant", 0, 10)
    for group in groups:
        for position, rows in enumerate(group):
            last = position == len(group) - 1
            optimization.micro_step(model, batch_of(rows), None, last, len(group))
        optimization.step()
    return torch.cat([p.detach().ravel() for p in model.parameters()])


def test_accumulated_micro_batches_make_the_update_of_one_big_batch():
    micro = updated([[slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]])
    whole = updated([[slice(0, 8)]])
    assert torch.allclose(micro, whole, atol=1e-6)
    assert not torch.allclose(updated([[slice(0, 2)]]), whole, atol=1e-4), "a real difference"


@pytest.mark.slow
def test_accumulation_on_two_ranks_syncs_once_and_matches_one_big_batch():
    done = torchrun(2, "tests/accumulation_ranks.py", timeout=240)
    assert done.returncode == 0 and "same update" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_the_learning_rate_follows_diffusers_schedule(prepared, tmp_path, schedule):
    """One epoch: the schedule spans it, one rate per optimizer step."""
    rates = []
    train(
        config(prepared, tmp_path, lr_scheduler=schedule, lr_warmup_steps=2, lr=0.01),
        on_step=lambda step: rates.append(step.lr),
    )
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.01)
    reference = get_scheduler(
        schedule, optimizer, num_warmup_steps=2, num_training_steps=len(rates)
    )
    expected = []
    for _ in rates:
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert len(rates) > 4 and rates == pytest.approx(expected)
    assert len(set(rates)) > 1 or schedule == "constant"


def test_ema_is_the_closed_form_on_a_toy_parameter():
    model = nn.Linear(1, 1, bias=False)
    optimization = Optimization.build(
        model, torch.device("cpu"), 0.0, "constant", 0, 10, ema_decay=0.9
    )
    values = [1.0, 3.0, -2.0, 5.0]
    for value in values:
        with torch.no_grad():
            model.weight.fill_(value)
        model.weight.grad = torch.zeros_like(model.weight)
        optimization.step()
    decay, expected = 0.9, values[0]  # the first update takes the weights as they are
    for value in values[1:]:
        expected = decay * expected + (1 - decay) * value
    assert optimization.ema.module.weight.item() == pytest.approx(expected)
    with optimization.averaged():
        assert model.weight.item() == pytest.approx(expected)
    assert model.weight.item() == values[-1], "the live weights come back"


@pytest.mark.slow
def test_ema_weights_are_saved_and_sample_py_prefers_them(prepared, tmp_path):
    train(
        config(
            prepared,
            tmp_path,
            model="sd",
            use_ema=True,
            ema_decay=0.5,
            max_steps=3,
            lr=0.05,
            caption_dropout=0.0,
        )
    )
    out = tmp_path / "out"
    assert (out / "hypernetwork_ema.safetensors").exists()
    from trainer.hypernetwork import load

    raw, ema = (
        load(out / name).state_dict()
        for name in ("hypernetwork.safetensors", "hypernetwork_ema.safetensors")
    )
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    done = subprocess.run(
        [
            sys.executable,
            "trainer/sample.py",
            "--prompt=a cat",
            "--steps=1",
            "--width=32",
            "--height=32",
            f"--hypernetwork={out / 'hypernetwork.safetensors'}",
            f"--out={tmp_path / 'image.png'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hypernetwork_ema.safetensors" in done.stdout


def test_tensorboard_holds_the_scalars_and_validation_images(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    train(
        config(
            prepared,
            tmp_path,
            model="sd",
            max_steps=4,
            logging_dir=str(logs),
            validation_prompt=("a cat", "a dog"),
            validation_steps=2,
            validation_width=32,
            validation_height=32,
            validation_inference_steps=2,
        )
    )
    events = EventAccumulator(str(logs))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/samples_per_s",
        "train/images_per_s_per_rank",
    } <= scalars
    assert any(tag.startswith("buckets/") for tag in scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert set(events.Tags()["images"]) == {"validation/0", "validation/1"}
    folder = tmp_path / "out" / "validation"
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "step-2-0.png",
        "step-2-1.png",
        "step-4-0.png",
        "step-4-1.png",
    ]


def test_validation_images_are_the_same_for_the_same_seed_and_weights(prepared, tmp_path):
    from trainer.models import MODELS
    from trainer.validation import render_validation

    options = config(
        prepared,
        tmp_path,
        model="sd",
        validation_prompt=("a red dress",),
        validation_width=32,
        validation_height=32,
        validation_inference_steps=2,
    )
    model = MODELS["sd"](options)
    first = render_validation(model, options, 1, None)
    second = render_validation(model, options, 2, None)
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_a_toml_config_gives_the_flags_config_and_flags_override_it(prepared, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'data = ["{prepared}"]\nbatch-size = 8\nlr_scheduler = "cosine"\n'
        'use_ema = true\nvalidation_prompt = "a cat"\nmodel = "sd"\n'
    )
    flags = [
        f"--data={prepared}",
        "--batch-size=8",
        "--lr-scheduler=cosine",
        "--use-ema",
        "--validation-prompt=a cat",
        "--model=sd",
    ]
    from_file = parse_config(["--config", str(toml)])
    assert from_file == parse_config([*flags, "--config", str(toml)])
    assert {k: v for k, v in vars(from_file).items() if k != "config"} == {
        k: v for k, v in vars(parse_config(flags)).items() if k != "config"
    }
    assert parse_config(["--config", str(toml), "--batch-size=2"]).batch_size == 2
    assert not parse_config(["--config", str(toml), "--no-use-ema"]).use_ema
    toml.write_text("batch_sise = 8\n")
    done = subprocess.run(
        [sys.executable, "trainer/train.py", "--config", str(toml)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "batch_sise" in done.stderr


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_a_resume_with_everything_on_continues_exactly(prepared, tmp_path, precision):
    """Accumulation 2 (an odd epoch ends with a smaller group), cosine with warm-up, clipping,
    EMA, bf16 or fp16 (its loss scale): 3 + 3 optimizer steps after a resume are the 6 of an
    uninterrupted run."""
    everything = {
        "gradient_accumulation_steps": 2,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "max_grad_norm": 0.5,
        "use_ema": True,
        "ema_decay": 0.8,
        "mixed_precision": precision,
        "batch_size": 3,
        "epochs": 5,
        "lr": 0.01,
    }
    whole = train(config(prepared, tmp_path / "whole", max_steps=6, **everything))
    first = train(config(prepared, tmp_path / "parts", max_steps=3, **everything))
    second = train(config(prepared, tmp_path / "parts", max_steps=3, resume=True, **everything))
    assert first["losses"] + second["losses"] == whole["losses"]
    states = [
        torch.load(tmp_path / run / "out" / "checkpoint.pt", weights_only=True)
        for run in ("whole", "parts")
    ]
    for a, b in zip(*(trained_state_of(s) for s in states), strict=True):
        assert torch.equal(a, b)
    assert states[0]["optimization"]["steps"] == states[1]["optimization"]["steps"] == 6
    assert states[0]["optimization"]["scaler"] == states[1]["optimization"]["scaler"]
    assert (tmp_path / "parts" / "out" / "config.toml").exists()


def test_a_resume_with_hypernetwork_dropout_continues_exactly(prepared, tmp_path):
    """Dropout draws from torch's own random state: every rank's is kept in the checkpoint."""
    options = {
        "model": "sd",
        "hypernetwork_dropout": 0.3,
        "hypernetwork_structure": (1, 2, 1),
        "caption_dropout": 0.0,
        "lr": 0.05,
        "epochs": 3,
    }
    whole = train(config(prepared, tmp_path / "whole", max_steps=4, **options))
    train(config(prepared, tmp_path / "parts", max_steps=2, **options))
    second = train(config(prepared, tmp_path / "parts", max_steps=2, resume=True, **options))
    assert second["losses"] == whole["losses"][2:]


def trained_state_of(state: dict) -> list[torch.Tensor]:
    ema = state["optimization"]["ema"]
    return [*state["model"].values(), *(v for k, v in ema.items() if k != "n_averaged")]


def test_trained_state_keeps_only_what_trains():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    assert set(trained_state(model)) == {"1.weight", "1.bias"}
