"""LoRA with a trainable bias on ``lora_B``: PEFT's ``lora_bias=True``.

    h = W0 x + b + s · (B A x + b_B),   b_B (out,) trainable, zero at the start

PEFT builds ``lora_B`` as an ``nn.Linear(r, out, bias=True)``, so the bypass ends with a bias
of its own, scaled by s like the rest of the bypass; it saves it as ``<module>.lora_B.bias``.
Here it is the parameter ``lora_B_bias`` (out,) of a ``LoRALinear``: the layer runs the
book's fused ``functional.lora_linear`` with the bias ``b + s·b_B``, so the backward needs no
new formula (the fused op's ``db = Σ_rows g`` reaches b_B times s). Merging adds
``s·b_B`` to the base bias as it adds ``s·B·A`` to the weight, so the layer needs a bias to
merge into: PEFT adapts only layers that have one, and so does this module. As in PEFT,
``lora_bias`` goes with the inits that leave the base as it was (PEFT's ``true`` and
``false``, minilora's ``"kaiming"``) and not with DoRA.

``import minilora`` registers it with the book's ``apply_lora`` (``lora.CONFIG_CHECKS``,
``lora.TARGET_CHECKS``, ``lora.LORA_LAYERS``). Docs: docs/math.md#a-bias-on-lora_b.
"""

from __future__ import annotations

from minilora import backend, lora
from minilora import functional as F
from minilora.autograd import Tensor
from minilora.lora import LoRAConfig, LoRALinear
from minilora.nn import Linear, Module, Parameter


class LoRABiasLinear(LoRALinear):
    """A ``LoRALinear`` whose bypass has a bias: ``y = x W0ᵀ + b + s · (d Aᵀ Bᵀ + b_B)``.
    Adds ``lora_B_bias`` (out_features,), zero at the start (PEFT's ``lora_B.bias``)."""

    def update_layer(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator):
        """LoRA's adapter, then b_B = 0 (out,), so the layer starts as the base."""
        super().update_layer(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator)
        out_f = self.weight.shape[0]
        self.lora_B_bias = Parameter(backend.zeros((out_f,), self.weight.dtype, self.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disable_adapters:
            return self.base_forward(x)
        bias = self.bias + self.lora_B_bias * self.scaling  # (out,): b + s·b_B
        return F.lora_linear(
            x, self.weight, bias, self.lora_A, self.lora_B, self.scaling, self.lora_input(x)
        )

    def merged_bias(self):
        """b + s·b_B as a new array (out,): what merging writes into the bias."""
        return self.bias.data + self.scaling * self.lora_B_bias.data

    def merged_weight(self, safe_merge: bool = True):
        """W + s·B·A, refused (ValueError) if ``safe_merge`` and it or the merged bias is
        not finite: both are checked before either is written."""
        lora.check_merged(self.merged_bias(), safe_merge, "b + s·b_B")
        return super().merged_weight(safe_merge)

    def _set_merged(self, merged) -> None:
        self.bias.data[...] = self.merged_bias()  # in place, as the weight
        super()._set_merged(merged)

    def unmerge(self) -> None:
        """W ← W - s·B·A and b ← b - s·b_B. Warns and does nothing if not merged."""
        if self.merged:
            self.bias.data -= self.scaling * self.lora_B_bias.data
        super().unmerge()


def check_config(config: LoRAConfig) -> None:
    """``lora_bias`` must be a bool, and true only where PEFT allows it (registered in
    ``lora.CONFIG_CHECKS``): not with DoRA, and with an init that leaves the base as it
    was and that PEFT accepts with it (its ``true``, minilora's ``"kaiming"``)."""
    if not isinstance(config.lora_bias, bool):
        raise ValueError(f"LoRAConfig: lora_bias={config.lora_bias!r} must be True or False")
    if config.lora_bias and config.use_dora:
        raise ValueError(
            "LoRAConfig: lora_bias=True with use_dora=True: DoRA's magnitude rescales the whole "
            "output, so a bypass bias has no place in it (PEFT refuses the pair too)"
        )
    if config.lora_bias and config.init_lora_weights != "kaiming":
        raise ValueError(
            f"LoRAConfig: lora_bias=True with init_lora_weights={config.init_lora_weights!r}: "
            "PEFT accepts lora_bias only with its default init (true or false), minilora's "
            "'kaiming'; give init_lora_weights='kaiming'"
        )


def target_problems(model: Module, paths, config: LoRAConfig) -> list[str]:
    """With ``lora_bias``, every target must be a ``Linear`` with a bias, which merging adds
    s·b_B to (registered in ``lora.TARGET_CHECKS``; PEFT refuses the others too)."""
    if not config.lora_bias:
        return []
    layers = {p: model.get_submodule(p) for p in paths}
    without = [p for p, m in layers.items() if not (isinstance(m, Linear) and m.bias is not None)]
    if not without:
        return []
    return [
        f"lora_bias=True needs Linear layers with a bias, which merging adds s·b_B to; "
        f"{without} have none (or are embeddings): leave them out of target_modules"
    ]


_wrap_linear = lora.LORA_LAYERS[Linear]  # DoRA's choice between DoRALinear and LoRALinear


def from_linear(linear: Linear, config: LoRAConfig, generator=None) -> LoRALinear:
    """What ``apply_lora`` wraps a ``Linear`` in: a ``LoRABiasLinear`` when
    ``config.lora_bias``, else what was registered before (DoRA's or the book's)."""
    if config.lora_bias:
        return LoRABiasLinear.from_linear(linear, config, generator)
    return _wrap_linear(linear, config, generator)


lora.CONFIG_CHECKS.append(check_config)
lora.TARGET_CHECKS.append(target_problems)
lora.LORA_LAYERS[Linear] = from_linear
