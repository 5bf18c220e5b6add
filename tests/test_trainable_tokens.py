"""Trainable tokens (minilora/variants/trainable_tokens.py, PEFT's trainable_token_indices):
the ops' backward against central differences, the tied head sharing one delta, the start
equal to the base, merge and unmerge (a tied table too), the config and index checks, and
minilora's own adapter files both ways. PEFT's GPT-2: tests/test_gpt2_peft_matrix.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import TINY_2x2, logits_of, make_gpt, randomize_weights, snapshot
from safetensors.numpy import load_file

import minilora as ml
from minilora.gradcheck import gradcheck
from minilora.interop.peft_adapters import load_adapter, save_adapter
from minilora.lora import (
    LoRAConfig,
    apply_lora,
    count_parameters,
    disable_adapters,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from minilora.nn import Embedding, Linear
from minilora.study import accounting
from minilora.variants import multi_adapter
from minilora.variants.trainable_tokens import (
    TrainableTokensEmbedding,
    TrainableTokensLinear,
    replaced_table,
    token_embedding,
)

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
TOKENS = [4, 1, 7]  # 4 and 1 appear in IDX, repeated; 7 only in the tied head's logits
DELTA = "tok_emb.token_adapter.trainable_tokens_delta"


def tied_model(tokens=TOKENS, seed: int = 0, **config):
    """TINY_2x2 with a tied head, random float64 weights, LoRA on q_proj and ``tokens``."""
    model = make_gpt(TINY_2x2, seed, np.float64, tie_word_embeddings=True)
    randomize_weights(model, seed)
    config = LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=tokens, **config)
    apply_lora(model, config)
    return model, config


def moved(model, seed: int = 1) -> None:
    """The delta moved off the rows it copied (as after training)."""
    delta = dict(model.named_parameters())[DELTA]
    delta.data = delta.data + np.random.default_rng(seed).normal(size=delta.shape)


# --------------------------------------------------------------------------------------
# The ops: existing autograd ops, checked end to end
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [(0,), ()])
def test_gradcheck_replaced_table(frozen):
    """W' = W with rows replaced: the delta gets its rows' gradient, W the others'."""
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(9, 3)), rng.normal(size=(3, 3))]
    assert gradcheck(lambda w, d: replaced_table(w, d, [5, 0, 8]), inputs, no_grads=frozen)


@pytest.mark.parametrize("frozen", [(1,), ()])
def test_gradcheck_token_embedding(frozen):
    """W'[ids], with ids that repeat a replaced row (its gradients must add up)."""
    rng = np.random.default_rng(1)
    ids = np.array([[2, 6, 2], [0, 6, 6]])
    inputs = [ids, rng.normal(size=(7, 4)), rng.normal(size=(2, 4))]
    fn = lambda i, w, d: token_embedding(i, w, d, [6, 2])  # noqa: E731
    assert gradcheck(fn, inputs, no_grads=frozen)


def test_ops_compute_the_replaced_table():
    rng = np.random.default_rng(2)
    W, delta, ids = rng.normal(size=(6, 2)), rng.normal(size=(2, 2)), np.array([[3, 1, 0]])
    want = W.copy()
    want[[3, 5]] = delta
    table = replaced_table(ml.Tensor(W), ml.Tensor(delta), [3, 5])
    np.testing.assert_array_equal(table.data, want)
    y = token_embedding(ids, ml.Tensor(W), ml.Tensor(delta), [3, 5])
    np.testing.assert_array_equal(y.data, want[ids])


def test_delta_gets_both_uses_gradient_and_the_table_none():
    """In a tied model the delta's gradient is the tied table's rows' gradient (embedding
    and head together), as a fully trained tied table gets it; the frozen table gets none."""
    model, _ = tied_model()
    full = randomize_weights(make_gpt(TINY_2x2, 0, np.float64, tie_word_embeddings=True), 0)
    targets = np.roll(IDX, -1, axis=1)
    for m in (model, full):
        m.train()
        m(IDX, targets)[1].backward()
    delta = dict(model.named_parameters())[DELTA]
    assert model.tok_emb.weight.grad is None and not model.tok_emb.weight.requires_grad
    np.testing.assert_allclose(delta.grad, full.tok_emb.weight.grad[TOKENS], rtol=1e-12)
    head_only = full.tok_emb.weight.grad[7]  # token 7 is in no input: its gradient is the head's
    assert np.abs(head_only).max() > 1e-3


# --------------------------------------------------------------------------------------
# The layers on a model
# --------------------------------------------------------------------------------------


def test_starts_equal_to_the_base_and_counts_the_delta_once():
    model, _ = tied_model()
    base = randomize_weights(make_gpt(TINY_2x2, 0, np.float64, tie_word_embeddings=True), 0)
    assert isinstance(model.tok_emb, TrainableTokensEmbedding)
    assert isinstance(model.lm_head, TrainableTokensLinear)
    assert model.lm_head.token_adapter is model.tok_emb.token_adapter  # one delta, two uses
    np.testing.assert_array_equal(logits_of(model, IDX), logits_of(base, IDX))
    trainable, total = count_parameters(model)
    lora = 2 * 2 * (8 + 8)  # q_proj's A (2, 8) and B (8, 2) in 2 layers
    assert trainable == lora + len(TOKENS) * 8
    assert total == count_parameters(base)[1] + trainable
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert DELTA in names and not any("lm_head" in n for n in names)


def test_untied_model_adapts_the_embedding_only():
    model = randomize_weights(make_gpt(TINY_2x2, 0, np.float64), 0)
    apply_lora(model, LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[2]))
    assert isinstance(model.tok_emb, TrainableTokensEmbedding)
    assert type(model.lm_head) is Linear


def test_moved_delta_changes_the_rows_only():
    model, _ = tied_model()
    before = logits_of(model, IDX)
    moved(model)
    after = logits_of(model, IDX)
    assert np.abs(after - before).max() > 1e-3
    with disable_adapters(model):  # the base model again
        np.testing.assert_array_equal(logits_of(model, IDX), before)


def test_merge_unmerge_round_trip_with_a_tied_head():
    """Merging writes the rows both uses compute with (allowed on a tied table), unmerging
    writes the originals back, and merge_and_unload leaves a plain tied GPT."""
    model, _ = tied_model()
    original = model.tok_emb.weight.data.copy()
    moved(model)
    want = logits_of(model, IDX)
    merge_lora(model)
    assert model.tok_emb.merged and model.lm_head.merged
    delta = dict(model.named_parameters())[DELTA].data
    np.testing.assert_array_equal(model.tok_emb.weight.data[TOKENS], delta)
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-12, atol=1e-12)
    unmerge_lora(model)
    np.testing.assert_array_equal(model.tok_emb.weight.data, original)
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-12, atol=1e-12)
    merge_and_unload(model)
    assert type(model.tok_emb) is Embedding and type(model.lm_head) is Linear
    assert model.lm_head.weight is model.tok_emb.weight
    assert not any("token" in n for n, _ in model.named_parameters())
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-12, atol=1e-12)


def test_merged_layer_refuses_to_train():
    model, _ = tied_model()
    merge_lora(model)
    model.train()
    with pytest.raises(RuntimeError, match="merged"):
        model(IDX)


# --------------------------------------------------------------------------------------
# Checks: the config, and the indices against the model (nothing changes)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [[], [1, 1], [-1], [True], [1.0], "3", {"tok_emb": []}, {"": [1]}, {"tok_emb": [2, 2]}],
)
def test_config_refuses_bad_indices(value):
    with pytest.raises(ValueError, match="trainable_token_indices=") as e:
        LoRAConfig(trainable_token_indices=value)
    assert repr(value) in str(e.value)


@pytest.mark.parametrize(
    "tokens, words",
    [
        ([3, 11], ["[11]", "tok_emb", "11 rows"]),
        ({"tok_emb": [0], "pos_emb": [6]}, ["[6]", "pos_emb", "6 rows"]),
        ({"wte": [1]}, ["'wte'", "matches no Embedding"]),
    ],
)
def test_apply_refuses_what_does_not_fit_the_model(tokens, words):
    model = make_gpt(TINY_2x2, 0, tie_word_embeddings=True)
    before = snapshot(model)
    config = LoRAConfig(target_modules=["q_proj"], trainable_token_indices=tokens)
    with pytest.raises(ValueError, match="nothing was changed") as e:
        apply_lora(model, config)
    for word in words:
        assert word in str(e.value)
    assert snapshot(model) == before and type(model.tok_emb) is Embedding


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(target_modules=["tok_emb"]), ["one adapter on a layer"]),
        (dict(modules_to_save=["tok_emb"]), ["modules_to_save"]),
        (dict(target_modules=["q_proj", "lm_head"]), ["['lm_head'] share tok_emb"]),
    ],
)
def test_apply_refuses_two_adapters_on_the_table(changes, words):
    model = make_gpt(TINY_2x2, 0, tie_word_embeddings=True)
    config = LoRAConfig(**{"target_modules": ["q_proj"], "trainable_token_indices": [1], **changes})
    with pytest.raises(ValueError) as e:
        apply_lora(model, config)
    for word in words:
        assert word in str(e.value)
    assert type(model.tok_emb) is Embedding


# --------------------------------------------------------------------------------------
# minilora's own adapter files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [TOKENS, {"tok_emb": [0, 9]}])
def test_adapter_round_trip(tmp_path, tokens):
    model, config = tied_model(tokens)
    moved(model)
    want = logits_of(model, IDX)
    save_adapter(model, tmp_path, config)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    n = len(tokens if isinstance(tokens, list) else tokens["tok_emb"])
    assert saved[f"base_model.model.{DELTA}"].shape == (n, 8)
    assert not any("lm_head" in key for key in saved)  # one delta, saved once (as PEFT)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"]
        == tokens
    )
    fresh = randomize_weights(make_gpt(TINY_2x2, 0, np.float64, tie_word_embeddings=True), 0)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.trainable_token_indices == tokens
    assert fresh.lm_head.token_adapter is fresh.tok_emb.token_adapter
    np.testing.assert_allclose(logits_of(fresh, IDX), want, rtol=1e-12, atol=1e-12)
    load_adapter(fresh, tmp_path)  # into the model that has the layers: the same again
    np.testing.assert_allclose(logits_of(fresh, IDX), want, rtol=1e-12, atol=1e-12)


def test_load_refuses_a_delta_of_the_wrong_shape(tmp_path):
    model, config = tied_model([4, 1])
    save_adapter(model, tmp_path, config)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace("[\n    4,\n    1\n  ]", "[4, 1, 2]"))
    fresh = make_gpt(TINY_2x2, 0, np.float64, tie_word_embeddings=True)
    before = snapshot(fresh)
    with pytest.warns(UserWarning, match="trainable_token_indices"):  # edited since the save
        with pytest.raises(ValueError, match=r"token_adapter.trainable_tokens_delta has shape"):
            load_adapter(fresh, tmp_path)
    assert snapshot(fresh) == before and type(fresh.tok_emb) is Embedding


def test_save_refuses_a_config_without_the_models_tokens(tmp_path):
    model, config = tied_model()
    other = LoRAConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"config says trainable_token_indices None for tok_emb"):
        save_adapter(model, tmp_path, other)


def test_a_model_with_trainable_tokens_gets_no_second_named_adapter():
    """The named adapters swap LoRA layers; the delta would be shared by all of them."""
    model, _ = tied_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"embedding adapters \['tok_emb'\]"):
        multi_adapter.add_adapter(model, "other", LoRAConfig(r=2, target_modules=["v_proj"]))
    assert snapshot(model) == before and isinstance(model.tok_emb, TrainableTokensEmbedding)


def test_closed_form_counts_refuse_trainable_tokens():
    """The accounting's closed forms count LoRA matrices only: a config with tokens is
    refused there (count_parameters counts it, above), not counted short by n·C."""
    with pytest.raises(ValueError, match=r"trainable_token_indices=\[4, 1, 7\]"):
        accounting.LoRASpec.from_config(LoRAConfig(trainable_token_indices=TOKENS))
    assert accounting.LoRASpec.from_config(LoRAConfig()).r == 8
