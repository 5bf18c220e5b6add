"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353); PEFT's
``use_dora=True``.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖      norms per output row of the (out, in) weight

DoRA splits the adapted weight into a direction (LoRA's ``W0 + s·B·A``, normalised per
output row) and a magnitude ``m`` (out,), PEFT's ``lora_magnitude_vector``, trained beside A
and B and initialised to the row norms of ``W0`` so that the layer starts as the base. As in
the paper (section 4.3) and PEFT, the norm is a constant in the backward. The op
(:class:`DoRALinearFunction`) runs LoRA's reference op inside; the layer
(:class:`DoRALinear`) is a ``LoRALinear`` with the magnitude added. ``import minilora``
registers it, so ``apply_lora(model, LoRAConfig(use_dora=True))`` builds DoRA layers.
Derivation: docs/math.md#dora.
"""

from __future__ import annotations

from minilora import backend, lora
from minilora import functional as F
from minilora.autograd import Function, Tensor
from minilora.lora import LoRAConfig, LoRALinear
from minilora.nn import Linear, Parameter

mm = backend.matmul


def dora_weight_norm(weight, lora_A, lora_B, scaling: float):
    """‖W0 + s·B·A‖ per output row, shape (out,): the norm DoRA divides by (arrays in and out)."""
    xp = backend.get_array_module(weight)
    adapted = weight + scaling * mm(lora_B, lora_A, "dora.norm")  # (out, in)
    return xp.sqrt((adapted * adapted).sum(axis=1))  # (out,)


class DoRALinearFunction(Function):
    """DoRA's layer (Liu et al. 2024): y = c ⊙ (x @ W0ᵀ + s · (d @ Aᵀ) @ Bᵀ) + b, c = m / n.

    The LoRA layer's inputs plus the magnitude m (out,); n = ‖W0 + s·B·A‖ per output row
    (out,), computed here from the weights and treated as a constant in the backward (the
    paper's section 4.3, and PEFT: the norm is detached). With d the bypass input (``x``
    or ``x_lora``) this is ``(m / n) ⊙ (W0 + s·B·A) x + b`` when d is x. Flatten the
    leading axes to N rows; z = x @ W0ᵀ + s · (d @ Aᵀ) @ Bᵀ (N, out). With g (N, out):

        dm = Σ_rows (g ⊙ z) / n          (out,)
        db = Σ_rows g                    (out,)
        gz = g ⊙ c                       (N, out)
        dW, dA, dB, dx, dd = lora_linear's backward with upstream gz (no bias)

    Derivation: docs/math.md#dora. The detached n is why dA and dB need nothing beyond
    lora_linear's formulas.
    """

    def __init__(self, scaling: float):
        self.s = float(scaling)

    def forward(self, x, weight, bias, lora_A, lora_B, magnitude, x_lora=None):
        F.check_lora_shapes(x, weight, bias, lora_A, lora_B, x_lora)
        if tuple(magnitude.shape) != (weight.shape[0],):
            raise ValueError(
                f"dora_linear: magnitude has shape {tuple(magnitude.shape)}, expected "
                f"({weight.shape[0]},) to match weight {tuple(weight.shape)}"
            )
        need_x, need_w, _, need_A, need_B, need_m, need_d = self.needs_input_grad
        # the scaled part is a LoRA layer without its bias: run the reference op's own
        # forward and backward, told which of its inputs need gradients
        self.lora = F.LoRALinearFunction(self.s)
        self.lora.needs_input_grad = (need_x, need_w, False, need_A, need_B, need_d)
        z = self.lora.forward(x, weight, None, lora_A, lora_B, x_lora)  # (..., out)
        n = dora_weight_norm(weight, lora_A, lora_B, self.s)  # (out,), a constant
        c = magnitude / n  # (out,)
        y = z * c
        if bias is not None:
            y += bias
        self.n = n if need_m else None
        self.z = z if need_m else None
        self.c = c if (need_x or need_w or need_A or need_B or need_d) else None
        return y

    def backward(self, g):
        need_x, need_w, need_b, need_A, need_B, need_m, need_d = self.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        db = g2.sum(axis=0) if need_b else None
        dm = (g2 * self.z.reshape(g2.shape)).sum(axis=0) / self.n if need_m else None
        dx = dw = dA = dB = dd = None
        if self.c is not None:
            dx, dw, _, dA, dB, dd = self.lora.backward(g * self.c)
        return dx, dw, db, dA, dB, dm, dd


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, x_lora=None) -> Tensor:
    """``(magnitude / ‖W0 + s·B·A‖) ⊙ lora_linear(x, weight, None, ...) + bias``, the norm per
    output row and detached (see :class:`DoRALinearFunction`)."""
    return DoRALinearFunction(scaling)(x, weight, bias, lora_A, lora_B, magnitude, x_lora)


class DoRALinear(LoRALinear):
    """A ``LoRALinear`` with DoRA's magnitude: ``y = (m / n) ⊙ (x W0ᵀ + s · d Aᵀ Bᵀ) + b``,
    n = ‖W0 + s·B·A‖ per output row. Adds ``lora_magnitude_vector`` (out_features,)."""

    merged_norm = None  # the norm n at merge time, which unmerge divides back out

    def update_layer(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator):
        """LoRA's adapter (and init), then m = ‖W0 + s·B·A‖ per output row, so that at
        init m / n = 1 and the layer computes the base's output."""
        super().update_layer(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator)
        w, A, B = self.weight.data, self.lora_A.data, self.lora_B.data
        self.lora_magnitude_vector = Parameter(dora_weight_norm(w, A, B, self.scaling))  # (out,)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disable_adapters:
            return self.base_forward(x)
        return dora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.lora_magnitude_vector,
            self.scaling,
            self.lora_input(x),
        )

    def weight_norm(self):
        """n = ‖W + s·B·A‖ per output row (out,), from the current weight W."""
        return dora_weight_norm(self.weight.data, self.lora_A.data, self.lora_B.data, self.scaling)

    def merged_weight(self, safe_merge: bool = True):
        """m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (per output row) as a new array, refused
        (ValueError) if ``safe_merge`` and not finite."""
        merged = self.weight.data + self.get_delta_weight()  # (out, in)
        merged *= (self.lora_magnitude_vector.data / self.weight_norm())[:, None]
        return lora.check_merged(merged, safe_merge, "W + s·B·A")

    def _set_merged(self, merged) -> None:
        # kept for unmerge, as PEFT keeps it: W0 cannot be read back otherwise
        self.merged_norm = self.weight_norm()
        super()._set_merged(merged)

    def unmerge(self) -> None:
        """W0 back from the merged weight: W = (m / n) ⊙ (W0 + s·B·A), so
        W0 = W ⊙ (n / m) - s·B·A. Warns and does nothing if not merged."""
        if self.merged:
            self.weight.data *= (self.merged_norm / self.lora_magnitude_vector.data)[:, None]
            self.merged_norm = None
        super().unmerge()


def from_linear(linear: Linear, config: LoRAConfig, generator=None) -> LoRALinear:
    """What ``apply_lora`` wraps a ``Linear`` in: a ``DoRALinear`` when ``config.use_dora``,
    else the book's ``LoRALinear`` (registered in ``lora.LORA_LAYERS``)."""
    layer_class = DoRALinear if config.use_dora else LoRALinear
    return layer_class.from_linear(linear, config, generator)


def check_config(config: LoRAConfig) -> None:
    """Refuse a ``use_dora`` that is not a bool (registered in ``lora.CONFIG_CHECKS``)."""
    if not isinstance(config.use_dora, bool):
        raise ValueError(f"LoRAConfig: use_dora={config.use_dora!r} must be True or False")


lora.CONFIG_CHECKS.append(check_config)
lora.LORA_LAYERS[Linear] = from_linear
