"""SD3's and Flux's prompts: what their diffusers pipeline's `encode_prompt` gives, kept to each
caption's real T5 tokens (what the text cache stores: pipeline/text_encoders.py uses this
encoder), and the transformer's conditioning from a batch of such entries, cached or not.

The conditioning pads every caption's T5 rows with zeros to `--max-sequence-length`, as
SimpleTuner's `--t5_padding zero`: a caption's conditioning is then its own, whatever the batch,
and the same from the cache and from the encoders (diffusers' pipelines encode the pad tokens
too; the transformer sees that length either way). SD3's CLIP states (77 rows) are zero-padded
to T5's width and put first, as its `encode_prompt` does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional


class PipelineEncoder:
    """sd3 and flux: the diffusers pipeline's own encode_prompt, on its text parts alone."""

    def __init__(
        self, folder: Path, settings: dict, device: torch.device, dtype: torch.dtype | None = None
    ):
        """`dtype`: the encoders' weights as loaded (None: as saved, fp32 in diffusers' files)."""
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        self.family = settings["family"]
        self.length = settings["max_sequence_length"]
        kind = StableDiffusion3Pipeline if self.family == "sd3" else FluxPipeline
        unused = dict.fromkeys(("transformer", "vae", "scheduler"))
        self.pipeline = kind.from_pretrained(
            folder, **unused, torch_dtype=dtype, local_files_only=True
        ).to(device)
        self.t5_tokenizer = (
            self.pipeline.tokenizer_3 if self.family == "sd3" else self.pipeline.tokenizer_2
        )

    def encoders(self) -> list[torch.nn.Module]:
        """Its text encoders (a model moves them with itself and keeps them frozen)."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [getattr(self.pipeline, name) for name in names if hasattr(self.pipeline, name)]

    def real_tokens(self, texts: list[str]) -> list[int]:
        """The T5 tokens encode_prompt keeps of each text (</s> included): its attention mask."""
        masks = self.t5_tokenizer(
            texts, padding="max_length", max_length=self.length, truncation=True
        ).attention_mask
        return [sum(mask) for mask in masks]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[tuple[dict[str, torch.Tensor], int]]:
        """Per text: ({"clip" (sd3), "t5", "pooled"}, its real T5 tokens)."""
        pipeline, lengths = self.pipeline, self.real_tokens(texts)
        if self.family == "sd3":
            embeds, _, pooled, _ = pipeline.encode_prompt(
                texts,
                None,
                None,
                device=self.pipeline.text_encoder.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.length,
            )
            clip_rows = pipeline.tokenizer_max_length
            width = pipeline.text_encoder.config.hidden_size
            width += pipeline.text_encoder_2.config.hidden_size
            clip, t5 = embeds[:, :clip_rows, :width], embeds[:, clip_rows:]
        else:
            t5, pooled, _ = pipeline.encode_prompt(
                texts,
                None,
                device=self.pipeline.text_encoder.device,
                max_sequence_length=self.length,
            )
            clip = None
        results = []
        for row, length in enumerate(lengths):
            tensors = {"t5": t5[row, :length], "pooled": pooled[row]}
            if clip is not None:
                tensors["clip"] = clip[row]
            results.append((tensors, length))
        return results


def flow_conditioning(text, dropped: torch.Tensor, length: int):
    """(encoder_hidden_states [B, (77 +) length, width], pooled [B, width]) from a batch's
    entries (a trainer.text_cache.CachedText, T5 rows zero-padded to the batch's longest):
    dropped captions take the empty caption's."""
    tensors, empty = text.tensors, text.empty
    kept = ~dropped.to(tensors["t5"].device)

    def pick(values: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
        return torch.where(kept.view(-1, *[1] * (values.dim() - 1)), values, blank)

    context = pick(_rows(tensors["t5"], length), _rows(empty["t5"][None], length))
    if "clip" in tensors:  # sd3: CLIP's states first, zero-padded to T5's width
        clip = pick(tensors["clip"].float(), empty["clip"].float())
        clip = functional.pad(clip, (0, context.shape[-1] - clip.shape[-1]))
        context = torch.cat([clip, context], dim=1)
    return context, pick(tensors["pooled"].float(), empty["pooled"].float())


def _rows(t5: torch.Tensor, length: int) -> torch.Tensor:
    """[B, rows, W] cut or zero-padded to [B, length, W], as float."""
    t5 = t5[:, :length].float()
    return functional.pad(t5, (0, 0, 0, length - t5.shape[1]))
