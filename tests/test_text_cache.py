"""The text stage: text-encoder outputs cached once per caption (and per variant), equal to the
families' own encoders, incremental and resumable, several checkpoints side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SMALL_BUCKETS, ray_started
from images import rgb, save
from safetensors.torch import load

from pipeline import text_cache
from pipeline.config import PrepareConfig
from pipeline.errors import UsageError
from pipeline.format import OutputDir, caption_digest, pick_variant, text_folder
from pipeline.job import main
from pipeline.prepare import run
from pipeline.text_cache import add_text, recipe_settings, text_parts
from trainer.augment import CaptionOptions, caption

CAPTIONS = [
    "a photo of the cat",
    "solo, long hair, blue eyes, smile, outdoors, sky, tree, flower, dress, hat",
    "a photo of the cat",  # shared: encoded once
    None,  # no caption: the empty one
    "girl, " * 90 + "boy",  # beyond 225 CLIP tokens: cut; two and more chunks
    "dog, red shirt, sitting, looking at viewer",
]
TAGS = CaptionOptions(shuffle_tags=True, keep_tokens=1, tag_dropout=0.2)
pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the module


def write_images(folder: Path, captions: list[str | None], start: int = 0) -> None:
    for i, text in enumerate(captions, start):
        save(rgb(96, 64, i), folder / f"{i:02d}.jpg", quality=90)
        if text is not None:
            (folder / f"{i:02d}.txt").write_text(text)


def prepare(images: Path, output: Path, **settings) -> dict:
    config = PrepareConfig(
        input=str(images),
        output=str(output),
        buckets=SMALL_BUCKETS,
        samples_per_shard=4,
        **settings,
    )
    with ray_started():
        return run(config)


def settings(family: str, variants: int = 0, tags: CaptionOptions | None = None) -> dict:
    return recipe_settings(family, None, variants, tags or CaptionOptions(), 0, "bf16")


def cached(out: Path, family_settings: dict, checkpoint: Path) -> dict[tuple[str, int], dict]:
    """(caption digest, variant) -> the row of the text index, with its tensors."""
    manifest = json.loads((out / "manifest.json").read_text())
    (path,) = [
        e["path"]
        for e in manifest["text"].values()
        if e["settings"] == family_settings and e["pretrained"] == str(checkpoint)
    ]
    rows = {}
    for row in pq.read_table(out / path / "index.parquet").to_pylist():
        with open(out / row["text_shard"], "rb") as tar:
            tar.seek(row["text_offset"])
            row["tensors"] = load(tar.read(row["text_size"]))
        rows[row["caption_digest"], row["variant"]] = row
    return rows


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text-images")
    write_images(folder, CAPTIONS)
    return folder


@pytest.fixture(scope="module")
def four_caches(images, tiny_checkpoints, tmp_path_factory) -> Path:
    """One OUT, the caches of all four tiny checkpoints in it, side by side."""
    out = tmp_path_factory.mktemp("four") / "out"
    prepare(images, out)
    with ray_started():
        for family, checkpoint in tiny_checkpoints.items():
            add_text(OutputDir(str(out)), str(checkpoint), settings(family))
    return out


def test_the_tiny_checkpoints_load_as_their_pipelines(tiny_checkpoints):
    from diffusers import DiffusionPipeline

    classes = {
        "sd": "StableDiffusionPipeline",
        "sdxl": "StableDiffusionXLPipeline",
        "sd3": "StableDiffusion3Pipeline",
        "flux": "FluxPipeline",
    }
    for family, folder in tiny_checkpoints.items():
        pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        assert type(pipeline).__name__ == classes[family]


def close(stored: torch.Tensor, reference: torch.Tensor) -> None:
    assert stored.dtype == torch.bfloat16 and stored.shape == reference.shape
    torch.testing.assert_close(stored.float(), reference.float(), rtol=1.6e-2, atol=1.6e-2)


def unique_captions() -> list[str]:
    return list(dict.fromkeys(text or "" for text in CAPTIONS))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_chunked_families_equal_the_trainers_prompt_encoders(four_caches, tiny_checkpoints, family):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from trainer.prompts import PromptEncoder, SDXLPromptEncoder, Tokenizer

    folder = tiny_checkpoints[family]
    first = CLIPTextModel.from_pretrained(folder / "text_encoder")
    if family == "sdxl":
        second = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        encoder = SDXLPromptEncoder(
            (Tokenizer(folder), Tokenizer(folder, "tokenizer_2")), (first, second), 225, 2, "full"
        )
    else:
        encoder = PromptEncoder(Tokenizer(folder), first, 225, 2, "full")
    rows = cached(four_caches, settings(family), folder)
    assert len(rows) == len(unique_captions())  # each caption once, the shared one too
    for text in unique_captions():
        row = rows[caption_digest(text), 0]
        context, pooled = encoder.encode([text])  # alone: its own chunk count
        close(row["tensors"]["context"], context[0])
        assert row["sequence_length"] == context.shape[1] == 77 * -(-max(1, row["tokens"]) // 75)
        if family == "sdxl":
            close(row["tensors"]["pooled"], pooled[0])
    assert rows[caption_digest(CAPTIONS[4]), 0]["sequence_length"] == 3 * 77  # cut at 225


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_t5_families_equal_diffusers_encode_prompt(four_caches, tiny_checkpoints, family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    folder = tiny_checkpoints[family]
    kind = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipeline = kind.from_pretrained(folder, transformer=None, vae=None, local_files_only=True)
    t5_tokenizer = pipeline.tokenizer_3 if family == "sd3" else pipeline.tokenizer_2
    length = 256 if family == "sd3" else 512
    rows = cached(four_caches, settings(family), folder)
    assert len(rows) == len(unique_captions())
    for text in unique_captions():
        row = rows[caption_digest(text), 0]
        real = min(len(t5_tokenizer(text).input_ids), length)  # </s> included
        assert row["tokens"] == row["sequence_length"] == real
        with torch.no_grad():
            if family == "sd3":
                embeds, _, pooled, _ = pipeline.encode_prompt(
                    text, None, None, do_classifier_free_guidance=False
                )
                assert embeds.shape[1] == 77 + length
                close(row["tensors"]["clip"], embeds[0, :77, :80])
                assert not embeds[0, :77, 80:].any()  # diffusers' zero padding, not stored
                t5 = embeds[0, 77:]
            else:
                t5, pooled, _ = pipeline.encode_prompt(text, None)
                t5 = t5[0]
                assert t5.shape[0] == length
        close(row["tensors"]["t5"], t5[:real])
        close(row["tensors"]["pooled"], pooled[0])


def test_caches_of_four_checkpoints_sit_side_by_side(four_caches):
    manifest = json.loads((four_caches / "manifest.json").read_text())
    assert len(manifest["text"]) == 4
    for key, entry in manifest["text"].items():
        assert entry["path"] == text_folder(key)
        assert (four_caches / entry["path"] / "text.json").exists()
        assert entry["captions"] == entry["entries"] == len(unique_captions())


def test_variants_are_the_trainers_augmentations(images, tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    prepare(images, out)
    chosen = settings("sd", 4, TAGS)
    with ray_started():
        add_text(OutputDir(str(out)), str(tiny_checkpoints["sd"]), chosen)
    rows = cached(out, chosen, tiny_checkpoints["sd"])
    empty = [row for (digest, _), row in rows.items() if digest == caption_digest("")]
    assert len(empty) == 1 and empty[0]["text"] == ""  # once, for caption dropout
    for text in unique_captions()[:2] + unique_captions()[3:]:
        if not text:
            continue
        digest = caption_digest(text)
        variants = [rows[digest, v]["text"] for v in range(4)]
        assert variants == [caption(text, TAGS, 0, epoch=v, key=digest) for v in range(4)]
        assert variants[0].split(", ")[0] == text.split(",")[0]  # kept token
    long = [rows[caption_digest(CAPTIONS[1]), v]["text"] for v in range(4)]
    assert len(set(long)) == 4


def test_pick_variant_takes_each_variant_once_per_run_of_epochs():
    for key in ("a", "b", "c"):
        for run_start in (0, 5, 10):
            picked = [pick_variant(7, epoch, key, 5) for epoch in range(run_start, run_start + 5)]
            assert sorted(picked) == list(range(5))
        assert pick_variant(7, 3, key, 5) == pick_variant(7, 3, key, 5)
    orders = {tuple(pick_variant(0, e, str(k), 4) for e in range(4)) for k in range(20)}
    assert len(orders) > 1  # shuffled per image
    assert pick_variant(0, 9, "a", 1) == pick_variant(0, 9, "a", 0) == 0


def text_stats(out: Path) -> dict:
    (entry,) = json.loads((out / "stats.json").read_text())["text"].values()
    return entry


@pytest.mark.slow  # ~35 s: two prepare runs with latents and text, two resumed text stages
def test_new_captions_alone_are_encoded_and_a_resumed_run_encodes_nothing_again(
    images, tiny_checkpoints, tmp_path, monkeypatch
):
    monkeypatch.setattr(text_cache, "CAPTIONS_PER_SHARD", 2)  # several shards
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    out = tmp_path / "out"
    prepare(folder, out, pretrained=str(tiny_checkpoints["sd"]))
    assert text_stats(out)["captions_encoded"] == len(unique_captions())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latents"] and len(manifest["text"]) == 1
    write_images(folder, ["a photo of the cat", "blue sky, flower"], start=len(CAPTIONS))
    prepare(folder, out, pretrained=str(tiny_checkpoints["sd"]), incremental=True)
    assert text_stats(out) | {"entries": 0} == {"entries": 0, "encoded": 1, "captions_encoded": 1}
    (path,) = (e["path"] for e in json.loads((out / "manifest.json").read_text())["text"].values())
    (out / path / "text.json").unlink()  # killed before the end: every shard finished
    with ray_started():
        add_text(OutputDir(str(out)), str(tiny_checkpoints["sd"]), settings("sd"))
    assert text_stats(out)["encoded"] == 0
    tars = sorted((out / path).glob("*.tar"))
    tars[0].unlink()  # killed before this shard's tar was named
    lost = len(pq.read_table(out / path / "parts" / f"{tars[0].stem}.parquet"))
    with ray_started():
        add_text(OutputDir(str(out)), str(tiny_checkpoints["sd"]), settings("sd"))
    assert text_stats(out)["captions_encoded"] == lost
    assert len(cached(out, settings("sd"), tiny_checkpoints["sd"])) == len(unique_captions()) + 1


def test_missing_text_parts_are_refused_before_ray_starts(four_caches, tiny_checkpoints):
    with pytest.raises(UsageError, match="text_encoder_3/"):
        text_parts(tiny_checkpoints["sdxl"], "sd3")
    with pytest.raises(UsageError, match="--model flux"):
        text_parts(tiny_checkpoints["flux"], "sd")
    argv = [
        "--output",
        str(four_caches),
        "--model",
        "sd3",
        "--pretrained",
        str(tiny_checkpoints["sdxl"]),
    ]
    assert main(argv) == 2


def test_text_options_are_validated():
    with pytest.raises(ValueError, match="--caption-variants"):
        PrepareConfig(output="o", pretrained="c", tags=TAGS)
    with pytest.raises(ValueError, match="--vae and --pretrained"):
        PrepareConfig(output="o", pretrained="c", vae="v")
    PrepareConfig(output="o", pretrained="c", caption_variants=2, tags=TAGS)


@pytest.mark.parametrize("name", ["AutoencoderKLFlux2", "AutoencoderKLQwenImage"])
def test_vaes_of_other_classes_encode_the_stored_images(four_caches, tmp_path, name):
    import diffusers
    from checkpoints import other_vae

    from pipeline.latents import LatentEncoder, add_latents, vae_folder

    folder = other_vae(name, tmp_path / "ckpt" / "vae")
    assert vae_folder(tmp_path / "ckpt") == folder
    out = tmp_path / "out"
    shutil.copytree(four_caches, out)
    manifest = add_latents(OutputDir(str(out)), str(tmp_path / "ckpt"))
    ((key, entry),) = [(k, e) for k, e in manifest.latents.items() if e["class"] == name]
    assert entry["factor"] == 2 and entry["channels"] == 4
    row = pq.read_table(out / entry["path"] / "index.parquet").to_pylist()[0]
    index = pq.read_table(out / "index.parquet").to_pylist()
    (image_row,) = [r for r in index if r["key"] == row["key"]]
    with open(out / image_row["shard"], "rb") as tar:
        tar.seek(image_row["image_offset"])
        from io import BytesIO

        from PIL import Image

        pixels = np.asarray(Image.open(BytesIO(tar.read(image_row["image_size"]))).convert("RGB"))
    with open(out / row["latent_shard"], "rb") as tar:
        tar.seek(row["latent_offset"])
        shape = (2, row["latent_channels"], row["latent_height"], row["latent_width"])
        cached = np.frombuffer(tar.read(row["latent_size"]), np.float16).reshape(shape)
    vae = getattr(diffusers, name).from_pretrained(folder)
    batch = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        latent = vae.encode(batch[:, :, None] if "Qwen" in name else batch).latent_dist.mean
    latent = latent[:, :, 0] if "Qwen" in name else latent
    assert LatentEncoder(str(folder)).fingerprint == key
    np.testing.assert_allclose(cached[0], latent[0].numpy(), rtol=2e-2, atol=2e-2)
