"""The reference ops: each a :class:`Function` with a plain forward and a hand-written backward.

This file is the lesson and the truth. Every op is written as its math, a page at most:
no blocking, nothing computed in place to save memory, and no derivative worked out in
the forward for the backward's convenience (a backward does its own work from what the
forward saved). The derivation of every backward is in ``docs/math.md``; each docstring
gives the result.

Conventions, shared by every op:

* ``forward`` and ``backward`` receive raw arrays; ``xp`` is the array module (NumPy or
  CuPy) that owns them, looked up from the inputs.
* ``g`` is the upstream gradient dL/d(output); ``d<name>`` is dL/d(<name>).
* A gradient is computed only when ``self.needs_input_grad`` asks for it.
* Matrix products go through ``backend.matmul`` with a name, so tests can count them.
* Layer norm, softmax and the loss compute float16 inputs in float32 and round back, as
  PyTorch does (:func:`float32_if_half`; docs/math.md, "Half precision").

Ops are fused at the size a porter would write a kernel: ``linear``, ``lora_linear``,
``layer_norm``, ``gelu``, ``causal_self_attention``, ``softmax_cross_entropy``,
``embedding`` and ``dropout``. A few of them also have a faster version in
``minilora/fast/ops.py`` (blocked, in place), used by default and proven equal to the one
here by tests/test_fast.py; ``MINILORA_OPS=reference`` in the environment, or
:func:`minilora.set_ops` ``("reference")``, runs the whole engine on this file alone.

At the bottom, the ops become ``Tensor``'s operators and methods (``a + b``, ``x.sum()``).
"""

from __future__ import annotations

import math

from minilora import backend
from minilora.autograd import Function, Tensor

mm = backend.matmul


# ======================================================================================
# Helpers
# ======================================================================================


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """Wrap a Python number or array; numbers take the dtype/device of ``like``."""
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, (int, float)):
        # a float never takes an integer tensor's dtype (that would truncate 0.5 to 0)
        dtype = like.dtype if backend.is_floating(like.data) or isinstance(x, int) else None
        return Tensor(backend.array(x, dtype=dtype, device=like.device))
    return Tensor(x)


def unbroadcast(grad, shape: tuple):
    """Sum ``grad`` over the axes that broadcasting added or stretched to reach ``shape``.

    If ``a`` of shape (3, 1) was broadcast against (2, 3, 4), the output and its gradient
    are (2, 3, 4); ``a``'s gradient sums over axis 0 (added) and axis 2 (stretched from 1).
    """
    if tuple(grad.shape) == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    stretched = tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1
    )
    return grad.sum(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)


def _broadcast_shape(op: str, a, b) -> None:
    if a.shape == b.shape:
        return  # nothing to broadcast (the residual adds)
    try:
        backend.broadcast_shapes(a.shape, b.shape)  # host shape arithmetic, on any device
    except ValueError:
        raise ValueError(
            f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast together"
        ) from None


def require_float(op: str, name: str, a) -> None:
    if not backend.is_floating(a):
        raise TypeError(f"{op}: {name} must be a floating-point array, got dtype {a.dtype}")


def compute_dtype(dtype):
    """The dtype layer norm, softmax and the loss compute in: float32 for float16, as
    PyTorch does ((x - μ)² overflows float16's 65504 once |x - μ| > 256, and sums of many
    terms lose their digits: docs/math.md, "Half precision"); any other dtype itself."""
    return backend.float32 if dtype == backend.float16 else dtype


def float32_if_half(*arrays):
    """The arrays in :func:`compute_dtype` (None stays None): float16 ones as new float32
    arrays, the others themselves, so that their results stay bitwise the plain formulas'."""
    out = tuple(None if a is None else a.astype(compute_dtype(a.dtype), copy=False) for a in arrays)
    return out if len(out) > 1 else out[0]


def rounded_to(dtype, *arrays):
    """The arrays in ``dtype`` (None stays None; no copy when they have it already)."""
    out = tuple(None if a is None else a.astype(dtype, copy=False) for a in arrays)
    return out if len(out) > 1 else out[0]


# ======================================================================================
# Elementwise arithmetic (with broadcasting)
# ======================================================================================


class Add(Function):
    """y = a + b;  da = g,  db = g  (each summed back to its own shape)."""

    def forward(self, a, b):
        _broadcast_shape("add", a, b)
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        sa, sb = self.shapes
        na, nb = self.needs_input_grad
        return (unbroadcast(g, sa) if na else None, unbroadcast(g, sb) if nb else None)


class Sub(Function):
    """y = a - b;  da = g,  db = -g."""

    def forward(self, a, b):
        _broadcast_shape("sub", a, b)
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        sa, sb = self.shapes
        na, nb = self.needs_input_grad
        return (unbroadcast(g, sa) if na else None, unbroadcast(-g, sb) if nb else None)


class Mul(Function):
    """y = a * b;  da = g * b,  db = g * a."""

    def forward(self, a, b):
        _broadcast_shape("mul", a, b)
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        na, nb = self.needs_input_grad
        da = unbroadcast(g * self.b, self.a.shape) if na else None
        db = unbroadcast(g * self.a, self.b.shape) if nb else None
        return da, db


class Div(Function):
    """y = a / b;  da = g / b,  db = -g * a / b²."""

    def forward(self, a, b):
        _broadcast_shape("div", a, b)
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        na, nb = self.needs_input_grad
        da = unbroadcast(g / self.b, self.a.shape) if na else None
        db = unbroadcast(-g * self.a / (self.b * self.b), self.b.shape) if nb else None
        return da, db


class Neg(Function):
    """y = -a;  da = -g."""

    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Pow(Function):
    """y = a ** p for a constant exponent p;  da = g * p * a^(p-1)."""

    def __init__(self, exponent: float):
        if not isinstance(exponent, (int, float)):
            raise TypeError(f"pow: exponent={exponent!r} must be a Python number")
        self.p = exponent

    def forward(self, a):
        self.a = a
        return a**self.p

    def backward(self, g):
        return (g * self.p * self.a ** (self.p - 1),)


class Exp(Function):
    """y = exp(a);  da = g * y."""

    def forward(self, a):
        xp = backend.get_array_module(a)
        self.y = xp.exp(a)
        return self.y

    def backward(self, g):
        return (g * self.y,)


class Log(Function):
    """y = log(a);  da = g / a."""

    def forward(self, a):
        xp = backend.get_array_module(a)
        self.a = a
        return xp.log(a)

    def backward(self, g):
        return (g / self.a,)


class Tanh(Function):
    """y = tanh(a);  da = g * (1 - y²)."""

    def forward(self, a):
        xp = backend.get_array_module(a)
        self.y = xp.tanh(a)
        return self.y

    def backward(self, g):
        return (g * (1 - self.y * self.y),)


def add(a, b) -> Tensor:
    a, b = as_tensor(a, b if isinstance(b, Tensor) else None), as_tensor(b, a)
    return Add()(a, b)


def sub(a, b) -> Tensor:
    a, b = as_tensor(a, b if isinstance(b, Tensor) else None), as_tensor(b, a)
    return Sub()(a, b)


def mul(a, b) -> Tensor:
    a, b = as_tensor(a, b if isinstance(b, Tensor) else None), as_tensor(b, a)
    return Mul()(a, b)


def div(a, b) -> Tensor:
    a, b = as_tensor(a, b if isinstance(b, Tensor) else None), as_tensor(b, a)
    return Div()(a, b)


def neg(a: Tensor) -> Tensor:
    return Neg()(a)


def pow(a: Tensor, exponent: float) -> Tensor:
    return Pow(exponent)(a)


def exp(a: Tensor) -> Tensor:
    return Exp()(a)


def log(a: Tensor) -> Tensor:
    return Log()(a)


def tanh(a: Tensor) -> Tensor:
    return Tanh()(a)


# ======================================================================================
# Reductions and shape ops
# ======================================================================================


def _keepdims_shape(shape: tuple, axis) -> tuple:
    """The shape a reduction over ``axis`` has with keepdims=True."""
    if axis is None:
        return (1,) * len(shape)
    axes = {a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,))}
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


class Sum(Function):
    """y = sum(a, axis);  da = g broadcast back over the summed axes."""

    def __init__(self, axis=None, keepdims: bool = False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.shape = a.shape
        return a.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, g):
        xp = backend.get_array_module(g)
        g = g.reshape(_keepdims_shape(self.shape, self.axis))
        return (xp.broadcast_to(g, self.shape).copy(),)


class Mean(Function):
    """y = mean(a, axis);  da = g / n broadcast back, n = number of averaged elements."""

    def __init__(self, axis=None, keepdims: bool = False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.shape = a.shape
        out = a.mean(axis=self.axis, keepdims=self.keepdims)
        self.n = a.size // out.size  # elements averaged into each output
        return out

    def backward(self, g):
        xp = backend.get_array_module(g)
        g = g.reshape(_keepdims_shape(self.shape, self.axis)) / self.n
        return (xp.broadcast_to(g, self.shape).copy(),)


class Max(Function):
    """y = max(a, axis);  da = g at the maximum (split equally between ties), 0 elsewhere."""

    def __init__(self, axis=None, keepdims: bool = False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.a = a
        self.y = a.max(axis=self.axis, keepdims=True)  # (keepdims shape)
        return self.y if self.keepdims else self.y.reshape(a.max(axis=self.axis).shape)

    def backward(self, g):
        share = (self.a == self.y).astype(self.a.dtype)  # 1 at each maximum (a.shape)
        share /= share.sum(axis=self.axis, keepdims=True)  # ties split the gradient
        return (g.reshape(self.y.shape) * share,)


class Reshape(Function):
    """y = a viewed with a new shape;  da = g reshaped back."""

    def __init__(self, shape: tuple):
        self.new_shape = shape

    def forward(self, a):
        self.shape = a.shape
        try:
            return a.reshape(self.new_shape)
        except ValueError:
            raise ValueError(
                f"reshape: cannot reshape an array of shape {tuple(a.shape)} "
                f"({a.size} elements) into shape {self.new_shape}"
            ) from None

    def backward(self, g):
        return (g.reshape(self.shape),)


class Permute(Function):
    """y = a with its axes reordered by ``dims``;  da = g with the inverse order."""

    def __init__(self, dims: tuple):
        self.dims = dims

    def forward(self, a):
        if sorted(d % a.ndim for d in self.dims) != list(range(a.ndim)):
            raise ValueError(
                f"permute: dims={self.dims} is not a permutation of the {a.ndim} axes of an "
                f"array of shape {tuple(a.shape)}"
            )
        return a.transpose(self.dims)

    def backward(self, g):
        inverse = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            inverse[d % len(self.dims)] = i
        return (g.transpose(inverse),)


class GetItem(Function):
    """y = a[index];  da = zeros with g added at ``index`` (repeated indices accumulate)."""

    def __init__(self, index):
        self.index = index

    def forward(self, a):
        self.shape, self.dtype = a.shape, a.dtype
        return a[self.index]

    def backward(self, g):
        xp = backend.get_array_module(g)
        da = xp.zeros(self.shape, dtype=self.dtype)
        xp.add.at(da, self.index, g)  # da[index] += g, repeated indices accumulating
        return (da,)


def sum(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return Sum(axis, keepdims)(a)


def mean(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return Mean(axis, keepdims)(a)


def max(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return Max(axis, keepdims)(a)


def reshape(a: Tensor, *shape) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(tuple(shape))(a)


def permute(a: Tensor, *dims) -> Tensor:
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return Permute(tuple(dims))(a)


def getitem(a: Tensor, index) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem(index)(a)


# ======================================================================================
# Matrix products
# ======================================================================================


def swap_last_two(a):
    """Transpose the last two axes: the matrix transpose of a batch of matrices."""
    return a.swapaxes(-1, -2)


class MatMul(Function):
    """y = a @ b (batched, with broadcasting of the batch axes).

    da = g @ bᵀ,  db = aᵀ @ g  (each summed back over broadcast batch axes).
    """

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(
                f"matmul: both inputs need at least 2 dimensions, got shapes {tuple(a.shape)} "
                f"and {tuple(b.shape)}"
            )
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match: "
                f"a has {a.shape[-1]} columns but b has {b.shape[-2]} rows"
            )
        self.a, self.b = a, b
        return mm(a, b, "matmul")

    def backward(self, g):
        na, nb = self.needs_input_grad
        da = unbroadcast(mm(g, swap_last_two(self.b), "matmul.da"), self.a.shape) if na else None
        db = unbroadcast(mm(swap_last_two(self.a), g, "matmul.db"), self.b.shape) if nb else None
        return da, db


def matmul(a, b) -> Tensor:
    return MatMul()(as_tensor(a), as_tensor(b))


class LinearFunction(Function):
    """y = x @ Wᵀ + b with x (..., in), W (out, in), b (out,).

    Flattening the leading axes to N rows, with g (N, out):
    dx = g @ W (N, in),  dW = gᵀ @ x (out, in),  db = Σ_rows g (out,).
    """

    def forward(self, x, weight, bias):
        _check_linear_shapes("linear", x, weight, bias)
        self.x_shape = x.shape
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if self.needs_input_grad[1]:
            self.x2 = x2
        if self.needs_input_grad[0]:
            self.weight = weight
        y = mm(x2, weight.T, "linear")  # (N, out)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, g):
        need_x, need_w, need_b = self.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        dx = mm(g2, self.weight, "linear.dinput").reshape(self.x_shape) if need_x else None
        dw = mm(g2.T, self.x2, "linear.dweight") if need_w else None
        db = g2.sum(axis=0) if need_b else None
        return dx, dw, db


def _check_linear_shapes(op: str, x, weight, bias) -> None:
    require_float(op, "input", x)
    if weight.ndim != 2:
        raise ValueError(f"{op}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: input has shape {tuple(x.shape)} (last dim {x.shape[-1]}) but weight has "
            f"shape {tuple(weight.shape)}, which expects in_features={weight.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{op}: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},) to match "
            f"weight {tuple(weight.shape)}"
        )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """PyTorch's ``F.linear``: ``x @ weight.T + bias``."""
    return LinearFunction()(x, weight, bias)


class LoRALinearFunction(Function):
    """LoRA's fused layer: y = x @ Wᵀ + b + s · (d @ Aᵀ) @ Bᵀ.

    x (..., in), W (out, in), b (out,), A (r, in), B (out, r), s = scaling, and d is the
    bypass input: ``x`` itself, or ``dropout(x)`` passed separately as ``x_lora``. Flatten
    the leading axes to N rows; u = d @ Aᵀ (N, r) is the low-rank code. With g (N, out):

        gB = g @ B                 (N, r)   shared by dA and the bypass part of dx
        dW = gᵀ @ x                (out, in)   only if W trains (it does not in LoRA)
        db = Σ_rows g              (out,)
        dB = s · gᵀ @ u            (out, r)
        dA = s · gBᵀ @ d           (r, in)
        dx = g @ W  [+ s · gB @ A when d is x]   (N, in)
        dd = s · gB @ A            (N, in)   when the bypass input is separate

    Derivation: docs/math.md#lora-linear. Frozen W costs one fewer (out × in × N) matmul.
    """

    def __init__(self, scaling: float):
        self.s = float(scaling)

    def forward(self, x, weight, bias, lora_A, lora_B, x_lora=None):
        check_lora_shapes(x, weight, bias, lora_A, lora_B, x_lora)
        self.x_shape = x.shape
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        d2 = x2 if x_lora is None else x_lora.reshape(x2.shape)  # (N, in) bypass input
        u = mm(d2, lora_A.T, "lora.A")  # (N, r)
        y = mm(x2, weight.T, "linear")  # (N, out)
        y += self.s * mm(u, lora_B.T, "lora.B")  # (N, out)
        if bias is not None:
            y += bias
        need_x, need_w, _, need_A, need_B, need_d = self.needs_input_grad
        self.separate = x_lora is not None
        # the bypass input's gradient s·(g B) A goes to x, or to x_lora when it is separate
        self.need_bypass = need_d or (need_x and not self.separate)
        self.x2 = x2 if need_w else None
        self.d2 = d2 if need_A else None
        self.u = u if need_B else None
        self.weight = weight if need_x else None
        self.A = lora_A if self.need_bypass else None
        self.B = lora_B if (self.need_bypass or need_A) else None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, g):
        need_x, need_w, need_b, need_A, need_B, need_d = self.needs_input_grad
        s = self.s
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        need_bypass = self.need_bypass
        gB = mm(g2, self.B, "lora.dB_path") if (need_bypass or need_A) else None  # (N, r)
        dw = mm(g2.T, self.x2, "linear.dweight") if need_w else None
        db = g2.sum(axis=0) if need_b else None
        dB = s * mm(g2.T, self.u, "lora.dB") if need_B else None
        dA = s * mm(gB.T, self.d2, "lora.dA") if need_A else None
        dbypass = s * mm(gB, self.A, "lora.dinput") if need_bypass else None  # (N, in)
        dx = dd = None
        if need_x:
            dx = mm(g2, self.weight, "linear.dinput")
            if not self.separate:
                dx += dbypass
            dx = dx.reshape(self.x_shape)
        if need_d:
            dd = dbypass.reshape(self.x_shape)
        return dx, dw, db, dA, dB, dd


def check_lora_shapes(x, weight, bias, lora_A, lora_B, x_lora) -> None:
    _check_linear_shapes("lora_linear", x, weight, bias)
    r = lora_A.shape[0]
    if lora_A.shape != (r, weight.shape[1]) or lora_B.shape != (weight.shape[0], r):
        raise ValueError(
            f"lora_linear: lora_A has shape {tuple(lora_A.shape)} and lora_B "
            f"{tuple(lora_B.shape)}; for weight {tuple(weight.shape)} expected "
            f"({r}, {weight.shape[1]}) and ({weight.shape[0]}, {r})"
        )
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(
            f"lora_linear: x_lora has shape {tuple(x_lora.shape)}, expected {tuple(x.shape)}"
        )


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, x_lora=None) -> Tensor:
    """``x @ weight.T + bias + scaling * (x_lora @ lora_A.T) @ lora_B.T`` (x_lora defaults to x)."""
    return LoRALinearFunction(scaling)(x, weight, bias, lora_A, lora_B, x_lora)


# ======================================================================================
# Activations, normalisation, softmax
# ======================================================================================

GELU_C = math.sqrt(2.0 / math.pi)


class GELUFunction(Function):
    """GPT-2's tanh GELU: y = ½ x (1 + tanh(u)),  u = c (x + 0.044715 x³),  c = √(2/π).

    dx = g · [½ (1 + t) + ½ x (1 - t²) · c (1 + 3·0.044715 x²)],  t = tanh(u).
    """

    def forward(self, x):
        require_float("gelu", "input", x)
        xp = backend.get_array_module(x)
        self.x = x
        u = GELU_C * (x + 0.044715 * x * x * x)  # x*x*x: NumPy's x**3 is many times slower
        return 0.5 * x * (1.0 + xp.tanh(u))

    def backward(self, g):
        xp = backend.get_array_module(g)
        x = self.x
        t = xp.tanh(GELU_C * (x + 0.044715 * x * x * x))  # recomputed: the forward kept x
        du_dx = GELU_C * (1.0 + 3 * 0.044715 * x * x)
        return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx),)


def gelu(x: Tensor) -> Tensor:
    return backend.implementation(GELUFunction)()(x)


class LayerNormFunction(Function):
    """y = x̂ · w + b over the last axis, x̂ = (x - μ) · rstd, rstd = 1/√(σ² + eps).

    With ĝ = g · w (the gradient reaching x̂):
    dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂)),  dw = Σ g · x̂,  db = Σ g
    (means over the last axis, sums over all leading axes).
    """

    def __init__(self, eps: float = 1e-5):
        self.eps = eps

    def forward(self, x, weight, bias):
        check_layer_norm_inputs(x, weight, bias)
        xp = backend.get_array_module(x)
        self.dtype = x.dtype
        x, weight, bias = float32_if_half(x, weight, bias)  # float16's (x - μ)² overflows
        mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # (..., 1), biased as in PyTorch
        self.rstd = 1.0 / xp.sqrt(var + self.eps)  # (..., 1)
        self.xhat = (x - mu) * self.rstd  # (..., C)
        self.weight = weight
        y = self.xhat if weight is None else self.xhat * weight
        return rounded_to(self.dtype, y if bias is None else y + bias)

    def backward(self, g):
        need_x, need_w, need_b = self.needs_input_grad
        xhat, rstd, g = self.xhat, self.rstd, float32_if_half(g)  # in the forward's dtype
        lead = tuple(range(g.ndim - 1))  # every axis but the normalised one
        dw = (g * xhat).sum(axis=lead) if need_w else None
        db = g.sum(axis=lead) if need_b else None
        dx = None
        if need_x:
            gh = g if self.weight is None else g * self.weight  # ĝ = dL/dx̂, (..., C)
            mean_gh = gh.mean(axis=-1, keepdims=True)
            mean_gh_xhat = (gh * xhat).mean(axis=-1, keepdims=True)
            dx = rstd * (gh - mean_gh - xhat * mean_gh_xhat)
        return rounded_to(self.dtype, dx, dw, db)


def check_layer_norm_inputs(x, weight, bias) -> None:
    require_float("layer_norm", "input", x)
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (C,):
            raise ValueError(
                f"layer_norm: {name} has shape {tuple(p.shape)}, expected ({C},) to match "
                f"input {tuple(x.shape)}"
            )


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    return backend.implementation(LayerNormFunction)(eps)(x, weight, bias)


def _softmax(x, axis: int):
    """exp(x - max) / Σ exp(x - max) along ``axis``: shifting by the row maximum changes
    nothing mathematically and keeps exp from overflowing. In :func:`compute_dtype`: float32
    for float16 (a sum of many exponentials would lose its digits)."""
    xp = backend.get_array_module(x)
    z = float32_if_half(x)
    e = xp.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class Softmax(Function):
    """y = exp(x) / Σ exp(x) along ``axis``;  dx = y · (g - Σ g·y)."""

    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, x):
        require_float("softmax", "input", x)
        self.y = _softmax(x, self.axis)  # float32 for float16
        return rounded_to(x.dtype, self.y)

    def backward(self, g):
        y, g32 = self.y, float32_if_half(g)  # float16's row sum in float32
        return (rounded_to(g.dtype, y * (g32 - (g32 * y).sum(axis=self.axis, keepdims=True))),)


class LogSoftmax(Function):
    """y = x - log Σ exp(x) along ``axis``;  dx = g - exp(y) · Σ g."""

    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, x):
        require_float("log_softmax", "input", x)
        xp = backend.get_array_module(x)
        z = float32_if_half(x)  # float16's Σ exp in float32
        shifted = z - z.max(axis=self.axis, keepdims=True)  # no overflow in exp
        self.y = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        return rounded_to(x.dtype, self.y)

    def backward(self, g):
        xp = backend.get_array_module(g)
        g32 = float32_if_half(g)  # float16's row sum in float32
        return (rounded_to(g.dtype, g32 - xp.exp(self.y) * g32.sum(axis=self.axis, keepdims=True)),)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return Softmax(axis)(x)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax(axis)(x)


class SoftmaxCrossEntropyFunction(Function):
    """Mean cross-entropy of ``logits`` (..., V) against integer ``targets`` (...).

    L = -(1/n) Σ_valid log softmax(logits)[target], n = number of targets that are not
    ``ignore_index``.  dlogits = g · (softmax(logits) - onehot(target)) / n, and 0 on
    ignored rows. Targets must lie in [0, V) (or equal ``ignore_index``); ``GPT.forward``
    checks them once per batch.
    """

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def forward(self, logits, targets):
        check_cross_entropy_inputs(logits, targets)
        xp = backend.get_array_module(logits)
        V = logits.shape[-1]
        z = float32_if_half(logits.reshape(-1, V))  # (N, V); float16's Σ exp in float32
        t = targets.reshape(-1)  # (N,)
        valid = t != self.ignore_index  # (N,)
        self.n = count_targets(valid, self.ignore_index)
        shifted = z - z.max(axis=1, keepdims=True)  # (N, V), no overflow in exp
        logp = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))  # log softmax
        rows, safe_t = xp.arange(t.shape[0]), xp.where(valid, t, 0)  # ignored rows: any id
        nll = -logp[rows, safe_t] * valid  # (N,), zero on ignored rows
        self.logp, self.t, self.valid, self.shape = logp, safe_t, valid, logits.shape
        self.dtype = logits.dtype
        return xp.asarray(nll.sum() / self.n, dtype=logits.dtype)

    def backward(self, g):
        xp = backend.get_array_module(self.logp)
        dz = xp.exp(self.logp)  # softmax (N, V)
        dz[xp.arange(dz.shape[0]), self.t] -= 1.0  # - onehot(target)
        dz *= (self.valid * (float32_if_half(g) / self.n))[:, None].astype(dz.dtype)  # ignored: 0
        return rounded_to(self.dtype, dz.reshape(self.shape)), None


def count_targets(valid, ignore_index: int) -> int:
    """How many targets count (``valid``: not ``ignore_index``); none is an error."""
    n = int(valid.sum())
    if n == 0:
        raise ValueError(
            f"softmax_cross_entropy: every target equals ignore_index={ignore_index}; "
            "the mean loss over no targets is undefined"
        )
    return n


def check_cross_entropy_inputs(logits, targets) -> None:
    require_float("softmax_cross_entropy", "logits", logits)
    if not backend.is_integer(targets):
        raise TypeError(
            f"softmax_cross_entropy: targets must be integer class ids, got dtype {targets.dtype}"
        )
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"softmax_cross_entropy: targets have shape {tuple(targets.shape)}, expected "
            f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)} without the last axis)"
        )


def softmax_cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    op = backend.implementation(SoftmaxCrossEntropyFunction)
    return op(ignore_index)(logits, as_tensor(targets))


# ======================================================================================
# Embedding and dropout
# ======================================================================================


class EmbeddingFunction(Function):
    """y = W[ids] with ids (...) integers in [0, V), W (V, C) -> y (..., C).

    dW = zeros (V, C) with each row g[i] added at row ids[i]; a token that appears several
    times gets the sum of its rows' gradients (scatter-add, no Python loop). The ids are
    not range-checked here: ``GPT.forward`` checks them once per batch.
    """

    def forward(self, ids, weight):
        if not backend.is_integer(ids):
            raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
        self.ids, self.weight_shape = ids, weight.shape
        return weight[ids]

    def backward(self, g):
        xp = backend.get_array_module(g)
        dw = xp.zeros(self.weight_shape, dtype=g.dtype)  # (V, C)
        xp.add.at(dw, self.ids.reshape(-1), g.reshape(-1, self.weight_shape[1]))
        return None, dw


def embedding(ids, weight: Tensor) -> Tensor:
    return EmbeddingFunction()(as_tensor(ids), weight)


class DropoutFunction(Function):
    """y = x · m / (1 - p), m ~ Bernoulli(1 - p) per element;  dx = g · m / (1 - p)."""

    def __init__(self, p: float, generator: backend.Generator):
        self.p, self.generator = p, generator

    def forward(self, x):
        keep = self.generator.random(x.shape, dtype=x.dtype, device=backend.device_of(x))
        self.mask = (keep >= self.p).astype(x.dtype) * (1.0 / (1.0 - self.p))  # scaled mask
        return x * self.mask

    def backward(self, g):
        return (g * self.mask,)


def dropout(x: Tensor, p: float, training: bool = True, generator=None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p).

    The identity (the same tensor, no graph node) when ``training`` is False or p == 0.
    Masks come from ``generator`` (default: the global seeded generator, see
    :func:`minilora.manual_seed`), so runs are reproducible.
    """
    check_probability("dropout", "p", p)
    if not training or p == 0.0:
        return x
    return DropoutFunction(p, generator or backend.default_generator())(x)


def check_probability(owner: str, name: str, p) -> None:
    """Refuse a dropout probability outside [0, 1) (p = 1 would drop everything)."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}: {name}={p!r} must be a number in [0, 1)")


# ======================================================================================
# Attention
# ======================================================================================


class CausalSelfAttentionFunction(Function):
    """Multi-head causal attention on q, k, v of shape (B, nh, T, hs).

    S = q @ kᵀ / √hs, future positions set to -inf;  P = softmax(S);  y = P @ v.
    With g (B, nh, T, hs):
        dv = Pᵀ @ g,  dP = g @ vᵀ,  dS = P · (dP - Σ_row dP·P),
        dq = dS @ k / √hs,  dk = dSᵀ @ q / √hs.
    Masked entries have P = 0, so they get no gradient without a second mask.
    """

    def forward(self, q, k, v):
        check_attention_inputs(q, k, v)
        xp = backend.get_array_module(q)
        T, hs = q.shape[2], q.shape[3]
        self.scale = 1.0 / math.sqrt(hs)
        S = mm(q, swap_last_two(k), "attention.scores") * self.scale  # (B, nh, T, T)
        future = xp.triu(xp.ones((T, T), dtype=bool), k=1)  # (T, T): key after query
        P = _softmax(xp.where(future, -xp.inf, S), axis=-1)  # (B, nh, T, T), float32 for float16
        self.P = rounded_to(q.dtype, P)
        self.q, self.k, self.v = q, k, v
        return mm(self.P, v, "attention.values")  # (B, nh, T, hs)

    def backward(self, g):
        need_q, need_k, need_v = self.needs_input_grad
        P = self.P
        dv = mm(swap_last_two(P), g, "attention.dv") if need_v else None
        dq = dk = None
        if need_q or need_k:
            dP = mm(g, swap_last_two(self.v), "attention.dP")  # (B, nh, T, T)
            dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))  # softmax's backward
            dq = mm(dS, self.k, "attention.dq") * self.scale if need_q else None
            dk = mm(swap_last_two(dS), self.q, "attention.dk") * self.scale if need_k else None
        return dq, dk, dv


def check_attention_inputs(q, k, v) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"causal_self_attention: q, k, v must all have shape (B, n_head, T, head_size), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def causal_self_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return backend.implementation(CausalSelfAttentionFunction)()(q, k, v)


class CachedAttentionFunction(CausalSelfAttentionFunction):
    """Causal attention of the *newest* Tq queries against all Tk >= Tq keys and values.

    q (B, nh, Tq, hs) holds positions Tk-Tq .. Tk-1; k, v (B, nh, Tk, hs) hold positions
    0 .. Tk-1 (the earlier ones from a KV cache, the last Tq computed with q). Query i sits
    at position Tk-Tq+i and sees keys 0 .. Tk-Tq+i. With Tq = Tk this is
    :class:`CausalSelfAttentionFunction`; with Tq = 1 (one new token) no key is in the future and
    the row is a plain softmax. The backward is CausalSelfAttentionFunction's unchanged: the mask
    enters only through P, which is 0 on masked entries. Why this equals the full
    attention's last rows: docs/math.md, "Incremental decoding with a KV cache".
    """

    def forward(self, q, k, v):
        check_cached_attention_inputs(q, k, v)
        xp = backend.get_array_module(q)
        Tq, Tk, hs = q.shape[2], k.shape[2], q.shape[3]
        self.scale = 1.0 / math.sqrt(hs)
        S = mm(q, swap_last_two(k), "attention.scores") * self.scale  # (B, nh, Tq, Tk)
        query_pos = xp.arange(Tk - Tq, Tk)[:, None]  # (Tq, 1): positions of the queries
        future = xp.arange(Tk)[None, :] > query_pos  # (Tq, Tk): key after query
        P = _softmax(xp.where(future, -xp.inf, S), axis=-1)  # (B, nh, Tq, Tk), float32 for float16
        self.P = rounded_to(q.dtype, P)
        self.q, self.k, self.v = q, k, v
        return mm(self.P, v, "attention.values")  # (B, nh, Tq, hs)


def check_cached_attention_inputs(q, k, v) -> None:
    if (
        q.ndim != 4
        or k.shape != v.shape
        or k.ndim != 4
        or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:]
        or q.shape[2] > k.shape[2]
    ):
        raise ValueError(
            "cached_attention: q must have shape (B, n_head, Tq, head_size) and k, v "
            "(B, n_head, Tk, head_size) with Tq <= Tk, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def cached_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of the newest queries against all keys so far
    (see :class:`CachedAttentionFunction`)."""
    return backend.implementation(CachedAttentionFunction)()(q, k, v)


# ======================================================================================
# Concatenation (prefix tuning joins learned keys, values or embeddings to the tokens')
# ======================================================================================


class Cat(Function):
    """y = the inputs joined along ``axis`` (their other axes equal);  each input's gradient
    is g's slice where that input lies: dx_i = g[..., o_i : o_i + n_i, ...] along ``axis``,
    with o_i the sum of the earlier inputs' sizes n_j there."""

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, *arrays):
        _check_cat_inputs(arrays, self.axis)
        xp = backend.get_array_module(arrays[0])
        self.sizes = [a.shape[self.axis] for a in arrays]  # n_i along axis
        return xp.concatenate(arrays, axis=self.axis)

    def backward(self, g):
        xp = backend.get_array_module(g)
        starts, offset = [], 0
        for n in self.sizes[:-1]:
            offset += n
            starts.append(offset)  # where inputs 1, 2, ... begin along axis
        pieces = xp.split(g, starts, axis=self.axis)  # the gradient, split back per input
        return tuple(
            p if need else None for p, need in zip(pieces, self.needs_input_grad, strict=True)
        )


def _check_cat_inputs(arrays, axis: int) -> None:
    shapes = [tuple(a.shape) for a in arrays]
    ndim = len(shapes[0]) if shapes else 0
    if not shapes or not -ndim <= axis < ndim:
        raise ValueError(f"cat: axis={axis} is not an axis of the arrays, got shapes {shapes}")
    a = axis % ndim

    def others(s):  # the shape without the joined axis
        return s[:a] + s[a + 1 :]

    if any(len(s) != ndim or others(s) != others(shapes[0]) for s in shapes):
        raise ValueError(
            f"cat: arrays must have the same shape except along axis {axis}, got {shapes}"
        )


def cat(tensors, axis: int = 0) -> Tensor:
    """Join ``tensors`` along ``axis`` (PyTorch's ``torch.cat``)."""
    return Cat(axis)(*tensors)


# ======================================================================================
# Tensor's operators and methods are these ops (attached here, so autograd.py needs no
# import of this file)
# ======================================================================================


def _transpose(t: Tensor, dim0: int, dim1: int) -> Tensor:
    """Swap two dimensions (PyTorch's ``transpose``)."""
    dims = list(range(t.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return permute(t, *dims)


Tensor.__add__ = add
Tensor.__radd__ = lambda self, other: add(other, self)
Tensor.__sub__ = sub
Tensor.__rsub__ = lambda self, other: sub(other, self)
Tensor.__mul__ = mul
Tensor.__rmul__ = lambda self, other: mul(other, self)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = lambda self, other: div(other, self)
Tensor.__neg__ = neg
Tensor.__pow__ = pow
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = lambda self, other: matmul(other, self)
Tensor.__getitem__ = getitem
Tensor.reshape = reshape
Tensor.permute = permute
Tensor.transpose = _transpose
Tensor.T = property(lambda self: permute(self, *reversed(range(self.ndim))))
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.exp = exp
Tensor.log = log
Tensor.tanh = tanh

__all__ = [
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "exp",
    "log",
    "tanh",
    "sum",
    "mean",
    "max",
    "reshape",
    "permute",
    "getitem",
    "matmul",
    "linear",
    "lora_linear",
    "gelu",
    "layer_norm",
    "softmax",
    "log_softmax",
    "softmax_cross_entropy",
    "embedding",
    "dropout",
    "causal_self_attention",
    "cached_attention",
    "unbroadcast",
]
