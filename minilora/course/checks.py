"""The checks that grade the assignments: properties a correct implementation has.

Each ``check_*`` takes a :class:`Context` (random draws from its seed, the folder being
graded) and raises :class:`CheckFailed` with one line a student can act on: what was
checked, which entry, the value found and the value expected. Checks are properties on
random shapes and values, not fixed outputs: gradients against central differences in
float64 with a random upstream gradient (``gradcheck``), forward values against plain
formulas written here, and the rules LoRA depends on (B starts at zero, frozen weights get
no gradient and no optimizer state). ``CHECKS`` maps each task id of the manifest
(``assignments.py``) that grades a package to its checks; ``grading.py`` runs them, task
by task, isolated. A port's tasks (a5) are graded by running it: ``ports.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minilora import backend, gradcheck, lora
from minilora.course.student import InProcess
from minilora.data import DOWNSTREAM_TASK, DigitTasks
from minilora.train import exact_match

np = backend.module_for("cpu")  # NumPy: the grader's own arithmetic
f64 = backend.float64


class CheckFailed(Exception):
    """A check's verdict: the message says what is wrong, for the student."""


# ======================================================================================
# What the checks share: random draws, the student's code, comparisons, gradient checks
# ======================================================================================


@dataclass
class Context:
    """What a check gets: random draws from its seed, the folder being graded, and the
    student's code (``student``: its modules, reached as minilora/course/student.py says)."""

    seed: int
    folder: Path
    student: InProcess = field(default_factory=InProcess)
    gen: backend.Generator = field(init=False)

    def __post_init__(self):
        self.gen = backend.Generator(self.seed)

    # the student's modules, by the names the checks use
    @property
    def F(self):
        return self.student.module("functional")

    @property
    def Tensor(self):
        return self.student.module("autograd").Tensor

    def module(self, name: str):
        return self.student.module(name)

    def value(self, x):
        """A plain NumPy copy of a student's tensor or array (or ``x`` if it is neither)."""
        return self.student.value(x)

    def int(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return int(self.gen.integers(low, high + 1, ()))

    def normal(self, *shape, scale: float = 1.0):
        return self.gen.normal(shape, std=scale, dtype=f64)

    def ids(self, high: int, *shape):
        return self.gen.integers(0, high, shape)

    def shape(self, min_dims: int = 1, max_dims: int = 3, max_side: int = 4) -> tuple:
        return tuple(self.int(1, max_side) for _ in range(self.int(min_dims, max_dims)))

    def reduced(self, full: tuple) -> tuple:
        """A shape that broadcasts to ``full``: some leading axes dropped, some set to 1."""
        shape = list(full[self.int(0, len(full)) :])
        for i in range(len(shape)):
            if self.int(0, 2) == 0:
                shape[i] = 1
        return tuple(shape)


def fmt(v) -> str:
    return f"{float(v):.6g}"


def _worst(err, allowed) -> tuple[int, ...]:
    """The index (plain integers) where ``err`` exceeds ``allowed`` the most."""
    return tuple(map(int, np.unravel_index(int((err - allowed).argmax()), err.shape)))


def expect_close(
    ctx: Context, got, want, what: str, rtol: float = 1e-7, atol: float = 1e-10
) -> None:
    """``got`` (a student's tensor or array) equals ``want`` to rounding, or a message
    naming the entry."""
    got, want = np.asarray(ctx.value(got)), np.asarray(want)
    if tuple(got.shape) != tuple(want.shape):
        raise CheckFailed(f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not bool(np.isfinite(got).all()):
        where = tuple(map(int, np.unravel_index(int((~np.isfinite(got)).argmax()), got.shape)))
        raise CheckFailed(f"{what} is {got[where]} at index {where}, expected {fmt(want[where])}")
    err = abs(got - want)
    allowed = atol + rtol * abs(want)
    if (err > allowed).any():
        where = _worst(err, allowed)
        rel = err[where] / max(abs(want[where]), 1e-300)
        raise CheckFailed(
            f"{what} is wrong at index {where}: got {fmt(got[where])}, expected "
            f"{fmt(want[where])} (relative error {rel:.2g} > {rtol:g}); "
            f"{int((err > allowed).sum())} of {got.size} entries differ"
        )


def expect_grads(ctx: Context, op: str, fn: Callable, inputs: dict, frozen=()) -> None:
    """``fn(*tensors)``'s backward against central differences (float64, a random upstream
    gradient), every input checked, as minilora/gradcheck.py does; ``frozen`` inputs
    (``requires_grad=False``) must get no gradient. Runs here: ``fn`` calls the student's
    code, and the difference quotients and the verdict are the grader's."""
    arrays = {n: np.asarray(a, dtype=f64) for n, a in inputs.items()}
    tensors = [ctx.Tensor(a.copy(), requires_grad=n not in frozen) for n, a in arrays.items()]
    out = fn(*tensors)
    dout = ctx.normal(*np.shape(ctx.value(out)))
    out.backward(dout)

    def loss(values) -> float:
        y = fn(*(ctx.Tensor(v) for v in values))
        return float((np.asarray(ctx.value(y)) * dout).sum())

    for i, (name, tensor) in enumerate(zip(arrays, tensors, strict=True)):
        grad = tensor.grad
        if name in frozen:
            if grad is not None:
                raise CheckFailed(f"{op}: {name} is frozen but received a gradient (expected None)")
            continue
        if grad is None:
            raise CheckFailed(
                f"{op}: {name} requires grad but received none (the backward returned None "
                "for it, or the output does not depend on it through the graph)"
            )
        analytic = np.asarray(ctx.value(grad), dtype=f64)
        if analytic.shape != arrays[name].shape:
            raise CheckFailed(
                f"{op}: d{name} has shape {analytic.shape}, expected {arrays[name].shape} "
                "(the shape of its input: broadcasting not undone?)"
            )
        values = list(arrays.values())
        numeric = gradcheck.numerical_gradient(
            lambda x, i=i, values=values: loss([x if k == i else v for k, v in enumerate(values)]),
            values[i],
        )
        err, allowed = abs(analytic - numeric), gradcheck.ATOL + gradcheck.RTOL * abs(numeric)
        if (err > allowed).any():
            where = _worst(err, allowed)
            rel = err[where] / max(abs(numeric[where]), 1e-300)
            raise CheckFailed(
                f"{op}: d{name} (shape {analytic.shape}) is wrong at index {where}: analytic "
                f"{analytic[where]:.8g}, numerical (central difference) {numeric[where]:.8g}; "
                f"{int((err > allowed).sum())} of {analytic.size} elements disagree; "
                f"relative error {rel:.2g}."
            )


FIXED_SEED = 24  # the hard cases' draws: fixed, whatever the run's seed


def fixed(ctx: Context) -> Context:
    """A context on the student's code whose draws never change: the hard cases (awkward
    shapes, values and settings, where realistic bugs hide) are the same on every run, so
    a bug they catch is caught whatever the seed; the random cases come on top."""
    return Context(FIXED_SEED, ctx.folder, ctx.student)


@contextlib.contextmanager
def hint(text: str):
    """A :class:`CheckFailed` raised in the block gets ``text`` (what to look at) appended."""
    try:
        yield
    except CheckFailed as e:
        raise CheckFailed(f"{e}; {text}") from None


def _softmax_np(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ======================================================================================
# a1: autograd
# ======================================================================================


def _unbroadcast_np(g, shape: tuple):
    """Each entry of the input receives every entry of ``g`` it was broadcast to."""
    want = np.zeros(shape, dtype=f64)
    for j in range(want.size):
        onehot = np.zeros(shape, dtype=f64)
        onehot.reshape(-1)[j] = 1.0
        want.reshape(-1)[j] = (np.broadcast_to(onehot, g.shape) * g).sum()
    return want


def check_unbroadcast(ctx: Context) -> None:
    for _ in range(4):
        full = ctx.shape(1, 4)
        shape = ctx.reduced(full)
        g = ctx.normal(*full)
        got = ctx.F.unbroadcast(g, shape)
        expect_close(
            ctx, got, _unbroadcast_np(g, shape), f"unbroadcast(g of shape {full}, {shape})"
        )


UNBROADCAST_CASES = [  # (g's shape, the input's): added axes, stretched axes, both, neither
    ((2, 3, 4), (3, 1)),
    ((2, 1, 3, 2), (1, 3, 1)),
    ((3, 3), (3, 1)),
    ((3, 3), (1, 3)),
    ((4, 3), (3,)),
    ((2, 3, 4), (2, 3, 4)),
]


def check_unbroadcast_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    for full, shape in UNBROADCAST_CASES:
        g = h.normal(*full)
        with hint(
            "sum over the leading axes broadcasting added and over every axis stretched "
            "from size 1 (keepdims), nothing else"
        ):
            got = ctx.F.unbroadcast(g, shape)
            expect_close(
                ctx, got, _unbroadcast_np(g, shape), f"unbroadcast(g of shape {full}, {shape})"
            )


def _binary_grads(ctx: Context, name: str, fn) -> None:
    m, n = ctx.int(2, 4), ctx.int(2, 4)
    cases = [((m, n), (n,)), ((m, 1), (m, n))]  # surely broadcast, each side once
    for _ in range(3):
        full = ctx.shape(1, 3)
        cases.append((full, ctx.reduced(full)))
    for shapes in map(list, cases):
        if ctx.int(0, 1):
            shapes.reverse()
        a, b = ctx.normal(*shapes[0]), ctx.normal(*shapes[1])
        expect_grads(ctx, f"{name} of shapes {shapes[0]} and {shapes[1]}", fn, {"a": a, "b": b})


def check_add_mul(ctx: Context) -> None:
    _binary_grads(ctx, "add", ctx.F.add)
    _binary_grads(ctx, "mul", ctx.F.mul)


BINARY_CASES = [((2, 1, 3, 2), (3, 1)), ((1, 3), (2, 1)), ((2, 3), (2, 3)), ((4,), (2, 1, 4))]


def check_add_mul_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    for name in ("add", "mul"):
        for sa, sb in BINARY_CASES:
            with hint(f"{name}: each input's gradient has that input's shape (unbroadcast)"):
                inputs = {"a": h.normal(*sa), "b": h.normal(*sb)}
                expect_grads(h, f"{name} of shapes {sa} and {sb}", getattr(ctx.F, name), inputs)


def check_matmul(ctx: Context) -> None:
    m, k, n = ctx.int(1, 4), ctx.int(1, 4), ctx.int(1, 4)
    for sa, sb in [((m, k), (k, n)), ((ctx.int(2, 3), m, k), (k, n)), ((2, m, k), (2, k, n))]:
        a, b = ctx.normal(*sa), ctx.normal(*sb)
        expect_grads(ctx, f"matmul of shapes {sa} and {sb}", ctx.F.matmul, {"a": a, "b": b})


MATMUL_CASES = [((2, 1, 3, 2), (3, 2, 2)), ((3, 2), (2, 2, 4)), ((1, 2, 3), (2, 3, 2))]


def check_matmul_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    for sa, sb in MATMUL_CASES:
        with hint(
            "transpose only the last two axes (swap_last_two, not .T), and sum the batch axes "
            "broadcasting added or stretched (unbroadcast)"
        ):
            inputs = {"a": h.normal(*sa), "b": h.normal(*sb)}
            expect_grads(h, f"matmul of shapes {sa} and {sb}", ctx.F.matmul, inputs)


def check_sum_mean(ctx: Context) -> None:
    for name in ("sum", "mean"):
        op = getattr(ctx.F, name)
        for _ in range(3):
            shape = ctx.shape(1, 3)
            axes = [None, ctx.int(-len(shape), len(shape) - 1)]
            if len(shape) > 1:
                axes.append((0, len(shape) - 1))
            axis, keepdims = axes[ctx.int(0, len(axes) - 1)], bool(ctx.int(0, 1))
            expect_grads(
                ctx,
                f"{name}(shape {shape}, axis={axis}, keepdims={keepdims})",
                lambda x, op=op, axis=axis, keepdims=keepdims: op(x, axis, keepdims),
                {"x": ctx.normal(*shape)},
            )


REDUCTION_CASES = [  # a square shape lets a lost keepdims broadcast silently, wrongly
    ((3, 3, 2), 1, False),
    ((2, 3, 4), (0, 2), False),
    ((2, 1, 3, 2), -2, True),
    ((3, 3), 0, False),
    ((2, 3), None, False),
]


def check_sum_mean_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    for name in ("sum", "mean"):
        op = getattr(ctx.F, name)
        for shape, axis, keepdims in REDUCTION_CASES:
            with hint(
                "reshape g to the keepdims shape before broadcasting it back"
                + (
                    "; mean divides by the number of elements averaged into each output"
                    if name == "mean"
                    else ""
                )
            ):
                expect_grads(
                    h,
                    f"{name}(shape {shape}, axis={axis}, keepdims={keepdims})",
                    lambda x, op=op, axis=axis, keepdims=keepdims: op(x, axis, keepdims),
                    {"x": h.normal(*shape)},
                )


def check_softmax(ctx: Context) -> None:
    F, Tensor = ctx.F, ctx.Tensor
    shape = ctx.shape(1, 3, 5)
    big = ctx.normal(*shape, scale=3.0) + 1000.0  # exp(1000) overflows float64
    try:
        got = F.softmax(Tensor(big))
        expect_close(ctx, got, _softmax_np(big), "softmax of logits near 1000")
    except CheckFailed as e:
        raise CheckFailed(f"{e}; subtract the row maximum before exp, exp(1000) = inf") from None
    for _ in range(3):
        shape = ctx.shape(1, 3)
        axis = ctx.int(-len(shape), len(shape) - 1)
        x = ctx.normal(*shape)
        got = F.softmax(Tensor(x), axis)
        expect_close(ctx, got, _softmax_np(x, axis), f"softmax axis={axis}")
        expect_grads(
            ctx, f"softmax(shape {shape}, axis={axis})", lambda t, a=axis: F.softmax(t, a), {"x": x}
        )


# rows (and columns, transposed) at very different levels: one maximum for all of them
# underflows some rows to 0/0, none at all overflows to inf/inf
FAR_APART = [[0.0, 1.0, 2.0], [1000.0, 1001.0, 1003.0], [-1000.0, -999.0, -998.0]]


def check_softmax_hard_cases(ctx: Context) -> None:
    F, Tensor, h = ctx.F, ctx.Tensor, fixed(ctx)
    levels = np.array(FAR_APART, dtype=f64)
    for dtype, rtol in ((f64, 1e-7), (backend.float32, 1e-5)):
        for x, axis in ((levels, -1), (levels.T.copy(), 0)):
            what = f"softmax({np.dtype(dtype).name} logits near 0, 1000 and -1000, axis={axis})"
            with hint(
                "subtract the maximum along the softmax's own axis (keepdims=True) before exp: "
                "exp(1000) = inf, exp(-1000) = 0"
            ):
                got = F.softmax(Tensor(x.astype(dtype)), axis)
                expect_close(ctx, got, _softmax_np(x, axis), what, rtol=rtol)
    for shape, axis in (((3, 4), 0), ((2, 3, 2), 1)):
        x = h.normal(*shape)
        with hint("dx = y·(g - Σ g·y), the sum along the softmax's axis (keepdims=True)"):
            expect_close(
                ctx, F.softmax(Tensor(x), axis), _softmax_np(x, axis), f"softmax axis={axis}"
            )
            expect_grads(
                h,
                f"softmax(shape {shape}, axis={axis})",
                lambda t, a=axis: F.softmax(t, a),
                {"x": x},
            )


def check_log_softmax_cross_entropy(ctx: Context) -> None:
    F = ctx.F
    shape = ctx.shape(1, 3)
    axis = ctx.int(-len(shape), len(shape) - 1)
    expect_grads(
        ctx,
        f"log_softmax(shape {shape}, axis={axis})",
        lambda t: F.log_softmax(t, axis),
        {"x": ctx.normal(*shape)},
    )
    lead, V = (ctx.int(2, 4), *ctx.shape(0, 1)), ctx.int(2, 5)  # two rows at least
    logits = ctx.normal(*lead, V)
    targets = ctx.ids(V, *lead)
    targets.reshape(-1)[0] = ctx.int(0, V - 1)  # at least one target counts
    targets.reshape(-1)[-1] = -100
    t = ctx.Tensor(logits, requires_grad=True)
    F.softmax_cross_entropy(t, targets).backward()
    last = ctx.value(t.grad).reshape(-1, V)[-1]
    if bool((last != 0).any()):
        raise CheckFailed(
            "softmax_cross_entropy: the last row's target is ignore_index=-100, but its "
            f"dlogits is {last.round(4).tolist()}, expected all zeros; "
            "ignored rows take no part in the loss (and n counts only the other rows)"
        )
    expect_grads(
        ctx,
        f"softmax_cross_entropy(logits {logits.shape}, {int((targets == -100).sum())} ignored)",
        lambda z: F.softmax_cross_entropy(z, targets),
        {"logits": logits},
    )


IGNORED = [[1, -100, 3], [0, 2, -100]]  # 4 of 6 targets count


def check_log_softmax_cross_entropy_hard_cases(ctx: Context) -> None:
    F, h = ctx.F, fixed(ctx)
    for shape, axis in (((3, 4), 0), ((2, 3, 2), 1)):
        with hint("dx = g - softmax(x)·Σ g, the sum along the log-softmax's axis (keepdims=True)"):
            expect_grads(
                h,
                f"log_softmax(shape {shape}, axis={axis})",
                lambda t, a=axis: F.log_softmax(t, a),
                {"x": h.normal(*shape)},
            )
    targets = np.array(IGNORED)
    with hint(
        "dlogits = g·(softmax - onehot)/n, n = 4 here: the targets that are not "
        "ignore_index=-100, not all 6 rows; ignored rows get 0"
    ):
        expect_grads(
            h,
            "softmax_cross_entropy(logits (2, 3, 4), 2 of 6 targets ignored)",
            lambda z: F.softmax_cross_entropy(z, targets),
            {"logits": h.normal(2, 3, 4)},
        )


def _layer_norm_np(x, w, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # biased, as PyTorch's
    y = (x - mu) / np.sqrt(var + eps)
    y = y if w is None else y * w
    return y if b is None else y + b


def check_layer_norm(ctx: Context) -> None:
    F, Tensor = ctx.F, ctx.Tensor
    for _ in range(2):
        shape = (*ctx.shape(0, 2), ctx.int(3, 6))  # C ≥ 3: no row with a tiny variance
        x = ctx.normal(*shape, scale=2.0) + ctx.normal(1)
        w, b = 1.0 + 0.5 * ctx.normal(shape[-1]), ctx.normal(shape[-1])
        want = _layer_norm_np(x, w, b)
        got = F.layer_norm(Tensor(x), Tensor(w), Tensor(b))
        try:
            expect_close(ctx, got, want, "layer_norm(x)")
        except CheckFailed as e:
            raise CheckFailed(
                f"{e}; x̂ = (x - μ)/√(σ² + eps) with μ and the biased variance σ² = mean((x - μ)²) "
                "over the last axis"
            ) from None
        expect_grads(
            ctx, f"layer_norm(shape {shape})", F.layer_norm, {"x": x, "weight": w, "bias": b}
        )
        expect_grads(
            ctx,
            f"layer_norm(shape {shape}) with a frozen weight",
            F.layer_norm,
            {"x": x, "weight": w, "bias": b},
            frozen=["weight"],
        )


def check_layer_norm_hard_cases(ctx: Context) -> None:
    F, Tensor, h = ctx.F, ctx.Tensor, fixed(ctx)
    w, b = 1.0 + 0.5 * h.normal(4), h.normal(4)
    small = 5.0 + 0.003 * h.normal(2, 4)  # a variance near eps = 1e-5: where eps goes shows
    with hint("x̂ = (x - μ)/√(σ² + eps): eps inside the square root"):
        got = F.layer_norm(Tensor(small), Tensor(w), Tensor(b))
        expect_close(
            ctx, got, _layer_norm_np(small, w, b), "layer_norm of rows with variance ≈ eps"
        )
    x = h.normal(2, 3, 4)
    with hint("no weight and no bias: y = x̂ (layer_norm(x, None, None))"):
        got = F.layer_norm(Tensor(x), None, None)
        expect_close(ctx, got, _layer_norm_np(x, None, None), "layer_norm(x (2, 3, 4), None, None)")
    with hint("dweight and dbias sum over every leading axis, not only the first"):
        inputs = {"x": x, "weight": w, "bias": b}
        expect_grads(h, "layer_norm(shape (2, 3, 4))", F.layer_norm, inputs)
    with hint("without a weight, ĝ = g"):
        expect_grads(
            h,
            "layer_norm(shape (2, 3, 4), no weight, no bias)",
            lambda t: F.layer_norm(t, None, None),
            {"x": x},
        )


def check_gelu(ctx: Context) -> None:
    shape = ctx.shape(1, 3)
    expect_grads(ctx, f"gelu(shape {shape})", ctx.F.gelu, {"x": ctx.normal(*shape, scale=2.0)})


def check_gelu_hard_cases(ctx: Context) -> None:
    x = np.linspace(-4.0, 4.0, 12).reshape(2, 3, 2) + 0.01  # the tails and the middle
    expect_grads(fixed(ctx), "gelu(12 values from -4 to 4, shape (2, 3, 2))", ctx.F.gelu, {"x": x})


def check_embedding(ctx: Context) -> None:
    V, C = ctx.int(2, 5), ctx.int(1, 4)
    ids = ctx.ids(V, ctx.int(1, 3), V + ctx.int(1, 3))  # more ids than rows: repeats
    ids.reshape(-1)[:2] = ids.reshape(-1)[0]  # at least one id for sure twice
    weight = ctx.normal(V, C)
    tensor = ctx.Tensor(weight.copy(), requires_grad=True)
    g = ctx.normal(*ids.shape, C)
    ctx.F.embedding(ids, tensor).backward(g)
    row = int(ids.reshape(-1)[0])
    want = g.reshape(-1, C)[ids.reshape(-1) == row].sum(axis=0)
    grad = ctx.value(tensor.grad)
    if grad is None or not np.allclose(grad[row], want):
        repeats = int((ids == row).sum())
        got = None if grad is None else grad[row].round(4).tolist()
        raise CheckFailed(
            f"embedding: id {row} appears {repeats} times in ids, so row {row} of dW must be "
            f"the sum of those {repeats} rows of g, {want.round(4).tolist()}; got {got} "
            "(dW[ids] = g keeps only the last; use np.add.at)"
        )
    expect_grads(
        ctx,
        f"embedding(ids {ids.shape}, weight ({V}, {C}))",
        lambda w: ctx.F.embedding(ids, w),
        {"weight": weight},
    )


REPEATED_IDS = [[0, 2, 2], [3, 0, 2]]  # id 2 three times, id 0 twice, id 1 never


def check_embedding_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    ids, weight = np.array(REPEATED_IDS), h.normal(4, 2)
    tensor = ctx.Tensor(weight.copy(), requires_grad=True)
    g = h.normal(2, 3, 2)
    ctx.F.embedding(ids, tensor).backward(g)
    want = np.zeros((4, 2), dtype=f64)
    np.add.at(want, ids.reshape(-1), g.reshape(-1, 2))
    with hint(
        "repeated ids accumulate (np.add.at(dW, ids, g)); dW[ids] = g and dW[ids] += g keep "
        "only one of them; an id never used gets 0"
    ):
        expect_close(ctx, tensor.grad, want, f"embedding's dW for ids {REPEATED_IDS}")
        expect_grads(
            h,
            "embedding(ids (2, 3), weight (4, 2))",
            lambda w: ctx.F.embedding(ids, w),
            {"weight": weight},
        )


def check_accumulation(ctx: Context) -> None:
    x = ctx.normal(*ctx.shape(1, 2))
    expect_grads(ctx, "x * x (x used twice by one op)", lambda t: t * t, {"x": x})
    expect_grads(
        ctx,
        "h = 2x; h * h + h (h used by three ops)",
        lambda t: (lambda h: h * h + h)(t * 2.0),
        {"x": x},
    )
    leaf = ctx.Tensor(x.copy(), requires_grad=True)
    (leaf * 3.0).sum().backward()
    (leaf * 3.0).sum().backward()
    expect_close(ctx, leaf.grad, 6.0 + 0 * x, "x.grad after two backward() calls of sum(3x)")


def check_accumulation_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    x = h.normal(2, 3)
    with hint("a tensor used by several ops gets the sum of their gradients"):
        expect_grads(
            h, "x·x + 2x + x (x used by four ops)", lambda t: t * t + t * 2.0 + t, {"x": x}
        )
    leaf = ctx.Tensor(x.copy(), requires_grad=True)
    for _ in range(3):
        (leaf * leaf).sum().backward()
    with hint("backward() adds into .grad: three calls leave the sum of three gradients"):
        expect_close(ctx, leaf.grad, 6.0 * x, "x.grad after three backward() calls of sum(x·x)")


# ======================================================================================
# a2: the Transformer
# ======================================================================================


def _attention_np(q, k, v):
    T, hs = q.shape[2], q.shape[3]
    S = q @ k.swapaxes(-1, -2) / math.sqrt(hs)
    S = np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, S)
    return _softmax_np(S) @ v


def _qkv(ctx: Context):
    shape = (ctx.int(1, 2), ctx.int(1, 2), ctx.int(2, 5), ctx.int(1, 3))
    return shape, [ctx.normal(*shape) for _ in range(3)]


def check_attention_forward(ctx: Context) -> None:
    _attention_forward_case(ctx, *_qkv(ctx)[1])


def _attention_forward_case(ctx: Context, q, k, v, rtol: float = 1e-7) -> None:
    """The mask (a later key and value move no earlier output) and the output's values."""
    F, Tensor, shape = ctx.F, ctx.Tensor, q.shape
    y = F.causal_self_attention(Tensor(q), Tensor(k), Tensor(v))
    later = k.copy(), v.copy()
    later[0][:, :, -1] += 5.0
    later[1][:, :, -1] += 5.0
    y2 = F.causal_self_attention(Tensor(q), Tensor(later[0]), Tensor(later[1]))
    T = shape[2]
    moved = abs(ctx.value(y2) - ctx.value(y))[:, :, : T - 1].max(initial=0.0)
    if moved > 1e-12:
        raise CheckFailed(
            f"causal_self_attention: changing the key and value at the last position {T - 1} "
            f"changed the output at earlier positions (by up to {moved:.3g}); every key after "
            "a query's position must be masked (np.triu(ones, k=1))"
        )
    want = _attention_np(*(a.astype(f64) for a in (q, k, v)))
    what = f"causal_self_attention({q.dtype.name} q, k, v of shape {shape})"
    expect_close(ctx, y, want, what, rtol=rtol, atol=rtol * 1e-3)


ATTENTION_SHAPES = [(1, 2, 3, 4), (2, 1, 4, 2), (1, 1, 1, 3)]  # hs > 1, T ≠ hs, T = 1


def check_attention_forward_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    for shape in ATTENTION_SHAPES:
        with hint(
            "S = q kᵀ/√hs (hs = q.shape[-1], T = q.shape[-2]), the keys after each query masked"
        ):
            _attention_forward_case(ctx, *(h.normal(*shape) for _ in range(3)))
    q, k = (h.normal(1, 1, 3, 4, scale=8.0).astype(backend.float32) for _ in range(2))
    with hint(
        "scores reach ±100 here: subtract each row's maximum before exp (float32 exp(89) = inf)"
    ):
        _attention_forward_case(ctx, q, k, h.normal(1, 1, 3, 4).astype(backend.float32), rtol=1e-4)


def check_attention_backward(ctx: Context) -> None:
    F = ctx.F
    shape, (q, k, v) = _qkv(ctx)
    expect_grads(
        ctx,
        f"causal_self_attention(shape {shape})",
        F.causal_self_attention,
        {"q": q, "k": k, "v": v},
    )
    expect_grads(
        ctx,
        f"causal_self_attention(shape {shape}) with frozen k",
        F.causal_self_attention,
        {"q": q, "k": k, "v": v},
        frozen=["k"],
    )


def check_attention_backward_hard_cases(ctx: Context) -> None:
    F, h = ctx.F, fixed(ctx)
    for shape, frozen in (((1, 2, 3, 4), ()), ((2, 1, 3, 2), ("k",))):
        with hint("dq = dS k/√hs, dk = dSᵀ q/√hs, dv = Pᵀ g, with dS = P·(dP - Σ_row dP·P)"):
            expect_grads(
                h,
                f"causal_self_attention(shape {shape})"
                + (f", frozen {frozen[0]}" if frozen else ""),
                F.causal_self_attention,
                {n: h.normal(*shape) for n in "qkv"},
                frozen=frozen,
            )


def _tiny_gpt(ctx: Context, dtype=f64, **settings):
    drawn = {
        "vocab_size": ctx.int(5, 9),
        "block_size": ctx.int(3, 5),
        "n_layer": ctx.int(1, 2),
        "n_head": 2,
        "n_embd": 2 * ctx.int(2, 3),
    }
    config = ctx.module("model").GPTConfig(**{**drawn, **settings})
    ctx.module("backend").manual_seed(ctx.seed)
    gpt = ctx.module("model").GPT(config, dtype=dtype)
    for p in gpt.parameters():  # O(1) weights: every layer visibly changes the logits
        p.data = p.data + (0.3 * ctx.normal(*p.shape)).astype(dtype)
    return gpt


def check_gpt_forward(ctx: Context) -> None:
    gpt = _tiny_gpt(ctx)
    c = gpt.config
    B, T = 2, c.block_size
    idx, targets = ctx.ids(c.vocab_size, B, T), ctx.ids(c.vocab_size, B, T)
    targets[0, 0] = -100
    _gpt_case(ctx, gpt, idx, targets, f"GPT logits (B={B}, T={T})")


def _gpt_case(ctx: Context, gpt, idx, targets, what: str) -> None:
    """The student's forward against the model's own modules composed by hand (dropout
    drawing the same masks: the global generator reseeded before each), and the loss."""
    T = idx.shape[1]
    ctx.module("backend").manual_seed(FIXED_SEED)
    logits, loss = gpt(idx, targets)
    ctx.module("backend").manual_seed(FIXED_SEED)
    x = gpt.drop(gpt.tok_emb(idx) + gpt.pos_emb(np.arange(T)))
    for block in gpt.blocks:
        x = block(x)
    want = ctx.value(gpt.lm_head(gpt.ln_f(x)))
    expect_close(ctx, logits, want, what)
    logp = want - want.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = targets != -100
    nll = -np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    if loss is None:
        raise CheckFailed("GPT.forward(idx, targets) returned loss None; expected the mean loss")
    want_loss = np.asarray((nll * keep).sum() / keep.sum())
    expect_close(ctx, loss, want_loss, "GPT loss (one target ignored)")
    logits_none, loss_none = gpt(idx)
    if loss_none is not None:
        raise CheckFailed("GPT.forward(idx) without targets must return loss None")


def check_gpt_forward_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    gpt = _tiny_gpt(h, block_size=5, dropout=0.25)
    V = gpt.config.vocab_size
    for B, T, mode in ((1, 2, "train"), (2, 5, "train"), (2, 3, "eval")):
        if mode == "train":
            gpt.train()
        else:
            gpt.eval()
        idx, targets = h.ids(V, B, T), h.ids(V, B, T)
        targets[-1, -1] = -100
        with hint(
            "positions 0 .. T-1 of the sequence given (T may be less than block_size); the "
            "embedding dropout self.drop, which is the identity in eval mode"
        ):
            _gpt_case(
                ctx,
                gpt,
                idx,
                targets,
                f"GPT logits (B={B}, T={T}, block_size 5, dropout 0.25, {mode} mode)",
            )


# ======================================================================================
# a3: the LoRA layer
# ======================================================================================


def check_lora_init(ctx: Context) -> None:
    # r·in ≥ 1024 draws: A's std and kurtosis are then far from the thresholds below
    in_f, out_f, r = 256 * ctx.int(4, 6), ctx.int(8, 40), ctx.int(1, 4)
    alpha = float(ctx.int(1, 16))
    LoRALinear, Generator = ctx.module("lora").LoRALinear, ctx.module("backend").Generator
    layer = LoRALinear(in_f, out_f, r=r, lora_alpha=alpha, dtype=f64, generator=Generator(ctx.seed))
    for name, want in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
        got = getattr(layer, name, None)
        if not ctx.student.is_tensor(got) or got.shape != want or not got.requires_grad:
            raise CheckFailed(
                f"LoRALinear({in_f}, {out_f}, r={r}).{name} should be a trainable Parameter of "
                f"shape {want}, got {got if got is None else getattr(got, 'shape', got)}"
            )
    A, B = ctx.value(layer.lora_A), ctx.value(layer.lora_B)
    if bool((B != 0).any()):
        raise CheckFailed(
            f"lora_B must start at zero, so the adapted layer starts exactly at the base layer; "
            f"got max |B| = {fmt(abs(B).max())}"
        )
    std, mean = A.std(), A.mean()
    kurtosis = ((A - mean) ** 4).mean() / std**4 - 3  # 0 for a Gaussian, -1.2 for uniform
    if not (abs(std * r - 1) < 0.15 and abs(mean) < 0.2 / r and kurtosis > -0.6):
        raise CheckFailed(
            f"lora_A should be Gaussian with std 1/r = {fmt(1 / r)}: got std {fmt(std)}, mean "
            f"{fmt(mean)}, excess kurtosis {kurtosis:.2f} (0 for a Gaussian, -1.2 for uniform)"
        )
    kaiming = LoRALinear(in_f, out_f, r=r, init_lora_weights="kaiming", dtype=f64)
    A = ctx.value(kaiming.lora_A)
    bound = 1 / math.sqrt(in_f)
    if abs(A).max() > bound or abs(A).max() < 0.8 * bound:
        raise CheckFailed(
            f"init_lora_weights='kaiming': lora_A should be uniform in ±1/√in = ±{fmt(bound)}; "
            f"got max |A| = {fmt(abs(A).max())}"
        )
    for use_rslora in (False, True):
        layer = LoRALinear(8, 8, r=r, lora_alpha=alpha, use_rslora=use_rslora)
        want = alpha / math.sqrt(r) if use_rslora else alpha / r
        if not math.isclose(getattr(layer, "scaling", math.nan), want):
            raise CheckFailed(
                f"LoRALinear(r={r}, lora_alpha={alpha}, use_rslora={use_rslora}).scaling = "
                f"{getattr(layer, 'scaling', None)}, expected {fmt(want)} (use lora_scaling)"
            )


def check_lora_init_hard_cases(ctx: Context) -> None:
    """r = 4 (std 1/r, not 1/√r), in ≠ out (kaiming's bound is 1/√in), dtypes followed."""
    LoRALinear, Generator = ctx.module("lora").LoRALinear, ctx.module("backend").Generator
    in_f, out_f, r = 1024, 16, 4
    for dtype in (f64, backend.float32):
        layer = LoRALinear(in_f, out_f, r=r, dtype=dtype, generator=Generator(FIXED_SEED))
        for name in ("lora_A", "lora_B"):
            got = getattr(layer, name, None)
            if not ctx.student.is_tensor(got) or got.dtype != layer.weight.dtype:
                raise CheckFailed(
                    f"LoRALinear(dtype={np.dtype(dtype).name}).{name} has dtype "
                    f"{getattr(got, 'dtype', None)}, expected the weight's, "
                    f"{np.dtype(dtype).name} (draw with dtype=self.weight.dtype)"
                )
        std = ctx.value(layer.lora_A).std()
        if abs(std * r - 1) > 0.1:
            raise CheckFailed(
                f"LoRALinear(r={r}).lora_A has std {fmt(std)}, expected 1/r = {fmt(1 / r)} "
                f"(PEFT's 'gaussian': N(0, (1/r)²), not 1/√r = {fmt(r**-0.5)})"
            )
    kaiming = LoRALinear(out_f, in_f, r=r, init_lora_weights="kaiming", dtype=f64)  # in 16
    A = ctx.value(kaiming.lora_A)
    if A.shape != (r, out_f) or abs(A).max() > 0.25 or abs(A).max() < 0.2:
        raise CheckFailed(
            f"LoRALinear({out_f}, {in_f}, r={r}, init_lora_weights='kaiming'): lora_A should be "
            f"({r}, {out_f}) uniform in ±1/√in_features = ±0.25, got shape {A.shape} and max "
            f"|A| = {fmt(abs(A).max())} (the fan-in is in_features, the weight's second axis)"
        )


def check_lora_scaling(ctx: Context) -> None:
    for _ in range(3):
        r, alpha = ctx.int(1, 64), ctx.int(1, 64) / 2
        for rs, want in ((False, alpha / r), (True, alpha / math.sqrt(r))):
            got = ctx.module("lora").lora_scaling(alpha, r, rs)
            if not math.isclose(got, want):
                raise CheckFailed(
                    f"lora_scaling({alpha}, r={r}, use_rslora={rs}) = {got}, expected "
                    f"{fmt(want)} ({'α/√r' if rs else 'α/r'})"
                )


SCALING_CASES = [(16, 4), (8, 16), (7, 49), (3, 1)]  # (α, r)


def check_lora_scaling_hard_cases(ctx: Context) -> None:
    for alpha, r in SCALING_CASES:
        for rs, want in ((False, alpha / r), (True, alpha / math.sqrt(r))):
            got = ctx.module("lora").lora_scaling(alpha, r, rs)
            if not math.isclose(got, want):
                raise CheckFailed(
                    f"lora_scaling({alpha}, r={r}, use_rslora={rs}) = {got}, expected "
                    f"{fmt(want)} ({'α/√r' if rs else 'α/r'})"
                )


def _lora_inputs(ctx: Context):
    lead = ctx.shape(1, 2)
    in_f, out_f, r = ctx.int(2, 5), ctx.int(2, 5), ctx.int(1, 2)
    return {
        "x": ctx.normal(*lead, in_f),
        "weight": ctx.normal(out_f, in_f),
        "bias": ctx.normal(out_f),
        "lora_A": ctx.normal(r, in_f),
        "lora_B": ctx.normal(out_f, r),  # non-zero, so every gradient path shows
    }, 0.5 + ctx.int(2, 4) / 2  # never 1: a forgotten scaling must show


def check_lora_forward(ctx: Context) -> None:
    Tensor = ctx.Tensor
    for separate in (False, True):
        inputs, s = _lora_inputs(ctx)
        x, W, b, A, B = inputs.values()
        d = ctx.normal(*x.shape) if separate else x
        got = ctx.F.lora_linear(
            *(Tensor(a) for a in inputs.values()), s, Tensor(d) if separate else None
        )
        want = x @ W.T + b + s * (d @ A.T) @ B.T
        what = f"lora_linear(x {x.shape}, r={A.shape[0]}, scaling={s}"
        expect_close(ctx, got, want, what + (", x_lora given)" if separate else ")"))


def _fixed_lora_inputs(ctx: Context):
    """x (2, 2, 3): three-dimensional; in 3, out 2, r 2; s = 2.5."""
    h = fixed(ctx)
    names = {"x": (2, 2, 3), "weight": (2, 3), "bias": (2,), "lora_A": (2, 3), "lora_B": (2, 2)}
    return h, {n: h.normal(*shape) for n, shape in names.items()}, 2.5


def _dora_np(x, W, b, A, B, m, s, d=None):
    """DoRA's output, (m / ‖W + s·B·A‖ per row) ⊙ (x Wᵀ + s·(d Aᵀ) Bᵀ) + b, and its norm."""
    d = x if d is None else d
    n = np.sqrt(((W + s * B @ A) ** 2).sum(axis=1))
    z = x @ W.T + s * (d @ A.T) @ B.T
    return z * (m / n) + (0 if b is None else b), z, n


def check_lora_forward_hard_cases(ctx: Context) -> None:
    Tensor = ctx.Tensor
    h, inputs, s = _fixed_lora_inputs(ctx)
    x, W, b, A, B = inputs.values()
    d = h.normal(*x.shape)
    with hint("x may have any number of leading axes; bias may be None; d = x_lora when given"):
        got = ctx.F.lora_linear(Tensor(x), Tensor(W), None, Tensor(A), Tensor(B), s)
        expect_close(ctx, got, x @ W.T + s * (x @ A.T) @ B.T, "lora_linear(x (2, 2, 3), bias None)")
        got = ctx.F.lora_linear(*(Tensor(a) for a in inputs.values()), s, Tensor(d))
        want = x @ W.T + b + s * (d @ A.T) @ B.T
        expect_close(ctx, got, want, "lora_linear(x (2, 2, 3), x_lora given)")
    m = 1.0 + 0.1 * h.normal(2)
    dora = ctx.module("variants.dora").dora_linear
    with hint("DoRA runs your LoRALinearFunction.forward with bias None and x_lora"):
        got = dora(*(Tensor(a) for a in (x, W, b, A, B, m)), s, Tensor(d))
        expect_close(
            ctx, got, _dora_np(x, W, b, A, B, m, s, d)[0], "dora_linear(x (2, 2, 3), x_lora given)"
        )


def check_lora_backward(ctx: Context) -> None:
    inputs, s = _lora_inputs(ctx)
    shape = inputs["x"].shape

    def fn(x, w, b, A, B, d=None):
        return ctx.F.lora_linear(x, w, b, A, B, s, d)

    expect_grads(ctx, f"lora_linear(x {shape}), frozen weight", fn, inputs, frozen=["weight"])
    expect_grads(ctx, f"lora_linear(x {shape}), all trainable", fn, inputs)
    with_d = {**inputs, "x_lora": ctx.normal(*shape)}
    expect_grads(
        ctx, f"lora_linear(x {shape}, x_lora given)", fn, with_d, frozen=["weight", "bias"]
    )
    node = ctx.F.LoRALinearFunction(s)
    x, w, b, A, B = (ctx.Tensor(a, requires_grad=n != "weight") for n, a in inputs.items())
    out = node(x, w, b, A, B, None)
    grads = node.backward(ctx.normal(*out.shape))
    if grads[1] is not None:
        raise CheckFailed(
            "LoRALinearFunction.backward computed dW for the frozen weight "
            "(needs_input_grad[1] is False): never computing it is LoRA's saving"
        )


def check_lora_backward_hard_cases(ctx: Context) -> None:
    h, inputs, s = _fixed_lora_inputs(ctx)
    F = ctx.F

    def fn(x, w, b, A, B, d=None):
        return F.lora_linear(x, w, b, A, B, s, d)

    with hint("flatten the leading axes to N rows: db = Σ over all N rows of g, (out,)"):
        expect_grads(h, "lora_linear(x (2, 2, 3)), frozen weight", fn, inputs, frozen=["weight"])
    no_bias = {n: a for n, a in inputs.items() if n != "bias"}
    with hint("bias may be None: no db then"):
        expect_grads(
            h,
            "lora_linear(x (2, 2, 3), bias None)",
            lambda x, w, A, B: fn(x, w, None, A, B),
            no_bias,
            frozen=["weight"],
        )
    with_d = {**inputs, "x_lora": h.normal(2, 2, 3)}
    with hint("with x_lora given, dx = g W only, and dx_lora = s·(g B) A"):
        expect_grads(h, "lora_linear(x (2, 2, 3), x_lora given)", fn, with_d, frozen=["weight"])
    _dora_backward_case(ctx, h, inputs, s)


def _dora_backward_case(ctx: Context, h: Context, inputs: dict, s: float) -> None:
    """DoRA's backward runs yours with upstream g ⊙ (m/n): dA, dB against the formulas
    (n is detached, so central differences would not match them), dx by differences."""
    Tensor, dora = ctx.Tensor, ctx.module("variants.dora").dora_linear
    x, W, b, A, B = inputs.values()
    m = 1.0 + 0.1 * h.normal(2)
    tA, tB = Tensor(A.copy(), requires_grad=True), Tensor(B.copy(), requires_grad=True)
    out = dora(Tensor(x), Tensor(W), Tensor(b), tA, tB, Tensor(m), s)
    g = h.normal(2, 2, 2).reshape(-1, 2)
    out.backward(g.reshape(2, 2, 2))
    _, _, n = _dora_np(x, W, b, A, B, m, s)
    gz, x2 = g * (m / n), x.reshape(-1, 3)
    with hint("DoRA runs your LoRALinearFunction.backward on upstream g·(m/n), bias None"):
        expect_close(ctx, tA.grad, s * (gz @ B).T @ x2, "dora_linear's dlora_A (x (2, 2, 3))")
        expect_close(ctx, tB.grad, s * gz.T @ (x2 @ A.T), "dora_linear's dlora_B (x (2, 2, 3))")
        expect_grads(
            h,
            "dora_linear(x (2, 2, 3)), x and magnitude trainable",
            lambda x, w, b, A, B, m: dora(x, w, b, A, B, m, s),
            {**inputs, "magnitude": m},
            frozen=["weight", "bias", "lora_A", "lora_B"],
        )


def _lora_layer(ctx: Context):
    in_f, out_f, r = ctx.int(3, 6), ctx.int(3, 6), ctx.int(1, 3)
    alpha = ctx.int(1, 8) + 0.5  # never equal to r: a forgotten scaling must show
    layer = ctx.module("lora").LoRALinear(in_f, out_f, r=r, lora_alpha=alpha, dtype=f64)
    layer.lora_B.data = ctx.normal(out_f, r)  # as after training
    layer.eval()
    return layer, in_f


def check_lora_merge(ctx: Context) -> None:
    layer, in_f = _lora_layer(ctx)
    x = ctx.Tensor(ctx.normal(ctx.int(1, 4), in_f))
    W0 = ctx.value(layer.weight)
    delta = layer.scaling * ctx.value(layer.lora_B) @ ctx.value(layer.lora_A)
    expect_close(ctx, layer.get_delta_weight(), delta, "get_delta_weight() (s·B·A)")
    before = ctx.value(layer(x))
    layer.merge()
    if not layer.merged:
        raise CheckFailed("after merge(), layer.merged should be True")
    expect_close(ctx, layer.weight, W0 + delta, "the weight after merge() (W0 + s·B·A)")
    expect_close(ctx, layer(x), before, "the merged layer's output (the unmerged output)")
    layer.unmerge()
    if layer.merged:
        raise CheckFailed("after unmerge(), layer.merged should be False")
    expect_close(ctx, layer.weight, W0, "the weight after merge() then unmerge() (W0)")


def check_lora_merge_hard_cases(ctx: Context) -> None:
    """Repeated calls (unmerge twice, merge again), and DoRA's merge, which adds your
    get_delta_weight and whose unmerge ends in yours."""
    h, lora = fixed(ctx), ctx.module("lora")
    dora = ctx.module("variants.dora")
    for name, is_dora in (("LoRALinear", False), ("DoRALinear", True)):
        layer = (dora.DoRALinear if is_dora else lora.LoRALinear)(
            4,
            3,
            r=2,
            lora_alpha=5,
            dtype=f64,
            generator=ctx.module("backend").Generator(FIXED_SEED),
        )
        layer.lora_B.data = h.normal(3, 2)  # as after training
        if is_dora:
            layer.lora_magnitude_vector.data = 1.0 + 0.1 * h.normal(3)
        layer.eval()
        W0 = ctx.value(layer.weight)
        merged = W0 + 2.5 * ctx.value(layer.lora_B) @ ctx.value(layer.lora_A)
        if is_dora:
            norm = np.sqrt((merged**2).sum(axis=1))
            merged = merged * (ctx.value(layer.lora_magnitude_vector) / norm)[:, None]
        x = ctx.Tensor(h.normal(2, 4))
        before = ctx.value(layer(x))
        for attempt in (1, 2):
            layer.merge()
            with hint(f"{name}.merge() adds get_delta_weight() = s·B·A (s = α/r = 2.5)"):
                expect_close(
                    ctx, layer.weight, merged, f"{name}: the weight after merge (round {attempt})"
                )
                expect_close(
                    ctx, layer(x), before, f"{name}: the merged layer's output (round {attempt})"
                )
            for call in ("unmerge()", "a second unmerge()"):
                layer.unmerge()
                with hint(
                    "unmerge subtracts s·B·A once and sets merged = False; when not merged, nothing"
                ):
                    if layer.merged:
                        raise CheckFailed(f"{name}: after {call}, layer.merged should be False")
                    expect_close(
                        ctx, layer.weight, W0, f"{name}: the weight after merge then {call} (W0)"
                    )


def _expected_trainable(name: str, bias: str, adapted: set) -> bool:
    leaf, owner = name.rsplit(".", 1)[-1], name.rpartition(".")[0]
    if lora.is_lora_parameter(name):  # lora_A, lora_B, and the variants' lora_*
        return True
    return leaf == "bias" and (bias == "all" or (bias == "lora_only" and owner in adapted))


def _lora_config(ctx: Context):
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    targets = [n for n in names if ctx.int(0, 1)] or ["q_proj"]
    bias = lora.BIAS_MODES[ctx.int(0, 2)]
    LoRAConfig = ctx.module("lora").LoRAConfig
    return LoRAConfig(r=ctx.int(1, 2), lora_alpha=4, target_modules=targets, bias=bias)


def check_apply_lora(ctx: Context) -> None:
    _apply_lora_case(ctx, _tiny_gpt(ctx), _lora_config(ctx))


def _apply_lora_case(ctx: Context, gpt, config) -> None:
    """The adapted layers, the weights shared, what trains, each layer's r and scaling,
    and the logits unchanged."""
    idx = ctx.ids(gpt.config.vocab_size, 2, gpt.config.block_size)
    before = ctx.value(gpt(idx)[0])
    weights = {n: p for n, p in gpt.named_parameters()}
    ctx.module("lora").apply_lora(gpt, config)
    adapted = {p for p, _ in ctx.module("lora").adapted_layers(gpt)}
    want = {p for p, m in gpt.named_modules() if lora.is_target(config.target_modules, p)}
    if adapted != want:
        raise CheckFailed(
            f"apply_lora(target_modules={config.target_modules}) adapted {sorted(adapted)}, "
            f"expected {sorted(want)}"
        )
    for path in adapted:
        layer, own = gpt.get_submodule(path), config.for_module(path)
        if not ctx.student.same(layer.weight, weights[f"{path}.weight"]):
            raise CheckFailed(
                f"{path}: the LoRA layer must keep the base weight object, not a copy"
            )
        if (layer.r, layer.scaling) != (own.r, own.scaling):
            raise CheckFailed(
                f"{path} has r={layer.r}, scaling={layer.scaling}, expected r={own.r}, "
                f"scaling={own.scaling}: each layer takes config.for_module(path) "
                "(rank_pattern and alpha_pattern)"
            )
        if config.use_dora and not hasattr(layer, "lora_magnitude_vector"):
            raise CheckFailed(
                f"use_dora=True, but {path} is a layer without a magnitude (no DoRA): "
                "wrap each layer with lora.LORA_LAYERS[type(base)] (DoRA's, an Embedding's)"
            )
    for name, p in gpt.named_parameters():
        if p.requires_grad != _expected_trainable(name, config.bias, adapted):
            state = "trainable" if p.requires_grad else "frozen"
            raise CheckFailed(
                f"after apply_lora(bias={config.bias!r}), {name} is {state}; only the adapters' "
                "lora_* parameters (lora_A, lora_B, a variant's) and the biases the bias mode "
                "names should train"
            )
    expect_close(ctx, gpt(idx)[0], before, "logits right after apply_lora (B = 0: the base's)")


HARD_CONFIGS = [  # every bias mode; rank and alpha patterns; DoRA; an embedding adapter
    {"target_modules": ["q_proj", "fc1"], "bias": "lora_only", "rank_pattern": {"fc1": 1}},
    {"target_modules": ["k_proj", "o_proj"], "bias": "all", "alpha_pattern": {"o_proj": 3}},
    {"target_modules": ["v_proj", "fc2"], "bias": "none", "use_dora": True},
    {"target_modules": ["tok_emb", "q_proj"], "bias": "none"},
]


def _hard_lora_configs(ctx: Context):
    LoRAConfig = ctx.module("lora").LoRAConfig
    return [LoRAConfig(r=2, lora_alpha=5, **settings) for settings in HARD_CONFIGS]


def check_apply_lora_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    for settings, config in zip(HARD_CONFIGS, _hard_lora_configs(ctx), strict=True):
        with hint(
            f"with {settings}: each layer from lora.LORA_LAYERS[type(base)] with "
            "config.for_module(path); every lora_* parameter trains, and the biases the bias "
            "mode names"
        ):
            _apply_lora_case(h, _tiny_gpt(h), config)


def check_trainable_count(ctx: Context) -> None:
    gpt = _tiny_gpt(ctx)
    config = _lora_config(ctx)
    ctx.module("lora").apply_lora(gpt, config)
    params = gpt.parameters()
    want = (sum(p.size for p in params if p.requires_grad), sum(p.size for p in params))
    got = ctx.module("lora").count_parameters(gpt)
    if tuple(got) != want:
        raise CheckFailed(
            f"count_parameters() = {tuple(got)}, expected (trainable, all) = {want}; frozen "
            "parameters (requires_grad=False) do not count as trainable"
        )
    counted = sum(p.size for n, p in gpt.named_parameters() if ".lora_" in n)
    closed = ctx.module("study.accounting").lora_params(gpt.config, config)
    if closed != counted:
        raise CheckFailed(
            f"accounting.lora_params = {closed} for r={config.r}, targets "
            f"{config.target_modules}, but the model has {counted} adapter parameters: "
            "r·(in + out) per adapted layer"
        )


def check_trainable_count_hard_cases(ctx: Context) -> None:
    h = fixed(ctx)
    for settings, config in zip(HARD_CONFIGS, _hard_lora_configs(ctx), strict=True):
        gpt = _tiny_gpt(h, n_embd=4)
        ctx.module("lora").apply_lora(gpt, config)
        params = gpt.parameters()
        want = (sum(p.size for p in params if p.requires_grad), sum(p.size for p in params))
        got = ctx.module("lora").count_parameters(gpt)
        if tuple(got) != want:
            raise CheckFailed(
                f"count_parameters() = {tuple(got)} after apply_lora with {settings}, expected "
                f"(trainable, all) = {want}: only requires_grad parameters are trainable, "
                "and all counts the adapters too"
            )
    LoRAConfig, lora_params = (
        ctx.module("lora").LoRAConfig,
        ctx.module("study.accounting").lora_params,
    )
    for targets in (["fc1"], ["fc2", "q_proj"]):  # in ≠ out: fc1 (4C, C), fc2 (C, 4C)
        gpt = _tiny_gpt(h, n_embd=4)
        config = LoRAConfig(r=3, lora_alpha=4, target_modules=targets)
        ctx.module("lora").apply_lora(gpt, config)
        counted = sum(p.size for n, p in gpt.named_parameters() if ".lora_" in n)
        closed = lora_params(gpt.config, config)
        if closed != counted:
            raise CheckFailed(
                f"accounting.lora_params = {closed} for r=3, targets {targets}, but the model "
                f"has {counted} adapter parameters: r·(in + out) per adapted layer, with "
                "fc1's in = C and out = 4C"
            )


# ======================================================================================
# a4: fine-tuning
# ======================================================================================


def check_adamw(ctx: Context) -> None:
    shapes = [ctx.shape(1, 2) for _ in range(3)]
    params = [ctx.Tensor(ctx.normal(*s), requires_grad=True) for s in shapes]
    frozen = params[2].requires_grad_(False)
    lr, wd, (b1, b2), eps = 0.01 * ctx.int(1, 5), 0.1 * ctx.int(0, 2), (0.9, 0.99), 1e-8
    opt = ctx.module("optim").AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    start = [ctx.value(p) for p in params]
    want, m, v = start[:2], [0.0, 0.0], [0.0, 0.0]
    for t in range(1, 4):
        grads = [ctx.normal(*s) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # the frozen one too: a stale gradient from before it was frozen
        opt.step()
        for i in range(2):  # torch.optim.AdamW, written out
            want[i] = want[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * grads[i]
            v[i] = b2 * v[i] + (1 - b2) * grads[i] ** 2
            mhat, vhat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            want[i] = want[i] - lr * mhat / (vhat**0.5 + eps)
        for i in range(2):
            expect_close(ctx, params[i], want[i], f"parameter {i} after step {t}", rtol=1e-6)
    if ctx.student.id(frozen) in opt.state or bool((ctx.value(frozen) != start[2]).any()):
        raise CheckFailed(
            "AdamW changed a frozen parameter (requires_grad=False) or kept state for it; "
            "frozen parameters get no update, no weight decay and no moments"
        )
    nbytes = sum(2 * ctx.value(p).nbytes for p in params[:2])
    if opt.state_nbytes() != nbytes:
        raise CheckFailed(
            f"AdamW's state holds {opt.state_nbytes()} bytes, expected {nbytes} (two moments "
            "per trainable parameter)"
        )


def _adamw_np(w, g, m, v, t, lr, weight_decay, b1=0.9, b2=0.99, eps=1e-8):
    """One torch.optim.AdamW step of one parameter, written out: (w, m, v) after it."""
    w = w * (1 - lr * weight_decay)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    return w - lr * mhat / (vhat**0.5 + eps), m, v


# each parameter: its group (lr, weight decay), its shape, the steps it has a gradient in,
# and its gradients' scale (1e-5: √v̂ is near eps there, so where eps goes shows)
ADAMW_PARAMS = {
    "p0": (0, (2, 3), (1, 2, 3), 1.0),
    "small_grads": (0, (3,), (1, 2, 3), 1e-5),
    "no_grad_until_step_3": (0, (2,), (3,), 1.0),
    "group_1": (1, (2, 2), (1, 2, 3), 1.0),
}
ADAMW_HINTS = {  # what each parameter shows, after the update every one shares
    "p0": "bias-corrected moments m̂ = m/(1-β1^t), v̂ = v/(1-β2^t)",
    "small_grads": "m̂/(√v̂ + eps): eps outside the square root",
    "no_grad_until_step_3": (
        "a parameter without a gradient is skipped (no decay, no state), and its own step "
        "count t starts at its first gradient"
    ),
    "group_1": "each group's own lr and weight_decay",
}
ADAMW_GROUPS = [{"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.05, "weight_decay": 0.3}]


def check_adamw_hard_cases(ctx: Context) -> None:
    """Two parameter groups (their own lr and weight decay), a parameter without a gradient
    for two steps (no decay, no state, its own step count), tiny gradients, a frozen one."""
    h, Tensor = fixed(ctx), ctx.Tensor
    params = {n: Tensor(h.normal(*spec[1]), requires_grad=True) for n, spec in ADAMW_PARAMS.items()}
    frozen = Tensor(h.normal(2), requires_grad=False)
    groups = [
        {**settings, "params": [p for n, p in params.items() if ADAMW_PARAMS[n][0] == i]}
        for i, settings in enumerate(ADAMW_GROUPS)
    ]
    groups[1]["params"].append(frozen)
    opt = ctx.module("optim").AdamW(groups, betas=(0.9, 0.99), eps=1e-8)
    want = {n: [ctx.value(p), 0.0, 0.0, 0] for n, p in params.items()}  # w, m, v, t
    frozen_start = ctx.value(frozen)
    for step in (1, 2, 3):
        frozen.grad = h.normal(2)  # a stale gradient from before it was frozen
        for name, (group, shape, steps, scale) in ADAMW_PARAMS.items():
            params[name].grad = None
            if step in steps:
                g = scale * h.normal(*shape)
                params[name].grad = g
                w, m, v, t = want[name]
                want[name] = [*_adamw_np(w, g, m, v, t + 1, **ADAMW_GROUPS[group]), t + 1]
        opt.step()
        for name, (group, *_) in ADAMW_PARAMS.items():
            settings = ", ".join(f"{k} {v}" for k, v in ADAMW_GROUPS[group].items())
            with hint(f"weight decay decoupled, p·(1 - lr·wd), first; {ADAMW_HINTS[name]}"):
                expect_close(
                    ctx,
                    params[name],
                    want[name][0],
                    f"AdamW: parameter {name} (group {group}: {settings}) after step {step}",
                    rtol=1e-6,
                )
    if ctx.student.id(frozen) in opt.state or bool((ctx.value(frozen) != frozen_start).any()):
        raise CheckFailed(
            "AdamW changed a frozen parameter (requires_grad=False, with a stale .grad) or kept "
            "state for it; frozen parameters get no update, no weight decay and no moments"
        )
    nbytes = sum(2 * ctx.value(p).nbytes for p in params.values())
    if opt.state_nbytes() != nbytes:
        raise CheckFailed(
            f"AdamW's state holds {opt.state_nbytes()} bytes, expected {nbytes} (two moments "
            "per parameter that has had a gradient)"
        )


FINETUNE = {"steps": 160, "batch_size": 32, "r": 4, "lr": 1e-2, "accuracy": 0.6, "examples": 256}


def check_finetune(ctx: Context) -> None:
    demo = ctx.module("experiments.demo")
    base = demo.load_base("cpu")
    settings = demo.DemoSettings(
        steps=FINETUNE["steps"],
        batch_size=FINETUNE["batch_size"],
        lr_lora=FINETUNE["lr"],
        seed=ctx.int(0, 2**20),
    )
    tuned, opt, _, _ = demo.fine_tune_on_digit_task(
        base, "lora", settings, FINETUNE["r"], progress=False
    )
    x, y = DigitTasks((DOWNSTREAM_TASK,)).eval_set(seed=2024, n=FINETUNE["examples"])
    tuned.eval()
    accuracy = exact_match(ctx.value(tuned(x)[0]), y)  # the student's logits, judged here
    if accuracy < FINETUNE["accuracy"]:
        raise CheckFailed(
            f"a rank-{FINETUNE['r']} LoRA fine-tune of {FINETUNE['steps']} steps reached "
            f"{accuracy:.1%} on {FINETUNE['examples']} held-out examples, below the "
            f"{FINETUNE['accuracy']:.0%} required: check AdamW's update (bias correction, "
            "the learning rate, the sign)"
        )


CHECKS: dict[str, list[Callable[[Context], None]]] = {
    "a1.1": [check_unbroadcast_hard_cases, check_unbroadcast],
    "a1.2": [check_add_mul_hard_cases, check_add_mul],
    "a1.3": [check_matmul_hard_cases, check_matmul],
    "a1.4": [check_sum_mean_hard_cases, check_sum_mean],
    "a1.5": [check_softmax_hard_cases, check_softmax],
    "a1.6": [check_log_softmax_cross_entropy_hard_cases, check_log_softmax_cross_entropy],
    "a1.7": [check_layer_norm_hard_cases, check_layer_norm],
    "a1.8": [check_gelu_hard_cases, check_gelu],
    "a1.9": [check_embedding_hard_cases, check_embedding],
    "a1.10": [check_accumulation_hard_cases, check_accumulation],
    "a2.1": [check_attention_forward_hard_cases, check_attention_forward],
    "a2.2": [check_attention_backward_hard_cases, check_attention_backward],
    "a2.3": [check_gpt_forward_hard_cases, check_gpt_forward],
    "a3.1": [check_lora_init_hard_cases, check_lora_init],
    "a3.2": [check_lora_scaling_hard_cases, check_lora_scaling],
    "a3.3": [check_lora_forward_hard_cases, check_lora_forward],
    "a3.4": [check_lora_backward_hard_cases, check_lora_backward],
    "a3.5": [check_lora_merge_hard_cases, check_lora_merge],
    "a3.6": [check_apply_lora_hard_cases, check_apply_lora],
    "a3.7": [check_trainable_count_hard_cases, check_trainable_count],
    "a4.1": [check_adamw_hard_cases, check_adamw],
    "a4.2": [check_finetune],
}
