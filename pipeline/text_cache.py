"""Text-encoder outputs cached once per caption: the text stage, beside the VAE stage.

    arb-prepare --input IMAGES --output OUT --model flux --pretrained ~/models/flux-dev
    arb-prepare --output OUT --model sdxl --pretrained ~/models/sdxl --caption-variants 8 \\
        --shuffle-tags --keep-tokens 1 --tag-dropout 0.1           # added to a prepared OUT

A Ray actor per GPU (per CPU without) loads the `--model` family's text encoders once from the
checkpoint (pipeline/text_encoders.py has the recipes) and encodes groups of captions. Each
unique caption is encoded once, however many images share it; with `--caption-variants N`,
N variants of it instead, each the trainer's own tag augmentation (`trainer.augment.caption`
seeded by (--seed, variant index as `epoch`, caption digest as `key`)); and always the empty
caption, once, for the trainer's caption dropout and padding (trainer/text_cache.py). Entries
are stored unpadded in bf16 or fp16 (safetensors), in a folder per fingerprint of the text
parts' files and the recipe's settings (docs/format.md):

    OUT/text/FINGERPRINT/NAME.tar            DIGEST.safetensors per encoded text
    OUT/text/FINGERPRINT/parts/NAME.parquet  each entry's caption digest, variant, bytes
    OUT/text/FINGERPRINT/index.parquet       all parts
    OUT/text/FINGERPRINT/text.json           written last: the cache is complete

Shards are append-only groups of captions the cache did not hold yet, named by their captions'
digests and finished once their tar is named (as latent shards): a killed run resumes with the
captions of the shards it had not finished, an incremental one encodes only its new captions.
Captions the dataset no longer holds stay in the cache (they cost a few KB each).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.format import (
    CHUNKED,
    FAMILY_PARTS,
    MAX_SEQUENCE_LENGTH,
    TEXT_INDEX_SCHEMA,
    Manifest,
    OutputDir,
    caption_digest,
    checkpoint_family,
    text_fingerprint,
    text_folder,
)

CAPTIONS_PER_SHARD = 1000  # new captions a text shard (and an actor's task) holds
ENCODE_BATCH = 16  # texts a forward


def text_parts(pretrained: str | Path, family: str) -> Path:
    """The checkpoint folder, checked to hold the text parts `family`'s recipe reads (and, where
    it has a model_index.json, to be of that family): a UsageError names what is missing."""
    folder = Path(pretrained).expanduser()
    missing = [part for part in FAMILY_PARTS[family] if not (folder / part).is_dir()]
    if missing:
        raise UsageError(
            f"--pretrained {folder}: --model {family}'s text encoders need "
            f"{', '.join(p + '/' for p in missing)} there (a diffusers checkpoint folder)"
        )
    named = checkpoint_family(folder)
    if named is not None and named != family:
        raise UsageError(f"--pretrained {folder} is a {named} checkpoint: pass --model {named}")
    return folder


def recipe_settings(
    family: str, max_sequence_length: int | None, variants: int, tags, seed: int, dtype: str
) -> dict:
    """What shapes a cache beside the weights: part of its fingerprint, and its text.json's.
    `tags` is a trainer.augment.CaptionOptions."""
    settings = {"family": family, "dtype": dtype, "variants": variants}
    if family in MAX_SEQUENCE_LENGTH:
        settings["max_sequence_length"] = max_sequence_length or MAX_SEQUENCE_LENGTH[family]
    else:
        settings |= CHUNKED
    if variants:
        settings |= {"seed": seed} | dataclasses.asdict(tags)
    return settings


def variant_texts(text: str, settings: dict) -> list[str]:
    """The texts cached for caption `text`: itself without variants (or when empty), else the
    trainer's augmentation of it for variant v = 0..N-1, seeded by (seed, v, its digest)."""
    from trainer.augment import CaptionOptions, caption

    if not settings["variants"] or not text:
        return [text]
    names = [item.name for item in dataclasses.fields(CaptionOptions)]
    options = CaptionOptions(**{name: settings[name] for name in names})
    digest = caption_digest(text)
    return [
        caption(text, options, settings["seed"], epoch=v, key=digest)
        for v in range(settings["variants"])
    ]


class TextEncoder:
    """Loads the recipe's encoders once (the Ray actor's state) and encodes groups of captions."""

    def __init__(self, folder: str, settings: dict, device: str = "cpu"):
        from pipeline.text_encoders import recipe

        self.settings, self.recipe = settings, recipe(folder, settings, device)

    def encode_group(self, out: OutputDir, folder: str, name: str, captions: list[str]) -> dict:
        """Write `folder`/NAME.tar and its part: every variant of `captions`, each distinct
        text encoded once. Returns the captions and the texts encoded."""
        from pipeline.text_encoders import serialized

        rows = [
            (caption_digest(text), v, variant)
            for text in captions
            for v, variant in enumerate(variant_texts(text, self.settings))
        ]
        texts = list(dict.fromkeys(variant for _, _, variant in rows))
        encoded: dict[str, tuple[bytes, int, int]] = {}
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = texts[start : start + ENCODE_BATCH]
            for text, (tensors, tokens) in zip(batch, self.recipe.encode(batch), strict=True):
                length = tensors["context" if "context" in tensors else "t5"].shape[0]
                encoded[text] = (serialized(tensors, self.settings["dtype"]), tokens, length)
        keys = {text: caption_digest(text) for text in texts}
        samples = [(keys[text], {"safetensors": encoded[text][0]}) for text in texts]

        def part_of(offsets: dict[str, tuple[int, int]]) -> pa.Table:
            records = []
            for digest, v, text in rows:
                offset, size = offsets[f"{keys[text]}.safetensors"]
                records.append(
                    {
                        "caption_digest": digest,
                        "variant": v,
                        "text": text,
                        "text_shard": f"{folder}/{name}.tar",
                        "text_offset": offset,
                        "text_size": size,
                        "tokens": encoded[text][1],
                        "sequence_length": encoded[text][2],
                    }
                )
            return pa.Table.from_pylist(records, schema=TEXT_INDEX_SCHEMA)

        out.write_shard(
            out.latent_shard(folder, name), out.latent_part(folder, name), samples, part_of
        )
        return {"name": name, "captions": len(captions), "encoded": len(texts)}


def dataset_captions(out: OutputDir) -> set[str]:
    """The distinct captions of OUT's index (no caption: the empty one)."""
    index = pq.read_table(out.path("index.parquet"), columns=["caption"], filesystem=out.filesystem)
    return {text or "" for text in pc.unique(index["caption"]).to_pylist()}


def cached_digests(out: OutputDir, folder: str) -> set[str]:
    """The caption digests of the finished shards of text cache `folder`."""
    digests = set()
    for name in out.list_names(folder, ".tar"):
        part = out.latent_part(folder, name)
        if out.exists(part):
            table = pq.read_table(part, columns=["caption_digest"], filesystem=out.filesystem)
            digests.update(pc.unique(table["caption_digest"]).to_pylist())
    return digests


def add_text(
    out: OutputDir, pretrained: str, settings: dict, max_in_flight: int | None = None
) -> Manifest:
    """Encode the captions of the complete OUT that its text cache for this checkpoint and
    `settings` (`recipe_settings`) lacks; then its index, text.json, and the manifest and
    stats that name them."""
    from pipeline.config import fingerprint
    from pipeline.distributor import map_on_actors

    manifest = Manifest.read(out)
    if manifest is None:
        raise UsageError(f"{out.uri} is not a complete prepared dataset: prepare it first")
    checkpoint = text_parts(pretrained, settings["family"])
    parts = FAMILY_PARTS[settings["family"]]
    key = text_fingerprint(str(checkpoint), parts, settings)
    folder = text_folder(key)
    out.filesystem.create_dir(out.path(folder, "parts"), recursive=True)
    out.delete_temporaries_in(folder)
    captions = dataset_captions(out) | {""}  # the trainer's caption dropout and padding
    known = cached_digests(out, folder)
    todo = sorted((caption_digest(text), text) for text in captions)
    todo = [text for digest, text in todo if digest not in known]
    groups = [todo[i : i + CAPTIONS_PER_SHARD] for i in range(0, len(todo), CAPTIONS_PER_SHARD)]
    tasks = [
        (out, folder, fingerprint([caption_digest(t) for t in group]), group) for group in groups
    ]
    results = (
        map_on_actors(
            TextEncoder,
            (str(checkpoint), settings),
            "encode_group",
            tasks,
            description="text",
            total_items=len(todo),
            items_of=lambda result: result["captions"],
            max_in_flight=max_in_flight,
            unit="caption",
        )
        if tasks
        else []
    )
    names = out.list_names(folder, ".tar")
    index = pa.concat_tables(
        [TEXT_INDEX_SCHEMA.empty_table()]
        + [pq.read_table(out.latent_part(folder, n), filesystem=out.filesystem) for n in names]
    )
    out.write_table(out.path(folder, "index.parquet"), index)
    encoded = sum(result["encoded"] for result in results)
    info = {
        "fingerprint": key,
        "settings": settings,
        "pretrained": str(checkpoint.resolve()),  # the trainer's identity without text parts
        "captions": len(pc.unique(index["caption_digest"])),
        "entries": len(index),
        "path": folder,
    }
    out.write_json(out.path(folder, "text.json"), info)
    stats = out.read_json(out.path("stats.json")) or {}
    stats.setdefault("text", {})[key] = {
        "entries": len(index),
        "encoded": encoded,
        "captions_encoded": len(todo),
    }
    out.write_json(out.path("stats.json"), stats)
    entry = {name: value for name, value in info.items() if name != "fingerprint"}
    updated = dataclasses.replace(manifest, text=manifest.text | {key: entry})
    updated.write(out)
    return updated


def current_text(out: OutputDir) -> dict:
    """The complete text caches that hold every caption of OUT's index (an incremental run
    with new captions leaves a cache out until `--pretrained` adds them)."""
    current, wanted = {}, None
    for name in out.list_folders("text"):
        info = out.read_json(out.path(text_folder(name), "text.json"))
        if not info:
            continue
        if wanted is None:
            wanted = {caption_digest(text) for text in dataset_captions(out)}
        if wanted <= cached_digests(out, text_folder(name)):
            current[name] = {key: value for key, value in info.items() if key != "fingerprint"}
    return current
