"""LoRA on every model: the files the trainer writes load into diffusers' own pipelines (and, for
sd and sdxl, kohya-ss's layout, which AUTOMATIC1111 and ComfyUI read, loads too) and give the
denoiser output of the trainer's model with its adapters; two ranks train each family's adapters
from a prepared dataset; a resume continues exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrun import logged_training

from trainer.checkpoint import NAME
from trainer.config import Config
from trainer.lora import KOHYA, WEIGHTS
from trainer.models import MODELS

FAMILIES = ("sd", "sdxl", "sd3", "flux")
KOHYA_FAMILIES = ("sd", "sdxl")
TOLERANCE = 1e-5  # the same weights in fp32 on the same inputs: equal up to summation order


def lora_config(data: str, checkpoint: Path, family: str, **options) -> Config:
    settings = {
        "data": (data,),
        "model": family,
        "pretrained": str(checkpoint),
        "train_part": "lora",
        "lora_rank": 4,
        "lora_alpha": 8.0,  # scale 2: a file that lost alpha loads at another scale
        "max_sequence_length": 16,
        "num_workers": 0,
        "batch_size": 2,
    }
    return Config(**settings | options)


def denoiser_of(model) -> torch.nn.Module:
    return model.unet if hasattr(model, "unet") else model.transformer


def denoise(denoiser: torch.nn.Module, family: str) -> torch.Tensor:
    """The denoiser's output on fixed random inputs of its family's shapes."""
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    config = denoiser.config
    with torch.no_grad():
        if family in KOHYA_FAMILIES:
            added = None
            if family == "sdxl":
                width = config.projection_class_embeddings_input_dim - 6 * 8
                added = {"text_embeds": random(1, width), "time_ids": random(1, 6)}
            context = random(1, 9, config.cross_attention_dim)
            return denoiser(
                random(1, 4, 16, 24), 500, encoder_hidden_states=context, added_cond_kwargs=added
            ).sample
        context = random(1, 9, config.joint_attention_dim)
        pooled = random(1, config.pooled_projection_dim)
        if family == "sd3":
            latents = random(1, config.in_channels, 16, 24)
            return denoiser(
                hidden_states=latents,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=torch.tensor([500.0]),
            ).sample
        from diffusers import FluxPipeline

        ids = FluxPipeline._prepare_latent_image_ids(1, 8, 12, "cpu", torch.float32)
        return denoiser(
            hidden_states=random(1, 96, config.in_channels),
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=torch.tensor([0.5]),
            img_ids=ids,
            txt_ids=torch.zeros(9, 3),
            guidance=torch.tensor([3.5]),
        ).sample


def loaded_output(checkpoint: Path, folder: Path, family: str, weight_name: str | None = None):
    """(with the adapters, without): a fresh copy of the checkpoint in its diffusers pipeline,
    the adapters in `folder` loaded by its `load_lora_weights`."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(checkpoint, local_files_only=True)
    options = {"weight_name": weight_name} if weight_name else {}
    pipeline.load_lora_weights(folder, **options)
    adapted = denoise(denoiser_of(pipeline), family)
    pipeline.unload_lora_weights()
    return adapted, denoise(denoiser_of(pipeline), family)


def assert_loads_as_trained(model, checkpoint: Path, folder: Path, family: str) -> None:
    """Every file the model's save wrote loads into diffusers with the model's output; the
    adapters changed it (so a file that loaded nothing would fail)."""
    ours = denoise(denoiser_of(model), family)
    names = [f"{WEIGHTS}.safetensors"] + [f"{KOHYA}.safetensors"] * (family in KOHYA_FAMILIES)
    for index, name in enumerate(names):
        adapted, base = loaded_output(checkpoint, folder, family, name if index else None)
        torch.testing.assert_close(adapted, ours, rtol=TOLERANCE, atol=TOLERANCE)
        assert (adapted - base).abs().max() > 100 * TOLERANCE, "the adapters change the output"


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapters_load_into_diffusers_with_the_trainers_output(
    tiny_checkpoints, tmp_path, family
):
    checkpoint = tiny_checkpoints[family]
    model = MODELS[family](lora_config("unused", checkpoint, family), False)
    generator = torch.Generator().manual_seed(1)
    for parameter in model.trained_module().parameters():  # as training leaves them: not zero
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    written = model.save_weights(tmp_path)
    expected = [tmp_path / f"{WEIGHTS}.safetensors"]
    expected += [tmp_path / f"{KOHYA}.safetensors"] * (family in KOHYA_FAMILIES)
    assert written == expected and all(path.exists() for path in written)
    assert_loads_as_trained(model, checkpoint, tmp_path, family)


def test_kohya_file_has_kohyas_keys_and_alpha(tiny_checkpoints, tmp_path):
    from safetensors import safe_open

    model = MODELS["sdxl"](lora_config("unused", tiny_checkpoints["sdxl"], "sdxl"), False)
    (_, kohya) = model.save_weights(tmp_path)
    with safe_open(kohya, "pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
        alphas = {float(file.get_tensor(key)) for key in keys if key.endswith(".alpha")}
    modules = {key.split(".")[0] for key in keys}
    assert all(module.startswith("lora_unet_") and "." not in module for module in modules)
    assert {
        f"{module}.{part}"
        for module in modules
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    } == keys
    assert any(module.endswith("_attn2_to_k") for module in modules)
    assert alphas == {8.0} and metadata["ss_network_dim"] == "4"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_train_adapters_that_diffusers_loads(
    prepared, tiny_checkpoints, tmp_path, family
):
    """A 2-rank gloo torchrun of a few LoRA steps: every batch one resolution, the ranks' weights
    in step; the saved file, loaded by diffusers, gives the final checkpoint's output."""
    checkpoint, out_dir = tiny_checkpoints[family], tmp_path / "run"
    log = logged_training(
        2,
        tmp_path / "log.jsonl",
        f"--data={prepared}",
        f"--model={family}",
        f"--pretrained={checkpoint}",
        "--train-part=lora",
        "--lora-rank=4",
        "--lora-alpha=8",
        "--max-sequence-length=16",
        "--batch-size=2",
        "--max-steps=3",
        "--lr=0.01",
        "--num-workers=1",
        f"--out-dir={out_dir}",
    )
    assert len(log) == 6 and {entry["rank"] for entry in log} == {0, 1}
    for entry in log:
        assert len({tuple(size) for size in entry["target_size"]}) == 1, "one resolution a batch"
    for step in range(3):
        weights = {entry["weights"] for entry in log if entry["step"] == log[0]["step"] + step}
        assert len(weights) == 1, "DDP keeps the ranks' adapters equal"
    model = MODELS[family](lora_config(str(prepared), checkpoint, family), False)
    state = torch.load(out_dir / NAME, weights_only=True)["model"]
    loaded = model.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys and state
    assert_loads_as_trained(model, checkpoint, out_dir, family)


@pytest.mark.slow
def test_a_lora_resume_mid_epoch_continues_exactly(prepared, tiny_checkpoints, tmp_path):
    """Flux's adapters, EMA and bf16: 2 + 2 optimizer steps are the 4 of one run."""
    from recorded import train

    options = {"use_ema": True, "ema_decay": 0.9, "mixed_precision": "bf16", "lr": 0.01}
    checkpoint = tiny_checkpoints["flux"]

    def run(folder: str, steps: int, **more) -> list[float]:
        out_dir = str(tmp_path / folder)
        config = lora_config(
            str(prepared), checkpoint, "flux", out_dir=out_dir, max_steps=steps, **options, **more
        )
        return train(config)["losses"]

    whole = run("whole", 4)
    first = run("parts", 2)
    second = run("parts", 2, resume=True)
    assert first + second == whole
    assert (tmp_path / "parts" / f"{WEIGHTS}_ema.safetensors").exists()


@pytest.mark.slow  # three renders a family, each a process of its own
@pytest.mark.parametrize("family", FAMILIES)
def test_arb_sample_renders_with_the_adapters(tiny_checkpoints, tmp_path, family):
    """trainer/sample.py --lora: the saved adapters change the image (the same seed without
    them renders another), from diffusers' file and, for sd, from kohya's."""
    import subprocess
    import sys

    from PIL import Image
    from torchrun import REPO

    checkpoint = tiny_checkpoints[family]
    model = MODELS[family](lora_config("unused", checkpoint, family), False)
    generator = torch.Generator().manual_seed(1)
    for parameter in model.trained_module().parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    model.save_weights(tmp_path)
    images = []
    loras = ["", str(tmp_path)] + [str(tmp_path / f"{KOHYA}.safetensors")] * (family == "sd")
    for index, lora in enumerate(loras):
        out = tmp_path / f"{index}.png"
        command = [sys.executable, "trainer/sample.py", f"--pretrained={checkpoint}"]
        command += ["--prompt=a photo of the cat", "--steps=2", "--width=32", "--height=32"]
        command += [f"--out={out}", f"--lora={lora}"]
        subprocess.run(command, cwd=REPO, check=True, timeout=300, capture_output=True)
        images.append(np.asarray(Image.open(out)))
    assert images[0].shape == (32, 32, 3)
    assert not np.array_equal(images[0], images[1]), "the adapters change the image"
    for other in images[2:]:
        np.testing.assert_array_equal(other, images[1])
