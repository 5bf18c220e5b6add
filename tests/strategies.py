"""Hypothesis strategies shared by the test suite.

Arrays are drawn as a *seed* and then filled by NumPy's ``default_rng``: much faster than
drawing every element through hypothesis, still reproducible (the seed is shrunk and
printed on failure), and the values stay in a small bounded range so that central
differences in float64 are accurate.

Shapes are small on purpose: ``gradcheck`` evaluates the op twice per input element.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

MAX_SIDE = 5

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


def shapes(min_dims: int = 1, max_dims: int = 4, min_side: int = 1, max_side: int = MAX_SIDE):
    """Tuples of ``min_dims..max_dims`` sizes, each in ``min_side..max_side``."""
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(
        tuple
    )


@st.composite
def broadcast_pairs(draw, min_dims: int = 1, max_dims: int = 4, max_side: int = MAX_SIDE):
    """Two shapes that broadcast together to one full shape.

    One side may lack some leading dims (possibly all of them: a 0-d scalar); on every
    axis they share, either side may be the one stretched from 1 (so both can stretch,
    on different axes), and the order of the pair is random.
    """
    full = draw(shapes(min_dims, max_dims, max_side=max_side))
    drop = draw(st.integers(0, len(full)))  # leading dims the partner lacks
    main, partner = list(full), list(full[drop:])
    for i in range(len(partner)):
        stretched = draw(st.sampled_from(["neither", "partner", "main"]))
        if stretched == "partner":
            partner[i] = 1
        elif stretched == "main":
            main[drop + i] = 1
    pair = (tuple(main), tuple(partner))
    return pair[::-1] if draw(st.booleans()) else pair


def axes(ndim: int):
    """A reduction ``axis`` for an array of ``ndim`` dims: None, an int (maybe negative),
    or a tuple of distinct non-negative axes."""
    if ndim == 0:
        return st.none()
    return st.one_of(
        st.none(),
        st.integers(-ndim, ndim - 1),
        st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple),
    )


@st.composite
def reshape_targets(draw, shape: tuple):
    """A shape with as many elements as ``shape``: its prime factors shuffled and regrouped,
    with some 1s inserted and sometimes one dim written as -1."""
    size = math.prod(shape)
    factors, n, p = [], size, 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    factors = draw(st.permutations(factors))
    dims, current = [], 1
    for f in factors:
        current *= f
        if draw(st.booleans()):
            dims.append(current)
            current = 1
    if current > 1 or not dims:
        dims.append(current)
    for _ in range(draw(st.integers(0, 2))):
        dims.insert(draw(st.integers(0, len(dims))), 1)
    if draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    return tuple(dims)


@st.composite
def attention_shapes(draw):
    """(B, n_head, T, head_size), small."""
    return (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
    )


# --------------------------------------------------------------------------------------
# Arrays (float64 unless a dtype is given)
# --------------------------------------------------------------------------------------


@st.composite
def arrays(draw, shape: tuple, low: float = -2.0, high: float = 2.0, dtype=np.float64):
    """Uniform values in ``[low, high)``."""
    return rng(draw(seeds)).uniform(low, high, size=shape).astype(dtype)


@st.composite
def nonzero_arrays(draw, shape: tuple, low: float = 0.5, high: float = 2.0):
    """Magnitudes in ``[low, high)`` with random signs: safe to divide by."""
    r = rng(draw(seeds))
    return r.uniform(low, high, size=shape) * r.choice([-1.0, 1.0], size=shape)


@st.composite
def distinct_arrays(draw, shape: tuple, low: float = -2.0, high: float = 2.0):
    """Values in ``[low, high)`` that are pairwise at least ``(high - low) / size`` apart:
    no ties for ``max``, and no near-constant rows for ``layer_norm``."""
    size = math.prod(shape)
    r = rng(draw(seeds))
    spacing = (high - low) / max(size, 1)
    values = low + spacing * (r.permutation(size) + 0.5 * r.random(size))
    return values.reshape(shape)


@st.composite
def int_arrays(draw, shape: tuple, low: int, high: int):
    """Integers in ``[low, high)`` (int64); with a small range, repeats are likely."""
    return rng(draw(seeds)).integers(low, high, size=shape, dtype=np.int64)


def frozen_subsets(n_inputs: int, candidates=None):
    """``no_grads`` choices: a tuple of input positions to freeze, never all of them."""
    candidates = list(range(n_inputs)) if candidates is None else list(candidates)
    max_size = min(len(candidates), n_inputs - 1)
    return st.lists(st.sampled_from(candidates), max_size=max_size, unique=True).map(
        lambda xs: tuple(sorted(xs))
    )


# ---- model and LoRA strategies
#
# Tiny GPT and LoRA configurations (tests/test_nn.py, test_model.py, test_optim.py,
# test_lora.py). vocab 5..20, block 4..8, 1..2 layers and heads, n_embd in {4, 8, 12}
# (divisible by either head count), so one forward pass costs about a millisecond. Every
# adapted matrix has min(out, in) >= 4, so ranks 1..4 always fit.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "lm_head")
LORA_BIAS_MODES = ("none", "all", "lora_only")
float_dtypes = st.sampled_from([np.float32, np.float64])


def linear_shape(config, leaf: str) -> tuple[int, int]:
    """The (out, in) weight shape of the GPT Linear layer named ``leaf`` (minilora/model.py)."""
    C = config.n_embd
    return {
        "q_proj": (C, C),
        "k_proj": (C, C),
        "v_proj": (C, C),
        "o_proj": (C, C),
        "fc1": (4 * C, C),
        "fc2": (C, 4 * C),
        "lm_head": (config.vocab_size, C),
    }[leaf]


@st.composite
def gpt_configs(draw, dropout=None, bias=None, max_layers: int = 2):
    """A small ``GPTConfig``; ``dropout``/``bias`` are strategies (default 0.0 / any)."""
    from minilora import GPTConfig  # keep this module importable alone

    return GPTConfig(
        vocab_size=draw(st.integers(5, 20)),
        block_size=draw(st.integers(4, 8)),
        n_layer=draw(st.integers(1, max_layers)),
        n_head=draw(st.integers(1, 2)),
        n_embd=draw(st.sampled_from([4, 8, 12])),
        dropout=draw(dropout if dropout is not None else st.just(0.0)),
        bias=draw(bias if bias is not None else st.booleans()),
    )


@st.composite
def lora_configs(draw, config, targets=None, lora_dropout=None, bias=None, max_r: int = 4):
    """A ``LoRAConfig`` valid for ``config``: a non-empty subset of targets, a rank in
    1..min(max_r, min(out, in) over the targets), any alpha, rsLoRA and init mode."""
    from minilora import LoRAConfig

    if targets is None:
        targets = draw(st.lists(st.sampled_from(LORA_TARGETS), min_size=1, unique=True))
    max_rank = min(max_r, *(min(linear_shape(config, t)) for t in targets))
    return LoRAConfig(
        r=draw(st.integers(1, max_rank)),
        lora_alpha=draw(st.one_of(st.sampled_from([1, 2, 8, 16]), st.floats(0.25, 32.0))),
        lora_dropout=draw(lora_dropout if lora_dropout is not None else st.just(0.0)),
        target_modules=list(targets),
        bias=draw(bias if bias is not None else st.sampled_from(LORA_BIAS_MODES)),
        use_rslora=draw(st.booleans()),
        init_lora_weights=draw(st.sampled_from(["gaussian", "kaiming"])),
    )


@st.composite
def token_batches(draw, config, max_batch: int = 3, min_len: int = 1):
    """``(idx, targets)``: int64 arrays (B, T), B in 1..max_batch, T in min_len..block_size."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(min_len, config.block_size))
    r = rng(draw(seeds))
    V = config.vocab_size
    return r.integers(0, V, (B, T), dtype=np.int64), r.integers(0, V, (B, T), dtype=np.int64)
