"""The text cache's bytes per caption against kohya-ss's (np.savez fp32, T5 padded to 512) and
against padding to the max length in our dtype, and the text stage's captions/s.

    python bench/text_bench.py --captions 200 --stage-captions 600

Bytes are computed for the real models' widths (T5-XXL 4096, CLIP-L 768, CLIP-G 1280) from
token counts: CLIP's from the real CLIP vocabulary (instant-clip-tokenizer, what
trainer/prompts.py uses without a checkpoint), T5's approximated from the words (1.3 tokens a
word, a comma its own token, plus </s>: SentencePiece's typical rate on English tags; no T5
vocabulary is installed). Our entries are serialised for real (safetensors of zeros in bf16,
plus the tar member's header and padding). The stage runs on a tiny random flux checkpoint
(tests/checkpoints.py) on 2 CPU actors.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TAGS = (
    "1girl solo long_hair short_hair blue_eyes red_eyes smile open_mouth blush looking_at_viewer "
    "simple_background white_background brown_hair black_hair blonde_hair hat dress shirt skirt "
    "thighhighs gloves bow ribbon holding sitting standing outdoors indoors sky cloud tree "
    "flower day night water jewelry earrings closed_mouth bangs hair_ornament upper_body "
    "full_body from_side cowboy_shot animal_ears twintails ponytail braid sword weapon food "
    "highres absurdres masterpiece best_quality detailed_background depth_of_field"
)
TAG_WORDS = TAGS.split()
PLAIN = "a photo of the cat dog woman man street city old red small sitting on near with"
WORDS = PLAIN.split()
WIDTH = {"t5": 4096, "clip_l": 768, "clip_g": 1280}


def danbooru(rng: random.Random) -> str:
    return ", ".join(t.replace("_", " ") for t in rng.sample(TAG_WORDS, 40))


def short(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(10))


def t5_tokens(text: str, length: int) -> int:
    words = len(text.replace(",", " ").split())
    return min(round(1.3 * words) + text.count(",") + 1, length)


def member_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """A cache entry as stored: its safetensors file in bf16, in a tar member (512-byte header,
    data padded to 512)."""
    import torch
    from safetensors.torch import save

    data = save({name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in shapes.items()})
    return 512 + -(-len(data) // 512) * 512


def kohya_bytes(arrays: dict[str, tuple[int, ...]]) -> int:
    """kohya-ss's cache file: np.savez of fp32 arrays (the data counted, zip headers included)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.zeros(shape, np.float32) for name, shape in arrays.items()})
    return buffer.getbuffer().nbytes


def sizes(text: str, clip_tokens: int) -> dict[str, int]:
    """Bytes of one caption per family and format."""
    chunks = max(1, -(-min(clip_tokens, 225) // 75))
    flux, sd3 = t5_tokens(text, 512), t5_tokens(text, 256)
    clip_sd3 = (77, WIDTH["clip_l"] + WIDTH["clip_g"])
    return {
        "flux ours": member_bytes({"t5": (flux, 4096), "pooled": (768,)}),
        "flux padded bf16": member_bytes({"t5": (512, 4096), "pooled": (768,)}),
        "flux kohya": kohya_bytes({"t5": (512, 4096), "pooled": (768,), "mask": (512,)}),
        "sd3 ours": member_bytes({"clip": clip_sd3, "t5": (sd3, 4096), "pooled": (2048,)}),
        "sd3 padded bf16": member_bytes({"clip": clip_sd3, "t5": (256, 4096), "pooled": (2048,)}),
        "sd3 kohya": kohya_bytes(
            {"l": (77, 768), "g": (77, 1280), "t5": (512, 4096), "lp": (768,), "gp": (1280,)}
        ),
        "sdxl ours": member_bytes({"context": (77 * chunks, 2048), "pooled": (1280,)}),
        "sdxl padded bf16": member_bytes({"context": (231, 2048), "pooled": (1280,)}),
        "sdxl kohya": kohya_bytes(
            {"h1": (77 * chunks, 768), "h2": (77 * chunks, 1280), "pool2": (1280,)}
        ),
    }


def measure_bytes(captions: int, seed: int) -> None:
    import instant_clip_tokenizer

    clip = instant_clip_tokenizer.Tokenizer()
    rng = random.Random(seed)
    for kind, make in (("danbooru, 40 tags", danbooru), ("short, 10 words", short)):
        texts = [make(rng) for _ in range(captions)]
        clip_counts = [len(clip.encode(text)) for text in texts]
        t5_counts = [t5_tokens(text, 512) for text in texts]
        rows = [sizes(t, c) for t, c in zip(texts, clip_counts, strict=True)]
        print(
            f"\n{kind}: CLIP tokens {np.mean(clip_counts):.0f} (real vocabulary), "
            f"T5 tokens ~{np.mean(t5_counts):.0f} (from words)"
        )
        print("| family | ours (bf16, unpadded) | padded to max, bf16 | kohya-ss (fp32, T5 512) |")
        for family in ("flux", "sd3", "sdxl"):
            mean = {
                fmt: np.mean([r[f"{family} {fmt}"] for r in rows]) / 2**20
                for fmt in ("ours", "padded bf16", "kohya")
            }
            print(
                f"| {family} | {mean['ours']:.3f} MiB | {mean['padded bf16']:.3f} MiB "
                f"({mean['padded bf16'] / mean['ours']:.1f}x) | {mean['kohya']:.3f} MiB "
                f"({mean['kohya'] / mean['ours']:.1f}x) |"
            )


def measure_stage(captions: int, seed: int) -> None:
    import pyarrow as pa
    import ray

    sys.path.insert(0, str(REPO / "tests"))
    from pipeline import text_cache
    from pipeline.format import Manifest, OutputDir
    from pipeline.text_cache import add_text, recipe_settings
    from trainer.augment import CaptionOptions
    from trainer.tiny import build

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build("flux", Path(folder) / "flux")
        out = OutputDir(str(Path(folder) / "out"))
        out.filesystem.create_dir(out.root, recursive=True)
        texts = [danbooru(rng) for _ in range(captions)]
        out.write_table(out.path("index.parquet"), pa.table({"caption": texts}))
        Manifest({}, [], {"images": captions}, [], {}, {}).write(out)
        text_cache.CAPTIONS_PER_SHARD = max(1, captions // 8)
        settings = recipe_settings("flux", None, 0, CaptionOptions(), 0, "bf16")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        add_text(out, str(checkpoint), settings)
        seconds = time.perf_counter() - start
        ray.shutdown()
    print(
        f"\ntext stage, tiny flux (T5 width 96, 2 layers; 512 tokens), 2 CPU actors: "
        f"{captions} captions in {seconds:.1f} s = {captions / seconds:.0f} captions/s "
        "(actor start and model load included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=200, help="captions for the bytes")
    parser.add_argument("--stage-captions", type=int, default=600, help="captions for the stage")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    measure_bytes(args.captions, args.seed)
    if args.stage_captions:
        measure_stage(args.stage_captions, args.seed)


if __name__ == "__main__":
    main()
