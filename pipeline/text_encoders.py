"""The text stage's encoders, torch side: each family's recipe turns captions into the tensors
the text cache stores, unpadded (imported by the stage's Ray actors alone).

    sd    context [77 * chunks, 768]: CLIP's penultimate layer with the final layer norm, the
          caption's own 75-token chunks up to 225 tokens (trainer/prompts.py's PromptEncoder)
    sdxl  context [77 * chunks, 2048]: both encoders' penultimate layers, no final norm; pooled
          [1280], the second's projection of the first chunk (SDXLPromptEncoder)
    sd3   clip [77, 2048] and pooled [2048] as StableDiffusion3Pipeline.encode_prompt gives
          them (before it zero-pads clip to T5's width), t5 [tokens, 4096]: its T5 rows of the
          caption's real tokens (</s> included) out of the max-length sequence it encodes
    flux  t5 [tokens, 4096] and pooled [768], as FluxPipeline.encode_prompt gives them

Captions of one batch are encoded together only where that changes nothing: sd and sdxl batch
captions of the same chunk count (a caption is padded to its own chunks alone); diffusers pads
every caption to the same max length anyway. Shapes are the real models'; the tiny test
checkpoints are narrower.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ChunkedRecipe:
    """sd and sdxl: trainer/prompts.py's encoders, a batch per chunk count."""

    def __init__(self, folder: Path, settings: dict, device: torch.device):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from trainer.prompts import PromptEncoder, SDXLPromptEncoder, Tokenizer

        local = {"local_files_only": True}
        first = CLIPTextModel.from_pretrained(folder / "text_encoder", **local)
        options = [settings[name] for name in ("max_tokens", "clip_skip", "layout")]
        self.tokenizer = Tokenizer(folder, "tokenizer")
        if settings["family"] == "sdxl":
            second = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **local)
            encoders = (first.to(device).eval(), second.to(device).eval())
            tokenizers = (self.tokenizer, Tokenizer(folder, "tokenizer_2"))
            self.encoder = SDXLPromptEncoder(tokenizers, encoders, *options)
        else:
            self.encoder = PromptEncoder(self.tokenizer, first.to(device).eval(), *options)
        self.max_tokens = settings["max_tokens"]

    def encode(self, texts: list[str]) -> list[tuple[dict[str, torch.Tensor], int]]:
        """Per text: ({"context", and "pooled" for sdxl}, its real token count)."""
        tokens = [min(len(ids), self.max_tokens) for ids in self.tokenizer(texts)]
        chunks = [max(1, -(-count // 75)) for count in tokens]
        results: list = [None] * len(texts)
        for count in sorted(set(chunks)):
            chosen = [i for i, c in enumerate(chunks) if c == count]
            context, pooled = self.encoder.encode([texts[i] for i in chosen])
            for row, i in enumerate(chosen):
                tensors = {"context": context[row]}
                if pooled is not None:
                    tensors["pooled"] = pooled[row]
                results[i] = (tensors, tokens[i])
        return results


class PipelineRecipe:
    """sd3 and flux: the diffusers pipeline's own encode_prompt, on its text parts alone."""

    def __init__(self, folder: Path, settings: dict, device: torch.device):
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        self.family, self.device = settings["family"], device
        self.length = settings["max_sequence_length"]
        kind = StableDiffusion3Pipeline if self.family == "sd3" else FluxPipeline
        unused = dict.fromkeys(("transformer", "vae", "scheduler"))
        self.pipeline = kind.from_pretrained(folder, **unused, local_files_only=True).to(device)
        self.t5_tokenizer = (
            self.pipeline.tokenizer_3 if self.family == "sd3" else self.pipeline.tokenizer_2
        )

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
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.length,
            )
            clip_rows = pipeline.tokenizer_max_length
            width = pipeline.text_encoder.config.hidden_size
            width += pipeline.text_encoder_2.config.hidden_size
            clip, t5 = embeds[:, :clip_rows, :width], embeds[:, clip_rows:]
        else:
            t5, pooled, _ = pipeline.encode_prompt(
                texts, None, device=self.device, max_sequence_length=self.length
            )
            clip = None
        results = []
        for row, length in enumerate(lengths):
            tensors = {"t5": t5[row, :length], "pooled": pooled[row]}
            if clip is not None:
                tensors["clip"] = clip[row]
            results.append((tensors, length))
        return results


RECIPES = {
    "sd": ChunkedRecipe,
    "sdxl": ChunkedRecipe,
    "sd3": PipelineRecipe,
    "flux": PipelineRecipe,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def recipe(folder: str | Path, settings: dict, device: str = "cpu"):
    """The encoder of `settings["family"]` on the checkpoint `folder`."""
    return RECIPES[settings["family"]](Path(folder), settings, torch.device(device))


def serialized(tensors: dict[str, torch.Tensor], dtype: str) -> bytes:
    """One entry's tensors as a safetensors file, in `dtype` (bf16 or fp16)."""
    from safetensors.torch import save

    kind = DTYPES[dtype]
    return save({name: t.detach().to("cpu", kind).contiguous() for name, t in tensors.items()})
