"""PiSSA: start LoRA from the weight's principal singular directions (Meng et al. 2024,
arXiv 2404.02948); PEFT's ``init_lora_weights="pissa"``.

Plain LoRA starts with ``B = 0``, so the update begins at nothing and the frozen ``W0`` does
all the work. PiSSA splits ``W0`` instead. With the SVD ``W0 = U S Vᵀ`` (out, in) and
``s`` the LoRA scaling,

    B = U_r · sqrt(S_r / s)      (out, r)
    A = sqrt(S_r / s) · V_rᵀ     (r, in)        so  s·B·A = U_r S_r V_rᵀ, the top-r part
    W_res = W0 - s·B·A           (out, in)      the frozen base becomes the residual

The layer computes ``W_res x + s·B·A x = W0 x`` at init (to float rounding), but the
trainable part now holds the weight's largest directions. The price: the base weight is
changed, so disabling the adapter runs ``W_res``, not ``W0``; and a trained PiSSA adapter
only means something on top of ``W_res``. :func:`pissa_to_lora` turns it back into a plain
LoRA adapter for the original ``W0`` (rank 2r). ``import minilora`` registers
:func:`init_pissa` as the init ``"pissa"`` of the book's ``LoRALinear`` (``lora.LORA_INITS``).
Derivations: docs/math.md#pissa.
"""

from __future__ import annotations

import math

from minilora import backend, lora
from minilora.nn import Parameter


def pissa_init(weight, r: int, scaling: float):
    """``(lora_A (r, in), lora_B (out, r), residual (out, in))`` for ``weight`` (out, in),
    in ``weight``'s dtype: the top-r singular triplets split evenly between B and A, each
    divided by sqrt(scaling), and ``weight - scaling·B·A``. The SVD runs in float64."""
    xp = backend.get_array_module(weight)
    U, S, Vt = xp.linalg.svd(weight.astype(backend.float64), full_matrices=False)  # S descending
    root = xp.sqrt(S[:r] / scaling)  # (r,)
    lora_B = (U[:, :r] * root).astype(weight.dtype)  # (out, r)
    lora_A = (root[:, None] * Vt[:r]).astype(weight.dtype)  # (r, in)
    residual = weight - scaling * backend.matmul(lora_B, lora_A, "pissa.init")  # (out, in)
    return lora_A, lora_B, residual


def init_pissa(layer) -> None:
    """PiSSA's init of a new ``LoRALinear``: A and B from its weight's top-r SVD, and the
    weight replaced by the residual (``residual_base`` says so: the layer's weight is not
    the base's W0 any more)."""
    A, B, residual = pissa_init(layer.weight.data, layer.r, layer.scaling)
    layer.lora_A.data, layer.lora_B.data = A, B
    # a new array, not W0 edited in place: a weight tied elsewhere keeps W0
    layer.weight = Parameter(residual, requires_grad=layer.weight.requires_grad)
    layer.residual_base = True


def pissa_to_lora(lora_A, lora_B, initial_A, initial_B):
    """A plain LoRA adapter of rank 2r for the ORIGINAL weight, from a trained PiSSA adapter
    (A, B) and the one it started from (A0, B0), all at the same scaling s:

        W_res + s·B·A = W0 + s·(B·A - B0·A0) = W0 + s·[B, -B0] @ [A; A0]

    Returns ``(A' (2r, in), B' (out, 2r))``. Used at the scaling ``2α / 2r = α / r`` (or
    ``√2·α / √(2r)`` with rsLoRA), the same s, which is why the caller doubles lora_alpha
    (PEFT's rule)."""
    xp = backend.get_array_module(lora_A)
    return (
        xp.concatenate([lora_A, initial_A], axis=0),  # (2r, in)
        xp.concatenate([lora_B, -initial_B], axis=1),  # (out, 2r)
    )


def converted_alpha(lora_alpha: float, use_rslora: bool) -> float:
    """lora_alpha for the rank-2r adapter of :func:`pissa_to_lora`, keeping the scaling:
    α/r = 2α/(2r), and α/√r = √2·α/√(2r) with rsLoRA."""
    return lora_alpha * (math.sqrt(2) if use_rslora else 2)


lora.LORA_INITS["pissa"] = init_pissa
