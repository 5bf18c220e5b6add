"""The autograd engine: accumulation, graph walking, no_grad, freezing, dtypes, errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, broadcast_pairs

from minilora import Tensor, backend, is_grad_enabled, no_grad
from minilora import functional as F


def leaf(a, dtype=np.float64):
    return Tensor(np.asarray(a, dtype=dtype), requires_grad=True)


# --------------------------------------------------------------------------------------
# Accumulation where a node is reused
# --------------------------------------------------------------------------------------


def test_reused_input_grads_sum_over_consumers():
    # LoRA's pattern: x feeds two products whose results are added
    xv, w1v, w2v = np.array([1.0, -2.0, 3.0]), np.array([0.5, 2.0, -1.0]), np.array([4.0, 1, 2])
    x, w1, w2 = leaf(xv), leaf(w1v), leaf(w2v)
    (x * w1 + x * w2).sum().backward()
    np.testing.assert_array_equal(x.grad, w1v + w2v)
    np.testing.assert_array_equal(w1.grad, xv)
    np.testing.assert_array_equal(w2.grad, xv)


def test_same_tensor_twice_in_one_op():
    x = leaf([1.0, 2.0, 3.0])
    g = np.array([0.5, -1.0, 2.0])
    (x + x).backward(g)
    np.testing.assert_array_equal(x.grad, 2 * g)
    x.grad = None
    (x * x).backward(g)
    np.testing.assert_array_equal(x.grad, 2 * x.data * g)


def test_reused_intermediate_node():
    # h is used twice downstream; its gradient must be summed before flowing to x
    x = leaf([1.0, -1.0, 0.5])
    h = x * 3.0
    (h * h + h).sum().backward()
    np.testing.assert_allclose(x.grad, 3.0 * (2 * 3.0 * x.data + 1.0), rtol=1e-15)


def test_diamond_graph():
    x = leaf([0.3, -0.7])
    a, b = x.exp(), x.tanh()
    (a * b).sum().backward()
    ex, th = np.exp(x.data), np.tanh(x.data)
    np.testing.assert_allclose(x.grad, ex * th + ex * (1 - th**2), rtol=1e-14)


# --------------------------------------------------------------------------------------
# Deep graphs
# --------------------------------------------------------------------------------------


def test_deep_chain_backward_has_no_recursion_limit():
    depth = 5000
    x = leaf([2.0])
    y = x
    for _ in range(depth):
        y = y * 1.0001 + 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001**depth], rtol=1e-10)
    np.testing.assert_allclose(y.data, [2.0 * 1.0001**depth], rtol=1e-10)


# --------------------------------------------------------------------------------------
# no_grad, frozen inputs, detach
# --------------------------------------------------------------------------------------


def test_no_grad_builds_no_graph():
    x = leaf([1.0, 2.0])
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert is_grad_enabled()
    assert y.requires_grad is False
    assert y._ctx is None
    assert y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_no_grad_restored_after_exception():
    assert is_grad_enabled()
    with pytest.raises(ZeroDivisionError), no_grad():
        1 / 0  # noqa: B018
    assert is_grad_enabled()
    y = leaf([1.0]) * 2.0
    assert y.requires_grad and y._ctx is not None


def test_no_grad_nested_restores_previous_state():
    with no_grad():
        with no_grad():
            pass
        assert not is_grad_enabled()
    assert is_grad_enabled()


def test_frozen_input_gets_no_grad():
    x = leaf([1.0, 2.0])
    w = Tensor(np.array([3.0, 4.0]))  # frozen
    (x * w).sum().backward()
    assert w.grad is None
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_requires_grad_false_freezes_leaf():
    w = leaf([3.0, 4.0]).requires_grad_(False)
    x = leaf([1.0, 2.0])
    (x * w).sum().backward()
    assert w.grad is None


def test_requires_grad_false_on_non_leaf_raises():
    y = leaf([1.0]) * 2.0
    with pytest.raises(RuntimeError, match="leaf"):
        y.requires_grad_(False)


def test_detach_cuts_the_graph():
    x = leaf([1.0, 2.0])
    w = leaf([3.0, 5.0])
    h = x * 2.0
    d = h.detach()
    assert d.requires_grad is False and d._ctx is None
    assert d.data is h.data  # shares the data
    (d * w).sum().backward()
    assert x.grad is None
    np.testing.assert_array_equal(w.grad, [2.0, 4.0])


# --------------------------------------------------------------------------------------
# retain_graph and accumulation across graphs
# --------------------------------------------------------------------------------------


def test_backward_twice_raises_mentioning_retain_graph():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_retain_graph_second_backward_accumulates():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])
    y.backward()
    np.testing.assert_array_equal(x.grad, [4.0, 8.0])


def test_grads_accumulate_across_separate_graphs():
    x = leaf([1.0, -1.0])
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0, 5.0])
    x.grad = None
    (x * 7.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])


# --------------------------------------------------------------------------------------
# backward() argument errors
# --------------------------------------------------------------------------------------


def test_backward_non_scalar_without_grad_raises_value_error():
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(ValueError, match=r"\(2,\)"):
        y.backward()


def test_backward_with_wrong_grad_shape_raises_value_error():
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(ValueError, match=r"\(3,\)"):
        y.backward(np.ones(3))


def test_backward_on_tensor_not_requiring_grad_raises_runtime_error():
    y = Tensor(np.array([1.0, 2.0])).sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_backward_of_a_leaf_itself():
    x = leaf([1.0, 2.0])
    x.backward(np.array([3.0, 4.0]))
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------


def test_requires_grad_on_integer_data_raises_type_error_naming_dtype():
    with pytest.raises(TypeError, match="int64"):
        Tensor(np.array([1, 2, 3], dtype=np.int64), requires_grad=True)
    with pytest.raises(TypeError, match="int32"):
        Tensor(np.array([1, 2], dtype=np.int32)).requires_grad_()


def test_python_data_defaults():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor([1, 2]).dtype == np.int64
    assert Tensor(np.zeros(2)).dtype == np.float64  # arrays keep their dtype


def test_mixing_float32_and_float64_raises_type_error():
    a = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    b = Tensor(np.ones(3, dtype=np.float64), requires_grad=True)
    with pytest.raises(TypeError, match="float32.*float64|float64.*float32"):
        a + b
    with pytest.raises(TypeError, match="float32.*float64|float64.*float32"):
        F.linear(Tensor(np.ones((2, 3), dtype=np.float32)), Tensor(np.ones((4, 3))))


def _f32(shape, seed=0, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape).astype(np.float32)


def _lora(x, w, b, a, bb, xl=None):
    return F.lora_linear(x, w, b, a, bb, 0.7, x_lora=xl)


def _sdpa(q, k, v):
    return F.causal_self_attention(q, k, v)


# name -> (fn, shapes of its float32 inputs, each given requires_grad=True)
FLOAT32_OPS = {
    "add": (F.add, [(2, 3), (3,)]),
    "sub": (F.sub, [(2, 3), (2, 1)]),
    "mul": (F.mul, [(2, 3), (1, 3)]),
    "div": (F.div, [(2, 3), (3,)]),
    "scalar_ops": (lambda a: (2.0 - a) * 3 / (1.0 + a * a) + 1 / (a * a + 2), [(2, 3)]),
    "neg": (F.neg, [(4,)]),
    "pow": (lambda a: F.pow(a * a + 1.0, 1.5), [(2, 3)]),
    "exp": (F.exp, [(2, 3)]),
    "log": (lambda a: F.log(a * a + 0.5), [(2, 3)]),
    "tanh": (F.tanh, [(2, 3)]),
    "sum": (lambda a: F.sum(a, axis=1), [(2, 3)]),
    "mean": (lambda a: F.mean(a, axis=0, keepdims=True), [(2, 3)]),
    "max": (lambda a: F.max(a, axis=-1), [(2, 3)]),
    "reshape": (lambda a: a.reshape(3, 2), [(2, 3)]),
    "permute": (lambda a: a.permute(1, 0, 2), [(2, 3, 4)]),
    "getitem": (lambda a: a[np.array([0, 0, 1]), 1:], [(2, 3)]),
    "matmul": (F.matmul, [(2, 2, 3), (3, 4)]),
    "linear": (F.linear, [(2, 3), (4, 3), (4,)]),
    "lora_linear": (_lora, [(2, 3), (4, 3), (4,), (2, 3), (4, 2)]),
    "lora_linear_x_lora": (_lora, [(2, 3), (4, 3), (4,), (2, 3), (4, 2), (2, 3)]),
    "gelu": (F.gelu, [(2, 3)]),
    "layer_norm": (F.layer_norm, [(2, 3), (3,), (3,)]),
    "softmax": (lambda a: F.softmax(a, axis=0), [(2, 3)]),
    "log_softmax": (F.log_softmax, [(2, 3)]),
    "cross_entropy": (
        lambda a: F.softmax_cross_entropy(a, np.array([1, -100, 0])),
        [(3, 4)],
    ),
    "embedding": (lambda w: F.embedding(np.array([[0, 2, 2]]), w), [(3, 4)]),
    "dropout": (lambda a: F.dropout(a, 0.5, generator=backend.Generator(0)), [(4, 5)]),
    "attention": (_sdpa, [(1, 2, 3, 4)] * 3),
}


@pytest.mark.parametrize("name", FLOAT32_OPS)
def test_float32_in_float32_out_and_float32_grads(name):
    fn, input_shapes = FLOAT32_OPS[name]
    inputs = [Tensor(_f32(s, seed=i), requires_grad=True) for i, s in enumerate(input_shapes)]
    out = fn(*inputs)
    assert out.dtype == np.float32, f"{name} forward gave {out.dtype}"
    g = _f32(out.shape, seed=99)
    # the raw gradients each node returns (before the leaf cast) must be float32 too:
    # walk the graph by hand, checking every Function.backward output
    bad = []
    stack, seen = [out], set()
    while stack:
        t = stack.pop()
        if t._ctx is None or id(t) in seen:
            continue
        seen.add(id(t))
        grads = t._ctx.backward(_f32(t.shape, seed=7))
        grads = grads if isinstance(grads, tuple) else (grads,)
        for inp, gr in zip(t._ctx.inputs, grads, strict=True):
            if gr is not None and gr.dtype != np.float32:
                bad.append((type(t._ctx).__name__, str(gr.dtype)))
            if inp is not None:
                stack.append(inp)
    assert not bad, f"{name}: backward returned non-float32 gradients {bad}"
    out.backward(g)
    for i, t in enumerate(inputs):
        assert t.grad is not None, f"{name}: input {i} got no gradient"
        assert t.grad.dtype == np.float32
        assert t.grad.shape == t.shape


# --------------------------------------------------------------------------------------
# Broadcasting and gradient buffers
# --------------------------------------------------------------------------------------


@given(data=st.data())
def test_broadcasting_undone_in_grads(data):
    sa, sb = data.draw(broadcast_pairs())
    av, bv = data.draw(arrays(sa)), data.draw(arrays(sb))
    out_shape = np.broadcast_shapes(sa, sb)
    for op in (F.add, F.sub, F.mul, F.div):
        a, b = leaf(av), leaf(bv + 3.0)  # b in [1, 5): safe to divide by
        out = op(a, b)
        assert out.shape == out_shape
        out.backward(np.ones(out_shape))
        assert a.grad.shape == sa and b.grad.shape == sb
    a, b = leaf(av), leaf(bv)
    (a + b).backward(np.ones(out_shape))
    # each element was used (out size / own size) times
    n = int(np.prod(out_shape))
    np.testing.assert_array_equal(a.grad, np.full(sa, n / av.size))
    np.testing.assert_array_equal(b.grad, np.full(sb, n / bv.size))


def test_leaf_grads_are_independent_copies():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    g = np.array([10.0, 20.0])
    (a + b).backward(g)
    a.grad += 1.0
    a.grad[0] = -5.0
    np.testing.assert_array_equal(b.grad, [10.0, 20.0])
    np.testing.assert_array_equal(g, [10.0, 20.0])  # the caller's array is untouched
    assert a.grad is not g and b.grad is not g


def test_leaf_grad_not_aliased_to_upstream_for_shape_ops():
    a = leaf([[1.0, 2.0], [3.0, 4.0]])
    g = np.ones((4,))
    a.reshape(4).backward(g)
    a.grad[0, 0] = 100.0
    np.testing.assert_array_equal(g, np.ones(4))


def test_operators_with_numbers_and_arrays():
    x = leaf([1.0, 2.0])
    y = 3.0 - x * 2 + np.array([1.0, 1.0]) / (x + 1)
    np.testing.assert_allclose(y.data, 3.0 - 2 * x.data + 1 / (x.data + 1), rtol=1e-15)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, -2 - 1 / (x.data + 1) ** 2, rtol=1e-15)


def test_grad_fn_names_the_node_and_its_inputs():
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3))
    y = a * b
    assert a.grad_fn is None and y.grad_fn is not None
    assert type(y.grad_fn).__name__ == "Mul"
    assert y.grad_fn.inputs == (a, b)
    with no_grad():
        assert (a * b).grad_fn is None


def test_the_graph_does_not_keep_activations_that_no_backward_needs():
    """A node keeps the *node* that made its input, not the input's array: an activation
    that no op saved and nobody holds is freed during the forward (under LoRA, most of the
    frozen layers' outputs), yet gradients still reach the leaves through it."""
    import gc
    import weakref

    x = Tensor(np.ones((3, 4)), requires_grad=True)
    h = x + 1.0  # Add saves only shapes
    array = weakref.ref(h.data)
    y = (h + 1.0) * 3.0  # h is also used twice, through one graph input
    y = y + h
    del h
    gc.collect()
    assert array() is None  # freed: the graph holds a GraphInput for h, without its array
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.full((3, 4), 4.0))
    inputs = y.grad_fn.inputs
    assert inputs[0].shape == (3, 4) and inputs[0].grad_fn is not None  # the graph can be walked
