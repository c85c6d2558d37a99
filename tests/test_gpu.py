"""On a CUDA GPU (skipped without one; run `pytest -m gpu` where one is lent): one bf16 LoRA step
of each model under torchrun with NCCL on one rank, and the latent and text stages encoding on
the GPU, which Flux then trains from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL_BUCKETS, ray_started
from images import rgb, save
from torchrun import logged_training

from pipeline.config import PrepareConfig
from pipeline.format import Manifest, OutputDir
from pipeline.prepare import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def bf16_lora_step(data, checkpoint, family: str, tmp_path, *more: str) -> list[dict]:
    return logged_training(
        1,
        tmp_path / f"{family}.jsonl",
        f"--data={data}",
        f"--model={family}",
        f"--pretrained={checkpoint}",
        "--train-part=lora",
        "--mixed-precision=bf16",
        "--max-sequence-length=16",
        "--batch-size=2",
        "--max-steps=1",
        "--num-workers=1",
        f"--out-dir={tmp_path / family}",
        *more,
    )


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_one_bf16_lora_step_on_cuda_with_nccl(prepared, tiny_checkpoints, tmp_path, family):
    (step,) = bf16_lora_step(prepared, tiny_checkpoints[family], family, tmp_path)
    assert np.isfinite(step["loss"])
    assert (tmp_path / family / "pytorch_lora_weights.safetensors").exists()


def test_the_latent_and_text_stages_encode_on_the_gpu(tiny_checkpoints, tmp_path):
    import ray

    for i in range(4):
        save(rgb(96, 64, i), tmp_path / "images" / f"{i}.jpg")
        (tmp_path / "images" / f"{i}.txt").write_text("a photo of the cat")
    with ray_started():
        assert ray.cluster_resources().get("GPU", 0) >= 1, "Ray sees the GPU: actors use it"
        run(
            PrepareConfig(
                input=str(tmp_path / "images"),
                output=str(tmp_path / "out"),
                model="flux",
                buckets=SMALL_BUCKETS,
                pretrained=str(tiny_checkpoints["flux"]),
                max_sequence_length=16,
            )
        )
    manifest = Manifest.read(OutputDir(str(tmp_path / "out")))
    assert manifest.latents and manifest.text
    (step,) = bf16_lora_step(
        tmp_path / "out",
        tiny_checkpoints["flux"],
        "flux",
        tmp_path,
        "--latents=on",
        "--text-cache=on",
    )
    assert step["latent"] and step["text"] and np.isfinite(step["loss"])
