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


def expect_close(
    ctx: Context, got, want, what: str, rtol: float = 1e-7, atol: float = 1e-10
) -> None:
    """``got`` (a student's tensor or array) equals ``want`` to rounding, or a message
    naming the entry."""
    got, want = np.asarray(ctx.value(got)), np.asarray(want)
    if tuple(got.shape) != tuple(want.shape):
        raise CheckFailed(f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not bool(np.isfinite(got).all()):
        where = np.unravel_index(int((~np.isfinite(got)).argmax()), got.shape)
        raise CheckFailed(f"{what} is {got[where]} at index {where}, expected {fmt(want[where])}")
    err = abs(got - want)
    allowed = atol + rtol * abs(want)
    if (err > allowed).any():
        where = np.unravel_index(int((err - allowed).argmax()), got.shape)
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
            where = np.unravel_index(int((err - allowed).argmax()), analytic.shape)
            rel = err[where] / max(abs(numeric[where]), 1e-300)
            raise CheckFailed(
                f"{op}: d{name} (shape {analytic.shape}) is wrong at index {where}: analytic "
                f"{analytic[where]:.8g}, numerical (central difference) {numeric[where]:.8g}; "
                f"{int((err > allowed).sum())} of {analytic.size} elements disagree; "
                f"relative error {rel:.2g}."
            )


def _softmax_np(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ======================================================================================
# a1: autograd
# ======================================================================================


def check_unbroadcast(ctx: Context) -> None:
    for _ in range(4):
        full = ctx.shape(1, 4)
        shape = ctx.reduced(full)
        g = ctx.normal(*full)
        # each entry of the input receives every entry of g it was broadcast to
        want = np.zeros(shape, dtype=f64)
        for j in range(want.size):
            onehot = np.zeros(shape, dtype=f64)
            onehot.reshape(-1)[j] = 1.0
            want.reshape(-1)[j] = (np.broadcast_to(onehot, full) * g).sum()
        got = ctx.F.unbroadcast(g, shape)
        expect_close(ctx, got, want, f"unbroadcast(g of shape {full}, {shape})")


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


def check_matmul(ctx: Context) -> None:
    m, k, n = ctx.int(1, 4), ctx.int(1, 4), ctx.int(1, 4)
    for sa, sb in [((m, k), (k, n)), ((ctx.int(2, 3), m, k), (k, n)), ((2, m, k), (2, k, n))]:
        a, b = ctx.normal(*sa), ctx.normal(*sb)
        expect_grads(ctx, f"matmul of shapes {sa} and {sb}", ctx.F.matmul, {"a": a, "b": b})


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


def check_layer_norm(ctx: Context) -> None:
    F, Tensor = ctx.F, ctx.Tensor
    for _ in range(2):
        shape = (*ctx.shape(0, 2), ctx.int(3, 6))  # C ≥ 3: no row with a tiny variance
        x = ctx.normal(*shape, scale=2.0) + ctx.normal(1)
        w, b = 1.0 + 0.5 * ctx.normal(shape[-1]), ctx.normal(shape[-1])
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # biased, as PyTorch's
        want = (x - mu) / np.sqrt(var + 1e-5) * w + b
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


def check_gelu(ctx: Context) -> None:
    shape = ctx.shape(1, 3)
    expect_grads(ctx, f"gelu(shape {shape})", ctx.F.gelu, {"x": ctx.normal(*shape, scale=2.0)})


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
    F, Tensor = ctx.F, ctx.Tensor
    shape, (q, k, v) = _qkv(ctx)
    y = F.causal_self_attention(Tensor(q), Tensor(k), Tensor(v))
    later = k.copy(), v.copy()
    later[0][:, :, -1] += 5.0
    later[1][:, :, -1] += 5.0
    y2 = F.causal_self_attention(Tensor(q), Tensor(later[0]), Tensor(later[1]))
    T = shape[2]
    moved = abs(ctx.value(y2) - ctx.value(y))[:, :, : T - 1].max()
    if moved > 1e-12:
        raise CheckFailed(
            f"causal_self_attention: changing the key and value at the last position {T - 1} "
            f"changed the output at earlier positions (by up to {moved:.3g}); every key after "
            "a query's position must be masked (np.triu(ones, k=1))"
        )
    expect_close(ctx, y, _attention_np(q, k, v), f"causal_self_attention(shape {shape})")


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


def _tiny_gpt(ctx: Context, dtype=f64):
    config = ctx.module("model").GPTConfig(
        vocab_size=ctx.int(5, 9),
        block_size=ctx.int(3, 5),
        n_layer=ctx.int(1, 2),
        n_head=2,
        n_embd=2 * ctx.int(2, 3),
    )
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
    logits, loss = gpt(idx, targets)
    x = gpt.tok_emb(idx) + gpt.pos_emb(np.arange(T))
    for block in gpt.blocks:
        x = block(x)
    want = ctx.value(gpt.lm_head(gpt.ln_f(x)))
    expect_close(ctx, logits, want, f"GPT logits (B={B}, T={T})")
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


def _expected_trainable(name: str, bias: str, adapted: set) -> bool:
    leaf, owner = name.rsplit(".", 1)[-1], name.rpartition(".")[0]
    if leaf in ("lora_A", "lora_B"):
        return True
    return leaf == "bias" and (bias == "all" or (bias == "lora_only" and owner in adapted))


def _lora_config(ctx: Context):
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    targets = [n for n in names if ctx.int(0, 1)] or ["q_proj"]
    bias = lora.BIAS_MODES[ctx.int(0, 2)]
    LoRAConfig = ctx.module("lora").LoRAConfig
    return LoRAConfig(r=ctx.int(1, 2), lora_alpha=4, target_modules=targets, bias=bias)


def check_apply_lora(ctx: Context) -> None:
    gpt = _tiny_gpt(ctx)
    idx = ctx.ids(gpt.config.vocab_size, 2, gpt.config.block_size)
    before = ctx.value(gpt(idx)[0])
    weights = {n: p for n, p in gpt.named_parameters()}
    config = _lora_config(ctx)
    ctx.module("lora").apply_lora(gpt, config)
    adapted = {p for p, _ in ctx.module("lora").lora_layers(gpt)}
    want = {p for p, m in gpt.named_modules() if lora.is_target(config.target_modules, p)}
    if adapted != want:
        raise CheckFailed(
            f"apply_lora(target_modules={config.target_modules}) adapted {sorted(adapted)}, "
            f"expected {sorted(want)}"
        )
    for path in adapted:
        if not ctx.student.same(gpt.get_submodule(path).weight, weights[f"{path}.weight"]):
            raise CheckFailed(
                f"{path}: the LoRA layer must keep the base weight object, not a copy"
            )
    for name, p in gpt.named_parameters():
        if p.requires_grad != _expected_trainable(name, config.bias, adapted):
            state = "trainable" if p.requires_grad else "frozen"
            raise CheckFailed(
                f"after apply_lora(bias={config.bias!r}), {name} is {state}; only lora_A, "
                "lora_B and the biases the bias mode names should train"
            )
    expect_close(ctx, gpt(idx)[0], before, "logits right after apply_lora (B = 0: the base's)")


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
    "a1.1": [check_unbroadcast],
    "a1.2": [check_add_mul],
    "a1.3": [check_matmul],
    "a1.4": [check_sum_mean],
    "a1.5": [check_softmax],
    "a1.6": [check_log_softmax_cross_entropy],
    "a1.7": [check_layer_norm],
    "a1.8": [check_gelu],
    "a1.9": [check_embedding],
    "a1.10": [check_accumulation],
    "a2.1": [check_attention_forward],
    "a2.2": [check_attention_backward],
    "a2.3": [check_gpt_forward],
    "a3.1": [check_lora_init],
    "a3.2": [check_lora_scaling],
    "a3.3": [check_lora_forward],
    "a3.4": [check_lora_backward],
    "a3.5": [check_lora_merge],
    "a3.6": [check_apply_lora],
    "a3.7": [check_trainable_count],
    "a4.1": [check_adamw],
    "a4.2": [check_finetune],
}
