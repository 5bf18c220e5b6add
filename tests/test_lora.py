"""LoRA (minilora.lora): the properties a LoRA implementation must have.

Zero-init equivalence, merge correctness, parameter counts, frozen weights untouched by
training, the fused layer against its composition from basic ops (outputs, every gradient,
finite differences), expressiveness (full rank fits any update; lower rank reaches exactly
the Eckart-Young bound), and the work a frozen weight saves (counted matmuls).
"""

import copy
import math

import numpy as np
import pytest
from helpers import TINY, make_gpt, randomize_weights, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    LORA_TARGETS,
    float_dtypes,
    gpt_configs,
    linear_shape,
    lora_configs,
    seeds,
    token_batches,
)

import minilora
from minilora import (
    GPT,
    AdamW,
    GPTConfig,
    Linear,
    LoRAConfig,
    LoRALinear,
    Tensor,
    apply_lora,
    backend,
    disable_adapters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    no_grad,
    unmerge_lora,
)
from minilora import functional as F
from minilora.gradcheck import gradcheck
from minilora.lora import lora_layers

# every test here runs on the fast path and on the reference ops (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("ops")

ALL_TARGETS = list(LORA_TARGETS)


def adapted(base: GPT, lora_config: LoRAConfig, seed: int = 0):
    """A deep copy of ``base`` with LoRA applied (the base itself is left alone)."""
    model = copy.deepcopy(base)
    minilora.manual_seed(seed)
    paths = apply_lora(model, lora_config)
    return model, paths


def randomize_B(model, seed: int, scale: float = 0.5):
    """Non-zero lora_B everywhere, so the adapter actually changes the output; divided by
    the scaling so that s·B·A has the same size whatever lora_alpha and r are."""
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        B = rng.standard_normal(layer.lora_B.shape) * (scale / layer.scaling)
        layer.lora_B.data[...] = B


def logits_of(model, idx, seed=None):
    if seed is not None:
        minilora.manual_seed(seed)
    with no_grad():
        return model(idx)[0].numpy()


def expected_paths(config, targets) -> list[str]:
    """Module paths (minilora/model.py) of the layers ``targets`` name."""
    paths = []
    for i in range(config.n_layer):
        for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            paths.append(f"blocks.{i}.attn.{leaf}")
        paths += [f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]
    paths.append("lm_head")
    return [p for p in paths if p.rsplit(".", 1)[-1] in targets]


# --------------------------------------------------------------------------------------
# LoRAConfig
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"r": 0}, "r=0"),
        ({"r": 1.5}, "r=1.5"),
        ({"r": True}, "r=True"),
        ({"lora_alpha": 0}, "lora_alpha=0"),
        ({"lora_alpha": -2.0}, "lora_alpha=-2.0"),
        ({"lora_alpha": float("nan")}, "lora_alpha=nan"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"lora_dropout": -0.5}, "lora_dropout=-0.5"),
        ({"bias": "some"}, "bias='some'"),
        ({"init_lora_weights": "xavier"}, "init_lora_weights='xavier'"),
        ({"target_modules": []}, "target_modules=[]"),
        ({"target_modules": ["q_proj", 3]}, "target_modules="),
    ],
)
def test_lora_config_refuses_bad_fields_naming_them(changes, named):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**changes)
    assert named in str(info.value)


def test_lora_config_defaults_and_peft_spellings():
    config = LoRAConfig()
    assert (config.r, config.lora_alpha, config.target_modules) == (8, 8, ["q_proj", "v_proj"])
    assert (config.bias, config.use_rslora, config.init_lora_weights) == ("none", False, "gaussian")
    assert LoRAConfig(target_modules="fc1").target_modules == ["fc1"]
    assert LoRAConfig(init_lora_weights=True).init_lora_weights == "kaiming"  # PEFT's default
    assert set(config.to_dict()) == {
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "use_rslora",
        "init_lora_weights",
        "use_dora",
        "lora_bias",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "trainable_token_indices",
    }


@given(r=st.integers(1, 64), alpha=st.floats(0.01, 100.0))
def test_scaling_is_alpha_over_r_or_over_sqrt_r(r, alpha):
    assert LoRAConfig(r=r, lora_alpha=alpha).scaling == pytest.approx(alpha / r, rel=1e-15)
    rs = LoRAConfig(r=r, lora_alpha=alpha, use_rslora=True)
    assert rs.scaling == pytest.approx(alpha / math.sqrt(r), rel=1e-15)
    layer = LoRALinear(70, 70, r=r, lora_alpha=alpha, use_rslora=True)
    assert layer.scaling == pytest.approx(alpha / math.sqrt(r), rel=1e-15)


# --------------------------------------------------------------------------------------
# apply_lora
# --------------------------------------------------------------------------------------


@st.composite
def gpt_and_lora(draw, dropout=None, lora_dropout=None, bias=None, targets=None):
    config = draw(gpt_configs(dropout=dropout))
    lora_config = draw(lora_configs(config, targets=targets, lora_dropout=lora_dropout, bias=bias))
    return config, lora_config


@given(case=gpt_and_lora(), seed=seeds, dtype=float_dtypes)
def test_apply_lora_replaces_exactly_the_targets(case, seed, dtype):
    config, lora_config = case
    base = make_gpt(config, seed, dtype)
    model, paths = adapted(base, lora_config, seed)
    assert sorted(paths) == sorted(expected_paths(config, lora_config.target_modules))
    modules = dict(model.named_modules())
    r = lora_config.r
    for path, m in modules.items():
        if path in paths:
            assert isinstance(m, LoRALinear)
            out_f, in_f = linear_shape(config, path.rsplit(".", 1)[-1])
            assert m.lora_A.shape == (r, in_f) and m.lora_B.shape == (out_f, r)
            assert m.lora_A.dtype == dtype and m.lora_B.dtype == dtype
            assert m.scaling == pytest.approx(lora_config.scaling)
            # the base weight and bias keep their names and values
            base_layer = base.get_submodule(path)
            assert np.array_equal(m.weight.data, base_layer.weight.data)
            if config.bias and path != "lm_head":
                assert np.array_equal(m.bias.data, base_layer.bias.data)
            else:
                assert m.bias is None
        elif isinstance(m, Linear):
            assert type(m) is Linear
    # the base model's paths all still exist (a base checkpoint still loads), plus adapters
    base_names = {n for n, _ in base.named_parameters()}
    names = {n for n, _ in model.named_parameters()}
    lora_names = {f"{p}.lora_{ab}" for p in paths for ab in "AB"}
    assert names == base_names | lora_names
    assert not any(isinstance(m, LoRALinear) for m in base.modules()), "base was modified"


@given(config=gpt_configs(), seed=seeds, bad=st.sampled_from(["qkv", "c_attn", "Q_PROJ"]))
def test_unknown_target_is_refused_listing_available_names(config, seed, bad):
    model = make_gpt(config, seed)
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        apply_lora(model, LoRAConfig(r=1, target_modules=["q_proj", bad]))
    message = str(info.value)
    assert bad in message
    for name in ALL_TARGETS:
        assert name in message, f"available name {name} not listed: {message}"
    assert snapshot(model) == before
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize(
    "config, targets, r, bad_path, bad_shape",
    [
        (dict(TINY.to_dict(), n_embd=4), ["q_proj"], 5, "blocks.0.attn.q_proj", (4, 4)),
        # lm_head (5, 12) comes last: q_proj must not have been replaced before the refusal
        (
            dict(TINY.to_dict(), vocab_size=5, n_embd=12),
            ["q_proj", "lm_head"],
            6,
            "lm_head",
            (5, 12),
        ),
        (
            dict(TINY.to_dict(), n_embd=4, n_layer=2),
            ["fc2", "o_proj"],
            7,
            "blocks.0.attn.o_proj",
            (4, 4),
        ),
    ],
)
def test_rank_above_min_in_out_is_built_with_a_warning_naming_the_module(
    config, targets, r, bad_path, bad_shape
):
    """PEFT builds a rank above min(out, in) (a loaded adapter may have one): so does
    apply_lora, warning that the extra rank adds nothing; PiSSA, whose SVD has no more
    directions, refuses it naming the module and its shape, changing nothing."""
    model = make_gpt(GPTConfig(**config), 0)
    with pytest.warns(UserWarning, match="above min") as caught:
        apply_lora(model, LoRAConfig(r=r, target_modules=targets))
    assert bad_path in str(caught[0].message)
    assert model.get_submodule(bad_path).lora_A.shape == (r, bad_shape[1])
    model = make_gpt(GPTConfig(**config), 0)
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        apply_lora(model, LoRAConfig(r=r, target_modules=targets, init_lora_weights="pissa"))
    assert bad_path in str(info.value) and str(bad_shape) in str(info.value)
    assert f"r={r}" in str(info.value)
    assert snapshot(model) == before, "a refused apply_lora changed the model"
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"lora_alpha": 0}, "lora_alpha=0"),
        ({"lora_alpha": -1.0}, "lora_alpha=-1.0"),
        ({"lora_alpha": float("nan")}, "lora_alpha=nan"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"lora_dropout": -0.1}, "lora_dropout=-0.1"),
    ],
)
def test_lora_linear_constructor_refuses_what_lora_config_refuses(kwargs, named):
    """LoRALinear can be built without a LoRAConfig: it must check the same fields, at
    construction (not at the first training forward, or never)."""
    with pytest.raises(ValueError) as info:
        LoRALinear(5, 3, r=1, **kwargs)
    assert named in str(info.value)


def test_lora_linear_constructor_refuses_rank_above_min_in_out():
    with pytest.raises(ValueError, match=r"r=4.*\(3, 5\)"):
        LoRALinear(5, 3, r=4)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear(5, 3, r=1, init_lora_weights="xavier")


# --------------------------------------------------------------------------------------
# Zero-init equivalence
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_dropout", [0.0, 0.3])
@pytest.mark.parametrize("lora_dropout", [0.0, 0.4])
@settings(max_examples=8)
@given(data=st.data(), seed=seeds, dtype=float_dtypes)
def test_zero_init_gives_bitwise_the_base_model(model_dropout, lora_dropout, data, seed, dtype):
    """B = 0 at init, so the adapted model computes exactly what the base computed, in
    every mode, with LoRA dropout on the bypass, and with the base model's own dropouts
    drawing the same masks (the bypass dropout has its own generator)."""
    config, lora_config = data.draw(
        gpt_and_lora(dropout=st.just(model_dropout), lora_dropout=st.just(lora_dropout))
    )
    idx, targets = data.draw(token_batches(config))
    base = make_gpt(config, seed, dtype)
    model, _ = adapted(base, lora_config, seed + 1)
    for _, layer in lora_layers(model):
        assert not layer.lora_B.data.any(), "B must start at zero"
        assert layer.lora_A.data.any(), "A must start random"
    for mode in ("train", "eval"):
        base.train(mode == "train")
        model.train(mode == "train")
        minilora.manual_seed(seed + 2)
        base_logits, base_loss = base(idx, targets)
        minilora.manual_seed(seed + 2)
        logits, loss = model(idx, targets)  # with grad enabled, as in training
        assert np.array_equal(logits.numpy(), base_logits.numpy()), mode
        assert np.array_equal(loss.numpy(), base_loss.numpy()), mode
        loss.backward()  # and the graph is usable


# --------------------------------------------------------------------------------------
# Merge, unmerge, merge_and_unload, disable_adapters
# --------------------------------------------------------------------------------------

# Tolerances for merged vs unmerged outputs. In float64 the two orders of summation agree to
# ~1e-15 relative; 1e-10 leaves room and still catches any real error (a wrong scaling, a
# transposed B·A or a missed layer changes the logits by O(1) relative). In float32 each of
# up to ~8 chained matmuls per block, with inner dimensions up to 4·n_embd = 48, rounds
# differently: k·eps ≈ 48 · 1.2e-7 ≈ 6e-6 each, so ~1e-4 relative to the logits' scale
# after two blocks in the worst case (typically ~1e-6).
MERGE_RTOL = {np.float32: 1e-4, np.float64: 1e-10}


def close_to(a, b, rtol):
    scale = max(np.abs(b).max(), 1e-30)
    return np.abs(a - b).max() <= rtol * scale


@settings(max_examples=15)
@given(case=gpt_and_lora(), seed=seeds, dtype=float_dtypes, batch=st.data())
def test_merge_matches_unmerged_and_unmerge_restores_w(case, seed, dtype, batch):
    config, lora_config = case
    idx, _ = batch.draw(token_batches(config, min_len=2))  # T = 1: q, k do nothing
    base = make_gpt(config, seed, dtype)
    randomize_weights(base, seed)
    model, paths = adapted(base, lora_config, seed)
    randomize_B(model, seed)
    model.eval()
    unmerged = logits_of(model, idx)
    # the adapter changes the logits (how much depends on the layer: a q_proj update over two
    # positions moves them little, so the merged weights are checked exactly below as well)
    assert not np.array_equal(unmerged, logits_of(base, idx))
    layers = dict(lora_layers(model))
    W0 = {p: layers[p].weight.data.copy() for p in paths}
    merge_lora(model)
    for p in paths:
        layer = layers[p]
        assert layer.merged
        B64, A64 = layer.lora_B.data.astype(np.float64), layer.lora_A.data.astype(np.float64)
        expected = W0[p].astype(np.float64) + layer.scaling * (B64 @ A64)
        # W + s·B·A in the layer's dtype: an r-term dot product (r roundings, each at most
        # eps·Σ|B||A|), the scaling and the sum add one rounding each
        eps = np.finfo(dtype).eps
        size = np.abs(W0[p]) + layer.scaling * (np.abs(B64) @ np.abs(A64))
        bound = (layer.r + 2) * eps * size
        assert (np.abs(layer.weight.data - expected) <= bound).all(), p
    merged = logits_of(model, idx)
    assert close_to(merged, unmerged, MERGE_RTOL[dtype])
    unmerge_lora(model)
    for p in paths:
        layer = layers[p]
        assert not layer.merged
        delta = np.abs(layer.get_delta_weight())
        if dtype == np.float64:
            np.testing.assert_allclose(layer.weight.data, W0[p], rtol=0, atol=1e-12)
        else:
            # W + ΔW rounds once (≤ ½ ulp of |W + ΔW|), the subtraction once more (≤ ½ ulp
            # of |W|): together at most eps·(|W| + |ΔW|) per element
            bound = np.finfo(np.float32).eps * (np.abs(W0[p]) + delta)
            assert (np.abs(layer.weight.data - W0[p]) <= bound).all(), p
    assert close_to(logits_of(model, idx), unmerged, MERGE_RTOL[dtype])


def _one_layer(dtype=np.float64, seed=0, **kwargs):
    minilora.manual_seed(seed)
    layer = LoRALinear(5, 4, r=2, lora_alpha=4, dtype=dtype, **kwargs)
    layer.lora_B.data[...] = np.random.default_rng(seed).standard_normal((4, 2))
    return layer


def test_merging_twice_warns_and_changes_nothing():
    layer = _one_layer()
    layer.merge()
    once = layer.weight.data.copy()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert layer.weight.data.tobytes() == once.tobytes() and layer.merged


def test_unmerging_an_unmerged_layer_warns_and_changes_nothing():
    layer = _one_layer()
    w = layer.weight.data.copy()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    assert layer.weight.data.tobytes() == w.tobytes() and not layer.merged


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf in B·A
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_merge_refuses_a_non_finite_result_and_leaves_w(bad):
    layer = _one_layer()
    layer.lora_B.data[1, 0] = bad
    w = layer.weight.data.copy()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert layer.weight.data.tobytes() == w.tobytes() and not layer.merged
    layer.merge(safe_merge=False)  # the caller may insist
    assert layer.merged and not np.isfinite(layer.weight.data).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_merge_lora_refusal_leaves_every_layer_unmerged():
    """merge_lora on a model whose *last* adapter diverged must not leave the earlier layers
    merged: a refused merge changes nothing (as a refused load does)."""
    base = make_gpt(TINY, 0, np.float64)
    model, paths = adapted(base, LoRAConfig(r=2, target_modules=["q_proj", "lm_head"]))
    randomize_B(model, 0)
    layers = dict(lora_layers(model))
    layers["lm_head"].lora_B.data[0, 0] = np.inf
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_lora(model)
    assert not any(layer.merged for layer in layers.values())
    assert snapshot(model) == before
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_and_unload(model)
    assert sorted(p for p, _ in lora_layers(model)) == sorted(paths)
    assert snapshot(model) == before


def test_forward_while_merged_with_grad_in_training_raises():
    layer = _one_layer()
    x = Tensor(np.random.default_rng(1).standard_normal((3, 5)))
    expected = layer(x).numpy()
    layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="merged"):
        layer(x)
    with no_grad():  # inference on a merged layer is fine, and equal
        np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-12, atol=1e-14)


def test_a_merged_model_runs_in_eval_mode_without_no_grad():
    """As PEFT and loralib allow: model.eval(); model(idx) after merging."""
    base = make_gpt(TINY, 0)
    model, _ = adapted(base, LoRAConfig(r=2, target_modules=["q_proj", "fc1"]))
    randomize_B(model, 0)
    idx = np.array([[1, 2, 3, 4]])
    model.eval()
    unmerged = model(idx)[0].numpy()
    merge_lora(model)
    np.testing.assert_allclose(model(idx)[0].numpy(), unmerged, rtol=1e-5, atol=1e-6)
    model.train()  # training mode with gradients: still refused, it would train nothing
    with pytest.raises(RuntimeError, match="merged"):
        model(idx)


def test_apply_lora_on_adapted_layers_says_so_and_changes_nothing():
    base = make_gpt(TINY, 0)
    model, _ = adapted(base, LoRAConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(model)
    for targets in (["q_proj"], ["q_proj", "v_proj"]):
        with pytest.raises(ValueError, match=r"\['blocks.0.attn.q_proj'\] already have LoRA"):
            apply_lora(model, LoRAConfig(r=2, target_modules=targets))
        assert snapshot(model) == before


def test_apply_lora_takes_leaf_names_suffixes_and_full_paths_as_peft():
    base = make_gpt(TINY, 0, n_layer=2)
    for targets, want in (
        (["q_proj"], ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]),
        (["attn.q_proj"], ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]),
        (["blocks.1.attn.q_proj", "lm_head"], ["blocks.1.attn.q_proj", "lm_head"]),
    ):
        model, paths = adapted(base, LoRAConfig(r=1, target_modules=targets))
        assert sorted(paths) == want
    with pytest.raises(ValueError, match=r"\['blocks.2.attn.q_proj'\] match no Linear"):
        adapted(base, LoRAConfig(r=1, target_modules=["blocks.2.attn.q_proj"]))
    with pytest.raises(ValueError, match=r"\['ttn.q_proj'\] match no Linear"):
        adapted(base, LoRAConfig(r=1, target_modules=["ttn.q_proj"]))  # whole names only


def test_lora_config_takes_numpy_scalars_as_plain_numbers():
    config = LoRAConfig(r=np.int64(4), lora_alpha=np.float32(8.0))
    assert (config.r, config.lora_alpha) == (4, 8.0)
    assert type(config.r) is int and type(config.lora_alpha) is float
    assert type(LoRAConfig(lora_alpha=np.int32(16)).lora_alpha) is int
    for bad in ({"r": np.bool_(True)}, {"r": True}, {"lora_alpha": True}, {"r": np.float64(4)}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)


@settings(max_examples=10)
@given(case=gpt_and_lora(), seed=seeds, dtype=float_dtypes, batch=st.data())
def test_merge_and_unload_gives_a_plain_model_with_the_merged_logits(case, seed, dtype, batch):
    config, lora_config = case
    idx, _ = batch.draw(token_batches(config, min_len=2))  # T = 1: q, k do nothing
    base = make_gpt(config, seed, dtype)
    randomize_weights(base, seed)
    model, _ = adapted(base, lora_config, seed)
    randomize_B(model, seed)
    model.eval()
    merged_model = copy.deepcopy(model)
    merge_lora(merged_model)
    merged = logits_of(merged_model, idx)
    unloaded = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in unloaded.modules())
    assert not lora_layers(unloaded)
    assert {n for n, _ in unloaded.named_parameters()} == {n for n, _ in base.named_parameters()}
    assert np.array_equal(logits_of(unloaded, idx), merged)
    # an ordinary GPT again: its state dict loads into a fresh base model
    fresh = make_gpt(config, seed + 1, dtype).eval()
    fresh.load_state_dict(unloaded.state_dict())
    assert np.array_equal(logits_of(fresh, idx), merged)


@settings(max_examples=10)
@given(case=gpt_and_lora(), seed=seeds, dtype=float_dtypes, batch=st.data())
def test_disable_adapters_gives_the_base_model(case, seed, dtype, batch):
    config, lora_config = case
    idx, _ = batch.draw(token_batches(config, min_len=2))  # T = 1: q, k do nothing
    base = make_gpt(config, seed, dtype).eval()
    randomize_weights(base, seed)
    model, _ = adapted(base, lora_config, seed)
    randomize_B(model, seed)
    model.eval()
    adapted_logits = logits_of(model, idx)
    base_logits = logits_of(base, idx)
    assert not np.array_equal(adapted_logits, base_logits)
    with disable_adapters(model) as m:
        assert m is model
        assert np.array_equal(logits_of(model, idx), base_logits)
    assert np.array_equal(logits_of(model, idx), adapted_logits)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"), disable_adapters(model):
        pass


# --------------------------------------------------------------------------------------
# Parameter counts and freezing
# --------------------------------------------------------------------------------------


def closed_form_counts(config, lora_config):
    """(adapter params, trainable biases) from the shapes alone (REFERENCE.md "Counting")."""
    paths = expected_paths(config, lora_config.target_modules)
    shapes = [linear_shape(config, p.rsplit(".", 1)[-1]) for p in paths]
    adapters = sum(lora_config.r * (out_f + in_f) for out_f, in_f in shapes)
    if not config.bias or lora_config.bias == "none":
        return adapters, 0
    C = config.n_embd
    if lora_config.bias == "all":
        # per block: q, k, v, o (C each), fc1 (4C), fc2 (C), ln1, ln2 (C each); plus ln_f
        return adapters, config.n_layer * (4 * C + 4 * C + C + 2 * C) + C
    # "lora_only": the biases of the adapted layers (lm_head has none)
    with_bias = [out_f for (out_f, _), p in zip(shapes, paths, strict=True) if p != "lm_head"]
    return adapters, sum(with_bias)


@given(case=gpt_and_lora(), seed=seeds)
def test_parameter_counts_match_the_closed_form(case, seed):
    config, lora_config = case
    base = make_gpt(config, seed)
    model, _ = adapted(base, lora_config, seed)
    adapters, biases = closed_form_counts(config, lora_config)
    trainable = sum(p.size for p in model.parameters() if p.requires_grad)
    total = sum(p.size for p in model.parameters())
    base_total = sum(p.size for p in base.parameters())
    assert trainable == adapters + biases
    assert total == base_total + adapters
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lora_state_dict(model, lora_config.bias)) == trainable_names


@settings(max_examples=8)
@given(
    case=gpt_and_lora(dropout=st.sampled_from([0.0, 0.1]), lora_dropout=st.just(0.1)),
    seed=seeds,
    batch=st.data(),
)
def test_frozen_weights_are_bitwise_unchanged_after_training(case, seed, batch):
    config, lora_config = case
    idx, targets = batch.draw(token_batches(config, min_len=2))
    model, _ = adapted(make_gpt(config, seed), lora_config, seed)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.data.copy() for n, p in model.named_parameters() if p.requires_grad}
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter passed in
    model.train()
    for step in range(30):
        minilora.manual_seed(step)
        opt.zero_grad()
        model(idx, targets)[1].backward()
        for name, p in model.named_parameters():
            if name in frozen:
                assert p.grad is None, f"frozen {name} received a gradient"
        opt.step()
    params = dict(model.named_parameters())
    for name, data in frozen.items():
        assert params[name].data.tobytes() == data.tobytes(), f"frozen {name} changed"
        assert id(params[name]) not in opt.state, f"optimizer keeps state for frozen {name}"
    for name, data in trainable.items():  # (a k_proj bias can have an exactly zero grad)
        if "lora_" in name:
            assert not np.array_equal(params[name].data, data), f"{name} did not train"
    assert set(opt.state) == {id(params[n]) for n in trainable}


def test_mark_only_lora_as_trainable_modes():
    model, _ = adapted(make_gpt(TINY, 0), LoRAConfig(r=1, target_modules=["fc1"]))
    trainable = lambda: sorted(n for n, p in model.named_parameters() if p.requires_grad)  # noqa: E731
    mark_only_lora_as_trainable(model, "lora_only")
    assert trainable() == [
        "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc1.lora_A",
        "blocks.0.mlp.fc1.lora_B",
    ]
    mark_only_lora_as_trainable(model)
    assert trainable() == ["blocks.0.mlp.fc1.lora_A", "blocks.0.mlp.fc1.lora_B"]
    with pytest.raises(ValueError, match="bias='some'"):
        mark_only_lora_as_trainable(model, "some")


def test_a_base_checkpoint_loads_into_the_adapted_model():
    base = make_gpt(TINY, 0)
    model, paths = adapted(make_gpt(TINY, 1), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="lora_A"):  # strict: the adapters are missing
        model.load_state_dict(base.state_dict())
    model.load_state_dict(base.state_dict(), strict=False)
    idx = np.array([[1, 2, 3]])
    assert np.array_equal(logits_of(model.eval(), idx), logits_of(base.eval(), idx))


# --------------------------------------------------------------------------------------
# The fused layer: against its composition, and against finite differences
# --------------------------------------------------------------------------------------


@st.composite
def lora_linear_inputs(draw, separate_bypass=None):
    """x (..., in), W (out, in), b (out,) or None, A (r, in), B (out, r), s, [x_lora], float64."""
    in_f, out_f = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    r = draw(st.integers(1, min(in_f, out_f)))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple))
    rng = np.random.default_rng(draw(seeds))
    x = rng.uniform(-2, 2, (*lead, in_f))
    W = rng.uniform(-1, 1, (out_f, in_f))
    b = rng.uniform(-1, 1, (out_f,)) if draw(st.booleans()) else None
    A = rng.uniform(-1, 1, (r, in_f))
    B = rng.uniform(-1, 1, (out_f, r))  # non-zero: B = 0 would hide dA and the bypass dx
    s = draw(st.sampled_from([0.5, 1.0, 2.0, 16 / 3]))
    sep = draw(st.booleans()) if separate_bypass is None else separate_bypass
    x_lora = rng.uniform(-2, 2, x.shape) if sep else None
    return x, W, b, A, B, s, x_lora


def composed_lora_linear(x, W, b, A, B, s, x_lora=None):
    """The same layer from basic ops: F.linear(x, W, b) + s · (d @ Aᵀ) @ Bᵀ."""
    d = x if x_lora is None else x_lora
    return F.linear(x, W, b) + s * ((d @ A.T) @ B.T)


@given(args=lora_linear_inputs(), frozen_w=st.booleans(), seed=seeds)
def test_fused_lora_linear_equals_its_composition_in_outputs_and_gradients(args, frozen_w, seed):
    *arrays, s, x_lora = args
    arrays = arrays + ([] if x_lora is None else [x_lora])

    def run(fn):
        tensors = [None if a is None else Tensor(a.copy(), requires_grad=True) for a in arrays]
        if frozen_w:
            tensors[1].requires_grad_(False)
        x, W, b, A, B, *rest = tensors
        y = fn(x, W, b, A, B, s, *rest)
        g = np.random.default_rng(seed).standard_normal(y.shape)
        y.backward(g)
        return y.numpy(), [None if t is None else t.grad for t in tensors]

    y_fused, grads_fused = run(F.lora_linear)
    y_ref, grads_ref = run(composed_lora_linear)
    np.testing.assert_allclose(y_fused, y_ref, rtol=1e-12, atol=1e-12)
    names = ["x", "W", "b", "A", "B", "x_lora"]
    for name, gf, gr in zip(names, grads_fused, grads_ref, strict=False):
        if gr is None:
            assert gf is None, f"{name} is frozen or absent but got a gradient"
            continue
        assert gf is not None, f"no gradient for {name}"
        np.testing.assert_allclose(gf, gr, rtol=1e-10, atol=1e-12, err_msg=name)


@settings(max_examples=15)
@given(args=lora_linear_inputs(), freeze=st.sampled_from(["base", "none", "adapter_A"]))
def test_gradcheck_lora_linear(args, freeze):
    x, W, b, A, B, s, x_lora = args
    inputs = [x, W] + ([] if b is None else [b]) + [A, B] + ([] if x_lora is None else [x_lora])
    has_b, has_d = b is not None, x_lora is not None

    def fn(*ts):
        ts = list(ts)
        x_, W_ = ts.pop(0), ts.pop(0)
        b_ = ts.pop(0) if has_b else None
        A_, B_ = ts.pop(0), ts.pop(0)
        d_ = ts.pop(0) if has_d else None
        return F.lora_linear(x_, W_, b_, A_, B_, s, d_)

    i_A = 3 if has_b else 2
    no_grads = {"base": (1, 2) if has_b else (1,), "none": (), "adapter_A": (i_A,)}[freeze]
    assert gradcheck(fn, inputs, no_grads=no_grads)


@pytest.mark.parametrize("target", ["q_proj", "fc1", "lm_head"])
def test_gradcheck_tiny_gpt_with_lora_over_one_adapter(target):
    model, paths = adapted(
        make_gpt(TINY, 0, backend.float64),
        LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1", "lm_head"]),
    )
    rng = np.random.default_rng(1)
    for p in model.parameters():  # O(1) values: gradients far above gradcheck's atol
        p.data[...] += 0.5 * rng.standard_normal(p.shape)
    randomize_B(model, 2, scale=1.0)
    layer = dict(lora_layers(model))[next(p for p in paths if p.endswith(target))]
    idx = np.array([[1, 2, 3, 4], [0, 6, 6, 5]])
    targets = np.array([[2, 3, 4, 0], [6, 6, 5, 1]])
    A0, B0 = layer.lora_A, layer.lora_B

    def fn(a, b):
        layer.lora_A, layer.lora_B = a, b
        try:
            return model(idx, targets)[1]
        finally:
            layer.lora_A, layer.lora_B = A0, B0

    assert gradcheck(fn, [A0.data, B0.data])


# --------------------------------------------------------------------------------------
# Expressiveness
# --------------------------------------------------------------------------------------


def fit_update(out_f, in_f, r, seed, steps=400, lr=0.03):
    """Train a LoRALinear (W = 0, no bias, s = 1) with the engine so that its weight update
    s·B·A matches a random ΔW: feed the identity, y = I·(s·B·A)ᵀ, loss ||y − ΔWᵀ||²_F.
    Returns (reached error, singular values of ΔW)."""
    rng = np.random.default_rng(seed)
    delta = rng.standard_normal((out_f, in_f))
    minilora.manual_seed(seed)
    layer = LoRALinear(in_f, out_f, bias=False, r=r, lora_alpha=r, dtype=backend.float64)
    layer.weight.data[...] = 0.0
    layer.weight.requires_grad_(False)
    x, target = Tensor(np.eye(in_f)), Tensor(delta.T.copy())
    opt = AdamW([layer.lora_A, layer.lora_B], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        diff = layer(x) - target
        (diff * diff).sum().backward()
        opt.step()
    assert layer.weight.grad is None and not layer.weight.data.any()
    err = float(((layer.get_delta_weight() - delta) ** 2).sum())
    return err, np.linalg.svd(delta, compute_uv=False)


@settings(max_examples=6)
@given(out_f=st.integers(2, 6), in_f=st.integers(2, 6), seed=seeds)
def test_full_rank_lora_fits_any_update(out_f, in_f, seed):
    err, sv = fit_update(out_f, in_f, min(out_f, in_f), seed)
    assert err / (sv**2).sum() < 1e-6  # relative squared error; i.e. relative error < 1e-3


@settings(max_examples=6)
@given(out_f=st.integers(3, 6), in_f=st.integers(3, 6), seed=seeds, data=st.data())
def test_low_rank_lora_reaches_exactly_the_eckart_young_bound(out_f, in_f, seed, data):
    """The best rank-r approximation of ΔW in Frobenius norm leaves Σ_{i>r} σ_i²; LoRA trained
    to convergence reaches it (no spurious minima) and can never go below it."""
    r = data.draw(st.integers(1, min(out_f, in_f) - 1))
    err, sv = fit_update(out_f, in_f, r, seed, steps=600)
    tail, total = float((sv[r:] ** 2).sum()), float((sv**2).sum())
    assert err >= tail - 1e-9 * total, "below the Eckart-Young bound: impossible"
    assert err <= 1.03 * tail


# --------------------------------------------------------------------------------------
# Work saved by freezing (counted, not timed)
# --------------------------------------------------------------------------------------


@settings(max_examples=10)
@given(case=gpt_and_lora(), seed=seeds, batch=st.data())
def test_lora_step_computes_no_weight_gradient_for_frozen_weights(case, seed, batch):
    config, lora_config = case
    idx, targets = batch.draw(token_batches(config))
    base = make_gpt(config, seed)
    n_linear = 6 * config.n_layer + 1
    full = copy.deepcopy(base)
    loss = full(idx, targets)[1]
    with backend.counting() as counter:
        loss.backward()
    assert counter.count("linear.dweight") == n_linear  # full fine-tuning: every W

    model, paths = adapted(base, lora_config, seed)
    # a few weights may be unfrozen by hand (like PEFT's modules_to_save)
    linear_weights = [f"{p}.weight" for p, m in model.named_modules() if isinstance(m, Linear)]
    unfrozen = batch.draw(st.lists(st.sampled_from(linear_weights), unique=True, max_size=2))
    params = dict(model.named_parameters())
    for name in unfrozen:
        params[name].requires_grad_(True)
    loss = model(idx, targets)[1]
    with backend.counting() as counter:
        loss.backward()
    assert counter.count("linear.dweight") == len(unfrozen)
    assert counter.count("lora.dA") == len(paths) and counter.count("lora.dB") == len(paths)
    for name, p in params.items():
        assert (p.grad is not None) == p.requires_grad, name


# --------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_gaussian_init_has_a_std_of_one_over_r_and_b_zero(r):
    minilora.manual_seed(r)
    layer = LoRALinear(2000, 16, r=r, lora_alpha=8, init_lora_weights="gaussian")
    A = layer.lora_A.data.astype(np.float64)
    # r·2000 ≥ 2000 samples: the sample std is within ~3% of the true one (5 sigma)
    assert A.std() == pytest.approx(1.0 / r, rel=0.05)
    assert abs(A.mean()) < 5 * (1.0 / r) / math.sqrt(A.size)
    assert not layer.lora_B.data.any() and layer.lora_B.shape == (16, r)


@pytest.mark.parametrize("in_f", [4, 64, 1000])
def test_kaiming_init_is_uniform_within_one_over_sqrt_in(in_f):
    minilora.manual_seed(in_f)
    layer = LoRALinear(in_f, 8, r=4, lora_alpha=8, init_lora_weights="kaiming")
    A = np.abs(layer.lora_A.data.astype(np.float64))
    bound = 1.0 / math.sqrt(in_f)
    assert A.max() <= bound
    # uniform on [-bound, bound]: E|a| = bound/2 and the range is actually used
    if A.size >= 256:
        assert A.mean() == pytest.approx(bound / 2, rel=0.1)
        assert A.max() > 0.95 * bound
    assert not layer.lora_B.data.any()


def test_apply_lora_init_is_seeded_and_each_layer_gets_its_own_a():
    base = make_gpt(TINY, 0)
    config = LoRAConfig(r=2, target_modules=["q_proj", "k_proj"])
    a, _ = adapted(base, config, seed=5)
    b, _ = adapted(base, config, seed=5)
    c, _ = adapted(base, config, seed=6)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["blocks.0.attn.q_proj.lora_A"], sc["blocks.0.attn.q_proj.lora_A"])
    assert not np.array_equal(sa["blocks.0.attn.q_proj.lora_A"], sa["blocks.0.attn.k_proj.lora_A"])
    gen_a = apply_lora(copy.deepcopy(base), config, generator=backend.Generator(1))
    assert gen_a == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj"]


def test_peft_spelling_loraconfig_is_the_same_class():
    assert minilora.LoraConfig is LoRAConfig
    assert minilora.LoraConfig(r=2, target_modules=["q_proj"]).scaling == 4.0  # alpha 8 / r 2
