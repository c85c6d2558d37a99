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
          (sd3 and flux: trainer/flow_prompts.py's PipelineEncoder, the trainer's too)

Captions of one batch are encoded together only where that changes nothing: sd and sdxl batch
captions of the same chunk count (a caption is padded to its own chunks alone); diffusers pads
every caption to the same max length anyway. Shapes are the real models'; the tiny test
checkpoints are narrower.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.flow_prompts import PipelineEncoder


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


RECIPES = {
    "sd": ChunkedRecipe,
    "sdxl": ChunkedRecipe,
    "sd3": PipelineEncoder,
    "flux": PipelineEncoder,
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
