"""Parity with PyTorch autograd, op by op: the same inputs give the same outputs and the
same gradients, with a random upstream gradient, for every op in minilora.functional.

float64 is held tight (both sides compute the same formulas; only rounding and summation
order differ); float32 within the tolerances below. Frozen inputs are drawn too: minilora
must then return no gradient for them while the others still match PyTorch's.
Skipped, with the reason, when PyTorch is not installed (``pip install -e ".[oracle]"``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    arrays,
    attention_shapes,
    axes,
    broadcast_pairs,
    distinct_arrays,
    frozen_subsets,
    int_arrays,
    nonzero_arrays,
    reshape_targets,
    shapes,
)

from minilora import Tensor, backend
from minilora import functional as F

torch = pytest.importorskip("torch", reason="parity tests need PyTorch: pip install -e '.[oracle]'")
TF = torch.nn.functional

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("ops")]  # both op paths

# |minilora - torch| <= atol + rtol·|torch|, elementwise, by dtype.
# float64: 1e-12 + 1e-10·|torch|. Both sides compute the same formulas and differ only in
# rounding and summation order: the worst case measured over 200 random examples per test
# (HYPOTHESIS_PROFILE=dev) uses 2e-4 of this allowance (a batched matmul), while any
# mistake in a formula moves results by orders of magnitude more.
# float32: PyTorch's own defaults for float32 in torch.testing.assert_close: rtol 1.3e-6
# (about 11 ulp) and atol 1e-5, which covers cancellation (a sum of hundreds of values in
# [-2, 2] that nearly cancel has an absolute rounding error, not a relative one; NumPy sums
# a strided axis in order where PyTorch sums pairwise). Worst measured: a quarter of the
# allowance (layer norm's dx), a fourfold margin.
TOL = {
    np.float64: {"rtol": 1e-10, "atol": 1e-12},
    np.float32: {"rtol": 1.3e-6, "atol": 1e-5},
}
DTYPES = [np.float64, np.float32]


def assert_close(got, want, dtype, what: str) -> None:
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, torch {want.dtype}"
    np.testing.assert_allclose(got, want, **TOL[dtype], err_msg=what)


def parity(ml_fn, torch_fn, inputs, dtype, frozen=(), seed=0):
    """Run both sides on the same inputs (floats cast to ``dtype``, integers kept), compare
    the outputs, backpropagate the same random upstream gradient, compare every gradient;
    inputs listed in ``frozen`` must get none from minilora."""
    inputs = [a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a for a in inputs]
    floats = [np.issubdtype(a.dtype, np.floating) for a in inputs]
    need = [f and i not in frozen for i, f in enumerate(floats)]
    ml_in = [Tensor(a, requires_grad=n) for a, n in zip(inputs, need, strict=True)]
    t_in = [torch.tensor(a, requires_grad=n) for a, n in zip(inputs, need, strict=True)]
    y, ty = ml_fn(*ml_in), torch_fn(*t_in)
    assert_close(y.data, ty, dtype, "output")
    if not any(need):
        return
    g = np.random.default_rng(seed).standard_normal(y.shape).astype(dtype)
    y.backward(g)
    ty.backward(torch.tensor(g))
    for i, (t, tt) in enumerate(zip(ml_in, t_in, strict=True)):
        if need[i]:
            assert t.grad is not None, f"input {i} got no gradient"
            assert_close(t.grad, tt.grad, dtype, f"gradient of input {i}")
        else:
            assert t.grad is None, f"frozen input {i} got a gradient"


# --------------------------------------------------------------------------------------
# Elementwise
# --------------------------------------------------------------------------------------

BINARY = {
    "add": (F.add, torch.add),
    "sub": (F.sub, torch.sub),
    "mul": (F.mul, torch.mul),
    "div": (F.div, torch.div),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", BINARY)
@given(data=st.data())
def test_binary(name, dtype, data):
    sa, sb = data.draw(broadcast_pairs())
    a = data.draw(arrays(sa))
    b = data.draw(nonzero_arrays(sb) if name == "div" else arrays(sb))
    frozen = data.draw(frozen_subsets(2))
    parity(*BINARY[name], [a, b], dtype, frozen)


UNARY = {
    "neg": (F.neg, torch.neg, arrays),
    "exp": (F.exp, torch.exp, arrays),
    "log": (F.log, torch.log, lambda s: arrays(s, low=0.2, high=2.0)),
    "tanh": (F.tanh, torch.tanh, arrays),
    "gelu": (F.gelu, lambda t: TF.gelu(t, approximate="tanh"), lambda s: arrays(s, -4.0, 4.0)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", UNARY)
@given(data=st.data())
def test_unary(name, dtype, data):
    ml_fn, torch_fn, values = UNARY[name]
    parity(ml_fn, torch_fn, [data.draw(values(data.draw(shapes())))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), exponent=st.sampled_from([2, 3, -1, 0.5, 1.5, -0.5, 2.5]))
def test_pow(dtype, data, exponent):
    shape = data.draw(shapes(max_dims=3))
    x = data.draw(nonzero_arrays(shape) if float(exponent).is_integer() else arrays(shape, 0.3))
    parity(lambda t: F.pow(t, exponent), lambda t: t**exponent, [x], dtype)


# --------------------------------------------------------------------------------------
# Reductions and shape ops
# --------------------------------------------------------------------------------------


def _dims(axis):
    return axis if axis is None or isinstance(axis, int) else tuple(axis)


TORCH_REDUCE = {
    "sum": lambda t, axis, k: t.sum() if axis is None and not k else t.sum(dim=axis, keepdim=k),
    "mean": lambda t, axis, k: t.mean() if axis is None and not k else t.mean(dim=axis, keepdim=k),
    # amax splits the gradient equally between ties, as minilora's max does
    "max": lambda t, axis, k: torch.amax(t, dim=() if axis is None else axis, keepdim=k),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sum", "mean", "max"])
@given(data=st.data(), keepdims=st.booleans())
def test_reduction(name, dtype, data, keepdims):
    shape = data.draw(shapes())
    axis = _dims(data.draw(axes(len(shape))))
    x = data.draw(distinct_arrays(shape) if name == "max" else arrays(shape))
    parity(
        lambda t: getattr(F, name)(t, axis=axis, keepdims=keepdims),
        lambda t: TORCH_REDUCE[name](t, axis, keepdims),
        [x],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_ties_split_the_gradient_like_amax(dtype):
    x = np.array([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, -1.0]])
    parity(lambda t: F.max(t, axis=1), lambda t: torch.amax(t, dim=1), [x], dtype)
    parity(lambda t: F.max(t), lambda t: torch.amax(t), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_reshape_and_permute(dtype, data):
    shape = data.draw(shapes())
    x = data.draw(arrays(shape))
    target = data.draw(reshape_targets(shape))
    parity(lambda t: F.reshape(t, target), lambda t: t.reshape(target), [x], dtype)
    dims = tuple(data.draw(st.permutations(range(len(shape)))))
    parity(lambda t: F.permute(t, dims), lambda t: t.permute(dims), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_getitem(dtype, data):
    shape = data.draw(shapes(max_dims=3))
    x = data.draw(arrays(shape))
    k = data.draw(st.integers(1, 6))
    ids = data.draw(int_arrays((k,), -shape[0], shape[0]))  # repeats accumulate
    parity(lambda t: F.getitem(t, ids), lambda t: t[torch.tensor(ids)], [x], dtype)
    n = shape[0]
    start = data.draw(st.integers(0, n - 1))
    step = data.draw(st.sampled_from([1, 2]))
    index = (slice(start, None, step),) + (
        (data.draw(st.integers(-shape[1], shape[1] - 1)),) if len(shape) > 1 else ()
    )
    parity(lambda t: t[index], lambda t: t[index], [x], dtype)


# --------------------------------------------------------------------------------------
# Matrix products and linear layers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_matmul_with_broadcast_batch(dtype, data):
    ba, bb = data.draw(broadcast_pairs(min_dims=0, max_dims=2, max_side=3))
    m, k, n = (data.draw(st.integers(1, 4)) for _ in range(3))
    a, b = data.draw(arrays(ba + (m, k))), data.draw(arrays(bb + (k, n)))
    parity(F.matmul, torch.matmul, [a, b], dtype, data.draw(frozen_subsets(2)))


@st.composite
def lora_inputs(draw):
    lead = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 2))))
    n_in, n_out, r = (draw(st.integers(1, 5)) for _ in range(3))
    return [
        draw(arrays(lead + (n_in,))),  # x
        draw(arrays((n_out, n_in))),  # weight
        draw(arrays((n_out,))),  # bias
        draw(arrays((r, n_in))),  # lora_A
        draw(arrays((n_out, r))),  # lora_B, non-zero so that dA is not zero
        draw(arrays(lead + (n_in,))),  # x_lora: the bypass input after dropout
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@given(inputs=lora_inputs(), bias=st.booleans(), data=st.data())
def test_linear(dtype, inputs, bias, data):
    x, w, b = inputs[:3]
    if bias:
        parity(F.linear, TF.linear, [x, w, b], dtype, data.draw(frozen_subsets(3)))
    else:
        parity(
            lambda *t: F.linear(*t),
            lambda *t: TF.linear(*t),
            [x, w],
            dtype,
            data.draw(frozen_subsets(2)),
        )


def torch_lora(x, w, b, a, bb, s, d=None):
    d = x if d is None else d
    return TF.linear(x, w, b) + s * ((d @ a.T) @ bb.T)


@pytest.mark.parametrize("dtype", DTYPES)
@given(inputs=lora_inputs(), separate=st.booleans(), data=st.data())
def test_lora_linear(dtype, inputs, separate, data):
    s = data.draw(st.floats(-4.0, 4.0, allow_nan=False, width=32))
    if not separate:
        inputs = inputs[:5]
        ml_fn = lambda *t: F.lora_linear(*t, s)  # noqa: E731
        torch_fn = lambda *t: torch_lora(*t, s)  # noqa: E731
    else:
        ml_fn = lambda *t: F.lora_linear(*t[:5], s, x_lora=t[5])  # noqa: E731
        torch_fn = lambda *t: torch_lora(*t[:5], s, t[5])  # noqa: E731
    # LoRA's own setting (W, b frozen) half the time, any subset otherwise
    frozen = (1, 2) if data.draw(st.booleans()) else data.draw(frozen_subsets(len(inputs)))
    parity(ml_fn, torch_fn, inputs, dtype, frozen)


# --------------------------------------------------------------------------------------
# Normalisation, softmax, losses, embedding, dropout, attention
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), affine=st.booleans())
def test_layer_norm(dtype, data, affine):
    # C >= 3: with two values per row, x̂ = ±1 whatever x is, so dx is ~0 and made of
    # rounding noise only (gradcheck covers C = 1 and 2 in test_functional.py)
    shape = data.draw(shapes(min_dims=0, max_dims=2)) + (data.draw(st.integers(3, 6)),)
    C = shape[-1]
    x = data.draw(distinct_arrays(shape))  # no near-constant rows
    if affine:
        w, b = data.draw(arrays((C,))), data.draw(arrays((C,)))
        parity(
            lambda *t: F.layer_norm(*t),
            lambda x_, w_, b_: TF.layer_norm(x_, (C,), w_, b_),
            [x, w, b],
            dtype,
            data.draw(frozen_subsets(3)),
        )
    else:
        parity(lambda t: F.layer_norm(t, None, None), lambda t: TF.layer_norm(t, (C,)), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@given(data=st.data())
def test_softmax(name, dtype, data):
    shape = data.draw(shapes(max_dims=3))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(arrays(shape, low=-3.0, high=3.0))
    parity(
        lambda t: getattr(F, name)(t, axis=axis),
        lambda t: getattr(TF, name)(t, dim=axis),
        [x],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), ignore_index=st.sampled_from([-100, -1, 0]))
def test_softmax_cross_entropy(dtype, data, ignore_index):
    lead = data.draw(shapes(min_dims=1, max_dims=2, max_side=4))
    V = data.draw(st.integers(2, 6))
    logits = data.draw(arrays(lead + (V,), low=-3.0, high=3.0))
    targets = data.draw(int_arrays(lead, 0, V))
    ignored = data.draw(st.lists(st.booleans(), min_size=targets.size, max_size=targets.size))
    flat = targets.reshape(-1)
    flat[np.array(ignored, dtype=bool)] = ignore_index
    if not (flat != ignore_index).any():
        flat[0] = 1
    parity(
        lambda t, y: F.softmax_cross_entropy(t, y, ignore_index=ignore_index),
        lambda t, y: TF.cross_entropy(t.reshape(-1, V), y.reshape(-1), ignore_index=ignore_index),
        [logits, targets],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_embedding(dtype, data):
    V, C = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    ids = data.draw(int_arrays(data.draw(shapes(1, 2)), 0, V))  # small vocab: repeats
    parity(F.embedding, TF.embedding, [ids, data.draw(arrays((V, C)))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), p=st.floats(0.1, 0.6))
def test_dropout_with_minilora_mask(dtype, data, p):
    """PyTorch draws its own masks, so minilora's mask (kept where the draw is >= p) is
    applied on the PyTorch side: what is compared is the scaling by 1/(1-p) and the
    backward through the same mask."""
    x = data.draw(arrays(data.draw(shapes(max_dims=3))))
    holder = {}

    def ml_fn(t):
        y = F.dropout(t, p, generator=backend.Generator(data.draw(st.integers(0, 99))))
        holder["keep"] = torch.tensor(y._ctx.mask != 0)  # the node's saved, scaled mask
        return y

    parity(ml_fn, lambda t: t * holder["keep"] / (1 - p), [x], dtype)


def torch_attention(q, k, v):
    T, hs = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) / hs**0.5
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    return TF.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=attention_shapes(), data=st.data())
def test_causal_self_attention(dtype, shape, data):
    q, k, v = (data.draw(arrays(shape)) for _ in range(3))
    parity(F.causal_self_attention, torch_attention, [q, k, v], dtype, data.draw(frozen_subsets(3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_self_attention_matches_sdpa(dtype):
    """The explicit attention above is PyTorch's own causal SDPA, computed step by step."""
    q, k, v = (np.random.default_rng(i).uniform(-2, 2, (2, 2, 5, 3)) for i in range(3))
    sdpa = lambda *t: TF.scaled_dot_product_attention(*t, is_causal=True)  # noqa: E731
    parity(F.causal_self_attention, sdpa, [q, k, v], dtype)
