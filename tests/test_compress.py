"""Network compression: truncated SVD (minilora/compression/lowrank.py), magnitude pruning
(minilora/compression/prune.py), and the one-call variants and byte counts
(minilora/compression/compress.py).

What is proven: the SVD layer's error is exactly Eckart–Young's (Frobenius: the root sum
of squares of the dropped singular values; spectral: the first dropped one), its output is
x W_kᵀ + b and its parameters k(in + out) + out; pruning zeroes exactly round(s·n)
weights, the smallest ones, and masks keep them zero through an optimizer step; removing
a unit whose outgoing weights are zero leaves the logits unchanged while the parameter
count falls by the closed form; dropping a block is the model built without it; and
``storage_bytes`` is the closed form of each representation.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt, randomize_weights, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import rng, seeds

import minilora as ml
from minilora.compression.compress import METHODS, compressed, storage_bytes, stored_parameters
from minilora.compression.lowrank import LowRankLinear, low_rank_parameters, svd_compress
from minilora.compression.prune import (
    block_importance,
    csr_nbytes,
    drop_blocks,
    drop_least_important_blocks,
    n_pruned,
    prune_connections,
    prune_neurons,
    reapply_masks,
    sparsity_report,
)
from minilora.compression.quantize import BLOCK_LINEARS, quantized_nbytes
from minilora.lora import count_parameters

# --------------------------------------------------------------------------------------
# Truncated SVD
# --------------------------------------------------------------------------------------


def _linear(out_f, in_f, seed, dtype=np.float64):
    linear = ml.Linear(in_f, out_f, dtype=dtype)
    linear.weight.data[...] = rng(seed).standard_normal((out_f, in_f))
    linear.bias.data[...] = rng(seed + 1).standard_normal(out_f)
    return linear


@settings(max_examples=20, deadline=None)
@given(seed=seeds, out_f=st.integers(1, 9), in_f=st.integers(1, 9), data=st.data())
def test_svd_error_is_eckart_young(seed, out_f, in_f, data):
    rank = data.draw(st.integers(1, min(out_f, in_f)))
    linear = _linear(out_f, in_f, seed)
    W = linear.weight.data.copy()
    layer = LowRankLinear.from_linear(linear, rank)
    W_k = layer.low_rank_weight()
    sigma = np.linalg.svd(W, compute_uv=False)  # descending
    tail = sigma[rank:]
    scale = sigma[0] * 1e-12  # float64 rounding of the factorisation
    assert abs(np.linalg.norm(W - W_k) - np.sqrt((tail**2).sum())) <= 10 * scale
    spectral = tail[0] if tail.size else 0.0
    assert abs(np.linalg.norm(W - W_k, ord=2) - spectral) <= 10 * scale
    assert np.linalg.matrix_rank(W_k, tol=1e-9 * sigma[0]) <= rank


def test_svd_layer_computes_x_wk_plus_b_and_counts_its_parameters():
    linear = _linear(7, 5, seed=1)
    layer = LowRankLinear.from_linear(linear, 2)
    x = ml.Tensor(rng(2).standard_normal((3, 4, 5)))
    expected = x.numpy() @ layer.low_rank_weight().T + linear.bias.data
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert layer.down.weight.shape == (2, 5) and layer.up.weight.shape == (7, 2)
    assert layer.down.bias is None and layer.up.bias is linear.bias
    total = sum(p.size for p in layer.parameters())
    assert total == low_rank_parameters(5, 7, 2) == 2 * (5 + 7) + 7


def test_full_rank_svd_is_the_layer_itself():
    linear = _linear(4, 6, seed=3)
    layer = LowRankLinear.from_linear(linear, 4)
    np.testing.assert_allclose(layer.low_rank_weight(), linear.weight.data, atol=1e-12)


def test_svd_compress_replaces_the_targets_and_refuses_a_bad_rank_unchanged():
    model = randomize_weights(make_gpt(TINY_2x2), 0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"rank=9 .*blocks\.0\.attn\.q_proj.*\[1, 8\]"):
        svd_compress(model, 9)
    assert snapshot(model) == before
    paths = svd_compress(model, 3, ["fc1", "fc2"])
    assert paths == [f"blocks.{i}.mlp.{n}" for i in range(2) for n in ("fc1", "fc2")]
    assert isinstance(model.blocks[1].mlp.fc2, LowRankLinear)
    assert type(model.blocks[1].attn.q_proj) is ml.Linear
    _, total = count_parameters(model)
    saved = 4 * ((8 * 32 + 32) - low_rank_parameters(8, 32, 3))  # fc1 and fc2, both blocks
    assert total == sum(p.size for p in make_gpt(TINY_2x2).parameters()) - saved


# --------------------------------------------------------------------------------------
# Connection pruning
# --------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=seeds, sparsity=st.floats(0.0, 0.99), scope=st.sampled_from(["layer", "global"]))
def test_connection_pruning_zeroes_exactly_the_smallest(seed, sparsity, scope):
    model = randomize_weights(make_gpt(TINY_2x2), seed % 1000)
    weights = {p: m.weight.data.copy() for p, m in model.named_modules() if type(m) is ml.Linear}
    paths = prune_connections(model, sparsity, scope=scope)
    assert len(paths) == 2 * len(BLOCK_LINEARS)
    report = sparsity_report(model)
    if scope == "layer":
        for path in paths:
            n = weights[path].size
            assert report["layers"][path] == (n_pruned(sparsity, n), n)
    assert report["zeros"] == sum(z for z, _ in report["layers"].values())
    if scope == "global":
        assert report["zeros"] == n_pruned(sparsity, report["size"])
    # the pruned weights are the smallest: none kept is smaller than any pruned
    groups = [[p] for p in paths] if scope == "layer" else [paths]
    for group in groups:
        masks = {p: model.get_submodule(p).weight_mask for p in group}
        kept = np.concatenate([model.get_submodule(p).weight.data[masks[p]] for p in group])
        pruned = np.concatenate([weights[p][~masks[p]] for p in group])
        if kept.size and pruned.size:
            assert np.abs(pruned).max() <= np.abs(kept).min()
        # and the kept ones are untouched
        for p in group:
            assert np.array_equal(
                model.get_submodule(p).weight.data[masks[p]], weights[p][masks[p]]
            )
    assert type(model.lm_head) is ml.Linear and not hasattr(model.lm_head, "weight_mask")


def test_masks_keep_pruned_weights_at_zero_through_fine_tuning():
    model = randomize_weights(make_gpt(TINY_2x2), 1)
    prune_connections(model, 0.5)
    zeros = sparsity_report(model)["zeros"]
    opt = ml.AdamW(model.parameters(), lr=0.1)
    idx = rng(3).integers(0, 11, (2, 6))
    _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    assert sparsity_report(model)["zeros"] < zeros  # the step moved pruned weights...
    reapply_masks(model)
    assert sparsity_report(model)["zeros"] == zeros  # ...and the masks put them back


def test_bad_sparsity_is_refused():
    model = make_gpt(TINY_2x2)
    with pytest.raises(ValueError, match="sparsity=1.0"):
        prune_connections(model, 1.0)
    with pytest.raises(ValueError, match="scope='all'"):
        prune_connections(model, 0.5, scope="all")
    with pytest.raises(TypeError, match="sparsity='half'"):
        prune_neurons(model, "half")


def test_csr_bytes():
    w = np.zeros((3, 10), np.float32)
    w[0, 1] = w[2, 9] = 1.0
    assert csr_nbytes(w) == 2 * (4 + 4) + 4 * 4


# --------------------------------------------------------------------------------------
# Neuron pruning
# --------------------------------------------------------------------------------------


def test_removing_a_unit_with_zero_outgoing_weights_leaves_the_logits_unchanged():
    model = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 2)
    for block in model.blocks:
        block.mlp.fc2.weight.data[:, 5] = 0.0  # unit 5 of every MLP sends nothing out
    idx = rng(4).integers(0, 11, (3, 6))
    before = model(idx)[0].numpy()
    params_before = count_parameters(model)[1]
    H = model.blocks[0].mlp.fc1.out_features
    kept = prune_neurons(model, 1 / H)  # one unit per MLP: the zero-scored one
    assert kept == {f"blocks.{i}.mlp": [j for j in range(H) if j != 5] for i in range(2)}
    np.testing.assert_allclose(model(idx)[0].numpy(), before, rtol=1e-12, atol=1e-12)
    C = model.config.n_embd
    assert count_parameters(model)[1] == params_before - 2 * (2 * C + 1)
    assert model.blocks[0].mlp.fc1.weight.shape == (H - 1, C)
    assert model.blocks[0].mlp.fc2.weight.shape == (C, H - 1)


def test_neuron_pruning_keeps_connection_masks_aligned():
    model = randomize_weights(make_gpt(TINY_2x2), 3)
    prune_connections(model, 0.5)
    kept = prune_neurons(model, 0.5)
    for path, units in kept.items():
        mlp = model.get_submodule(path)
        assert mlp.fc1.weight_mask.shape == mlp.fc1.weight.shape == (len(units), 8)
        assert mlp.fc2.weight_mask.shape == mlp.fc2.weight.shape == (8, len(units))
        assert not mlp.fc1.weight.data[~mlp.fc1.weight_mask].any()
        assert not mlp.fc2.weight.data[~mlp.fc2.weight_mask].any()


def test_removing_a_live_unit_changes_the_logits():
    """The check above can fail: removing a unit that does send something changes them."""
    model = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 2)
    idx = rng(4).integers(0, 11, (3, 6))
    before = model(idx)[0].numpy()
    prune_neurons(model, 0.25)
    assert np.abs(model(idx)[0].numpy() - before).max() > 1e-3


# --------------------------------------------------------------------------------------
# Block dropping
# --------------------------------------------------------------------------------------


def test_dropping_a_block_is_the_model_without_it():
    model = randomize_weights(make_gpt(TINY_2x2, n_layer=3), 3)
    state = model.state_dict()
    keep = drop_blocks(model, [1])
    assert keep == [0, 2] and model.config.n_layer == 2
    reference = make_gpt(TINY_2x2, n_layer=2)
    without = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    reference.load_state_dict({k.replace("blocks.2.", "blocks.1."): v for k, v in without.items()})
    idx = rng(5).integers(0, 11, (2, 6))
    assert np.array_equal(model(idx)[0].numpy(), reference(idx)[0].numpy())
    with pytest.raises(ValueError, match="leave at least one block"):
        drop_blocks(model, [0, 1])


def test_a_block_that_changes_nothing_is_the_least_important():
    model = randomize_weights(make_gpt(TINY_2x2, n_layer=3), 4)
    block = model.blocks[1]
    for layer in (block.attn.o_proj, block.mlp.fc2):  # both residual branches output zero
        layer.weight.data[...] = 0.0
        layer.bias.data[...] = 0.0
    idx = rng(6).integers(0, 11, (2, 6))
    scores = block_importance(model, idx)
    assert scores[1] == 0.0 and min(scores[0], scores[2]) > 0
    before = model(idx)[0].numpy()
    assert drop_least_important_blocks(model, 1, idx) == [0, 2]
    np.testing.assert_allclose(model(idx)[0].numpy(), before, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Variants and storage
# --------------------------------------------------------------------------------------


def _options(method):
    return {
        "svd": {"rank": 2},
        "prune": {"sparsity": 0.5},
        "prune-neurons": {"sparsity": 0.5},
        "drop-blocks": {"blocks": [0]},
    }.get(method, {})


@pytest.mark.parametrize("method", METHODS)
def test_each_variant_is_one_call_on_a_copy(method):
    base = randomize_weights(make_gpt(TINY_2x2), 5)
    before = snapshot(base)
    model = compressed(base, method, **_options(method))
    assert snapshot(base) == before  # the base is untouched
    idx = rng(7).integers(0, 11, (2, 6))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 6, 11) and np.isfinite(loss.item())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "qlora":
        assert trainable and all("lora_" in n for n in trainable)
    else:
        assert trainable == []  # a compressed model is frozen
    assert storage_bytes(model) <= storage_bytes(base) or method == "qlora"


def test_storage_bytes_are_the_closed_forms():
    base = make_gpt(TINY_2x2)
    n_params = sum(p.size for p in base.parameters())
    assert storage_bytes(base) == 4 * n_params
    C, L = 8, 2
    # the quantized weights per block: four C×C projections, fc1 (4C, C), fc2 (C, 4C)
    shapes = [(C, C)] * 4 + [(4 * C, C), (C, 4 * C)]
    quantized = L * sum(o * i for o, i in shapes)
    float_rest = 4 * (n_params - quantized)
    int8 = L * sum(quantized_nbytes(o * i, "int8", i) for o, i in shapes)
    assert int8 == L * sum(o * i + 4 * o for o, i in shapes)  # a float32 scale per row
    assert storage_bytes(compressed(base, "int8")) == float_rest + int8
    nf4 = L * sum(o * i // 2 + 4 * -(-(o * i) // 64) for o, i in shapes)
    assert storage_bytes(compressed(base, "nf4")) == float_rest + nf4
    assert stored_parameters(compressed(base, "nf4")) == stored_parameters(base) == n_params
    svd = L * sum(4 * low_rank_parameters(i, o, 2) - 4 * o for o, i in shapes)  # bias in rest
    assert storage_bytes(compressed(base, "svd", rank=2)) == float_rest + svd
    # connection pruning stores its zeros densely: no bytes saved
    assert storage_bytes(compressed(base, "prune", sparsity=0.9)) == 4 * n_params
    qlora = compressed(base, "qlora", config=ml.LoRAConfig(r=2))
    adapters = 4 * L * 2 * (2 * (C + C))  # A (2, C) and B (C, 2) on q_proj and v_proj
    dq = L * sum(quantized_nbytes(o * i, "nf4", 64, True) for o, i in shapes)
    assert storage_bytes(qlora) == float_rest + dq + adapters


def test_an_unknown_method_or_option_is_refused():
    with pytest.raises(ValueError, match="method='zip'"):
        compressed(make_gpt(TINY_2x2), "zip")
    with pytest.raises(TypeError, match=r"method='svd'.*rank.*options are \['rank'"):
        compressed(make_gpt(TINY_2x2), "svd")
    with pytest.raises(TypeError, match=r"method='nf4'.*'rnk'"):
        compressed(make_gpt(TINY_2x2), "nf4", rnk=3)
    with pytest.raises(ValueError, match=r"target_modules=\['lm_hed'\] match no Linear"):
        compressed(make_gpt(TINY_2x2), "svd", rank=2, target_modules=["lm_hed"])


def test_compressed_copies_do_not_share_state_with_the_base():
    base = make_gpt(TINY_2x2)
    model = compressed(base, "prune", sparsity=0.5)
    model.blocks[0].ln1.weight.data[...] = 7.0
    assert not (base.blocks[0].ln1.weight.data == 7.0).any()


@pytest.mark.parametrize("method", METHODS)
def test_every_variant_runs_on_every_device_with_the_cpu_numbers(method, device):
    """Quantization, SVD and pruning use only array-module functions a GPU has: built on a
    device, each variant computes the CPU variant's logits."""
    idx = rng(8).integers(0, 11, (2, 6))
    logits = {}
    for where in ("cpu", device):
        base = randomize_weights(make_gpt(TINY_2x2), 6).to(where)
        options = _options(method)
        if method == "qlora":
            options = {"generator": ml.backend.Generator(0)}
        model = compressed(base, method, **options)
        logits[where] = ml.backend.to_numpy(model(idx)[0].data)
    np.testing.assert_allclose(logits[device], logits["cpu"], rtol=1e-5, atol=1e-6)
