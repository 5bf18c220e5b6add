"""Network compression, one call per method, and the bytes each representation keeps.

Low-rank adaptation is not network compression. LoRA *adds* a small trainable update
B·A beside a frozen weight that is kept whole: the model it serves is as large as before
(larger, until the update is merged). Compression *shrinks what is stored*: fewer bits per
weight (:mod:`minilora.compression.quantize`), fewer weights
(:mod:`minilora.compression.lowrank`, the truncated
SVD), or fewer connections, units or blocks (:mod:`minilora.compression.prune`). QLoRA
(:mod:`minilora.compression.qlora`) is where the two meet: a quantized base, a float adapter.

:func:`compressed` builds each variant from a base GPT (a copy; the base is untouched) and
:func:`storage_bytes` counts what must be kept. See docs/compression.md.
"""

from __future__ import annotations

import copy
import inspect

from minilora.compression.lowrank import svd_compress
from minilora.compression.prune import drop_blocks, prune_connections, prune_neurons
from minilora.compression.qlora import apply_qlora
from minilora.compression.quantize import BLOCK_LINEARS, quantize_model, quantized_layers
from minilora.lora import LoRAConfig
from minilora.nn import Module

METHODS = ("int8", "int4", "nf4", "svd", "prune", "prune-neurons", "drop-blocks", "qlora")


def storage_bytes(model: Module) -> int:
    """The bytes a model must keep: every parameter's array once (float, at its dtype's
    size) plus every quantized weight's codes and constants (``QuantizedTensor.nbytes``).
    Pruning masks are not counted (they serve fine-tuning, not inference), and zeros of a
    connection-pruned weight are stored densely (see ``prune.csr_nbytes``)."""
    params = sum(int(p.data.nbytes) for p in model.parameters())
    return params + sum(layer.qweight.nbytes for _, layer in quantized_layers(model))


def stored_parameters(model: Module) -> int:
    """The weights a model represents: its parameters plus the values of every quantized
    weight (which are not parameters). Pruned zeros still count: they are stored."""
    params = sum(p.size for p in model.parameters())
    return params + sum(layer.qweight.size for _, layer in quantized_layers(model))


def compressed(base: Module, method: str, **options) -> Module:
    """A compressed copy of ``base`` (frozen; ``base`` itself is not changed):

    * ``int8``: absmax int8, per output channel (``block_size="channel"``, the default) or
      per tensor (``block_size=None``);
    * ``int4``: 4-bit absmax in blocks of ``block_size=64``, levels -7..7;
    * ``nf4``: NF4 in blocks of ``block_size=64``, ``double_quant=False``;
    * ``svd``: truncated SVD to ``rank`` (required);
    * ``prune``: magnitude pruning of connections to ``sparsity`` (required),
      ``scope="layer"`` or ``"global"``;
    * ``prune-neurons``: remove the fraction ``sparsity`` (required) of MLP hidden units;
    * ``drop-blocks``: remove the Transformer blocks ``blocks`` (a list of indices);
    * ``qlora``: NF4 with double quantization, plus a trainable LoRA adapter (``config``, a
      ``LoRAConfig``, default r=8 on q_proj and v_proj).

    Quantization, SVD and connection pruning act on the Linear layers inside the blocks
    (``target_modules``, default ``quantize.BLOCK_LINEARS``); embeddings, layer norms and
    ``lm_head`` stay float32.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    build = _BUILDERS[method]
    try:  # refuse a missing or unknown option before copying anything
        inspect.signature(build).bind(base, **options)
    except TypeError as e:
        parameters = list(inspect.signature(build).parameters)[1:]
        raise TypeError(
            f"compressed(method={method!r}): {e}; its options are {parameters}"
        ) from None
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    build(model, **options)
    return model


def _int8(model, block_size="channel", target_modules=BLOCK_LINEARS):
    quantize_model(model, "int8", block_size, False, target_modules)


def _int4(model, block_size=64, target_modules=BLOCK_LINEARS):
    quantize_model(model, "int4", block_size, False, target_modules)


def _nf4(model, block_size=64, double_quant=False, target_modules=BLOCK_LINEARS):
    quantize_model(model, "nf4", block_size, double_quant, target_modules)


def _svd(model, rank, target_modules=BLOCK_LINEARS):
    svd_compress(model, rank, target_modules)


def _prune(model, sparsity, scope="layer", target_modules=BLOCK_LINEARS):
    prune_connections(model, sparsity, target_modules, scope)


def _qlora(model, config=None, block_size=64, double_quant=True, generator=None):
    quantize_model(model, "nf4", block_size, double_quant)
    apply_qlora(model, config or LoRAConfig(), generator)


_BUILDERS = {
    "int8": _int8,
    "int4": _int4,
    "nf4": _nf4,
    "svd": _svd,
    "prune": _prune,
    "prune-neurons": prune_neurons,
    "drop-blocks": lambda model, blocks: drop_blocks(model, blocks),
    "qlora": _qlora,
}
