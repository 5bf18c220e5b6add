"""Post-training quantization of frozen weights: absmax int8, blockwise int4 and NF4.

Every format here is the same recipe with a different table of levels. Split the weight,
flattened in row-major order, into blocks of ``block_size`` consecutive values; per block
keep its absmax ``c = max |w|`` (float32) and, per value, the index of the level nearest
to ``w / c`` in a sorted table of levels in [-1, 1]. Dequantizing is a table look-up:
``w' = levels[code] · c``.

* ``int8``: levels k / 127, k = -127..127 (absmax int8); 8 bits, one code per byte;
* ``int4``: levels k / 7, k = -7..7 (symmetric: -8 unused); 4 bits, two codes per byte;
* ``nf4``: QLoRA's 16 normal-float values (:data:`NF4`); 4 bits, two codes per byte.

``block_size=None`` makes the whole tensor one block (int8 "per tensor"); for a weight
(out, in), ``block_size=in`` makes each output channel (row) one block ("per channel").
int4 is symmetric, ``[-7, 7]``, so that zero is a level and ``±absmax`` both come back
exactly; the sixteenth code (-8) is left unused, as in absmax int8 (which leaves -128).

Because the absmax itself is stored, the largest |w| of each block is reconstructed
exactly (its level is ±1), and every other value is within half a step of the table:
``|w - w'| <= c · (gap between neighbouring levels) / 2``, which for the integer formats
is ``scale / 2`` with ``scale = c / qmax``.

Double quantization (Dettmers et al. 2023, "QLoRA", arXiv 2305.14314) quantizes the block
constants themselves: subtract their mean (one float32), then quantize the centred
constants with absmax int8 in blocks of 256 (one float32 per 256 constants). QLoRA uses
an 8-bit *float* code for this second level; minilora uses absmax int8, the same byte
count. Storage is counted exactly by :attr:`QuantizedTensor.nbytes` (the bytes of the
arrays kept); the closed forms are in docs/compression.md.

Quantization is not differentiated: it is applied once to a frozen weight.
:class:`QuantizedLinear` dequantizes in its forward and runs the reference ``linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minilora import backend
from minilora import functional as F
from minilora.autograd import Tensor
from minilora.lora import is_target
from minilora.nn import Linear, Module, Parameter

# QLoRA's 4-bit NormalFloat code, exactly as bitsandbytes ships it (Dettmers et al. 2023,
# appendix E). Derivation: quantiles of N(0, 1) so that each code covers an equal share of
# a normal weight distribution, with an exact zero. Take 8 positive quantiles
# Φ⁻¹(p) at p = linspace(0.9677083, 0.5, 9)[:-1] and 7 negative ones -Φ⁻¹(p) at
# p = linspace(0.9677083, 0.5, 8)[:-1], add 0, sort, and divide by the largest, so the
# ends are -1 and 1 (asymmetric: one more positive level than negative ones).
# 0.9677083 = ½ (1 - 1/(2·15) + 1 - 1/(2·16)) keeps Φ⁻¹ finite at the ends.
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_OFFSET = 0.9677083  # the outermost quantile probability used to derive NF4

QUANT_TYPES = ("int8", "int4", "nf4")
BITS = {"int8": 8, "int4": 4, "nf4": 4}
DQ_BLOCK_SIZE = 256  # constants per block in double quantization (QLoRA)


def levels(quant_type: str) -> tuple[float, ...]:
    """The sorted normalised levels in [-1, 1] of a format (its dequantization table)."""
    check_quant_type(quant_type)
    if quant_type == "nf4":
        return NF4
    qmax = 2 ** (BITS[quant_type] - 1) - 1  # 127 or 7
    return tuple(k / qmax for k in range(-qmax, qmax + 1))


def check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} must be one of {QUANT_TYPES}")


@dataclass
class QuantizedTensor:
    """A quantized array: what must be stored, and nothing else.

    ``codes`` (uint8): level indices, one per byte (int8) or two per byte (4-bit, low
    nibble first). ``absmax`` (float32, one per block), or, with double quantization,
    ``absmax_codes`` (uint8, one per block), ``absmax_scale`` (float32, one per 256
    constants) and ``absmax_offset`` (float32 scalar, their mean) instead.
    """

    shape: tuple
    dtype: object  # the dtype dequantization returns (the original weight's)
    quant_type: str
    block_size: int  # values per block (the whole tensor: its size)
    codes: object
    absmax: object = None
    absmax_codes: object = None
    absmax_scale: object = None
    absmax_offset: object = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, plus the block constants in whichever form they are kept."""
        kept = (self.codes, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return sum(int(a.nbytes) for a in kept if a is not None)

    def block_absmax(self):
        """The float32 absmax of each block (n_blocks,), decoded if double-quantized."""
        if not self.double_quant:
            return self.absmax
        xp = backend.get_array_module(self.absmax_codes)
        step = xp.asarray(levels("int8"), dtype=backend.float32)[self.absmax_codes]  # (nb,)
        scale = xp.repeat(self.absmax_scale, DQ_BLOCK_SIZE)[: step.size]  # per constant
        return step * scale + self.absmax_offset


def quantize(
    weight, quant_type: str = "nf4", block_size: int | None = 64, double_quant: bool = False
) -> QuantizedTensor:
    """Quantize an array (any shape) blockwise with absmax scaling; see the module doc.

    ``block_size=None``: one block for the whole tensor. ``double_quant``: quantize the
    block constants too (QLoRA). The array itself is not changed.
    """
    check_quant_type(quant_type)
    data = weight.data if isinstance(weight, Tensor) else weight
    if not backend.is_floating(data):
        raise TypeError(f"quantize: weight must be floating point, got dtype {data.dtype}")
    n = int(data.size)
    if n == 0:
        raise ValueError(f"quantize: weight has shape {tuple(data.shape)}, with no values")
    if block_size is None:
        block_size = n
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"quantize: block_size={block_size!r} must be a positive integer or None")
    xp = backend.get_array_module(data)
    n_blocks = -(-n // block_size)
    flat = xp.zeros(n_blocks * block_size, dtype=data.dtype)  # zero-padded to whole blocks
    flat[:n] = data.reshape(-1)
    blocks = flat.reshape(n_blocks, block_size)  # (nb, block)
    absmax = xp.abs(blocks).max(axis=1).astype(backend.float32)  # (nb,)
    codes = nearest_level(blocks, absmax, quant_type).reshape(-1)[:n]  # (n,) uint8
    q = QuantizedTensor(
        shape=tuple(data.shape),
        dtype=data.dtype,
        quant_type=quant_type,
        block_size=block_size,
        codes=pack(codes, BITS[quant_type]),
    )
    if double_quant:
        q.absmax_codes, q.absmax_scale, q.absmax_offset = quantize_constants(absmax)
    else:
        q.absmax = absmax
    return q


def nearest_level(blocks, absmax, quant_type: str):
    """Index (uint8) of the level nearest to each ``blocks / absmax`` (an all-zero block
    maps to the zero level)."""
    xp = backend.get_array_module(blocks)
    table = xp.asarray(levels(quant_type), dtype=backend.float64)  # (L,) sorted
    c = absmax.astype(backend.float64)[:, None]  # (nb, 1)
    x = blocks.astype(backend.float64) / xp.where(c > 0, c, 1.0)  # (nb, block) in [-1, 1]
    midpoints = (table[1:] + table[:-1]) / 2  # (L - 1,) decision boundaries
    return xp.searchsorted(midpoints, x).astype(xp.uint8)


def quantize_constants(absmax):
    """Double quantization of the block constants (nb,): (codes uint8 (nb,), scales float32
    (ceil(nb / 256),), offset float32 ()), absmax int8 of ``absmax - mean`` per 256."""
    xp = backend.get_array_module(absmax)
    offset = absmax.mean(dtype=backend.float64).astype(backend.float32)
    centred = absmax - offset  # (nb,) float32
    nb = centred.size
    n_groups = -(-nb // DQ_BLOCK_SIZE)
    padded = xp.zeros(n_groups * DQ_BLOCK_SIZE, dtype=backend.float32)
    padded[:nb] = centred
    groups = padded.reshape(n_groups, DQ_BLOCK_SIZE)
    scale = xp.abs(groups).max(axis=1)  # (n_groups,) float32: the absmax of each group
    codes = nearest_level(groups, scale, "int8").reshape(-1)[:nb]
    return codes, scale, xp.asarray(offset, dtype=backend.float32)


def dequantize(q: QuantizedTensor):
    """The array ``levels[code] · absmax`` of shape ``q.shape`` and dtype ``q.dtype``."""
    xp = backend.get_array_module(q.codes)
    codes = unpack(q.codes, BITS[q.quant_type], q.size)  # (n,)
    table = xp.asarray(levels(q.quant_type), dtype=q.dtype)
    per_value = xp.repeat(q.block_absmax().astype(q.dtype), q.block_size)[: q.size]  # (n,)
    return (table[codes] * per_value).reshape(q.shape)


def pack(codes, bits: int):
    """uint8 codes (n,) -> bytes: as they are (8 bits), or two per byte (4 bits, the first
    code in the low nibble; an odd count is padded with a zero nibble)."""
    if bits == 8:
        return codes
    xp = backend.get_array_module(codes)
    padded = xp.zeros(codes.size + codes.size % 2, dtype=xp.uint8)
    padded[: codes.size] = codes
    return padded[0::2] | (padded[1::2] << 4)  # (ceil(n / 2),)


def unpack(packed, bits: int, n: int):
    """The inverse of :func:`pack`: the first ``n`` codes, as int64 indices."""
    xp = backend.get_array_module(packed)
    if bits == 8:
        return packed.astype(backend.int64)
    codes = xp.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)  # (2 · bytes,)
    return codes[:n].astype(backend.int64)


def quantized_nbytes(
    n: int, quant_type: str, block_size: int | None = 64, double_quant: bool = False
) -> int:
    """The closed form of :attr:`QuantizedTensor.nbytes` for ``n`` values: codes
    ``n·bits/8`` (rounded up), plus 4 bytes per block, or, double-quantized, 1 byte per
    block, 4 per 256 blocks (rounded up) and 4 for the mean."""
    check_quant_type(quant_type)
    n_blocks = 1 if block_size is None else -(-n // block_size)
    codes = -(-n * BITS[quant_type] // 8)
    if double_quant:
        return codes + n_blocks + 4 * -(-n_blocks // DQ_BLOCK_SIZE) + 4
    return codes + 4 * n_blocks


class QuantizedLinear(Module):
    """A frozen ``Linear`` whose weight is stored quantized: ``y = x @ dequant(W).T + b``.

    The weight is a :class:`QuantizedTensor` (not a parameter: nothing can train it); the
    bias, if any, stays a float parameter. The forward dequantizes, then runs the reference
    ``linear`` on a constant weight, so no gradient is ever asked for it.

    The codes live on the device of the weight they were made from: quantize a model where
    it will run (``Module.to`` moves parameters, and a ``QuantizedTensor`` is not one).
    """

    def __init__(self, qweight: QuantizedTensor, bias: Parameter | None = None):
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantizedLinear: weight shape {qweight.shape} must be (out, in)")
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        self.bias = bias

    @classmethod
    def from_linear(
        cls,
        linear: Linear,
        quant_type: str = "nf4",
        block_size: int | str | None = 64,
        double_quant: bool = False,
    ) -> QuantizedLinear:
        """Quantize a ``Linear``'s weight (the ``Linear`` is left as it was; the bias object
        is shared, as ``LoRALinear.from_linear`` shares it). ``block_size="channel"``: one
        block per output channel (row), i.e. ``in_features`` values."""
        if block_size == "channel":
            block_size = linear.in_features
        qweight = quantize(linear.weight.data, quant_type, block_size, double_quant)
        layer = cls(qweight, linear.bias)
        layer.training = linear.training
        return layer

    def dequantized_weight(self) -> Tensor:
        return Tensor(dequantize(self.qweight))  # (out, in), no gradient

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        q = self.qweight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={q.quant_type}, "
            f"block_size={q.block_size}, double_quant={q.double_quant}"
        )


def quantized_layers(model: Module) -> list[tuple[str, Module]]:
    """(path, layer) for every module that stores a :class:`QuantizedTensor` ``qweight``."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(vars(m).get("qweight"), QuantizedTensor)
    ]


#: The layers a compressed GPT stores quantized: every Linear inside the blocks. The
#: embeddings, layer norms and ``lm_head`` stay float (as bitsandbytes leaves ``lm_head``).
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


def target_linears(model: Module, target_modules, caller: str) -> list[tuple[str, Linear]]:
    """(path, layer) for every plain ``Linear`` that ``target_modules`` names (PEFT's rule,
    ``lora.is_target``): what quantization, the SVD and pruning act on."""
    found = [
        (path, m)
        for path, m in model.named_modules()
        if type(m) is Linear and path and is_target(list(target_modules), path)
    ]
    if not found:
        raise ValueError(f"{caller}: target_modules={target_modules!r} match no Linear")
    return found


def quantize_model(
    model: Module,
    quant_type: str = "nf4",
    block_size: int | str | None = 64,
    double_quant: bool = False,
    target_modules=BLOCK_LINEARS,
) -> list[str]:
    """Replace every ``Linear`` that ``target_modules`` names (as in ``LoRAConfig``) by a
    :class:`QuantizedLinear` (``block_size`` as in :meth:`QuantizedLinear.from_linear`), in
    place; returns the replaced paths."""
    check_quant_type(quant_type)
    paths = [path for path, _ in target_linears(model, target_modules, "quantize_model")]
    for path in paths:
        layer = QuantizedLinear.from_linear(
            model.get_submodule(path), quant_type, block_size, double_quant
        )
        model.set_submodule(path, layer)
    return paths
