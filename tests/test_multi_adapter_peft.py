"""Every combination type of ``add_weighted_adapter`` (minilora/variants/multi_adapter.py) and
the merge methods behind them (minilora/variants/merge_methods.py), with PEFT as the oracle:

* on minilora's GPT (PEFT on the PyTorch port) and on a random Hugging Face GPT-2 (PEFT on
  GPT2LMHeadModel, where c_attn is q, k and v fused), each type gives PEFT's adapter: the
  same A and B for the types that merge A's and B's, the same ΔW for the SVD types;
* DARE's random masks: replayed into ``torch.bernoulli``, PEFT gives the same adapter; and
  on their own, the masks keep the ``density`` fraction, rescale by 1/density, and keep
  the expectation.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import TINY_2x2, make_gpt, randomize_weights, snapshot

import minilora as ml
from minilora import backend
from minilora.interop import peft_adapters
from minilora.lora import disable_adapters, lora_layers
from minilora.variants import merge_methods
from minilora.variants.multi_adapter import (
    BASE_ADAPTER,
    MixedBatchLinear,
    active_adapter,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    merge_and_unload,
    mixed_batch,
    set_adapter,
)

# Three adapters of one rank (the A-and-B types need it) and scaling 1, with weights whose
# √|w·s| are exact in float32 (PEFT rounds its weight tensor to float32): exact compares.
CONFIGS = [
    ml.LoRAConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "fc1"]),
    ml.LoRAConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"]),
    ml.LoRAConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1", "o_proj"]),
]
WEIGHTS = [0.25, -2.25, 1.0]  # √|w| = 0.5, 1.5, 1
NAMES = ["a", "b", "c"]
EXACT = ["linear", "cat", "ties", "magnitude_prune", "svd", "ties_svd", "magnitude_prune_svd"]
DARE = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]


def options(kind, sign="total"):
    """The keyword arguments a type takes: a density for those that prune, a sign method
    for the TIES ones, an SVD rank below the largest for the SVD ones."""
    out = {}
    if kind.removesuffix("_svd") in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        out["density"] = 0.5
    if "ties" in kind:
        out["majority_sign_method"] = sign
    if kind.endswith("svd"):
        out["svd_rank"] = 1
    return out


def three_adapters(seed=0):
    model = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), seed)
    rng = np.random.default_rng(seed + 1)
    for name, config in zip(NAMES, CONFIGS, strict=True):
        add_adapter(model, name, config)
        set_adapter(model, name)
        for pname, p in model.named_parameters():
            if ".lora_" in pname:
                p.data[...] = rng.standard_normal(p.shape)
    set_adapter(model, "a")
    return model


def layers_of(model, name):
    set_adapter(model, name)
    found = dict(lora_layers(model))
    set_adapter(model, "a")
    return found


class Recording(backend.Generator):
    """A Generator that keeps every uniform draw, to replay DARE's masks into PEFT."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.draws = []

    def random(self, shape, dtype=backend.float64, device="cpu"):
        u = super().random(shape, dtype, device)
        self.draws.append(u)
        return u


def replay(monkeypatch, torch, draws: list, transpose=False):
    """``torch.bernoulli(p)`` answers with minilora's masks, in minilora's order
    (``transpose``: PEFT prunes a Conv1D's ΔW as (in, out), minilora as (out, in))."""

    def bernoulli(p):
        u = draws.pop(0)
        u = u.T if transpose else u
        assert u.shape == tuple(p.shape), "PEFT drew its masks in another order"
        return torch.from_numpy(u < p.numpy()).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)


def assert_same_adapter(ours: dict, theirs: dict, kind: str):
    """Our layers against PEFT's "mix" layers, path by path: A and B themselves where they
    are unique, ΔW = s·B·A for the SVD types (singular vectors have a sign)."""
    assert set(ours) == set(theirs)
    for path, layer in ours.items():
        their = theirs[path]
        want = their.get_delta_weight("mix").detach().numpy()
        np.testing.assert_allclose(layer.get_delta_weight(), want, rtol=1e-10, atol=1e-12)
        if not kind.endswith("svd"):
            A, B = their.lora_A["mix"].weight, their.lora_B["mix"].weight
            np.testing.assert_allclose(layer.lora_A.data, A.detach().numpy(), rtol=1e-12)
            np.testing.assert_allclose(layer.lora_B.data, B.detach().numpy(), rtol=1e-12)


# ======================================================================================
# PEFT as the oracle, on minilora's GPT
# ======================================================================================


def peft_twin(tmp_path, model):
    """The three adapters saved, and loaded by name in PEFT on the PyTorch port of the
    same base: the PEFT model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch", reason="PEFT parity needs PyTorch")
    peft = pytest.importorskip("peft", reason="PEFT parity needs PEFT")
    from examples.torch_gpt import TorchGPT, load_minilora_state

    for name, config in zip(NAMES, CONFIGS, strict=True):
        peft_adapters.save_adapter(model, tmp_path / name, config, adapter_name=name)
    port = TorchGPT(TINY_2x2).to(torch.float64)
    plain = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 0)
    load_minilora_state(port, plain.state_dict())
    p = peft.PeftModel.from_pretrained(port, tmp_path / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        p.load_adapter(tmp_path / name, adapter_name=name)
    return p.to(torch.float64).eval()  # PEFT made the adapters float32


def peft_mix(tmp_path, model, kind, **kwargs):
    """The adapters combined in PEFT: {path: PEFT's layer holding "mix"}."""
    p = peft_twin(tmp_path, model)
    p.add_weighted_adapter(NAMES, WEIGHTS, "mix", combination_type=kind, **kwargs)
    inner = p.base_model.model
    return {
        path: m
        for path, m in inner.named_modules()
        if "mix" in getattr(m, "lora_A", {}) and not path.endswith("lora_A")
    }


@pytest.mark.oracle
@pytest.mark.parametrize(
    "kind, sign",
    [(k, "total") for k in EXACT] + [("ties", "frequency"), ("ties_svd", "frequency")],
)
def test_each_combination_type_gives_peft_adapter(tmp_path, kind, sign):
    model = three_adapters()
    theirs = peft_mix(tmp_path, model, kind, **options(kind, sign))
    add_weighted_adapter(model, NAMES, WEIGHTS, "mix", kind, **options(kind, sign))
    assert_same_adapter(layers_of(model, "mix"), theirs, kind)


@pytest.mark.oracle
@pytest.mark.parametrize("kind", DARE)
def test_dare_with_the_same_masks_gives_peft_adapter(tmp_path, monkeypatch, kind):
    torch = pytest.importorskip("torch", reason="PEFT parity needs PyTorch")
    model = three_adapters()
    generator = Recording(7)
    add_weighted_adapter(model, NAMES, WEIGHTS, "mix", kind, generator=generator, **options(kind))
    draws = list(generator.draws)
    # per block: q 3 adapters, k 1, v 1, o_proj 1, fc1 2; two blocks; A and B apart
    assert len(draws) == (16 if kind.endswith("svd") else 32)
    replay(monkeypatch, torch, draws)
    theirs = peft_mix(tmp_path, model, kind, **options(kind))
    assert draws == []  # PEFT drew exactly as many masks
    assert_same_adapter(layers_of(model, "mix"), theirs, kind)


# ======================================================================================
# PEFT as the oracle, on Hugging Face GPT-2 (c_attn fused)
# ======================================================================================

GPT2_CONFIGS = [  # one rank r' = 3·2 each (q, k, v with their own A's), scaling 1
    ml.LoRAConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ml.LoRAConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "fc1"]),
]


def gpt2_pair(tmp_path, torch, transformers):
    """A random GPT-2 folder, and minilora's model of it with adapters "a" and "b"."""
    from minilora.interop.model_files import load_model

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_embd=24, n_head=3, n_layer=2, n_positions=9)
    hf = transformers.GPT2LMHeadModel(config).double()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = load_model(tmp_path / "hf")
    rng = np.random.default_rng(3)
    for name, lora in zip(["a", "b"], GPT2_CONFIGS, strict=True):
        add_adapter(model, name, lora)
        set_adapter(model, name)
        for pname, p in model.named_parameters():
            if ".lora_" in pname:
                p.data[...] = 0.3 * rng.standard_normal(p.shape)
        peft_adapters.save_adapter(model, tmp_path / name, lora, adapter_name=name)
    return model


@pytest.mark.oracle
@pytest.mark.parametrize(
    "kind", ["svd", "cat", "linear", "ties", "magnitude_prune_svd", "dare_ties", "dare_linear_svd"]
)
def test_gpt2_combinations_are_peft_on_the_fused_c_attn(tmp_path, monkeypatch, kind):
    torch = pytest.importorskip("torch", reason="GPT-2 tests need PyTorch")
    transformers = pytest.importorskip("transformers", reason="GPT-2 tests need transformers")
    peft = pytest.importorskip("peft", reason="GPT-2 tests need PEFT")
    model = gpt2_pair(tmp_path, torch, transformers)
    weights, generator = [2.25, -0.25], Recording(5)
    kwargs = {**options(kind), **({"svd_rank": 4} if kind.endswith("svd") else {})}
    config = add_weighted_adapter(
        model, ["a", "b"], weights, "mix", kind, generator=generator, **kwargs
    )
    set_adapter(model, "mix")
    peft_adapters.save_adapter(model, tmp_path / "mix", config)

    replay(monkeypatch, torch, list(generator.draws), transpose=kind.endswith("svd"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    p = peft.PeftModel.from_pretrained(hf, tmp_path / "a", adapter_name="a")
    p.load_adapter(tmp_path / "b", adapter_name="b")
    p.to(torch.float64)
    p.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=kind, **kwargs)
    p.set_adapter("mix")
    idx = np.random.default_rng(1).integers(0, 40, (2, 7))
    with torch.no_grad():
        want = p.eval()(torch.from_numpy(idx)).logits.numpy()
    with ml.no_grad():
        got = model.eval()(idx)[0].data
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # the same rank as PEFT's: one A for q, k and v, saved at r, never 3r
    rank = p.peft_config["mix"].r
    assert config.r == rank == {"svd": 4, "cat": 12}.get(kind.split("_")[-1], 6)
    assert json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["r"] == rank


# ======================================================================================
# merge_and_unload(adapter_names=...) and one adapter per row (mixed_batch)
# ======================================================================================

IDX = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [0, 7, 7, 0, 9], [10, 1, 10, 1, 2]])
ROWS = ["b", BASE_ADAPTER, "a", "c"]


def logits(model, idx=IDX):
    with ml.no_grad():
        return model.eval()(idx)[0].data.copy()


def torch_logits(torch, model, **kwargs):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(IDX), **kwargs)[0].numpy()


@pytest.mark.oracle
def test_merge_and_unload_of_named_adapters_is_peft(tmp_path):
    torch = pytest.importorskip("torch", reason="PEFT parity needs PyTorch")
    model = three_adapters()
    theirs = peft_twin(tmp_path, model).merge_and_unload(adapter_names=["c", "a"])
    only_a = logits(merge_and_unload(three_adapters()))  # the active one, "a"
    merged = merge_and_unload(model, adapter_names=["c", "a"])
    assert merged is model and not lora_layers(model)  # a plain model, no adapter left
    got = logits(model)
    np.testing.assert_allclose(got, torch_logits(torch, theirs), rtol=1e-10, atol=1e-12)
    assert np.abs(got - only_a).max() > 1e-2  # "c" is in it
    with pytest.raises(ValueError, match="no LoRA adapter"):
        adapter_names(model)  # every adapter went


@pytest.mark.parametrize(
    "names, error, match",
    [
        (["a", "zz"], ValueError, r"no adapter named 'zz'"),
        (["a", "a"], ValueError, "names an adapter twice"),
        ("a", TypeError, "must be a non-empty list"),
        (["c", "b"], ValueError, "NaN or inf"),  # "b" diverged: "c" is taken out again
    ],
)
def test_merge_and_unload_refuses_bad_names_and_diverged_adapters_changing_nothing(
    names, error, match
):
    model = three_adapters()
    set_adapter(model, "b")
    next(p for n, p in model.named_parameters() if n.endswith("lora_B")).data[0, 0] = np.inf
    set_adapter(model, "a")
    before, held = snapshot(model), adapter_names(model)
    with pytest.raises(error, match=match):
        merge_and_unload(model, adapter_names=names)
    assert snapshot(model) == before and adapter_names(model) == held


@pytest.mark.oracle
def test_one_adapter_per_row_is_peft_and_each_row_its_adapter_alone(tmp_path):
    torch = pytest.importorskip("torch", reason="PEFT parity needs PyTorch")
    model = three_adapters().eval()
    want = torch_logits(torch, peft_twin(tmp_path, model), adapter_names=ROWS)
    before = snapshot(model)
    with mixed_batch(model, ROWS):
        got = logits(model)
    assert snapshot(model) == before and active_adapter(model) == "a"  # as it was
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for i, name in enumerate(ROWS):  # each row: its adapter alone, bitwise
        if name == BASE_ADAPTER:
            with disable_adapters(model):
                alone = logits(model)
        else:
            set_adapter(model, name)
            alone = logits(model)
        np.testing.assert_array_equal(got[i], alone[i])
    assert len({got[i].tobytes() for i in range(4)}) == 4


def test_mixed_batch_refuses_a_training_model_and_a_wrong_batch():
    model = three_adapters()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        with mixed_batch(model.train(), ROWS):
            pass
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        with mixed_batch(model.eval(), ["a", "zz"]):
            pass
    with mixed_batch(model, ROWS[:3]):
        with pytest.raises(ValueError, match="the batch has 4 rows but adapter_names names 3"):
            logits(model)
    assert active_adapter(model) == "a" and not any(
        isinstance(m, MixedBatchLinear) for m in model.modules()
    )


@pytest.mark.oracle
def test_gpt2_greedy_generation_with_one_adapter_per_row_is_peft(tmp_path):
    torch = pytest.importorskip("torch", reason="GPT-2 tests need PyTorch")
    transformers = pytest.importorskip("transformers", reason="GPT-2 tests need transformers")
    peft = pytest.importorskip("peft", reason="GPT-2 tests need PEFT")
    model = gpt2_pair(tmp_path, torch, transformers).eval()
    rows = ["b", "a", BASE_ADAPTER]
    idx = np.random.default_rng(2).integers(0, 40, (3, 3))
    with mixed_batch(model, rows):
        ours = model.generate(idx, 5, temperature=0)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    p = peft.PeftModelForCausalLM.from_pretrained(hf, tmp_path / "a", adapter_name="a")
    p.load_adapter(tmp_path / "b", adapter_name="b")
    p.to(torch.float64).eval()
    with torch.no_grad():
        theirs = p.generate(
            input_ids=torch.from_numpy(idx),
            attention_mask=torch.ones(idx.shape, dtype=torch.int64),
            adapter_names=rows,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(ours, theirs.numpy())
    with mixed_batch(model, ["a"] * 3):  # and the adapters matter
        assert not np.array_equal(model.generate(idx, 5, temperature=0), ours)


@pytest.mark.oracle
def test_gpt2_merge_and_unload_of_named_adapters_is_peft(tmp_path):
    torch = pytest.importorskip("torch", reason="GPT-2 tests need PyTorch")
    transformers = pytest.importorskip("transformers", reason="GPT-2 tests need transformers")
    peft = pytest.importorskip("peft", reason="GPT-2 tests need PEFT")
    model = gpt2_pair(tmp_path, torch, transformers)
    merge_and_unload(model, adapter_names=["b", "a"])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    p = peft.PeftModel.from_pretrained(hf, tmp_path / "a", adapter_name="a")
    p.load_adapter(tmp_path / "b", adapter_name="b")
    theirs = p.to(torch.float64).merge_and_unload(adapter_names=["b", "a"]).eval()
    idx = np.random.default_rng(4).integers(0, 40, (2, 7))
    with torch.no_grad():
        want = theirs(torch.from_numpy(idx)).logits.numpy()
    np.testing.assert_allclose(logits(model, idx), want, rtol=1e-10, atol=1e-10)
    assert not lora_layers(model)


@pytest.mark.parametrize("kind", ["ties", "dare_linear", "magnitude_prune_svd", "dare_ties_svd"])
def test_combinations_and_mixed_batches_run_on_a_device(kind):
    """On the stand-in device (a GPU's rules on the CPU, tests/standin.py): every step runs
    on the device, bitwise as on the CPU (DARE's masks come from the seeded generator)."""
    import standin

    standin.register()
    out = {}
    for device in ("cpu", "standin"):
        model = three_adapters().to(device)
        gen = backend.Generator(3)
        add_weighted_adapter(model, NAMES, WEIGHTS, "mix", kind, generator=gen, **options(kind))
        with mixed_batch(model.eval(), ["mix", BASE_ADAPTER, "b", "mix"]):
            with ml.no_grad():
                out[device] = backend.to_numpy(model(IDX)[0].data)
        assert all(backend.device_of(p.data) == device for p in model.parameters())
    np.testing.assert_array_equal(out["standin"], out["cpu"])


# ======================================================================================
# The merge methods on their own
# ======================================================================================


def test_dare_keeps_the_density_fraction_rescaled_and_the_expectation():
    ones = np.ones((400, 250))
    kept = merge_methods.random_pruning(ones, 0.3, True, backend.Generator(0))
    survivors = kept[kept != 0]
    assert abs(survivors.size / ones.size - 0.3) < 4 * np.sqrt(0.3 * 0.7 / ones.size)
    np.testing.assert_array_equal(survivors, 1 / 0.3)  # rescaled exactly
    assert not merge_methods.random_pruning(ones, 0.3, False, backend.Generator(0)).max() > 1
    # E[m ⊙ T / p] = T: the mean of many draws converges (4 standard errors)
    T = np.random.default_rng(1).standard_normal((5, 4))
    gen, n = backend.Generator(2), 4000
    mean = sum(merge_methods.random_pruning(T, 0.25, True, gen) for _ in range(n)) / n
    spread = np.abs(T) * np.sqrt((1 - 0.25) / 0.25) / np.sqrt(n)
    assert np.all(np.abs(mean - T) < 4 * spread)


def test_linear_merges_the_a_and_the_b_apart_with_signed_square_roots():
    """Without PEFT: A' = Σ sign(wᵢsᵢ)√|wᵢsᵢ| Aᵢ and B' = Σ √|wᵢsᵢ| Bᵢ over the adapters
    that adapt the layer; "svd" of the same adapters is the weighted sum (rank 6 >= 3·2)."""
    model = three_adapters()
    add_weighted_adapter(model, NAMES, WEIGHTS, "lin", "linear")
    add_weighted_adapter(model, NAMES, WEIGHTS, "sum", "svd", svd_rank=6)
    mine = [layers_of(model, name) for name in NAMES]
    for path, layer in layers_of(model, "lin").items():
        terms = [(w, m[path]) for w, m in zip(WEIGHTS, mine, strict=True) if path in m]
        c = [np.sign(w) * np.sqrt(abs(w * la.scaling)) for w, la in terms]
        d = [np.sqrt(abs(w * la.scaling)) for w, la in terms]
        A = sum(ci * la.lora_A.data for ci, (_, la) in zip(c, terms, strict=True))
        B = sum(di * la.lora_B.data for di, (_, la) in zip(d, terms, strict=True))
        np.testing.assert_allclose(layer.lora_A.data, A, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(layer.lora_B.data, B, rtol=1e-12, atol=1e-15)
        weighted = sum(w * la.get_delta_weight() for w, la in terms)
        summed = layers_of(model, "sum")[path].get_delta_weight()
        np.testing.assert_allclose(summed, weighted, rtol=1e-9, atol=1e-12)
        if len(terms) > 1:  # the cross terms: linear is not the weighted sum
            assert np.abs(layer.get_delta_weight() - weighted).max() > 1e-2


def test_dare_at_density_one_is_linear_and_a_seed_repeats():
    model = three_adapters()
    add_weighted_adapter(model, NAMES, WEIGHTS, "lin", "linear")
    add_weighted_adapter(model, NAMES, WEIGHTS, "dare", "dare_linear", density=1.0)
    for path, layer in layers_of(model, "dare").items():
        np.testing.assert_array_equal(layer.lora_A.data, layers_of(model, "lin")[path].lora_A.data)
    kwargs = {"density": 0.5, "generator": None}
    for name in ("d1", "d2"):
        kwargs["generator"] = backend.Generator(11)
        add_weighted_adapter(model, NAMES, WEIGHTS, name, "dare_ties", **kwargs)
    for path, layer in layers_of(model, "d1").items():
        np.testing.assert_array_equal(layer.lora_B.data, layers_of(model, "d2")[path].lora_B.data)


def test_ties_elects_the_sign_and_averages_the_agreeing_entries():
    T1 = np.array([[3.0, -1.0, 0.5, 2.0]])
    T2 = np.array([[-1.0, -2.0, 0.25, -4.0]])
    # total: signs of T1 + T2 = (+, -, +, -); frequency: of sign sums (0 -> +, -, +, 0 -> +)
    got = merge_methods.ties([T1, T2], [1.0, 2.0], 1.0, "total")
    np.testing.assert_array_equal(got, [[3.0, (-1.0 - 4.0) / 2, (0.5 + 0.5) / 2, -8.0]])
    got = merge_methods.ties([T1, T2], [1.0, 2.0], 1.0, "frequency")
    np.testing.assert_array_equal(got, [[3.0, -2.5, 0.5, 2.0]])
    # density 0.5 keeps the 2 largest |entries| of each before the election
    got = merge_methods.ties([T1, T2], [1.0, 1.0], 0.5, "total")
    np.testing.assert_array_equal(got, [[3.0, -2.0, 0.0, -4.0]])
