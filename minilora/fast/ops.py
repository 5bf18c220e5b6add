"""The fast path: faster versions of a few hot ops, each proven equal to its reference op.

``functional.py`` is the truth and the lesson; this file exists only for speed. Each class
here computes exactly what the reference op of the same name computes (tests/test_fast.py
checks values to float32 rounding and gradients on random shapes), with the tricks a C or
CUDA kernel gets for free and NumPy does not:

* **loop fusion by blocks**: NumPy makes one pass over the whole array per operation, and
  once an array is larger than the core's cache every pass is paid in memory traffic. An
  op with many elementwise steps (GELU has about fifteen) runs them block by block
  (:func:`_blocks`), all steps on 64K elements that stay in cache, then the next block;
* **in place**: formulas built in one buffer, without a temporary per operation;
* **work moved to where it is cheapest**: GELU computes dy/dx in its forward, while
  tanh(u) is at hand, and saves only that (one array instead of two);
* **a cheaper maximum**: ``np.fmax.reduce`` finds the row maxima for softmax several
  times faster than ``max``, which propagates NaN element by element (both give NaN for
  a row that holds NaN, once through the softmax);
* **a cached causal mask** of 0 and -inf, added to the scores (faster than assigning
  -inf through a boolean index);
* **less work and memory by blocks**: causal attention takes the queries 64 rows at a
  time against their key prefix, never computing the future above the diagonal blocks,
  and, beyond one block of rows, keeps a log-sum-exp per row instead of the T×T
  probabilities (recomputed in the backward).

Importing minilora registers these classes in ``backend.FAST_OPS``; they run unless
``MINILORA_OPS=reference`` or ``minilora.set_ops("reference")``. Measurements of what
each trick buys: docs/performance.md. The process settings for speed that the ``minilora``
command and the benchmarks apply (BLAS threads, the allocator) are in process.py beside it.
"""

from __future__ import annotations

import math

from minilora import backend
from minilora import functional as F

mm = backend.matmul

# 64K elements: 256 KiB of float32, which stays in a core's cache (docs/performance.md)
_BLOCK_ELEMENTS = 65536


def _blocks(a) -> list:
    """Slices of ``a``'s first axis, each holding about _BLOCK_ELEMENTS elements (all of
    ``a`` in one slice on a GPU, where each step is already one kernel over everything)."""
    n = a.shape[0]
    per_row = a.size // n if n else 1
    step = n if backend.device_of(a) == "cuda" else _BLOCK_ELEMENTS // per_row
    step = step or 1
    return [slice(i, i + step) for i in range(0, n, step)]


def _max_keepdims(x, axis: int):
    """``x.max(axis=axis, keepdims=True)``, with NumPy's faster ``fmax.reduce`` on the CPU."""
    if backend.device_of(x) == "cpu":
        return backend.get_array_module(x).fmax.reduce(x, axis=axis, keepdims=True)
    return x.max(axis=axis, keepdims=True)


def _softmax_(x, axis: int):
    """Softmax along ``axis`` computed in x's own buffer (x is overwritten and returned)."""
    xp = backend.get_array_module(x)
    x -= _max_keepdims(x, axis)
    xp.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


class GELUFunction(F.GELUFunction):
    """``functional.GELUFunction``, blocked and in place; saves dy/dx instead of x."""

    def forward(self, x):
        F.require_float("gelu", "input", x)
        xp = backend.get_array_module(x)
        flat = x.reshape(-1)
        y = xp.empty_like(flat)
        d = xp.empty_like(flat) if self.needs_input_grad[0] else None
        for b in _blocks(flat):
            _gelu_block(xp, flat[b], y[b], None if d is None else d[b])
        if d is not None:
            self.dydx = d.reshape(x.shape)
        return y.reshape(x.shape)

    def backward(self, g):
        return (g * self.dydx,)


def _gelu_block(xp, x, y, d) -> None:
    """GELU of one block: y = ½ x (1 + t) and, unless d is None, d = dy/dx, in place."""
    t = x * x
    t *= x  # x³ (x*x*x: pow is slow)
    t *= 0.044715
    t += x
    t *= F.GELU_C  # u = c (x + 0.044715 x³)
    xp.tanh(t, out=t)  # t = tanh(u)
    y[...] = t
    y += 1.0
    y *= x
    y *= 0.5  # y = ½ x (1 + t)
    if d is not None:
        du = x * (3 * 0.044715)
        du *= x
        du += 1.0
        du *= F.GELU_C  # du/dx = c (1 + 3·0.044715 x²)
        h = 0.5 * x
        h *= 1.0 - t * t
        h *= du  # ½ x (1 - t²) du/dx
        t += 1.0
        t *= 0.5
        h += t  # ½ (1 + t) + ½ x (1 - t²) du/dx
        d[...] = h


def _mean_last(x):
    """``x.mean(axis=-1, keepdims=True)``: the same sum divided by the count, without mean's
    Python-level bookkeeping (a tenth of a small forward's time)."""
    return x.sum(axis=-1, keepdims=True) / x.shape[-1]


class LayerNormFunction(F.LayerNormFunction):
    """``functional.LayerNormFunction`` with x̂ and dx built in place (3 temporaries, not 5)."""

    def forward(self, x, weight, bias):
        F.check_layer_norm_inputs(x, weight, bias)
        xp = backend.get_array_module(x)
        self.dtype = x.dtype
        x, weight, bias = F.float32_if_half(x, weight, bias)  # float16 in float32
        xhat = x - _mean_last(x)  # x - μ, (..., C)
        var = _mean_last(xhat * xhat)
        self.rstd = 1.0 / xp.sqrt(var + self.eps)  # (..., 1)
        xhat *= self.rstd  # x̂ = (x - μ)·rstd, in the same buffer
        self.xhat, self.weight = xhat, weight
        if weight is None:
            return F.rounded_to(self.dtype, xhat if bias is None else xhat + bias)
        y = xhat * weight
        if bias is not None:
            y += bias
        return F.rounded_to(self.dtype, y)

    def backward(self, g):
        need_x, need_w, need_b = self.needs_input_grad
        xhat, rstd, g = self.xhat, self.rstd, F.float32_if_half(g)
        lead = tuple(range(g.ndim - 1))
        dw = (g * xhat).sum(axis=lead) if need_w else None
        db = g.sum(axis=lead) if need_b else None
        dx = None
        if need_x:
            gh = g if self.weight is None else g * self.weight  # ĝ = dL/dx̂
            dx = gh - gh.mean(axis=-1, keepdims=True)
            dx -= xhat * (gh * xhat).mean(axis=-1, keepdims=True)
            dx *= rstd
        return F.rounded_to(self.dtype, dx, dw, db)


class SoftmaxCrossEntropyFunction(F.SoftmaxCrossEntropyFunction):
    """``functional.SoftmaxCrossEntropyFunction`` keeping softmax(logits) built in place."""

    def forward(self, logits, targets):
        F.check_cross_entropy_inputs(logits, targets)
        xp = backend.get_array_module(logits)
        V = logits.shape[-1]
        z = F.float32_if_half(logits.reshape(-1, V))  # (N, V), float16 in float32
        t = targets.reshape(-1)  # (N,)
        valid = t != self.ignore_index
        n = F.count_targets(valid, self.ignore_index)
        rows = xp.arange(t.shape[0])
        safe_t = xp.where(valid, t, 0)
        shifted = z - _max_keepdims(z, 1)
        logsumexp = xp.log(xp.exp(shifted).sum(axis=1))  # (N,)
        nll = (logsumexp - shifted[rows, safe_t]) * valid  # (N,)
        self.shape, self.rows, self.t, self.valid, self.n = logits.shape, rows, safe_t, valid, n
        shifted -= logsumexp[:, None]
        self.probs = xp.exp(shifted, out=shifted)  # (N, V) softmax, in shifted's buffer
        self.dtype = logits.dtype
        return xp.asarray(nll.sum() / n, dtype=logits.dtype)

    def backward(self, g):
        dz = self.probs.copy()
        dz[self.rows, self.t] -= 1.0
        dz *= (self.valid * (F.float32_if_half(g) / self.n))[:, None].astype(dz.dtype)
        return F.rounded_to(self.dtype, dz.reshape(self.shape)), None


_causal_masks: dict = {}


def _causal_mask(T: int, dtype, xp):
    """(T, T) of 0 on and below the diagonal and -inf above it (the future), to add to the
    scores; cached per size, dtype and array module."""
    key = (T, backend.dtype_name(dtype), xp.__name__)
    if key not in _causal_masks:
        future = xp.triu(xp.ones((T, T), dtype=bool), k=1)
        _causal_masks[key] = xp.where(future, -xp.inf, 0.0).astype(dtype)
    return _causal_masks[key]


#: Query rows causal attention processes at a time (see CausalSelfAttentionFunction below)
QUERY_ROWS = 64


def query_blocks(T: int) -> list[tuple[int, int]]:
    """The (start, end) of each block of query rows: rows start .. end-1 see keys 0 .. end-1.
    ``accounting.trace_step`` counts the fast path's attention products from these."""
    return [(i, min(i + QUERY_ROWS, T)) for i in range(0, T, QUERY_ROWS)]


def keeps_probabilities(T: int) -> bool:
    """Whether causal attention at length T keeps P for its backward (one query block, at
    most QUERY_ROWS² per head) instead of a log-sum-exp and P recomputed from q and k."""
    return T <= QUERY_ROWS


class CausalSelfAttentionFunction(F.CausalSelfAttentionFunction):
    """``functional.CausalSelfAttentionFunction`` by blocks of query rows, never forming the future.

    Query rows i0 .. i1-1 are multiplied only with keys 0 .. i1-1 (their past and the block
    itself): the blocks of the T×T square above the diagonal, which the mask would set to
    0 anyway, are never computed (at T = 512, 56% of the square's products). Only the
    block's own (n, n) diagonal square needs the mask.

    Nothing of size T×T is kept: the forward saves q, k, v and each row's log-sum-exp,
    lse = max + log Σ exp(S - max) (B, nh, T), and the backward recomputes each block's
    P = exp(S - lse) from q and k (one more product, recorded as a backward
    ``attention.scores``). Except when T fits in one block (:func:`keeps_probabilities`):
    then P is at most QUERY_ROWS² per head, the forward keeps it as the reference op does,
    and the backward uses it, without the recomputed product. A block holds whole rows of
    P and dP, so softmax's backward needs no saved output: D = Σ_row dP·P,
    dS = P · (dP - D), as in the reference (equal to FlashAttention-2's D = Σ_row dO·O,
    since dP = dO vᵀ and O = P v).
    """

    def forward(self, q, k, v):
        F.check_attention_inputs(q, k, v)
        xp = backend.get_array_module(q)
        T, hs = q.shape[2], q.shape[3]
        self.scale = 1.0 / math.sqrt(hs)
        y = xp.empty_like(q)  # (B, nh, T, hs)
        self.P = None
        lse_shape, lse_dtype = q.shape[:3], F.compute_dtype(q.dtype)  # (B, nh, T), as P's sums
        self.lse = None if keeps_probabilities(T) else xp.empty(lse_shape, dtype=lse_dtype)
        for i0, i1 in query_blocks(T):
            s = F.float32_if_half(self._scores(q, k, i0, i1))  # (B, nh, n, i1), n = i1 - i0
            m = _max_keepdims(s, -1)  # (B, nh, n, 1)
            s -= m
            xp.exp(s, out=s)
            total = s.sum(axis=-1, keepdims=True)
            s /= total  # P of these rows
            s = F.rounded_to(q.dtype, s)
            if self.lse is None:
                self.P = s  # (B, nh, T, T): the one block
            else:
                self.lse[:, :, i0:i1] = (m + xp.log(total))[..., 0]
            y[:, :, i0:i1] = mm(s, v[:, :, :i1], "attention.values")  # (B, nh, n, hs)
        self.q, self.k, self.v = q, k, v
        return y

    def _scores(self, q, k, i0: int, i1: int):
        """S / √hs of query rows i0 .. i1-1 against keys 0 .. i1-1, the future at -inf."""
        xp = backend.get_array_module(q)
        s = mm(q[:, :, i0:i1], F.swap_last_two(k[:, :, :i1]), "attention.scores")  # (B, nh, n, i1)
        s *= self.scale
        s[..., i0:] += _causal_mask(i1 - i0, s.dtype, xp)  # the diagonal (n, n) square
        return s

    def backward(self, g):
        need_q, need_k, need_v = self.needs_input_grad
        xp = backend.get_array_module(g)
        q, k, v = self.q, self.k, self.v
        dq = xp.empty_like(q) if need_q else None  # each row written once
        dk = xp.zeros_like(k) if need_k else None  # summed over the blocks that see a key
        dv = xp.zeros_like(v) if need_v else None
        for i0, i1 in query_blocks(q.shape[2]):
            gb = g[:, :, i0:i1]  # (B, nh, n, hs)
            p = self.P
            if p is None:
                p = F.float32_if_half(self._scores(q, k, i0, i1))
                p -= self.lse[:, :, i0:i1, None]
                p = F.rounded_to(q.dtype, xp.exp(p, out=p))  # P (B, nh, n, i1), again
            if need_v:
                dv[:, :, :i1] += mm(F.swap_last_two(p), gb, "attention.dv")
            if need_q or need_k:
                ds = mm(gb, F.swap_last_two(v[:, :, :i1]), "attention.dP")  # dP, then in place:
                ds -= (ds * p).sum(axis=-1, keepdims=True)
                ds *= p
                ds *= self.scale  # dS = P · (dP - Σ_row dP·P) / √hs
                if need_q:
                    dq[:, :, i0:i1] = mm(ds, k[:, :, :i1], "attention.dq")
                if need_k:
                    dk[:, :, :i1] += mm(F.swap_last_two(ds), q[:, :, i0:i1], "attention.dk")
        return dq, dk, dv


class EmbeddingFunction(F.EmbeddingFunction):
    """``functional.EmbeddingFunction`` with the backward's scatter-add as a sort and a
    segmented sum: the rows of g ordered by id, then ``add.reduceat`` sums each id's run
    (one vectorised pass, where ``add.at`` visits the rows one by one: 4 to 7 times faster
    for a small vocabulary; docs/performance.md). On the CPU only."""

    def backward(self, g):
        if backend.device_of(g) != "cpu":
            return super().backward(g)  # on a GPU the scatter-add is already one kernel
        xp = backend.get_array_module(g)
        C = self.weight_shape[1]
        ids, rows = self.ids.reshape(-1), g.reshape(-1, C)  # (N,), (N, C)
        dw = xp.zeros(self.weight_shape, dtype=g.dtype)  # (V, C)
        if ids.size == 0:
            return None, dw
        order = xp.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        # where each id's run of rows starts in the sorted order
        starts = xp.flatnonzero(
            xp.concatenate([xp.ones(1, dtype=bool), sorted_ids[1:] != sorted_ids[:-1]])
        )
        dw[sorted_ids[starts]] = xp.add.reduceat(rows[order], starts, axis=0)
        return None, dw


class CachedAttentionFunction(F.CachedAttentionFunction):
    """``functional.CachedAttentionFunction`` with the mask's rows taken from the cached causal mask
    (none at all for a single new query, which sees every key) and the softmax in place."""

    def forward(self, q, k, v):
        F.check_cached_attention_inputs(q, k, v)
        xp = backend.get_array_module(q)
        Tq, Tk, hs = q.shape[2], k.shape[2], q.shape[3]
        self.scale = 1.0 / math.sqrt(hs)
        scores = mm(q, F.swap_last_two(k), "attention.scores")  # (B, nh, Tq, Tk)
        scores *= self.scale
        if Tq > 1:  # the last Tq rows of the (Tk, Tk) mask: query i at position Tk - Tq + i
            scores += _causal_mask(Tk, scores.dtype, xp)[Tk - Tq :]
        P = _softmax_(F.float32_if_half(scores), axis=-1)  # float16 in float32
        self.P = F.rounded_to(q.dtype, P)  # (B, nh, Tq, Tk)
        self.q, self.k, self.v = q, k, v
        return mm(self.P, v, "attention.values")  # (B, nh, Tq, hs)


backend.FAST_OPS.update(
    {
        F.GELUFunction: GELUFunction,
        F.LayerNormFunction: LayerNormFunction,
        F.SoftmaxCrossEntropyFunction: SoftmaxCrossEntropyFunction,
        F.CausalSelfAttentionFunction: CausalSelfAttentionFunction,
        F.CachedAttentionFunction: CachedAttentionFunction,
        F.EmbeddingFunction: EmbeddingFunction,
    }
)
