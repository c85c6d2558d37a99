"""The trainer's side of the text cache (pipeline/text_cache.py): which cache a run reads, each
image's entry, read by loader workers and padded per batch, and the model's conditioning from it.

    --text-cache auto   the cache of --pretrained's text encoders when every dataset holds one
                        that fits this run (else the encoders encode each step, as without)
    --text-cache on     required: a UsageError, before any rank trains, names what is there
    --text-cache off    never

A cache fits (`unfit` says why not) when it is of this `--model`'s recipe with this run's
`--clip-skip`, at least its `--max-tokens` (the first chunks of a longer cut are the shorter
cut's: CLIP encodes each 75-token chunk alone), in the `full` layout (the `trimmed` layout is a
selection of its rows) -- for sd3 and flux, of this run's `--max-sequence-length` (T5 sees the
whole sequence at once: no other length's rows are this one's) --, and holds what the tag
options ask: with `--shuffle-tags` or `--tag-dropout`, variants made with the same shuffle,
dropout and `--keep-tokens` (their seed may differ: the variants are N draws of the same
augmentation, and the run's seed picks among them); without, the captions themselves (no
variants, or variants of inactive tag options, of which variant 0 is taken). It must be of the
run's checkpoint: of its fingerprint (`text_fingerprint`) where `--pretrained` holds the
recipe's `text_encoder*/` and `tokenizer*/`; where it lacks any of them (removed to save disk:
the point of the cache), of the same `--pretrained` path (text.json's `pretrained`, both
resolved): the weights are not there to tell, so the path recorded when the cache was made
stands for them. A cache that lacks the empty caption (written before every cache had it) is
refused: rerun `arb-prepare --pretrained` to add it. With several `--data`, each needs a fitting
cache (under `auto`, one without means none is used). `--validation-prompt` needs the text
encoders: `auto` then encodes, `on` refuses. A checkpoint without its text encoders and no
fitting cache is refused under `auto` too: it cannot encode.

Padding (sd, sdxl). The encoders pad a batch's captions to its longest chunk count with chunks of
end-of-text (the first tokenizer) or pad (SDXL's second) tokens, each chunk encoded alone: such a
chunk's states are the empty caption's entry, a chunk of its own. So a batch pads each cached
entry with the empty caption's states up to the batch's longest, and equals encoding the batch,
for mixed lengths too, within the cache's dtype. Caption dropout (in the model's forward, the
same draw as when encoding) takes the empty caption's entry, and the batch is cut to its longest
kept caption, as encoding the kept captions pads them.

Variants: image `key` takes variant `pick_variant(seed, epoch, key, N)` of its caption; repeats
of an image in one epoch (a --data weight over 1) share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.errors import UsageError
from pipeline.format import (
    CHUNKED,
    FAMILY_PARTS,
    MAX_SEQUENCE_LENGTH,
    Manifest,
    caption_digest,
    pick_variant,
    text_fingerprint,
)
from trainer.augment import CaptionOptions
from trainer.storage import DatasetFiles, FileRef

CHUNK_ROWS = 77  # states of a 75-token chunk: [start] + 75 + [end]
TAG_FIELDS = ("shuffle_tags", "keep_tokens", "tag_dropout")  # CaptionOptions' fields
SEQUENCES = ("context", "t5")  # an entry's tensor of the caption's length (sequence_length)


class TextEntry(NamedTuple):
    """One cached text: where its safetensors bytes lie, and the text it is."""

    file: FileRef
    offset: int
    size: int
    text: str


class CachedText(NamedTuple):
    """A batch's cached text-encoder outputs: `tensors` by the recipe's names, each [B, ...],
    those of varying length (`context`) padded with the empty caption's rows to the longest;
    `rows`, each caption's own rows of them [B]; `empty`, the empty caption's tensors."""

    tensors: dict
    rows: object  # torch int64 [B]
    empty: dict

    def to(self, device) -> CachedText:
        moved = {name: t.to(device, non_blocking=True) for name, t in self.tensors.items()}
        empty = {name: t.to(device, non_blocking=True) for name, t in self.empty.items()}
        return CachedText(moved, self.rows, empty)


@dataclass(frozen=True)
class Wanted:
    """What this run would encode: the cache's settings it needs, and its checkpoint."""

    family: str
    max_tokens: int
    clip_skip: int
    max_sequence_length: int  # sd3, flux
    tags: CaptionOptions
    pretrained: Path
    has_parts: bool  # the checkpoint holds the recipe's text parts: fingerprints are compared
    can_encode: bool  # it holds the text encoders (the trainer's fallback tokenizer does without)

    def describe(self) -> str:
        tags = ", ".join(f"{name} {getattr(self.tags, name)}" for name in TAG_FIELDS)
        variants = f"variants with {tags}" if self.tags.active else "the captions (no tags)"
        identity = "by its text encoders' fingerprint" if self.has_parts else "by its path"
        if not self.can_encode:
            identity += ": it lacks the text encoders, so it cannot encode either"
        if self.family in MAX_SEQUENCE_LENGTH:
            shape = f"max_sequence_length {self.max_sequence_length}"
        else:
            shape = f"max_tokens >= {self.max_tokens}, clip_skip {self.clip_skip}"
        return f"family {self.family}, {shape}, {variants}, of {self.pretrained} ({identity})"


def wanted(config) -> Wanted:
    """A trainer Config's `Wanted`."""
    folder = Path(config.pretrained).expanduser()
    parts = FAMILY_PARTS[config.model]
    tags = CaptionOptions(**{name: getattr(config, name) for name in TAG_FIELDS})
    has = {part: (folder / part).is_dir() for part in parts}
    encoders = all(there for part, there in has.items() if part.startswith("text_encoder"))
    length = config.max_sequence_length or MAX_SEQUENCE_LENGTH.get(config.model, 0)
    options = (config.max_tokens, config.clip_skip, length, tags)
    return Wanted(config.model, *options, folder, all(has.values()), encoders)


def unfit(info: dict, key: str, want: Wanted, fingerprints: dict) -> str | None:
    """Why the cache `key` (its manifest entry `info`) does not fit `want`; None when it does.
    `fingerprints` memoizes the checkpoint's fingerprint per settings (its files are hashed)."""
    settings = info["settings"]
    if settings["family"] != want.family:
        return f"family {settings['family']}"
    if want.family in MAX_SEQUENCE_LENGTH:  # T5 is bidirectional: only its own length fits
        if settings["max_sequence_length"] != want.max_sequence_length:
            return f"max_sequence_length {settings['max_sequence_length']}"
    elif settings.get("layout") != CHUNKED["layout"] or settings["clip_skip"] != want.clip_skip:
        return f"clip_skip {settings['clip_skip']}, layout {settings.get('layout')}"
    elif settings["max_tokens"] < want.max_tokens:
        return f"max_tokens {settings['max_tokens']}"
    cached = CaptionOptions(**{name: settings[name] for name in TAG_FIELDS if name in settings})
    tagged = bool(settings["variants"]) and cached.active
    if want.tags.active and (not tagged or cached != want.tags):
        return "no variants" if not tagged else f"variants of other tags ({cached})"
    if not want.tags.active and tagged:
        return f"tag-augmented variants ({cached})"
    if want.has_parts:
        frozen = repr(sorted(settings.items()))
        if frozen not in fingerprints:
            parts = FAMILY_PARTS[want.family]
            fingerprints[frozen] = text_fingerprint(str(want.pretrained), parts, settings)
        if fingerprints[frozen] != key:
            return f"another checkpoint's text encoders ({info['pretrained']})"
    elif Path(info["pretrained"]).expanduser().resolve() != want.pretrained.resolve():
        return f"another checkpoint ({info['pretrained']})"
    return None


def text_cache_to_use(config, manifests: list[Manifest]) -> tuple[str, ...] | None:
    """Per dataset, the text cache to read, as --text-cache says; None: encode each step."""
    choice = config.text_cache
    if choice == "off":
        return None
    needs = None
    if config.model not in FAMILY_PARTS:
        needs = "--model sd, sdxl, sd3 or flux"
    elif not config.pretrained:
        needs = "--pretrained (the checkpoint the cache was made from)"
    elif config.validation_prompt:
        needs = "no --validation-prompt (validation renders with the text encoders)"
    if needs:
        if choice == "on":
            raise UsageError(f"--text-cache on needs {needs}")
        return None
    want, fingerprints, chosen = wanted(config), {}, []
    for spec, manifest in zip(config.data, manifests, strict=True):
        reasons = {key: unfit(info, key, want, fingerprints) for key, info in manifest.text.items()}
        fitting = sorted(key for key, reason in reasons.items() if reason is None)
        if fitting:
            chosen.append(fitting[0])
            continue
        if choice == "auto" and want.can_encode:
            return None
        held = "; ".join(
            f"{key}: {info['settings']} of {info['pretrained']}: {reasons[key]}"
            for key, info in manifest.text.items()
        )
        raise UsageError(  # under auto too where the checkpoint has no text encoders to encode
            f"--text-cache {choice}: --data {spec} holds no text cache for this run, which wants "
            f"{want.describe()}; it holds: {held or 'none'}. Make one with arb-prepare "
            f"--output {spec} --model {want.family} --pretrained {want.pretrained} (and the "
            "run's tag options with --caption-variants), or give --text-cache off"
        )
    return tuple(chosen)


class TextEntries:
    """One dataset's text cache, as the sampler looks entries up: its index sorted by (caption
    digest, variant), in the trainer's process (loader workers get entries by offset)."""

    def __init__(self, files: DatasetFiles, info: dict):
        table = files.parquet(f"{info['path']}/index.parquet").read(
            columns=["caption_digest", "variant", "text", "text_shard", "text_offset", "text_size"]
        )
        table = table.sort_by([("caption_digest", "ascending"), ("variant", "ascending")])
        self.digests = np.asarray(table["caption_digest"].to_pylist())
        self.variants = table["variant"].to_numpy()
        self.texts = table["text"]
        shards = table["text_shard"].combine_chunks().dictionary_encode()
        self.paths = [FileRef(files, name) for name in shards.dictionary.to_pylist()]
        self.shard = shards.indices.to_numpy()
        self.offset, self.size = table["text_offset"].to_numpy(), table["text_size"].to_numpy()
        settings = info["settings"]
        tags = CaptionOptions(**{name: settings[name] for name in TAG_FIELDS if name in settings})
        self.count = settings["variants"] if tags.active else 1  # variants picked among (fits:
        # the run's tags are active exactly when the cache's are)
        if self._first(caption_digest("")) is None:
            raise UsageError(
                f"{files.uri}'s text cache {info['path']} lacks the empty caption (caption "
                f"dropout and padding need it): rerun arb-prepare --output {files.uri} "
                f"--model {settings['family']} --pretrained {info['pretrained']} to add it"
            )

    def _first(self, digest: str) -> int | None:
        row = int(np.searchsorted(self.digests, digest))
        return row if row < len(self.digests) and self.digests[row] == digest else None

    def _entry(self, row: int) -> TextEntry:
        file = self.paths[self.shard[row]]
        return TextEntry(file, int(self.offset[row]), int(self.size[row]), self.texts[row].as_py())

    def entries(self, captions: list[str], keys: list[str], seed: int, epoch: int) -> list:
        """Each image's entry: variant `pick_variant(seed, epoch, key, N)` of its caption."""
        picked = []
        for text, key in zip(captions, keys, strict=True):
            first = self._first(caption_digest(text))
            if first is None:
                raise ValueError(f"the text cache lacks the caption {text!r}")
            row = first + pick_variant(seed, epoch, key, self.count) * bool(text)
            assert self.digests[row] == self.digests[first], "a variant the cache lacks"
            picked.append(self._entry(row))
        return picked

    def empty(self) -> TextEntry:
        return self._entry(self._first(caption_digest("")))


def read_entries(read, entries: list[TextEntry], empty: TextEntry) -> CachedText:
    """A loader worker's batch of cached entries (`read(file, offset, size)` gives bytes), as
    `stacked` pads them."""
    from safetensors.torch import load

    loaded = [load(read(e.file, e.offset, e.size)) for e in entries]
    return stacked(loaded, load(read(empty.file, empty.offset, empty.size)))


def stacked(loaded: list[dict], blank: dict) -> CachedText:
    """Entries' tensors stacked, those of varying rows padded to the batch's longest: sd/sdxl's
    `context` with the empty caption's rows (the module docstring says why), sd3/flux's `t5`
    with zeros (trainer/flow_prompts.py pads them so anyway). `blank`: the empty caption's."""
    import torch

    (sequence,) = [name for name in SEQUENCES if name in blank]
    rows = torch.tensor([len(tensors[sequence]) for tensors in loaded])
    tensors = {}
    for name, fill in blank.items():
        longest = max(len(entry[name]) for entry in loaded)
        if fill.dim() == 2 and any(len(entry[name]) < longest for entry in loaded):
            if name == "t5":
                fill = fill.new_zeros(longest, fill.shape[1])  # on the entries' device
            else:
                fill = fill.repeat(-(-longest // len(fill)), 1)[:longest]
            parts = [torch.cat([entry[name], fill[len(entry[name]) :]]) for entry in loaded]
        else:
            parts = [entry[name] for entry in loaded]
        tensors[name] = torch.stack(parts)
    return CachedText(tensors, rows, blank)


def chunked_conditioning(text: CachedText, dropped, max_tokens: int, layout: str):
    """(context [B, positions, width], pooled [B, width] or None) for sd/sdxl's U-Net from a
    batch's cached entries: dropped captions take the empty caption's, each caption cut at
    `max_tokens` (its first chunks), the batch cut to its longest kept caption's chunks, and
    laid out as trainer/prompts.py lays them out."""
    import torch

    from trainer.prompts import CHUNK_TOKENS, laid_out

    context, empty = text.tensors["context"].float(), text.empty["context"].float()
    dropped = dropped.to(context.device)
    rows = torch.where(dropped.cpu(), len(empty), text.rows)
    longest = min(int(rows.max()), max_tokens // CHUNK_TOKENS * CHUNK_ROWS)
    fill = empty.repeat(longest // len(empty), 1)
    context = torch.where(dropped[:, None, None], fill, context[:, :longest])
    states = context.reshape(len(context), longest // CHUNK_ROWS, CHUNK_ROWS, -1)
    pooled = text.tensors.get("pooled")
    if pooled is not None:
        pooled = torch.where(dropped[:, None], text.empty["pooled"].float(), pooled.float())
    return laid_out(states, layout), pooled
