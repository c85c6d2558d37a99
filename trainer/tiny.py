"""Tiny random diffusers checkpoints of the four families (sd, sdxl, sd3, flux), built offline
and saved with each pipeline's own `save_pretrained` (model_index.json and all), so that
`DiffusionPipeline.from_pretrained` loads them: CLIP and T5 text encoders of width 32-96 with
tokenizers built from a tiny vocabulary, U-Nets or transformers of one block, 4- or 16-channel
VAEs. Nothing is downloaded; building all four takes a few seconds of CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCABULARY = (
    "a photo of the cat dog girl boy solo long short hair blue red green eyes smile outdoors "
    "indoors sky tree flower dress shirt hat looking at viewer standing sitting highres best "
    "quality masterpiece simple white background"
)
WORDS = VOCABULARY.split()
CLIP_WIDTHS = (32, 48)  # the first and second CLIP: as CLIP-L's 768 and CLIP-G's 1280
T5_WIDTH = 96  # wider than both CLIPs together: SD3 zero-pads CLIP's states to it


def clip_tokenizer(folder: Path, pad: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer over single characters and WORDS (merges spelled out)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789!,.:()-_'"))
    vocab = [*chars, *(c + "</w>" for c in chars)]
    merges = []
    for word in sorted(set(WORDS)):
        piece = word[0]
        for i, char in enumerate(word[1:], 1):
            tail = char + "</w>" if i == len(word) - 1 else char
            merges.append(f"{piece} {tail}")
            piece += tail
            vocab.append(piece)
    vocab = list(dict.fromkeys([*vocab, "<|startoftext|>", "<|endoftext|>"]))
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def t5_tokenizer(folder: Path):
    """A T5 tokenizer (fast, Unigram over WORDS and single characters, `</s>` appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -2.0) for word in sorted(set(WORDS))]
    pieces += [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789!,.:()-_'"]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=model,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def clip_encoder(tokenizer, width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def vae(channels: int, scaling: float = 0.18215, shift: float | None = None):
    """SD's VAE shape in small; SD3's and Flux's latents are also shifted (`shift_factor`)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        scaling_factor=scaling,
        shift_factor=shift,
        block_out_channels=(8, 8),
        latent_channels=channels,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )


def unet(cross: int, pooled: int | None = None):
    from diffusers import UNet2DConditionModel

    added = {}
    if pooled:
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": pooled + 6 * 8,
        }
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=cross,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **added,
    )


def sd_scheduler():
    import diffusers

    return diffusers.DDPMScheduler(steps_offset=1, clip_sample=False)


def build(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny checkpoint of `family` saved by its pipeline into `folder`."""
    import diffusers

    torch.manual_seed(seed)
    scratch = folder.parent / f".{folder.name}-tokenizers"
    first = clip_tokenizer(scratch / "clip")
    parts = {"tokenizer": first}
    if family == "sd":
        parts |= {
            "text_encoder": clip_encoder(first, CLIP_WIDTHS[0], False),
            "vae": vae(4),
            "unet": unet(CLIP_WIDTHS[0]),
            "scheduler": sd_scheduler(),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
        pipeline = diffusers.StableDiffusionPipeline(**parts)
    elif family == "sdxl":
        second = clip_tokenizer(scratch / "clip2", pad="!")
        parts |= {
            "tokenizer_2": second,
            "text_encoder": clip_encoder(first, CLIP_WIDTHS[0], False),
            "text_encoder_2": clip_encoder(second, CLIP_WIDTHS[1], True),
            "vae": vae(4),
            "unet": unet(sum(CLIP_WIDTHS), CLIP_WIDTHS[1]),
            "scheduler": diffusers.EulerDiscreteScheduler(),
        }
        pipeline = diffusers.StableDiffusionXLPipeline(**parts)
    elif family == "sd3":
        second = clip_tokenizer(scratch / "clip2", pad="!")
        t5 = t5_tokenizer(scratch / "t5")
        parts |= {
            "tokenizer_2": second,
            "tokenizer_3": t5,
            "text_encoder": clip_encoder(first, CLIP_WIDTHS[0], True),
            "text_encoder_2": clip_encoder(second, CLIP_WIDTHS[1], True),
            "text_encoder_3": t5_encoder(t5),
            "vae": vae(16, 1.5305, 0.0609),  # SD3's scaling and shift
            "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            "transformer": diffusers.SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=T5_WIDTH,
                caption_projection_dim=32,
                pooled_projection_dim=sum(CLIP_WIDTHS),
                pos_embed_max_size=64,
            ),
        }
        pipeline = diffusers.StableDiffusion3Pipeline(**parts)
    elif family == "flux":
        t5 = t5_tokenizer(scratch / "t5")
        parts |= {
            "tokenizer_2": t5,
            "text_encoder": clip_encoder(first, CLIP_WIDTHS[0], False),
            "text_encoder_2": t5_encoder(t5),
            "vae": vae(16, 0.3611, 0.1159),  # Flux's
            "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(  # Flux.1-dev's
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
            ),
            "transformer": diffusers.FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=T5_WIDTH,
                pooled_projection_dim=CLIP_WIDTHS[0],
                axes_dims_rope=(4, 6, 6),
                guidance_embeds=True,  # as Flux.1-dev's
            ),
        }
        pipeline = diffusers.FluxPipeline(**parts)
    else:
        raise ValueError(family)
    pipeline.save_pretrained(folder)
    return folder
