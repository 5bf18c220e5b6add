"""VeRA (minilora/variants/vera.py): the reference op's backward against central differences, the
zero-init equivalence, the parameter count L̂·(r + out), merge and unmerge, the shared
projections drawn bit for bit as PEFT draws them, fused layers (GPT-2's c_attn as q, k, v:
one λ_d, rows of vera_B from an offset) and their files in GPT-2's names, and PEFT parity on
a whole model (logits, gradients, adapter folders both ways)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import TINY_2x2, logits_of, make_gpt, randomize_weights, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora.gradcheck import gradcheck
from minilora.interop import hf_gpt2, model_files, vera_adapters
from minilora.interop.safetensors_files import read_safetensors, serialize
from minilora.lora import count_parameters
from minilora.variants import vera

TARGETS = ["q_proj", "fc1", "fc2"]
IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
TARGETS_OUT = np.array([[4, 1, 0, 9, 3, 2], [1, 4, 2, 10, 5, 7]], dtype=np.int64)


def vera_model(dtype=np.float64, r=4, key=3, seed=0, targets=TARGETS):
    """A TINY_2x2 GPT with O(1) weights and VeRA on ``targets``; the λ vectors random."""
    model = randomize_weights(make_gpt(TINY_2x2, seed, dtype), seed)
    config = vera.VeraConfig(r=r, target_modules=targets, projection_prng_key=key)
    vera.apply_vera(model, config)
    return model, config


def randomize_lambdas(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _, layer in vera.vera_layers(model):
        for leaf in vera.VERA_LEAVES:
            p = getattr(layer, leaf)
            p.data[...] = rng.normal(0, 1.0, p.shape)


# --------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 3),
    shape=st.sampled_from([(3, 4, 2), (5, 2, 3), (4, 4, 4)]),
    freeze=st.sampled_from(["vera", "none", "only_lambdas"]),
    bias=st.booleans(),
    separate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gradcheck_vera_linear(n, shape, freeze, bias, separate, seed):
    """Every input against central differences; VeRA's frozen W, b, A and B get none (and,
    with "only_lambdas", neither do the inputs: the op then skips the bypass gradient)."""
    n_in, n_out, r = shape
    rng = np.random.default_rng(seed)
    inputs = [rng.normal(size=(n, 2, n_in)), rng.normal(size=(n_out, n_in))]
    inputs += [rng.normal(size=(n_out,))] if bias else []
    inputs += [rng.normal(size=(r, n_in)), rng.normal(size=(n_out, r))]
    inputs += [rng.normal(size=(r,)), rng.normal(size=(n_out,))]
    inputs += [rng.normal(size=(n, 2, n_in))] if separate else []

    def fn(*ts):
        ts = list(ts)
        x, w = ts.pop(0), ts.pop(0)
        b = ts.pop(0) if bias else None
        A, B, ld, lb = (ts.pop(0) for _ in range(4))
        d = ts.pop(0) if separate else None
        return vera.vera_linear(x, w, b, A, B, ld, lb, d)

    k = 1 if bias else 0  # W, (b), A, B follow x
    only_lambdas = (*range(0, 4 + k), *((6 + k,) if separate else ()))  # x, W, (b), A, B, d
    frozen = {"vera": tuple(range(1, 4 + k)), "none": (), "only_lambdas": only_lambdas}[freeze]
    assert gradcheck(fn, inputs, no_grads=frozen)


def test_vera_linear_is_the_formula():
    rng = np.random.default_rng(0)
    x, W, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4,))
    A, B, ld, lb = (
        rng.normal(size=(2, 5)),
        rng.normal(size=(4, 2)),
        rng.normal(size=2),
        rng.normal(size=4),
    )
    y = vera.vera_linear(ml.Tensor(x), ml.Tensor(W), ml.Tensor(b), *map(ml.Tensor, (A, B, ld, lb)))
    want = x @ W.T + b + lb * ((ld * (x @ A.T)) @ B.T)
    np.testing.assert_allclose(y.data, want, rtol=1e-12, atol=1e-12)


def test_vera_linear_refuses_a_wrong_shape_naming_it():
    rng = np.random.default_rng(0)
    args = [rng.normal(size=s) for s in ((3, 5), (4, 5))] + [None]
    args += [rng.normal(size=s) for s in ((2, 5), (4, 2), (3,), (4,))]
    with pytest.raises(ValueError, match=r"lambda_d has shape \(3,\), expected \(2,\)"):
        vera.vera_linear(*[a if a is None else ml.Tensor(a) for a in args])


# --------------------------------------------------------------------------------------
# The layer and the model
# --------------------------------------------------------------------------------------


def test_zero_init_equivalence_and_only_the_lambdas_train():
    base = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
    want = logits_of(base, IDX)
    model, config = vera_model(np.float32)
    np.testing.assert_array_equal(logits_of(model, IDX), want)  # λ_b = 0: bitwise the base
    layer = model.get_submodule("blocks.0.mlp.fc1")
    assert (layer.vera_lambda_b.data == 0).all()
    assert (layer.vera_lambda_d.data == np.float32(0.1)).all()
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {
        f"{p}.{leaf}" for p, _ in vera.vera_layers(model) for leaf in vera.VERA_LEAVES
    }


def test_projections_are_shared_sized_to_the_largest_target_and_sliced():
    model, config = vera_model()
    layers = dict(vera.vera_layers(model))
    q, fc2 = layers["blocks.0.attn.q_proj"], layers["blocks.1.mlp.fc2"]
    assert q.vera_A is fc2.vera_A and q.vera_B is fc2.vera_B  # one pair for the model
    assert q.vera_A.shape == (4, 32) and q.vera_B.shape == (32, 4)  # fc2's in, fc1's out
    A, B = fc2.projections()  # fc2: in 32, out 8
    np.testing.assert_array_equal(A.data, q.vera_A.data[:, :32])
    np.testing.assert_array_equal(B.data, q.vera_B.data[:8, :])
    assert not any(n.endswith(("vera_A", "vera_B")) for n, _ in model.named_parameters())


def test_trainable_parameter_count_is_the_closed_form():
    model, config = vera_model(r=4)
    # L̂ = 6 layers: q_proj (out 8), fc1 (out 32), fc2 (out 8) in each of 2 blocks
    closed_form = 2 * ((4 + 8) + (4 + 32) + (4 + 8))
    trainable, total = count_parameters(model)
    base_total = count_parameters(make_gpt(TINY_2x2))[1]
    assert trainable == closed_form == vera.vera_parameter_count(model)
    assert total == base_total + closed_form  # the frozen projections are not parameters


def test_a_training_step_changes_only_the_lambdas():
    model, _ = vera_model()
    randomize_lambdas(model, 1)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    frozen = model.get_submodule("blocks.0.attn.q_proj").vera_A.data.copy()
    model.train()
    loss = model(IDX, TARGETS_OUT)[1]
    loss.backward()
    opt = ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for name, p in model.named_parameters():
        changed = not np.array_equal(before[name], p.data)
        assert changed == p.requires_grad, name
    np.testing.assert_array_equal(model.get_submodule("blocks.0.attn.q_proj").vera_A.data, frozen)


def test_merge_matches_unmerged_and_unmerge_restores_w():
    model, _ = vera_model(np.float64)
    randomize_lambdas(model, 2)
    unmerged = logits_of(model, IDX)
    assert not np.allclose(unmerged, logits_of(vera_model(np.float64)[0], IDX))  # visible adapter
    layers = dict(vera.vera_layers(model))
    W0 = {p: layer.weight.data.copy() for p, layer in layers.items()}
    vera.merge_vera(model)
    for p, layer in layers.items():
        A, B = (t.data for t in layer.projections())
        want = W0[p] + (layer.vera_lambda_b.data[:, None] * B) @ (
            layer.vera_lambda_d.data[:, None] * A
        )
        np.testing.assert_allclose(layer.weight.data, want, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(logits_of(model, IDX), unmerged, rtol=1e-12, atol=1e-12)
    vera.unmerge_vera(model)
    for p, layer in layers.items():
        np.testing.assert_allclose(layer.weight.data, W0[p], rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(logits_of(model, IDX), unmerged, rtol=1e-12, atol=1e-12)


def test_a_merged_layer_refuses_to_train():
    model, _ = vera_model()
    vera.merge_vera(model)
    model.train()
    with pytest.raises(RuntimeError, match="merged"):
        model(IDX, TARGETS_OUT)


BAD_CONFIGS = {
    "r": (dict(r=0), "r=0"),
    "key": (dict(projection_prng_key=-1), "projection_prng_key=-1"),
    "d_initial": (dict(d_initial=float("nan")), "d_initial=nan"),
    "dropout": (dict(vera_dropout=1.0), "vera_dropout=1.0"),
    "bias": (dict(bias="all"), "bias='all'"),
    "targets": (dict(target_modules=[]), "target_modules=[]"),
}


@pytest.mark.parametrize("change, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_vera_config_is_refused_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        vera.VeraConfig(**change)


def test_apply_vera_refuses_unknown_targets_changing_nothing():
    model = make_gpt(TINY_2x2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['nope'\] match no Linear"):
        vera.apply_vera(model, vera.VeraConfig(r=2, target_modules=["q_proj", "nope"]))
    assert snapshot(model) == before and not vera.vera_layers(model)


# --------------------------------------------------------------------------------------
# Fused layers: GPT-2's c_attn as q, k and v (one PEFT layer, one λ_d)
# --------------------------------------------------------------------------------------

QKV = [f"blocks.0.attn.{n}_proj" for n in "qkv"]


def fused_model(dtype=np.float64, targets=("q_proj", "k_proj", "v_proj"), config=TINY_2x2):
    """``config``'s GPT with VeRA on ``targets``, each block's q, k, v fused; λ's random."""
    model = randomize_weights(make_gpt(config, 0, dtype), 0)
    vera_config = vera.VeraConfig(r=3, target_modules=list(targets), projection_prng_key=5)
    groups = [[f"blocks.{i}.attn.{n}_proj" for n in "qkv"] for i in range(config.n_layer)]
    vera.apply_vera(model, vera_config, fused=groups)
    randomize_lambdas(model, 4)
    return model, vera_config


def test_fused_layers_share_one_lambda_d_and_read_consecutive_rows():
    """q, k, v of a block are PEFT's one c_attn: one λ_d Parameter (counted once, seen
    once by an optimizer), rows [0, C), [C, 2C), [2C, 3C) of a vera_B of 3C rows."""
    model, _ = fused_model()
    q, k, v = (model.get_submodule(p) for p in QKV)
    assert q.vera_lambda_d is k.vera_lambda_d is v.vera_lambda_d
    assert q.vera_lambda_b is not k.vera_lambda_b
    C = TINY_2x2.n_embd
    assert [m.vera_offset for m in (q, k, v)] == [0, C, 2 * C]
    assert q.vera_B.shape == (3 * C, 3)  # PEFT sizes vera_B to c_attn's 3C outputs
    for j, m in enumerate((q, k, v)):
        np.testing.assert_array_equal(m.projections()[1].data, q.vera_B.data[j * C : (j + 1) * C])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p is q.vera_lambda_d for p in trainable) == 1
    assert count_parameters(model)[0] == 2 * (3 + 3 * C) == vera.vera_parameter_count(model)
    assert vera.fused_vera_layers(model) == [QKV, [p.replace("0", "1", 1) for p in QKV]]
    # the three pieces compute PEFT's one layer on the stacked [W_q; W_k; W_v]
    x = np.random.default_rng(0).normal(size=(2, 5, C))
    one = vera.vera_linear(
        ml.Tensor(x),
        ml.Tensor(np.concatenate([m.weight.data for m in (q, k, v)])),
        ml.Tensor(np.concatenate([m.bias.data for m in (q, k, v)])),
        ml.Tensor(q.vera_A.data),
        ml.Tensor(q.vera_B.data),
        q.vera_lambda_d,
        ml.Tensor(np.concatenate([m.vera_lambda_b.data for m in (q, k, v)])),
    )
    pieces = np.concatenate([m(ml.Tensor(x)).data for m in (q, k, v)], axis=-1)
    np.testing.assert_allclose(pieces, one.data, rtol=1e-13, atol=1e-13)


def test_gradcheck_fused_layers_and_the_shared_lambda_d_sums_the_three_uses():
    """Central differences on every input of q, k, v fused (x, the one λ_d, each λ_b; the
    frozen A and B get no gradient), and λ_d's gradient is the sum of each piece's."""
    model, _ = fused_model()
    layers = [model.get_submodule(p) for p in QKV]
    rng = np.random.default_rng(1)
    C, r = TINY_2x2.n_embd, 3
    x = rng.normal(size=(2, 3, C))
    lambdas = [rng.normal(size=(r,))] + [rng.normal(size=(C,)) for _ in range(3)]
    A, B = layers[0].vera_A.data.copy(), layers[0].vera_B.data.copy()

    def fn(x, ld, lb_q, lb_k, lb_v, A, B):
        for layer, lb in zip(layers, (lb_q, lb_k, lb_v), strict=True):
            layer.vera_lambda_d, layer.vera_lambda_b = ld, lb
            layer.vera_A, layer.vera_B = A, B
        return ml.functional.cat([layer(x) for layer in layers], axis=-1)  # (2, 3, 3C)

    assert gradcheck(fn, [x, *lambdas, A, B], no_grads=(5, 6))

    g = rng.normal(size=(2, 3, 3 * C))
    ld = ml.Tensor(lambdas[0], requires_grad=True)
    out = fn(ml.Tensor(x), ld, *(ml.Tensor(lb) for lb in lambdas[1:]), ml.Tensor(A), ml.Tensor(B))
    out.backward(g)
    N = x.size // C
    u = x.reshape(N, C) @ A[:, :C].T  # (N, r)
    each = []
    for j in range(3):  # dλ_d of piece j alone: Σ_rows ((g_j ⊙ λ_b_j) B_j) ⊙ u
        rows = slice(j * C, (j + 1) * C)  # piece j's outputs, and its rows of vera_B
        gv = (g[..., rows].reshape(N, C) * lambdas[1 + j]) @ B[rows]  # (N, r)
        each.append((gv * u).sum(axis=0))
    assert all(np.abs(e).max() > 1e-3 for e in each)  # each piece contributes
    np.testing.assert_allclose(ld.grad, sum(each), rtol=1e-12, atol=1e-12)


def test_merge_of_fused_layers_uses_their_rows_and_the_shared_lambda_d():
    model, _ = fused_model(targets=("q_proj", "k_proj", "v_proj", "fc1"))
    unmerged = logits_of(model, IDX)
    k = model.get_submodule(QKV[1])
    W0, C = k.weight.data.copy(), TINY_2x2.n_embd
    assert k.vera_B.shape[0] == 4 * C  # fc1's 4C outputs: more than c_attn's 3C
    vera.merge_vera(model)
    B_k, A = k.vera_B.data[C : 2 * C], k.vera_A.data[:, :C]
    want = W0 + (k.vera_lambda_b.data[:, None] * B_k) @ (k.vera_lambda_d.data[:, None] * A)
    np.testing.assert_allclose(k.weight.data, want, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(logits_of(model, IDX), unmerged, rtol=1e-12, atol=1e-12)
    vera.unmerge_vera(model)
    np.testing.assert_allclose(k.weight.data, W0, rtol=1e-14, atol=1e-14)


def test_merge_and_unload_vera_leaves_plain_linears_computing_the_same():
    """Fused pieces merge their own rows; a non-finite merge anywhere changes nothing."""
    model, _ = fused_model(targets=("q_proj", "k_proj", "v_proj", "fc1"))
    unmerged = logits_of(model, IDX)
    before = snapshot(model)
    last = vera.vera_layers(model)[-1][1]
    kept = last.vera_lambda_b.data.copy()
    last.vera_lambda_b.data[0] = np.inf
    with np.errstate(invalid="ignore"), pytest.raises(ValueError, match=r"fc1's W \+ ΔW contains"):
        vera.merge_and_unload_vera(model)  # 0 · inf in ΔW: NaN
    last.vera_lambda_b.data[...] = kept
    assert snapshot(model) == before and len(vera.vera_layers(model)) == 8
    k = model.get_submodule(QKV[1])
    want = k.weight.data + k.get_delta_weight()
    assert vera.merge_and_unload_vera(model) is model
    assert not vera.vera_layers(model)
    assert not any("vera" in n for n, _ in model.named_parameters())
    assert type(model.get_submodule(QKV[1])) is ml.Linear
    np.testing.assert_array_equal(model.get_submodule(QKV[1]).weight.data, want)
    np.testing.assert_allclose(logits_of(model, IDX), unmerged, rtol=1e-12, atol=1e-12)


BAD_GROUPS = {
    "half a group": (
        ["q_proj", "v_proj"],
        [QKV],
        r"all or none.*adapt only \['blocks.0.attn.q_proj'",
    ),
    "a layer twice": (["q_proj", "k_proj"], [QKV[:2], QKV[1:2]], "puts a layer in two groups"),
    "no layer": (
        ["q_proj"],
        [["blocks.0.attn.q_proj", "blocks.0.attn.qq"]],
        r"\['blocks.0.attn.qq'\], which are not Linear",
    ),
    "a string": (["q_proj"], "blocks.0.attn.q_proj", "must be a list of groups of layer paths"),
}


@pytest.mark.parametrize("targets, fused, message", BAD_GROUPS.values(), ids=BAD_GROUPS.keys())
def test_bad_fused_groups_are_refused_changing_nothing(targets, fused, message):
    model = make_gpt(TINY_2x2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        vera.apply_vera(model, vera.VeraConfig(r=2, target_modules=targets), fused=fused)
    assert snapshot(model) == before and not vera.vera_layers(model)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def test_save_and_load_round_trip_with_and_without_projections(tmp_path):
    for save_projection in (True, False):
        model, config = vera_model(np.float32)
        config.save_projection, config.d_initial, config.vera_dropout = save_projection, 0.5, 0.1
        randomize_lambdas(model, 3)
        folder = tmp_path / str(save_projection)
        vera_adapters.save_vera(model, folder, config)
        raw = json.loads((folder / "adapter_config.json").read_text())
        assert raw["peft_type"] == "VERA" and raw["save_projection"] is save_projection
        fresh = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
        loaded = vera_adapters.load_vera(fresh, folder)
        assert loaded == config
        np.testing.assert_array_equal(logits_of(fresh, IDX), logits_of(model, IDX))


BAD_FILES = {
    "peft_type": ({"peft_type": "LORA"}, "peft_type='LORA'"),
    "unknown option": ({"layers_to_transform": [0]}, "layers_to_transform=[0]"),
    "rank": ({"r": 3}, "has shape (4,), expected (3,)"),
    "targets": ({"target_modules": ["k_proj"]}, "unexpected key"),
}


@pytest.mark.parametrize("change, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_vera_folder_is_refused_leaving_the_model_untouched(tmp_path, change, message):
    model, config = vera_model(np.float32)
    vera_adapters.save_vera(model, tmp_path, config)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    fresh = make_gpt(TINY_2x2)
    before = snapshot(fresh)
    with pytest.raises(ValueError) as info:
        vera_adapters.load_vera(fresh, tmp_path)
    assert message in str(info.value)
    assert snapshot(fresh) == before and not vera.vera_layers(fresh)


GPT2 = hf_gpt2.GPT2Config(**TINY_2x2.to_dict())  # a model loaded from a GPT-2 folder


def test_a_gpt2_c_attn_adapter_is_one_c_attn_entry_and_loads_back_fused(tmp_path):
    """Saved in GPT-2's names, q, k, v of a block are one c_attn entry (one λ_d, the λ_b's
    stacked, 3C); loaded, they are fused again: the same logits, one shared λ_d."""
    model, config = fused_model(np.float32, ("q_proj", "k_proj", "v_proj", "fc2"), GPT2)
    vera_adapters.save_vera(model, tmp_path, config)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    modules = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_proj")]
    assert sorted(raw["target_modules"]) == modules
    tensors, _ = read_safetensors(tmp_path / "adapter_model.safetensors", "test")
    q, k, v = (model.get_submodule(p) for p in QKV)
    prefix = "base_model.model.transformer.h.0.attn.c_attn."
    np.testing.assert_array_equal(tensors[prefix + "vera_lambda_d"], q.vera_lambda_d.data)
    stacked = np.concatenate([m.vera_lambda_b.data for m in (q, k, v)])  # (3C,)
    np.testing.assert_array_equal(tensors[prefix + "vera_lambda_b"], stacked)
    fresh = randomize_weights(make_gpt(GPT2, 0, np.float32), 0)
    vera_adapters.load_vera(fresh, tmp_path)
    np.testing.assert_array_equal(logits_of(fresh, IDX), logits_of(model, IDX))
    assert vera.fused_vera_layers(fresh) == vera.fused_vera_layers(model)


def test_vera_on_q_and_v_of_a_gpt2_is_refused_on_save_saying_what_works(tmp_path):
    """minilora's own VeRA on q_proj and v_proj (a λ_d each, rows from 0) is no layout of
    PEFT's c_attn; save_vera says so, and how to adapt c_attn as PEFT does."""
    model = make_gpt(GPT2)
    config = vera.VeraConfig(r=2, target_modules=["q_proj", "v_proj"])
    vera.apply_vera(model, config)
    with pytest.raises(ValueError) as info:
        vera_adapters.save_vera(model, tmp_path, config)
    message = str(info.value)
    for words in (
        "['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj', 'blocks.1.attn.q_proj'",
        "not laid out as PEFT's",
        "one vera_lambda_d for its 3C outputs, which read rows [0, 3C) of vera_B",
        "apply_vera(model, config, fused=hf_gpt2.vera_fused(model))",
    ):
        assert words in message
    assert not any(tmp_path.iterdir())


def test_fused_layers_of_another_model_are_refused_on_save(tmp_path):
    model, config = fused_model(np.float32)
    with pytest.raises(ValueError, match="share one vera_lambda_d .* only as GPT-2's c_attn"):
        vera_adapters.save_vera(model, tmp_path, config)
    assert not any(tmp_path.iterdir())


def test_a_c_attn_lambda_b_of_the_wrong_length_is_refused_before_it_is_split(tmp_path):
    model, config = fused_model(np.float32, config=GPT2)
    vera_adapters.save_vera(model, tmp_path, config)
    path = tmp_path / "adapter_model.safetensors"
    tensors, _ = read_safetensors(path, "test")
    key = "base_model.model.transformer.h.1.attn.c_attn.vera_lambda_b"
    tensors[key] = np.zeros(3 * TINY_2x2.n_embd + 1, np.float32)
    path.write_bytes(serialize(tensors, {"format": "pt"}))
    fresh = make_gpt(GPT2)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=f"{key} has shape \\(25,\\), expected \\(24,\\)"):
        vera_adapters.load_vera(fresh, tmp_path)
    assert snapshot(fresh) == before and not vera.vera_layers(fresh)


# --------------------------------------------------------------------------------------
# PyTorch and PEFT (oracle)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch", reason="parity needs PyTorch")
    peft = pytest.importorskip("peft", reason="VeRA parity needs PEFT")
    from examples.torch_gpt import TorchGPT, load_minilora_state

    return torch, peft, TorchGPT, load_minilora_state


def torch_name(name: str) -> str:
    """minilora's ``<path>.vera_lambda_d`` as PEFT's parameter ``<path>.vera_lambda_d.default``."""
    if name.rsplit(".", 1)[-1] in vera.VERA_LEAVES:
        return f"base_model.model.{name}.default"
    path, _, leaf = name.rpartition(".")
    return f"base_model.model.{path}.base_layer.{leaf}"


def peft_vera(oracle, model, config, dtype):
    """PEFT's VeRA on the PyTorch port, holding ``model``'s base weights and λ vectors."""
    torch, peft, TorchGPT, load_minilora_state = oracle
    base = {n: p.data for n, p in model.named_parameters() if not p.requires_grad}
    port = TorchGPT(TINY_2x2).to({np.float32: torch.float32, np.float64: torch.float64}[dtype])
    load_minilora_state(port, base)
    settings_ = dict(r=config.r, target_modules=config.target_modules)
    pm = peft.get_peft_model(
        port, peft.VeraConfig(**settings_, projection_prng_key=config.projection_prng_key)
    )
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                params[torch_name(name)].copy_(torch.tensor(p.data))
    return pm


@pytest.mark.oracle
@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1])
def test_projections_equal_pytorchs_bit_for_bit(oracle, seed):
    torch = oracle[0]
    from peft.tuners.vera.model import _kaiming_init

    for r, n_in, n_out in ((4, 32, 32), (3, 5, 70), (16, 64, 256)):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        A = _kaiming_init((r, n_in), generator=generator)
        B = _kaiming_init((n_out, r), generator=generator)
        ours = vera.vera_projections(r, n_in, n_out, seed)
        np.testing.assert_array_equal(ours[0], A.numpy())
        np.testing.assert_array_equal(ours[1], B.numpy())


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_whole_model_logits_and_gradients_match_peft(oracle, dtype):
    torch = oracle[0]
    model, config = vera_model(dtype)
    randomize_lambdas(model, 4)
    pm = peft_vera(oracle, model, config, dtype)
    assert pm.get_nb_trainable_parameters() == count_parameters(model)  # (trainable, all)
    layer = pm.base_model.model.blocks[1].mlp.fc2  # PEFT drew the same projections
    ours = model.get_submodule("blocks.1.mlp.fc2")
    np.testing.assert_array_equal(
        layer.vera_A["default"].numpy(), ours.vera_A.data.astype(np.float32)
    )
    logits, loss = model(IDX, TARGETS_OUT)
    loss.backward()
    t_logits, t_loss = pm(torch.tensor(IDX), torch.tensor(TARGETS_OUT))
    t_loss.backward()
    tol = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-4)}[dtype]
    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), **tol)
    params = dict(pm.named_parameters())
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {torch_name(n) for n in trains} == {n for n, p in params.items() if p.requires_grad}
    for name in trains:
        got, want = dict(model.named_parameters())[name].grad, params[torch_name(name)].grad
        np.testing.assert_allclose(got, want.numpy(), **tol, err_msg=name)


@pytest.mark.oracle
@pytest.mark.parametrize("save_projection", [True, False])
def test_minilora_vera_folder_loads_in_peft(oracle, tmp_path, save_projection):
    torch, peft, TorchGPT, load_minilora_state = oracle
    model, config = vera_model(np.float32)
    config.save_projection = save_projection
    randomize_lambdas(model, 5)
    vera_adapters.save_vera(model, tmp_path, config)
    port = TorchGPT(TINY_2x2)
    load_minilora_state(
        port, {n: p.data for n, p in model.named_parameters() if not p.requires_grad}
    )
    loaded = peft.PeftModel.from_pretrained(port, tmp_path).eval()
    with torch.no_grad():
        want = loaded(torch.tensor(IDX))[0].numpy()
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-4, atol=1e-4)


@pytest.mark.oracle
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_folder_loads_in_minilora(oracle, tmp_path, save_projection):
    torch, peft, TorchGPT, load_minilora_state = oracle
    base = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
    port = TorchGPT(TINY_2x2)
    load_minilora_state(port, base.state_dict())
    settings_ = dict(r=4, target_modules=["q_proj", "fc2"], projection_prng_key=11)
    pm = peft.get_peft_model(port, peft.VeraConfig(**settings_, save_projection=save_projection))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # as if trained
                p.normal_(0, 1.0)
    pm.save_pretrained(tmp_path)
    pm.eval()
    with torch.no_grad():
        want = pm(torch.tensor(IDX))[0].numpy()
    config = vera_adapters.load_vera(base, tmp_path)
    assert (config.r, config.projection_prng_key) == (4, 11)
    np.testing.assert_allclose(logits_of(base, IDX), want, rtol=1e-4, atol=1e-4)


def test_save_model_refuses_a_model_with_vera_layers(tmp_path):
    model, _ = vera_model()
    with pytest.raises(ValueError, match="blocks.0.attn.q_proj"):
        model_files.save_model(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    "merge", [vera.merge_vera, vera.merge_and_unload_vera, ml.merge_lora, ml.merge_and_unload]
)
def test_merging_vera_on_a_tied_head_is_refused_changing_nothing(merge):
    """VeRA on GPT-2's lm_head, tied to the token embedding: merged, ΔW would reach the
    embedding too and move the logits; both merges refuse, naming the two layers."""
    model = randomize_weights(make_gpt(TINY_2x2, tie_word_embeddings=True), 1)
    vera.apply_vera(model, vera.VeraConfig(r=4, target_modules=["lm_head", "fc1"]))
    randomize_lambdas(model, 2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="lm_head shares its weight with tok_emb"):
        merge(model)
    assert snapshot(model) == before
    assert not any(layer.merged for _, layer in vera.vera_layers(model))


def test_the_models_merge_helpers_merge_vera_too():
    """minilora.merge_lora / unmerge_lora / disable_adapters / merge_and_unload act on VeRA
    layers as on LoRA's (PEFT's merge_and_unload merges any adapter): none is left behind."""
    model, _ = vera_model()
    randomize_lambdas(model, 3)
    adapted = logits_of(model, IDX)
    with ml.disable_adapters(model):
        base = logits_of(model, IDX)
    assert np.abs(adapted - base).max() > 1e-3
    ml.merge_lora(model)
    assert all(layer.merged for _, layer in vera.vera_layers(model))
    np.testing.assert_allclose(logits_of(model, IDX), adapted, rtol=1e-12, atol=1e-12)
    ml.unmerge_lora(model)
    np.testing.assert_allclose(logits_of(model, IDX), adapted, rtol=1e-12, atol=1e-12)
    assert ml.merge_and_unload(model) is model
    assert not vera.vera_layers(model)
    assert not any("vera" in n for n, _ in model.named_parameters())
    np.testing.assert_allclose(logits_of(model, IDX), adapted, rtol=1e-12, atol=1e-12)
