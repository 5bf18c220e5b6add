"""Several named adapters on one model (minilora/variants/multi_adapter.py): add, set, disable,
delete, save and load by name, training only the active one, and the combinations
``add_weighted_adapter`` "cat" (exactly the weighted sum of the updates) and "svd" (its
best rank-k approximation, error equal to the singular-value tail), with PEFT as the
oracle for both; and why PEFT's "linear" is not the weighted sum (its cross terms)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt, randomize_weights, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora.interop import peft_adapters
from minilora.lora import apply_lora, disable_adapters, lora_layers, lora_state_dict, merge_lora
from minilora.nn import Linear
from minilora.variants.multi_adapter import (
    active_adapter,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    set_adapter,
    unload,
)

COMBINATIONS = ["cat", "svd"]
IDX = np.array([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
A_CFG = ml.LoRAConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"])
B_CFG = ml.LoRAConfig(
    r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "v_proj"], use_rslora=True
)
C_CFG = ml.LoRAConfig(r=1, lora_alpha=2, target_modules=["fc1", "o_proj"])
PATHS = [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
PATHS += [f"blocks.{i}.mlp.{n}" for i in range(2) for n in ("fc1", "fc2")]


def base(seed=0):
    return randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), seed)


def randomize_adapter(model, seed):
    """A non-zero B (and a fresh A), as after training, for the active adapter."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data[...] = rng.standard_normal(p.shape)


def logits(model):
    with ml.no_grad():
        return model(IDX)[0].data.copy()


def single(config, tensors, seed=0):
    """The one-adapter model: the same base, ``apply_lora(config)``, the given tensors."""
    model = base(seed)
    apply_lora(model, config)
    for name, p in model.named_parameters():
        if name in tensors:
            p.data[...] = tensors[name]
    return model


def two_adapters():
    """ "default" (A_CFG on q, v) and "b" (B_CFG on q, k, v, rsLoRA), both non-zero;
    "default" active."""
    model = base()
    apply_lora(model, A_CFG)
    randomize_adapter(model, 1)
    add_adapter(model, "b", B_CFG)
    set_adapter(model, "b")
    randomize_adapter(model, 2)
    set_adapter(model, "default")
    return model


def delta(layer):
    return layer.get_delta_weight()


def layers_of(model, name):
    """{path: layer} of a named adapter, by making it active for a moment."""
    previous = active_adapter(model)
    set_adapter(model, name)
    found = dict(lora_layers(model))
    set_adapter(model, previous)
    return found


# ======================================================================================
# add, set, disable, delete
# ======================================================================================


def test_the_active_adapter_computes_what_its_single_adapter_model_computes():
    model = two_adapters()
    assert adapter_names(model) == ["default", "b"] and active_adapter(model) == "default"
    tensors_a = lora_state_dict(model)
    np.testing.assert_array_equal(logits(model), logits(single(A_CFG, tensors_a)))
    set_adapter(model, "b")
    tensors_b = lora_state_dict(model)
    assert {n.rsplit(".", 2)[-2] for n in tensors_b} == {"q_proj", "k_proj", "v_proj"}
    np.testing.assert_array_equal(logits(model), logits(single(B_CFG, tensors_b)))
    # only the active adapter's parameters are the model's
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in single(B_CFG, tensors_b).named_parameters()}
    with disable_adapters(model):
        np.testing.assert_array_equal(logits(model), logits(base()))
    set_adapter(model, "default")
    assert type(model.get_submodule("blocks.0.attn.k_proj")) is Linear  # "b" alone adapts k
    np.testing.assert_array_equal(logits(model), logits(single(A_CFG, tensors_a)))


def test_apply_lora_creates_default_and_add_adapter_keeps_it_active():
    model = base()
    apply_lora(model, A_CFG)
    assert adapter_names(model) == ["default"] and active_adapter(model) == "default"
    before = logits(model)
    add_adapter(model, "b", B_CFG)
    assert active_adapter(model) == "default"
    np.testing.assert_array_equal(logits(model), before)
    # a new adapter starts at zero: its model is the base model
    set_adapter(model, "b")
    np.testing.assert_array_equal(logits(model), logits(base()))


def test_the_first_adapter_added_to_a_base_model_is_active_under_its_name():
    model = base()
    add_adapter(model, "mine", A_CFG)
    assert adapter_names(model) == ["mine"]
    assert {p for p, _ in lora_layers(model)} == {
        f"blocks.{i}.attn.{n}_proj" for i in (0, 1) for n in "qv"
    }


def test_deleting_an_added_adapter_restores_the_model():
    model = two_adapters()
    delete_adapter(model, "b")
    before, out = snapshot(model), logits(model)
    add_adapter(model, "c", C_CFG)
    set_adapter(model, "c")
    randomize_adapter(model, 5)
    set_adapter(model, "default")
    delete_adapter(model, "c")
    assert adapter_names(model) == ["default"]
    assert snapshot(model) == before
    np.testing.assert_array_equal(logits(model), out)


def test_unload_gives_the_base_model_back():
    model = two_adapters()
    unload(model)
    assert not lora_layers(model)
    np.testing.assert_array_equal(logits(model), logits(base()))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        active_adapter(model)


def test_merge_and_unload_drops_every_adapter_and_a_new_one_is_default():
    model = two_adapters()
    ml.merge_and_unload(model)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        adapter_names(model)
    apply_lora(model, C_CFG)
    assert adapter_names(model) == ["default"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: set_adapter(m, "nope"), r"no adapter named 'nope'.*\['default', 'b'\]"),
        (lambda m: delete_adapter(m, "nope"), "no adapter named 'nope'"),
        (lambda m: delete_adapter(m, "default"), "'default' is the active adapter.*'b'"),
        (lambda m: add_adapter(m, "b", C_CFG), "'b' already exists"),
        (lambda m: add_adapter(m, "default", C_CFG), "'default' already exists"),
        (
            lambda m: add_adapter(m, "c", ml.LoRAConfig(target_modules=["fc1"], bias="all")),
            "bias='all'",
        ),
        (
            lambda m: add_adapter(m, "c", ml.LoRAConfig(target_modules=["nothing"])),
            r"\['nothing'\] match no Linear",
        ),
    ],
)
def test_refused_calls_change_nothing(call, match):
    model = two_adapters()
    before, names = snapshot(model), adapter_names(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert snapshot(model) == before and adapter_names(model) == names


def test_bad_names_and_configs_are_type_errors():
    model = two_adapters()
    with pytest.raises(TypeError, match="adapter_name=3"):
        add_adapter(model, 3, C_CFG)
    with pytest.raises(TypeError, match="config must be a LoRAConfig"):
        add_adapter(model, "c", {"r": 2})


def test_the_only_adapter_cannot_be_deleted():
    model = base()
    apply_lora(model, A_CFG)
    with pytest.raises(ValueError, match="the only one.*unload"):
        delete_adapter(model, "default")


def test_a_model_that_trains_biases_takes_no_second_adapter():
    model = base()
    apply_lora(model, ml.LoRAConfig(target_modules=["q_proj"], bias="all", r=2))
    with pytest.raises(ValueError, match="trainable biases"):
        add_adapter(model, "b", C_CFG)


def test_pissa_is_refused_beside_other_adapters_and_changes_nothing():
    # PiSSA's layers hold the residual W0 - s·B·A as their weight: beside other adapters,
    # those would run on the residual (measured: logits off by 18 on the shipped base)
    pissa = ml.LoRAConfig(r=2, lora_alpha=4, init_lora_weights="pissa")
    model = base()
    apply_lora(model, A_CFG)
    randomize_adapter(model, 1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="PiSSA must be the only adapter"):
        add_adapter(model, "p", pissa)
    assert snapshot(model) == before
    model = base()
    apply_lora(model, pissa)
    before = snapshot(model)
    with pytest.raises(ValueError, match="the active adapter is PiSSA"):
        add_adapter(model, "b", C_CFG)
    assert snapshot(model) == before


def test_swaps_are_refused_while_merged_or_disabled():
    model = two_adapters()
    merge_lora(model)
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
        set_adapter(model, "b")
    ml.unmerge_lora(model)
    with disable_adapters(model), pytest.raises(ValueError, match="disabled"):
        set_adapter(model, "b")
    set_adapter(model, "b")  # allowed again


def test_merging_the_active_adapter_merges_it_alone():
    model = two_adapters()
    set_adapter(model, "b")
    want = logits(model)
    w0 = {p: layer.weight.data.copy() for p, layer in lora_layers(model)}
    merge_lora(model)
    np.testing.assert_allclose(logits(model), want, rtol=1e-12, atol=1e-12)
    ml.unmerge_lora(model)
    for p, layer in lora_layers(model):
        np.testing.assert_allclose(layer.weight.data, w0[p], rtol=0, atol=1e-14)
    # "default" was not touched by the merge (the shared weights differ by the rounding of
    # one merge and unmerge)
    set_adapter(model, "default")
    want = logits(single(A_CFG, lora_state_dict(model)))
    np.testing.assert_allclose(logits(model), want, rtol=1e-12, atol=1e-12)


def test_a_training_step_moves_only_the_active_adapter():
    model = two_adapters()
    set_adapter(model, "b")
    shelved = {
        p: (la.lora_A.data.copy(), la.lora_B.data.copy())
        for p, la in layers_of(model, "default").items()
    }
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    active = {n: p.data.copy() for n, p in model.named_parameters() if p.requires_grad}
    assert active and all(".lora_" in n for n in active)
    opt = ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    _, loss = model(IDX, IDX)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in active:
            assert not np.array_equal(p.data, active[n]), n
        else:
            np.testing.assert_array_equal(p.data, frozen[n], err_msg=n)
    for p, layer in layers_of(model, "default").items():
        np.testing.assert_array_equal(layer.lora_A.data, shelved[p][0])
        np.testing.assert_array_equal(layer.lora_B.data, shelved[p][1])
        assert layer.lora_A.grad is None and layer.lora_B.grad is None


def test_shelved_adapters_follow_the_model_to_eval_mode():
    model = two_adapters()
    model.eval()
    set_adapter(model, "b")
    assert all(not layer.training for _, layer in lora_layers(model))


@pytest.mark.parametrize("combination_type", COMBINATIONS)
def test_shelved_adapters_follow_the_model_to_a_device(combination_type):
    """On the stand-in device (a GPU's rules on the CPU, tests/standin.py): a shelved
    adapter comes back on the model's device, and combining runs there, bitwise as on
    the CPU."""
    import standin

    standin.register()
    cpu = two_adapters()
    add_weighted_adapter(cpu, ["default", "b"], [0.5, -2.0], "mix", combination_type)
    model = two_adapters().to("standin")
    add_weighted_adapter(model, ["default", "b"], [0.5, -2.0], "mix", combination_type)
    for name in ("b", "mix"):
        set_adapter(model, name)
        set_adapter(cpu, name)
        assert all(ml.backend.device_of(p.data) == "standin" for p in model.parameters())
        np.testing.assert_array_equal(ml.backend.to_numpy(logits(model)), logits(cpu))


# ======================================================================================
# Saving and loading named adapters
# ======================================================================================


def test_a_named_adapter_saves_and_loads_by_name(tmp_path):
    model = two_adapters()
    peft_adapters.save_adapter(model, tmp_path / "b", B_CFG, adapter_name="b")
    assert active_adapter(model) == "default"
    peft_adapters.save_adapter(model, tmp_path / "a", A_CFG)
    set_adapter(model, "b")
    want_b = logits(model)
    peft_adapters.save_adapter(model, tmp_path / "b_active", B_CFG)
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the same files
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "b_active" / name).read_bytes()

    fresh = base()
    peft_adapters.load_adapter(fresh, tmp_path / "a")
    peft_adapters.load_adapter(fresh, tmp_path / "b", adapter_name="b")
    assert adapter_names(fresh) == ["default", "b"]
    set_adapter(model, "default")
    np.testing.assert_array_equal(logits(fresh), logits(model))
    set_adapter(fresh, "b")
    np.testing.assert_array_equal(logits(fresh), want_b)

    before = snapshot(fresh)
    with pytest.raises(ValueError, match="'b' already exists"):
        peft_adapters.load_adapter(fresh, tmp_path / "a", adapter_name="b")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError):
        peft_adapters.load_adapter(fresh, tmp_path / "a", adapter_name="c")
    assert snapshot(fresh) == before and adapter_names(fresh) == ["b", "default"]
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        peft_adapters.save_adapter(fresh, tmp_path / "z", B_CFG, adapter_name="zz")


def test_an_adapter_that_trains_biases_is_not_loaded_beside_others(tmp_path):
    config = ml.LoRAConfig(r=2, target_modules=["fc1"], bias="all")
    other = base()
    apply_lora(other, config)
    peft_adapters.save_adapter(other, tmp_path, config)
    model = two_adapters()
    before, names = snapshot(model), adapter_names(model)
    with pytest.raises(ValueError, match=r"trains biases \['blocks.0.ln1.bias'"):
        peft_adapters.load_adapter(model, tmp_path, adapter_name="c")
    assert snapshot(model) == before and adapter_names(model) == names


def test_loading_by_name_into_a_base_model_makes_it_active(tmp_path):
    model = two_adapters()
    peft_adapters.save_adapter(model, tmp_path, A_CFG)
    fresh = base()
    peft_adapters.load_adapter(fresh, tmp_path, adapter_name="x")
    assert adapter_names(fresh) == ["x"]
    np.testing.assert_array_equal(logits(fresh), logits(model))


# ======================================================================================
# add_weighted_adapter
# ======================================================================================


@st.composite
def adapter_sets(draw):
    """A model with 1-3 random non-zero adapters (ranks, alphas, rsLoRA, targets) and a
    weight for each."""
    n = draw(st.integers(1, 3))
    configs = [
        ml.LoRAConfig(
            r=draw(st.integers(1, 3)),
            lora_alpha=draw(st.floats(0.5, 16)),
            use_rslora=draw(st.booleans()),
            target_modules=draw(
                st.lists(st.sampled_from(PATHS), min_size=1, max_size=4, unique=True)
            ),
        )
        for _ in range(n)
    ]
    weights = draw(st.lists(st.floats(-2, 2), min_size=n, max_size=n))
    model = base()
    names = [f"a{i}" for i in range(n)]
    for i, (name, config) in enumerate(zip(names, configs, strict=True)):
        add_adapter(model, name, config)
        set_adapter(model, name)
        randomize_adapter(model, i)
    return model, names, configs, weights


def weighted_sum(model, names, weights):
    """{path: Σ wᵢ sᵢ Bᵢ Aᵢ}, over the adapters that adapt each path."""
    total = {}
    for name, w in zip(names, weights, strict=True):
        for path, layer in layers_of(model, name).items():
            total[path] = total.get(path, 0) + w * delta(layer)
    return total


@settings(max_examples=30, deadline=None)
@given(adapter_sets())
def test_cat_is_exactly_the_weighted_sum_of_the_updates(case):
    model, names, configs, weights = case
    want = weighted_sum(model, names, weights)
    config = add_weighted_adapter(model, names, weights, "mix", combination_type="cat")
    assert config.r == config.lora_alpha == sum(c.r for c in configs) and config.scaling == 1
    got = layers_of(model, "mix")
    assert set(got) == set(want)
    for path, layer in got.items():
        assert layer.r == config.r and layer.scaling == 1
        np.testing.assert_allclose(delta(layer), want[path], rtol=1e-12, atol=1e-12)
    # and the model with "mix" active computes W0 + Σ wᵢ ΔWᵢ
    set_adapter(model, "mix")
    merged = base()
    for path, d in want.items():
        merged.get_submodule(path).weight.data += d
    np.testing.assert_allclose(logits(model), logits(merged), rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(adapter_sets(), st.integers(1, 8))
def test_svd_is_the_best_rank_k_approximation(case, k):
    model, names, _, weights = case
    want = weighted_sum(model, names, weights)
    config = add_weighted_adapter(model, names, weights, "mix", svd_rank=k)
    assert config.r == config.lora_alpha == k and config.scaling == 1
    for path, layer in layers_of(model, "mix").items():
        assert layer.lora_A.shape[0] == layer.lora_B.shape[1] == k
        s = np.linalg.svd(want[path], compute_uv=False)  # the sum's singular values
        error = np.linalg.norm(want[path] - delta(layer))  # Frobenius
        assert error == pytest.approx(np.sqrt(np.sum(s[k:] ** 2)), rel=1e-9, abs=1e-10)
        np.testing.assert_allclose(
            np.linalg.svd(delta(layer), compute_uv=False)[:k], s[:k], rtol=1e-9, atol=1e-10
        )


def test_svd_with_the_default_rank_is_exact_for_one_adapter():
    model = two_adapters()
    add_weighted_adapter(model, ["b"], [0.5], "half")  # "svd", rank max(r) = 3
    for path, layer in layers_of(model, "half").items():
        want = 0.5 * delta(layers_of(model, "b")[path])
        np.testing.assert_allclose(delta(layer), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"combination_type": "lin"}, "combination_type='lin' must be one of .*'dare_ties'"),
        ({"combination_type": "linear"}, r"same rank; \['default', 'b'\] have ranks \[2, 3\]"),
        ({"combination_type": "ties"}, r"'ties' prunes: density=None must be .* in \[0, 1\]"),
        ({"combination_type": "dare_ties_svd", "density": 1.5}, "density=1.5 must be"),
        ({"density": 0.5}, "density=0.5 is used by .* not 'svd'"),
        ({"combination_type": "cat", "majority_sign_method": "most"}, "'most' must be one of"),
        ({"weights": [1.0]}, "one per adapter"),
        ({"weights": [1.0, float("nan")]}, "finite"),
        ({"adapters": ["default", "zz"]}, "no adapter named 'zz'"),
        ({"adapter_name": "b"}, "'b' already exists"),
        ({"combination_type": "cat", "svd_rank": 2}, "svd_rank=2 is used by the '\\*svd' types"),
        ({"svd_rank": 9}, "r=9 .* larger than min"),
    ],
)
def test_add_weighted_adapter_refuses_bad_input_changing_nothing(kwargs, match):
    model = two_adapters()
    before, names = snapshot(model), adapter_names(model)
    args = {"adapters": ["default", "b"], "weights": [1.0, -0.5], "adapter_name": "mix"}
    with pytest.raises(ValueError, match=match):
        add_weighted_adapter(model, **{**args, **kwargs})
    assert snapshot(model) == before and adapter_names(model) == names


# ======================================================================================
# Why PEFT's "linear" is not the weighted sum (docs/math.md)
# ======================================================================================


def peft_linear(adapters, weights):
    """PEFT's "linear" combination of equal-rank adapters (A, B, s), for wᵢsᵢ > 0:
    A' = Σ √(wᵢsᵢ) Aᵢ, B' = Σ √(wᵢsᵢ) Bᵢ, new scaling 1: B'A'."""
    A = sum(np.sqrt(w * s) * a for (a, _, s), w in zip(adapters, weights, strict=True))
    B = sum(np.sqrt(w * s) * b for (_, b, s), w in zip(adapters, weights, strict=True))
    return B @ A


def weighted(adapters, weights):
    return sum(w * s * b @ a for (a, b, s), w in zip(adapters, weights, strict=True))


def test_linear_adds_cross_terms_and_is_the_sum_only_without_them():
    rng = np.random.default_rng(0)
    adapters = [(rng.standard_normal((2, 5)), rng.standard_normal((4, 2)), s) for s in (0.5, 2.0)]
    weights = [0.3, 0.7]
    want, got = weighted(adapters, weights), peft_linear(adapters, weights)
    assert np.linalg.norm(got - want) > 0.1 * np.linalg.norm(want)  # not the weighted sum
    (a1, b1, s1), (a2, b2, s2) = adapters
    cross = np.sqrt(weights[0] * s1 * weights[1] * s2) * (b1 @ a2 + b2 @ a1)
    np.testing.assert_allclose(got, want + cross, rtol=1e-12, atol=1e-12)  # exactly those
    # Adapters in disjoint rank slots (Bᵢ Aⱼ = 0 for i ≠ j) have no cross terms: equal
    a1[1], a2[0], b1[:, 1], b2[:, 0] = 0, 0, 0, 0
    np.testing.assert_allclose(
        peft_linear(adapters, weights), weighted(adapters, weights), rtol=1e-12, atol=1e-12
    )


def test_the_two_by_two_counterexample_of_docs_math():
    e = np.eye(2)
    adapters = [(e[:1], e[:, :1], 1.0), (e[1:], e[:, 1:], 1.0)]  # (A (1, 2), B (2, 1), s)
    np.testing.assert_array_equal(weighted(adapters, [1, 1]), e)
    np.testing.assert_array_equal(peft_linear(adapters, [1, 1]), np.ones((2, 2)))


# ======================================================================================
# PEFT as the oracle
# ======================================================================================


def peft_combination(tmp_path, model, configs, weights, combination_type, svd_rank=None):
    """Save minilora's adapters, load them by name in PEFT on the PyTorch port, combine
    them there: {path: PEFT's layer} and the PEFT model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch", reason="PEFT parity needs PyTorch")
    peft = pytest.importorskip("peft", reason="PEFT parity needs PEFT")
    from examples.torch_gpt import TorchGPT, load_minilora_state

    names = adapter_names(model)
    for name, config in zip(names, configs, strict=True):
        peft_adapters.save_adapter(model, tmp_path / name, config, adapter_name=name)
    port = TorchGPT(TINY_2x2).to(torch.float64)
    load_minilora_state(port, base().state_dict())
    p = peft.PeftModel.from_pretrained(port, tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        p.load_adapter(tmp_path / name, adapter_name=name)
    p.to(torch.float64)  # PEFT made the adapters float32
    p.add_weighted_adapter(
        names, weights, "mix", combination_type=combination_type, svd_rank=svd_rank
    )
    inner = p.base_model.model
    return {
        path: inner.get_submodule(path)
        for path in PATHS
        if "mix" in getattr(inner.get_submodule(path), "lora_A", {})
    }


@pytest.mark.oracle
@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_combinations_match_peft(tmp_path, combination_type):
    model = base()
    configs = [A_CFG, ml.LoRAConfig(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj"]), C_CFG]
    for i, (name, config) in enumerate(zip(["a", "b", "c"], configs, strict=True)):
        add_adapter(model, name, config)
        set_adapter(model, name)
        randomize_adapter(model, i)
    set_adapter(model, "a")
    # exact in float32: PEFT's svd makes a float32 tensor of the weights (its SVD is
    # torch.linalg.svd, default driver, with svd_clamp None: no clamping)
    weights = [0.75, -1.25, 2.0]
    theirs = peft_combination(tmp_path, model, configs, weights, combination_type, svd_rank=2)
    add_weighted_adapter(
        model,
        ["a", "b", "c"],
        weights,
        "mix",
        combination_type,
        svd_rank=2 if combination_type == "svd" else None,
    )
    ours = layers_of(model, "mix")
    assert set(ours) == set(theirs)
    for path, layer in ours.items():
        their = theirs[path]
        want = their.get_delta_weight("mix").detach().numpy()
        np.testing.assert_allclose(delta(layer), want, rtol=1e-10, atol=1e-12, err_msg=path)
        if combination_type == "cat":  # the same tensors, not only the same product
            np.testing.assert_array_equal(
                layer.lora_A.data, their.lora_A["mix"].weight.detach().numpy()
            )
            np.testing.assert_array_equal(
                layer.lora_B.data, their.lora_B["mix"].weight.detach().numpy()
            )


@pytest.mark.oracle
def test_peft_cat_scales_an_rslora_first_adapter_by_sqrt_r(tmp_path):
    """PEFT copies the first adapter's use_rslora into the combination, whose lora_alpha
    is its rank r: its scaling becomes √r instead of 1. minilora's is 1."""
    model = two_adapters()  # "default" plain, "b" rsLoRA
    set_adapter(model, "b")
    weights = [1.0, 0.5]
    theirs = peft_combination(tmp_path, model, [B_CFG, A_CFG], weights, "cat")
    add_weighted_adapter(model, ["b", "default"], weights, "mix", "cat")
    ours = layers_of(model, "mix")
    for path, layer in ours.items():
        want = theirs[path].get_delta_weight("mix").detach().numpy()
        np.testing.assert_allclose(np.sqrt(5) * delta(layer), want, rtol=1e-10, atol=1e-12)


@pytest.mark.oracle
def test_peft_linear_is_the_formula_with_cross_terms(tmp_path):
    """The formula above is PEFT's "linear" (so the counterexample is about PEFT)."""
    model = base()
    configs = [A_CFG, ml.LoRAConfig(r=2, lora_alpha=7, target_modules=["q_proj", "k_proj"])]
    for i, (name, config) in enumerate(zip(["a", "b"], configs, strict=True)):
        add_adapter(model, name, config)
        set_adapter(model, name)
        randomize_adapter(model, i)
    set_adapter(model, "a")
    weights = [0.75, 1.5]
    theirs = peft_combination(tmp_path, model, configs, weights, "linear")
    mine = [layers_of(model, name) for name in ("a", "b")]
    for path, their in theirs.items():
        pairs = [(m[path], w) for m, w in zip(mine, weights, strict=True) if path in m]
        adapters = [(la.lora_A.data, la.lora_B.data, la.scaling) for la, _ in pairs]
        want = peft_linear(adapters, [w for _, w in pairs])
        got = their.get_delta_weight("mix").detach().numpy()
        # PEFT rounds the √(wᵢsᵢ) to float32 (a float32 tensor of weights): ~1e-7 relative
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=path)
        if len(pairs) == 2:  # q_proj: both adapters, so cross terms
            assert np.linalg.norm(got - weighted(adapters, [w for _, w in pairs])) > 0.1
