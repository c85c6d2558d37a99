"""The trainer on the text cache: each batch's cached conditioning equals encoding its captions,
variants and caption dropout as documented, caches chosen and refused by what they are, the
text encoders never loaded; two ranks train from a cache with the losses of encoding."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import SMALL_BUCKETS, ray_started
from images import rgb, save
from torchrun import logged_training

from pipeline.config import PrepareConfig
from pipeline.errors import UsageError
from pipeline.format import FAMILY_PARTS, Manifest, OutputDir, caption_digest, pick_variant
from pipeline.prepare import run
from pipeline.text_cache import add_text, recipe_settings
from trainer.augment import CaptionOptions, caption
from trainer.config import Config
from trainer.dataset import PreparedData
from trainer.loader import make_loader
from trainer.sampler import EpochBatches
from trainer.text_cache import chunked_conditioning, text_cache_to_use

CAPTIONS = [
    "a photo of the cat",
    "girl, " * 40 + "smile",  # two chunks
    None,  # the empty caption
    "solo, long hair, blue eyes, smile, outdoors, sky, tree, flower, dress, hat",
    "boy, " * 80 + "hat",  # three chunks, cut at 225 tokens
    "dog, red shirt, sitting, looking at viewer",
    "a photo of the cat",
    "girl, " * 40 + "smile",
    "highres, best quality, masterpiece, simple white background",
    "cat",
    "boy, " * 45,
    "green eyes, short hair",
]
SHAPES = [(96, 64)] * 8 + [(64, 96)] * 4  # two buckets, batches of two fill both
TAGS = CaptionOptions(shuffle_tags=True, keep_tokens=1, tag_dropout=0.2)
pytestmark = pytest.mark.usefixtures("local_ray")


def close(cached: torch.Tensor, encoded: torch.Tensor) -> None:
    """Within the cache's fp16 (rounding: 2**-11 relative) of the fp32 encoding."""
    assert cached.shape == encoded.shape
    torch.testing.assert_close(cached.float(), encoded.float(), rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints, tmp_path_factory) -> Path:
    """A copy of the tiny sd checkpoint: the data is prepared with it, then its text parts are
    removed (what a user does to save disk once the cache is made)."""
    folder = tmp_path_factory.mktemp("stripped") / "sd"
    shutil.copytree(tiny_checkpoints["sd"], folder)
    return folder


@pytest.fixture(scope="module")
def prepared(checkpoint, tmp_path_factory) -> Path:
    """The images prepared with --pretrained (fp16 cache, no variants); the checkpoint then
    stripped of its text encoders and tokenizers."""
    root = tmp_path_factory.mktemp("text-training")
    for i, ((width, height), text) in enumerate(zip(SHAPES, CAPTIONS, strict=True)):
        save(rgb(width, height, i), root / "images" / f"{i:02d}.jpg", quality=90)
        if text is not None:
            (root / "images" / f"{i:02d}.txt").write_text(text)
    with ray_started():
        run(
            PrepareConfig(
                input=str(root / "images"),
                output=str(root / "out"),
                buckets=SMALL_BUCKETS,
                samples_per_shard=4,
                pretrained=str(checkpoint),
                text_dtype="fp16",
            )
        )
    for part in FAMILY_PARTS["sd"]:
        shutil.rmtree(checkpoint / part)
    return root / "out"


def with_cache(prepared: Path, folder: Path, checkpoint: Path, settings: dict) -> Path:
    """A copy of the prepared OUT with another cache added."""
    out = folder / "out"
    shutil.copytree(prepared, out)
    with ray_started():
        add_text(OutputDir(str(out)), str(checkpoint), settings)
    return out


def config(out: Path, checkpoint: Path, tmp_path: Path, **options) -> Config:
    settings = {
        "data": (str(out),),
        "model": "sd",
        "pretrained": str(checkpoint),
        "batch_size": 2,
        "num_workers": 0,
        "max_steps": 2,
        "out_dir": str(tmp_path / "ckpt"),
        "caption_dropout": 0.0,
    }
    return Config(**settings | options)


def prompt_encoder(folder: Path, family: str, max_tokens: int, layout: str):
    """The trainer's prompt encoder on the checkpoint's text encoders, as trainer/diffusion.py's
    `Parts.prompt_encoder` builds it (what the trainer encodes with, without a cache)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from trainer.prompts import PromptEncoder, SDXLPromptEncoder, Tokenizer

    first = CLIPTextModel.from_pretrained(folder / "text_encoder")
    if family == "sd":
        return PromptEncoder(Tokenizer(folder), first, max_tokens, 2, layout)
    second = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    tokenizers = (Tokenizer(folder), Tokenizer(folder, "tokenizer_2"))
    return SDXLPromptEncoder(tokenizers, (first, second), max_tokens, 2, layout)


def manifest(out: Path) -> Manifest:
    return Manifest.read(OutputDir(str(out)))


def cached_batches(out: Path, key: str, epochs: int = 1, seed: int = 0):
    """(sampler's plan, loaded batch) of every batch of `epochs` epochs read from cache `key`."""
    data = PreparedData(out, text=key)
    batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=seed)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        loader = make_loader(data, batches, num_workers=0)
        yield from zip(batches, loader, strict=True)


@pytest.mark.parametrize(
    ("family", "max_tokens", "layout"),
    [("sd", 225, "full"), ("sd", 225, "trimmed"), ("sd", 75, "full"), ("sdxl", 225, "full")],
)
def test_a_batchs_cached_conditioning_equals_encoding_its_captions(
    prepared, tiny_checkpoints, tmp_path, family, max_tokens, layout
):
    """Mixed chunk counts in a batch too: the padding chunk is the empty caption's entry; a
    dropped caption is the empty caption's, the batch cut to its longest kept caption."""
    full = tiny_checkpoints[family]
    out = prepared
    if family == "sdxl":
        settings = recipe_settings("sdxl", None, 0, CaptionOptions(), 0, "fp16")
        out = with_cache(prepared, tmp_path, full, settings)
    run_config = config(out, full, tmp_path, model=family, max_tokens=max_tokens)
    (key,) = text_cache_to_use(run_config, [manifest(out)])  # by its fingerprint: parts there
    encoder = prompt_encoder(full, family, max_tokens, layout)
    lengths = set()
    for plan, batch in cached_batches(out, key):
        assert batch.text is not None and plan.captions == batch.captions
        assert batch.captions == [text or "" for text in _captions(out, plan.items)]
        lengths.add(tuple(batch.text.rows.tolist()))
        for dropped in ([False, False], [True, False], [False, True]):
            dropped = torch.tensor(dropped)
            context, pooled = chunked_conditioning(batch.text, dropped, max_tokens, layout)
            kept = [
                "" if drop else text for drop, text in zip(dropped, batch.captions, strict=True)
            ]
            encoded, encoded_pooled = encoder.encode(kept)
            close(context, encoded)
            if family == "sdxl":
                close(pooled, encoded_pooled)
    assert any(len(set(rows)) > 1 for rows in lengths), "a batch of mixed chunk counts"


def _captions(out: Path, items) -> list[str | None]:
    return PreparedData(out).captions(items)


def test_variants_are_picked_as_pick_variant_says_and_are_the_augmented_captions(
    prepared, tiny_checkpoints, tmp_path
):
    full = tiny_checkpoints["sd"]
    settings = recipe_settings("sd", None, 3, TAGS, 5, "fp16")  # another seed than the run's
    out = with_cache(prepared, tmp_path, full, settings)
    run_config = config(out, full, tmp_path, **dataclasses.asdict(TAGS))
    (key,) = text_cache_to_use(run_config, [manifest(out)])
    assert manifest(out).text[key]["settings"] == settings, "the cache of variants, not the other"
    encoder = prompt_encoder(full, "sd", 225, "full")
    seen = set()
    for plan, batch in cached_batches(out, key, epochs=4):
        context, _ = chunked_conditioning(batch.text, torch.zeros(2, dtype=bool), 225, "full")
        close(context, encoder.encode(batch.captions)[0])
        for text, key_, got in zip(
            _captions(out, plan.items), plan.keys, batch.captions, strict=True
        ):
            digest = caption_digest(text)
            variant = pick_variant(0, plan.epoch, key_, 3) if text else 0
            assert got == caption(text or "", TAGS, 5, epoch=variant, key=digest)
            seen.add((key_, variant))
    assert len({variant for _, variant in seen}) == 3


def test_a_cache_of_another_checkpoint_or_setting_is_refused_under_on(
    prepared, checkpoint, tiny_checkpoints, tmp_path
):
    from trainer.tiny import build

    other = build("sd", tmp_path / "other", seed=1)
    held = manifest(prepared)
    (key,) = held.text
    for wrong, named in (
        ({"pretrained": str(other)}, "another checkpoint's text encoders"),
        ({"clip_skip": 1}, "clip_skip 2"),
        ({"max_tokens": 300}, "max_tokens 225"),
        (dataclasses.asdict(TAGS), "no variants"),
        ({"model": "sdxl"}, "family sd"),
    ):
        run_config = config(prepared, checkpoint, tmp_path, text_cache="on", **wrong)
        with pytest.raises(UsageError) as refused:
            text_cache_to_use(run_config, [held])
        message = str(refused.value)
        assert named in message and key in message and str(checkpoint) in message, message
        assert f"family {run_config.model}" in message, "what the run wants"
        auto = dataclasses.replace(run_config, text_cache="auto")
        if "pretrained" not in wrong:  # the stripped checkpoint cannot encode: refused too
            with pytest.raises(UsageError, match="it lacks the text encoders"):
                text_cache_to_use(auto, [held])
            auto = dataclasses.replace(auto, pretrained=str(tiny_checkpoints[auto.model]))
        assert text_cache_to_use(auto, [held]) is None, "auto encodes"
    # the stripped checkpoint: the cache of its path; the full one's bytes: by fingerprint
    assert text_cache_to_use(config(prepared, checkpoint, tmp_path), [held]) == (key,)
    full = config(prepared, tiny_checkpoints["sd"], tmp_path, text_cache="on")
    assert text_cache_to_use(full, [held]) == (key,)
    elsewhere = tmp_path / "moved"
    shutil.copytree(checkpoint, elsewhere)  # no text parts, another path: not known to be it
    with pytest.raises(UsageError, match="another checkpoint"):
        text_cache_to_use(config(prepared, elsewhere, tmp_path, text_cache="on"), [held])
    off = config(prepared, checkpoint, tmp_path, text_cache="off")
    assert text_cache_to_use(off, [held]) is None


def test_training_from_the_cache_never_loads_the_text_encoders(prepared, checkpoint, tmp_path):
    from recorded import train
    from transformers import CLIPTextModel, PreTrainedModel

    seen = []

    def look(step) -> None:
        model = step.model
        assert model.text_encoder is None and model.prompts is None
        assert not any(isinstance(module, PreTrainedModel) for module in model.modules())
        seen.append(step.batch.text is not None)

    refuse = mock.patch.object(
        CLIPTextModel, "from_pretrained", side_effect=AssertionError("a text encoder loaded")
    )
    with refuse:
        result = train(
            config(prepared, checkpoint, tmp_path, text_cache="on", caption_dropout=0.5),
            on_step=look,
        )
    assert seen and all(seen) and all(np.isfinite(result["losses"]))


@pytest.mark.slow
def test_two_ranks_train_from_the_cache_with_the_losses_of_encoding(
    prepared, checkpoint, tiny_checkpoints, tmp_path
):
    """The stripped checkpoint and the cache against the full checkpoint encoding each step:
    the same batches, and the first step's loss within the fp16 cache's rounding."""
    runs = {}
    for mode, pretrained in (("on", checkpoint), ("off", tiny_checkpoints["sd"])):
        runs[mode] = logged_training(
            2,
            tmp_path / f"{mode}.jsonl",
            f"--data={prepared}",
            "--model=sd",
            f"--pretrained={pretrained}",
            f"--text-cache={mode}",
            "--epochs=2",
            "--batch-size=2",
            "--num-workers=1",
            f"--out-dir={tmp_path / mode}",
            "--caption-dropout=0",
        )
    for rank in (0, 1):
        cached, encoded = ([e for e in runs[m] if e["rank"] == rank] for m in ("on", "off"))
        assert len(cached) == len(encoded) > 2
        assert [e["keys"] for e in cached] == [e["keys"] for e in encoded]
        assert [e["captions"] for e in cached] == [e["captions"] for e in encoded]
        assert all(e["text"] for e in cached) and not any(e["text"] for e in encoded)
        assert all(len({tuple(size) for size in e["target_size"]}) == 1 for e in cached)
        assert all(np.isfinite(e["loss"]) for e in cached)
        # the fp16 cache rounds the context by <= 2**-11 relative; the tiny U-Net carries that
        # to its loss far smaller (measured: 1e-7 relative in one process)
        assert cached[0]["loss"] == pytest.approx(encoded[0]["loss"], rel=1e-5)
    assert [e["step"] for e in runs["on"] if e["rank"] == 0] == [
        e["step"] for e in runs["on"] if e["rank"] == 1
    ]


def test_several_datasets_each_read_their_own_cache(
    prepared, checkpoint, tiny_checkpoints, tmp_path
):
    from trainer.mixture import open_datasets

    second = tmp_path / "second"
    shutil.copytree(prepared, second)
    specs = (str(prepared), f"{second}:2")
    run_config = config(prepared, checkpoint, tmp_path, data=specs, text_cache="on")
    keys = text_cache_to_use(run_config, [manifest(prepared), manifest(second)])
    assert keys is not None and len(keys) == 2
    data = open_datasets(specs, text=keys)
    batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=0)
    encoder = prompt_encoder(tiny_checkpoints["sd"], "sd", 225, "full")
    for batch in make_loader(data, batches, num_workers=0):
        context, _ = chunked_conditioning(batch.text, torch.zeros(2, dtype=bool), 225, "full")
        close(context, encoder.encode(batch.captions)[0])
    bare = manifest(second)
    bare = dataclasses.replace(bare, text={})
    bare.write(OutputDir(str(second)))
    with pytest.raises(UsageError, match=f"--data {second}:2 holds no text cache"):
        text_cache_to_use(run_config, [manifest(prepared), bare])
    full = str(tiny_checkpoints["sd"])
    auto = dataclasses.replace(run_config, text_cache="auto", pretrained=full)
    assert text_cache_to_use(auto, [manifest(prepared), bare]) is None
