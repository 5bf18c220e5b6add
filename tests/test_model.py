"""The tiny GPT (minilora.model): config validation, shapes, input checks, the initial loss,
training, a whole-model gradient check, generation, dropout and determinism."""

import math
import warnings

import numpy as np
import pytest
from helpers import TINY, TINY_2x2, make_gpt, randomize_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import float_dtypes, gpt_configs, seeds, token_batches

import minilora
from minilora import (
    GPT,
    AdamW,
    GPTConfig,
    KVCache,
    LoRAConfig,
    apply_lora,
    backend,
    merge_lora,
    no_grad,
)
from minilora.gradcheck import gradcheck
from minilora.study.accounting import kv_cache_bytes

# every test here runs on the fast path and on the reference ops (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("ops")

# --------------------------------------------------------------------------------------
# GPTConfig
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"n_embd": 10, "n_head": 4}, ["n_embd=10", "n_head=4", "divisible"]),
        ({"n_embd": 6, "n_head": 4}, ["n_embd=6", "n_head=4"]),
        ({"n_layer": 0}, ["n_layer=0"]),
        ({"n_head": 0}, ["n_head=0"]),
        ({"vocab_size": 0}, ["vocab_size=0"]),
        ({"block_size": -3}, ["block_size=-3"]),
        ({"n_embd": 8.0}, ["n_embd=8.0"]),
        ({"n_layer": True}, ["n_layer=True"]),
        ({"dropout": 1.0}, ["dropout=1.0"]),
        ({"dropout": -0.1}, ["dropout=-0.1"]),
        ({"dropout": "0.1"}, ["dropout='0.1'"]),
    ],
)
def test_gpt_config_refuses_bad_fields_naming_them(changes, named):
    kwargs = {**TINY.to_dict(), "n_embd": 8, "n_head": 2, **changes}
    with pytest.raises(ValueError) as info:
        GPTConfig(**kwargs)
    for part in named:
        assert part in str(info.value), f"{part!r} not in {info.value}"


def test_gpt_needs_a_gpt_config():
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(TINY.to_dict())


# --------------------------------------------------------------------------------------
# Forward: shapes and input checks
# --------------------------------------------------------------------------------------


@given(config=gpt_configs(), seed=seeds, dtype=float_dtypes, batch=st.data())
def test_forward_shapes_and_dtypes(config, seed, dtype, batch):
    idx, targets = batch.draw(token_batches(config))
    model = make_gpt(config, seed, dtype)
    logits, loss = model(idx)
    assert loss is None
    assert logits.shape == (*idx.shape, config.vocab_size) and logits.dtype == dtype
    logits2, loss = model(minilora.Tensor(idx), targets)
    assert np.array_equal(logits.numpy(), logits2.numpy())
    assert loss.shape == () and loss.dtype == dtype and np.isfinite(loss.item())


@given(config=gpt_configs(), seed=seeds, batch=st.data())
def test_forward_is_causal(config, seed, batch):
    """Logits at position t depend only on ids[:t+1]: changing a later id changes nothing
    before it (the attention mask), and does change its own position."""
    idx, _ = batch.draw(token_batches(config, min_len=2))
    t = batch.draw(st.integers(1, idx.shape[1] - 1))
    model = make_gpt(config, seed).eval()
    changed = idx.copy()
    changed[:, t] = (changed[:, t] + 1) % config.vocab_size
    with no_grad():
        a, b = model(idx)[0].numpy(), model(changed)[0].numpy()
    assert np.array_equal(a[:, :t], b[:, :t])
    assert not np.array_equal(a[:, t], b[:, t])


@pytest.mark.parametrize(
    "idx, named",
    [
        (np.array([[0.0, 1.0, 2.0]]), ["idx", "integer", "float64"]),
        (np.array([[0, 1, 7]]), ["idx", "id 7", "[0, 7)"]),
        (np.array([[0, -1, 2]]), ["idx", "id -1", "[0, 7)"]),
        (np.array([[0, 1, 2, 3, 4]]), ["idx", "5 positions", "block_size is 4"]),
        (np.array([0, 1, 2]), ["idx", "(batch, time)", "(3,)"]),
        (np.zeros((1, 2, 2), np.int64), ["idx", "(batch, time)", "(1, 2, 2)"]),
        ([[0, 1], [2, 3.5]], ["idx", "integer"]),
    ],
)
def test_forward_refuses_bad_ids_with_a_clear_message(idx, named):
    model = make_gpt(TINY, 0)
    with pytest.raises(ValueError) as info:
        model(idx)
    for part in named:
        assert part in str(info.value), f"{part!r} not in {info.value}"


def test_forward_refuses_bad_targets_and_ignores_minus_100():
    model = make_gpt(TINY, 0)
    idx = np.array([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match=r"targets.*\(2, 2\).*\(2, 3\)"):
        model(idx, np.array([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="targets contains id 9"):
        model(idx, np.array([[0, 1, 2], [3, 4, 9]]))
    with pytest.raises(ValueError, match="targets contains id -2"):  # only -100 is ignored
        model(idx, np.array([[0, 1, 2], [3, -2, -100]]))
    with pytest.raises(ValueError, match="targets must hold integer"):
        model(idx, idx.astype(np.float32))
    # -100 positions are ignored: the loss is the mean over the rest
    full = np.array([[1, 2, 3], [4, 5, 6]])
    masked = full.copy()
    masked[0, 0] = masked[1, 2] = -100
    logits = model(idx)[0].numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = masked != -100
    ref = -logp[keep, masked[keep]].mean()
    assert model(idx, masked)[1].item() == pytest.approx(ref, rel=1e-5)


# --------------------------------------------------------------------------------------
# Loss and training
# --------------------------------------------------------------------------------------


@given(config=gpt_configs(), seed=seeds, dtype=float_dtypes, batch=st.data())
def test_initial_loss_is_close_to_log_vocab(config, seed, dtype, batch):
    """With GPT-2's N(0, 0.02²) init the logits are nearly zero (std 0.02·√n_embd ≤ 0.07),
    so the predicted distribution is nearly uniform and the cross-entropy is nearly
    ln(vocab_size). Averaged over at least 16 targets, so one unlucky token cannot move it
    by 0.1."""
    rng = np.random.default_rng(batch.draw(seeds))
    idx, targets = rng.integers(0, config.vocab_size, (2, 4, config.block_size))
    loss = make_gpt(config, seed, dtype)(idx, targets)[1].item()
    assert abs(loss - math.log(config.vocab_size)) < 0.1


@settings(max_examples=10)
@given(config=gpt_configs(), seed=seeds, batch=st.data())
def test_adamw_steps_reduce_the_loss_on_a_fixed_batch(config, seed, batch):
    idx, targets = batch.draw(token_batches(config, min_len=2))
    model = make_gpt(config, seed)
    opt = AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(idx, targets)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = model(idx, targets)[1].item()
    assert final < losses[0] - 0.1, losses + [final]


GPT_GRADCHECK_PARAMS = [
    "lm_head.weight",
    "blocks.0.attn.q_proj.weight",
    "blocks.0.attn.k_proj.bias",
    "blocks.0.attn.v_proj.weight",
    "blocks.0.ln1.weight",
    "blocks.0.mlp.fc1.weight",
    "ln_f.bias",
    "tok_emb.weight",
    "pos_emb.weight",
]


def _model_fn(model, names, idx, targets, output):
    """fn(*tensors) for gradcheck: put the tensors in the model where the named parameters
    are (restored afterwards), run it, return the loss or the logits."""
    owners = []
    for name in names:
        path, _, attr = name.rpartition(".")
        owners.append((model.get_submodule(path), attr))

    def fn(*tensors):
        saved = [getattr(m, a) for m, a in owners]
        try:
            for (m, a), t in zip(owners, tensors, strict=True):
                setattr(m, a, t)
            logits, loss = model(idx, targets)
            return loss if output == "loss" else logits
        finally:
            for (m, a), p in zip(owners, saved, strict=True):
                setattr(m, a, p)

    return fn


@pytest.mark.parametrize("output", ["loss", "logits"])
@pytest.mark.parametrize("n_head", [1, 2])
def test_gradcheck_whole_tiny_gpt_float64(output, n_head):
    config = GPTConfig(**{**TINY.to_dict(), "n_head": n_head})
    model = make_gpt(config, 0, backend.float64)
    randomize_weights(model, 1)
    params = dict(model.named_parameters())
    idx = np.array([[1, 2, 3, 4], [0, 6, 6, 5]])
    targets = np.array([[2, 3, 4, 0], [6, 6, 5, -100]])
    fn = _model_fn(model, GPT_GRADCHECK_PARAMS, idx, targets, output)
    inputs = [params[n].data for n in GPT_GRADCHECK_PARAMS]
    before = {n: p.data.copy() for n, p in params.items()}
    assert gradcheck(fn, inputs)
    # the check must not leave its tensors in the model
    assert dict(model.named_parameters()).keys() == before.keys()
    assert all(np.array_equal(p.data, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(config=gpt_configs(), seed=seeds, batch=st.data(), n_new=st.integers(0, 6))
def test_generate_shapes_vocabulary_and_greedy_determinism(config, seed, batch, n_new):
    idx, _ = batch.draw(token_batches(config))
    model = make_gpt(config, seed).eval()
    randomize_weights(model, seed, scale=1.0)  # a peaked distribution: no argmax ties
    B, T = idx.shape
    out = model.generate(idx, n_new, temperature=0)
    assert out.shape == (B, T + n_new) and np.issubdtype(out.dtype, np.integer)
    assert np.array_equal(out[:, :T], idx)
    assert out.min() >= 0 and out.max() < config.vocab_size
    minilora.manual_seed(seed + 1)  # greedy ignores the random stream
    assert np.array_equal(model.generate(idx, n_new, temperature=0), out)
    if n_new:
        with no_grad():
            first = model(idx[:, -config.block_size :])[0].numpy()[:, -1].argmax(-1)
        assert np.array_equal(out[:, T], first)
        # top_k=1 sampling can only pick the most likely token
        top1 = model.generate(idx, n_new, temperature=1.0, top_k=1)
        assert np.array_equal(top1, out)


def test_generate_sampling_is_seeded_and_stays_in_the_vocabulary():
    config = GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8)
    model = make_gpt(config, 0)
    randomize_weights(model, 0, scale=0.3)
    idx = np.array([[1, 2], [3, 4], [5, 6]])
    a = model.generate(idx, 8, generator=backend.Generator(5))
    b = model.generate(idx, 8, generator=backend.Generator(5))
    c = model.generate(idx, 8, generator=backend.Generator(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (3, 10) and a.min() >= 0 and a.max() < 11
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 1, top_k=12)


@pytest.mark.parametrize(
    "dtype, temperature",
    [(np.float32, 1e-320), (np.float32, 1e-38), (np.float16, 1e-6), (np.float16, 1e-9)],
    ids=["float32-1e-320", "float32-1e-38", "float16-1e-6", "float16-1e-9"],
)
def test_a_temperature_whose_logits_over_t_overflow_samples_as_greedy(dtype, temperature):
    """logits / T overflowed (inf - inf = NaN probabilities: token 0 every time); the
    softmax of (logits - max) / T is the same distribution and only underflows, to the
    greedy choice. 1e-320 and 1e-9 are 0 in their dtypes; nothing is warned."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = make_gpt(config, 0, dtype=dtype)
    randomize_weights(model, 0, scale=1.0)  # a peaked distribution: no argmax ties
    idx = np.array([[1, 2], [3, 4], [5, 6]])
    greedy = model.generate(idx, 6, temperature=0)
    assert greedy[:, 2:].any()  # not token 0 throughout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            sampled = model.generate(idx, 6, temperature, generator=backend.Generator(seed))
            np.testing.assert_array_equal(sampled, greedy)


# --------------------------------------------------------------------------------------
# Incremental decoding with a KV cache
# --------------------------------------------------------------------------------------


def _adapted(model: GPT, how: str | None) -> GPT:
    """``model`` as it is, or with LoRA on every attention and MLP layer (non-zero B), merged
    or not: the cache must give the same tokens whichever layers compute the keys."""
    if how is None:
        return model
    apply_lora(
        model, LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "fc1"])
    )
    randomize_weights(model, 7, scale=0.5)  # B != 0: the bypass changes every key
    if how == "merged":
        merge_lora(model)
    return model.eval()


@pytest.mark.parametrize("lora", [None, "unmerged", "merged"])
@pytest.mark.parametrize("prompt_len", [1, 2, 5, 6])  # block_size 6: the last fills it
@pytest.mark.parametrize("temperature, top_k", [(0, None), (1.0, None), (0.8, 3)])
def test_generate_with_a_kv_cache_gives_the_tokens_of_the_full_window(
    lora, prompt_len, temperature, top_k
):
    """Token for token what recomputing the window every step gives, greedy and seeded
    sampling, past block_size (where the window is cropped and the cache dropped)."""
    model = _adapted(randomize_weights(make_gpt(TINY_2x2, 3), 3, scale=0.5), lora)
    idx = np.random.default_rng(prompt_len).integers(0, TINY_2x2.vocab_size, (3, prompt_len))
    n_new = 2 * TINY_2x2.block_size  # well past block_size
    cached = model.generate(idx, n_new, temperature, top_k, backend.Generator(11))
    full = model.generate(idx, n_new, temperature, top_k, backend.Generator(11), use_cache=False)
    assert cached.shape == (3, prompt_len + n_new)
    np.testing.assert_array_equal(cached, full)
    if temperature:  # the sampled tokens really depend on the random stream
        other = model.generate(idx, n_new, temperature, top_k, backend.Generator(12))
        assert not np.array_equal(other, cached)


@pytest.mark.parametrize("lora", [None, "unmerged", "merged"])
def test_forward_cached_equals_the_full_forward_in_chunks(lora):
    """Feeding a sequence in pieces (3, then 1, then 2 positions) gives the rows of the
    whole sequence's logits, and the cache then holds every position's keys."""
    model = _adapted(randomize_weights(make_gpt(TINY_2x2, 1, dtype=np.float64), 1), lora)
    idx = np.random.default_rng(0).integers(0, TINY_2x2.vocab_size, (2, 6))
    cache = model.kv_cache(2)
    assert isinstance(cache, KVCache) and cache.length == 0
    with no_grad():
        want = model(idx)[0].numpy()
        pieces = [model.forward_cached(idx[:, a:b], cache) for a, b in [(0, 3), (3, 4), (4, 6)]]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), want, rtol=1e-12, atol=1e-12)
    assert cache.length == 6
    hs = TINY_2x2.n_embd // TINY_2x2.n_head
    assert cache.keys[0].shape == (2, TINY_2x2.n_head, TINY_2x2.block_size, hs)
    cached_bytes = sum(a.nbytes for a in cache.keys + cache.values)
    assert cached_bytes == kv_cache_bytes(TINY_2x2, batch_size=2, dtype="float64")


def test_forward_cached_refuses_a_graph_an_overflow_and_another_batch():
    model = make_gpt(TINY_2x2, 0)
    cache = model.kv_cache(2)
    idx = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(RuntimeError, match="no_grad"):
        model.forward_cached(idx, cache)
    with no_grad():
        model.forward_cached(idx, cache)
        with pytest.raises(ValueError, match="holds 4 positions and idx adds 4.*block_size=6"):
            model.forward_cached(idx, cache)
        with pytest.raises(ValueError, match="batch 3"):
            model.forward_cached(np.zeros((3, 1), dtype=np.int64), cache)
        with pytest.raises(ValueError, match="idx contains id -1"):
            model.forward_cached(np.full((2, 1), -1), cache)
    assert cache.length == 4  # refused calls store nothing


# --------------------------------------------------------------------------------------
# Dropout and determinism
# --------------------------------------------------------------------------------------


@settings(max_examples=10)
@given(config=gpt_configs(dropout=st.sampled_from([0.1, 0.5])), seed=seeds, batch=st.data())
def test_dropout_is_random_in_training_and_off_in_eval(config, seed, batch):
    idx, targets = batch.draw(token_batches(config, min_len=2, max_batch=3))
    model = make_gpt(config, seed)

    def logits(run_seed):
        minilora.manual_seed(run_seed)
        with no_grad():
            return model(idx, targets)[0].numpy()

    model.train()
    assert np.array_equal(logits(1), logits(1)), "same seed, same dropout masks"
    assert not np.array_equal(logits(1), logits(2)), "dropout had no effect in train mode"
    model.eval()
    reference = logits(1)
    assert np.array_equal(logits(2), reference)
    # eval mode equals the same weights with dropout switched off
    plain = GPT(GPTConfig(**{**config.to_dict(), "dropout": 0.0}))
    plain.load_state_dict(model.state_dict())
    with no_grad():
        assert np.array_equal(plain(idx)[0].numpy(), reference)


@settings(max_examples=8)
@given(
    config=gpt_configs(dropout=st.sampled_from([0.0, 0.2])),
    seed=seeds,
    dtype=float_dtypes,
    batch=st.data(),
)
def test_same_seed_gives_bitwise_identical_training(config, seed, dtype, batch):
    idx, targets = batch.draw(token_batches(config))

    def run(run_seed):
        model = make_gpt(config, run_seed, dtype)
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss = model(idx, targets)[1]
            loss.backward()
            opt.step()
        logits, loss = model(idx, targets)
        return logits.numpy(), loss.numpy()

    (la, ea), (lb, eb) = run(seed), run(seed)
    assert la.tobytes() == lb.tobytes() and ea.tobytes() == eb.tobytes()
    lc, _ = run(seed + 1)
    assert not np.array_equal(la, lc)
