"""Adapter layers (Houlsby et al. 2019, Lin et al. 2020): identity at insertion, the
closed-form parameter count, gradients, freezing, validation, and safetensors files."""

import json

import numpy as np
import pytest
from helpers import TINY, TINY_2x2, make_gpt, randomize_weights, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import backend
from minilora.gradcheck import gradcheck
from minilora.interop import safetensors_files
from minilora.lora import LoRAConfig, apply_lora, count_parameters
from minilora.relatives.adapters import (
    AdapterConfig,
    AdapterLinear,
    adapter_layers,
    adapter_parameter_count,
    adapter_state_dict,
    apply_adapters,
    load_adapters,
    save_adapters,
)

TYPES = ["houlsby", "lin"]
IDX = np.array([[1, 2, 3, 0], [0, 6, 6, 5]])
TARGETS = np.array([[2, 3, 4, 0], [6, 6, 5, 1]])


def adapted(config=TINY_2x2, adapter_config=None, seed=0, dtype=np.float32, **changes):
    """A base GPT with O(1) weights, and a copy of it with adapters; (base, model, paths)."""
    base = randomize_weights(make_gpt(config, seed, dtype, **changes), seed)
    model = make_gpt(config, seed, dtype, **changes)
    model.load_state_dict(base.state_dict())
    paths = apply_adapters(model, adapter_config or AdapterConfig(), backend.Generator(seed))
    return base, model, paths


def randomize_adapters(model, seed: int, scale: float = 0.5):
    """Non-zero up-projections, so that the adapters change the output."""
    rng = np.random.default_rng(seed)
    for _, layer in adapter_layers(model):
        for p in (layer.adapter_up.weight, layer.adapter_up.bias, layer.adapter_down.bias):
            p.data[...] = scale * rng.standard_normal(p.shape)
    return model


# --------------------------------------------------------------------------------------
# Insertion
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_type", TYPES)
@pytest.mark.parametrize("nonlinearity", ["gelu", "relu"])
def test_adapters_are_the_identity_right_after_insertion(adapter_type, nonlinearity):
    config = AdapterConfig(adapter_type=adapter_type, bottleneck=3, nonlinearity=nonlinearity)
    base, model, _ = adapted(adapter_config=config)
    with ml.no_grad():
        assert np.array_equal(base(IDX)[0].numpy(), model(IDX)[0].numpy())
        # and they do change the model once trained (non-zero up-projection)
        randomize_adapters(model, 1)
        assert not np.allclose(base(IDX)[0].numpy(), model(IDX)[0].numpy())


@pytest.mark.parametrize(
    "adapter_type, expected",
    [
        ("houlsby", ["attn.o_proj", "mlp.fc2"]),
        ("lin", ["mlp.fc2"]),
    ],
)
def test_adapters_go_after_the_sublayers_the_paper_names(adapter_type, expected):
    _, model, paths = adapted(adapter_config=AdapterConfig(adapter_type=adapter_type))
    assert paths == [f"blocks.{i}.{s}" for i in range(2) for s in expected]
    assert [p for p, _ in adapter_layers(model)] == paths
    for path in paths:  # the frozen weight keeps its name: a base checkpoint still loads
        names = {n for n, _ in model.get_submodule(path).named_parameters()}
        assert names == {
            "weight",
            "bias",
            "adapter_down.weight",
            "adapter_down.bias",
            "adapter_up.weight",
            "adapter_up.bias",
        }


@pytest.mark.parametrize("adapter_type", TYPES)
def test_sublayer_output_goes_through_the_bottleneck_with_a_residual(adapter_type):
    """y = h + up(act(down(h))) with h the wrapped Linear's output, checked by hand."""
    _, model, paths = adapted(adapter_config=AdapterConfig(adapter_type, 3, "relu"))
    randomize_adapters(model, 2)
    layer = model.get_submodule(paths[0])
    x = np.random.default_rng(0).standard_normal((2, 5, layer.in_features)).astype(np.float32)
    with ml.no_grad():
        y = layer(ml.Tensor(x)).numpy()
    h = x @ layer.weight.numpy().T + layer.bias.numpy()
    z = np.maximum(h @ layer.adapter_down.weight.numpy().T + layer.adapter_down.bias.numpy(), 0)
    want = h + z @ layer.adapter_up.weight.numpy().T + layer.adapter_up.bias.numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_to_linear_gives_back_the_wrapped_layer_itself():
    base, model, paths = adapted()
    randomize_adapters(model, 6)
    layer = model.get_submodule(paths[0])
    plain = layer.to_linear()
    assert type(plain) is ml.Linear
    assert plain.weight is layer.weight and plain.bias is layer.bias
    x = ml.Tensor(np.ones((1, layer.in_features), np.float32))
    want = base.get_submodule(paths[0])(x).numpy()
    assert np.array_equal(plain(x).numpy(), want)
    assert not np.array_equal(layer(x).numpy(), want)


def test_a_numpy_integer_bottleneck_is_a_plain_int():
    config = AdapterConfig(bottleneck=np.int64(3))
    assert type(config.bottleneck) is int and json.dumps(vars(config))


def test_generation_with_the_kv_cache_matches_recomputation():
    _, model, _ = adapted()
    randomize_adapters(model, 3)
    prompt = np.array([[1, 2], [3, 4]])
    a = model.generate(prompt, 4, temperature=0, use_cache=True)
    b = model.generate(prompt, 4, temperature=0, use_cache=False)
    assert np.array_equal(a, b)


# --------------------------------------------------------------------------------------
# Counting and freezing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_type", TYPES)
@pytest.mark.parametrize("train_layer_norms", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bottleneck", [1, 3])
def test_parameter_count_closed_form_equals_counted(
    adapter_type, train_layer_norms, bias, bottleneck
):
    config = AdapterConfig(adapter_type, bottleneck, train_layer_norms=train_layer_norms)
    for model_config in (TINY, TINY_2x2):
        _, model, _ = adapted(model_config, config, bias=bias)
        counted = count_parameters(model)[0]
        assert counted == adapter_parameter_count(model.config, config)


def test_parameter_count_is_the_lora_papers_formula():
    """L̂_adpt (2 d r + r + d) + 2 L̂_LN d, by hand for C = 8, two layers, m = 3."""
    d, r = 8, 3
    houlsby = AdapterConfig("houlsby", r, train_layer_norms=True)
    assert adapter_parameter_count(TINY_2x2, houlsby) == 4 * (2 * d * r + r + d) + 2 * 5 * d == 316
    lin = AdapterConfig("lin", r, train_layer_norms=False)
    assert adapter_parameter_count(TINY_2x2, lin) == 2 * (2 * d * r + r + d) == 118


@pytest.mark.parametrize("train_layer_norms", [True, False])
def test_only_adapters_and_chosen_layer_norms_train(train_layer_norms):
    config = AdapterConfig("houlsby", 2, train_layer_norms=train_layer_norms)
    _, model, _ = adapted(adapter_config=config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ".adapter_" in name or (train_layer_norms and ".ln" in f".{name}"), name
    assert any(".ln" in f".{n}" for n in trainable) == train_layer_norms
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.data.copy() for n, p in model.named_parameters() if p.requires_grad}
    opt = ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _, loss = model(IDX, TARGETS)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is None) == (name in frozen), name  # no gradient for the frozen
        opt.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert np.array_equal(p.data, frozen[name]), name  # bitwise unchanged
        else:
            assert not np.array_equal(p.data, start[name]), name  # trained


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    sizes=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 3)),
    nonlinearity=st.sampled_from(["gelu", "relu"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gradcheck_adapter_linear(lead, sizes, nonlinearity, bias, seed):
    """Every input: x, the adapter's four arrays; the frozen W and b get no gradient."""
    n_in, n_out, m = sizes
    rng = np.random.default_rng(seed)
    linear = ml.Linear(n_in, n_out, bias=bias, dtype=np.float64)
    layer = AdapterLinear(linear, AdapterConfig(bottleneck=m, nonlinearity=nonlinearity))
    arrays = [rng.standard_normal((*lead, n_in))]  # x
    arrays += [rng.standard_normal((n_out, n_in))] + ([rng.standard_normal(n_out)] if bias else [])
    arrays += [rng.standard_normal(s) for s in ((m, n_out), (m,), (n_out, m), (n_out,))]

    def fn(*ts):
        ts = list(ts)
        x, layer.weight = ts.pop(0), ts.pop(0)
        layer.bias = ts.pop(0) if bias else None
        down, up = layer.adapter_down, layer.adapter_up
        down.weight, down.bias, up.weight, up.bias = ts
        return layer(x)

    assert gradcheck(fn, arrays, no_grads=(1, 2) if bias else (1,), seed=seed)


@pytest.mark.parametrize("adapter_type", TYPES)
def test_gradcheck_tiny_gpt_through_its_adapters_and_layer_norms(adapter_type):
    config = AdapterConfig(adapter_type, 2, train_layer_norms=True)
    _, model, paths = adapted(TINY_2x2, config, dtype=np.float64)
    randomize_adapters(model, 4)
    layer = model.get_submodule(paths[0])
    ln = model.blocks[0].ln1
    down, up = layer.adapter_down, layer.adapter_up
    saved = (down.weight, down.bias, up.weight, up.bias, ln.weight)

    def fn(wd, bd, wu, bu, g):
        down.weight, down.bias, up.weight, up.bias, ln.weight = wd, bd, wu, bu, g
        try:
            return model(IDX[:, :3], TARGETS[:, :3])[1]
        finally:
            down.weight, down.bias, up.weight, up.bias, ln.weight = saved

    assert gradcheck(fn, [p.data for p in saved])


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, error, words",
    [
        ({"bottleneck": 0}, ValueError, "bottleneck=0"),
        ({"bottleneck": -2}, ValueError, "bottleneck=-2"),
        ({"bottleneck": 2.5}, TypeError, "bottleneck=2.5"),
        ({"bottleneck": True}, TypeError, "bottleneck=True"),
        ({"adapter_type": "pfeiffer"}, ValueError, "adapter_type='pfeiffer'"),
        ({"nonlinearity": "tanh"}, ValueError, "nonlinearity='tanh'"),
        ({"train_layer_norms": "yes"}, TypeError, "train_layer_norms='yes'"),
        ({"init_std": -1.0}, ValueError, "init_std=-1.0"),
        ({"init_std": float("nan")}, ValueError, "init_std=nan"),
    ],
)
def test_config_refuses_bad_values_naming_them(changes, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
        AdapterConfig(**changes)


def test_apply_adapters_refuses_without_changing_the_model():
    _, model, _ = adapted()
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, AdapterConfig())
    with pytest.raises(TypeError, match="AdapterConfig"):
        apply_adapters(model, LoRAConfig())
    assert snapshot(model) == before

    lora = make_gpt(TINY_2x2)
    apply_lora(lora, LoRAConfig(r=2, target_modules=["fc2"]))
    before = snapshot(lora)
    with pytest.raises(ValueError, match="LoRALinear"):
        apply_adapters(lora, AdapterConfig("lin"))
    assert snapshot(lora) == before
    with pytest.raises(ValueError, match="no module"):
        apply_adapters(ml.Linear(2, 2), AdapterConfig())


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_type", TYPES)
def test_save_and_load_round_trip(tmp_path, adapter_type):
    config = AdapterConfig(adapter_type, 3, "relu", train_layer_norms=True)
    base, model, _ = adapted(adapter_config=config)
    randomize_adapters(model, 5)
    model.blocks[0].ln1.weight.data[...] += 0.25  # a trained LayerNorm travels too
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path, config)
    first = path.read_bytes()
    save_adapters(model, path, config)
    assert path.read_bytes() == first  # the same model gives the same bytes

    fresh = make_gpt(TINY_2x2)
    fresh.load_state_dict(base.state_dict())
    assert load_adapters(fresh, path) == config
    with ml.no_grad():
        assert np.array_equal(fresh(IDX)[0].numpy(), model(IDX)[0].numpy())
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def write(path, tensors, config=None, fmt="minilora-adapters"):
    metadata = {"format": fmt, "format_version": "1"}
    if config is not None:
        metadata["adapter_config"] = json.dumps(config)
    path.write_bytes(safetensors_files.serialize(tensors, metadata))


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing", "missing key blocks.1.mlp.fc2.adapter_up.bias"),
        ("unexpected", "unexpected key blocks.0.attn.q_proj.weight"),
        ("shape", "blocks.0.mlp.fc2.adapter_down.weight has shape (2, 8), expected (3, 8)"),
        ("format", "not a minilora adapters file"),
        ("config", "invalid adapter_config"),
        ("other model", "expected (3, 16)"),
    ],
)
def test_load_refuses_a_file_that_does_not_fit_and_leaves_the_model_untouched(
    tmp_path, damage, words
):
    config = AdapterConfig("lin", 3, train_layer_norms=False)
    _, model, _ = adapted(adapter_config=config)
    state = {k: backend.to_numpy(v) for k, v in adapter_state_dict(model, config).items()}
    cfg = json.loads(json.dumps(vars(config)))
    path = tmp_path / "bad.safetensors"
    target = make_gpt(TINY_2x2)
    if damage == "missing":
        del state["blocks.1.mlp.fc2.adapter_up.bias"]
    elif damage == "unexpected":
        state["blocks.0.attn.q_proj.weight"] = np.zeros((8, 8), np.float32)
    elif damage == "shape":
        state["blocks.0.mlp.fc2.adapter_down.weight"] = np.zeros((2, 8), np.float32)
    elif damage == "config":
        cfg["bottleneck"] = 0
    elif damage == "other model":
        target = make_gpt(TINY_2x2, n_embd=16)
    write(path, state, cfg, fmt="minilora-model" if damage == "format" else "minilora-adapters")
    before = snapshot(target)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_adapters(target, path)
    assert snapshot(target) == before
    assert not adapter_layers(target)


def test_save_refuses_a_config_that_does_not_match_the_model(tmp_path):
    _, model, _ = adapted(adapter_config=AdapterConfig("lin", 2))
    with pytest.raises(ValueError, match="is this the config"):
        save_adapters(model, tmp_path / "a.safetensors", AdapterConfig("houlsby", 2))
    assert not (tmp_path / "a.safetensors").exists()


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


def _adapter_run(device: str, nonlinearity: str):
    """Three AdamW steps with Houlsby adapters on ``device``: (model, losses)."""
    model = make_gpt(TINY_2x2, 0, device=device)
    apply_adapters(model, AdapterConfig("houlsby", 3, nonlinearity), backend.Generator(0))
    opt = ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        _, loss = model(IDX, TARGETS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    return model, losses


@pytest.mark.parametrize("nonlinearity", ["gelu", "relu"])
def test_adapters_train_save_and_load_on_every_device(device, nonlinearity, tmp_path):
    """On the stand-in (CuPy's rules on the CPU) a host fallback in the adapter fails;
    its numbers are the CPU's bit for bit (on a GPU, to float32 rounding)."""
    model, losses = _adapter_run(device, nonlinearity)
    ref, ref_losses = _adapter_run("cpu", nonlinearity)
    assert all(p.device == device for p in model.parameters())
    if device == "cuda":
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    else:
        assert losses == ref_losses
    config = AdapterConfig("houlsby", 3, nonlinearity)
    save_adapters(model, tmp_path / "a.safetensors", config)
    for dev in ("cpu", device):
        fresh = make_gpt(TINY_2x2, 0, device=dev)
        load_adapters(fresh, tmp_path / "a.safetensors")
        for (_, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters(), strict=True):
            assert p.device == dev
            np.testing.assert_array_equal(backend.to_numpy(p.data), backend.to_numpy(q.data))
