"""PEFT's LoRA-family options on a Hugging Face GPT-2, both ways (issue 26).

One random GPT2LMHeadModel (width 32, 4 heads, 2 layers, float32). For each configuration
of :data:`MATRIX` (PEFT's LoRA-family options that apply to GPT-2, as PEFT's decoder,
custom-model and initialization tests write them):

* PEFT -> minilora: ``get_peft_model`` with that config, EVERY adapter tensor moved off its
  init (B, DoRA's magnitude, embedding adapters, saved modules, trainable tokens, VeRA's
  vectors), ``save_pretrained``; minilora's ``load_adapter`` gives PEFT's logits (float32,
  1e-5 relative);
* minilora -> PEFT: the adapter minilora loaded, moved again by minilora, saved by
  ``save_adapter``, loads in PEFT with minilora's logits.

A configuration in :data:`REFUSED` must instead be refused, by both, with a message holding
the words given there; the reason says why minilora cannot compute it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import minilora as ml
from minilora.interop.model_files import load_model
from minilora.interop.peft_adapters import load_adapter, save_adapter
from minilora.interop.vera_adapters import load_vera, save_vera

torch = pytest.importorskip("torch", reason="GPT-2 tests need PyTorch: pip install -e '.[oracle]'")
transformers = pytest.importorskip("transformers", reason="GPT-2 tests need transformers")
peft = pytest.importorskip("peft", reason="GPT-2 adapter tests need PEFT")

from test_hf_gpt2 import ours, theirs  # noqa: E402  (each model's logits, in eval mode)

pytestmark = pytest.mark.oracle

SHAPE = dict(vocab_size=50, n_embd=32, n_head=4, n_layer=2, n_positions=16)
TOL = 1e-5  # float32
ALL = ["c_attn", "c_proj", "c_fc"]

# id -> (PEFT config class, its keyword arguments)
MATRIX = {
    # plain LoRA: targets, biases, scalings, inits, layer selections
    "c_attn": ("LoraConfig", dict(target_modules=["c_attn"])),
    "c_attn-c_proj": ("LoraConfig", dict(target_modules=["c_attn", "c_proj"])),
    "all-linear": ("LoraConfig", dict(target_modules="all-linear")),
    "bias-all": ("LoraConfig", dict(target_modules=["c_attn"], bias="all")),
    "bias-lora_only": ("LoraConfig", dict(target_modules=ALL, bias="lora_only")),
    "rslora": ("LoraConfig", dict(target_modules=ALL, use_rslora=True)),
    "regex": ("LoraConfig", dict(target_modules=r".*\.h\.1\.(attn\.c_attn|mlp\.c_fc)")),
    "layers_to_transform": ("LoraConfig", dict(target_modules=["c_fc"], layers_to_transform=[1])),
    "layers_pattern-h": (
        "LoraConfig",
        dict(target_modules=["c_attn"], layers_to_transform=0, layers_pattern="h"),
    ),
    "full-path-layers": (
        "LoraConfig",
        dict(target_modules=["transformer.h.0.attn.c_attn", "mlp.c_fc"], layers_to_transform=[0]),
    ),
    "init-false": ("LoraConfig", dict(target_modules=ALL, init_lora_weights=False)),
    "init-gaussian": ("LoraConfig", dict(target_modules=ALL, init_lora_weights="gaussian")),
    "init-orthogonal": ("LoraConfig", dict(target_modules=ALL, init_lora_weights="orthogonal")),
    "dropout": ("LoraConfig", dict(target_modules=ALL, lora_dropout=0.1)),
    "rank-above-min": ("LoraConfig", dict(target_modules=["c_attn", "mlp.c_proj"], r=40)),
    # DoRA
    "dora": ("LoraConfig", dict(target_modules=["c_attn"], use_dora=True)),
    "dora-all": ("LoraConfig", dict(target_modules=ALL, use_dora=True)),
    "dora-all-linear": ("LoraConfig", dict(target_modules="all-linear", use_dora=True)),
    "dora-rslora": ("LoraConfig", dict(target_modules=ALL, use_dora=True, use_rslora=True)),
    "dora-bias": ("LoraConfig", dict(target_modules=["c_attn"], use_dora=True, bias="all")),
    "dora-layers": (
        "LoraConfig",
        dict(target_modules=["c_fc"], use_dora=True, layers_to_transform=[1]),
    ),
    "dora-pattern": (
        "LoraConfig",
        dict(target_modules=ALL, use_dora=True, rank_pattern={"c_fc": 4}),
    ),
    # PiSSA
    "pissa": ("LoraConfig", dict(target_modules=["c_attn"], init_lora_weights="pissa")),
    "pissa-all": ("LoraConfig", dict(target_modules=ALL, init_lora_weights="pissa")),
    "pissa-single": (
        "LoraConfig",
        dict(target_modules=["attn.c_proj", "c_fc"], init_lora_weights="pissa"),
    ),
    "pissa-converted": (
        "LoraConfig",
        dict(target_modules=ALL, init_lora_weights="pissa", converted=True),
    ),
    "pissa-niter": ("LoraConfig", dict(target_modules=ALL, init_lora_weights="pissa_niter_4")),
    # rank_pattern, alpha_pattern
    "rank_pattern": ("LoraConfig", dict(target_modules=ALL, rank_pattern={"c_attn": 4})),
    "alpha_pattern": ("LoraConfig", dict(target_modules=ALL, alpha_pattern={"c_proj": 16})),
    "patterns-full-path": (
        "LoraConfig",
        dict(
            target_modules=ALL,
            rank_pattern={"transformer.h.0.attn.c_attn": 6},
            alpha_pattern={"h.1.mlp.c_fc": 3},
        ),
    ),
    "patterns-regex": ("LoraConfig", dict(target_modules=ALL, rank_pattern={r"h\.1\..*": 3})),
    "patterns-mlp-c_proj": (
        "LoraConfig",
        dict(target_modules=ALL, rank_pattern={"mlp.c_proj": 5}, alpha_pattern={"attn.c_proj": 2}),
    ),
    "patterns-unmatched": (
        "LoraConfig",
        dict(target_modules=["c_attn"], rank_pattern={"nothing": 5}, alpha_pattern={"no": 3}),
    ),
    "patterns-rslora": (
        "LoraConfig",
        dict(
            target_modules=ALL,
            use_rslora=True,
            rank_pattern={"c_fc": 2},
            alpha_pattern={"c_attn": 7},
        ),
    ),
    # embeddings
    "wte": ("LoraConfig", dict(target_modules=["wte"])),
    "wpe": ("LoraConfig", dict(target_modules=["wpe"])),
    "wte-wpe-c_attn": ("LoraConfig", dict(target_modules=["wte", "wpe", "c_attn"])),
    # the head
    "lm_head": ("LoraConfig", dict(target_modules=["lm_head"])),
    "c_attn-lm_head": ("LoraConfig", dict(target_modules=["c_attn", "lm_head"])),
    # modules_to_save, exclude_modules, trainable tokens
    "save-ln_f": ("LoraConfig", dict(target_modules=["c_attn"], modules_to_save=["ln_f"])),
    "save-lm_head": ("LoraConfig", dict(target_modules=["c_attn"], modules_to_save=["lm_head"])),
    "save-wte": ("LoraConfig", dict(target_modules=["c_attn"], modules_to_save=["wte"])),
    "exclude": ("LoraConfig", dict(target_modules="all-linear", exclude_modules=["c_fc"])),
    "exclude-path": (
        "LoraConfig",
        dict(target_modules=ALL, exclude_modules=["transformer.h.0.attn.c_proj"]),
    ),
    "exclude-regex": ("LoraConfig", dict(target_modules=ALL, exclude_modules=r".*\.h\.1\.mlp.*")),
    "tokens": ("LoraConfig", dict(target_modules=["c_attn"], trainable_token_indices=[0, 3, 7])),
    "tokens-wte": (
        "LoraConfig",
        dict(target_modules=["c_fc"], trainable_token_indices={"wte": [1, 2]}),
    ),
    # inits that leave the base weights alone
    "eva": ("LoraConfig", dict(target_modules=ALL, init_lora_weights="eva")),
    "mica": ("LoraConfig", dict(target_modules=ALL, init_lora_weights="mica")),
    # lora_bias: a trainable bias on lora_B
    "lora_bias": ("LoraConfig", dict(target_modules=ALL, lora_bias=True)),
    # VeRA
    "vera-c_fc": ("VeraConfig", dict(target_modules=["c_fc"], r=4)),
    "vera-mlp": ("VeraConfig", dict(target_modules=["c_fc", "mlp.c_proj"], r=4)),
    "vera-c_attn": ("VeraConfig", dict(target_modules=["c_attn"], r=4)),
    "vera-all": ("VeraConfig", dict(target_modules=ALL, r=4)),
    "vera-c_attn-no-projection": (
        "VeraConfig",
        dict(target_modules=["c_attn"], r=4, save_projection=False),
    ),
    "vera-no-projection": (
        "VeraConfig",
        dict(target_modules=["c_fc"], r=4, save_projection=False),
    ),
}

# id -> (the side that refuses, words its message holds, why minilora cannot compute it):
# "load": minilora refuses PEFT's adapter; "save": it loads PEFT's adapter exactly, but
# refuses to save its own (moved) copy, which PEFT would load as another function.
_PISSA_QKV = (
    "save",
    ["have different lora_A", "rank 3r"],
    "minilora trains q, k and v with an A each; saved, they stack to one c_attn adapter of "
    "rank 3r, and PEFT redoes PiSSA's SVD at the file's rank when it loads: another base",
)
REFUSED: dict[str, tuple[str, list[str], str]] = {
    "pissa": _PISSA_QKV,
    "pissa-all": _PISSA_QKV,
    "pissa-niter": (
        "load",
        ["init_lora_weights='pissa_niter_4'", "randomised"],
        "PEFT's fast SVD draws a random sketch from torch's generator when it loads the "
        "adapter, and the base it leaves depends on those draws: PEFT's own loads differ "
        "(test_peft_loads_a_pissa_niter_adapter_by_chance)",
    ),
}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(1)
    return folder, rng.integers(0, SHAPE["vocab_size"], (2, 13), dtype=np.int64)


def peft_saved(folder, adapter, kind: str, kwargs: dict):
    """PEFT's model for ``kwargs`` on the GPT-2 in ``folder``, every adapter tensor moved
    off its init, saved to ``adapter`` (PiSSA ``converted``: as a plain LoRA adapter of
    the original base, PEFT's ``path_initial_model_for_weight_conversion``)."""
    converted = kwargs.pop("converted", False)
    base = transformers.GPT2LMHeadModel.from_pretrained(folder)
    torch.manual_seed(2)  # PEFT's init draws
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, getattr(peft, kind)(r=kwargs.pop("r", 2), **kwargs))
        if converted:  # PEFT's recipe: the initial adapter, saved as plain LoRA
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(adapter.parent / "initial")
            model.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    initial = {"path_initial_model_for_weight_conversion": adapter.parent / "initial"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(adapter, **(initial if converted else {}))
    return model.eval()


def moved(model, seed: int) -> None:
    """Every adapter tensor minilora holds moved off what it loaded."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if p.requires_grad or "lora_" in name or "vera_lambda" in name:
            p.data = p.data + 0.1 * rng.standard_normal(p.shape).astype(p.dtype)


def peft_to_minilora(tmp_path, gpt2, key: str):
    """PEFT's adapter for ``MATRIX[key]`` loaded by minilora: (the model, its config)."""
    folder, idx = gpt2
    kind, kwargs = MATRIX[key]
    hf = peft_saved(folder, tmp_path / "theirs", kind, dict(kwargs))
    model = load_model(folder)
    load = load_vera if kind == "VeraConfig" else load_adapter
    config = load(model, tmp_path / "theirs")
    want = theirs(hf, idx)
    assert np.abs(want - ours(load_model(folder), idx)).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(ours(model, idx), want, rtol=TOL, atol=TOL)
    return model, config


def minilora_to_peft(tmp_path, gpt2, key: str, model, config) -> None:
    """``model``'s adapter, moved again, saved by minilora, loads in PEFT with its logits."""
    folder, idx = gpt2
    moved(model, 5)
    want = ours(model, idx)
    save = save_vera if MATRIX[key][0] == "VeraConfig" else save_adapter
    save(model, tmp_path / "ours", config)
    base = transformers.GPT2LMHeadModel.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    np.testing.assert_allclose(theirs(loaded, idx), want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("key", MATRIX)
def test_peft_option_crosses_both_ways(tmp_path, gpt2, key):
    side, words, _ = REFUSED.get(key, (None, [], ""))
    if side == "load":
        with pytest.raises(ValueError) as e:
            peft_to_minilora(tmp_path, gpt2, key)
    else:
        model, config = peft_to_minilora(tmp_path, gpt2, key)
        if side is None:
            minilora_to_peft(tmp_path, gpt2, key, model, config)
            return
        with pytest.raises(ValueError) as e:
            minilora_to_peft(tmp_path, gpt2, key, model, config)
    for word in words:
        assert word in str(e.value)


def test_peft_loads_a_pissa_niter_adapter_by_chance(tmp_path, gpt2):
    """Why "pissa-niter" is refused: PEFT's own loads of one such adapter, after two torch
    seeds, give logits that differ (and the same seed gives the same logits)."""
    folder, idx = gpt2
    kwargs = dict(target_modules=["c_attn", "c_fc"], init_lora_weights="pissa_niter_4")
    peft_saved(folder, tmp_path / "theirs", "LoraConfig", kwargs)
    logits = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        base = transformers.GPT2LMHeadModel.from_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(base, tmp_path / "theirs")
        logits.append(theirs(loaded, idx))
    assert np.array_equal(logits[0], logits[2])
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


# minilora's own adapters on a GPT-2 (apply_lora, in minilora's names), saved, load in PEFT:
# the pieces of c_attn with their own ranks, scalings and DoRA magnitudes, a partly
# adapted c_attn, embeddings, modules_to_save with the tied head, and trainable tokens
OURS = {
    "dora-q-fc2": dict(target_modules=["q_proj", "fc2"], use_dora=True),
    "patterns-q-v": dict(
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 3},
        alpha_pattern={"v_proj": 5, "blocks.1.attn.o_proj": 7},
    ),
    "embeddings-saved-head": dict(
        target_modules=["tok_emb", "pos_emb", "k_proj"], modules_to_save=["ln_f", "lm_head"]
    ),
    "rank-above-min": dict(target_modules=["fc2"], r=40, use_rslora=True),
    "tokens-tied-head": dict(target_modules=["fc1"], trainable_token_indices={"tok_emb": [4, 1]}),
}


@pytest.mark.parametrize("key", OURS)
def test_minilora_adapter_on_gpt2_loads_in_peft(tmp_path, gpt2, key):
    folder, idx = gpt2
    model = load_model(folder)
    config = ml.LoRAConfig(**{"r": 2, "lora_alpha": 4, **OURS[key]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ml.apply_lora(model, config)  # PEFT builds a rank above min(out, in): so does minilora
    above = [w for w in caught if "above min(out, in)" in str(w.message)]
    assert len(above) == (key == "rank-above-min")
    moved(model, 7)
    assert np.abs(ours(model, idx) - ours(load_model(folder), idx)).max() > 1e-3
    minilora_to_peft(tmp_path, gpt2, "c_attn", model, config)


def test_vera_on_c_attn_gets_peft_s_gradients(tmp_path, gpt2):
    """PEFT's one c_attn layer trains as minilora's fused q, k, v: the shared λ_d's gradient
    (the sum of the three uses) and the λ_b's (q's, k's, v's stacked) are PEFT's."""
    folder, idx = gpt2
    hf = peft_saved(folder, tmp_path / "theirs", "VeraConfig", dict(MATRIX["vera-c_attn"][1]))
    model = load_model(folder)
    load_vera(model, tmp_path / "theirs")
    rng = np.random.default_rng(4)
    weights = rng.standard_normal((*idx.shape, SHAPE["vocab_size"])).astype(np.float32)
    (model(idx)[0] * ml.Tensor(weights)).sum().backward()  # every logit, weighted
    (hf(torch.from_numpy(idx)).logits * torch.from_numpy(weights)).sum().backward()
    grads = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}
    for i in range(SHAPE["n_layer"]):
        q, k, v = (model.get_submodule(f"blocks.{i}.attn.{n}_proj") for n in "qkv")
        theirs_ = f"base_model.model.transformer.h.{i}.attn.c_attn.vera_lambda_"
        for got, want in [
            (q.vera_lambda_d.grad, grads[theirs_ + "d.default"]),
            (
                np.concatenate([m.vera_lambda_b.grad for m in (q, k, v)]),
                grads[theirs_ + "b.default"],
            ),
        ]:
            assert np.abs(want).max() > 1e-2  # a gradient worth comparing
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
