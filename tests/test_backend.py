"""The array backend: array modules, devices, seeded random numbers, matmul counting."""

import numpy as np
import pytest

from minilora import backend


def test_get_array_module_is_numpy_for_numpy_arrays():
    a, b = np.zeros(3), np.ones((2, 2), dtype=np.float32)
    assert backend.get_array_module(a) is np
    assert backend.get_array_module(a, b) is np


def test_device_of_numpy_array_is_cpu():
    assert backend.device_of(np.zeros((2, 3))) == "cpu"


def test_check_device_accepts_cpu():
    assert backend.check_device("cpu") == "cpu"


@pytest.mark.parametrize("bad", ["tpu", "tpu:0", "CPU"])
def test_check_device_rejects_unknown_device_naming_it(bad):
    with pytest.raises(ValueError) as info:
        backend.check_device(bad)
    assert repr(bad) in str(info.value)
    assert "cpu" in str(info.value) and "cuda" in str(info.value)  # says what is allowed


@pytest.mark.skipif(backend.cuda_available(), reason="CuPy with a CUDA device is installed")
def test_cuda_without_cupy_raises_runtime_error_mentioning_gpu_extra():
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[gpu\]"'):
        backend.check_device("cuda")
    with pytest.raises(RuntimeError, match="gpu"):
        backend.to_device(np.zeros(2), "cuda")


def test_to_device_cpu_returns_the_same_array():
    x = np.arange(6.0).reshape(2, 3)
    assert backend.to_device(x, "cpu") is x


def test_generator_same_seed_gives_identical_draws():
    g1, g2 = backend.Generator(123), backend.Generator(123)
    np.testing.assert_array_equal(g1.normal((4, 5)), g2.normal((4, 5)))
    np.testing.assert_array_equal(g1.uniform((3,), -1, 1), g2.uniform((3,), -1, 1))
    np.testing.assert_array_equal(g1.random((2, 2)), g2.random((2, 2)))
    np.testing.assert_array_equal(g1.integers(0, 10, (7,)), g2.integers(0, 10, (7,)))
    np.testing.assert_array_equal(g1.permutation(9), g2.permutation(9))


def test_generator_different_seeds_differ():
    a = backend.Generator(0).normal((16,))
    b = backend.Generator(1).normal((16,))
    assert not np.array_equal(a, b)


def test_generator_successive_draws_differ():
    g = backend.Generator(0)
    assert not np.array_equal(g.normal((16,)), g.normal((16,)))


@pytest.mark.parametrize("method", ["normal", "random", "uniform"])
def test_generator_dtype_default_float32_and_honoured(method):
    def draw(g, **kw):
        if method == "uniform":
            return g.uniform((3, 4), -1.0, 1.0, **kw)
        return getattr(g, method)((3, 4), **kw)

    default = draw(backend.Generator(0))
    assert default.dtype == np.float32
    assert default.shape == (3, 4)
    wide = draw(backend.Generator(0), dtype=np.float64)
    assert wide.dtype == np.float64
    # the same numbers, only rounded: draws do not depend on the dtype
    np.testing.assert_array_equal(wide.astype(np.float32), default)


def test_generator_integers_are_int64_in_range():
    ids = backend.Generator(0).integers(2, 5, (100,))
    assert ids.dtype == np.int64
    assert ids.min() >= 2 and ids.max() < 5


def test_generator_normal_std_scales():
    a = backend.Generator(5).normal((8,), dtype=np.float64)
    b = backend.Generator(5).normal((8,), std=3.0, dtype=np.float64)
    np.testing.assert_allclose(b, 3.0 * a, rtol=1e-15)


def test_generator_rejects_non_int_seed():
    with pytest.raises(TypeError, match="seed"):
        backend.Generator(1.5)


def test_manual_seed_and_set_default_generator_replace_the_global_generator():
    callers = backend.default_generator()  # put back at the end
    backend.manual_seed(7)
    seeded = backend.default_generator()
    first = seeded.normal((4,))
    spare = backend.Generator(7)
    assert backend.set_default_generator(spare) is seeded  # hands back the one it replaces
    assert backend.default_generator() is spare
    np.testing.assert_array_equal(spare.normal((4,)), first)  # a fresh seed-7 stream
    with pytest.raises(TypeError, match="generator must be a backend.Generator, got int"):
        backend.set_default_generator(7)
    assert backend.default_generator() is spare  # a refused one changes nothing
    backend.set_default_generator(callers)


def test_counting_records_matmuls_by_name_with_flops():
    a, b = np.ones((3, 4)), np.ones((4, 5))
    with backend.counting() as c:
        out = backend.matmul(a, b, name="first")
        backend.matmul(b.T, a.T, name="second")
        backend.matmul(a, b, name="first")
    np.testing.assert_array_equal(out, a @ b)
    assert c.names() == ["first", "second", "first"]
    assert c.count("first") == 2 and c.count("second") == 1 and c.count("other") == 0
    m, k, n = 3, 4, 5
    assert c.records[0].flops == 2 * m * k * n
    assert c.records[0].shape_a == (3, 4) and c.records[0].shape_b == (4, 5)
    assert c.records[1].flops == 2 * n * k * m
    assert c.flops == 3 * 2 * m * k * n


def test_counting_batched_flops_include_batch():
    with backend.counting() as c:
        backend.matmul(np.ones((2, 3, 4)), np.ones((4, 5)), name="batched")
    assert c.flops == 2 * 2 * 3 * 4 * 5


def test_counting_is_off_outside_the_block_and_nests():
    with backend.counting() as outer:
        backend.matmul(np.ones((2, 2)), np.ones((2, 2)), name="outer")
        with backend.counting() as inner:
            backend.matmul(np.ones((2, 2)), np.ones((2, 2)), name="inner")
        backend.matmul(np.ones((2, 2)), np.ones((2, 2)), name="outer")
    backend.matmul(np.ones((2, 2)), np.ones((2, 2)), name="outside")
    assert inner.names() == ["inner"]
    assert outer.names() == ["outer", "outer"]
