"""Prefix tuning (minilora/relatives/prefix.py) and the op it adds (functional.cat).

* ``cat``: forward against ``np.concatenate``, backward against central differences on every
  input, frozen inputs getting none; bad shapes refused.
* What a prefix computes, against what it claims to be: one attention layer against the
  attention over [prefix; tokens] written out in NumPy; a prefix-layer whose keys and
  values are those of P real tokens, and a prefix-embedding whose virtual tokens are their
  embeddings, give the base model's logits on [those tokens; the tokens]. A zero prefix is
  *not* the base model (attention still gives the zero keys weight), shown here too.
* Gradients of the whole model (float64, random upstream) reach every prefix parameter,
  none reaches the frozen base; the parameter counts match their closed forms; training
  leaves the base bitwise unchanged.
* The context: ``block_size - P`` tokens, more refused naming the lengths; generation with
  the KV cache gives the tokens of recomputing the window.
* The reparameterisation collapses to the plain prefix without changing the logits; the
  prefix saves and loads (safetensors), and a refused load leaves the model untouched.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt, randomize_weights, snapshot
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, frozen_subsets, gpt_configs, shapes

import minilora as ml
from minilora import backend
from minilora import functional as F
from minilora.autograd import Tensor, no_grad
from minilora.gradcheck import gradcheck
from minilora.interop import model_files, safetensors_files
from minilora.relatives.prefix import (
    PrefixAttention,
    PrefixConfig,
    PrefixGPT,
    apply_prefix_tuning,
    collapse_prefix,
    load_prefix,
    prefix_parameter_count,
    save_prefix,
)

# every test here runs on the fast path and on the reference ops (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("ops")

# the four kinds: (prefix_type, prefix_projection)
KINDS = [("layer", False), ("layer", True), ("embedding", False), ("embedding", True)]
P = 2  # prefix length in the model tests (TINY_2x2: block_size 6, so 4 tokens at most)


def kind_id(kind) -> str:
    return f"{kind[0]}{'-mlp' if kind[1] else ''}"


def prefixed(kind, seed: int = 0, dtype=np.float64, scale: float = 0.5):
    """TINY_2x2 with O(1) weights and a prefix of kind ``kind`` (random O(1) values too,
    so that the prefix changes the logits visibly); returns (model, added parameters)."""
    model = randomize_weights(make_gpt(TINY_2x2, seed, dtype), seed, scale)
    config = PrefixConfig(kind[0], P, kind[1], encoder_hidden_size=3)
    params = apply_prefix_tuning(model, config, backend.Generator(seed))
    rng = np.random.default_rng(seed + 1)
    for p in params:
        p.data[...] = rng.standard_normal(p.shape)
    return model, params


def base_twin(model, seed: int = 0):
    """A GPT without a prefix holding ``model``'s base weights."""
    twin = make_gpt(TINY_2x2, seed, model.tok_emb.weight.dtype)
    state = model.state_dict()
    twin.load_state_dict({k: v for k, v in state.items() if not k.startswith("prefix.")})
    return twin


IDX = np.array([[1, 2, 3, 4], [0, 6, 6, 5]])  # (B, T) = (2, 4): the whole context


# --------------------------------------------------------------------------------------
# cat
# --------------------------------------------------------------------------------------


@given(shape=shapes(1, 3, max_side=3), n=st.integers(1, 3), data=st.data())
def test_cat_matches_numpy_and_its_backward_splits_the_gradient(shape, n, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    inputs = []
    for size in sizes:
        s = list(shape)
        s[axis] = size
        inputs.append(data.draw(arrays(tuple(s))))
    out = F.cat([Tensor(a) for a in inputs], axis=axis)
    np.testing.assert_array_equal(out.data, np.concatenate(inputs, axis=axis))
    no_grads = data.draw(frozen_subsets(n)) if n > 1 else ()
    assert gradcheck(lambda *ts: F.cat(ts, axis=axis), inputs, no_grads=no_grads)


@pytest.mark.parametrize(
    "shapes_, axis, match",
    [
        ([(2, 3), (2, 4)], 0, r"same shape except along axis 0, got \[\(2, 3\), \(2, 4\)\]"),
        ([(2, 3), (2, 3, 1)], 1, "same shape except along axis 1"),
        ([(2, 3)], 2, r"axis=2 is not an axis of the arrays, got shapes \[\(2, 3\)\]"),
        ([], 0, "axis=0 is not an axis"),
    ],
)
def test_cat_refuses_shapes_that_do_not_join(shapes_, axis, match):
    with pytest.raises(ValueError, match=match):
        F.cat([Tensor(np.zeros(s)) for s in shapes_], axis=axis)


def test_the_book_knows_nothing_of_the_prefix():
    """The prefix brings its own modules (PrefixGPT, PrefixAttention) into a model; the
    book's model.py has no branch for it, and a plain GPT has no prefix attribute."""
    source = (Path(ml.__file__).parent / "model.py").read_text(encoding="utf-8")
    assert "prefix" not in source.lower()
    model, _ = prefixed(("layer", False))
    assert isinstance(model, PrefixGPT) and "prefix" not in vars(make_gpt(TINY_2x2))
    assert all(isinstance(block.attn, PrefixAttention) for block in model.blocks)
    names = {n for n, _ in model.named_parameters()} - {"prefix.embedding"}
    assert names == {n for n, _ in make_gpt(TINY_2x2).named_parameters()}  # same paths


# --------------------------------------------------------------------------------------
# What a prefix computes
# --------------------------------------------------------------------------------------


def np_prefix_attention(attn, x, k_prefix, v_prefix):
    """One attention layer over [prefix; tokens], in NumPy: x (B, T, C); k_prefix and
    v_prefix (P, C), the prefix's keys and values, heads side by side."""
    B, T, C = x.shape
    nh = attn.n_head
    hs = C // nh
    Pn = k_prefix.shape[0]

    def proj(layer, a):
        bias = 0 if layer.bias is None else layer.bias.data
        return a @ layer.weight.data.T + bias

    def heads(a):  # (B, n, C) -> (B, nh, n, hs)
        return a.reshape(B, a.shape[1], nh, hs).transpose(0, 2, 1, 3)

    q = heads(proj(attn.q_proj, x))
    k = np.concatenate(
        [heads(np.broadcast_to(k_prefix, (B, Pn, C))), heads(proj(attn.k_proj, x))], 2
    )
    v = np.concatenate(
        [heads(np.broadcast_to(v_prefix, (B, Pn, C))), heads(proj(attn.v_proj, x))], 2
    )
    S = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)  # (B, nh, T, P + T)
    sees = np.arange(Pn + T)[None, :] <= Pn + np.arange(T)[:, None]  # query i: keys 0..P+i
    S = np.where(sees, S, -np.inf)
    W = np.exp(S - S.max(-1, keepdims=True))
    y = (W / W.sum(-1, keepdims=True)) @ v  # (B, nh, T, hs)
    return proj(attn.o_proj, y.transpose(0, 2, 1, 3).reshape(B, T, C))


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_layer_attention_is_attention_over_prefix_then_tokens(projection):
    model, _ = prefixed(("layer", projection))
    C = TINY_2x2.n_embd
    with no_grad():
        prefix = model.prefix().data  # (P, L·2·C): per layer, its keys then its values
    x = np.random.default_rng(3).standard_normal((2, 3, C))
    for layer, block in enumerate(model.blocks):
        k_prefix = prefix[:, 2 * layer * C : (2 * layer + 1) * C]
        v_prefix = prefix[:, (2 * layer + 1) * C : (2 * layer + 2) * C]
        got = block.attn(Tensor(x)).data
        want = np_prefix_attention(block.attn, x, k_prefix, v_prefix)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_zero_prefix_is_not_the_base_model():
    """Zero keys score 0, so each of them still takes weight exp(0)/Σ from the softmax, and
    their zero values pull every output towards 0: no prefix value is "off"."""
    model, params = prefixed(("layer", False))
    params[0].data[...] = 0.0
    attn = model.blocks[0].attn
    x = Tensor(np.random.default_rng(4).standard_normal((1, 3, TINY_2x2.n_embd)))
    with_zero_prefix = attn(x).data
    without = base_twin(model).blocks[0].attn(x).data  # the same weights, no prefix
    assert np.abs(with_zero_prefix - without).max() > 1e-3


def real_tokens_prefix(model, twin, u):
    """Set ``model``'s plain prefix to what P real tokens ``u`` (1, P) give in ``twin``:
    prefix-layer their keys and values in each layer (from a KV cache), prefix-embedding
    their token embeddings plus those of positions 0..P-1."""
    C, prefix = TINY_2x2.n_embd, model.prefix.embedding.data
    if model.prefix.config.prefix_type == "embedding":
        prefix[...] = twin.tok_emb.weight.data[u[0]] + twin.pos_emb.weight.data[:P]
        return
    cache = twin.kv_cache(1)
    with no_grad():
        twin.forward_cached(u, cache)
    for layer in range(TINY_2x2.n_layer):  # (1, nh, P, hs) -> (P, C), heads side by side
        k = cache.keys[layer][0, :, :P].transpose(1, 0, 2).reshape(P, C)
        v = cache.values[layer][0, :, :P].transpose(1, 0, 2).reshape(P, C)
        prefix[:, 2 * layer * C : (2 * layer + 1) * C] = k
        prefix[:, (2 * layer + 1) * C : (2 * layer + 2) * C] = v


@pytest.mark.parametrize("prefix_type", ["layer", "embedding"])
def test_a_prefix_of_real_tokens_gives_the_base_model_on_those_tokens_first(prefix_type):
    """The prefix is P tokens that were never computed: given what P real tokens u would
    give (keys and values, or embeddings), the model's logits on idx are the base model's
    on [u; idx], last T rows. This also checks the positions: the tokens sit at P.. ."""
    model, _ = prefixed((prefix_type, False))
    twin = base_twin(model)
    u = np.array([[5, 2]])  # (1, P)
    real_tokens_prefix(model, twin, u)
    got = model(IDX)[0].data  # (B, T, V)
    want = twin(np.concatenate([np.repeat(u, len(IDX), 0), IDX], axis=1))[0].data[:, P:]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (*IDX.shape, TINY_2x2.vocab_size)


# --------------------------------------------------------------------------------------
# Gradients, counts, freezing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_gradcheck_whole_model_reaches_the_prefix_and_not_the_base(kind):
    model, params = prefixed(kind)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = "blocks.1.attn.k_proj.weight"  # checked to get no gradient
    names.append(frozen)
    owners = [model.get_submodule(n.rpartition(".")[0]) for n in names]
    leaves = [n.rpartition(".")[2] for n in names]
    originals = [getattr(o, leaf) for o, leaf in zip(owners, leaves, strict=True)]

    def fn(*tensors):
        for o, leaf, t in zip(owners, leaves, tensors, strict=True):
            setattr(o, leaf, t)
        try:
            return model(IDX[:, :3])[0]  # (B, T, V), random upstream gradient
        finally:
            for o, leaf, p in zip(owners, leaves, originals, strict=True):
                setattr(o, leaf, p)

    assert gradcheck(fn, [p.data for p in originals], no_grads=[len(names) - 1])
    model(IDX, IDX)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("prefix."), name


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
@given(config=gpt_configs(), P_=st.integers(1, 3), hidden=st.integers(1, 5))
def test_parameter_counts_match_the_closed_forms(kind, config, P_, hidden):
    if P_ >= config.block_size:
        P_ = config.block_size - 1
    model = ml.GPT(config)
    prefix = PrefixConfig(kind[0], P_, kind[1], hidden)
    added = apply_prefix_tuning(model, prefix)
    counted = sum(p.size for p in added)
    assert counted == prefix_parameter_count(prefix, config.n_layer, config.n_embd)
    L, C = config.n_layer, config.n_embd
    width = L * 2 * C if kind[0] == "layer" else C
    plain = {"layer": L * 2 * P_ * C, "embedding": P_ * C}[kind[0]]
    mlp = (C * hidden + hidden) + (hidden * width + width)
    assert counted == (P_ * C + mlp if kind[1] else plain)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(p) for p in added]  # the base is frozen
    assert model.context_length == config.block_size - P_


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_training_moves_only_the_prefix(kind):
    model, params = prefixed(kind, dtype=np.float32)
    base = {n: p.data.copy() for n, p in model.named_parameters() if not n.startswith("prefix.")}
    opt = ml.AdamW(params, lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(IDX, IDX)[1]
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in base:
            assert p.data.tobytes() == base[n].tobytes(), n


# --------------------------------------------------------------------------------------
# Context and generation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_the_context_shrinks_by_the_prefix_length(kind):
    model, _ = prefixed(kind)
    assert model.context_length == TINY_2x2.block_size - P == 4
    model(IDX)  # 4 tokens: fine
    too_long = np.zeros((1, 5), dtype=np.int64)
    message = r"idx has 5 positions but block_size is 6, less the 2 its prefix takes: at most 4"
    with pytest.raises(ValueError, match=message):
        model(too_long)
    with pytest.raises(ValueError, match=message):
        model.generate(too_long, 1)


def test_a_prefix_must_leave_a_position_for_tokens():
    model = make_gpt(TINY_2x2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"num_virtual_tokens=6 leaves no position.*at most 5"):
        apply_prefix_tuning(model, PrefixConfig("layer", 6))
    assert snapshot(model) == before and type(model) is ml.GPT


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_generation_with_the_cache_gives_the_tokens_of_recomputing(kind):
    model, _ = prefixed(kind, scale=0.3)
    prompt = IDX[:, :2]
    cached = model.generate(prompt, 6, temperature=0)  # runs past the context: crops
    recomputed = model.generate(prompt, 6, temperature=0, use_cache=False)
    np.testing.assert_array_equal(cached, recomputed)
    cache = model.kv_cache(len(IDX))
    assert cache.length == P  # the prefix is in the cache before any token
    with no_grad():
        logits = model.forward_cached(IDX, cache)
    np.testing.assert_allclose(logits, model(IDX)[0].data, rtol=1e-12, atol=1e-12)
    bare = ml.KVCache(TINY_2x2, len(IDX), dtype=np.float64)  # without the prefix: refused
    with no_grad(), pytest.raises(ValueError, match="holds 0 positions but the model's prefix"):
        model.forward_cached(IDX, bare)


# --------------------------------------------------------------------------------------
# Collapsing the reparameterisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_type", ["layer", "embedding"])
def test_collapse_keeps_the_logits_and_leaves_the_plain_prefix(prefix_type):
    model, _ = prefixed((prefix_type, True))
    before = model(IDX)[0].data
    collapse_prefix(model)
    np.testing.assert_array_equal(model(IDX)[0].data, before)
    config = model.prefix.config
    assert config.prefix_projection is False and model.prefix.transform is None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["prefix.embedding"]
    C = TINY_2x2.n_embd
    assert model.prefix.embedding.size == prefix_parameter_count(config, TINY_2x2.n_layer, C)
    with pytest.raises(ValueError, match="no prefix with prefix_projection=True"):
        collapse_prefix(model)


# --------------------------------------------------------------------------------------
# Configuration and bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            {"prefix_type": "prompt"},
            r"prefix_type='prompt' must be one of \('layer', 'embedding'\)",
        ),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens=0 must be a positive integer"),
        ({"num_virtual_tokens": 1.5}, "num_virtual_tokens=1.5 must be a positive integer"),
        ({"prefix_projection": "yes"}, "prefix_projection='yes' must be True or False"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size=0 must be a positive integer"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        PrefixConfig(**changes)


def test_apply_refuses_a_second_prefix_and_other_types():
    model, _ = prefixed(("layer", False))
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix_tuning(model, PrefixConfig())
    with pytest.raises(TypeError, match="config must be a PrefixConfig, got dict"):
        apply_prefix_tuning(make_gpt(TINY_2x2), {"num_virtual_tokens": 2})
    with pytest.raises(TypeError, match="model must be a GPT, got Linear"):
        apply_prefix_tuning(ml.Linear(2, 2), PrefixConfig())


# --------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_save_and_load_give_the_same_model(kind, tmp_path):
    model, _ = prefixed(kind)
    save_prefix(model, tmp_path / "prefix.safetensors")
    save_prefix(model, tmp_path / "again.safetensors")
    first = (tmp_path / "prefix.safetensors").read_bytes()
    assert first == (tmp_path / "again.safetensors").read_bytes()  # reproducible
    fresh = base_twin(model)
    config = load_prefix(fresh, tmp_path / "prefix.safetensors")
    assert config == model.prefix.config
    np.testing.assert_array_equal(fresh(IDX)[0].data, model(IDX)[0].data)
    trains = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trains == {n for n, p in model.named_parameters() if p.requires_grad}
    # into a model with the same prefix: the values are replaced
    other, _ = prefixed(kind, seed=7)
    other.load_state_dict({**other.state_dict(), **fresh.state_dict()})  # same base
    load_prefix(other, tmp_path / "prefix.safetensors")
    np.testing.assert_array_equal(other(IDX)[0].data, model(IDX)[0].data)


def test_refused_loads_leave_the_model_untouched(tmp_path):
    model, _ = prefixed(("layer", False))
    path = tmp_path / "prefix.safetensors"
    save_prefix(model, path)
    # a model with another prefix
    other, _ = prefixed(("embedding", False))
    before = snapshot(other)
    with pytest.raises(ValueError, match="holds a prefix with .*layer.* but the model has one"):
        load_prefix(other, path)
    assert snapshot(other) == before
    # a model of another width: the shapes disagree
    wide = make_gpt(TINY_2x2, n_embd=4)
    before = snapshot(wide)
    with pytest.raises(ValueError, match="does not fit this model") as info:
        load_prefix(wide, path)
    assert "embedding has shape (2, 32), expected (2, 16)" in str(info.value)  # L·2·C
    assert snapshot(wide) == before and type(wide) is ml.GPT
    # a truncated file
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_prefix(wide, cut)
    # a whole-model file is not a prefix file
    plain = tmp_path / "model.safetensors"
    model_files.save_model(make_gpt(TINY_2x2), plain)
    with pytest.raises(ValueError, match="is not a prefix file .*'minilora.model'"):
        load_prefix(wide, plain)
    assert snapshot(wide) == before and type(wide) is ml.GPT


def test_save_refuses_a_model_without_a_prefix(tmp_path):
    with pytest.raises(ValueError, match="has no prefix"):
        save_prefix(make_gpt(TINY_2x2), tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", [("layer", True), ("embedding", False)], ids=kind_id)
def test_prefix_models_run_on_the_stand_in_device_alike(kind):
    """The prefix path uses only backend helpers: the stand-in device (tests/standin.py),
    which refuses host fallbacks, gives the CPU's logits and generated tokens."""
    model, _ = prefixed(kind, scale=0.3)
    want, tokens = model(IDX)[0].data, model.generate(IDX[:, :2], 5, temperature=0)
    model.to("standin")
    got = model(IDX)[0]
    np.testing.assert_allclose(backend.to_numpy(got.data), want, rtol=1e-12, atol=1e-12)
    got_tokens = model.generate(IDX[:, :2], 5, temperature=0)
    np.testing.assert_array_equal(backend.to_numpy(got_tokens), tokens)


@pytest.mark.parametrize(
    "metadata, match",
    [
        ({"format": "minilora.prefix", "format_version": "2"}, "format_version '2', expected '1'"),
        ({"config": "{not json"}, "has a config that is not JSON"),
        ({"config": '{"prefix_type": "layer"}'}, "expected the keys"),
        (
            {
                "config": '{"prefix_type": "layer", "num_virtual_tokens": 0, '
                '"prefix_projection": false, "encoder_hidden_size": 3}'
            },
            "num_virtual_tokens=0 must be a positive integer",
        ),
    ],
)
def test_a_bad_prefix_header_is_refused(metadata, match, tmp_path):
    model, _ = prefixed(("layer", False))
    good = {
        "format": "minilora.prefix",
        "format_version": "1",
        "config": '{"encoder_hidden_size": 3, "num_virtual_tokens": 2, '
        '"prefix_projection": false, "prefix_type": "layer"}',
    }
    path = tmp_path / "p.safetensors"
    tensors = {"prefix.embedding": model.prefix.embedding.data.copy()}
    safetensors_files.atomic_write(
        [(path, safetensors_files.serialize(tensors, {**good, **metadata}))]
    )
    fresh = make_gpt(TINY_2x2)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_prefix(fresh, path)
    assert snapshot(fresh) == before and type(fresh) is ml.GPT
    safetensors_files.atomic_write([(path, safetensors_files.serialize(tensors, good))])
    load_prefix(fresh, path)  # the same file with the good header loads
    assert isinstance(fresh, PrefixGPT)
