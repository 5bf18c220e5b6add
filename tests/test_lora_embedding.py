"""LoRA on the token embedding (minilora/variants/embedding.py): the reference op's backward
against central differences (repeated ids too), PEFT's init (A zero, B normal), zero-init
equivalence, the parameter count, merge and unmerge, adapter files in PEFT's keys, and PEFT
parity on the PyTorch port (logits, gradients, folders both ways)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import (
    TINY_2x2,
    adapted,
    logits_of,
    make_gpt,
    randomize_trainable,
    randomize_weights,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_helpers import cross_both_ways, peft_config
from safetensors.numpy import load_file

import minilora as ml
from minilora.gradcheck import gradcheck
from minilora.interop import model_files, peft_adapters
from minilora.lora import (
    LoRAConfig,
    adapted_layers,
    apply_lora,
    count_parameters,
    disable_adapters,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from minilora.nn import Embedding
from minilora.variants.embedding import LoRAEmbedding, lora_embedding

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
TARGETS_OUT = np.array([[4, 1, 0, 9, 3, 2], [1, 4, 2, 10, 5, 7]], dtype=np.int64)
CONFIG = LoRAConfig(r=2, lora_alpha=4, target_modules=["tok_emb", "q_proj"])


# --------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    shape=st.sampled_from([(5, 3, 2), (4, 6, 1), (7, 2, 3)]),
    ids_shape=st.sampled_from([(3,), (2, 4)]),
    freeze=st.sampled_from(["base", "none"]),
    seed=st.integers(0, 2**16),
)
def test_gradcheck_lora_embedding(shape, ids_shape, freeze, seed):
    """W, A and B against central differences; ids repeat (the scatter-add must sum)."""
    V, C, r = shape
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, ids_shape)
    ids.flat[0] = ids.flat[-1]  # at least one repeated id
    inputs = [ids, rng.normal(size=(V, C)), rng.normal(size=(r, V)), rng.normal(size=(C, r))]
    frozen = {"base": (1,), "none": ()}[freeze]
    assert gradcheck(lambda i, w, a, b: lora_embedding(i, w, a, b, 1.7), inputs, no_grads=frozen)


def test_lora_embedding_is_the_formula():
    rng = np.random.default_rng(0)
    ids = np.array([[3, 0, 3], [1, 2, 4]])
    W, A, B = rng.normal(size=(5, 3)), rng.normal(size=(2, 5)), rng.normal(size=(3, 2))
    y = lora_embedding(ids, ml.Tensor(W), ml.Tensor(A), ml.Tensor(B), 0.5)
    np.testing.assert_allclose(y.data, W[ids] + 0.5 * A.T[ids] @ B.T, rtol=1e-12, atol=1e-12)


def test_lora_embedding_refuses_wrong_shapes_and_float_ids():
    W, A, B = (ml.Tensor(np.zeros(s)) for s in ((5, 3), (2, 4), (3, 2)))
    with pytest.raises(ValueError, match=r"lora_embedding_A has shape \(2, 4\)"):
        lora_embedding(np.array([1]), W, A, B, 1.0)
    with pytest.raises(TypeError, match="ids must be integers"):
        lora_embedding(np.array([1.0]), W, ml.Tensor(np.zeros((2, 5))), B, 1.0)


# --------------------------------------------------------------------------------------
# The layer in the model
# --------------------------------------------------------------------------------------


def test_peft_init_zero_init_equivalence_and_trainable_set():
    base = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
    want = logits_of(base, IDX)
    model = adapted(CONFIG, np.float32)
    np.testing.assert_array_equal(logits_of(model, IDX), want)
    emb = model.tok_emb
    assert isinstance(emb, LoRAEmbedding) and emb.scaling == 2.0
    assert emb.lora_embedding_A.shape == (2, 11) and emb.lora_embedding_B.shape == (8, 2)
    assert (emb.lora_embedding_A.data == 0).all()  # PEFT: A zero, B ~ N(0, 1)
    assert 0.5 < emb.lora_embedding_B.data.std() < 2.0
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trains if n.startswith("tok_emb")} == {
        "tok_emb.lora_embedding_A",
        "tok_emb.lora_embedding_B",
    }
    assert not model.tok_emb.weight.requires_grad


def test_trainable_count_is_r_times_v_plus_c_plus_the_linear_adapters():
    model = adapted(CONFIG)
    V, C, L, r = 11, 8, 2, 2
    assert count_parameters(model)[0] == r * (V + C) + L * r * (C + C)


def test_merge_unmerge_and_unload_are_exact():
    model = adapted(CONFIG)
    randomize_trainable(model, 1, 0.5)
    unmerged = logits_of(model, IDX)
    with disable_adapters(model):
        assert not np.allclose(logits_of(model, IDX), unmerged)
    W0 = model.tok_emb.weight.data.copy()
    emb = model.tok_emb
    merge_lora(model)
    delta = emb.scaling * emb.lora_embedding_A.data.T @ emb.lora_embedding_B.data.T  # (V, C)
    np.testing.assert_allclose(emb.weight.data, W0 + delta, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(logits_of(model, IDX), unmerged, rtol=1e-12, atol=1e-12)
    unmerge_lora(model)
    np.testing.assert_allclose(emb.weight.data, W0, rtol=1e-14, atol=1e-14)
    merge_and_unload(model)
    assert type(model.tok_emb) is Embedding and not adapted_layers(model)
    np.testing.assert_allclose(logits_of(model, IDX), unmerged, rtol=1e-12, atol=1e-12)


def test_a_training_step_leaves_the_embedding_table_alone():
    model = adapted(CONFIG)
    randomize_trainable(model, 2, 0.5)
    W0 = model.tok_emb.weight.data.copy()
    A0 = model.tok_emb.lora_embedding_A.data.copy()
    model.train()
    model(IDX, TARGETS_OUT)[1].backward()
    ml.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    np.testing.assert_array_equal(model.tok_emb.weight.data, W0)
    unused = sorted(set(range(11)) - set(IDX.ravel()))  # ids never seen: no gradient
    assert (model.tok_emb.lora_embedding_A.grad[:, unused] == 0).all()
    assert not np.array_equal(model.tok_emb.lora_embedding_A.data, A0)


def test_adapter_files_use_peft_keys_and_round_trip(tmp_path):
    model = adapted(CONFIG, np.float32)
    randomize_trainable(model, 3, 0.5)
    peft_adapters.save_adapter(model, tmp_path, CONFIG)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.tok_emb.lora_embedding_A" in keys
    assert "base_model.model.tok_emb.lora_embedding_B" in keys
    fresh = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
    loaded = peft_adapters.load_adapter(fresh, tmp_path)
    assert loaded.target_modules == CONFIG.target_modules
    np.testing.assert_array_equal(logits_of(fresh, IDX), logits_of(model, IDX))


def test_a_file_with_a_wrong_embedding_rank_is_refused_leaving_the_model(tmp_path):
    model = adapted(CONFIG, np.float32)
    peft_adapters.save_adapter(model, tmp_path, CONFIG)
    other = adapted(LoRAConfig(r=3, lora_alpha=4, target_modules=["tok_emb"]), np.float32)
    before = {n: p.data.copy() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="r="):
        peft_adapters.load_adapter(other, tmp_path)
    assert all(np.array_equal(before[n], p.data) for n, p in other.named_parameters())


# --------------------------------------------------------------------------------------
# PEFT on the PyTorch port (oracle)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch", reason="parity needs PyTorch")
    peft = pytest.importorskip("peft", reason="embedding LoRA parity needs PEFT")
    from examples.torch_gpt import TorchGPT, load_minilora_state, minilora_name

    return torch, peft, TorchGPT, load_minilora_state, minilora_name


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_logits_and_gradients_match_peft(oracle, dtype):
    torch, peft, TorchGPT, load_minilora_state, minilora_name = oracle
    model = adapted(CONFIG, dtype)
    randomize_trainable(model, 4, 0.5)
    tdtype = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
    port = peft.get_peft_model(TorchGPT(TINY_2x2).to(tdtype), peft_config(peft, CONFIG))
    load_minilora_state(port, model.state_dict())
    assert port.get_nb_trainable_parameters() == count_parameters(model)
    model.train()
    logits, loss = model(IDX, TARGETS_OUT)
    loss.backward()
    t_logits, t_loss = port(torch.tensor(IDX), torch.tensor(TARGETS_OUT))
    t_loss.backward()
    tol = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-4)}[dtype]
    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), **tol)
    theirs = {minilora_name(n): p for n, p in port.named_parameters()}
    ours = dict(model.named_parameters())
    assert {n for n, p in ours.items() if p.requires_grad} == {
        n for n, p in theirs.items() if p.requires_grad
    }
    for name, p in ours.items():
        if p.requires_grad:
            np.testing.assert_allclose(p.grad, theirs[name].grad.numpy(), **tol, err_msg=name)


@pytest.mark.oracle
def test_adapter_folders_cross_both_ways(oracle, tmp_path):
    torch, peft = oracle[:2]
    model = adapted(CONFIG, np.float32)
    randomize_trainable(model, 5, 0.5)
    base = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
    cross_both_ways(torch, peft, model, CONFIG, base, tmp_path, IDX, std=0.5)
    assert isinstance(base.tok_emb, LoRAEmbedding)


def test_a_tied_embedding_adapts_and_its_merge_is_refused_changing_nothing(tmp_path):
    """tok_emb and lm_head share one weight: LoRA on the embedding trains and loads as
    PEFT's does, but merging it would change the head too, so merge_lora refuses it."""
    model = make_gpt(TINY_2x2, tie_word_embeddings=True)
    apply_lora(model, CONFIG)
    assert isinstance(model.tok_emb, LoRAEmbedding)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="tok_emb shares its weight with lm_head"):
        merge_lora(model)
    assert not any(layer.merged for _, layer in adapted_layers(model))
    assert all(np.array_equal(before[n], p.data) for n, p in model.named_parameters())


def test_save_model_refuses_a_model_with_an_embedding_adapter(tmp_path):
    model = adapted(LoRAConfig(r=2, target_modules=["tok_emb"]), np.float32)
    with pytest.raises(ValueError, match="tok_emb"):
        model_files.save_model(model, tmp_path / "m.safetensors")
