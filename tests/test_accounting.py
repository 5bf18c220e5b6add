"""Closed-form accounting checked against live models.

Every formula in ``minilora.study.accounting`` is compared with what an instantiated model has
and does: parameters counted, gradient bytes and optimizer-state bytes read from the
arrays, the adapter's saved tensors, the arrays the graph keeps for backward, and the
matrix products the engine records (``backend.counting()``), per name, exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import struct
import tempfile
from collections import Counter, defaultdict

import numpy as np
import pytest
from helpers import TINY_2x2
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from minilora import GPT, SGD, AdamW, GPTConfig, LoRAConfig, apply_lora, backend, lora_state_dict
from minilora.lora import BIAS_MODES, count_parameters, print_trainable_parameters
from minilora.study import accounting as acc
from minilora.study.accounting import LoRASpec, ModelShape

# every test here runs on the fast path and on the reference ops (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("ops")

# --------------------------------------------------------------------------------------
# Strategies: small random models and LoRA setups
# --------------------------------------------------------------------------------------


@st.composite
def gpt_configs(draw):
    n_head = draw(st.integers(1, 3))
    return GPTConfig(
        vocab_size=draw(st.integers(2, 12)),
        block_size=draw(st.integers(1, 6)),
        n_layer=draw(st.integers(1, 3)),
        n_head=n_head,
        n_embd=n_head * draw(st.integers(1, 4)),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.25])),
        bias=draw(st.booleans()),
    )


@st.composite
def lora_specs(draw, config: GPTConfig):
    """Targets, one rank or per-module ranks (each within the target's bound), bias mode."""
    targets = draw(st.lists(st.sampled_from(acc.TARGET_MODULES), min_size=1, unique=True))
    C, V = config.n_embd, config.vocab_size

    def bound(name):
        return min(V, C) if name == "lm_head" else C

    if draw(st.booleans()):
        r = {t: draw(st.integers(1, bound(t))) for t in targets}
    else:
        r = draw(st.integers(1, min(bound(t) for t in targets)))
    return LoRASpec(
        targets,
        r,
        bias=draw(st.sampled_from(BIAS_MODES)),
        lora_dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
    )


@st.composite
def setups(draw):
    """(config, tied, spec or None for full fine-tuning)."""
    config = draw(gpt_configs())
    spec = draw(st.one_of(st.none(), lora_specs(config)))
    return config, draw(st.booleans()), spec


def build(config: GPTConfig, tied: bool, spec: LoRASpec | None, dtype=np.float32) -> GPT:
    """The live model the accounting describes: per-module ranks are applied by one
    ``apply_lora`` call per distinct rank (each call re-marks what trains)."""
    model = GPT(config, dtype=dtype)
    if tied:  # as GPT-2/GPT-3: lm_head uses the token embedding matrix, (V, C) both
        model.lm_head.weight = model.tok_emb.weight
    if spec is None:
        return model
    shape = ModelShape.from_config(config, tied=tied)
    by_rank = defaultdict(list)
    for name, r in spec.ranks(shape).items():
        by_rank[r].append(name)
    for r, names in by_rank.items():
        apply_lora(
            model,
            LoRAConfig(r=r, target_modules=names, bias=spec.bias, lora_dropout=spec.lora_dropout),
        )
    return model


def _base(a):
    while a.base is not None:
        a = a.base
    return a


def saved_activation_bytes(loss, model) -> int:
    """Bytes of the distinct floating arrays the graph's nodes hold for backward (views
    resolved to the array they view; parameters excluded)."""
    params = {id(_base(p.data)) for p in model.parameters()}
    held, nodes, stack = {}, set(), [loss]
    while stack:
        fn = stack.pop()._ctx
        if fn is None or id(fn) in nodes:
            continue
        nodes.add(id(fn))
        for value in vars(fn).values():
            if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
                base = _base(value)
                if id(base) not in params:
                    held[id(base)] = base.nbytes
        stack.extend(t for t in fn.inputs if t is not None)
    return sum(held.values())


def batch(config: GPTConfig, B: int, T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, size=(B, T + 1))
    return ids[:, :-1], ids[:, 1:]


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@given(setups())
def test_parameter_counts_equal_a_live_model(setup):
    config, tied, spec = setup
    shape = ModelShape.from_config(config, tied=tied)
    model = build(config, tied, None)
    assert sum(p.size for p in model.parameters()) == acc.total_params(shape)
    if spec is not None:
        model = build(config, tied, spec)
        adapters = sum(p.size for n, p in model.named_parameters() if ".lora_" in n)
        assert adapters == acc.lora_params(shape, spec)
    trainable, total = count_parameters(model)
    assert total == acc.all_params(shape, spec)
    assert trainable == acc.trainable_params(shape, spec)
    counts = acc.param_counts(shape, spec)
    assert counts["trainable_fraction"] == trainable / total
    biases = sum(p.size for n, p in model.named_parameters() if n.endswith(".bias"))
    assert biases == acc.bias_params(shape)


@given(setups())
def test_print_trainable_parameters_prints_peft_line(setup):
    config, tied, spec = setup
    shape = ModelShape.from_config(config, tied=tied)
    model = build(config, tied, spec)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_trainable_parameters(model)
    m = re.fullmatch(
        r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})\n",
        out.getvalue(),
    )
    assert m, out.getvalue()
    trainable, total = (int(g.replace(",", "")) for g in m.groups()[:2])
    assert (trainable, total) == (acc.trainable_params(shape, spec), acc.all_params(shape, spec))
    assert m.group(3) == f"{100 * trainable / total:.4f}"


def test_print_trainable_parameters_is_exported():
    import minilora

    assert minilora.print_trainable_parameters is print_trainable_parameters
    assert "print_trainable_parameters" in minilora.__all__


def test_untying_adds_exactly_the_output_matrix():
    shape = ModelShape(3, 16, 4, vocab_size=11, block_size=7)
    assert acc.total_params(shape, tied=False) - acc.total_params(shape, tied=True) == 11 * 16


# --------------------------------------------------------------------------------------
# One training step: FLOPs by name, saved activations, gradients, optimizer state
# --------------------------------------------------------------------------------------


def check_step(config, tied, spec, B, T, optimizer, dtype):
    """One real forward + backward + optimizer step against every formula."""
    shape = ModelShape.from_config(config, tied=tied)
    model = build(config, tied, spec, dtype)
    idx, targets = batch(config, B, T)

    with backend.counting() as fwd:
        _, loss = model(idx, targets)
    saved = saved_activation_bytes(loss, model)
    with backend.counting() as bwd:
        loss.backward()

    trace = acc.trace_step(shape, spec, B, T)
    assert Counter((r.name, r.flops) for r in fwd.records) == trace.by_name("forward")
    assert Counter((r.name, r.flops) for r in bwd.records) == trace.by_name("backward")
    per_token = acc.flops_per_token(shape, spec, T)  # rounded down where not an integer
    assert per_token["forward"] == fwd.flops // (B * T)
    assert per_token["backward"] == bwd.flops // (B * T)

    name = np.dtype(dtype).name
    memory = acc.train_memory(shape, spec, name, B, T, optimizer)
    assert saved == memory["activations"]
    params = model.parameters()
    assert sum(p.data.nbytes for p in params) == memory["weights"]
    assert sum(p.grad.nbytes for p in params if p.grad is not None) == memory["gradients"]
    assert all(p.grad is None for p in params if not p.requires_grad)

    trainable = [p for p in params if p.requires_grad]
    opt = {
        "adamw": lambda: AdamW(trainable, lr=1e-3),
        "sgd-momentum": lambda: SGD(trainable, lr=1e-2, momentum=0.9),
        "sgd": lambda: SGD(trainable, lr=1e-2),
    }[optimizer]()
    opt.step()
    assert opt.state_nbytes() == memory["optimizer_state"]


@given(
    setups(),
    st.integers(1, 2),
    st.data(),
    st.sampled_from(["adamw", "sgd-momentum", "sgd"]),
    st.sampled_from([np.float32, np.float64]),
)
def test_training_step_equals_the_trace(setup, B, data, optimizer, dtype):
    config, tied, spec = setup
    T = data.draw(st.integers(1, config.block_size), label="T")
    check_step(config, tied, spec, B, T, optimizer, dtype)


CONFIG = TINY_2x2
DROPPY = dataclasses.replace(TINY_2x2, dropout=0.2)


@pytest.mark.parametrize(
    "config, tied, spec",
    [
        (CONFIG, False, None),  # full fine-tuning
        (DROPPY, True, None),  # tied, with dropout masks
        (CONFIG, False, LoRASpec(["q_proj", "v_proj"], 4)),  # the paper's choice
        (CONFIG, False, LoRASpec(["lm_head"], 3)),  # nothing below the head needs a gradient
        (CONFIG, False, LoRASpec(["fc2"], 2)),  # block 0's attention has no backward
        (CONFIG, False, LoRASpec(["k_proj"], 2, bias="all")),  # biases make block 0 a node
        (CONFIG, True, LoRASpec(None, {"q_proj": 1, "fc1": 8, "lm_head": 5}, "lora_only")),
        (DROPPY, False, LoRASpec(["q_proj", "o_proj", "fc1"], 2, lora_dropout=0.1)),
    ],
)
def test_training_step_equals_the_trace_for_known_cases(config, tied, spec):
    check_step(config, tied, spec, 2, 5, "adamw", np.float32)


@pytest.mark.parametrize("spec", [None, LoRASpec(["q_proj", "v_proj"], 2)])
def test_training_step_equals_the_trace_over_several_query_blocks(spec):
    config = dataclasses.replace(CONFIG, block_size=150)
    check_step(config, False, spec, 2, 150, "adamw", np.float32)  # 64 + 64 + 22 query rows


def test_the_trace_follows_its_ops_argument(ops):
    shape = ModelShape(2, 32, 4, vocab_size=10, block_size=130)
    here = acc.trace_step(shape, None, 2, 130)  # the engine's path now: ops
    with backend.use_ops("reference" if ops == "fast" else "fast"):
        assert acc.trace_step(shape, None, 2, 130, ops=ops).records == here.records
        assert acc.trace_step(shape, None, 2, 130).records != here.records


def test_lora_backward_has_no_weight_gradient_and_full_backward_is_twice_forward(ops):
    shape = ModelShape(4, 32, 4, vocab_size=50, block_size=16)
    spec = LoRASpec(["q_proj", "v_proj"], 4)
    assert acc.trace_step(shape, spec, 2, 16).flops("backward", "linear.dweight") == 0
    full = acc.flops_per_token(shape, None)
    # every product gets dinput + dweight (at T = 16, one query block, the fast path keeps P
    # and recomputes nothing)
    assert full["backward"] == 2 * full["forward"]
    cmp = acc.flops_comparison(shape, spec)
    assert 0 < cmp["weight_gradient_share"] < 0.5
    assert cmp["lora"]["backward"] < cmp["full_ft"]["backward"]


# --------------------------------------------------------------------------------------
# The closed forms stated in docs/accounting.md, against the general trace
# --------------------------------------------------------------------------------------

shapes = st.builds(
    lambda L, nh, hs, V, T: ModelShape(L, nh * hs, nh, vocab_size=V, block_size=T),
    st.integers(1, 6),
    st.integers(1, 8),
    st.integers(1, 16),
    st.integers(2, 500),
    st.integers(1, 300),  # up to 5 blocks of 64 query rows on the fast path
)


@given(shapes, st.integers(1, 4), st.data())
def test_closed_forms_in_the_docs(ops, shape, B, data):
    L, C, V, nh = shape.n_layer, shape.n_embd, shape.vocab_size, shape.n_head
    T = data.draw(st.integers(1, shape.block_size), label="T")
    r = data.draw(st.integers(1, C), label="r")
    N = B * T
    # per sequence, the (query, key) pairs each attention product covers, and what
    # attention saves besides q, k, v: the reference's T×T square and P; the fast path's
    # blocks of Q = 64 query rows, each against its key prefix, and one lse per row
    # (P when T fits in one block, and then nothing recomputed)
    Q, m = 64, -(-T // 64)
    K = T * T if ops == "reference" else Q * Q * m * (m - 1) // 2 + T * (T - (m - 1) * Q)
    keeps_p = ops == "reference" or T <= Q
    saved = nh * B * T * T if keeps_p else nh * B * T
    recompute = 0 if keeps_p else 1  # else the fast backward recomputes the scores

    tr_full = acc.trace_step(shape, None, B, T)
    tr_lora = acc.trace_step(shape, LoRASpec(["q_proj", "v_proj"], r), B, T)

    # full fine-tuning: forward and backward over the whole step, in FLOPs
    fwd = N * 2 * (12 * C * C * L + C * V) + 4 * B * K * C * L
    bwd = 2 * fwd + recompute * 2 * B * K * C * L
    assert (tr_full.flops("forward"), tr_full.flops("backward")) == (fwd, bwd)
    act = L * (16 * N * C + 2 * N + saved) + 2 * N * C + N + N * V
    assert acc.activation_bytes(shape, None, "float32", B, T) == 4 * act

    # LoRA on q_proj and v_proj, rank r, no bias
    spec = LoRASpec(["q_proj", "v_proj"], r)
    assert tr_lora.flops("forward") == fwd + N * 8 * C * r * L
    block0 = N * (18 * C * C + 12 * C * r) + (6 + 2 * recompute) * B * K * C
    rest = N * (24 * C * C + 16 * C * r) + (8 + 2 * recompute) * B * K * C
    assert tr_lora.flops("backward") == block0 + (L - 1) * rest + N * 2 * C * V
    act0 = 9 * N * C + 2 * N * r + N + saved
    act_rest = 10 * N * C + 2 * N * r + 2 * N + saved
    expected = act0 + (L - 1) * act_rest + N * C + N + N * V
    assert acc.activation_bytes(shape, spec, "float16", B, T) == 2 * expected

    # per token: the same, divided by N (rounded down where the fast path's K/T is not whole)
    assert acc.flops_per_token(shape, None, T)["forward"] == fwd // N
    assert acc.flops_per_token(shape, spec, T)["backward"] == tr_lora.flops("backward") // N

    # parameters: |Θ| = 2·L̂·d·r for square matrices
    assert acc.lora_params(shape, spec) == 2 * (2 * L) * C * r


# --------------------------------------------------------------------------------------
# Adapter checkpoint size, from the saved tensors
# --------------------------------------------------------------------------------------


@given(setups().filter(lambda s: s[2] is not None), st.sampled_from(["float16", "float32"]))
def test_adapter_bytes_equal_the_saved_tensors(setup, dtype):
    config, tied, spec = setup
    shape = ModelShape.from_config(config, tied=tied)
    model = build(config, tied, spec)
    tensors = {k: v.astype(dtype) for k, v in lora_state_dict(model, spec.bias).items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter_model.safetensors")
        save_file(tensors, path)
        loaded = load_file(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        size = os.path.getsize(path)
    expected = acc.adapter_bytes(shape, spec, dtype)
    assert sum(v.nbytes for v in loaded.values()) == expected
    data_end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    assert data_end == expected and size == 8 + header_len + expected


# --------------------------------------------------------------------------------------
# Presets and the numbers quoted in the docs
# --------------------------------------------------------------------------------------

RELEASED = {  # parameter counts of the released GPT-2 checkpoints (tied embeddings)
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", list(acc.PRESETS))
def test_preset_totals_match_published_sizes(name):
    preset = acc.get_preset(name)
    total = acc.total_params(preset.shape)
    assert abs(total - preset.published_params) <= 0.01 * preset.published_params
    if name in RELEASED:
        assert total == RELEASED[name]
    assert preset.source


def test_gpt3_lora_numbers():
    shape = acc.get_preset("gpt3-175b").shape
    assert acc.total_params(shape) == 174_604_259_328
    spec = LoRASpec(["q_proj", "v_proj"], 4)
    assert acc.lora_params(shape, spec) == 18_874_368  # the paper's "18M" budget (sec. 7.1)
    assert acc.adapter_bytes(shape, spec, "float16") == 37_748_736
    assert acc.lora_params(shape, LoRASpec(["q_proj", "v_proj"], 1)) == 4_718_592
    assert acc.lora_params(shape, LoRASpec(["q_proj", "v_proj"], 8)) == 37_748_736
    assert acc.get_preset("gpt3") is acc.get_preset("gpt3-175b")


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        acc.get_preset("gpt5")
    assert all(name in str(e.value) for name in acc.PRESETS)


def test_unknown_target_lists_valid_names():
    with pytest.raises(ValueError) as e:
        LoRASpec(["q_proj", "c_attn"], 4)
    assert "'c_attn'" in str(e.value)
    assert all(name in str(e.value) for name in acc.TARGET_MODULES)
    with pytest.raises(ValueError, match="valid names"):
        LoRASpec(None, {"qkv": 2})


@pytest.mark.parametrize(
    "r, target, pattern",
    [
        (0, "q_proj", r"r=0 for q_proj \(weight shape \(32, 32\).*not a positive integer"),
        (-3, "fc1", r"r=-3 for fc1 \(weight shape \(128, 32\).*not a positive integer"),
        (2.5, "v_proj", r"r=2.5 for v_proj \(weight shape \(32, 32\).*not a positive integer"),
        (True, "o_proj", r"r=True for o_proj .*not a positive integer"),
        (33, "fc2", r"r=33 for fc2 \(weight shape \(32, 128\).*larger than min\(out, in\) = 32"),
        (11, "lm_head", r"r=11 for lm_head \(weight shape \(10, 32\).*min\(out, in\) = 10"),
    ],
)
def test_bad_rank_names_module_and_shape(r, target, pattern):
    shape = ModelShape(2, 32, 4, vocab_size=10, block_size=8)
    with pytest.raises(ValueError, match=pattern):
        acc.lora_params(shape, LoRASpec([target], r))
    with pytest.raises(ValueError, match=pattern):
        acc.report(shape, LoRASpec(None, {target: r}))


def test_other_bad_input():
    with pytest.raises(ValueError, match="bias="):
        LoRASpec(["q_proj"], 4, bias="some")
    with pytest.raises(ValueError, match="give a rank for exactly"):
        LoRASpec(["q_proj", "v_proj"], {"q_proj": 4})
    shape = ModelShape(2, 32, 4, vocab_size=10, block_size=8)
    with pytest.raises(ValueError, match="seq_len=9 is larger than block_size=8"):
        acc.flops_per_token(shape, None, 9)
    with pytest.raises(ValueError, match="optimizer="):
        acc.train_memory(shape, None, optimizer="lion")
    with pytest.raises(ValueError, match=r"ops='quick' is not one of \('fast', 'reference'\)"):
        acc.trace_step(shape, None, 1, 8, ops="quick")
    with pytest.raises(ValueError, match="dtype="):
        acc.dtype_bytes("int8")
    with pytest.raises(ValueError, match="divisible"):
        ModelShape(2, 30, 4, vocab_size=10, block_size=8)


def test_accepts_minilora_configs():
    config = GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=16)
    lora = LoRAConfig(r=2, target_modules=["q_proj", "fc1"], bias="lora_only")
    shape = ModelShape.from_config(config)
    assert acc.trainable_params(config, lora) == acc.trainable_params(
        shape, LoRASpec(["q_proj", "fc1"], 2, bias="lora_only")
    )
    assert acc.dtype_bytes(np.float16) == acc.dtype_bytes(np.dtype("float16")) == 2


def test_the_trace_takes_constant_work_in_the_number_of_layers():
    """A million layers are two kinds of block counted, not a million walked: the trace of
    L layers equals L copies of the steady block plus what differs (block 0, the ends)."""
    spec = LoRASpec(["q_proj", "v_proj"], 4)
    small, huge = (acc.trace_step(ModelShape(L, 32, 4, 50, 16), spec, 2, 16) for L in (3, 10**6))
    assert set(huge.records) == set(small.records) and len(huge.saved) == len(small.saved)
    steady = (
        acc.trace_step(ModelShape(3, 32, 4, 50, 16), spec, 2, 16).flops()
        - acc.trace_step(ModelShape(2, 32, 4, 50, 16), spec, 2, 16).flops()
    )  # what one more layer adds
    assert huge.flops() == small.flops() + (10**6 - 3) * steady
