"""Prompts (225 tokens, penultimate layer) and hypernetworks, on tiny random SD 1.x models."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.diffusion import load_parts, save_parts, tiny_parts
from trainer.hypernetwork import (
    Hypernetwork,
    HypernetworkConfig,
    cross_attentions,
    from_a1111,
    load,
)
from trainer.prompts import END, START, PromptEncoder, Tokenizer, chunk_tokens
from trainer.sample import sample

REPO = Path(__file__).resolve().parent.parent
LENGTHS = [0, 1, 74, 75, 76, 150, 224, 225, 226, 400]


@pytest.fixture(scope="module")
def parts():
    return tiny_parts(seed=0)


def prompt_of(tokens: int) -> str:
    return " ".join(["cat"] * tokens)  # one CLIP token a word


def test_the_bundled_vocabulary_is_clips():
    tokenizer = Tokenizer()
    assert tokenizer(["a photo of a cat"]) == [[320, 1125, 539, 320, 2368]]
    assert [len(t) for t in tokenizer([prompt_of(n) for n in LENGTHS])] == LENGTHS


@pytest.mark.parametrize("lengths", [[n] for n in LENGTHS] + [LENGTHS, [0, 76], [75, 1, 150]])
def test_chunking_pads_with_end_tokens_and_cuts_at_the_maximum(lengths):
    tokens = [list(range(1000, 1000 + n)) for n in lengths]
    ids = chunk_tokens(tokens, max_tokens=225)
    chunks = max(1, -(-min(max(lengths), 225) // 75))
    assert ids.shape == (len(lengths), chunks, 77)
    assert (ids[:, :, 0] == START).all() and (ids[:, :, 76] == END).all()
    for row, n in zip(ids, lengths, strict=True):
        body = row[:, 1:76].reshape(-1)
        kept = min(n, 225)
        assert body[:kept].tolist() == list(range(1000, 1000 + kept)), "tokens kept in order"
        assert (body[kept:] == END).all(), "padded with end-of-text"


@pytest.mark.parametrize("maximum", [75, 150, 300])
def test_the_maximum_is_a_parameter(maximum):
    assert chunk_tokens([list(range(400))], max_tokens=maximum).shape == (1, maximum // 75, 77)
    with pytest.raises(ValueError, match="multiple of 75"):
        chunk_tokens([[1]], max_tokens=maximum + 1)


def test_a_short_prompt_encodes_as_plain_clip(parts):
    """Up to 75 tokens: exactly CLIP's own 77-token encoding, last layer and penultimate."""
    tokenizer, text_encoder = parts.tokenizer, parts.text_encoder
    tokens = tokenizer([prompt_of(75), "a red dress"])
    plain = torch.full((2, 77), END)
    plain[:, 0] = START
    for row, ids in zip(plain, tokens, strict=True):
        row[1 : 1 + len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        output = text_encoder(plain, output_hidden_states=True)
        last = PromptEncoder(tokenizer, text_encoder, clip_skip=1)([prompt_of(75), "a red dress"])
        assert torch.equal(last, output.last_hidden_state)
        truncated = copy.deepcopy(text_encoder)  # penultimate by hand: drop the last layer
        truncated.encoder.layers = truncated.encoder.layers[:-1]
        penultimate = PromptEncoder(tokenizer, text_encoder, clip_skip=2)
        expected = truncated(plain).last_hidden_state
        assert torch.allclose(penultimate([prompt_of(75), "a red dress"]), expected, atol=1e-6)
        assert not torch.allclose(expected, output.last_hidden_state, atol=1e-3)


def test_long_prompts_concatenate_chunks_and_the_unconditional_prompt_matches(parts):
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder)
    width = parts.text_encoder.config.hidden_size
    for tokens, positions in ((0, 77), (76, 154), (225, 231), (400, 231)):
        states = encoder(["", prompt_of(tokens)])
        assert states.shape == (2, positions, width)
    long, empty = encoder([prompt_of(150)]), encoder([""])
    assert torch.allclose(long[:, 77:], encoder([prompt_of(150)[len("cat ") * 75 :]]), atol=1e-6)
    padded_empty = encoder(["", prompt_of(150)])[0]
    assert torch.allclose(padded_empty[:77], empty[0], atol=1e-6), "each chunk encoded alone"
    trimmed = PromptEncoder(parts.tokenizer, parts.text_encoder, layout="trimmed")
    assert trimmed([prompt_of(225)]).shape[1] == 227
    assert torch.equal(trimmed([prompt_of(225)])[:, 1:76], encoder([prompt_of(225)])[:, 1:76])


def shared_and_per_depth(unet, width: int, penalty=(1.0,)):
    depths = tuple(sorted({depth for _, depth, _ in cross_attentions(unet)}))
    return [
        Hypernetwork(HypernetworkConfig(widths=(width,), per_depth=False)),
        Hypernetwork(HypernetworkConfig(widths=(width,), depths=depths, depth_penalty=penalty)),
    ]


def unet_inputs(parts, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn((batch, 3, 32, 64), generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    context = PromptEncoder(parts.tokenizer, parts.text_encoder)(["a cat"] * batch)
    return pixels, timesteps, context


def test_an_untrained_hypernetwork_leaves_the_unet_bit_identical(parts):
    pixels, timesteps, context = unet_inputs(parts)
    width = parts.text_encoder.config.hidden_size
    with torch.no_grad():
        before = parts.unet(pixels, timesteps, encoder_hidden_states=context).sample
        for hypernetwork in shared_and_per_depth(parts.unet, width):
            handles = hypernetwork.attach(parts.unet)
            after = parts.unet(pixels, timesteps, encoder_hidden_states=context).sample
            for handle in handles:
                handle.remove()
            assert torch.equal(before, after)


def train_hypernetwork(parts, hypernetwork: Hypernetwork, steps: int = 30) -> Hypernetwork:
    unet = copy.deepcopy(parts.unet).requires_grad_(False)
    handles = hypernetwork.attach(unet)
    optimizer = torch.optim.Adam(hypernetwork.parameters(), lr=1e-2)
    for step in range(steps):
        pixels, timesteps, context = unet_inputs(parts, seed=step)
        noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(step))
        prediction = unet(pixels + noise, timesteps, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(prediction, noise) + hypernetwork.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for handle in handles:
        handle.remove()
    return hypernetwork


def test_training_changes_only_cross_attention_key_and_value_inputs(parts):
    width = parts.text_encoder.config.hidden_size
    unet_state = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    hypernetwork = train_hypernetwork(parts, shared_and_per_depth(parts.unet, width)[1], steps=5)
    assert all(torch.equal(v, parts.unet.state_dict()[k]) for k, v in unet_state.items())
    seen: dict[str, torch.Tensor] = {}
    recorders = [
        module.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, args[0])
        )
        for name, module in parts.unet.named_modules()
        if name.endswith(("to_q", "to_k", "to_v"))
    ]
    pixels, timesteps, context = unet_inputs(parts)
    handles = hypernetwork.attach(parts.unet)
    with torch.no_grad():
        parts.unet(pixels, timesteps, encoder_hidden_states=context)
    for handle in handles + recorders:
        handle.remove()
    for name, attention in ((n, m) for n, m in parts.unet.named_modules() if hasattr(m, "to_k")):
        query, key, value = (seen[f"{name}.{p}"] for p in ("to_q", "to_k", "to_v"))
        if attention.is_cross_attention:
            assert not torch.equal(key, context) and not torch.equal(value, context)
            assert not torch.equal(key, value), "k and v have modules of their own"
        else:
            assert torch.equal(key, query) and torch.equal(value, query), "self-attention alone"


def test_the_depth_penalty_holds_back_the_shallow_layers(parts):
    width = parts.text_encoder.config.hidden_size
    shallowest = min(depth for _, depth, _ in cross_attentions(parts.unet))
    penalties = [0.0] * shallowest + [3.0]
    free, held = (
        train_hypernetwork(parts, shared_and_per_depth(parts.unet, width, penalty)[1])
        for penalty in ((), tuple(penalties))
    )

    def norm(hypernetwork: Hypernetwork, depth: int) -> float:
        pair = hypernetwork.pairs[f"{width}@{depth}"]
        return float(sum(p.detach().square().sum() for p in pair.parameters()))

    assert norm(held, shallowest) < 0.5 * norm(free, shallowest)
    deeper = shallowest + 1
    assert norm(held, deeper) > 0.5 * norm(free, deeper), "deeper layers are not held back"


def test_safetensors_and_a1111_round_trips(parts, tmp_path):
    width = parts.text_encoder.config.hidden_size
    shared, per_depth = (
        train_hypernetwork(parts, h, steps=2) for h in shared_and_per_depth(parts.unet, width)
    )
    for hypernetwork, name in ((shared, "h.safetensors"), (per_depth, "h.safetensors"),
                               (shared, "h.pt")):  # fmt: skip
        hypernetwork.save(tmp_path / name)
        loaded = load(tmp_path / name)
        assert loaded.config.per_depth == hypernetwork.config.per_depth
        state, expected = loaded.state_dict(), hypernetwork.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="one pair per width"):
        per_depth.save(tmp_path / "per_depth.pt")


def test_an_a1111_file_as_that_tool_writes_it_loads():
    """AUTOMATIC1111's layout: {width: (k_state, v_state)} plus metadata, tuples and all."""
    config = HypernetworkConfig(
        widths=(768, 320), activation="relu", layer_norm=True, dropout=0.1, per_depth=False
    )
    source = Hypernetwork(config)
    state = {width: tuple(m.state_dict() for m in source.pairs[str(width)]) for width in (768, 320)}
    state.update(
        step=1200, name="anime", layer_structure=[1, 2, 1], activation_func="relu",
        is_layer_norm=True, weight_initialization="Normal", use_dropout=True,
        dropout_structure=[0, 0.1, 0], activate_output=False, last_layer_dropout=False,
        sd_checkpoint="a1b2c3", sd_checkpoint_name="model", optional_info=None,
    )  # fmt: skip
    loaded = from_a1111(state)
    assert loaded.config.widths == (320, 768) and loaded.config.activation == "relu"
    assert [type(layer).__name__ for layer in loaded.pairs["768"][0].linear] == [
        "Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm",
    ]  # fmt: skip
    expected = source.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())


class _Bomb:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_hostile_pt_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as file:
        pickle.dump({768: _Bomb(str(marker)), "name": "evil"}, file)
    with pytest.raises(ValueError, match="refused"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_sampling_with_guidance_and_a_hypernetwork(parts, tmp_path):
    width = parts.text_encoder.config.hidden_size
    hypernetwork = shared_and_per_depth(parts.unet, width)[0]
    images = [
        sample(parts, prompt_of(200), "blurry", 64, 32, steps=3, hypernetwork=h, seed=1)
        for h in (None, hypernetwork)
    ]
    assert images[0].size == (64, 32) and images[0].mode == "RGB"
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1])), "untrained: no change"
    assert all(not h._forward_pre_hooks for _, _, a in cross_attentions(parts.unet)
               for h in (a.to_k, a.to_v)), "hooks removed after sampling"  # fmt: skip


def test_a_local_diffusers_checkpoint_trains_a_hypernetwork_and_samples(tmp_path, prepared):
    """--pretrained on a tiny checkpoint saved here (with a VAE: latents), then the sampler."""
    save_parts(tiny_parts(seed=3, with_vae=True), tmp_path / "sd")
    assert load_parts(tmp_path / "sd").vae is not None
    run = [sys.executable, "trainer/train.py", f"--data={prepared}", "--model=sd",
           f"--pretrained={tmp_path / 'sd'}", f"--out-dir={tmp_path / 'out'}", "--max-steps=3",
           "--num-workers=0", "--hypernetwork-shared"]  # fmt: skip
    subprocess.run(run, cwd=REPO, check=True, timeout=300)
    assert load(tmp_path / "out" / "hypernetwork.pt").config.widths == (32,)
    out = tmp_path / "image.png"
    subprocess.run(
        [sys.executable, "trainer/sample.py", f"--pretrained={tmp_path / 'sd'}", "--prompt=a cat",
         f"--hypernetwork={tmp_path / 'out' / 'hypernetwork.safetensors'}", "--steps=2",
         "--width=64", "--height=32", f"--out={out}"],
        cwd=REPO, check=True, timeout=300,
    )  # fmt: skip
    assert Image.open(out).size == (64, 32)


def test_the_whole_unet_can_be_trained_instead(tmp_path, prepared):
    run = [sys.executable, "trainer/train.py", f"--data={prepared}", "--model=sd",
           "--train-part=unet", f"--out-dir={tmp_path}", "--max-steps=2",
           "--num-workers=0"]  # fmt: skip
    subprocess.run(run, cwd=REPO, check=True, timeout=300)
    before = tiny_parts(seed=0).unet
    after = type(before).from_pretrained(tmp_path / "unet").state_dict()
    before = before.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the U-Net's weights moved"
