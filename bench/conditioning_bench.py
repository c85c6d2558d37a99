"""The cost of the source's conditioning techniques, each against its baseline in the same run.

    python bench/conditioning_bench.py [--latent 32] [--repeats 3]

1. Hypernetwork overhead: an SD 1.x U-Net (full architecture, random weights) forward, and
   forward+backward, with and without a hypernetwork (per-depth pairs, structure 1,2,1) on its
   cross-attention k/v inputs, with a 225-token (231-state) context.
2. Long prompts: encoding a batch of 225-token prompts (3 chunks) against 75-token ones (1 chunk)
   with CLIP ViT-L/14's text encoder architecture (random weights), penultimate layer.
Medians of `--repeats` timed runs after a warm-up; ratios are what to read (noisy machines).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from trainer.hypernetwork import Hypernetwork, HypernetworkConfig, cross_attentions
from trainer.prompts import END, START, PromptEncoder, Tokenizer


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hypernetwork_overhead(latent: int, repeats: int) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)  # SD 1.x's layout and widths
    depths = tuple(sorted({depth for _, depth, _ in cross_attentions(unet)}))
    hypernetwork = Hypernetwork(HypernetworkConfig(widths=(768,), depths=depths))
    for module in hypernetwork.modules():  # trained-like weights: no shortcut through zeros
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.01)
    latents = torch.randn(1, 4, latent, latent)
    context = torch.randn(1, 231, 768)
    timestep = torch.tensor([500])

    def forward() -> None:
        with torch.no_grad():
            unet(latents, timestep, encoder_hidden_states=context)

    def forward_backward() -> None:
        unet.zero_grad(set_to_none=True)
        hypernetwork.zero_grad(set_to_none=True)
        unet(latents, timestep, encoder_hidden_states=context).sample.square().mean().backward()

    print(
        f"1. U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, "
        f"{latent}x{latent} latents, 231-state context; hypernetwork "
        f"{sum(p.numel() for p in hypernetwork.parameters()) / 1e6:.1f}M:"
    )
    for name, run in (("forward", forward), ("forward+backward", forward_backward)):
        bare = median_seconds(run, repeats)
        handles = hypernetwork.attach(unet)
        hooked = median_seconds(run, repeats)
        for handle in handles:
            handle.remove()
        print(
            f"   {name:17s} bare {bare:6.3f} s, with hypernetwork {hooked:6.3f} s: "
            f"overhead {100 * (hooked / bare - 1):+.1f}%"
        )


def long_prompt_cost(repeats: int, batch: int) -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(  # CLIP ViT-L/14's text tower, as in SD 1.x
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=START,
        eos_token_id=END,
        pad_token_id=END,
    )
    encoder = PromptEncoder(Tokenizer(), CLIPTextModel(config).eval(), 225, 2, "full")
    prompts = {n: [" ".join(["cat"] * n)] * batch for n in (75, 225)}
    seconds = {n: median_seconds(lambda p=p: encoder(p), repeats) for n, p in prompts.items()}
    print(
        f"\n2. encoding {batch} prompts, penultimate layer: 75 tokens {seconds[75]:.3f} s, "
        f"225 tokens {seconds[225]:.3f} s = {seconds[225] / seconds[75]:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    hypernetwork_overhead(args.latent, args.repeats)
    long_prompt_cost(args.repeats, args.prompts)


if __name__ == "__main__":
    main()
