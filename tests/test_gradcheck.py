"""gradcheck itself: it must pass correct backwards and catch wrong ones."""

import numpy as np
import pytest

from minilora import Function, Tensor, backend
from minilora import functional as F
from minilora.functional import unbroadcast
from minilora.gradcheck import GradcheckError, gradcheck


def _x(shape=(3, 4), seed=0):
    return np.random.default_rng(seed).uniform(-2, 2, size=shape)


class Sin(Function):
    def forward(self, x):
        self.x = x
        return np.sin(x)

    def backward(self, g):
        return (g * np.cos(self.x),)


class WrongSin(Sin):
    def backward(self, g):
        return (g * np.sin(self.x),)  # should be cos


class Square(Function):
    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, g):
        return (g * 2 * self.x,)


class SquareMissingTwo(Square):
    def backward(self, g):
        return (g * self.x,)  # missing the factor 2


class MulWrongSecond(Function):
    """a * b with a correct da and a wrong db (uses b instead of a)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        na, nb = self.needs_input_grad
        return (g * self.b if na else None, g * self.b if nb else None)


class MulNoUnbroadcast(Function):
    """a * b whose backward forgets to sum the gradients back to the input shapes."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return g * self.b, g * self.a


class MulUnbroadcastBySlicing(Function):
    """a * b whose backward 'undoes' broadcasting by taking the first slice instead of the
    sum: the shapes come out right, the values do not."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        da = unbroadcast(g * self.b, self.a.shape)
        db = (g * self.a)[: self.b.shape[0]]  # b is (1, n) against a (m, n)
        return da, db


class ZeroSoftmax(Function):
    """softmax forward with a backward that returns zeros."""

    def forward(self, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def backward(self, g):
        return (np.zeros_like(g),)


def test_passes_on_correct_ops():
    assert gradcheck(Sin.apply, [_x()]) is True
    assert gradcheck(Square.apply, [_x()]) is True
    assert gradcheck(F.mul, [_x((3, 1)), _x((4,), seed=1)]) is True


@pytest.mark.parametrize("fn", [WrongSin.apply, SquareMissingTwo.apply], ids=["sin", "square"])
def test_fails_on_wrong_derivative(fn):
    with pytest.raises(GradcheckError) as info:
        gradcheck(fn, [_x()])
    message = str(info.value)
    assert "input 0" in message
    assert "analytic" in message and "numerical" in message


def test_failure_names_the_wrong_input():
    a, b = _x(seed=1), _x(seed=2)
    with pytest.raises(GradcheckError, match="input 1") as info:
        gradcheck(MulWrongSecond.apply, [a, b])
    assert "input 0" not in str(info.value)
    # with the wrong input frozen, the correct one passes
    assert gradcheck(MulWrongSecond.apply, [a, b], no_grads=(1,))


def test_failure_reports_analytic_and_numerical_values():
    x = np.array([[0.5, -1.0]])
    with pytest.raises(GradcheckError) as info:
        gradcheck(SquareMissingTwo.apply, [x], dout=np.ones((1, 2)))
    message = str(info.value)
    # worst element: x = -1.0, analytic -1, numerical -2
    assert "(0, 1)" in message
    assert "analytic -1" in message and "numerical (central difference) -2" in message


def test_forgetting_to_undo_broadcasting_is_caught_by_the_engine():
    with pytest.raises(RuntimeError, match=r"shape \(3, 4\) for an input of shape \(1, 4\)"):
        gradcheck(MulNoUnbroadcast.apply, [_x((3, 4)), _x((1, 4), seed=1)])


def test_undoing_broadcasting_wrongly_is_caught():
    a, b = _x((3, 4)), _x((1, 4), seed=1)
    with pytest.raises(GradcheckError, match="input 1"):
        gradcheck(MulUnbroadcastBySlicing.apply, [a, b])


def test_frozen_inputs_get_no_grad():
    seen = []

    def fn(a, b):
        seen.append((a, b))
        return a * b

    assert gradcheck(fn, [_x(), _x(seed=1)], no_grads=(0,))
    a, b = seen[0]
    assert a.requires_grad is False and a.grad is None
    assert b.requires_grad is True and b.grad is not None


def test_frozen_input_that_receives_a_gradient_is_reported():
    # fn turns a frozen input trainable behind gradcheck's back
    def fn(a, b):
        return a * b.requires_grad_(True)

    with pytest.raises(GradcheckError, match="input 1 is frozen"):
        gradcheck(fn, [_x(), _x(seed=1)], no_grads=(1,))


def test_input_that_requires_grad_but_gets_none_is_reported():
    # the output does not depend on b through the graph (it is detached)
    def fn(a, b):
        return a * b.detach()

    with pytest.raises(GradcheckError, match="input 1.*received none"):
        gradcheck(fn, [_x(), _x(seed=1)])


def test_float32_input_raises_type_error_mentioning_float64():
    with pytest.raises(TypeError, match="float64") as info:
        gradcheck(Sin.apply, [_x().astype(np.float32)])
    assert "float32" in str(info.value)


def test_integer_inputs_are_passed_through():
    logits, targets = _x((3, 4)), np.array([0, 3, 1])
    assert gradcheck(F.softmax_cross_entropy, [logits, targets])


def test_zero_softmax_backward_passes_with_ones_but_fails_with_random_dout():
    x = _x((3, 5))
    out_shape = (3, 5)
    # with dout = 1, L = sum(softmax) is constant: every true gradient is 0 and the
    # broken backward looks right
    assert gradcheck(ZeroSoftmax.apply, [x], dout=np.ones(out_shape))
    # the default random upstream gradient exposes it
    with pytest.raises(GradcheckError, match="input 0"):
        gradcheck(ZeroSoftmax.apply, [x])
    # and the real softmax passes both
    assert gradcheck(F.softmax, [x], dout=np.ones(out_shape))
    assert gradcheck(F.softmax, [x])


def test_default_dout_is_random_normal_from_the_seed():
    seen = []

    def fn(t):
        seen.append(t)
        return F.mul(t, 1.0)

    x = _x((2, 3))
    gradcheck(fn, [x], seed=1)
    gradcheck(fn, [x], seed=2)
    # for out = t, the gradient gradcheck produced is its upstream gradient itself
    first, second = seen[0], [t for t in seen if t is not seen[0]][0]
    np.testing.assert_array_equal(first.grad, backend.Generator(1).normal((2, 3), dtype=np.float64))
    np.testing.assert_array_equal(
        second.grad, backend.Generator(2).normal((2, 3), dtype=np.float64)
    )


def test_callers_inputs_are_not_modified():
    x = _x()
    before = x.copy()
    t = Tensor(x.copy(), requires_grad=True)
    gradcheck(Sin.apply, [x])
    gradcheck(Sin.apply, [t])
    np.testing.assert_array_equal(x, before)
    assert t.grad is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="no_grads"):
        gradcheck(Sin.apply, [_x()], no_grads=(3,))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        gradcheck(Sin.apply, [_x()], dout=np.ones((4, 3)))
