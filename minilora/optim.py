"""Optimizers that keep state only for parameters that train.

This is the second half of LoRA's memory saving: AdamW stores two moments per trainable
parameter, so freezing ``W`` removes ``2 × out × in`` numbers of optimizer state per
adapted matrix. State is created lazily, at the first step in which a parameter has a
gradient, and never for a parameter with ``requires_grad=False``: a frozen weight is not
touched at all (not even by weight decay).

Both follow ``torch.optim`` exactly (same update order and formulas), so one step can be
compared number for number. A float16 parameter trains through a float32 copy (its master
weight) with float32 state, as PyTorch's mixed-precision training does: see
:meth:`Optimizer.master_weight`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from minilora import backend
from minilora.autograd import Tensor
from minilora.functional import compute_dtype


class Optimizer:
    """Parameter groups (each a dict with ``params`` and its own settings) and state."""

    def __init__(self, params, defaults: dict):
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = []
        for group in groups:
            unknown = set(group) - set(defaults) - {"params"}
            if unknown:
                raise ValueError(
                    f"unknown optimizer settings {sorted(unknown)} in a parameter group"
                )
            params = list(group["params"])
            for p in params:
                if not isinstance(p, Tensor):
                    raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
            self.param_groups.append({**defaults, **group, "params": params})
        self.state: dict[int, dict] = {}  # id(param) -> {"step": int, moment arrays...}

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _trainable(self, group):
        """The parameters of a group that train and have a gradient this step."""
        for p in group["params"]:
            if p.requires_grad and p.grad is not None:
                yield p

    def master_weight(self, p: Tensor) -> tuple:
        """The array a step updates for ``p`` and the gradient to update it with.

        A float32 or float64 parameter is updated in place. A float16 one cannot hold what
        training needs: AdamW's eps = 1e-8 underflows to 0 (a zero moment then gives
        m / √v = 0/0), and a small update p - lr·u rounds back to p. So its step updates a
        float32 copy kept in the state (the master weight, made at its first step) with
        the gradient in float32, and :meth:`write_back` rounds the result into ``p``
        (docs/math.md, "Half precision"). The master weight is the truth between steps.
        """
        dtype = compute_dtype(p.data.dtype)
        if dtype == p.data.dtype:
            return p.data, p.grad
        state = self.state.setdefault(id(p), {})
        if "master" not in state:
            state["master"] = p.data.astype(dtype)
        return state["master"], p.grad.astype(dtype)

    @staticmethod
    def write_back(p: Tensor, w) -> None:
        """Round an updated master weight ``w`` into the float16 parameter ``p``."""
        if w is not p.data:
            p.data[...] = w

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer's state arrays (moments), read from the arrays."""
        return sum(
            v.nbytes for s in self.state.values() for v in s.values() if hasattr(v, "nbytes")
        )


class SGD(Optimizer):
    """SGD with optional momentum and (L2, coupled) weight decay, as ``torch.optim.SGD``.

    g ← grad + wd·p;  buf ← momentum·buf + g (buf = g at the first step);  p ← p - lr·buf.
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0):
        _check_nonneg("lr", lr)
        _check_nonneg("momentum", momentum)
        _check_nonneg("weight_decay", weight_decay)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def step(self) -> None:
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in self._trainable(group):
                w, g = self.master_weight(p)
                g = g if wd == 0 else g + wd * w
                if mom:
                    state = self.state.setdefault(id(p), {})
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.copy()
                    else:
                        state["momentum_buffer"] *= mom
                        state["momentum_buffer"] += g
                    g = state["momentum_buffer"]
                w -= lr * g
                self.write_back(p, w)


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    p ← p·(1 - lr·wd);  m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;
    p ← p - (lr / (1-β1^t)) · m / (√v / √(1-β2^t) + eps).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        _check_nonneg("lr", lr)
        _check_nonneg("eps", eps)
        _check_nonneg("weight_decay", weight_decay)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def step(self) -> None:
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in self._trainable(group):
                xp = backend.get_array_module(p.data)
                w, g = self.master_weight(p)  # p itself, or float16's float32 master
                state = self.state.setdefault(id(p), {})
                if "step" not in state:  # moments live on the parameter's device, in w's dtype
                    state.update(step=0, exp_avg=xp.zeros_like(w), exp_avg_sq=xp.zeros_like(w))
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    w *= 1.0 - lr * wd
                m *= b1
                m += (1.0 - b1) * g
                v *= b2
                v += (1.0 - b2) * g * g
                step_size = lr / (1.0 - b1**t)
                denom = xp.sqrt(v)  # then in place: √v / √(1-β2^t) + eps
                denom /= math.sqrt(1.0 - b2**t)
                denom += eps
                update = m / denom
                update *= step_size
                w -= update
                self.write_back(p, w)


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> float:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping (as ``torch.nn.utils.clip_grad_norm_``).
    """
    _check_nonneg("max_norm", max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    # the squares are summed where the gradients live; float() then reads one number back
    # (one GPU synchronisation per call, not one per parameter)
    total = math.sqrt(float(sum((g.astype(backend.float64) ** 2).sum() for g in grads)))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


def _check_nonneg(name: str, value) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name}={value!r} must be a finite non-negative number")
