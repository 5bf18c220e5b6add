"""The fast path (minilora/fast/ops.py): each fast op computes what its reference op computes.

For every op in ``backend.FAST_OPS``, on random inputs, the fast and reference classes
give the same output (float64, float32 and float16; to rounding: 16 units in the last place
of the dtype, relative to the largest value) and the same gradients for every input that
needs one, with frozen inputs getting none. Shapes include arrays larger than one cache
block, so that the blocked loops really run over several blocks. The fast ops' own gradient
checks run in test_functional.py, whose tests run on both paths.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import backend, fast
from minilora import functional as F
from minilora.autograd import Tensor


def assert_close(got, want, dtype, what: str) -> None:
    """Equal to rounding: a few units in the last place of the array's largest values (where
    terms cancel, as in GELU's dy/dx near its zero, the error is relative to the terms)."""
    eps = np.finfo(dtype).eps
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=16 * eps, atol=16 * eps * scale, err_msg=what)


def inputs_for(op: type, shape: tuple, rng: np.random.Generator, dtype) -> tuple[list, dict]:
    """Random inputs of ``shape`` for ``op`` and its constructor settings."""
    x = rng.normal(size=shape).astype(dtype)
    if op is F.GELUFunction:
        return [x * 3], {}
    if op is F.LayerNormFunction:
        C = shape[-1]
        return [x, rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)], {}
    if op is F.SoftmaxCrossEntropyFunction:
        targets = rng.integers(0, shape[-1], size=shape[:-1])
        targets.reshape(-1)[0] = -100  # one ignored row (there are at least two rows)
        return [x * 4, targets], {"ignore_index": -100}
    if op is F.CausalSelfAttentionFunction:
        return [x, rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)], {}
    if op is F.EmbeddingFunction:  # ids (shape[:-1]) with repeats, a (V, C) table
        V = 5
        ids = rng.integers(0, V, size=shape[:-1])
        return [ids, rng.normal(size=(V, shape[-1])).astype(dtype)], {}
    if op is F.CachedAttentionFunction:  # shape is q's; the keys hold 3 positions more
        kv_shape = (*shape[:2], shape[2] + 3, shape[3])
        k, v = (rng.normal(size=kv_shape).astype(dtype) for _ in range(2))
        return [x, k, v], {}
    raise AssertionError(f"no inputs for {op.__name__}: add them when a fast op is added")


def run(cls: type, arrays: list, settings: dict, trainable: list[bool], g):
    """Output and input gradients of ``cls`` (one op, called directly)."""
    tensors = [Tensor(a, requires_grad=t) for a, t in zip(arrays, trainable, strict=True)]
    out = cls(**settings)(*tensors)
    out.backward(g)
    return out.data, [t.grad for t in tensors]


SHAPES = {
    F.GELUFunction: [(3,), (2, 5, 7), (300, 257)],  # 77,100 elements: two blocks
    F.LayerNormFunction: [(1, 1), (2, 3, 8), (700, 130)],
    F.SoftmaxCrossEntropyFunction: [(2, 3), (2, 4, 9), (600, 130)],
    # one query block (P kept); one of exactly 64 rows (the largest that keeps P); two of
    # 64 + 1 rows (the first that saves lse); three (64 + 64 + 22, T not a multiple of 64)
    F.CausalSelfAttentionFunction: [(2, 3, 5, 4), (2, 2, 64, 4), (1, 2, 65, 4), (2, 2, 150, 8)],
    # one query, and several
    F.CachedAttentionFunction: [(2, 3, 1, 4), (2, 3, 5, 4), (16, 2, 3, 8)],
    F.EmbeddingFunction: [(1, 3), (2, 7, 4), (64, 18, 16)],  # output (ids..., C)
}


def test_every_fast_op_has_a_reference_op_and_shapes_here():
    assert set(backend.FAST_OPS) == set(SHAPES)
    for ref, fast_cls in backend.FAST_OPS.items():
        assert issubclass(fast_cls, ref) and fast_cls.__module__ == fast.ops.__name__


@pytest.mark.parametrize("op", list(SHAPES), ids=lambda op: op.__name__)
@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.float16], ids=["float64", "float32", "float16"]
)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_fast_op_equals_reference_op(op, dtype, seed, data):
    rng = np.random.default_rng(seed)
    shape = data.draw(st.sampled_from(SHAPES[op]), label="shape")
    arrays, settings = inputs_for(op, shape, rng, dtype)
    floating = [np.issubdtype(a.dtype, np.floating) for a in arrays]
    trainable = [f and data.draw(st.booleans()) for f in floating]
    if not any(trainable):
        trainable[floating.index(True)] = True  # something must need a gradient
    # the upstream gradient (a loss takes none: its gradient is 1)
    g = None if op is F.SoftmaxCrossEntropyFunction else rng.normal(size=shape).astype(dtype)
    ref_out, ref_grads = run(op, arrays, settings, trainable, g)
    fast_out, fast_grads = run(backend.FAST_OPS[op], arrays, settings, trainable, g)
    assert fast_out.dtype == ref_out.dtype == dtype
    assert_close(fast_out, ref_out, dtype, "output")
    for i, (want, got) in enumerate(zip(ref_grads, fast_grads, strict=True)):
        if not trainable[i]:
            assert want is None and got is None, f"frozen input {i} got a gradient"
            continue
        assert got.dtype == want.dtype == dtype
        assert_close(got, want, dtype, f"gradient of input {i}")


def test_the_engine_switches_between_paths():
    with backend.use_ops("fast"):
        with backend.use_ops("reference"):
            assert backend.get_ops() == "reference"
            assert backend.implementation(F.GELUFunction) is F.GELUFunction
            assert type(F.gelu(Tensor([0.5], requires_grad=True))._ctx) is F.GELUFunction
        assert backend.get_ops() == "fast"  # put back
        assert type(F.gelu(Tensor([0.5], requires_grad=True))._ctx) is fast.ops.GELUFunction
        # an op without a fast version is its reference op
        assert backend.implementation(F.Add) is F.Add
        with pytest.raises(ValueError, match=r"ops='quick'.*\('fast', 'reference'\)"):
            backend.set_ops("quick")
        assert backend.get_ops() == "fast"  # a refused setting changes nothing


@pytest.mark.parametrize("value, ops", [("reference", "reference"), ("fast", "fast")])
def test_minilora_ops_in_the_environment_chooses_the_path(value, ops):
    code = "import minilora as ml; from minilora import functional as F; "
    code += (
        "print(ml.get_ops(), type(F.gelu(ml.Tensor([1.0], requires_grad=True))._ctx).__module__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MINILORA_OPS": value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    expected_module = "minilora.functional" if ops == "reference" else "minilora.fast.ops"
    assert run.stdout.split() == [ops, expected_module]


def test_a_bad_minilora_ops_is_refused_naming_it():
    run = subprocess.run(
        [sys.executable, "-c", "import minilora"],
        env={**os.environ, "MINILORA_OPS": "turbo"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "MINILORA_OPS='turbo' is not one of ('fast', 'reference')" in run.stderr
