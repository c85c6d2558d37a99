"""Latents prepared once by the job's VAE stage, and read by the loader on the latent grid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_BUCKETS, ray_started
from images import detailed, save
from PIL import Image
from torchrun import logged_training

from pipeline.config import PrepareConfig, WriteOptions
from pipeline.distributor import map_on_actors
from pipeline.format import OutputDir, vae_fingerprint
from pipeline.latents import LatentEncoder, add_latents
from pipeline.prepare import run
from trainer.dataset import PreparedData
from trainer.diffusion import save_parts, tiny_parts
from trainer.loader import make_loader
from trainer.sampler import EpochBatches
from trainer.storage import NodeCache

REPO = Path(__file__).resolve().parent.parent
# Overflowing both ways (wide, tall), exact, and sizes that fill no batch: catch-all re-fits.
SIZES = [(150, 97), (97, 150), (96, 64), (64, 96), (129, 100), (200, 64), (64, 64)] * 3


def vae_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny SD checkpoint with a VAE (SD's factor of 8), Hub-style: vae/ inside."""
    save_parts(tiny_parts(seed=seed, with_vae=True), folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("latent-images")
    for i, size in enumerate(SIZES):
        save(Image.fromarray(detailed(*size, i)), folder / f"{i:02d}.jpg", quality=95)
        (folder / f"{i:02d}.txt").write_text(f"tag {i % 3}, tag {i}")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return vae_checkpoint(tmp_path_factory.mktemp("ckpt") / "sd")


def prepare(images: Path, output: Path, vae: Path | None = None, **settings) -> None:
    config = PrepareConfig(
        input=str(images),
        output=str(output),
        buckets=SMALL_BUCKETS,
        samples_per_shard=4,
        max_crop=0.9,
        vae=str(vae or ""),
        **settings,
    )
    with ray_started():
        run(config)


@pytest.fixture(scope="module")
def with_latents(images, checkpoint, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("with") / "out"
    prepare(images, output, checkpoint)
    return output


def test_image_shards_are_the_same_with_and_without_latents(images, with_latents, tmp_path):
    prepare(images, tmp_path / "out")
    tars = sorted((tmp_path / "out" / "shards").glob("*.tar"))
    assert tars and [t.name for t in tars] == sorted(
        t.name for t in (with_latents / "shards").glob("*.tar")
    )
    for tar in tars:
        assert tar.read_bytes() == (with_latents / "shards" / tar.name).read_bytes()
    manifest = json.loads((with_latents / "manifest.json").read_text())
    ((fingerprint, entry),) = manifest["latents"].items()
    assert entry["latents"] == manifest["counts"]["images"] and entry["factor"] == 8
    stats = json.loads((with_latents / "stats.json").read_text())
    assert stats["latents"] == {fingerprint: entry["latents"]}


def test_cached_latents_equal_encoding_the_same_window(with_latents, checkpoint):
    """Each latent window of a batch is the VAE's encoding of the same pixels where the stored
    image had no overflow; where it had, the window of the whole stored image's encoding at the
    crop's place on the latent grid (the encoder's mid-block attention sees the whole image, so
    that is not the window's own encoding: pipeline/latents.py); a flipped sample is that latent
    mirrored."""
    encoder = LatentEncoder(str(checkpoint / "vae"))
    data = PreparedData(with_latents, latents=encoder.fingerprint)
    batches = EpochBatches(data, batch_size=2, world_size=1, rank=0, seed=3, flip=0.5)
    checked = {"exact": 0, "overflow": 0, "flipped": 0}
    for epoch in range(3):
        batches.set_epoch(epoch)
        for plan, batch in zip(batches, make_loader(data, batches, num_workers=0), strict=True):
            if not plan.latent:
                assert batch.pixels is not None and batch.latent_mean is None, "a catch-all re-fit"
                continue
            assert batch.pixels is None
            for i, item in enumerate(plan.items):
                stored = np.asarray(_stored_image(data, item))
                width, height = (int(v) for v in data.buckets[plan.bucket])
                left, top = plan.crops[i]
                assert left % 8 == 0 and top % 8 == 0, "on the latent grid"
                window = np.ascontiguousarray(stored[top : top + height, left : left + width])
                expected = encoder.encode(window[None])[0, 0].astype(float)
                if plan.flips[i]:
                    expected = expected[..., ::-1]
                    checked["flipped"] += 1
                cached = batch.latent_mean[i].float().numpy()
                if tuple(data.columns.stored[item]) == (width, height):
                    assert np.abs(cached - expected).max() < 2e-2 * np.abs(expected).max()
                    checked["exact"] += 1
                else:  # the whole stored image encoded, its window taken on the grid
                    whole = np.ascontiguousarray(
                        stored[: stored.shape[0] // 8 * 8, : stored.shape[1] // 8 * 8]
                    )
                    latent = encoder.encode(whole[None])[0, 0].astype(float)
                    expected = latent[:, top // 8 :][:, : height // 8, left // 8 :][
                        ..., : width // 8
                    ]
                    if plan.flips[i]:
                        expected = expected[..., ::-1]
                    assert np.abs(cached - expected).max() < 2e-2 * np.abs(expected).max()
                    checked["overflow"] += 1
    assert min(checked.values()) > 2, checked


def test_latents_of_a_remote_dataset_come_through_the_cache(
    with_latents, checkpoint, s3_server, tmp_path
):
    """The latents' companion shards download through the node cache like the image shards:
    the same batches as the local copy, and only latents tars read for latent batches."""
    fingerprint = LatentEncoder(str(checkpoint / "vae")).fingerprint
    uri = s3_server.upload(with_latents, "latents", "out")
    cache = NodeCache(tmp_path / "cache")
    batches_of = {}
    for name, root in (("local", str(with_latents)), ("remote", uri)):
        data = PreparedData(root, latents=fingerprint, cache=cache)
        batches = EpochBatches(
            data, batch_size=2, world_size=1, rank=0, seed=3, shuffle="shards", window=2
        )
        batches_of[name] = [
            (
                b.keys,
                None if b.latent_mean is None else b.latent_mean.float().sum().item(),
                None if b.pixels is None else b.pixels.sum().item(),
            )
            for b in make_loader(data, batches, num_workers=0)
        ]
    assert batches_of["remote"] == batches_of["local"]
    assert any(latent is not None for _, latent, _ in batches_of["remote"])
    assert list((data.files.cache_folder / "latents").rglob("*.tar")), "latents tars cached"


def _stored_image(data: PreparedData, item: int) -> Image.Image:
    import io

    columns = data.columns
    with columns.shard_paths[columns.shard[item]].open() as shard:
        shard.seek(int(columns.image_offset[item]))
        return Image.open(io.BytesIO(shard.read(int(columns.image_size[item])))).convert("RGB")


@pytest.mark.slow
def test_latents_added_to_a_prepared_out_then_only_new_shards_encoded(images, checkpoint, tmp_path):
    source, output = tmp_path / "images", tmp_path / "out"
    shutil.copytree(images, source)
    prepare(source, output)  # no latents
    with ray_started():
        manifest = add_latents(OutputDir(str(output)), str(checkpoint))  # the Hub-style folder
    (fingerprint,) = manifest.latents
    folder = output / "latents" / fingerprint
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}
    save(Image.fromarray(detailed(300, 200, 99)), source / "new.jpg", quality=95)
    prepare(source, output, checkpoint, incremental=True)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}
    shards = {p.stem for p in (output / "shards").glob("*.tar")}
    assert {Path(name).stem for name in after} == shards, "a latent shard per image shard"
    new = set(after) - set(before)
    assert len(new) == 1 and {n: after[n] for n in set(after) & set(before)} == {
        n: before[n] for n in set(after) & set(before)
    }, "only the new shard encoded"
    data = PreparedData(output, latents=fingerprint)
    assert len(data.columns.latents.offset) == len(data)


class DyingOnce(LatentEncoder):
    """Kills its worker the first time it is asked for a shard (Ray restarts it, retries)."""

    def encode_shard(self, out, name, folder):
        marker = Path(out.path("died-once"))
        if not marker.exists():
            marker.write_text(name)
            os._exit(1)
        return super().encode_shard(out, name, folder)


@pytest.mark.slow
def test_a_killed_actors_shard_is_redone(with_latents, checkpoint, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(with_latents, output)
    (folder,) = (output / "latents").iterdir()
    lost = sorted(folder.glob("*.tar"))[:2]
    for tar in lost:
        tar.unlink()
    out = OutputDir(str(output))
    with ray_started():
        import ray

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
        results = map_on_actors(
            DyingOnce,
            (str(checkpoint / "vae"),),
            "encode_shard",
            [(out, tar.stem, f"latents/{folder.name}") for tar in lost],
            description="encode",
            total_items=8,
            items_of=lambda r: r["latents"],
        )
    assert sorted(r["name"] for r in results) == sorted(t.stem for t in lost)
    assert (output / "died-once").exists(), "an actor died"
    for tar in lost:
        assert tar.read_bytes() == (with_latents / "latents" / folder.name / tar.name).read_bytes()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_from_the_cached_latents(
    with_latents, checkpoint, tmp_path, precision
):
    """The frozen VAE is stored in the low precision: its fingerprint is still the one the
    dataset's latents were made with, and the latents are used (`auto`)."""
    from recorded import train

    from trainer.train import Config

    latent = []
    config = Config(
        data=(str(with_latents),),
        model="sd",
        pretrained=str(checkpoint),
        mixed_precision=precision,
        max_steps=2,
        num_workers=0,
        batch_size=2,
        out_dir=str(tmp_path / "ckpt"),
        caption_dropout=0.0,
    )
    result = train(config, on_step=lambda step: latent.append(step.batch.latent_mean is not None))
    assert any(latent) and all(np.isfinite(result["losses"]))


def test_a_mismatched_vae_is_refused(with_latents, tmp_path):
    other = vae_fingerprint(tiny_parts(seed=7, with_vae=True).vae)
    with pytest.raises(ValueError, match=r"holds no latents of this VAE .*--vae"):
        PreparedData(with_latents, latents=other)
    done = subprocess.run(
        [
            sys.executable,
            "trainer/train.py",
            f"--data={with_latents}",
            "--model=sd",
            f"--pretrained={vae_checkpoint(tmp_path / 'other', seed=7)}",
            "--latents=on",
            "--max-steps=1",
            "--num-workers=0",
            f"--out-dir={tmp_path / 'ckpt'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "holds no latents of this VAE" in done.stderr


@pytest.mark.slow
def test_two_ranks_train_from_latents_with_the_losses_of_pixels(images, checkpoint, tmp_path):
    """No overflow (cropped at prepare time) and no flips: the first batch of latents sees the
    same latent distributions as from pixels, so its loss matches; then it trains on."""
    output = tmp_path / "out"
    prepare(images, output, checkpoint, write=WriteOptions(crop="center"))
    runs = {}
    for mode in ("on", "off"):
        runs[mode] = logged_training(
            2,
            tmp_path / f"{mode}.jsonl",
            f"--data={output}",
            "--model=sd",
            f"--pretrained={checkpoint}",
            f"--latents={mode}",
            "--epochs=2",
            "--batch-size=2",
            "--num-workers=1",
            f"--out-dir={tmp_path / mode}",
            "--caption-dropout=0",
        )
    for rank in (0, 1):
        latent, pixel = ([e for e in runs[m] if e["rank"] == rank] for m in ("on", "off"))
        assert len(latent) == len(pixel) > 2
        assert [e["keys"] for e in latent] == [e["keys"] for e in pixel]
        # Catch-all re-fits are pixels either way: up to the first batch of latents the two runs
        # take the same steps, so that batch meets the same weights, and gives the same loss.
        first = next(i for i, e in enumerate(latent) if e["latent"])
        assert latent[:first] == pixel[:first]
        assert latent[first]["loss"] == pytest.approx(pixel[first]["loss"], rel=2e-2)
        assert all(np.isfinite(e["loss"]) for e in latent)
        assert not any(e["latent"] for e in pixel)
