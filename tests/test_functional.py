"""Every op in minilora.functional: backward against central differences (float64, random
upstream gradient, every input, frozen inputs get nothing), forward against plain NumPy,
work counted with ``backend.counting()``, and error messages."""

import math

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
    seeds,
    shapes,
)

from minilora import Tensor, backend
from minilora import functional as F
from minilora.gradcheck import gradcheck

# every test here runs on the fast path and on the reference ops (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("ops")

# --------------------------------------------------------------------------------------
# NumPy references
# --------------------------------------------------------------------------------------


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def np_linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def np_cross_entropy(logits, targets, ignore_index=-100):
    V = logits.shape[-1]
    lp = np_log_softmax(logits.reshape(-1, V))
    t = targets.reshape(-1)
    valid = t != ignore_index
    picked = lp[np.arange(t.size), np.where(valid, t, 0)]
    return -(picked * valid).sum() / valid.sum()


def np_attention(q, k, v):
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(hs)
    future = np.arange(T)[None, :] > np.arange(T)[:, None]  # column after row
    scores = np.where(future, -np.inf, scores)
    return np_softmax(scores, axis=-1) @ v


def T64(a):
    return Tensor(np.asarray(a, dtype=np.float64))


# --------------------------------------------------------------------------------------
# Elementwise binary ops, with broadcasting
# --------------------------------------------------------------------------------------

BINARY = {
    "add": (F.add, np.add),
    "sub": (F.sub, np.subtract),
    "mul": (F.mul, np.multiply),
    "div": (F.div, np.divide),
}


@pytest.mark.parametrize("name", BINARY)
@given(data=st.data())
def test_binary_backward(name, data):
    sa, sb = data.draw(broadcast_pairs())
    a = data.draw(arrays(sa))
    b = data.draw(nonzero_arrays(sb) if name == "div" else arrays(sb))
    frozen = data.draw(frozen_subsets(2))
    op, ref = BINARY[name]
    np.testing.assert_array_equal(op(T64(a), T64(b)).data, ref(a, b))
    assert gradcheck(op, [a, b], no_grads=frozen)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x + 2.5,
        lambda x: 2.5 + x,
        lambda x: x - 1.5,
        lambda x: 1.5 - x,
        lambda x: x * -3.0,
        lambda x: -3.0 * x,
        lambda x: x / 4.0,
        lambda x: 4.0 / x,
        lambda x: -x,
    ],
    ids=["add", "radd", "sub", "rsub", "mul", "rmul", "div", "rdiv", "neg"],
)
@given(data=st.data())
def test_operators_with_python_numbers_backward(fn, data):
    x = data.draw(nonzero_arrays(data.draw(shapes(max_dims=3))))
    with np.errstate(all="raise"):
        np.testing.assert_allclose(fn(T64(x)).data, fn(x), rtol=1e-15)
    assert gradcheck(fn, [x])


@pytest.mark.parametrize(
    "fn",
    [lambda t: t * 0.5, lambda t: 0.5 * t, lambda t: t + 0.5, lambda t: 1.5 - t],
    ids=["mul", "rmul", "add", "rsub"],
)
def test_integer_tensor_with_python_float_is_not_truncated(fn):
    """A Python float must not be cast to an integer tensor's dtype: ``ids * 0.5`` giving
    ``[0, 0]`` would be silently wrong. Either NumPy's answer or a TypeError is fine."""
    ids = np.array([1, 2, 3])
    try:
        out = fn(Tensor(ids))
    except TypeError:
        return
    np.testing.assert_array_equal(out.data, fn(ids))


# --------------------------------------------------------------------------------------
# Elementwise unary ops
# --------------------------------------------------------------------------------------

UNARY = {
    "exp": (F.exp, np.exp, arrays),
    "log": (F.log, np.log, lambda s: arrays(s, low=0.2, high=2.0)),
    "tanh": (F.tanh, np.tanh, arrays),
    "neg": (F.neg, np.negative, arrays),
    "gelu": (F.gelu, np_gelu, lambda s: arrays(s, low=-4.0, high=4.0)),
}


@pytest.mark.parametrize("name", UNARY)
@given(data=st.data())
def test_unary_backward(name, data):
    op, ref, values = UNARY[name]
    x = data.draw(values(data.draw(shapes())))
    np.testing.assert_allclose(op(T64(x)).data, ref(x), rtol=1e-14, atol=1e-15)
    assert gradcheck(op, [x])


@given(data=st.data(), exponent=st.sampled_from([2, 3, -1, -2, 0.5, 1.5, -0.5, 1, 0]))
def test_pow_backward(data, exponent):
    shape = data.draw(shapes(max_dims=3))
    if float(exponent).is_integer():
        x = data.draw(nonzero_arrays(shape))
    else:
        x = data.draw(arrays(shape, low=0.3, high=2.0))
    fn = lambda t: F.pow(t, exponent)  # noqa: E731
    np.testing.assert_allclose(fn(T64(x)).data, x**exponent, rtol=1e-14)
    np.testing.assert_allclose((T64(x) ** exponent).data, x**exponent, rtol=1e-14)
    assert gradcheck(fn, [x])


def test_pow_rejects_tensor_exponent():
    with pytest.raises(TypeError, match="exponent"):
        F.pow(T64([1.0]), T64([2.0]))


def test_gelu_known_values():
    y = F.gelu(T64([0.0, 1.0, -1.0, 3.0])).data
    np.testing.assert_allclose(y, [0.0, 0.8411919906, -0.1588080094, 2.9963625100], atol=1e-9)


# --------------------------------------------------------------------------------------
# Reductions and shape ops
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
@given(data=st.data(), keepdims=st.booleans())
def test_reduction_backward(name, data, keepdims):
    shape = data.draw(shapes())
    axis = data.draw(axes(len(shape)))
    # max: distinct values, so there are no ties for the finite differences to straddle
    x = data.draw(distinct_arrays(shape) if name == "max" else arrays(shape))
    fn = lambda t: getattr(F, name)(t, axis=axis, keepdims=keepdims)  # noqa: E731
    out = fn(T64(x))
    expected = getattr(np, name)(x, axis=axis, keepdims=keepdims)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.data, expected, rtol=1e-14)
    method = getattr(T64(x), name)(axis=axis, keepdims=keepdims)
    np.testing.assert_array_equal(method.data, out.data)
    assert gradcheck(fn, [x])


def test_max_splits_gradient_between_ties():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]]), requires_grad=True)
    F.max(x, axis=1).backward(np.array([1.0, 2.0]))
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5], [2.0, 0.0, 0.0]])


@given(data=st.data())
def test_reshape_backward(data):
    shape = data.draw(shapes())
    target = data.draw(reshape_targets(shape))
    x = data.draw(arrays(shape))
    np.testing.assert_array_equal(T64(x).reshape(target).data, x.reshape(target))
    np.testing.assert_array_equal(F.reshape(T64(x), *target).data, x.reshape(target))
    assert gradcheck(lambda t: t.reshape(target), [x])


def test_reshape_error_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 2\)"):
        T64(np.zeros((2, 3))).reshape(4, 2)


@given(data=st.data())
def test_permute_backward(data):
    shape = data.draw(shapes())
    dims = tuple(data.draw(st.permutations(range(len(shape)))))
    x = data.draw(arrays(shape))
    np.testing.assert_array_equal(T64(x).permute(*dims).data, x.transpose(dims))
    assert gradcheck(lambda t: t.permute(*dims), [x])
    neg_dims = tuple(d - len(shape) for d in dims)  # negative axes mean the same
    assert gradcheck(lambda t: F.permute(t, neg_dims), [x])


@given(data=st.data())
def test_transpose_and_T_backward(data):
    shape = data.draw(shapes(min_dims=2))
    d0 = data.draw(st.integers(-len(shape), len(shape) - 1))
    d1 = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(arrays(shape))
    np.testing.assert_array_equal(T64(x).transpose(d0, d1).data, np.swapaxes(x, d0, d1))
    np.testing.assert_array_equal(T64(x).T.data, x.T)
    assert gradcheck(lambda t: t.transpose(d0, d1), [x])
    assert gradcheck(lambda t: t.T, [x])


@st.composite
def basic_indices(draw, shape):
    """A tuple of slices (negative steps included) and ints, one per leading dim."""
    index = []
    for n in shape[: draw(st.integers(1, len(shape)))]:
        kind = draw(st.sampled_from(["slice", "int"]))
        if kind == "int":
            index.append(draw(st.integers(-n, n - 1)))
        else:
            start = draw(st.none() | st.integers(-n, n - 1))
            stop = draw(st.none() | st.integers(-n, n))
            step = draw(st.sampled_from([None, 1, 2, -1]))
            index.append(slice(start, stop, step))
    return tuple(index)


@given(data=st.data())
def test_getitem_basic_slices_backward(data):
    shape = data.draw(shapes())
    index = data.draw(basic_indices(shape))
    x = data.draw(arrays(shape))
    expected = x[index]
    if expected.size == 0:
        return  # an empty selection: nothing to check numerically
    np.testing.assert_array_equal(T64(x)[index].data, expected)
    assert gradcheck(lambda t: t[index], [x])


@given(data=st.data())
def test_getitem_integer_array_with_repeats_backward(data):
    shape = data.draw(shapes())
    k = data.draw(st.integers(1, 6))
    ids = data.draw(int_arrays((k,), -shape[0], shape[0]))  # repeats likely; negatives too
    x = data.draw(arrays(shape))
    np.testing.assert_array_equal(T64(x)[ids].data, x[ids])
    np.testing.assert_array_equal(T64(x)[Tensor(ids)].data, x[ids])
    assert gradcheck(lambda t: t[ids], [x])
    if len(shape) >= 2:  # two index arrays together, and an index array with a slice
        ids2 = data.draw(int_arrays((k,), 0, shape[1]))
        np.testing.assert_array_equal(T64(x)[ids, ids2].data, x[ids, ids2])
        assert gradcheck(lambda t: t[ids, ids2], [x])
        np.testing.assert_array_equal(T64(x)[1:, ids2].data, x[1:, ids2])
        if shape[0] > 1:
            assert gradcheck(lambda t: t[1:, ids2], [x])


def test_getitem_repeated_index_accumulates():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    x[np.array([0, 0, 2, 0])].backward(np.array([1.0, 10.0, 100.0, 1000.0]))
    np.testing.assert_array_equal(x.grad, [1011.0, 0.0, 100.0])


# --------------------------------------------------------------------------------------
# Matrix products
# --------------------------------------------------------------------------------------


@given(data=st.data())
def test_matmul_backward_with_broadcast_batch(data):
    batch_a, batch_b = data.draw(broadcast_pairs(min_dims=0, max_dims=2, max_side=3))
    m, k, n = (data.draw(st.integers(1, 4)) for _ in range(3))
    a = data.draw(arrays(batch_a + (m, k)))
    b = data.draw(arrays(batch_b + (k, n)))
    frozen = data.draw(frozen_subsets(2))
    np.testing.assert_allclose(F.matmul(T64(a), T64(b)).data, a @ b, rtol=1e-13)
    np.testing.assert_allclose((T64(a) @ T64(b)).data, a @ b, rtol=1e-13)
    assert gradcheck(F.matmul, [a, b], no_grads=frozen)


@st.composite
def linear_case(draw):
    ndim = draw(st.sampled_from([2, 3]))  # x is (N, in) or (B, T, in)
    lead = tuple(draw(st.integers(1, 3)) for _ in range(ndim - 1))
    fan_in, fan_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(arrays(lead + (fan_in,)))
    w = draw(arrays((fan_out, fan_in)))
    b = draw(arrays((fan_out,)))
    return x, w, b


@given(case=linear_case(), has_bias=st.booleans(), data=st.data())
def test_linear_backward(case, has_bias, data):
    x, w, b = case
    frozen = data.draw(frozen_subsets(3 if has_bias else 2))
    if has_bias:
        np.testing.assert_allclose(F.linear(T64(x), T64(w), T64(b)).data, np_linear(x, w, b))
        assert gradcheck(F.linear, [x, w, b], no_grads=frozen)
    else:
        np.testing.assert_allclose(F.linear(T64(x), T64(w)).data, np_linear(x, w))
        assert gradcheck(lambda x_, w_: F.linear(x_, w_), [x, w], no_grads=frozen)


@given(case=linear_case())
def test_linear_backward_weight_frozen(case):
    assert gradcheck(F.linear, list(case), no_grads=(1,))
    assert gradcheck(F.linear, list(case), no_grads=(0, 1))  # only the bias trains


@st.composite
def lora_case(draw):
    lead = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 2))))
    fan_in, fan_out, r = (draw(st.integers(1, 4)) for _ in range(3))
    x = draw(arrays(lead + (fan_in,)))
    w = draw(arrays((fan_out, fan_in)))
    b = draw(arrays((fan_out,)))
    a = draw(arrays((r, fan_in)))
    bb = draw(arrays((fan_out, r)))  # nonzero B: with B = 0 some gradients vanish
    x_lora = draw(arrays(x.shape))
    scaling = draw(st.floats(-4.0, 4.0, allow_nan=False))
    return x, w, b, a, bb, x_lora, scaling


def np_lora(x, w, b, a, bb, s, d=None):
    d = x if d is None else d
    return np_linear(x, w, b) + s * (d @ a.T) @ bb.T


@given(case=lora_case(), separate=st.booleans(), data=st.data())
def test_lora_linear_backward(case, separate, data):
    x, w, b, a, bb, x_lora, s = case
    if separate:
        inputs = [x, w, b, a, bb, x_lora]
        fn = lambda *t: F.lora_linear(*t[:5], s, x_lora=t[5])  # noqa: E731
        expected = np_lora(x, w, b, a, bb, s, x_lora)
    else:
        inputs = [x, w, b, a, bb]
        fn = lambda *t: F.lora_linear(*t, s)  # noqa: E731
        expected = np_lora(x, w, b, a, bb, s)
    frozen = data.draw(frozen_subsets(len(inputs)))
    np.testing.assert_allclose(fn(*map(T64, inputs)).data, expected, rtol=1e-12, atol=1e-12)
    assert gradcheck(fn, inputs, no_grads=frozen)


@given(case=lora_case(), separate=st.booleans())
def test_lora_linear_backward_base_frozen(case, separate):
    """LoRA's own setting: W and b frozen; x, A, B (and x_lora) train."""
    x, w, b, a, bb, x_lora, s = case
    if separate:
        fn = lambda *t: F.lora_linear(*t[:5], s, x_lora=t[5])  # noqa: E731
        assert gradcheck(fn, [x, w, b, a, bb, x_lora], no_grads=(1, 2))
        assert gradcheck(fn, [x, w, b, a, bb, x_lora], no_grads=(0, 1, 2))
        assert gradcheck(fn, [x, w, b, a, bb, x_lora], no_grads=(1, 2, 5))
    else:
        fn = lambda *t: F.lora_linear(*t, s)  # noqa: E731
        assert gradcheck(fn, [x, w, b, a, bb], no_grads=(1, 2))
        assert gradcheck(fn, [x, w, b, a, bb], no_grads=(0, 1, 2))


def test_lora_linear_is_linear_when_b_is_zero():
    r = np.random.default_rng(0)
    x, w, b, a = (
        r.normal(size=(2, 3)),
        r.normal(size=(4, 3)),
        r.normal(size=4),
        r.normal(size=(2, 3)),
    )
    y = F.lora_linear(T64(x), T64(w), T64(b), T64(a), T64(np.zeros((4, 2))), 2.0)
    np.testing.assert_array_equal(y.data, F.linear(T64(x), T64(w), T64(b)).data)


# --------------------------------------------------------------------------------------
# Normalisation, softmax, losses
# --------------------------------------------------------------------------------------


@given(data=st.data(), affine=st.sampled_from(["both", "weight", "bias", "none"]))
def test_layer_norm_backward(data, affine):
    shape = data.draw(shapes(min_dims=1, max_dims=3, min_side=1))
    C = shape[-1]
    # distinct values keep every row's variance away from 0 (a near-constant row makes
    # the normalisation so steep that central differences are meaningless)
    x = data.draw(distinct_arrays(shape))
    w = data.draw(arrays((C,), low=-2.0, high=2.0)) if affine in ("both", "weight") else None
    b = data.draw(arrays((C,))) if affine in ("both", "bias") else None
    params = [p for p in (w, b) if p is not None]

    def fn(x_, *p):
        p = list(p)
        return F.layer_norm(
            x_, p.pop(0) if w is not None else None, p.pop(0) if b is not None else None
        )

    frozen = data.draw(frozen_subsets(1 + len(params)))
    np.testing.assert_allclose(fn(*map(T64, [x, *params])).data, np_layer_norm(x, w, b), atol=1e-12)
    assert gradcheck(fn, [x, *params], no_grads=frozen)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@given(data=st.data())
def test_softmax_backward(name, data):
    shape = data.draw(shapes(max_dims=3))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(arrays(shape, low=-3.0, high=3.0))
    op, ref = (F.softmax, np_softmax) if name == "softmax" else (F.log_softmax, np_log_softmax)
    fn = lambda t: op(t, axis=axis)  # noqa: E731
    np.testing.assert_allclose(fn(T64(x)).data, ref(x, axis), rtol=1e-13, atol=1e-15)
    assert gradcheck(fn, [x])


def test_softmax_large_logits_do_not_overflow():
    y = F.softmax(T64([[1000.0, 1000.0], [-1000.0, 0.0]])).data
    np.testing.assert_allclose(y, [[0.5, 0.5], [0.0, 1.0]])
    y = F.log_softmax(T64([1000.0, 0.0])).data
    np.testing.assert_allclose(y, [0.0, -1000.0])


@given(data=st.data(), ignore_index=st.sampled_from([-100, -1, 0]))
def test_softmax_cross_entropy_backward(data, ignore_index):
    lead = data.draw(shapes(min_dims=1, max_dims=2, max_side=4))
    V = data.draw(st.integers(2, 5))
    logits = data.draw(arrays(lead + (V,), low=-3.0, high=3.0))
    targets = data.draw(int_arrays(lead, 0, V))
    ignored = data.draw(st.lists(st.booleans(), min_size=targets.size, max_size=targets.size))
    flat = targets.reshape(-1)
    flat[np.array(ignored, dtype=bool)] = ignore_index
    if not (flat != ignore_index).any():
        flat[0] = 1  # at least one target counts (1 is never an ignore_index here)
    fn = lambda t: F.softmax_cross_entropy(t, targets, ignore_index=ignore_index)  # noqa: E731
    loss = fn(T64(logits))
    assert loss.shape == ()
    np.testing.assert_allclose(loss.data, np_cross_entropy(logits, targets, ignore_index))
    assert gradcheck(fn, [logits])
    # targets passed through gradcheck as an integer input (not differentiated)
    assert gradcheck(
        lambda t, y: F.softmax_cross_entropy(t, y, ignore_index=ignore_index), [logits, targets]
    )


def test_softmax_cross_entropy_ignored_rows_get_zero_grad():
    logits = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    F.softmax_cross_entropy(logits, np.array([-100, 2])).backward()
    np.testing.assert_array_equal(logits.grad[0], [0.0, 0.0, 0.0])
    p = np_softmax(np.array([3.0, 4.0, 5.0]))
    np.testing.assert_allclose(logits.grad[1], p - [0, 0, 1], rtol=1e-14)


# Half precision: layer norm, softmax and the loss compute in float32 for float16 inputs and
# round back, as PyTorch does (docs/math.md, "Half precision"): their float16 outputs and
# gradients are exactly the float32 op's on the same values, rounded to float16.

HALF_OPS = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), 3),
    "softmax": (lambda x: F.softmax(x), 1),
    "log_softmax": (lambda x: F.log_softmax(x), 1),
    "softmax_cross_entropy": (lambda x: F.softmax_cross_entropy(x, np.arange(6) % 50), 1),
}


def half_inputs(n: int, seed: int) -> list:
    """float16 inputs: (6, 50) rows, the first three with an entry 300 to 900 from their
    row mean, whose (x - μ)² overflows float16, and weight and bias (50,) for layer norm."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(6, 50)) * 4
    x[:3, 7] += np.linspace(300.0, 900.0, 3)
    return [x.astype(np.float16)] + [r.normal(size=50).astype(np.float16) for _ in range(n - 1)]


def run_op(fn, arrays, g):
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(None if g is None else g.astype(out.dtype))
    return [out.data] + [t.grad for t in tensors]


@pytest.mark.parametrize("name", list(HALF_OPS))
def test_float16_ops_give_float32_math_rounded_to_float16(name):
    fn, n = HALF_OPS[name]
    x16 = half_inputs(n, seed=3)
    g = np.random.default_rng(4).normal(size=(6, 50)).astype(np.float16)  # exact in float32
    g = None if name == "softmax_cross_entropy" else g
    got = run_op(fn, x16, g)
    want = run_op(fn, [a.astype(np.float32) for a in x16], g)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == np.float16, f"result {i} has dtype {a.dtype}"
        np.testing.assert_array_equal(a, b.astype(np.float16), err_msg=f"result {i}")


def test_float16_layer_norm_of_far_entries_is_finite_and_right():
    """The issue's case: an entry 300 to 900 from its row mean, normalised in float16
    itself, gives inf variance and a row of zeros; in float32 it is right."""
    x, w, b = half_inputs(3, seed=5)
    y = F.layer_norm(Tensor(x), Tensor(w), Tensor(b)).data
    want = np_layer_norm(*(a.astype(np.float64) for a in (x, w, b)))
    np.testing.assert_allclose(y, want, rtol=4e-3, atol=4e-3 * np.abs(want).max())


@given(data=st.data())
def test_embedding_backward(data):
    V, C = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    ids_shape = data.draw(shapes(min_dims=1, max_dims=2, max_side=5))
    ids = data.draw(int_arrays(ids_shape, 0, V))  # few ids in a small vocab: repeats
    w = data.draw(arrays((V, C)))
    np.testing.assert_array_equal(F.embedding(ids, T64(w)).data, w[ids])
    assert gradcheck(F.embedding, [ids, w])
    assert gradcheck(lambda w_: F.embedding(Tensor(ids), w_), [w])


def test_embedding_repeated_ids_accumulate():
    w = Tensor(np.zeros((3, 2)), requires_grad=True)
    F.embedding(np.array([[2, 0, 2]]), w).backward(np.array([[[1.0, 2], [3, 4], [5, 6]]]))
    np.testing.assert_array_equal(w.grad, [[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])


@given(data=st.data(), p=st.floats(0.1, 0.6), seed=seeds)
def test_dropout_backward(data, p, seed):
    shape = data.draw(shapes(max_dims=3))
    x = data.draw(arrays(shape))
    fn = lambda t: F.dropout(t, p, generator=backend.Generator(seed))  # noqa: E731
    keep = backend.Generator(seed).random(shape, dtype=np.float64) >= p
    np.testing.assert_allclose(fn(T64(x)).data, np.where(keep, x / (1 - p), 0.0), rtol=1e-15)
    assert gradcheck(fn, [x])


def test_dropout_identity_when_not_training_or_p_zero():
    x = T64(np.ones((3, 3)))
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x


def test_dropout_drops_about_p_and_keeps_the_mean():
    x = T64(np.ones((200, 200)))
    y = F.dropout(x, 0.3, generator=backend.Generator(1)).data
    frac_zero = float((y == 0).mean())
    assert abs(frac_zero - 0.3) < 0.01  # 40,000 draws: the std of the fraction is 0.0023
    assert set(np.unique(y).tolist()) == {0.0, 1 / 0.7}


def test_dropout_same_seed_same_mask():
    x = T64(np.ones((5, 7)))
    a = F.dropout(x, 0.5, generator=backend.Generator(3)).data
    b = F.dropout(x, 0.5, generator=backend.Generator(3)).data
    c = F.dropout(x, 0.5, generator=backend.Generator(4)).data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@given(shape=attention_shapes(), data=st.data())
def test_causal_self_attention_backward(shape, data):
    q, k, v = (data.draw(arrays(shape)) for _ in range(3))
    frozen = data.draw(frozen_subsets(3))
    out = F.causal_self_attention(T64(q), T64(k), T64(v))
    np.testing.assert_allclose(out.data, np_attention(q, k, v), rtol=1e-12, atol=1e-14)
    assert gradcheck(F.causal_self_attention, [q, k, v], no_grads=frozen)


def test_causal_self_attention_backward_over_several_query_blocks():
    """T = 130: three of the fast path's blocks of 64 query rows, the last of two rows."""
    r = np.random.default_rng(1)
    q, k, v = (r.normal(size=(1, 1, 130, 2)) for _ in range(3))
    out = F.causal_self_attention(T64(q), T64(k), T64(v))
    np.testing.assert_allclose(out.data, np_attention(q, k, v), rtol=1e-12, atol=1e-14)
    assert gradcheck(F.causal_self_attention, [q, k, v])


def test_causal_self_attention_ignores_the_future():
    r = np.random.default_rng(0)
    q, k, v = (r.normal(size=(1, 2, 4, 3)) for _ in range(3))
    k2, v2 = k.copy(), v.copy()
    k2[..., 3, :] += 10.0  # change only the last position's key and value
    v2[..., 3, :] -= 10.0
    y1 = F.causal_self_attention(T64(q), T64(k), T64(v)).data
    y2 = F.causal_self_attention(T64(q), T64(k2), T64(v2)).data
    np.testing.assert_array_equal(y1[..., :3, :], y2[..., :3, :])
    np.testing.assert_array_equal(y1[..., 0, :], v[..., 0, :])  # position 0 sees only itself


@given(shape=attention_shapes(), new=st.integers(1, 4), data=st.data())
def test_cached_attention_is_the_last_rows_of_causal_attention(shape, new, data):
    """The newest Tq queries against all Tk keys give the last Tq rows of the full causal
    attention (what a KV cache relies on), with its backward gradchecked."""
    Tq = min(new, shape[2])
    q, k, v = (data.draw(arrays(shape)) for _ in range(3))
    frozen = data.draw(frozen_subsets(3))
    q_new = q[..., shape[2] - Tq :, :]
    out = F.cached_attention(T64(q_new), T64(k), T64(v))
    np.testing.assert_allclose(
        out.data, np_attention(q, k, v)[..., shape[2] - Tq :, :], rtol=1e-12, atol=1e-14
    )
    assert gradcheck(F.cached_attention, [q_new, k, v], no_grads=frozen)


def test_cached_attention_refuses_more_queries_than_keys():
    q = T64(np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"Tq <= Tk, got \(1, 2, 3, 4\), \(1, 2, 2, 4\)"):
        F.cached_attention(q, T64(np.zeros((1, 2, 2, 4))), T64(np.zeros((1, 2, 2, 4))))
    with pytest.raises(ValueError, match="cached_attention"):
        F.cached_attention(q, T64(np.zeros((1, 2, 3, 5))), T64(np.zeros((1, 2, 3, 5))))


# --------------------------------------------------------------------------------------
# Work done by the backward (counted, never timed)
# --------------------------------------------------------------------------------------


def _linear_loss(freeze_weight: bool):
    r = np.random.default_rng(0)
    x = Tensor(r.normal(size=(4, 3)), requires_grad=True)
    w = Tensor(r.normal(size=(5, 3)), requires_grad=not freeze_weight)
    b = Tensor(r.normal(size=5), requires_grad=True)
    return F.linear(x, w, b).sum(), w


def test_frozen_linear_weight_gets_no_dweight_matmul():
    loss, w = _linear_loss(freeze_weight=True)
    with backend.counting() as c:
        loss.backward()
    assert c.count("linear.dweight") == 0
    assert c.count("linear.dinput") == 1
    assert w.grad is None


def test_trainable_linear_weight_gets_exactly_one_dweight_matmul():
    loss, w = _linear_loss(freeze_weight=False)
    with backend.counting() as c:
        loss.backward()
    assert c.count("linear.dweight") == 1
    assert c.count("linear.dinput") == 1
    rec = [r for r in c.records if r.name == "linear.dweight"][0]
    assert rec.flops == 2 * 5 * 4 * 3
    assert w.grad.shape == (5, 3)


def _lora_inputs(x_requires_grad=True):
    r = np.random.default_rng(0)
    x = Tensor(r.normal(size=(2, 4, 3)), requires_grad=x_requires_grad)
    w, b = Tensor(r.normal(size=(5, 3))), Tensor(r.normal(size=5))  # frozen base
    a = Tensor(r.normal(size=(2, 3)), requires_grad=True)
    bb = Tensor(r.normal(size=(5, 2)), requires_grad=True)
    return x, w, b, a, bb


def test_lora_linear_frozen_weight_gets_no_dweight_matmul():
    x, w, b, a, bb = _lora_inputs()
    loss = F.lora_linear(x, w, b, a, bb, 2.0).sum()
    with backend.counting() as c:
        loss.backward()
    assert c.count("linear.dweight") == 0
    assert c.count("lora.dA") == 1 and c.count("lora.dB") == 1
    assert c.count("linear.dinput") == 1
    assert w.grad is None and b.grad is None
    assert a.grad.shape == (2, 3) and bb.grad.shape == (5, 2) and x.grad.shape == (2, 4, 3)


def test_lora_linear_frozen_input_gets_no_dinput_matmuls():
    x, w, b, a, bb = _lora_inputs(x_requires_grad=False)  # e.g. the first layer
    loss = F.lora_linear(x, w, b, a, bb, 2.0).sum()
    with backend.counting() as c:
        loss.backward()
    assert c.names().count("linear.dinput") == 0
    assert c.count("lora.dinput") == 0
    assert c.count("linear.dweight") == 0


def test_lora_linear_frozen_x_lora_gets_no_bypass_input_matmul():
    """With a separate bypass input that is frozen, only x's own gradient is needed:
    ``dx = g @ W``. The bypass-input gradient ``s * (g @ B) @ A`` is for x_lora alone."""
    x, w, b, a, bb = _lora_inputs()
    x_lora = Tensor(np.random.default_rng(1).normal(size=x.shape))  # frozen
    loss = F.lora_linear(x, w, b, a, bb, 2.0, x_lora=x_lora).sum()
    with backend.counting() as c:
        loss.backward()
    assert c.count("linear.dinput") == 1
    assert c.count("lora.dinput") == 0, c.names()


def test_unfrozen_lora_weight_gets_one_dweight_matmul():
    x, w, b, a, bb = _lora_inputs()
    w.requires_grad_(True)
    loss = F.lora_linear(x, w, b, a, bb, 2.0).sum()
    with backend.counting() as c:
        loss.backward()
    assert c.count("linear.dweight") == 1


# --------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [F.add, F.sub, F.mul, F.div])
def test_elementwise_shape_mismatch_names_both_shapes(op):
    with pytest.raises(ValueError) as info:
        op(T64(np.ones((2, 3))), T64(np.ones((4,))))
    assert "(2, 3)" in str(info.value) and "(4,)" in str(info.value)


def test_matmul_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as info:
        F.matmul(T64(np.ones((2, 3))), T64(np.ones((4, 5))))
    assert "(2, 3)" in str(info.value) and "(4, 5)" in str(info.value)
    with pytest.raises(ValueError) as info:
        F.matmul(T64(np.ones((3,))), T64(np.ones((3, 5))))
    assert "(3,)" in str(info.value) and "(3, 5)" in str(info.value)


def test_linear_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as info:
        F.linear(T64(np.ones((2, 3))), T64(np.ones((4, 5))))
    assert "(2, 3)" in str(info.value) and "(4, 5)" in str(info.value)
    with pytest.raises(ValueError) as info:
        F.linear(T64(np.ones((2, 3))), T64(np.ones((4, 3))), T64(np.ones(5)))
    assert "(5,)" in str(info.value) and "(4, 3)" in str(info.value)


def test_lora_linear_shape_mismatch_names_shapes():
    with pytest.raises(ValueError) as info:
        F.lora_linear(
            T64(np.ones((2, 3))),
            T64(np.ones((4, 3))),
            None,
            T64(np.ones((2, 3))),
            T64(np.ones((4, 3))),
            1.0,
        )
    assert "(2, 3)" in str(info.value) and "(4, 3)" in str(info.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: F.gelu(x),
        lambda x: F.layer_norm(x, None, None),
        lambda x: F.softmax(x),
        lambda x: F.log_softmax(x),
        lambda x: F.linear(x, T64(np.ones((2, 3)))),
    ],
    ids=["gelu", "layer_norm", "softmax", "log_softmax", "linear"],
)
def test_non_float_input_raises_type_error(call):
    with pytest.raises(TypeError, match="int64"):
        call(Tensor(np.array([[1, 2, 3]], dtype=np.int64)))


def test_layer_norm_wrong_weight_shape():
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        F.layer_norm(T64(np.ones((2, 3))), T64(np.ones(4)), None)


def test_embedding_float_ids_raise_type_error():
    with pytest.raises(TypeError, match="float64"):
        F.embedding(T64(np.array([0.0, 1.0])), T64(np.ones((5, 2))))


# Token ids and targets are range-checked once per batch by GPT.forward (tests/test_model.py),
# not by each op.


def test_cross_entropy_wrong_target_shape_and_all_ignored():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        F.softmax_cross_entropy(T64(np.zeros((2, 3))), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="ignore_index"):
        F.softmax_cross_entropy(T64(np.zeros((2, 3))), np.array([-100, -100]))
    with pytest.raises(TypeError, match="integer"):
        F.softmax_cross_entropy(T64(np.zeros((2, 3))), np.array([0.0, 1.0]))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_bad_p_raises(p):
    with pytest.raises(ValueError, match=rf"p={p}"):
        F.dropout(T64(np.ones(3)), p)


def test_attention_shape_mismatch_names_shapes():
    with pytest.raises(ValueError) as info:
        F.causal_self_attention(
            T64(np.ones((1, 1, 2, 3))), T64(np.ones((1, 1, 2, 4))), T64(np.ones((1, 1, 2, 3)))
        )
    assert "(1, 1, 2, 3)" in str(info.value) and "(1, 1, 2, 4)" in str(info.value)
