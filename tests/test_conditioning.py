"""Prompts (225 tokens, penultimate layer) and hypernetworks, on tiny random SD 1.x models."""

from __future__ import annotations

import copy
import os
import pickle
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from trainer.config import PromptOptions
from trainer.diffusion import load_parts, save_parts, time_ids, tiny_parts
from trainer.hypernetwork import (
    Hypernetwork,
    HypernetworkConfig,
    HypernetworkModule,
    cross_attentions,
    from_a1111,
    load,
)
from trainer.prompts import END, START, PromptEncoder, Tokenizer, chunk_tokens
from trainer.sample import sample
from trainer.sample_config import SampleConfig

REPO = Path(__file__).resolve().parent.parent
LENGTHS = [0, 1, 74, 75, 76, 150, 224, 225, 226, 400]
SOURCE = (225, 2, "full")  # max_tokens, clip_skip, layout: the source's (PromptOptions' defaults)


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
    assert PromptOptions(max_tokens=maximum).max_tokens == maximum
    with pytest.raises(ValueError, match="--max-tokens must be a positive multiple of 75"):
        PromptOptions(max_tokens=maximum + 1)


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
        last_layer = PromptEncoder(tokenizer, text_encoder, 225, 1, "full")
        last = last_layer([prompt_of(75), "a red dress"])
        assert torch.equal(last, output.last_hidden_state)
        truncated = copy.deepcopy(text_encoder)  # penultimate by hand: drop the last layer
        truncated.encoder.layers = truncated.encoder.layers[:-1]
        penultimate = PromptEncoder(tokenizer, text_encoder, *SOURCE)
        expected = truncated(plain).last_hidden_state
        assert torch.allclose(penultimate([prompt_of(75), "a red dress"]), expected, atol=1e-6)
        assert not torch.allclose(expected, output.last_hidden_state, atol=1e-3)


def test_long_prompts_concatenate_chunks_and_the_unconditional_prompt_matches(parts):
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, *SOURCE)
    width = parts.text_encoder.config.hidden_size
    for tokens, positions in ((0, 77), (76, 154), (225, 231), (400, 231)):
        states = encoder(["", prompt_of(tokens)])
        assert states.shape == (2, positions, width)
    long, empty = encoder([prompt_of(150)]), encoder([""])
    assert torch.allclose(long[:, 77:], encoder([prompt_of(150)[len("cat ") * 75 :]]), atol=1e-6)
    padded_empty = encoder(["", prompt_of(150)])[0]
    assert torch.allclose(padded_empty[:77], empty[0], atol=1e-6), "each chunk encoded alone"
    trimmed = PromptEncoder(parts.tokenizer, parts.text_encoder, 225, 2, "trimmed")
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
    context = PromptEncoder(parts.tokenizer, parts.text_encoder, *SOURCE)(["a cat"] * batch)
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
    for hypernetwork, name in (
        (shared, "h.safetensors"),
        (per_depth, "h.safetensors"),
        (shared, "h.pt"),
    ):
        hypernetwork.save(tmp_path / name)
        loaded = load(tmp_path / name)
        assert loaded.config.per_depth == hypernetwork.config.per_depth
        state, expected = loaded.state_dict(), hypernetwork.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="one pair per width"):
        per_depth.save(tmp_path / "per_depth.pt")


def test_saved_hypernetworks_have_the_mode_a_plain_open_gives(parts, tmp_path):
    """Under a umask that 0600 would not match: the files are as readable as any other."""
    hypernetwork = shared_and_per_depth(parts.unet, parts.text_encoder.config.hidden_size)[0]
    umask = os.umask(0o002)
    try:
        (tmp_path / "plain").write_bytes(b"")
        for name in ("h.safetensors", "h.pt"):
            hypernetwork.save(tmp_path / name)
    finally:
        os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(("plain", "h.safetensors", "h.pt"), 0o664)


# AUTOMATIC1111's side, restated from its source (stable-diffusion-webui: HypernetworkModule,
# parse_dropout_structure, Hypernetwork.__init__ / save / load in
# modules/hypernetworks/hypernetwork.py; check_pt and RestrictedUnpickler in modules/safe.py),
# to hold ours against: what it builds from a file, what it writes, what it lets torch.load read.

A1111_ACTIVATIONS = {  # what its activation_dict gives for the names used here
    "relu": nn.ReLU, "tanh": nn.Tanh, "swish": nn.Hardswish, "gelu": nn.GELU, "mish": nn.Mish,
    "prelu": nn.PReLU,
}  # fmt: skip
A1111_OLD_NAMES = {  # fix_old_state_dict: NovelAI's names -> A1111's
    "linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias",
}  # fmt: skip


class A1111Module(nn.Module):
    """Its HypernetworkModule: for each pair of layer_structure entries a Linear; then the
    activation unless there is none ("linear" or None) or this is the last Linear and not
    activate_output; a LayerNorm with add_layer_norm; a Dropout where dropout_structure[i + 1] > 0.
    A state dict has NovelAI's names renamed, then loads strictly."""

    def __init__(
        self,
        dim,
        state,
        layer_structure,
        activation_func,
        add_layer_norm,
        activate_output,
        dropout_structure,
    ):
        super().__init__()
        count = len(layer_structure)
        layers: list[nn.Module] = []
        for i in range(count - 1):
            size_out = int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(int(dim * layer_structure[i]), size_out))
            last = i >= count - 2
            if activation_func not in ("linear", None) and not (last and not activate_output):
                layers.append(A1111_ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(nn.LayerNorm(size_out))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)
        if state is not None:
            for old, new in A1111_OLD_NAMES.items():
                if old in state:
                    state[new] = state.pop(old)
            self.load_state_dict(state)

    def forward(self, x):
        return x + self.linear(x)


def a1111_parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    """Its structure for files without one: 0.3 after each hidden layer but the last; the last
    too with last_layer_dropout (what older releases built from these two flags)."""
    if not use_dropout:
        return [0] * len(layer_structure)
    inner = [0.3] * (len(layer_structure) - 3)
    return [0, *inner, 0.3 if last_layer_dropout else 0, 0]


def a1111_modules(hypernetwork: dict, states=None, seed: int = 0) -> dict:
    """{size: (k, v)} built with its arguments, from `states` or with random weights, eval mode."""
    arguments = [
        hypernetwork[key]
        for key in (
            "layer_structure",
            "activation_func",
            "add_layer_norm",
            "activate_output",
            "dropout_structure",
        )
    ]
    layers = {}
    for size in hypernetwork["sizes"]:
        pair = []
        for i in range(2):
            module = A1111Module(size, states and states[size][i], *arguments)
            pair.append(module if states else randomized(module, seed + 2 * size + i))
        layers[size] = tuple(module.eval() for module in pair)
    return layers


def a1111_save(hypernetwork: dict, layers: dict, path: Path, omit=()) -> None:
    """Its save(): the pairs as tuples of state dicts, then its fields (`omit`: those an older
    release did not write yet); torch.save's default (zip) format."""
    state: dict = {size: tuple(m.state_dict() for m in pair) for size, pair in layers.items()}
    dropout_structure = hypernetwork["dropout_structure"]
    state.update(
        step=120,
        name=hypernetwork["name"],
        layer_structure=hypernetwork["layer_structure"],
        activation_func=hypernetwork["activation_func"],
        is_layer_norm=hypernetwork["add_layer_norm"],
        weight_initialization="Normal",
        sd_checkpoint="a1b2c3",
        sd_checkpoint_name="model",
        activate_output=hypernetwork["activate_output"],
        use_dropout=hypernetwork["use_dropout"],
        dropout_structure=dropout_structure,
        last_layer_dropout=dropout_structure[-2] != 0,
        optional_info=None,
    )
    for key in omit:
        del state[key]
    torch.save(state, path)


def a1111_load(path: Path) -> tuple[dict, dict]:
    """Its load(): (its fields, {size: (k, v)}), defaults as it takes them. (It runs check_pt
    first, which files a1111_save writes here fail: torch 2.13's zip, not its torch's.)"""
    state = torch.load(path, map_location="cpu", weights_only=False)  # as it loads, after the check
    dropout_structure = state.get("dropout_structure", None)
    use_dropout = state.get("use_dropout", False)
    if dropout_structure is not None and any(dropout_structure):
        use_dropout = True
    hypernetwork = {
        "name": state.get("name", path.stem),
        "sizes": [size for size in state if type(size) is int],
        "layer_structure": state.get("layer_structure", [1, 2, 1]),
        "activation_func": state.get("activation_func", None),
        "add_layer_norm": state.get("is_layer_norm", False),
        "use_dropout": use_dropout,
        "activate_output": state.get("activate_output", True),
        "dropout_structure": dropout_structure,
    }
    if dropout_structure is None:
        hypernetwork["dropout_structure"] = a1111_parse_dropout_structure(
            hypernetwork["layer_structure"], use_dropout, state.get("last_layer_dropout", False)
        )
    return hypernetwork, a1111_modules(hypernetwork, state)


A1111_ZIP_MEMBER = re.compile(
    r"[^/]+/(data\.pkl|version|byteorder|\.data/serialization_id|data/\d+)"
)
A1111_GLOBALS = {  # those every release read allows (later ones add a few)
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
    ("torch", "IntStorage"), ("torch", "LongStorage"), ("torch", "DoubleStorage"),
    ("torch", "ByteStorage"), ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("__builtin__", "set"),
}  # fmt: skip


class A1111Unpickler(pickle.Unpickler):
    """Its RestrictedUnpickler: storages come back empty, globals from its list alone."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise ValueError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)


def a1111_check_pt(path: Path) -> None:
    """Its check before every torch.load: a zip may hold only torch's data.pkl, version, byteorder,
    .data/serialization_id and data/N under one folder, and its data.pkl must unpickle
    restrictedly; a file that is no zip (torch's legacy format) must, all five pickles of it."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                if not A1111_ZIP_MEMBER.fullmatch(name):
                    raise ValueError(f"bad file inside {path}: {name}")
            (data,) = [name for name in names if name.endswith("/data.pkl")]
            with archive.open(data) as file:
                A1111Unpickler(file).load()
    except zipfile.BadZipFile:
        with open(path, "rb") as file:
            unpickler = A1111Unpickler(file)
            for _ in range(5):
                unpickler.load()


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (LayerNorms and the last Linear too), so layouts tell in outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


def pairs_of(hypernetwork: Hypernetwork) -> dict:
    return {int(width): tuple(pair) for width, pair in hypernetwork.pairs.items()}


def assert_same_modules(layers: dict, expected: dict) -> None:
    """Same widths, same `linear` layouts, identical outputs, both in eval mode."""
    assert sorted(layers) == sorted(expected)
    for size, pair in expected.items():
        context = torch.randn((2, 5, size), generator=torch.Generator().manual_seed(size))
        for module, reference in zip(layers[size], pair, strict=True):
            assert [type(layer) for layer in module.linear] == [
                type(layer) for layer in reference.linear
            ]
            assert not module.training and not reference.training
            with torch.no_grad():
                assert torch.equal(module(context), reference(context))


def a1111_hypernetwork(
    sizes=(32, 48),
    layer_structure=(1, 2, 1),
    activation_func=None,
    add_layer_norm=False,
    use_dropout=False,
    activate_output=False,
    dropout_structure=None,
    last_layer_dropout=True,
) -> dict:
    """Its Hypernetwork(...) as created (and as older releases built theirs): a dropout_structure
    from use_dropout and last_layer_dropout where none is given."""
    if dropout_structure is None:
        dropout_structure = a1111_parse_dropout_structure(
            layer_structure, use_dropout, last_layer_dropout
        )
    return {
        "name": "theirs",
        "sizes": list(sizes),
        "layer_structure": list(layer_structure),
        "activation_func": activation_func,
        "add_layer_norm": add_layer_norm,
        "use_dropout": use_dropout,
        "activate_output": activate_output,
        "dropout_structure": dropout_structure,
    }


A1111_FILES = {  # id: (how A1111 built it, the fields its release did not write yet)
    "today's": (
        dict(activation_func="relu", add_layer_norm=True, use_dropout=True,
             dropout_structure=[0, 0.1, 0]),
        (),
    ),
    "activated output": (dict(layer_structure=(1, 1.5, 1), activation_func="tanh",
                              activate_output=True), ()),
    "no activate_output field": (dict(activation_func="swish", activate_output=True),
                                 ("activate_output",)),
    "no activate_output field, layer norm": (
        dict(activation_func="relu", add_layer_norm=True, activate_output=True),
        ("activate_output",),
    ),
    "use_dropout, no dropout_structure": (
        dict(layer_structure=(1, 2, 2, 1), activation_func="relu", use_dropout=True,
             last_layer_dropout=False),
        ("dropout_structure",),
    ),
    "use_dropout and last_layer_dropout, no dropout_structure": (
        dict(layer_structure=(1, 2, 2, 1), activation_func="relu", add_layer_norm=True,
             use_dropout=True, last_layer_dropout=True),
        ("dropout_structure",),
    ),
    "dropout after the first hidden layer only": (
        dict(layer_structure=(1, 2, 2, 1), activation_func="relu", add_layer_norm=True,
             use_dropout=True, dropout_structure=[0, 0.3, 0, 0]),
        (),
    ),
    "dropout after the last hidden layer only": (
        dict(layer_structure=(1, 2, 2, 1), activation_func="gelu", use_dropout=True,
             dropout_structure=[0, 0, 0.2, 0]),
        (),
    ),
    "an activation with weights": (dict(activation_func="prelu", activate_output=True), ()),
    "mish, activated output, no fields of today": (
        dict(activation_func="mish", activate_output=True),
        ("activate_output", "dropout_structure", "last_layer_dropout", "use_dropout"),
    ),
}  # fmt: skip


def write_novelai(path: Path, sizes=(32, 48)) -> dict:
    """NovelAI's files: {size: [k_state, v_state]} with `linear1` / `linear2` keys, no fields."""
    hypernetwork = a1111_hypernetwork(sizes)
    layers = a1111_modules(hypernetwork)
    renamed = {new: old for old, new in A1111_OLD_NAMES.items()}
    state = {
        size: [{renamed[key]: t for key, t in m.state_dict().items()} for m in pair]
        for size, pair in layers.items()
    }
    torch.save(state, path)
    return layers


def written_as_a1111_writes(variant: str, path: Path) -> dict:
    if variant == "NovelAI":
        return write_novelai(path)
    arguments, omit = A1111_FILES[variant]
    hypernetwork = a1111_hypernetwork(**arguments)
    layers = a1111_modules(hypernetwork)
    a1111_save(hypernetwork, layers, path, omit)
    return layers


@pytest.mark.parametrize("variant", [*A1111_FILES, "NovelAI"])
def test_a1111_and_novelai_files_read_as_a1111_reads_them_and_come_back(variant, tmp_path):
    """Theirs -> ours (eval mode) -> our .pt -> A1111 (past check_pt) -> its save -> ours: the
    same layouts and outputs at every step, and the same fields as A1111 takes from theirs."""
    theirs = tmp_path / "theirs.pt"
    built = written_as_a1111_writes(variant, theirs)
    their_fields, their_layers = a1111_load(theirs)
    assert_same_modules(their_layers, built)  # the restatement reads its own file back
    ours = load(theirs)
    assert not any(module.training for module in ours.modules())
    assert_same_modules(pairs_of(ours), built)

    ours.save(tmp_path / "mine.pt")
    a1111_check_pt(tmp_path / "mine.pt")
    fields, layers = a1111_load(tmp_path / "mine.pt")
    assert_same_modules(layers, built)
    assert (fields["name"], their_fields["name"]) == ("mine", "theirs")
    no_activation = their_fields["activation_func"] or "linear"  # None and "linear" alike
    assert fields == {**their_fields, "name": "mine", "activation_func": no_activation}
    written = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert written["last_layer_dropout"] == (written["dropout_structure"][-2] != 0)

    a1111_save(fields, layers, tmp_path / "again.pt")
    assert_same_modules(pairs_of(load(tmp_path / "again.pt")), built)


@pytest.mark.parametrize(
    "config",
    [
        HypernetworkConfig(
            widths=(32, 48),
            layer_structure=(1, 2, 2, 1),
            activation="relu",
            layer_norm=True,
            dropout=0.1,
            per_depth=False,
        ),
        HypernetworkConfig(
            widths=(32,),
            layer_structure=(1, 2, 2, 1),
            activation="tanh",
            dropout_structure=(0, 0.3, 0, 0),
            activate_output=True,
            per_depth=False,
        ),
    ],
    ids=["trainer's dropout", "per-layer dropout, activated output"],
)
def test_our_files_load_in_a1111_new_and_old_and_come_back(config, tmp_path):
    ours = randomized(Hypernetwork(config), seed=1).eval()
    ours.save(tmp_path / "mine.pt")
    a1111_check_pt(tmp_path / "mine.pt")
    fields, layers = a1111_load(tmp_path / "mine.pt")
    assert_same_modules(layers, pairs_of(ours))
    assert fields["name"] == "mine"
    state = torch.load(tmp_path / "mine.pt", weights_only=True)
    older = a1111_parse_dropout_structure(  # older releases build from these two flags
        state["layer_structure"], state["use_dropout"], state["last_layer_dropout"]
    )
    old_layers = a1111_modules({**fields, "dropout_structure": older}, state)
    assert_same_modules(old_layers, pairs_of(ours))

    a1111_save(fields, layers, tmp_path / "again.pt")
    assert_same_modules(pairs_of(load(tmp_path / "again.pt")), pairs_of(ours))
    ours.save(tmp_path / "mine.safetensors")
    loaded = load(tmp_path / "mine.safetensors")
    assert loaded.config == config
    assert_same_modules(pairs_of(loaded), pairs_of(ours))


def test_our_pt_passes_a1111s_check_where_torch_saves_zip_does_not(tmp_path):
    """A1111 refuses the zip torch.save writes today (its .format_version, .storage_alignment)."""
    ours = Hypernetwork(HypernetworkConfig(widths=(32,), dropout=0.1, per_depth=False))
    ours.save(tmp_path / "mine.pt")
    a1111_check_pt(tmp_path / "mine.pt")
    if zipfile.is_zipfile(tmp_path / "mine.pt"):
        names = zipfile.ZipFile(tmp_path / "mine.pt").namelist()
        assert all(A1111_ZIP_MEMBER.fullmatch(name) for name in names), names
    torch.save(ours.a1111_state("zip"), tmp_path / "zip.pt")
    with pytest.raises(ValueError, match=r"bad file inside .*zip\.pt: zip/\.format_version"):
        a1111_check_pt(tmp_path / "zip.pt")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"activation_func": "swiglu"}, "activation .*, got swiglu"),
        ({"dropout_structure": [0, 0.3, 0, 0]}, "one entry per layer_structure entry"),
        ({"dropout_structure": [0, 1.0, 0]}, r"not in \[0, 1\)"),
        ({"layer_structure": [2, 1]}, "must start and end with 1"),
    ],
)
def test_what_we_cannot_represent_is_refused_with_what(fields, message):
    module_state = HypernetworkModule(32, HypernetworkConfig()).state_dict()
    state = {32: (module_state, module_state), **fields}
    with pytest.raises(ValueError, match=message):
        from_a1111(state)


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


def render(parts, hypernetwork=None, **settings):
    """sample() on settings of SampleConfig (its `out` is the caller's to write)."""
    return sample(parts, SampleConfig(out="unused.png", **settings), hypernetwork)


def test_sampling_with_guidance_and_a_hypernetwork(parts, tmp_path):
    width = parts.text_encoder.config.hidden_size
    hypernetwork = shared_and_per_depth(parts.unet, width)[0]
    images = [
        render(
            parts, h, prompt=prompt_of(200), negative="blurry", width=64, height=32, steps=3, seed=1
        )
        for h in (None, hypernetwork)
    ]
    assert images[0].size == (64, 32) and images[0].mode == "RGB"
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1])), "untrained: no change"
    assert all(
        not h._forward_pre_hooks
        for _, _, a in cross_attentions(parts.unet)
        for h in (a.to_k, a.to_v)
    ), "hooks removed after sampling"


def test_sampling_renders_a_hypernetwork_in_eval_mode_and_leaves_its_mode(parts):
    width = parts.text_encoder.config.hidden_size
    config = HypernetworkConfig(widths=(width,), dropout=0.5, per_depth=False)
    hypernetwork = randomized(Hypernetwork(config), seed=2)
    images = []
    for training in (True, True, False):
        hypernetwork.train(training)
        image = render(parts, hypernetwork, prompt="a cat", width=64, height=32, steps=2, seed=1)
        images.append(np.asarray(image))
        assert hypernetwork.training == training
    assert all(np.array_equal(images[0], image) for image in images[1:]), "no dropout"


@pytest.mark.slow
def test_a_local_diffusers_checkpoint_trains_a_hypernetwork_and_samples(tmp_path, prepared):
    """--pretrained on a tiny checkpoint saved here (with a VAE: latents), then the sampler."""
    save_parts(tiny_parts(seed=3, with_vae=True), tmp_path / "sd")
    assert load_parts(tmp_path / "sd").vae is not None
    run = [
        sys.executable,
        "trainer/train.py",
        f"--data={prepared}",
        "--model=sd",
        f"--pretrained={tmp_path / 'sd'}",
        f"--out-dir={tmp_path / 'out'}",
        "--max-steps=3",
        "--num-workers=0",
        "--hypernetwork-shared",
    ]
    subprocess.run(run, cwd=REPO, check=True, timeout=300)
    assert load(tmp_path / "out" / "hypernetwork.pt").config.widths == (32,)
    out = tmp_path / "image.png"
    subprocess.run(
        [
            sys.executable,
            "trainer/sample.py",
            f"--pretrained={tmp_path / 'sd'}",
            "--prompt=a cat",
            f"--hypernetwork={tmp_path / 'out' / 'hypernetwork.safetensors'}",
            "--steps=2",
            "--width=64",
            "--height=32",
            f"--out={out}",
        ],
        cwd=REPO,
        check=True,
        timeout=300,
    )
    assert Image.open(out).size == (64, 32)


@pytest.mark.slow
def test_the_whole_unet_can_be_trained_instead(tmp_path, prepared):
    run = [
        sys.executable,
        "trainer/train.py",
        f"--data={prepared}",
        "--model=sd",
        "--train-part=unet",
        f"--out-dir={tmp_path}",
        "--max-steps=2",
        "--num-workers=0",
    ]
    subprocess.run(run, cwd=REPO, check=True, timeout=300)
    before = tiny_parts(seed=0).unet
    after = type(before).from_pretrained(tmp_path / "unet").state_dict()
    before = before.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the U-Net's weights moved"


@pytest.fixture(scope="module")
def xl_parts():
    return tiny_parts(seed=1, xl=True)


def xl_inputs(parts, original=(64, 128), crop=(0, 0), batch: int = 2):
    """A U-Net call's inputs for SDXL: its context and added embeddings from two prompts."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn((batch, 3, 32, 64), generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    context, pooled = parts.prompt_encoder(*SOURCE).encode(["a cat, " + prompt_of(100)] * batch)
    sizes = [torch.tensor([size] * batch) for size in (original, crop, (32, 64))]
    added = {"text_embeds": pooled, "time_ids": time_ids(*sizes)}
    return pixels, timesteps, context, added


def test_sdxl_context_is_both_penultimate_layers_and_the_second_encoders_pooled_first_chunk(
    xl_parts,
):
    texts = ["a cat, " + prompt_of(100), "a dog"]
    context, pooled = xl_parts.prompt_encoder(*SOURCE).encode(texts)
    first = PromptEncoder(xl_parts.tokenizer, xl_parts.text_encoder, *SOURCE)  # end-padded, norm
    assert context.shape == (2, 2 * 77, 64) and pooled.shape == (2, 32)
    with torch.no_grad():
        ids = torch.from_numpy(chunk_tokens(Tokenizer()(texts[1:]), 225)[:, :1])
        states = xl_parts.text_encoder(ids[:, 0], output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(context[1:, :77, :32], states, atol=1e-5), "no final layer norm"
        assert not torch.allclose(context[1:, :77, :32], first(texts[1:])[:, :77], atol=1e-3)
        second = Tokenizer(pad=0)
        ids2 = chunk_tokens(second(texts[:1]), 225, second.start, second.end, second.pad)
        assert ids2[0, 1, -2] == 0, "the second tokenizer pads with '!'"
        output = xl_parts.text_encoder_2(torch.from_numpy(ids2[:, 0]))
        assert torch.allclose(pooled[:1], output.text_embeds, atol=1e-5), "the first chunk's"


def test_sdxl_hears_its_time_ids_and_an_untrained_hypernetwork_changes_nothing(xl_parts):
    unet = xl_parts.unet
    pixels, timesteps, context, added = xl_inputs(xl_parts)
    with torch.no_grad():
        before = unet(pixels, timesteps, encoder_hidden_states=context, added_cond_kwargs=added)
        other = xl_inputs(xl_parts, original=(512, 1024), crop=(16, 0))[3]
        moved = unet(pixels, timesteps, encoder_hidden_states=context, added_cond_kwargs=other)
        assert not torch.allclose(before.sample, moved.sample), "size and crop conditioning"
        width = unet.config.cross_attention_dim
        assert width == 64, "both encoders' widths"
        for hypernetwork in shared_and_per_depth(unet, width):
            handles = hypernetwork.attach(unet)
            after = unet(pixels, timesteps, encoder_hidden_states=context, added_cond_kwargs=added)
            for handle in handles:
                handle.remove()
            assert torch.equal(before.sample, after.sample)


@pytest.mark.slow
def test_a_tiny_sdxl_checkpoint_trains_a_hypernetwork_and_samples(tmp_path, prepared):
    """SDXL from --pretrained: trained from the batches' conditioning, then rendered."""
    save_parts(tiny_parts(seed=4, xl=True), tmp_path / "sdxl")
    assert load_parts(tmp_path / "sdxl").xl
    run = [
        sys.executable,
        "trainer/train.py",
        f"--data={prepared}",
        "--model=sdxl",
        f"--pretrained={tmp_path / 'sdxl'}",
        f"--out-dir={tmp_path / 'out'}",
        "--max-steps=3",
        "--num-workers=0",
        "--flip=0.5",
    ]
    subprocess.run(run, cwd=REPO, check=True, timeout=300)
    assert load(tmp_path / "out" / "hypernetwork.safetensors").config.widths == (64,)
    elsewhere = f"--out-dir={tmp_path / 'other'}"
    refused = subprocess.run(
        [*run[:3], "--model=sd", *run[4:5], elsewhere, *run[6:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "--model sdxl" in refused.stderr
    assert "Traceback" not in refused.stderr
    out = tmp_path / "image.png"
    subprocess.run(
        [
            sys.executable,
            "trainer/sample.py",
            f"--pretrained={tmp_path / 'sdxl'}",
            "--prompt=a cat",
            f"--hypernetwork={tmp_path / 'out' / 'hypernetwork.safetensors'}",
            "--steps=2",
            "--width=64",
            "--height=32",
            "--original-size=64,128",
            f"--out={out}",
        ],
        cwd=REPO,
        check=True,
        timeout=300,
    )
    assert Image.open(out).size == (64, 32)
