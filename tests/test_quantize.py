"""Post-training quantization (minilora/compression/quantize.py) and QLoRA
(minilora/compression/qlora.py).

What is proven: the NF4 table is QLoRA's (its derivation reproduces it, its shape
properties hold); every code is a nearest level, so the round-trip error is at most half a
step per element (int8 per tensor and per channel: scale / 2; blockwise: per block); each
block's largest |w| comes back exactly; the stored bytes are the closed forms; a
``QuantizedLinear`` is the reference linear on the dequantized weight and trains nothing;
LoRA on a quantized base passes gradcheck with the base frozen, equals the dequantized base
at init, merges exactly in float and changes outputs when re-quantized.
"""

from __future__ import annotations

import copy
import math
from statistics import NormalDist

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt, randomize_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import rng, seeds

import minilora as ml
from minilora import backend
from minilora import functional as F
from minilora.compression.qlora import QLoRALinear, apply_qlora, merge_qlora
from minilora.compression.quantize import (
    BITS,
    DQ_BLOCK_SIZE,
    NF4,
    NF4_OFFSET,
    QUANT_TYPES,
    QuantizedLinear,
    dequantize,
    levels,
    quantize,
    quantize_model,
    quantized_nbytes,
)
from minilora.lora import count_parameters, lora_layers

# Float32 rounding of the dequantized product levels[code] · absmax: at most half an ulp
# of a value no larger than the absmax, 2⁻²⁴ · absmax.
F32_ROUND = 2.0**-24


# --------------------------------------------------------------------------------------
# The NF4 code
# --------------------------------------------------------------------------------------


def test_nf4_is_sorted_contains_zero_and_ends_at_minus_one_and_one():
    assert len(NF4) == 16
    assert list(NF4) == sorted(NF4) and len(set(NF4)) == 16
    assert NF4.count(0.0) == 1 and NF4[7] == 0.0
    assert NF4[0] == -1.0 and NF4[-1] == 1.0
    # "symmetric-ish": 7 negative levels and 8 positive ones, each side spanning [0, 1]
    assert sum(v < 0 for v in NF4) == 7 and sum(v > 0 for v in NF4) == 8
    # every value is a float32 number (bitsandbytes stores the table in float32)
    assert np.array_equal(np.float32(NF4).astype(np.float64), np.float64(NF4))


def test_nf4_is_the_normal_quantile_construction():
    """Rebuild the table from its derivation (quantiles of N(0, 1), see quantize.py).
    bitsandbytes computed it with float32 probabilities, so the two agree to float32
    precision on values in [-1, 1]: 2 ulps of 1.0."""
    inv = NormalDist().inv_cdf
    positive = [inv(p) for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
    negative = [-inv(p) for p in np.linspace(NF4_OFFSET, 0.5, 8)[:-1]]
    table = np.sort(positive + [0.0] + negative)
    table /= table.max()
    np.testing.assert_allclose(table, NF4, rtol=0, atol=2 * 2.0**-23)


def test_levels_of_the_integer_formats():
    assert levels("int8") == tuple(k / 127 for k in range(-127, 128))
    assert levels("int4") == tuple(k / 7 for k in range(-7, 8))
    assert len(levels("int4")) <= 16 and len(levels("int8")) <= 256  # fit in their bits


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------

formats = st.sampled_from(QUANT_TYPES)


def _blocks(w, block_size):
    flat = np.zeros(math.ceil(w.size / block_size) * block_size, dtype=w.dtype)
    flat[: w.size] = w.reshape(-1)
    return flat.reshape(-1, block_size)


@settings(max_examples=30, deadline=None)
@given(
    seed=seeds,
    quant_type=formats,
    shape=st.tuples(st.integers(1, 9), st.integers(1, 70)),
    block_size=st.sampled_from([None, 1, 7, 64]),
)
def test_every_code_is_a_nearest_level(seed, quant_type, shape, block_size):
    """w' = levels[code] · c with code the nearest level to w / c: the error is the
    distance to the nearest level, at most half the gap around w (the bound of every
    format), and the codes are in range."""
    w = rng(seed).standard_normal(shape).astype(np.float32)
    q = quantize(w, quant_type, block_size)
    back = dequantize(q)
    assert back.shape == w.shape and back.dtype == np.float32
    size = w.size if block_size is None else block_size
    c = np.repeat(np.abs(_blocks(w, size)).max(axis=1), size)[: w.size]  # per element
    table = np.array(levels(quant_type))
    x = w.reshape(-1).astype(np.float64) / np.where(c > 0, c, 1)
    nearest = np.abs(x[:, None] - table[None, :]).min(axis=1) * c  # best possible error
    err = np.abs(back.reshape(-1).astype(np.float64) - w.reshape(-1))
    assert (err <= nearest + F32_ROUND * c + 1e-30).all()
    codes = np.asarray(q.codes)
    assert codes.dtype == np.uint8
    if BITS[quant_type] == 8:
        assert codes.max() < len(table)
    else:
        assert (codes & 0x0F).max() < len(table) and (codes >> 4).max() < len(table)


@pytest.mark.parametrize("per", ["tensor", "channel"])
def test_int8_absmax_error_is_at_most_half_a_step(per):
    w = rng(1).standard_normal((6, 40)).astype(np.float32)
    block_size = None if per == "tensor" else 40  # a row = an output channel
    q = quantize(w, "int8", block_size)
    absmax = np.abs(w).max() if per == "tensor" else np.abs(w).max(axis=1, keepdims=True)
    np.testing.assert_array_equal(q.absmax.reshape(-1), np.reshape(absmax, -1))
    scale = absmax / 127
    err = np.abs(dequantize(q) - w)
    assert (err <= scale / 2 + F32_ROUND * absmax).all()
    # and the bound is nearly reached: the step really is absmax / 127
    assert err.max() > 0.4 * np.min(scale)
    assert q.nbytes == w.size + 4 * (1 if per == "tensor" else 6)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_each_blocks_largest_value_comes_back_exactly(quant_type):
    w = rng(2).standard_normal((3, 64 * 2 + 10)).astype(np.float32)
    w[0, 5] = -7.0  # a negative maximum too
    back = dequantize(quantize(w, quant_type, 64)).reshape(-1)
    flat = w.reshape(-1)
    for start in range(0, flat.size, 64):
        block = flat[start : start + 64]
        i = start + int(np.abs(block).argmax())
        assert back[i] == flat[i]


def test_an_all_zero_block_is_zero_and_zero_is_exact():
    w = np.zeros((2, 64), dtype=np.float32)
    w[1, :3] = [0.5, 0.0, -0.25]
    for quant_type in QUANT_TYPES:
        back = dequantize(quantize(w, quant_type, 64))
        assert not back[0].any()
        assert back[1, 1] == 0.0


def test_blockwise_4bit_error_bound_per_block():
    """int4: half a step, absmax_block / 14; NF4: half the widest gap of its table."""
    w = rng(3).standard_normal((4, 128)).astype(np.float32)
    blocks_w = _blocks(w, 64)
    c = np.abs(blocks_w).max(axis=1, keepdims=True)
    for quant_type, half_step in [("int4", 1 / 14), ("nf4", np.diff(NF4).max() / 2)]:
        err = np.abs(_blocks(dequantize(quantize(w, quant_type, 64)), 64) - blocks_w)
        assert (err <= c * (half_step + F32_ROUND)).all(), quant_type


def test_nf4_beats_int4_on_normal_weights():
    """What NF4 is for: on normally distributed weights its levels, denser near zero, give
    a smaller mean squared error than evenly spaced int4 at the same bytes."""
    w = rng(4).standard_normal((64, 256)).astype(np.float32)
    mse = {t: float(((dequantize(quantize(w, t, 64)) - w) ** 2).mean()) for t in ("int4", "nf4")}
    assert mse["nf4"] < mse["int4"]


def test_quantize_leaves_its_input_alone_and_packs_two_codes_per_byte():
    w = rng(5).standard_normal((3, 5)).astype(np.float32)  # 15 values: an odd count
    before = w.copy()
    q = quantize(w, "nf4", 4)
    assert np.array_equal(w, before)
    assert q.codes.shape == (8,)  # ceil(15 / 2)
    assert (q.codes[-1] >> 4) == 0  # the padding nibble


# --------------------------------------------------------------------------------------
# Storage: exact bytes against the closed forms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(128, 256), (3, 50)])
def test_nbytes_equals_the_closed_form(quant_type, double_quant, shape):
    w = rng(6).standard_normal(shape).astype(np.float32)
    q = quantize(w, quant_type, 64, double_quant)
    assert q.nbytes == quantized_nbytes(w.size, quant_type, 64, double_quant)


def test_nf4_bytes_without_and_with_double_quantization():
    """The closed forms of docs/compression.md for n = 64·256·2 values: NF4 keeps n/2 bytes
    of codes and a float32 per 64 values; double quantization keeps one byte per block,
    a float32 per 256 blocks and the float32 mean."""
    n = 64 * DQ_BLOCK_SIZE * 2
    w = rng(7).standard_normal((128, n // 128)).astype(np.float32)
    assert quantize(w, "nf4", 64).nbytes == n // 2 + 4 * n // 64
    assert quantize(w, "nf4", 64, True).nbytes == n // 2 + n // 64 + 4 * n // (64 * 256) + 4
    # bits per parameter: 4.5 without, 4.127 with double quantization (QLoRA's figures)
    assert 8 * quantize(w, "nf4", 64).nbytes / n == 4.5
    assert 8 * quantize(w, "nf4", 64, True).nbytes / n == pytest.approx(4.127, abs=1e-3)


def test_double_quantized_constants_are_within_half_a_step():
    w = rng(8).standard_normal((64, 600)).astype(np.float32)  # 600 blocks: 3 groups of 256
    plain = quantize(w, "nf4", 64)
    dq = quantize(w, "nf4", 64, double_quant=True)
    assert dq.absmax is None and plain.absmax_codes is None
    assert np.array_equal(dq.codes, plain.codes)  # the weights' codes do not change
    offset = float(plain.absmax.astype(np.float64).mean())
    assert float(dq.absmax_offset) == pytest.approx(offset, rel=1e-6)
    centred = plain.absmax - np.float32(dq.absmax_offset)
    groups = np.zeros(3 * DQ_BLOCK_SIZE, np.float32)
    groups[: centred.size] = centred
    step = np.repeat(np.abs(groups.reshape(3, -1)).max(axis=1) / 127, DQ_BLOCK_SIZE)[:600]
    err = np.abs(dq.block_absmax() - plain.absmax)
    assert (err <= step / 2 + F32_ROUND * plain.absmax).all()
    assert err.max() > 0  # the constants really were rounded


def test_bad_input_is_refused():
    w = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="quant_type='fp8'"):
        quantize(w, "fp8")
    with pytest.raises(ValueError, match="block_size=0"):
        quantize(w, "nf4", 0)
    with pytest.raises(TypeError, match="floating point"):
        quantize(np.ones((2, 2), np.int64))


# --------------------------------------------------------------------------------------
# QuantizedLinear
# --------------------------------------------------------------------------------------


def test_quantized_linear_is_linear_on_the_dequantized_weight_and_trains_nothing():
    ml.manual_seed(0)
    linear = ml.Linear(64, 6)
    linear.bias.data[...] = rng(9).standard_normal(6)
    layer = QuantizedLinear.from_linear(linear, "nf4", 64)
    x = ml.Tensor(rng(10).standard_normal((2, 3, 64)).astype(np.float32), requires_grad=True)
    y = layer(x)
    expected = F.linear(x, ml.Tensor(dequantize(layer.qweight)), linear.bias)
    assert np.array_equal(y.numpy(), expected.numpy())
    assert not np.array_equal(dequantize(layer.qweight), linear.weight.data)  # really rounded
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    with backend.counting() as c:
        y.sum().backward()
    assert c.count("linear.dweight") == 0 and x.grad is not None


def test_quantize_model_replaces_the_block_linears_only():
    model = make_gpt(TINY_2x2)
    paths = quantize_model(model, "int8", "channel")
    assert len(paths) == 2 * 6
    assert type(model.lm_head) is ml.Linear
    layer = model.blocks[0].mlp.fc1
    assert isinstance(layer, QuantizedLinear) and layer.qweight.block_size == 8  # in_features


# --------------------------------------------------------------------------------------
# QLoRA: LoRA on a quantized frozen base
# --------------------------------------------------------------------------------------


def _qlora_layer(dtype, seed=11):
    w = rng(seed).standard_normal((5, 6)).astype(dtype)
    q = quantize(w, "nf4", 4, double_quant=True)
    bias = ml.Parameter(rng(seed + 1).standard_normal(5).astype(dtype), requires_grad=False)
    layer = QLoRALinear(q, bias, r=2, lora_alpha=4, generator=backend.Generator(seed))
    layer.lora_B.data[...] = rng(seed + 2).standard_normal((5, 2))
    return layer


def test_qlora_gradcheck_gives_input_and_adapter_gradients_and_the_base_none():
    layer = _qlora_layer(np.float64)
    assert layer.weight.dtype == np.float64  # the dequantized base follows the weight dtype

    def fn(x, A, B):
        layer.lora_A, layer.lora_B = A, B
        return layer(x)

    x = rng(12).standard_normal((3, 6))
    assert ml.gradcheck.gradcheck(fn, [x, layer.lora_A.data.copy(), layer.lora_B.data.copy()])
    # the base is a constant: no weight-gradient product is ever computed for it
    x_t = ml.Tensor(x, requires_grad=True)
    with backend.counting() as c:
        fn(x_t, ml.Tensor(layer.lora_A.data, requires_grad=True), ml.Tensor(layer.lora_B.data))
        layer(x_t).sum().backward()
    assert c.count("linear.dweight") == 0
    assert c.count("lora.dA") == 1 and c.count("lora.dB") == 0  # B given frozen here


def test_qlora_model_trains_only_the_adapters():
    model = randomize_weights(make_gpt(TINY_2x2), 0)
    quantize_model(model, "nf4", 64, double_quant=True)
    paths = apply_qlora(model, ml.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert paths == [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert count_parameters(model)[0] == 4 * 2 * (8 + 8)
    codes = [layer.qweight.codes.copy() for _, layer in lora_layers(model)]
    opt = ml.AdamW(model.parameters(), lr=0.1)
    idx = np.array([[1, 2, 3, 4]])
    _, loss = model(idx, idx)
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    opt.step()
    assert all(layer.lora_B.data.any() for _, layer in lora_layers(model))  # B moved
    for before, (_, layer) in zip(codes, lora_layers(model), strict=True):
        assert np.array_equal(layer.qweight.codes, before)  # the base did not


def _qlora_model(seed=0):
    base = randomize_weights(make_gpt(TINY_2x2), seed)
    quantize_model(base, "nf4", 64, double_quant=True)
    model = copy.deepcopy(base)
    apply_qlora(model, ml.LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "fc1"]))
    return base, model


def test_qlora_at_init_is_bitwise_the_dequantized_base():
    base, model = _qlora_model()
    idx = rng(13).integers(0, 11, (2, 6))
    for mode in (True, False):
        base.train(mode)
        model.train(mode)
        assert np.array_equal(model(idx)[0].numpy(), base(idx)[0].numpy())


def test_merge_into_float_is_exact_but_requantizing_changes_the_logits():
    _, model = _qlora_model()
    for _, layer in lora_layers(model):
        layer.lora_B.data[...] = 0.05 * rng(14).standard_normal(layer.lora_B.shape)
    idx = rng(15).integers(0, 11, (4, 6))
    with ml.no_grad():
        adapted = model(idx)[0].numpy()
        float_merged = merge_qlora(copy.deepcopy(model), requantize=False)
        requantized = merge_qlora(copy.deepcopy(model), requantize=True)
        exact = float_merged(idx)[0].numpy()
        rounded = requantized(idx)[0].numpy()
    assert not lora_layers(float_merged) and not lora_layers(requantized)
    np.testing.assert_allclose(exact, adapted, rtol=1e-5, atol=1e-5)  # float32 reordering
    assert np.abs(rounded - adapted).max() > 100 * np.abs(exact - adapted).max()
    with pytest.raises(TypeError, match="cannot merge in place"):
        ml.merge_lora(model)
