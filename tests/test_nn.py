"""Modules (minilora.nn): parameter paths, state dicts, modes, gradients and Linear.

The module paths (minilora/model.py's docstring) are the public contract: LoRA targets,
checkpoints and PEFT adapter keys are all named by them.
"""

import copy

import numpy as np
import pytest
from helpers import make_gpt, snapshot
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_dtypes, gpt_configs, linear_shape, seeds, token_batches

import minilora
from minilora import Linear, Parameter, Tensor, no_grad
from minilora.nn import Dropout, Embedding, LayerNorm, ModuleList


def expected_parameters(config) -> dict:
    """Parameter path -> shape, written out by hand (independent of the code)."""
    C, V, bias = config.n_embd, config.vocab_size, config.bias
    out = {"tok_emb.weight": (V, C), "pos_emb.weight": (config.block_size, C)}

    def layer_norm(path):
        out[f"{path}.weight"] = (C,)
        if bias:
            out[f"{path}.bias"] = (C,)

    def linear(path, leaf, with_bias=bias):
        out[f"{path}.weight"] = linear_shape(config, leaf)
        if with_bias:
            out[f"{path}.bias"] = (linear_shape(config, leaf)[0],)

    for i in range(config.n_layer):
        layer_norm(f"blocks.{i}.ln1")
        for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear(f"blocks.{i}.attn.{leaf}", leaf)
        layer_norm(f"blocks.{i}.ln2")
        linear(f"blocks.{i}.mlp.fc1", "fc1")
        linear(f"blocks.{i}.mlp.fc2", "fc2")
    layer_norm("ln_f")
    linear("lm_head", "lm_head", with_bias=False)  # GPT-2's head has no bias
    return out


# --------------------------------------------------------------------------------------
# Paths and shapes
# --------------------------------------------------------------------------------------


@given(config=gpt_configs(), seed=seeds)
def test_named_parameters_match_design_paths_and_shapes(config, seed):
    model = make_gpt(config, seed)
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    assert len(names) == len(set(names)), f"duplicate parameter paths: {names}"
    assert {n: p.shape for n, p in named} == expected_parameters(config)
    assert all(isinstance(p, Parameter) for _, p in named)
    assert [id(p) for p in model.parameters()] == [id(p) for _, p in named]


@given(config=gpt_configs(), seed=seeds)
def test_named_modules_and_get_submodule_follow_design_paths(config, seed):
    model = make_gpt(config, seed)
    modules = dict(model.named_modules())
    assert modules[""] is model
    linears = sorted(path for path, m in modules.items() if isinstance(m, Linear))
    expected = ["lm_head"] + [
        f"blocks.{i}.{kind}.{leaf}"
        for i in range(config.n_layer)
        for kind, leaf in [("attn", x) for x in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + [("mlp", "fc1"), ("mlp", "fc2")]
    ]
    assert linears == sorted(expected)
    for path in linears:
        m = model.get_submodule(path)
        assert m is modules[path]
        leaf = path.rsplit(".", 1)[-1]
        assert m.weight.shape == linear_shape(config, leaf)
        assert (m.out_features, m.in_features) == linear_shape(config, leaf)
    for path in ("tok_emb", "pos_emb", "ln_f", "blocks.0.ln1", "blocks.0.ln2"):
        assert path in modules
    with pytest.raises(KeyError, match="nope"):
        model.get_submodule("blocks.nope")


def test_set_submodule_replaces_the_layer_at_a_path_and_nothing_else():
    model = make_gpt(minilora.GPTConfig(vocab_size=5, block_size=4, n_layer=2, n_head=1, n_embd=4))
    before = dict(model.named_modules())
    new = Linear(4, 4)
    model.set_submodule("blocks.1.attn.q_proj", new)
    after = dict(model.named_modules())
    assert after["blocks.1.attn.q_proj"] is new
    assert all(after[p] is m for p, m in before.items() if not p.startswith("blocks.1.attn"))
    assert after["blocks.0.attn.q_proj"] is before["blocks.0.attn.q_proj"]
    with pytest.raises(KeyError, match="nope"):
        model.set_submodule("blocks.nope.q_proj", new)


@given(
    in_f=st.integers(1, 6),
    out_f=st.integers(1, 6),
    bias=st.booleans(),
    lead=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    seed=seeds,
    dtype=float_dtypes,
)
def test_linear_weight_is_out_by_in_and_forward_is_x_wt_plus_b(
    in_f, out_f, bias, lead, seed, dtype
):
    minilora.manual_seed(seed)
    layer = Linear(in_f, out_f, bias=bias, dtype=dtype)
    assert layer.weight.shape == (out_f, in_f)
    assert layer.weight.dtype == dtype
    names = [n for n, _ in layer.named_parameters()]
    if bias:
        assert layer.bias.shape == (out_f,)
        assert not layer.bias.data.any(), "GPT-2 init: biases start at zero"
        assert names == ["weight", "bias"]
        layer.bias.data[...] = np.random.default_rng(seed).normal(size=out_f)
    else:
        assert layer.bias is None
        assert names == ["weight"]
    x = np.random.default_rng(seed + 1).normal(size=(*lead, in_f)).astype(dtype)
    y = layer(Tensor(x)).numpy()
    ref = x.astype(np.float64) @ layer.weight.data.T.astype(np.float64)
    if bias:
        ref = ref + layer.bias.data
    assert y.shape == (*lead, out_f)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)


def test_linear_embedding_layernorm_init_and_validation():
    minilora.manual_seed(0)
    emb = Embedding(50, 40)
    assert emb.weight.shape == (50, 40)
    assert 0.018 < emb.weight.data.std() < 0.022  # GPT-2's N(0, 0.02²)
    ln = LayerNorm(6)
    assert np.array_equal(ln.weight.data, np.ones(6)) and np.array_equal(ln.bias.data, np.zeros(6))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="in_features"):
            Linear(bad, 3)
        with pytest.raises(ValueError, match="out_features"):
            Linear(3, bad)
    with pytest.raises(ValueError, match="p=1.0"):
        Dropout(1.0)


def test_module_list_registers_children_by_index():
    minilora.manual_seed(0)
    layers = ModuleList([Linear(2, 3), Linear(3, 4)])
    assert len(layers) == 2
    assert layers[1].weight.shape == (4, 3) and layers[-1] is layers[1]
    assert [n for n, _ in layers.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(IndexError):
        layers[2]


# --------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------


@given(config=gpt_configs(), seed=seeds)
def test_state_dict_returns_copies(config, seed):
    model = make_gpt(config, seed)
    before = snapshot(model)
    state = model.state_dict()
    assert list(state) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert not np.shares_memory(state[name], p.data), f"{name} is a view, not a copy"
        assert np.array_equal(state[name], p.data) and state[name].dtype == p.dtype
    for arr in state.values():  # editing the snapshot must not touch the model
        arr[...] = 7.0
    assert snapshot(model) == before
    fresh = model.state_dict()
    for p in model.parameters():  # and editing the model must not touch the snapshot
        p.data += 1.0
    assert all(not np.array_equal(fresh[n], p.data) for n, p in model.named_parameters())


@st.composite
def broken_state_dicts(draw):
    """A GPT config, seed, and which kinds of problem to inject (at least one)."""
    config = draw(gpt_configs())
    kinds = draw(
        st.lists(st.sampled_from(["missing", "unexpected", "shape"]), min_size=1, unique=True)
    )
    return config, draw(seeds), kinds, draw(st.randoms(use_true_random=False))


@given(case=broken_state_dicts(), strict=st.booleans())
def test_load_state_dict_refuses_all_problems_at_once_and_changes_nothing(case, strict):
    config, seed, kinds, rnd = case
    source = make_gpt(config, seed).state_dict()
    target = make_gpt(config, seed + 1)
    before = snapshot(target)
    names = sorted(source)
    expected_in_message = []
    if "missing" in kinds:
        gone = rnd.choice(names)
        del source[gone]
        names.remove(gone)
        if strict:
            expected_in_message += ["missing", gone]
    if "unexpected" in kinds:
        source["blocks.99.attn.q_proj.lora_A"] = np.zeros((2, 2), np.float32)
        if strict:
            expected_in_message += ["unexpected", "blocks.99.attn.q_proj.lora_A"]
    if "shape" in kinds:
        bad = rnd.choice(names)
        source[bad] = np.zeros(source[bad].shape + (2,), np.float32)
        expected_in_message += [bad, str(source[bad].shape)]
    if not expected_in_message:  # strict=False tolerates missing/unexpected keys
        target.load_state_dict(source, strict=False)
        return
    with pytest.raises(ValueError) as info:
        target.load_state_dict(source, strict=strict)
    for part in expected_in_message:
        assert part in str(info.value), f"{part!r} not named in: {info.value}"
    assert snapshot(target) == before, "a refused load_state_dict changed the model"


@given(config=gpt_configs(), seed=seeds, dtype=float_dtypes, batch=st.data())
def test_state_dict_round_trip_gives_identical_logits(config, seed, dtype, batch):
    idx, _ = batch.draw(token_batches(config))
    source = make_gpt(config, seed, dtype).eval()
    target = make_gpt(config, seed + 1, dtype).eval()
    with no_grad():
        expected = source(idx)[0].numpy()
        assert not np.array_equal(target(idx)[0].numpy(), expected)  # really a fresh init
        state = source.state_dict()
        target.load_state_dict(state)
        assert np.array_equal(target(idx)[0].numpy(), expected)
        for arr in state.values():  # the load copied: later edits of the dict do nothing
            arr[...] = 0
        assert np.array_equal(target(idx)[0].numpy(), expected)
    for name, p in target.named_parameters():
        assert p.dtype == dtype, name


def test_load_state_dict_is_all_or_nothing_when_an_array_cannot_be_cast():
    """A cast that fails on one parameter (here the last in order) must not leave the
    others overwritten."""
    config = minilora.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    source, target = make_gpt(config, 0), make_gpt(config, 1)
    state = source.state_dict()
    state["tok_emb.weight"] = np.full(state["tok_emb.weight"].shape, "x")  # strings
    before = snapshot(target)
    with pytest.raises(ValueError, match="tok_emb.weight cannot be cast to float32"):
        target.load_state_dict(state)
    assert snapshot(target) == before


def test_load_state_dict_strict_false_loads_the_overlap():
    config = minilora.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    source, target = make_gpt(config, 0), make_gpt(config, 1)
    state = source.state_dict()
    del state["lm_head.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    kept = target.lm_head.weight.data.copy()
    target.load_state_dict(state, strict=False)
    assert np.array_equal(target.lm_head.weight.data, kept)
    assert np.array_equal(target.tok_emb.weight.data, source.tok_emb.weight.data)


# --------------------------------------------------------------------------------------
# Modes, gradients, freezing
# --------------------------------------------------------------------------------------


@given(config=gpt_configs(), seed=seeds)
def test_train_and_eval_reach_every_module(config, seed):
    model = make_gpt(config, seed)
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    assert model.train() is model
    assert all(m.training for m in model.modules())
    model.train(False)
    assert not any(m.training for m in model.modules())
    # a copy keeps the mode; sub-module switches stay local to the sub-tree
    model.train()
    model.blocks.eval()
    assert model.training and not model.blocks[0].attn.q_proj.training
    assert model.lm_head.training


@given(config=gpt_configs(), seed=seeds, batch=st.data())
def test_zero_grad_sets_every_grad_to_none(config, seed, batch):
    model = make_gpt(config, seed)
    idx, targets = batch.draw(token_batches(config))
    model(idx, targets)[1].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # pos_emb rows past T get zero gradient but still a gradient array
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(grads[n].shape == p.shape for n, p in model.named_parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@given(config=gpt_configs(), seed=seeds, batch=st.data())
def test_requires_grad_freezes_and_unfreezes_everything(config, seed, batch):
    model = make_gpt(config, seed)
    idx, targets = batch.draw(token_batches(config))
    assert model.requires_grad_(False) is model
    assert not any(p.requires_grad for p in model.parameters())
    loss = model(idx, targets)[1]
    assert not loss.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()
    model.requires_grad_(True)
    assert all(p.requires_grad for p in model.parameters())
    model(idx, targets)[1].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_frozen_parameter_gets_no_grad_while_others_do():
    config = minilora.GPTConfig(vocab_size=6, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = make_gpt(config, 3)
    model.blocks[0].attn.q_proj.weight.requires_grad_(False)
    idx = np.array([[0, 1, 2, 3]])
    model(idx, idx)[1].backward()
    assert model.blocks[0].attn.q_proj.weight.grad is None
    assert model.blocks[0].attn.q_proj.bias.grad is not None


def test_deepcopy_is_independent():
    config = minilora.GPTConfig(vocab_size=6, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = make_gpt(config, 3)
    clone = copy.deepcopy(model)
    clone.lm_head.weight.data += 1
    assert not np.array_equal(clone.lm_head.weight.data, model.lm_head.weight.data)
