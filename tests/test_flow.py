"""SD3 and Flux by flow matching: the shift each bucket gets is the one diffusers samples that
resolution with, the loss falls when overfitting one batch, training from the prepared latents
and text cache never loads a VAE encoder pass or a text encoder and matches encoding, and data
that does not fit the model is refused before step 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_BUCKETS, ray_started
from images import rgb, save

from pipeline.config import BucketConfig, PrepareConfig
from pipeline.errors import UsageError
from pipeline.prepare import run
from trainer.config import Config
from trainer.loader import Batch
from trainer.models import MODELS

FLOWS = ("sd3", "flux")
CAPTIONS = ["a photo of the cat", "girl, smile, blue eyes", None, "dog, red shirt, sitting"]


def flow_config(family: str, checkpoint: Path | str, data: str = "unused", **options) -> Config:
    settings = {
        "data": (data,),
        "model": family,
        "pretrained": str(checkpoint),
        "max_sequence_length": 16,
        "num_workers": 0,
        "batch_size": 2,
        "caption_dropout": 0.0,
    }
    return Config(**settings | options)


def one_batch(height: int = 32, width: int = 48) -> Batch:
    sizes = torch.tensor([[height, width]] * 2)
    pixels = torch.from_numpy(np.stack([np.asarray(rgb(width, height, i)) for i in range(2)]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    flipped = torch.zeros(2, dtype=torch.bool)
    captions = ["a photo of the cat", "girl, smile"]
    return Batch(pixels, captions, ["a", "b"], 0, 0, sizes, sizes * 0, sizes, flipped)


@pytest.mark.parametrize("family", FLOWS)
def test_each_bucket_gets_the_shift_diffusers_samples_its_resolution_with(tiny_checkpoints, family):
    """Flux shifts by the image's token count (mu), SD3 by its fixed shift: the sigmas of u are
    those the checkpoint's scheduler sets for that resolution at inference (sigmas=u)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model = MODELS[family](flow_config(family, tiny_checkpoints[family]), False)
    scheduler, config = model.scheduler, model.scheduler.config
    u = torch.linspace(0.95, 0.05, 7)
    shifted = {}
    for height, width in ((16, 16), (64, 96)):  # latent sizes: 64 and 1536 image tokens
        mu = None
        if config.use_dynamic_shifting:
            tokens = (height // 2) * (width // 2)
            mu = calculate_shift(
                tokens,
                config.base_image_seq_len,
                config.max_image_seq_len,
                config.base_shift,
                config.max_shift,
            )
        scheduler.set_timesteps(sigmas=u.numpy(), mu=mu)
        shifted[height] = model.sigmas(u, height, width)
        torch.testing.assert_close(shifted[height], scheduler.sigmas[:-1].float())
    assert (shifted[16] > u).all(), "shifted towards noise"
    if family == "flux":  # a larger bucket, more noise at every u
        assert (shifted[64] > shifted[16]).all()
    else:
        torch.testing.assert_close(shifted[64], shifted[16])


@pytest.mark.parametrize("family", FLOWS)
def test_the_flow_matching_loss_falls_when_overfitting_one_batch(tiny_checkpoints, family):
    """The same noise and sigmas every step (the generator reseeded): the transformer learns
    the batch's velocity noise - x."""
    config = flow_config(family, tiny_checkpoints[family], train_part="transformer")
    model = MODELS[family](config, False)
    batch = one_batch()
    optimizer = torch.optim.AdamW(model.trained_module().parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(batch, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses  # measured: sd3 0.46, flux 0.29


@pytest.fixture(scope="module")
def prepared_flux(tiny_checkpoints, tmp_path_factory) -> Path:
    """Images prepared for the tiny Flux: its VAE's latents and its text cache (fp16)."""
    root = tmp_path_factory.mktemp("flux")
    for i, text in enumerate(CAPTIONS * 2):
        width, height = (96, 64) if i % 2 else (64, 96)
        save(rgb(width, height, i), root / "images" / f"{i:02d}.jpg", quality=90)
        if text is not None:
            (root / "images" / f"{i:02d}.txt").write_text(text)
    with ray_started():
        run(
            PrepareConfig(
                input=str(root / "images"),
                output=str(root / "out"),
                model="flux",
                buckets=SMALL_BUCKETS,
                pretrained=str(tiny_checkpoints["flux"]),
                text_dtype="fp16",
                max_sequence_length=16,
            )
        )
    return root / "out"


@pytest.mark.slow
def test_flux_trains_from_the_caches_with_the_losses_of_encoding(
    prepared_flux, tiny_checkpoints, tmp_path
):
    """From the cached latents and text no text encoder is built; the first step's loss is
    encoding's within the caches' fp16 rounding."""
    from recorded import train
    from transformers import PreTrainedModel

    checkpoint, runs = tiny_checkpoints["flux"], {}
    for mode in ("on", "off"):
        seen = []

        def look(step, seen=seen, mode=mode) -> None:
            seen.append((step.batch.text is not None, step.batch.latent_mean is not None))
            model = step.model
            if mode == "on":
                assert model.text is None
                assert not any(isinstance(m, PreTrainedModel) for m in model.modules())

        config = flow_config(
            "flux",
            checkpoint,
            str(prepared_flux),
            text_cache=mode,
            latents=mode,
            max_steps=2,
            out_dir=str(tmp_path / mode),
        )
        runs[mode] = train(config, on_step=look)["losses"]
        assert set(seen) == {(mode == "on", mode == "on")}
    np.testing.assert_allclose(runs["on"][0], runs["off"][0], rtol=2e-2)


def test_data_of_buckets_the_model_cannot_take_is_refused_before_step_one(
    tiny_checkpoints, tmp_path
):
    """66x66 is no multiple of the tiny Flux's 4 (its VAE's 2, times 2x2 patches)."""
    from recorded import train

    save(rgb(66, 66, 0), tmp_path / "images" / "a.jpg")
    save(rgb(66, 66, 1), tmp_path / "images" / "b.jpg")
    buckets = BucketConfig(max_area=66 * 66, max_side=98, min_side=34, step=2, square=66)
    with ray_started():
        run(
            PrepareConfig(
                input=str(tmp_path / "images"), output=str(tmp_path / "out"), buckets=buckets
            )
        )
    config = flow_config(
        "flux", tiny_checkpoints["flux"], str(tmp_path / "out"), out_dir=str(tmp_path / "run")
    )
    with pytest.raises(UsageError, match=r"multiples of 4.*66x66.*arb-prepare --model flux"):
        train(config)


@pytest.mark.slow  # its data: the text and latent stages' Ray actors
def test_a_text_cache_of_another_checkpoint_is_refused_naming_the_prepare_job(
    prepared_flux, tmp_path
):
    from trainer.dataset import read_manifest
    from trainer.text_cache import text_cache_to_use
    from trainer.tiny import build

    other = build("flux", tmp_path / "other", seed=1)
    config = flow_config("flux", other, str(prepared_flux), text_cache="on")
    with pytest.raises(UsageError, match="another checkpoint's text encoders") as refused:
        text_cache_to_use(config, [read_manifest(prepared_flux)])
    assert f"--model flux --pretrained {other}" in str(refused.value)
    longer = flow_config("flux", other, str(prepared_flux), text_cache="on", max_sequence_length=32)
    with pytest.raises(UsageError, match="max_sequence_length 16"):
        text_cache_to_use(longer, [read_manifest(prepared_flux)])


@pytest.mark.parametrize(
    ("model", "part"), [("flux", "hypernetwork"), ("sd3", "unet"), ("sd", "transformer")]
)
def test_a_part_the_model_lacks_is_refused(model, part):
    with pytest.raises(ValueError, match=f"--train-part {part}"):
        Config(data=("x",), model=model, train_part=part)
