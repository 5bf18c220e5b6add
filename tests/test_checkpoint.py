"""Checkpoints: model files and PEFT adapter folders (minilora.interop: model_files,
peft_adapters, peft_config, safetensors_files).

What is promised, and tested here:

* round trips are exact (bitwise equal logits), and two saves are byte-identical;
* the files are what PEFT writes and reads (keys, shapes, adapter_config.json fields);
* a truncated, corrupt or mismatched file raises ValueError naming the file and every
  problem found, never another exception, and leaves the model bitwise untouched;
* a save that fails midway leaves the previous file byte-identical and no temporary files.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from helpers import TINY_2x2, join, make_gpt, snapshot, split
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend
from minilora.interop import hf_gpt2, peft_adapters, safetensors_files
from minilora.interop.model_files import load_model, save_model
from minilora.interop.peft_adapters import load_adapter, save_adapter
from minilora.interop.peft_config import SAVED_CONFIG_KEY
from minilora.lora import lora_layers, merge_lora
from minilora.relatives import adapters, prefix

IDX = np.array([[1, 2, 3, 4], [7, 0, 5, 6]], dtype=np.int64)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


# TINY_2x2 cut to one layer: the adapter-format tests name blocks.0 as "every layer"
CONFIG = dataclasses.replace(TINY_2x2, n_layer=1)
tiny_gpt = functools.partial(make_gpt, CONFIG)  # tiny_gpt(seed, dtype, **changes)


def logits(model) -> np.ndarray:
    model.eval()
    with ml.no_grad():
        return backend.to_numpy(model(IDX)[0].data).copy()


def train_lora(model, config: ml.LoRAConfig, steps: int = 3):
    """apply_lora and a few AdamW steps, so that B (and trained biases) move off zero."""
    ml.apply_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ml.AdamW(params, lr=1e-2)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        idx = rng.integers(0, CONFIG.vocab_size, size=(2, 4))
        _, loss = model(idx, targets=np.roll(idx, -1, axis=1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# A trained adapter and a saved model, made once per module (tests copy what they change).


@pytest.fixture(scope="module")
def lora_config():
    return ml.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def trained(lora_config):
    """(base model, trained LoRA model), the base an untouched deep copy."""
    base = tiny_gpt(seed=1)
    return base, train_lora(copy.deepcopy(base), lora_config)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, trained, lora_config) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(trained[1], folder, lora_config)
    return folder


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(tiny_gpt(seed=2), path)
    return path.read_bytes()


def write_adapter(folder: Path, tensors: dict | bytes, config: dict | str) -> Path:
    """A hand-made adapter folder (tensors as a dict of arrays, or raw file bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tensors, bytes):
        (folder / "adapter_model.safetensors").write_bytes(tensors)
    else:
        safetensors.numpy.save_file(tensors, folder / "adapter_model.safetensors")
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "adapter_config.json").write_text(text)
    return folder


def adapter_parts(adapter_dir: Path) -> tuple[dict, dict]:
    tensors = safetensors.numpy.load_file(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return tensors, config


# --------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [backend.float32, backend.float64])
def test_save_load_model_round_trip_gives_bitwise_identical_logits(tmp_path, dtype):
    model = tiny_gpt(seed=3, dtype=dtype, bias=False)
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.tok_emb.weight.dtype == dtype
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, arr in model.state_dict().items():
        assert np.array_equal(loaded.state_dict()[name], arr), name
    np.testing.assert_array_equal(logits(loaded), logits(model))


def test_loading_a_float16_model_says_what_it_computes_in(tmp_path, recwarn):
    save_model(tiny_gpt(seed=3, dtype=backend.float32), tmp_path / "f32.safetensors")
    load_model(tmp_path / "f32.safetensors")
    assert not recwarn.list  # float32: nothing to say
    save_model(tiny_gpt(seed=3, dtype=backend.float16), tmp_path / "f16.safetensors")
    with pytest.warns(
        UserWarning,
        match=r"f16.safetensors holds float16 weights: .* computes in "
        r"float16, with layer norm, softmax and the loss in float32",
    ) as info:
        loaded = load_model(tmp_path / "f16.safetensors")
    assert len(info) == 1 and info[0].filename == __file__  # one line, about the caller's line
    assert loaded.tok_emb.weight.dtype == backend.float16


def test_model_file_holds_every_parameter_and_the_config(tmp_path):
    model = tiny_gpt()
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    header, _ = split(path.read_bytes())
    meta = header["__metadata__"]
    assert meta["format"] == "minilora.model" and meta["format_version"] == "1"
    # GPTConfig's fields, and the config's class: null for a plain GPT ("gpt2": hf_gpt2)
    assert json.loads(meta["config"]) == {**model.config.to_dict(), "hf_model_type": None}
    params = dict(model.named_parameters())
    assert tensor_names(header) == sorted(params)
    for name, p in params.items():
        assert header[name]["dtype"] == "F32" and tuple(header[name]["shape"]) == p.shape


def test_two_saves_of_the_same_model_are_byte_identical(tmp_path):
    # safetensors keeps __metadata__ in a Rust HashMap: without the canonical header
    # the key order (and so the bytes) changes from save to save.
    model = tiny_gpt()
    for i in range(5):
        save_model(model, tmp_path / f"{i}.safetensors")
    first = (tmp_path / "0.safetensors").read_bytes()
    assert all((tmp_path / f"{i}.safetensors").read_bytes() == first for i in range(1, 5))


def test_save_model_refuses_a_lora_model_and_says_what_to_do(tmp_path, trained):
    with pytest.raises(ValueError, match="merge_and_unload") as info:
        save_model(trained[1], tmp_path / "m.safetensors")
    assert "save_adapter" in str(info.value) and "q_proj" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_merged_and_unloaded_model_saves_and_loads_exactly(tmp_path, trained):
    merged = ml.merge_and_unload(copy.deepcopy(trained[1]))
    save_model(merged, tmp_path / "m.safetensors")
    np.testing.assert_array_equal(logits(load_model(tmp_path / "m.safetensors")), logits(merged))


def test_load_model_rejects_an_unknown_device(tmp_path):
    save_model(tiny_gpt(), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="tpu"):
        load_model(tmp_path / "m.safetensors", device="tpu")


def test_save_model_rejects_a_non_gpt_and_a_folder_destination(tmp_path):
    with pytest.raises(TypeError, match="GPT"):
        save_model(ml.Linear(2, 2), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="folder"):
        save_model(tiny_gpt(), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_model(tiny_gpt(), tmp_path / "nowhere" / "m.safetensors")


@pytest.mark.parametrize(
    "attach, words",
    [
        (
            lambda m: adapters.apply_adapters(m, adapters.AdapterConfig("lin", bottleneck=2)),
            ["AdapterLinear at blocks.0.mlp.fc2", "adapters.save_adapters"],
        ),
        (
            lambda m: prefix.apply_prefix_tuning(m, prefix.PrefixConfig(num_virtual_tokens=2)),
            ["PrefixEncoder at prefix", "prefix.save_prefix"],
        ),
    ],
    ids=["adapters", "prefix"],
)
def test_save_model_refuses_a_model_that_load_model_could_not_rebuild(tmp_path, attach, words):
    """Adapter layers or a prefix would be written beside the weights, and load_model would
    then refuse the file: save_model refuses first, naming the layers and what to use."""
    model = tiny_gpt()
    attach(model)
    with pytest.raises(ValueError, match="a plain GPT does not") as info:
        save_model(model, tmp_path / "m.safetensors")
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "m.safetensors").exists()


def test_missing_paths_raise_file_not_found_naming_them(tmp_path, adapter_dir):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        load_adapter(tiny_gpt(), tmp_path / "no_folder")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        folder = tmp_path / f"without_{name}"
        folder.mkdir()
        other = ({"adapter_config.json", "adapter_model.safetensors"} - {name}).pop()
        (folder / other).write_bytes((adapter_dir / other).read_bytes())
        with pytest.raises(FileNotFoundError, match=name):
            load_adapter(tiny_gpt(), folder)


def test_a_folder_for_a_file_and_a_file_for_a_folder_are_refused(tmp_path, adapter_dir):
    with pytest.raises(ValueError, match="use load_adapter"):
        load_model(adapter_dir)
    with pytest.raises(ValueError, match="expected a folder"):
        load_adapter(tiny_gpt(), adapter_dir / "adapter_model.safetensors")


def test_a_pickle_adapter_is_never_loaded(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_adapter(tiny_gpt(), folder)


# --------------------------------------------------------------------------------------
# Model files: refused cleanly
# --------------------------------------------------------------------------------------


def meta_edit(key, value):
    def edit(header):
        if value is None:
            del header["__metadata__"][key]
        else:
            header["__metadata__"][key] = value

    return edit


def config_edit(**changes):
    def edit(header):
        config = json.loads(header["__metadata__"]["config"])
        config.update(changes)
        header["__metadata__"]["config"] = json.dumps(config)

    return edit


MODEL_EDITS = {
    "no metadata": (lambda h: h.pop("__metadata__"), "format"),
    "other format": (meta_edit("format", "pt"), "not a minilora model"),
    "newer version": (meta_edit("format_version", "2"), "format_version"),
    "no config": (meta_edit("config", None), "config"),
    "config not json": (meta_edit("config", "{vocab_size: 8"), "not valid JSON"),
    "config a list": (meta_edit("config", "[8, 4]"), "JSON object"),
    "config unknown key": (config_edit(n_kv_heads=2), "n_kv_heads"),
    "config bad value": (config_edit(n_head=3), "n_head"),
    "config wrong vocab": (config_edit(vocab_size=9), "tok_emb.weight"),
    "config wrong layers": (config_edit(n_layer=3), "n_layer=3"),
    # must fail on the shapes, before trying to build a model with 10**6-wide layers
    "config huge": (config_edit(n_embd=10**6, n_head=1), "tok_emb.weight"),
    "config vs bias": (config_edit(bias=False), "unexpected keys"),
    "missing tensor": (lambda h: h.pop("ln_f.weight"), "invalid|not a valid"),
}


@pytest.mark.parametrize("edit, message", MODEL_EDITS.values(), ids=MODEL_EDITS.keys())
def test_load_model_refuses_bad_metadata_naming_the_file_and_problem(
    tmp_path, model_bytes, edit, message
):
    header, body = split(model_bytes)
    edit(header)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(join(header, body))
    with pytest.raises(ValueError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_load_model_refuses_mixed_and_unsupported_dtypes(tmp_path, model_bytes):
    header, body = split(model_bytes)
    name = tensor_names(header)[0]
    for dtype, message in (("I32", "dtype minilora does not use"), ("U32", "I32|U32")):
        header[name]["dtype"] = dtype
        path = tmp_path / f"{dtype}.safetensors"
        path.write_bytes(join(header, body))
        with pytest.raises(ValueError, match=message):
            load_model(path)
    tensors = safetensors.numpy.load(model_bytes)
    tensors["ln_f.bias"] = tensors["ln_f.bias"].astype(np.float64)
    path = tmp_path / "mixed.safetensors"
    path.write_bytes(safetensors_files.serialize(tensors, split(model_bytes)[0]["__metadata__"]))
    with pytest.raises(ValueError, match="mixes dtypes"):
        load_model(path)


def assert_value_error_naming(fn, path: Path):
    """fn() raises ValueError mentioning the path; any other exception fails the test."""
    with pytest.raises(ValueError) as info:
        fn()
    assert str(path) in str(info.value)


@given(data=st.binary(max_size=200))
def test_load_model_refuses_random_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "random.safetensors"
        path.write_bytes(data)
        assert_value_error_naming(lambda: load_model(path), path)


@given(data=st.binary(min_size=1, max_size=64), n=st.integers(0, 2**64 - 1))
def test_load_model_refuses_random_bytes_behind_a_length_prefix(data, n):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "random.safetensors"
        path.write_bytes(struct.pack("<Q", n) + data)
        assert_value_error_naming(lambda: load_model(path), path)


TRUNCATIONS = [
    "empty",
    "inside the length prefix",
    "length prefix only",
    "inside the header",
    "header without its last byte",
    "header only",
    "inside the data",
    "last byte missing",
]


def truncate(data: bytes, kind: str) -> bytes:
    """A valid file cut short in one of the places a crash or a short copy can cut it."""
    n = struct.unpack("<Q", data[:8])[0]
    length = {
        "empty": 0,
        "inside the length prefix": 5,
        "length prefix only": 8,
        "inside the header": 8 + n // 2,
        "header without its last byte": 8 + n - 1,
        "header only": 8 + n,
        "inside the data": 8 + n + (len(data) - 8 - n) // 2,
        "last byte missing": len(data) - 1,
    }[kind]
    return data[:length]


@pytest.mark.parametrize("kind", TRUNCATIONS)
def test_load_model_refuses_each_kind_of_truncation(tmp_path, model_bytes, kind):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(truncate(model_bytes, kind))
    assert_value_error_naming(lambda: load_model(path), path)


@given(fraction=st.floats(0, 1, exclude_max=True))
def test_load_model_refuses_any_truncation(model_bytes, fraction):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "truncated.safetensors"
        path.write_bytes(model_bytes[: int(fraction * len(model_bytes))])
        assert_value_error_naming(lambda: load_model(path), path)


@given(st.data())
def test_load_model_with_a_flipped_header_byte_loads_or_raises_value_error(model_bytes, data):
    # Some flips give a valid file (a space turned into a tab, n_head=2 into 4): those may
    # load. Everything else must be a ValueError naming the file, never another exception.
    n = struct.unpack("<Q", model_bytes[:8])[0]
    pos = data.draw(st.integers(8, 8 + n - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="xor")
    mutated = bytearray(model_bytes)
    mutated[pos] ^= mask
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "flipped.safetensors"
        path.write_bytes(bytes(mutated))
        try:
            load_model(path)
        except ValueError as e:
            assert str(path) in str(e)


def shape_changes(shape: list) -> list:
    """Shapes other than ``shape`` with the same number of elements (so the data still
    tiles the buffer and only minilora's own checks can catch them)."""
    size = int(np.prod(shape))
    candidates = [[size], shape[::-1], [*shape, 1], [1, *shape], [size, 1]]
    return [c for c in candidates if c != shape]


OTHER_DTYPES = ["F64", "F16", "BF16", "I32", "U32", "I64", "BOOL", "U8", "F8_E4M3", "XX", ""]


@st.composite
def header_mutations(draw, data: bytes):
    """(description, mutated bytes): a changed shape, dtype, offsets or length prefix."""
    header, body = split(data)
    name = draw(st.sampled_from(tensor_names(header)), label="tensor")
    entry = header[name]
    kind = draw(st.sampled_from(["shape", "dtype", "offsets", "length prefix"]))
    if kind == "shape":
        entry["shape"] = draw(st.sampled_from(shape_changes(entry["shape"])))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(OTHER_DTYPES))
    elif kind == "offsets":
        begin, end = entry["data_offsets"]
        shifted = [[begin + 4, end + 4], [begin, end - 4], [end, begin], [0, 0], [-4, end]]
        huge = [[0, 2**64 - 1], [begin, 2**63]]
        malformed = [[begin, end, 0], [begin], "0:4"]
        entry["data_offsets"] = draw(st.sampled_from(shifted + huge + malformed))
    out = join(header, body)
    if kind == "length prefix":
        n = struct.unpack("<Q", out[:8])[0]
        wrong = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, len(out), 2**63, 2**64 - 1]))
        out = struct.pack("<Q", wrong) + out[8:]
    return f"{kind} of {name}", out


@given(st.data())
def test_load_model_refuses_changed_shapes_dtypes_offsets_and_lengths(model_bytes, data):
    _, mutated = data.draw(header_mutations(model_bytes))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mutated.safetensors"
        path.write_bytes(mutated)
        assert_value_error_naming(lambda: load_model(path), path)


# --------------------------------------------------------------------------------------
# Adapters: round trip and format
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_adapter_round_trip_into_a_fresh_base_gives_identical_logits(tmp_path, bias):
    config = ml.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], bias=bias)
    base = tiny_gpt(seed=4)
    model = train_lora(copy.deepcopy(base), config)
    assert all(np.any(layer.lora_B.data != 0) for _, layer in lora_layers(model))
    save_adapter(model, tmp_path / "adapter", config)

    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path / "adapter") == config
    np.testing.assert_array_equal(logits(fresh), logits(model))
    assert not np.array_equal(logits(fresh), logits(base))  # the adapter did something
    trainable = {k for k, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {k for k, p in model.named_parameters() if p.requires_grad}


def test_adapter_files_have_peft_keys_shapes_and_config(adapter_dir, trained, lora_config):
    tensors, config = adapter_parts(adapter_dir)
    expected = {}
    for i in range(CONFIG.n_layer):
        for path in (f"blocks.{i}.attn.q_proj", f"blocks.{i}.attn.v_proj"):
            expected[f"base_model.model.{path}.lora_A.weight"] = (2, 8)  # (r, in)
            expected[f"base_model.model.{path}.lora_B.weight"] = (8, 2)  # (out, r)
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in tensors.values())
    layer = trained[1].get_submodule("blocks.0.attn.q_proj")
    np.testing.assert_array_equal(
        tensors["base_model.model.blocks.0.attn.q_proj.lora_B.weight"], layer.lora_B.data
    )
    assert config == {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": "gaussian",
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": False,
        "task_type": None,
        "base_model_name_or_path": None,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "trainable_token_indices": None,
    }
    header, body = split((adapter_dir / "adapter_model.safetensors").read_bytes())
    # "format": "pt" is what PEFT writes; the checksum is that of the data section (every
    # byte after the header); the config is the one saved with the weights
    assert header["__metadata__"] == {
        "format": "pt",
        safetensors_files.DATA_SHA256_KEY: hashlib.sha256(body).hexdigest(),
        SAVED_CONFIG_KEY: json.dumps(config, sort_keys=True),
    }


def test_kaiming_init_is_written_as_peft_true_and_read_back(tmp_path):
    config = ml.LoRAConfig(r=2, target_modules=["v_proj"], init_lora_weights="kaiming")
    model = tiny_gpt()
    ml.apply_lora(model, config)
    save_adapter(model, tmp_path / "a", config)
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True
    assert load_adapter(tiny_gpt(), tmp_path / "a").init_lora_weights == "kaiming"


def test_adapter_bias_keys_follow_config_bias(tmp_path):
    # "lora_only": each block's fc1; "all": per block ln1, q/k/v/o, ln2, fc1, fc2, then ln_f
    L = CONFIG.n_layer
    for bias, count in (("lora_only", L), ("all", 8 * L + 1)):
        config = ml.LoRAConfig(r=2, target_modules=["fc1"], bias=bias)
        model = tiny_gpt()
        ml.apply_lora(model, config)
        save_adapter(model, tmp_path / bias, config)
        tensors, _ = adapter_parts(tmp_path / bias)
        biases = sorted(k for k in tensors if k.endswith(".bias"))
        # PEFT keeps an adapted layer's own bias under base_layer (its wrapper holds the Linear)
        assert len(biases) == count
        assert "base_model.model.blocks.0.mlp.fc1.base_layer.bias" in biases


def test_adapted_layer_bias_loads_with_or_without_base_layer(tmp_path):
    """PEFT writes ``<path>.base_layer.bias``; older minilora files wrote ``<path>.bias``:
    both load, and a file with both is refused rather than loaded in some order."""
    config = ml.LoRAConfig(r=2, target_modules=["fc1"], bias="lora_only")
    model = tiny_gpt()
    ml.apply_lora(model, config)
    model.get_submodule("blocks.0.mlp.fc1").bias.data[...] = 0.5
    save_adapter(model, tmp_path / "new", config)
    tensors, cfg = adapter_parts(tmp_path / "new")
    new_key = "base_model.model.blocks.0.mlp.fc1.base_layer.bias"
    old_key = "base_model.model.blocks.0.mlp.fc1.bias"
    old = {(old_key if k == new_key else k): v for k, v in tensors.items()}
    for folder in (tmp_path / "new", write_adapter(tmp_path / "old", old, cfg)):
        loaded = tiny_gpt()
        load_adapter(loaded, folder)
        assert (loaded.get_submodule("blocks.0.mlp.fc1").bias.data == 0.5).all()
    both = write_adapter(tmp_path / "both", {**tensors, old_key: tensors[new_key]}, cfg)
    assert_refused(tiny_gpt(), both, "blocks.0.mlp.fc1.bias is given twice")


def test_two_adapter_saves_are_byte_identical(tmp_path, trained, lora_config):
    save_adapter(trained[1], tmp_path / "a", lora_config)
    save_adapter(trained[1], tmp_path / "b", lora_config)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_adapter_loads_into_a_float64_model_cast_to_its_dtype(adapter_dir, trained):
    model = tiny_gpt(seed=1, dtype=backend.float64)
    load_adapter(model, adapter_dir)
    q = model.get_submodule("blocks.0.attn.q_proj")
    assert q.lora_A.dtype == np.float64
    trained_q = trained[1].get_submodule("blocks.0.attn.q_proj")
    np.testing.assert_array_equal(q.lora_B.data, trained_q.lora_B.data.astype(np.float64))


def test_adapter_loads_into_a_model_with_matching_lora_layers(adapter_dir, trained, lora_config):
    model = copy.deepcopy(trained[0])
    ml.apply_lora(model, lora_config)
    load_adapter(model, adapter_dir)
    np.testing.assert_array_equal(logits(model), logits(trained[1]))


def test_harmless_and_unset_config_keys_are_accepted_and_string_targets_accepted(
    tmp_path, adapter_dir
):
    tensors, config = adapter_parts(adapter_dir)
    tensors = {k: v for k, v in tensors.items() if "q_proj" in k}
    # known harmless whatever their value (init-only, bookkeeping), or unknown but unset
    harmless = {"eva_config": {"x": 1}, "peft_version": "0.21.2", "megatron_core": "m.core"}
    unset = {"megatron_config": None, "future_option": [], "lora_bias": False}
    config.update(target_modules="q_proj", **harmless, **unset)
    for key in ("use_dora", "rank_pattern", "lora_dropout", "init_lora_weights"):
        del config[key]  # optional: PEFT's defaults apply
    loaded = load_adapter(tiny_gpt(), write_adapter(tmp_path / "a", tensors, config))
    assert loaded.target_modules == ["q_proj"] and loaded.init_lora_weights == "kaiming"


# --------------------------------------------------------------------------------------
# Adapters: refused, the model untouched
# --------------------------------------------------------------------------------------


def assert_refused(model, folder: Path, *messages: str):
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, folder)
    text = str(info.value)
    assert str(folder) in text
    for message in messages:
        assert message in text, f"{message!r} not in:\n{text}"
    assert snapshot(model) == before
    return text


def test_every_key_and_shape_problem_is_listed_in_one_error(tmp_path, adapter_dir):
    tensors, config = adapter_parts(adapter_dir)
    p = "base_model.model.blocks.0."
    del tensors[p + "attn.q_proj.lora_A.weight"]  # missing
    tensors[p + "attn.k_proj.lora_A.weight"] = np.zeros((2, 8), np.float32)  # unexpected
    tensors["model.blocks.0.attn.q_proj.lora_B.weight"] = np.zeros((8, 2), np.float32)
    tensors[p + "attn.v_proj.lora_B.weight"] = np.zeros((8, 3), np.float32)  # r disagrees
    tensors[p + "attn.v_proj.lora_A.weight"] = np.zeros((2, 5), np.float32)  # wrong in
    folder = write_adapter(tmp_path / "bad", tensors, config)
    model = tiny_gpt(seed=1)
    assert_refused(
        model,
        folder,
        "missing key 'base_model.model.blocks.0.attn.q_proj.lora_A.weight'",
        "unexpected key 'base_model.model.blocks.0.attn.k_proj.lora_A.weight'",
        "unexpected key 'model.blocks.0.attn.q_proj.lora_B.weight'",
        "config says r=2 but lora_B for blocks.0.attn.v_proj has shape (8, 3)",
        "lora_A for blocks.0.attn.v_proj has shape (2, 5), expected (2, 8)",
        "nothing was changed",
    )
    assert not lora_layers(model)  # no LoRA layers were added


def test_config_r_disagreeing_with_the_tensors_is_refused(tmp_path, adapter_dir):
    tensors, config = adapter_parts(adapter_dir)
    config["r"] = 4
    folder = write_adapter(tmp_path / "r4", tensors, config)
    model = tiny_gpt(seed=1)
    assert_refused(
        model,
        folder,
        "config says r=4 but lora_A for blocks.0.attn.q_proj has shape (2, 8)",
        "config says r=4 but lora_B for blocks.0.attn.v_proj has shape (8, 2)",
    )
    assert not lora_layers(model)


def test_bias_keys_missing_or_extra_for_config_bias_are_refused(tmp_path, adapter_dir):
    tensors, config = adapter_parts(adapter_dir)
    config["bias"] = "lora_only"
    folder = write_adapter(tmp_path / "nobias", tensors, config)
    assert_refused(
        tiny_gpt(), folder, "missing key 'base_model.model.blocks.0.attn.q_proj.base_layer.bias'"
    )
    config["bias"] = "none"
    tensors["base_model.model.ln_f.bias"] = np.zeros(8, np.float32)
    folder = write_adapter(tmp_path / "extra", tensors, config)
    assert_refused(tiny_gpt(), folder, "unexpected key 'base_model.model.ln_f.bias'")


def test_a_model_with_other_lora_layers_is_refused(tmp_path, adapter_dir):
    other_r = tiny_gpt()
    ml.apply_lora(other_r, ml.LoRAConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert_refused(other_r, adapter_dir, "config says r=2 but the LoRA layer blocks.0.attn.q_proj")
    other_targets = tiny_gpt()
    ml.apply_lora(other_targets, ml.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert_refused(other_targets, adapter_dir, "blocks.0.attn.v_proj")
    merged = tiny_gpt()
    ml.apply_lora(merged, ml.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    merge_lora(merged)
    assert_refused(merged, adapter_dir, "merged")


def test_targets_the_model_lacks_or_a_rank_too_large_are_refused(tmp_path, adapter_dir):
    tensors, config = adapter_parts(adapter_dir)
    folder = write_adapter(tmp_path / "c", tensors, {**config, "target_modules": ["qkv"]})
    model = tiny_gpt()
    assert_refused(model, folder, "['qkv'] match no Linear", "available names")
    assert not lora_layers(model)
    folder = write_adapter(tmp_path / "r", tensors, {**config, "r": 9})
    assert_refused(model, folder, "config says r=9 but lora_A for blocks.0.attn.q_proj")


BAD_CONFIGS = {
    "other peft type": ({"peft_type": "LOHA"}, "peft_type='LOHA'"),
    "r zero": ({"r": 0}, "r=0"),
    "r a string": ({"r": "2"}, "r='2'"),
    "r a bool": ({"r": True}, "r=True"),
    "no r": ({"r": None}, "r is missing"),
    "no alpha": ({"lora_alpha": None}, "lora_alpha is missing"),
    "alpha negative": ({"lora_alpha": -1}, "lora_alpha=-1"),
    "alpha infinite": ({"lora_alpha": float("inf")}, "lora_alpha=inf"),
    "no targets": ({"target_modules": None}, "target_modules is missing"),
    "targets not names": ({"target_modules": [1]}, "target_modules=[1]"),
    "empty targets": ({"target_modules": []}, "target_modules=[]"),
    "dora not bool": ({"use_dora": "yes"}, "use_dora='yes'"),
    "fan in fan out": ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    "rank pattern not a dict": ({"rank_pattern": ["q_proj", 4]}, "rank_pattern=['q_proj', 4]"),
    "rank pattern not a rank": ({"rank_pattern": {"q_proj": 0}}, "rank_pattern={'q_proj': 0}"),
    "modules to save": ({"modules_to_save": "lm_head"}, "modules_to_save='lm_head' must be a list"),
    "olora init": ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    "bias mode": ({"bias": "some"}, "bias='some'"),
    "dropout": ({"lora_dropout": 1.5}, "lora_dropout=1.5"),
    "rslora not bool": ({"use_rslora": "yes"}, "use_rslora='yes'"),
}


@pytest.mark.parametrize("change, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_adapter_config_is_refused_naming_the_field(tmp_path, adapter_dir, change, message):
    tensors, config = adapter_parts(adapter_dir)
    folder = write_adapter(tmp_path / "a", tensors, {**config, **change})
    model = tiny_gpt()
    text = assert_refused(model, folder, message)
    assert "adapter_config.json" in text
    assert not lora_layers(model)


# PEFT options that change what an adapter computes: refused unless minilora implements
# them, naming the option (activated LoRA applied to every token differed by 38%).
SET_OPTIONS = {
    "alora_invocation_tokens": [1, 2],
    "target_parameters": ["blocks.0.mlp.fc1.weight"],
    "use_bdlora": {"block_size": 2},
    "layer_replication": [[0, 1]],
    "use_qalora": True,
    "megatron_config": {"tensor_parallel": 2},
    "ensure_weight_tying": True,
    "an_option_of_a_future_peft": 1,
}


@pytest.mark.parametrize("key, value", SET_OPTIONS.items(), ids=SET_OPTIONS.keys())
def test_an_option_minilora_does_not_implement_is_refused_naming_it(
    tmp_path, adapter_dir, key, value
):
    tensors, config = adapter_parts(adapter_dir)
    folder = write_adapter(tmp_path / "a", tensors, {**config, key: value})
    model = tiny_gpt()
    assert_refused(model, folder, f"{key}={value!r} is not supported by minilora")
    assert not lora_layers(model)


def test_exclude_modules_leaves_a_target_out_as_peft_does(tmp_path, adapter_dir):
    """PEFT's exclude_modules (a list of names, or a regular expression matched in full):
    the excluded layer gets no LoRA layer, and the file must not hold its adapter."""
    tensors, config = adapter_parts(adapter_dir)
    kept = {k: v for k, v in tensors.items() if "blocks.0.attn.v_proj" not in k}
    for exclude in (["blocks.0.attn.v_proj"], r"blocks\.0\.attn\.v.*"):
        folder = write_adapter(
            tmp_path / str(len(exclude)), kept, {**config, "exclude_modules": exclude}
        )
        model = tiny_gpt()
        load_adapter(model, folder)
        assert [p for p, _ in lora_layers(model)] == ["blocks.0.attn.q_proj"]
    folder = write_adapter(tmp_path / "all", tensors, {**config, "exclude_modules": ["v_proj"]})
    assert_refused(tiny_gpt(), folder, "unexpected key 'base_model.model.blocks.0.attn.v_proj")


def load_changed(tmp_path, adapter_dir, trained, tensors=None, **changes) -> ml.LoRAConfig:
    """Load the adapter with its config changed into a copy of the base, and check that
    the logits are the trained model's."""
    original, config = adapter_parts(adapter_dir)
    folder = write_adapter(
        tmp_path / "a", original if tensors is None else tensors, {**config, **changes}
    )
    model = copy.deepcopy(trained[0])
    loaded = load_adapter(model, folder)
    np.testing.assert_array_equal(logits(model), logits(trained[1]))
    return loaded


PLAIN_LORA = {
    "init false": {"init_lora_weights": False},
    "init orthogonal": {"init_lora_weights": "orthogonal"},
    "rank pattern equal to r": {"rank_pattern": {"q_proj": 2, "v_proj": 2}},
    "alpha pattern equal to alpha": {"alpha_pattern": {"v_proj": 4}},
    "every layer, by pattern": {"layers_to_transform": [0], "layers_pattern": "blocks"},
    "every layer, an int": {"layers_to_transform": 0, "layers_pattern": ["blocks"]},
    "full paths": {"target_modules": ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]},
    "suffixes": {"target_modules": ["attn.q_proj", "attn.v_proj"]},
    "a regex": {"target_modules": r"blocks\.\d+\.attn\.(q|v)_proj"},
}


@pytest.mark.parametrize("changes", PLAIN_LORA.values(), ids=PLAIN_LORA.keys())
def test_plain_lora_in_any_peft_spelling_loads(tmp_path, adapter_dir, trained, changes):
    loaded = load_changed(tmp_path, adapter_dir, trained, **changes)
    assert (loaded.r, loaded.lora_alpha) == (2, 4)


def test_a_regex_target_becomes_the_full_paths_it_matches(tmp_path, adapter_dir, trained):
    loaded = load_changed(tmp_path, adapter_dir, trained, target_modules=r".*\.(q|v)_proj")
    assert loaded.target_modules == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]


def test_all_linear_adapts_every_linear_layer_and_lm_head_only_if_the_file_does(tmp_path):
    base = tiny_gpt(seed=1)
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    for targets, head in ((linears, False), ([*linears, "lm_head"], True)):
        config = ml.LoRAConfig(r=2, lora_alpha=4, target_modules=targets)
        model = train_lora(copy.deepcopy(base), config)
        save_adapter(model, tmp_path / "a", config)
        tensors, raw = adapter_parts(tmp_path / "a")
        folder = write_adapter(tmp_path / "b", tensors, {**raw, "target_modules": "all-linear"})
        loaded_model = copy.deepcopy(base)
        loaded = load_adapter(loaded_model, folder)
        assert ("lm_head" in loaded.target_modules) == head
        assert len(lora_layers(loaded_model)) == len(targets)
        np.testing.assert_array_equal(logits(loaded_model), logits(model))


PARTLY_LORA = {
    "rank pattern unlike the file": (
        {"rank_pattern": {"v_proj": 4}},
        "config says r=4 (rank_pattern) but lora_A for blocks.0.attn.v_proj has shape (2, 8)",
    ),
    "a layer the model lacks": (
        {"layers_to_transform": [1], "layers_pattern": "blocks"},
        "layers_to_transform=[1] (layers_pattern='blocks') leaves none",
    ),
    # PEFT's default layer regex finds no index in "blocks.0.attn.q_proj": PEFT adapts nothing
    "no layer found": ({"layers_to_transform": [0]}, "layers_to_transform=[0]"),
    "layers not indices": ({"layers_to_transform": ["0"]}, "layers_to_transform=['0']"),
    "regex matches nothing": ({"target_modules": "attn\\..*"}, "matches no Linear layer"),
    "bad regex": ({"target_modules": "(q_proj"}, "not a valid regular expression"),
    "init changes the base": ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
}


@pytest.mark.parametrize("change, message", PARTLY_LORA.values(), ids=PARTLY_LORA.keys())
def test_what_is_not_plain_lora_is_refused_naming_the_option(
    tmp_path, adapter_dir, change, message
):
    tensors, config = adapter_parts(adapter_dir)
    folder = write_adapter(tmp_path / "a", tensors, {**config, **change})
    model = tiny_gpt()
    assert_refused(model, folder, message)
    assert not lora_layers(model)


def test_a_rank_above_min_out_in_loads_as_in_peft(tmp_path, adapter_dir, trained):
    tensors, config = adapter_parts(adapter_dir)
    rng = np.random.default_rng(0)
    shapes = {"lora_A": (9, 8), "lora_B": (8, 9)}  # r=9 > min(out, in)=8
    big = {k: rng.normal(0, 0.3, shapes[k.split(".")[-2]]).astype(np.float32) for k in tensors}
    folder = write_adapter(tmp_path / "a", big, {**config, "r": 9})
    model = copy.deepcopy(trained[0])
    load_adapter(model, folder)
    q = model.get_submodule("blocks.0.attn.q_proj")
    assert q.lora_A.shape == (9, 8) and q.lora_B.shape == (8, 9)
    unmerged = logits(model)
    merge_lora(model)
    np.testing.assert_allclose(logits(model), unmerged, rtol=1e-5, atol=1e-6)


def to_bfloat16_bytes(tensors: dict) -> bytes:
    """A safetensors file of bfloat16 tensors (the top half of each float32)."""
    header, body, offset = {}, b"", 0
    for name in sorted(tensors):
        bits = (tensors[name].astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(bits)],
        }
        body, offset = body + bits, offset + len(bits)
    return join(header, body)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_adapters_are_upcast_with_a_warning(tmp_path, adapter_dir, dtype):
    tensors, config = adapter_parts(adapter_dir)
    # values that both formats hold exactly, so the upcast loses nothing
    exact = {k: (v * 64).round().astype(np.float32) / 64 for k, v in tensors.items()}
    if dtype == "float16":
        folder = write_adapter(
            tmp_path / "a", {k: v.astype(np.float16) for k, v in exact.items()}, config
        )
    else:
        folder = write_adapter(tmp_path / "a", to_bfloat16_bytes(exact), config)
    model = tiny_gpt(seed=1)
    with pytest.warns(UserWarning, match=f"{dtype} tensors; they were upcast to float32"):
        load_adapter(model, folder)
    loaded = {n: p.data for n, p in model.named_parameters()}
    for key, value in exact.items():
        np.testing.assert_array_equal(loaded[peft_adapters.param_name(key)], value, err_msg=key)


def test_a_model_file_in_bfloat16_is_still_refused(tmp_path, model_bytes):
    tensors = safetensors.numpy.load(model_bytes)
    header, _ = split(model_bytes)
    data = split(to_bfloat16_bytes(tensors))
    data[0]["__metadata__"] = header["__metadata__"]
    path = tmp_path / "m.safetensors"
    path.write_bytes(join(*data))
    with pytest.raises(ValueError, match="BF16"):
        load_model(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, adapter_dir, model_bytes, bad):
    tensors, config = adapter_parts(adapter_dir)
    key = "base_model.model.blocks.0.attn.v_proj.lora_B.weight"
    tensors[key][1, 0] = bad
    folder = write_adapter(tmp_path / "a", tensors, config)
    assert_refused(tiny_gpt(), folder, f"NaN or infinite values in {key}")
    model = safetensors.numpy.load(model_bytes)
    model["ln_f.bias"][3] = bad
    path = tmp_path / "m.safetensors"
    # written as minilora writes (serialize records the checksum of the new data): the
    # values are what is wrong, not the bytes, and the message says so
    path.write_bytes(safetensors_files.serialize(model, split(model_bytes)[0]["__metadata__"]))
    with pytest.raises(ValueError, match="NaN or infinite values in ln_f.bias"):
        load_model(path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_devices_and_pipes_are_refused_before_reading(tmp_path, adapter_dir):
    # /dev/zero never ends and a pipe blocks: both would hang or exhaust memory if read
    with pytest.raises(ValueError, match="not a regular file"):
        load_model("/dev/zero")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        load_model(fifo)
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").symlink_to("/dev/zero")
    (folder / "adapter_model.safetensors").write_bytes(
        (adapter_dir / "adapter_model.safetensors").read_bytes()
    )
    assert_refused(tiny_gpt(), folder, "not a regular file")


def test_loaded_models_are_in_eval_mode_as_from_pretrained(tmp_path, adapter_dir, model_bytes):
    path = tmp_path / "m.safetensors"
    path.write_bytes(model_bytes)
    assert not any(m.training for m in load_model(path).modules())
    model = tiny_gpt(seed=1).train()
    load_adapter(model, adapter_dir)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '"LORA"', "\xff\xfe", "[" * 100_000])
def test_adapter_config_that_is_not_a_json_object_is_refused(tmp_path, adapter_dir, text):
    tensors, _ = adapter_parts(adapter_dir)
    folder = write_adapter(tmp_path / "a", tensors, text)
    assert_refused(tiny_gpt(), folder, "adapter_config.json")


@pytest.fixture(scope="module")
def adapter_bytes(adapter_dir) -> bytes:
    return (adapter_dir / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def with_weights(tmp_path_factory, adapter_dir):
    """A function: weights bytes -> a new adapter folder with them and the good config."""
    config = (adapter_dir / "adapter_config.json").read_bytes()

    def make(weights: bytes) -> Path:
        folder = tmp_path_factory.mktemp("fuzzed")
        (folder / "adapter_config.json").write_bytes(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        return folder

    return make


@pytest.fixture(scope="module")
def refused(trained):
    """A function: folder -> checks that load_adapter into a copy of the base model
    raises ValueError naming the folder and leaves the model bitwise as it was. With
    ``may_load`` a mutation that happens to leave a valid file may load instead."""
    base = trained[0]

    def check(folder: Path, may_load: bool = False) -> None:
        model = copy.deepcopy(base)
        before = snapshot(model)
        try:
            load_adapter(model, folder)
        except ValueError as e:
            assert str(folder) in str(e)
            assert snapshot(model) == before
            return
        assert may_load, "a corrupt adapter was loaded"

    return check


@given(data=st.binary(max_size=200))
def test_load_adapter_refuses_random_bytes(refused, with_weights, data):
    refused(with_weights(data))


@pytest.mark.parametrize("kind", TRUNCATIONS)
def test_load_adapter_refuses_each_kind_of_truncation(refused, with_weights, adapter_bytes, kind):
    refused(with_weights(truncate(adapter_bytes, kind)))


@given(fraction=st.floats(0, 1, exclude_max=True))
def test_load_adapter_refuses_any_truncation(refused, with_weights, adapter_bytes, fraction):
    refused(with_weights(adapter_bytes[: int(fraction * len(adapter_bytes))]))


@given(st.data())
def test_load_adapter_with_a_flipped_header_byte_never_half_loads(
    refused, with_weights, adapter_bytes, data
):
    n = struct.unpack("<Q", adapter_bytes[:8])[0]
    mutated = bytearray(adapter_bytes)
    mutated[data.draw(st.integers(8, 8 + n - 1), label="position")] ^= data.draw(
        st.integers(1, 255), label="xor"
    )
    refused(with_weights(bytes(mutated)), may_load=True)


@pytest.mark.parametrize("dtype", OTHER_DTYPES)
def test_load_adapter_refuses_a_changed_dtype(refused, with_weights, adapter_bytes, dtype):
    # I32/U32 keep the byte count, so only minilora's own dtype check can catch them
    header, body = split(adapter_bytes)
    header["base_model.model.blocks.0.attn.v_proj.lora_B.weight"]["dtype"] = dtype
    refused(with_weights(join(header, body)))


@given(st.data())
def test_load_adapter_refuses_changed_shapes_dtypes_offsets_and_lengths(
    refused, with_weights, adapter_bytes, data
):
    _, mutated = data.draw(header_mutations(adapter_bytes))
    refused(with_weights(mutated))


# --------------------------------------------------------------------------------------
# save_adapter refusals
# --------------------------------------------------------------------------------------


def test_save_adapter_refuses_a_model_without_lora(tmp_path, lora_config):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_gpt(), tmp_path / "a", lora_config)
    assert not (tmp_path / "a").exists()


def test_save_adapter_refuses_a_merged_model(tmp_path, trained, lora_config):
    model = copy.deepcopy(trained[1])
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, tmp_path / "a", lora_config)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"r": 4}, "r=4"),
        ({"lora_alpha": 8}, "lora_alpha=8"),
        ({"use_rslora": True}, "use_rslora"),
        ({"target_modules": ["q_proj"]}, "v_proj"),
        ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "k_proj"),
    ],
)
def test_save_adapter_refuses_a_config_that_does_not_describe_the_model(
    tmp_path, trained, lora_config, change, message
):
    config = ml.LoRAConfig(**{**lora_config.to_dict(), **change})
    with pytest.raises(ValueError, match=message):
        save_adapter(trained[1], tmp_path / "a", config)


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


def leftovers(folder: Path, keep: set) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def fail_on_call(k: int, exc: BaseException | None = None, real=None):
    """A stand-in for ``real`` that raises ``exc`` on its k-th call."""
    exc = exc if exc is not None else OSError("disk full (simulated)")
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == k:
            raise exc
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize("target", ["replace", "fsync", "write"])
@pytest.mark.parametrize(
    "exc", [OSError("disk full (simulated)"), KeyboardInterrupt()], ids=["OSError", "Ctrl-C"]
)
def test_interrupted_save_model_keeps_the_previous_file(tmp_path, monkeypatch, target, exc):
    path = tmp_path / "model.safetensors"
    save_model(tiny_gpt(seed=5), path)
    before = path.read_bytes()
    if target == "write":  # raise halfway through writing the temporary file
        real_fdopen = os.fdopen

        def fdopen(*args, **kwargs):
            f = real_fdopen(*args, **kwargs)
            real_write = f.write

            def write(data):
                real_write(data[: len(data) // 2])
                raise exc

            f.write = write
            return f

        monkeypatch.setattr(safetensors_files.os, "fdopen", fdopen)
    else:
        real = getattr(os, target)
        monkeypatch.setattr(safetensors_files.os, target, fail_on_call(1, exc, real))
    with pytest.raises(type(exc)):
        save_model(tiny_gpt(seed=6), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(tmp_path, {"model.safetensors"}) == []


@pytest.mark.parametrize("target, k", [("replace", 1), ("fsync", 1), ("fsync", 2)])
def test_interrupted_save_adapter_keeps_both_previous_files(
    tmp_path, monkeypatch, trained, lora_config, target, k
):
    # fsync call 2 is the second file's: nothing is replaced until both are written
    folder = tmp_path / "adapter"
    model = copy.deepcopy(trained[1])
    save_adapter(model, folder, lora_config)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for _, layer in lora_layers(model):
        layer.lora_B.data += 1.0
    monkeypatch.setattr(safetensors_files.os, target, fail_on_call(k, real=getattr(os, target)))
    with pytest.raises(OSError, match="simulated"):
        save_adapter(model, folder, lora_config)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp files


# A save of an adapter killed at its commit point: the process dies (no finally, no
# cleanup) right after its first rename, the journal's. The new adapter has the same shapes
# and another lora_alpha, so new weights beside the old config would load as a third model.
# (Every other step, and Ctrl-C: tests/test_save_commit.py.)
KILLED_SAVE = """
import os, sys
import minilora as ml
from minilora.interop import peft_adapters
from minilora.lora import lora_layers

folder, step = sys.argv[1], sys.argv[2]
ml.manual_seed(0)
model = ml.GPT(ml.GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=8))
alpha = 4 if step == "old" else 16
config = ml.LoRAConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
ml.apply_lora(model, config)
for _, layer in lora_layers(model):
    layer.lora_B.data += 1.0 if step == "old" else 2.0
if step == "killed":
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        os._exit(9)  # killed after the first rename

    os.replace = replace
peft_adapters.save_adapter(model, folder, config)
"""


def save_in_a_process(folder: Path, step: str) -> int:
    return subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(folder), step], timeout=120
    ).returncode


def test_a_save_killed_at_its_commit_point_loads_as_the_new_adapter(tmp_path):
    folder = tmp_path / "adapter"
    assert save_in_a_process(folder, "old") == 0
    old_config = (folder / "adapter_config.json").read_bytes()
    assert save_in_a_process(folder, "killed") == 9
    assert (folder / "adapter_config.json").read_bytes() == old_config  # not yet replaced
    temps = leftovers(folder, {"adapter_config.json", "adapter_model.safetensors"})
    assert safetensors_files.JOURNAL_NAME in temps and len(temps) == 3  # and the two new files
    assert load_adapter(tiny_gpt(), folder).lora_alpha == 16  # the load completes the save
    assert leftovers(folder, {"adapter_config.json", "adapter_model.safetensors"}) == []
    assert save_in_a_process(folder, "old") == 0
    assert load_adapter(tiny_gpt(), folder).lora_alpha == 4


def test_a_save_removes_temporaries_of_its_own_destination_only(tmp_path):
    stale = [tmp_path / ".m.safetensors.minilora-tmp-abc123", tmp_path / ".x.minilora-tmp-1"]
    for path in stale:
        path.write_bytes(b"left by a killed save")
    save_model(tiny_gpt(), tmp_path / "m.safetensors")
    assert leftovers(tmp_path, {"m.safetensors"}) == [".x.minilora-tmp-1"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX symbolic links")
def test_a_save_onto_a_symlink_writes_through_to_its_target(tmp_path, trained, lora_config):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "model.safetensors"
    save_model(tiny_gpt(seed=1), target)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    save_model(tiny_gpt(seed=2), link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    np.testing.assert_array_equal(logits(load_model(target)), logits(tiny_gpt(seed=2)))
    assert leftovers(tmp_path, {"real", "link.safetensors"}) == []
    assert leftovers(tmp_path / "real", {"model.safetensors"}) == []
    # an adapter folder whose config is a link to a shared file
    folder = tmp_path / "adapter"
    save_adapter(trained[1], folder, lora_config)
    shared = tmp_path / "real" / "config.json"
    (folder / "adapter_config.json").rename(shared)
    (folder / "adapter_config.json").symlink_to(shared)
    save_adapter(trained[1], folder, lora_config)
    assert (folder / "adapter_config.json").is_symlink()
    np.testing.assert_array_equal(
        logits(load_adapter_into_base(trained, folder)), logits(trained[1])
    )


@pytest.mark.skipif(os.name != "posix", reason="POSIX pipes")
def test_a_save_onto_a_device_or_pipe_is_refused_and_leaves_it(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file; refusing to replace it"):
        save_model(tiny_gpt(), fifo)
    assert fifo.is_fifo() and leftovers(tmp_path, {"pipe.safetensors"}) == []


def load_adapter_into_base(trained, folder: Path):
    model = copy.deepcopy(trained[0])
    load_adapter(model, folder)
    return model


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_saved_files_get_normal_permissions_not_mkstemp_private_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        save_model(tiny_gpt(), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA device")
def test_save_from_gpu_and_load_to_either_device(tmp_path, lora_config):
    base = tiny_gpt(seed=7).to("cuda")
    save_model(base, tmp_path / "m.safetensors")
    model = train_lora(copy.deepcopy(base), lora_config)
    save_adapter(model, tmp_path / "a", lora_config)
    for device in ("cpu", "cuda"):
        loaded = load_model(tmp_path / "m.safetensors", device=device)
        assert loaded.device == device
        load_adapter(loaded, tmp_path / "a")
        assert all(p.device == device for p in loaded.parameters())
        np.testing.assert_allclose(logits(loaded), logits(model), rtol=1e-5, atol=1e-6)


def test_loading_holds_the_model_and_the_tensors_no_more(tmp_path, monkeypatch):
    """load_model on a GPT-2 folder peaks (tracemalloc) at what building the model alone
    peaks at, or the model and the file's tensors plus one tensor's copy, whichever is
    more (loading once held the file's bytes and two copies of every tensor besides:
    3.7 times the weights here)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import load_memory

    shape = load_memory.QUICK_SHAPE
    weights = load_memory.write_gpt2_folder(tmp_path, shape)
    peak = load_memory.peak_load(tmp_path)
    config = hf_gpt2.GPT2Config(
        vocab_size=shape["vocab_size"],
        block_size=shape["n_positions"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        tie_word_embeddings=True,
    )
    tracemalloc.start()
    try:
        ml.GPT(config)
        build = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest = shape["vocab_size"] * shape["n_embd"] * 4  # the token embedding, float32
    assert peak <= max(build, 2 * weights + largest) + 2**16  # + Python's own objects


def test_a_gpt2_model_file_records_where_the_model_came_from(tmp_path, monkeypatch):
    """A model loaded from a GPT-2 folder has an hf_gpt2.GPT2Config; its model file says
    "hf_model_type": "gpt2" beside GPTConfig's fields and loads back as GPT-2's (so its
    adapters keep GPT-2's names); a plain model's says null; any other value is refused."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import load_memory

    load_memory.write_gpt2_folder(tmp_path / "hf", load_memory.QUICK_SHAPE)
    model = load_model(tmp_path / "hf")
    assert type(model.config) is hf_gpt2.GPT2Config and hf_gpt2.is_gpt2(model)
    save_model(model, tmp_path / "gpt2.safetensors")
    meta = split((tmp_path / "gpt2.safetensors").read_bytes())[0]["__metadata__"]
    assert json.loads(meta["config"]) == {**model.config.to_dict(), "hf_model_type": "gpt2"}
    again = load_model(tmp_path / "gpt2.safetensors")
    assert type(again.config) is hf_gpt2.GPT2Config and again.config == model.config
    plain = tiny_gpt()
    assert not hf_gpt2.is_gpt2(plain)
    path = tmp_path / "plain.safetensors"
    save_model(plain, path)
    header, body = split(path.read_bytes())
    assert type(load_model(path).config) is ml.GPTConfig
    config = json.loads(header["__metadata__"]["config"])
    header["__metadata__"]["config"] = json.dumps({**config, "hf_model_type": "llama"})
    path.write_bytes(join(header, body))
    with pytest.raises(ValueError, match="hf_model_type='llama' must be None or 'gpt2'"):
        load_model(path)
