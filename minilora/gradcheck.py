"""Check a hand-written backward against central finite differences.

For a function ``y = fn(*inputs)`` and an upstream gradient ``dout`` (random by default),
the scalar ``L = Σ y · dout`` has gradient ``dL/dx = (backward of fn)(dout)``. For each
element ``x[i]`` of each input, the numerical estimate is

    (L(x[i] + eps) - L(x[i] - eps)) / (2 eps)

whose error is O(eps²). In float64 with eps = 1e-6 that is ~1e-12 from the truncation and
~1e-10 from rounding, so agreement to ~1e-6 is a meaningful test.

Why a *random* upstream gradient: with ``dout = 1`` the checks of softmax and layer norm
are degenerate (their output sums are constant, so every gradient is zero and any backward
that returns zeros passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from minilora import backend
from minilora.autograd import Tensor, no_grad

EPS, ATOL, RTOL = 1e-6, 1e-6, 1e-4  # the defaults below: see the error estimate above


class GradcheckError(AssertionError):
    """Raised when an analytic gradient disagrees with the numerical one."""


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence,
    dout=None,
    *,
    eps: float = EPS,
    atol: float = ATOL,
    rtol: float = RTOL,
    no_grads: Sequence[int] = (),
    seed: int = 0,
) -> bool:
    """Compare ``fn``'s backward with central differences, for every floating input.

    ``inputs``: tensors or arrays; floating ones must be float64. Integer inputs (token
    ids, targets) are passed through and not differentiated. ``no_grads``: positions of
    inputs that are frozen (``requires_grad=False``); the check asserts they get no
    gradient. ``dout``: the upstream gradient, random normal (from ``seed``) by default.

    Returns True, or raises :class:`GradcheckError` naming the input, the element, the
    analytic and numerical values and the error. ``fn`` must be deterministic (seed any
    dropout inside it).
    """
    # fresh contiguous copies: the caller's tensors are left alone, and the finite
    # differences below can edit each input in place through a flat view
    tensors = [
        Tensor((x.data if isinstance(x, Tensor) else backend.array(x)).copy()) for x in inputs
    ]
    for i in no_grads:
        if not 0 <= i < len(tensors):
            raise ValueError(f"no_grads contains {i}, but there are only {len(tensors)} inputs")
    checked = []
    for i, t in enumerate(tensors):
        if not backend.is_floating(t.data):
            continue
        if t.dtype != backend.float64:
            raise TypeError(
                f"gradcheck: input {i} has dtype {t.dtype}; finite differences need float64 "
                "(float32 rounding error swamps the difference quotient)"
            )
        t.grad, t._ctx = None, None
        t.requires_grad = i not in no_grads
        if t.requires_grad:
            checked.append(i)

    out = fn(*tensors)
    if dout is None:
        rng = backend.Generator(seed)
        dout = rng.normal(out.shape, dtype=backend.float64, device=out.device)
    dout = dout.data if isinstance(dout, Tensor) else dout
    if tuple(dout.shape) != out.shape:
        raise ValueError(f"dout has shape {tuple(dout.shape)}, expected {out.shape} (fn's output)")
    out.backward(dout)

    for i in no_grads:
        if tensors[i].grad is not None:
            raise GradcheckError(
                f"input {i} is frozen (listed in no_grads) but received a gradient; frozen "
                "inputs must get grad None"
            )

    def loss_at(t: Tensor, x) -> float:  # L with the input t's data set to x
        kept, t.data = t.data, x
        try:
            with no_grad():
                return float((backend.to_numpy(fn(*tensors).data) * backend.to_numpy(dout)).sum())
        finally:
            t.data = kept

    for i in checked:
        t = tensors[i]
        if t.grad is None:
            raise GradcheckError(
                f"input {i} (shape {t.shape}) requires grad but received none: the backward "
                "returned None for it, or the output does not depend on it through the graph"
            )
        analytic = backend.to_numpy(t.grad)
        numeric = numerical_gradient(lambda x, t=t: loss_at(t, x), t.data, eps)
        err = abs(analytic - numeric)
        allowed = atol + rtol * abs(numeric)
        if (err > allowed).any():
            where = backend.unravel_index((err - allowed).argmax(), t.shape)
            n_bad = int((err > allowed).sum())
            raise GradcheckError(
                f"gradient of input {i} (shape {t.shape}) is wrong at index {where}: "
                f"analytic {analytic[where]:.8g}, numerical (central difference) "
                f"{numeric[where]:.8g}, error {err[where]:.3g} > allowed {allowed[where]:.3g} "
                f"(atol={atol:g} + rtol={rtol:g}·|numerical|). {n_bad} of {t.size} elements "
                "disagree. Check the backward formula for this input (a missing term, a "
                "transpose, a sum over the wrong axis, or broadcasting not undone)."
            )
    return True


def numerical_gradient(loss: Callable, x, eps: float = EPS):
    """Central differences ``(loss(x + eps·e_j) - loss(x - eps·e_j)) / (2 eps)`` for each
    element ``j`` of the array ``x`` (left as it was), as a NumPy array of ``x``'s shape."""
    x = x.copy()
    numeric = backend.to_numpy(x).copy()
    flat = x.reshape(-1)  # a view: editing it edits x
    for j in range(flat.size):
        orig = float(flat[j])
        flat[j] = orig + eps
        plus = loss(x)
        flat[j] = orig - eps
        minus = loss(x)
        flat[j] = orig
        numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
    return numeric
