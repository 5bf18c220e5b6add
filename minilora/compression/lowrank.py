"""Low-rank compression: replace a weight by its truncated SVD, two smaller layers.

A weight W (out, in) with singular value decomposition W = U Σ Vᵀ is replaced by its best
rank-k approximation W_k = U_k Σ_k V_kᵀ (the k largest singular values). By the
Eckart–Young(–Mirsky) theorem no rank-k matrix is closer to W, and the error is known
exactly from the discarded singular values:

    ‖W - W_k‖_F = sqrt(σ²_{k+1} + ... + σ²_min(out,in)),     ‖W - W_k‖_2 = σ_{k+1}

The layer becomes ``in -> k -> out``: ``down`` (k, in) = Σ_k^½ V_kᵀ and ``up`` (out, k) =
U_k Σ_k^½ (the singular values split evenly, so neither factor is much larger than the
other), with the bias kept on ``up``. Parameters: k·(in + out) + out instead of
in·out + out, a saving when k < in·out / (in + out).

This is what LoRA is *not*: LoRA keeps W whole and adds a trainable low-rank B·A beside
it; here W itself is replaced by a low-rank product and the model shrinks (and loses
whatever lived in the discarded directions). See docs/compression.md.
"""

from __future__ import annotations

from minilora import backend
from minilora.autograd import Tensor
from minilora.compression.quantize import BLOCK_LINEARS, target_linears
from minilora.nn import Linear, Module, Parameter


class LowRankLinear(Module):
    """``y = up(down(x))``: ``down`` Linear(in, k, bias=False), ``up`` Linear(k, out, bias)."""

    def __init__(self, down: Linear, up: Linear):
        if down.out_features != up.in_features or down.bias is not None:
            raise ValueError(
                f"LowRankLinear: down ({down.in_features} -> {down.out_features}, bias="
                f"{down.bias is not None}) and up ({up.in_features} -> {up.out_features}) must "
                "meet at the rank k, with no bias on down"
            )
        self.in_features, self.out_features = down.in_features, up.out_features
        self.rank = down.out_features
        self.down, self.up = down, up

    @classmethod
    def from_linear(cls, linear: Linear, rank: int) -> LowRankLinear:
        """The rank-``rank`` truncated SVD of ``linear.weight`` (the bias object is shared)."""
        check_svd_rank(rank, linear.weight.shape, "LowRankLinear.from_linear")
        w = linear.weight.data  # (out, in)
        xp = backend.get_array_module(w)
        U, S, Vt = xp.linalg.svd(w.astype(backend.float64), full_matrices=False)  # S descending
        root = xp.sqrt(S[:rank])  # (k,)
        trains = linear.weight.requires_grad  # the factors train if the weight did
        down = _linear_from(Vt[:rank] * root[:, None], None, w.dtype, trains)  # (k, in)
        up = _linear_from(U[:, :rank] * root[None, :], linear.bias, w.dtype, trains)  # (out, k)
        layer = cls(down, up)
        layer.train(linear.training)
        return layer

    def low_rank_weight(self):
        """W_k = up.weight @ down.weight, (out, in): the matrix this layer applies."""
        return backend.matmul(self.up.weight.data, self.down.weight.data, "lowrank.weight")

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., k) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def check_svd_rank(rank, weight_shape: tuple, where: str) -> None:
    """Refuse a rank that is not an integer in [1, min(out, in)]."""
    top = min(weight_shape)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= top:
        raise ValueError(
            f"rank={rank!r} for {where} (weight shape {tuple(weight_shape)} = (out, in)) must "
            f"be an integer in [1, {top}]"
        )


def _linear_from(weight, bias: Parameter | None, dtype, requires_grad: bool) -> Linear:
    linear = Linear.__new__(Linear)
    linear.out_features, linear.in_features = weight.shape
    linear.weight = Parameter(weight.astype(dtype), requires_grad=requires_grad)
    linear.bias = bias
    return linear


def svd_compress(model: Module, rank: int, target_modules=BLOCK_LINEARS) -> list[str]:
    """Replace every ``Linear`` that ``target_modules`` names by its rank-``rank``
    :class:`LowRankLinear`, in place; returns the replaced paths. Every rank is checked
    before anything changes."""
    paths = [path for path, _ in target_linears(model, target_modules, "svd_compress")]
    for path in paths:
        check_svd_rank(rank, model.get_submodule(path).weight.shape, path)
    for path in paths:
        model.set_submodule(path, LowRankLinear.from_linear(model.get_submodule(path), rank))
    return paths


def low_rank_parameters(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
    """k·(in + out) + out (with a bias): the parameters of a :class:`LowRankLinear`."""
    return rank * (in_features + out_features) + (out_features if bias else 0)
