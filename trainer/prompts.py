"""Prompts for a CLIP text encoder the source's way: up to 225 tokens, penultimate layer.

A batch's prompts are tokenised, the longest rounded up to a multiple of 75 tokens (cut at
`max_tokens`), shorter ones padded with CLIP's end-of-text token, and split into 75-token chunks.
Each chunk is encoded separately and the hidden states are concatenated along the sequence.

Layout per chunk, `layout="full"` (the default): every chunk is encoded as CLIP was trained,
[start] + 75 tokens + [end], and all 77 states of every chunk are kept: 77 * n positions, 231 for
225 tokens. It is what the source describes (encode each chunk, concatenate the outputs) and what
AUTOMATIC1111 and NovelAI feed the U-Net at inference, so what is trained here meets the same
context in those tools. `layout="trimmed"` is kohya-ss's: the start and end states of the inner
chunk borders dropped, 75 * n + 2 positions, 227 for 225 tokens.

Prompts encoded in one batch get the same number of chunks: an unconditional prompt encoded
with its prompts (caption dropout in training, classifier-free guidance in sampling) is padded
to their length.

SDXL (`SDXLPromptEncoder`) encodes the same chunks with both its text encoders, as SDXL was
trained: the penultimate layer of each without the final layer norm, concatenated along the
width (768 + 1280 = 2048), and the second encoder's pooled, projected embedding of the first
chunk (the one that holds the prompt's start: what A1111 and kohya-ss pool too). Its second
tokenizer pads with its own pad token ("!"), the first with end-of-text, as diffusers does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

CHUNK_TOKENS = 75  # CLIP's 77 positions less the start and end tokens
START, END = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>


class Tokenizer:
    """CLIP BPE tokens of a text, without start and end tokens.

    The real CLIP vocabulary ships inside `instant-clip-tokenizer` (nothing fetched); a
    checkpoint folder with a `tokenizer/` subfolder (diffusers layout) uses its own instead.
    """

    def __init__(
        self, pretrained: str | Path | None = None, folder: str = "tokenizer", pad: int = END
    ):
        path = Path(pretrained) / folder if pretrained else None
        if path is not None and path.is_dir():
            from transformers import CLIPTokenizer

            clip = CLIPTokenizer.from_pretrained(path, local_files_only=True)
            self._encode = lambda text: clip(text, add_special_tokens=False).input_ids
            self.start, self.end, self.pad = clip.bos_token_id, clip.eos_token_id, clip.pad_token_id
        else:
            import instant_clip_tokenizer

            self._encode = instant_clip_tokenizer.Tokenizer().encode
            self.start, self.end, self.pad = START, END, pad

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [list(self._encode(text)) for text in texts]


def chunk_tokens(
    tokens: list[list[int]],
    max_tokens: int,
    start: int = START,
    end: int = END,
    pad: int | None = None,
) -> np.ndarray:
    """Token ids [B, chunks, 77]: each chunk [start] + 75 tokens (padded) + [end].

    The chunk count is the longest prompt's length rounded up to a multiple of 75, at least one
    chunk and at most `max_tokens` / 75 (a multiple of 75: PromptOptions validates it); longer
    prompts are cut at `max_tokens`. Padding is `pad`, end-of-text by default (CLIP's own).
    """
    longest = min(max((len(t) for t in tokens), default=0), max_tokens)
    chunks = max(1, -(-longest // CHUNK_TOKENS))
    padded = np.full((len(tokens), chunks * CHUNK_TOKENS), end if pad is None else pad, np.int64)
    for row, ids in zip(padded, tokens, strict=True):
        kept = ids[: len(row)]
        row[: len(kept)] = kept
    ids = np.empty((len(tokens), chunks, CHUNK_TOKENS + 2), dtype=np.int64)
    ids[:, :, 0], ids[:, :, -1] = start, end
    ids[:, :, 1:-1] = padded.reshape(len(tokens), chunks, CHUNK_TOKENS)
    return ids


def final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    """The text model's final layer norm (transformers 5 flattened CLIPTextModel; 4 did not)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def encode_chunks(
    text_encoder: nn.Module,
    ids: torch.Tensor,
    clip_skip: int,
    layout: str,
    final_norm: bool = True,
) -> tuple[torch.Tensor, object]:
    """Hidden states [B, positions, width] of token chunks [B, chunks, 77] (see the layout
    above), and the encoder's whole output (for SDXL's pooled embedding).

    `clip_skip` as kohya-ss users know it: 1 is the last layer, 2 the penultimate (the source's),
    with the final layer norm applied (SD 1.x, the source's way) or not (`final_norm=False`:
    SDXL's way). The values are a validated PromptOptions' (trainer/config.py).
    """
    batch, chunks, length = ids.shape
    output = text_encoder(ids.reshape(batch * chunks, length), output_hidden_states=clip_skip > 1)
    if clip_skip == 1:
        states = output.last_hidden_state
    else:
        states = output.hidden_states[-clip_skip]
        states = final_layer_norm(text_encoder)(states) if final_norm else states
    return laid_out(states.reshape(batch, chunks, length, -1), layout), output


def laid_out(states: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, chunks, 77, width] states as the U-Net's context [B, positions, width]."""
    batch, chunks, length = states.shape[:3]
    if layout == "trimmed":  # first chunk's start state, every chunk's tokens, last one's end
        inner = states[:, :, 1:-1].reshape(batch, chunks * (length - 2), -1)
        return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)
    return states.reshape(batch, chunks * length, -1)


class PromptEncoder:
    """Texts to the U-Net's context: tokenise, chunk, encode (frozen text encoder, no grad)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        text_encoder: nn.Module,
        max_tokens: int,
        clip_skip: int,
        layout: str,
    ):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.max_tokens, self.clip_skip, self.layout = max_tokens, clip_skip, layout

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Context [B, positions, width]."""
        tokenizer = self.tokenizer
        ids = chunk_tokens(tokenizer(texts), self.max_tokens, tokenizer.start, tokenizer.end)
        device = next(self.text_encoder.parameters()).device
        ids = torch.from_numpy(ids).to(device)
        return encode_chunks(self.text_encoder, ids, self.clip_skip, self.layout)[0]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, None]:
        """(context, None): SDXLPromptEncoder's shape of result, without a pooled embedding."""
        return self(texts), None


class SDXLPromptEncoder:
    """Texts to SDXL's context and pooled embedding (see the module docstring)."""

    def __init__(
        self,
        tokenizers: tuple[Tokenizer, Tokenizer],
        text_encoders: tuple[nn.Module, nn.Module],
        max_tokens: int,
        clip_skip: int,
        layout: str,
    ):
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.max_tokens, self.clip_skip, self.layout = max_tokens, clip_skip, layout

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, positions, 2048], pooled [B, 1280]) for SDXL-sized encoders."""
        tokens = self.tokenizers[0](texts)  # one vocabulary: SDXL's tokenizers differ in padding
        contexts, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = chunk_tokens(
                tokens, self.max_tokens, tokenizer.start, tokenizer.end, tokenizer.pad
            )
            ids = torch.from_numpy(ids).to(next(encoder.parameters()).device)
            states, output = encode_chunks(encoder, ids, self.clip_skip, self.layout, False)
            contexts.append(states)
            pooled = getattr(output, "text_embeds", None)  # the projection model's
        first_chunk = pooled.reshape(len(texts), -1, pooled.shape[-1])[:, 0]
        return torch.cat(contexts, dim=-1), first_chunk
