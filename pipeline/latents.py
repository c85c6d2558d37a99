"""Latents prepared once: the VAE stage that encodes every stored image into a companion shard.

    python jobs/prepare.py --input IMAGES --output OUT --vae ~/models/sd-v1-5   # with the images
    python jobs/prepare.py --output OUT --vae ~/models/sdxl-vae                # added to an OUT

A Ray actor per GPU (per CPU without GPUs) loads the VAE once and encodes shard after shard:
every stored image whole, overflow included, cut to a multiple of the VAE's factor f (8 for SD
and SDXL) from its top-left corner (latent (i, j) is pixels [fi, fi+f) x [fj, fj+f)), so the
loader can still crop the overflow at random, on the latent grid. One latent shard per image
shard, the image shards untouched; a folder per VAE fingerprint, so latents of several VAEs
coexist (docs/format.md):

    OUT/latents/FINGERPRINT/NAME.tar            KEY.latent.npy: float16 [2, C, h, w], the
                                                distribution's mean and std (raw .npy, no pickle)
    OUT/latents/FINGERPRINT/parts/NAME.parquet  each member's data offset and shape
    OUT/latents/FINGERPRINT/index.parquet       all of them, rows in index.parquet's order
    OUT/latents/FINGERPRINT/vae.json            written last: the latents are complete

The mean and std in float16 (2 x 2 bytes a value: 98 KB for a 512x768 image, against ~150 KB
of JPEG) keep the VAE's sampling noise per epoch, which a cached single sample (kohya-ss's
way) loses; float16 holds both to 1e-3 relative. Torch and diffusers are imported by the actors
alone: machines that prepare without --vae never need them.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.format import (
    LATENT_INDEX_SCHEMA,
    Manifest,
    OutputDir,
    is_jpeg,
    latents_folder,
    vae_fingerprint,
)

ENCODE_BATCH = 8  # images of one size a forward


# The VAE classes whose encode gives a latent distribution (`latent_dist`) of 2-D images:
# class name -> (its downscale factor from its config, whether it is video-shaped [B, C, T, H,
# W]: an image is then one frame, T = 1). Flux.2's normalisation (2x2 patches, batch-norm
# statistics) and Qwen-Image's (latents_mean, latents_std) are the trainer's: the cached
# latents are the raw distribution's.
VAE_CLASSES = {
    "AutoencoderKL": (lambda config: 2 ** (len(config["block_out_channels"]) - 1), False),
    "AutoencoderKLFlux2": (lambda config: 2 ** (len(config["block_out_channels"]) - 1), False),
    "AutoencoderKLQwenImage": (lambda config: 2 ** (len(config["dim_mult"]) - 1), True),
}


def vae_folder(path: str | Path) -> Path:
    """A VAE folder of one of VAE_CLASSES: `path` itself, or its `vae/` (a whole diffusers
    checkpoint)."""
    path = Path(path).expanduser()
    for folder in (path, path / "vae"):
        config = folder / "config.json"
        if config.exists() and json.loads(config.read_text()).get("_class_name") in VAE_CLASSES:
            return folder
    raise UsageError(
        f"--vae {path}: no diffusers VAE of a class the stage encodes with "
        f"({', '.join(VAE_CLASSES)}) there (config.json), nor in vae/"
    )


class LatentEncoder:
    """Loads the VAE once (the Ray actor's state) and encodes whole shards."""

    def __init__(self, folder: str, device: str = "cpu"):
        import diffusers
        import torch

        self.torch, self.device = torch, torch.device(device)
        name = json.loads((Path(folder) / "config.json").read_text())["_class_name"]
        self.vae = getattr(diffusers, name).from_pretrained(folder, local_files_only=True)
        self.vae.to(self.device).eval().requires_grad_(False)
        self.fingerprint = vae_fingerprint(self.vae)
        factor_of, self.video = VAE_CLASSES[name]
        self.factor = factor_of(self.vae.config)

    def info(self) -> dict:
        config = self.vae.config
        scaling, shift = config.get("scaling_factor"), config.get("shift_factor")
        info = {
            "fingerprint": self.fingerprint,
            "class": type(self.vae).__name__,
            "scaling_factor": None if scaling is None else float(scaling),  # None: Flux.2's,
            "shift_factor": None if shift is None else float(shift),  # Qwen-Image's
            "channels": int(config.get("latent_channels") or config["z_dim"]),
            "factor": self.factor,
        }
        if self.video:  # per-channel normalisation
            info |= {
                "latents_mean": list(config["latents_mean"]),
                "latents_std": list(config["latents_std"]),
            }
        return info

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 images [B, H, W, 3] (H, W multiples of the factor f) -> float16 [B, 2, C,
        H/f, W/f]: the mean and std of the VAE's distribution."""
        torch = self.torch
        batch = torch.as_tensor(np.require(pixels, requirements="W"), device=self.device)
        batch = batch.permute(0, 3, 1, 2).float()  # read-only arrays (from Ray's store) copied
        batch = batch / 127.5 - 1.0
        with torch.no_grad():  # a video-shaped VAE: the image is one frame
            distribution = self.vae.encode(batch[:, :, None] if self.video else batch).latent_dist
        mean, std = distribution.mean, distribution.std
        if self.video:
            mean, std = mean[:, :, 0], std[:, :, 0]
        stacked = torch.stack([mean, std], dim=1)
        return stacked.to(torch.float16).cpu().numpy()

    def encode_shard(self, out: OutputDir, name: str, folder: str) -> dict:
        """Write `folder`/NAME.tar and its part from shard NAME's stored images."""
        import simplejpeg

        part = pq.read_table(out.part(name), filesystem=out.filesystem)
        part = part.filter(pc.is_null(part["reject"]))
        rows = part.select(["key", "image_offset", "image_size"]).to_pylist()
        with out.filesystem.open_input_file(out.shard(name)) as shard:
            images = [_decoded(shard, row, simplejpeg, self.factor) for row in rows]
        latents: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.shape, []).append(i)
        for members in by_size.values():  # one size a forward
            for start in range(0, len(members), ENCODE_BATCH):
                chosen = members[start : start + ENCODE_BATCH]
                encoded = self.encode(np.stack([images[i] for i in chosen]))
                for i, latent in zip(chosen, encoded, strict=True):
                    latents[i] = latent
        _write_latent_shard(out, folder, name, [row["key"] for row in rows], latents)
        return {"name": name, "latents": len(rows)}


def _decoded(shard, row: dict, simplejpeg, factor: int) -> np.ndarray:
    """A stored image, cut to multiples of `factor` from its top-left corner."""
    shard.seek(row["image_offset"])
    data = shard.read(row["image_size"])
    if is_jpeg(data):
        image = simplejpeg.decode_jpeg(data, colorspace="RGB")
    else:
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    height, width = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    return np.ascontiguousarray(image[:height, :width])


def _write_latent_shard(
    out: OutputDir, folder: str, name: str, keys: list[str], latents: list[np.ndarray]
) -> None:
    """The latent tar and its part, atomically (part first, tar last: finished once named)."""
    members = [_npy(latent) for latent in latents]

    def part_of(offsets: dict[str, tuple[int, int]]) -> pa.Table:
        records = [
            {
                "key": key,
                "latent_shard": f"{folder}/{name}.tar",
                "latent_offset": offsets[f"{key}.latent.npy"][0] + len(data) - latent.nbytes,
                "latent_size": latent.nbytes,
                "latent_channels": latent.shape[1],
                "latent_height": latent.shape[2],
                "latent_width": latent.shape[3],
            }
            for key, latent, data in zip(keys, latents, members, strict=True)
        ]
        return pa.Table.from_pylist(records, schema=LATENT_INDEX_SCHEMA)

    samples = [(key, {"latent.npy": data}) for key, data in zip(keys, members, strict=True)]
    out.write_shard(out.latent_shard(folder, name), out.latent_part(folder, name), samples, part_of)


def _npy(latent: np.ndarray) -> bytes:
    """A plain .npy file (never pickled): the header, then the data."""
    buffer = io.BytesIO()
    np.save(buffer, latent, allow_pickle=False)
    return buffer.getvalue()


def add_latents(out: OutputDir, vae: str, max_in_flight: int | None = None) -> Manifest:
    """Encode the latents of every shard of the complete OUT that has none yet for this VAE;
    then its index, vae.json, and the manifest and stats that name them."""
    from pipeline.distributor import map_on_actors

    manifest = Manifest.read(out)
    if manifest is None:
        raise UsageError(f"{out.uri} is not a complete prepared dataset: prepare it first")
    folder = str(vae_folder(vae))
    info = LatentEncoder(folder).info()  # here too: the fingerprint names the folder
    latents = latents_folder(info["fingerprint"])
    out.filesystem.create_dir(out.path(latents, "parts"), recursive=True)
    names = [Path(shard).stem for shard in manifest.shards]
    finished = set(out.list_names(latents, ".tar"))
    todo = [name for name in names if name not in finished]
    map_on_actors(
        LatentEncoder,
        (folder,),
        "encode_shard",
        [(out, name, latents) for name in todo],
        description="encode",
        total_items=manifest.counts["images"],
        items_of=lambda result: result["latents"],
        max_in_flight=max_in_flight,
    )
    for name in set(out.list_names(latents, ".tar")) - set(names):  # replaced image shards
        out.delete(out.latent_shard(latents, name))
        out.delete(out.latent_part(latents, name))
    parts = [out.latent_part(latents, name) for name in names]
    index = pa.concat_tables([pq.read_table(p, filesystem=out.filesystem) for p in parts])
    out.write_table(out.path(latents, "index.parquet"), index)
    info |= {"latents": len(index), "path": latents}
    out.write_json(out.path(latents, "vae.json"), info)
    stats = out.read_json(out.path("stats.json")) or {}
    stats.setdefault("latents", {})[info["fingerprint"]] = len(index)
    out.write_json(out.path("stats.json"), stats)
    entry = {key: value for key, value in info.items() if key != "fingerprint"}
    updated = dataclasses.replace(manifest, latents=manifest.latents | {info["fingerprint"]: entry})
    updated.write(out)
    return updated
