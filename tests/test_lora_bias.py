"""LoRA with a bias on lora_B (``LoRAConfig(lora_bias=True)``, PEFT's ``lora_bias``):
h = W0 x + b + s · (B A x + b_B).

The layer's backward against central differences (every input, the frozen base gets no
gradient); the start equal to the base; merge and unmerge, through the model's helpers and
merge_and_unload of named adapters; the config's and the targets' checks; adapter files
(minilora's own, and, with PyTorch and PEFT installed, both ways with PEFT on the port). The
GPT-2 folders both ways are in test_gpt2_peft_matrix.py ("lora_bias").
"""

import copy
import os

import numpy as np
import pytest
from helpers import TINY_2x2, logits_of, make_gpt, randomize_weights

import minilora as ml
from minilora import LoRAConfig, Tensor
from minilora.gradcheck import gradcheck
from minilora.interop import peft_adapters
from minilora.lora import count_parameters, lora_layers
from minilora.nn import Linear
from minilora.variants import multi_adapter
from minilora.variants.lora_bias import LoRABiasLinear

pytestmark = pytest.mark.usefixtures("ops")

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
BIASED = LoRAConfig(
    r=2,
    lora_alpha=4,
    target_modules=["q_proj", "v_proj", "fc1"],
    lora_bias=True,
    init_lora_weights="kaiming",
)


def biased_layer(n_in=5, n_out=4, dtype=np.float64, seed=0):
    """A LoRABiasLinear with random W0, b, A, B and b_B (as if trained)."""
    layer = LoRABiasLinear.from_linear(Linear(n_in, n_out, dtype=dtype), BIASED)
    rng = np.random.default_rng(seed)
    for p in layer.parameters():
        p.data[...] = rng.normal(0, 1, p.shape)
    return layer


def test_gradcheck_every_input_and_the_frozen_base_gets_none():
    """dx, dA, dB and db_B against central differences (float64, random upstream
    gradient); W0 and b are frozen and get no gradient."""
    layer = biased_layer()
    x = np.random.default_rng(1).normal(size=(2, 3, 5))

    def fn(x, weight, bias, lora_A, lora_B, lora_B_bias):
        layer.weight, layer.bias, layer.lora_A, layer.lora_B = weight, bias, lora_A, lora_B
        layer.lora_B_bias = lora_B_bias
        return layer(x)

    params = [layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_B_bias]
    assert gradcheck(fn, [x, *params], no_grads=(1, 2))


def test_the_formula_and_the_start_equal_to_the_base():
    layer = biased_layer(seed=2)
    x = np.random.default_rng(3).normal(size=(3, 5))
    W, b, A, B = (p.data for p in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    bB = layer.lora_B_bias.data
    want = x @ W.T + b + layer.scaling * (x @ A.T @ B.T + bB)
    np.testing.assert_allclose(layer(Tensor(x)).data, want, rtol=1e-12, atol=1e-12)

    model = randomize_weights(make_gpt(TINY_2x2), 1)
    with ml.no_grad():
        base = model.eval()(IDX)[0].data
        ml.apply_lora(model, BIASED)
        adapted = model.eval()(IDX)[0].data
    assert np.array_equal(adapted, base)  # b_B starts at zero, B at zero
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n.endswith(".lora_B_bias") for n in names) == 6  # 2 blocks x 3 targets
    plain = randomize_weights(make_gpt(TINY_2x2), 1)
    ml.apply_lora(plain, LoRAConfig(**{**BIASED.to_dict(), "lora_bias": False}))
    outs = sum(layer.out_features for _, layer in lora_layers(model))
    assert count_parameters(model)[0] == count_parameters(plain)[0] + outs


def trained_model(seed=5):
    model = randomize_weights(make_gpt(TINY_2x2), 1)
    base = copy.deepcopy(model)
    ml.apply_lora(model, BIASED)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data[...] = rng.normal(0, 0.5, p.shape)
    return base, model


def test_merge_adds_s_times_b_b_to_the_bias_and_unmerge_takes_it_back():
    _, model = trained_model()
    want = logits_of(model, IDX)
    biases = {p: m.bias.data.copy() for p, m in lora_layers(model)}
    ml.merge_lora(model)
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-5, atol=1e-5)
    for path, layer in lora_layers(model):
        np.testing.assert_allclose(
            layer.bias.data, biases[path] + layer.scaling * layer.lora_B_bias.data, rtol=1e-6
        )
    ml.unmerge_lora(model)
    for path, layer in lora_layers(model):
        np.testing.assert_allclose(layer.bias.data, biases[path], rtol=1e-6, atol=1e-6)
    ml.merge_and_unload(model)
    assert not lora_layers(model)
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-5, atol=1e-5)


def test_a_diverged_bias_refuses_the_merge_leaving_weight_and_bias():
    _, model = trained_model()
    layer = model.get_submodule("blocks.0.attn.q_proj")
    layer.lora_B_bias.data[0] = np.inf
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="b \\+ s·b_B contains NaN or inf"):
        ml.merge_lora(model)
    for name, p in model.named_parameters():
        assert np.array_equal(p.data, before[name]), name


def test_named_adapters_merge_their_biases_and_refuse_a_combination():
    """merge_and_unload(adapter_names=...) adds each adapter's s·b_B; add_weighted_adapter
    refuses adapters with lora_bias (no combination of B's and A's holds the bias)."""
    _, model = trained_model()
    multi_adapter.add_adapter(model, "other", BIASED)
    multi_adapter.set_adapter(model, "other")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data + 0.3
    with pytest.raises(ValueError, match="lora_bias"):
        multi_adapter.add_weighted_adapter(model, ["default", "other"], [1.0, 1.0], "sum", "cat")
    layers = {
        n: dict(multi_adapter._adapter_layers(multi_adapter._shelf(model, "t"), n, "t"))
        for n in ("default", "other")
    }
    b0 = {p: m.bias.data.copy() for p, m in layers["other"].items()}
    multi_adapter.merge_and_unload(model, adapter_names=["default", "other"])
    for path, bias in b0.items():
        added = sum(layers[n][path].scaling * layers[n][path].lora_B_bias.data for n in layers)
        np.testing.assert_allclose(model.get_submodule(path).bias.data, bias + added, rtol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(use_dora=True), "lora_bias=True with use_dora=True"),
        (dict(init_lora_weights="gaussian"), "init_lora_weights='gaussian'"),
        (dict(lora_bias="yes"), "lora_bias='yes' must be True or False"),
    ],
    ids=["dora", "gaussian-init", "not-a-bool"],
)
def test_the_config_is_checked(change, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**{**BIASED.to_dict(), **change})


@pytest.mark.parametrize("target", ["lm_head", "tok_emb"])
def test_a_target_without_a_bias_is_refused_naming_it(target):
    model = make_gpt(TINY_2x2)
    before = copy.deepcopy(model.state_dict())
    config = LoRAConfig(**{**BIASED.to_dict(), "target_modules": ["q_proj", target]})
    with pytest.raises(ValueError, match=f"needs Linear layers with a bias.*'{target}'"):
        ml.apply_lora(model, config)
    assert not lora_layers(model)
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapter_round_trip_keys_config_and_logits(tmp_path):
    base, model = trained_model()
    peft_adapters.save_adapter(model, tmp_path, BIASED)
    from safetensors.numpy import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.blocks.0.attn.q_proj.lora_B.bias" in keys
    loaded = copy.deepcopy(base)
    config = peft_adapters.load_adapter(loaded, tmp_path)
    assert config.lora_bias
    np.testing.assert_array_equal(logits_of(loaded, IDX), logits_of(model, IDX))


def test_a_file_without_its_bias_is_refused(tmp_path):
    base, model = trained_model()
    target = copy.deepcopy(base)
    peft_adapters.save_adapter(model, tmp_path, BIASED)
    text = (
        (tmp_path / "adapter_config.json")
        .read_text()
        .replace('"lora_bias": true', '"lora_bias": false')
    )
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.warns(UserWarning, match="lora_bias: true -> false"):
        with pytest.raises(ValueError, match="unexpected key .*q_proj.lora_B.bias"):
            peft_adapters.load_adapter(target, tmp_path)
    assert not lora_layers(target)


@pytest.mark.oracle
# PEFT 0.21 takes its own 1-D lora_B.bias for a ZeRO-3 shard when it saves: a false alarm
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")
def test_adapter_folders_both_ways_with_peft(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft_helpers import cross_both_ways

    base, model = trained_model()
    read = cross_both_ways(torch, peft, model, BIASED, base, tmp_path, IDX, std=0.3)
    assert read.lora_bias
