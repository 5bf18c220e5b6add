"""QLoRA: LoRA on a quantized frozen base (Dettmers et al. 2023, arXiv 2305.14314).

    h = dequant(W_q) x + b + s · B A x,   W_q stored in 4 bits (NF4 by default)

This is where compression and adaptation meet. The base weight is *stored* quantized (the
compression), and LoRA trains a small float update beside it (the adaptation): the
forward dequantizes the weight and runs the same fused ``functional.lora_linear`` as
:class:`~minilora.lora.LoRALinear`, with the dequantized weight as a constant, so the
gradient reaches the input, ``lora_A`` and ``lora_B`` and nothing is ever computed for the
base weight (there is nothing to compute it into).

Merging is where they part again. ``dequant(W_q) + s·B·A`` is an exact float merge, but it
is a float weight, four to eight times the bytes; putting it back into 4 bits
(:meth:`QLoRALinear.requantized`) rounds it onto the NF4 grid again, and the outputs
change (the adapter's update is mostly smaller than one quantization step).
"""

from __future__ import annotations

import warnings

from minilora.autograd import Tensor
from minilora.compression.quantize import QuantizedLinear, QuantizedTensor, dequantize, quantize
from minilora.lora import (
    LoRAConfig,
    LoRALinear,
    check_lora_settings,
    check_rank,
    lora_layers,
    mark_only_lora_as_trainable,
)
from minilora.nn import Linear, Module, Parameter


class QLoRALinear(LoRALinear):
    """A ``LoRALinear`` whose base weight is a frozen :class:`QuantizedTensor`.

    ``weight`` is the dequantized weight, recomputed at each use (a constant ``Tensor``,
    not a parameter); ``qweight`` is what is stored. Everything else (``lora_A``,
    ``lora_B``, scaling, dropout, ``disable_adapters``, ``lora_state_dict``) is
    ``LoRALinear``'s. Merging in place is refused: see :meth:`merged_linear` and
    :meth:`requantized`.
    """

    def __init__(
        self,
        qweight: QuantizedTensor,
        bias: Parameter | None = None,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: str = "gaussian",
        generator=None,
    ):
        if len(qweight.shape) != 2:
            raise ValueError(f"QLoRALinear: weight shape {qweight.shape} must be (out, in)")
        check_lora_settings("QLoRALinear", r, lora_alpha, lora_dropout, init_lora_weights)
        if init_lora_weights == "pissa":  # it would rewrite the quantized weight
            raise ValueError("QLoRALinear: init_lora_weights='pissa' is not supported")
        check_rank(r, qweight.shape, "this QLoRALinear")
        self.out_features, self.in_features = qweight.shape
        self.qweight, self.bias = qweight, bias
        self.update_layer(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator)

    @classmethod
    def from_quantized(
        cls, layer: QuantizedLinear, config: LoRAConfig, generator=None
    ) -> QLoRALinear:
        """An adapter on a ``QuantizedLinear``'s weight (the same ``QuantizedTensor`` and
        bias objects)."""
        if config.use_dora:
            raise ValueError("QLoRALinear: use_dora=True is not supported")
        new = cls(
            layer.qweight,
            layer.bias,
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            generator=generator,
        )
        new.train(layer.training)
        return new

    @property
    def weight(self) -> Tensor:
        return Tensor(dequantize(self.qweight))  # (out, in), constant

    def _set_merged(self, merged) -> None:
        raise TypeError(
            "a QLoRALinear cannot merge in place: its base weight is quantized, and the merged "
            "weight would have to be quantized again (which changes outputs); use "
            "merged_linear() for an exact float Linear, or requantized() for a QuantizedLinear"
        )

    def unmerge(self) -> None:
        warnings.warn("QLoRALinear.unmerge(): never merged; nothing was done", stacklevel=2)

    def merged_linear(self) -> Linear:
        """A float ``Linear`` with ``dequant(W_q) + s·B·A``: the same outputs (to rounding),
        at the bytes of a float weight. The bias object is shared."""
        linear = Linear.__new__(Linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = Parameter(self.merged_weight(), requires_grad=False)
        linear.bias = self.bias
        linear.training = self.training
        return linear

    def requantized(self) -> QuantizedLinear:
        """The merged weight quantized again with the base's settings: 4-bit storage, but
        outputs that differ from the adapted layer's by the new rounding."""
        q = self.qweight
        merged = quantize(self.merged_weight(), q.quant_type, q.block_size, q.double_quant)
        layer = QuantizedLinear(merged, self.bias)
        layer.training = self.training
        return layer

    def get_base_layer(self) -> Linear:
        return self.merged_linear()

    def extra_repr(self) -> str:
        q = self.qweight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant_type={q.quant_type}, r={self.r}, lora_alpha={self.lora_alpha}"
        )


def apply_qlora(model: Module, config: LoRAConfig, generator=None) -> list[str]:
    """Put an adapter on every ``QuantizedLinear`` that ``config.target_modules`` names
    (inside ``layers_to_transform``, with the rank and alpha of ``rank_pattern`` and
    ``alpha_pattern``; quantize the model first: ``quantize.quantize_model``), then freeze
    all but the adapters (and biases per ``config.bias``). Returns the adapted paths."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    layers = [
        (path, m)
        for path, m in model.named_modules()
        if type(m) is QuantizedLinear and config.adapts(path)
    ]
    if not layers:
        raise ValueError(
            f"apply_qlora: target_modules={config.target_modules!r} match no QuantizedLinear; "
            "quantize the model first (minilora.compression.quantize.quantize_model)"
        )
    for path, layer in layers:
        adapter = QLoRALinear.from_quantized(layer, config.for_module(path), generator)
        model.set_submodule(path, adapter)
    mark_only_lora_as_trainable(model, config.bias)
    return [path for path, _ in layers]


def merge_qlora(model: Module, requantize: bool = True) -> Module:
    """Replace every ``QLoRALinear`` by its merge, in place: re-quantized
    (:meth:`QLoRALinear.requantized`, 4-bit storage, outputs change) or a float ``Linear``
    (:meth:`QLoRALinear.merged_linear`, exact). Returns ``model``."""
    for path, layer in lora_layers(model):
        if isinstance(layer, QLoRALinear):
            merged = layer.requantized() if requantize else layer.merged_linear()
            model.set_submodule(path, merged)
    return model
