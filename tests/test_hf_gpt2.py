"""Hugging Face GPT-2 checkpoints and their PEFT adapters (minilora.interop.hf_gpt2, checkpoint).

Oracle tests: random GPT2LMHeadModel models of two shapes, saved with ``save_pretrained``,
are loaded by minilora and compared with transformers, and adapters cross over both ways
with PEFT (non-zero B, every bias mode, rslora), logits compared:

* the logits equal GPT2LMHeadModel's (float32 to 1e-5, float64 to 1e-10), whichever key
  spelling the file uses; the tied head's gradient is torch's wte gradient (both uses);
* a minilora adapter saved on a GPT-2 loads in PEFT on GPT2LMHeadModel with the same
  logits, and a PEFT adapter trained there loads in minilora with the same logits;
* a folder or adapter minilora cannot compute is refused with a ValueError naming the
  file, the key or value and what was expected, and leaves nothing half-built.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from helpers import snapshot

import minilora as ml
from minilora import backend
from minilora.interop import hf_gpt2
from minilora.interop.model_files import load_model, save_model
from minilora.interop.peft_adapters import load_adapter, save_adapter
from minilora.lora import count_parameters
from minilora.study.accounting import total_params

torch = pytest.importorskip("torch", reason="GPT-2 tests need PyTorch: pip install -e '.[oracle]'")
transformers = pytest.importorskip("transformers", reason="GPT-2 tests need transformers")
peft = pytest.importorskip("peft", reason="GPT-2 adapter tests need PEFT")

pytestmark = pytest.mark.oracle

# Two shapes: a plain one, and an odd one (3 heads of 16, 3 layers, a vocabulary of 37)
SHAPES = {
    "32x4x2": dict(vocab_size=50, n_embd=32, n_head=4, n_layer=2, n_positions=16),
    "48x3x3": dict(vocab_size=37, n_embd=48, n_head=3, n_layer=3, n_positions=20),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def gpt2_folder(
    folder: Path, shape: str = "32x4x2", dtype=torch.float32, seed=0, noise=0.1, **changes
):
    """A random GPT2LMHeadModel saved with save_pretrained; every parameter (biases and
    LayerNorms too) moved off its init by ``noise``, so a wrong mapping of any of them shows."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**SHAPES[shape], **changes)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model = model.to(dtype).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def ids(shape: str = "32x4x2", seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = SHAPES[shape]
    return rng.integers(0, s["vocab_size"], (2, s["n_positions"] - 3), dtype=np.int64)


def ours(model, idx) -> np.ndarray:
    with ml.no_grad():
        return backend.to_numpy(model.eval()(idx)[0].data)


def theirs(model, idx) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(idx)).logits.numpy()


def assert_close(a, b, dtype):
    np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype])


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_equal_transformers(tmp_path, shape, dtype):
    hf = gpt2_folder(tmp_path, shape, dtype)
    model = load_model(tmp_path)
    assert (
        model.tok_emb.weight.dtype == {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    )
    assert isinstance(model.config, hf_gpt2.GPT2Config) and not model.training
    idx = ids(shape)
    assert_close(ours(model, idx), theirs(hf, idx), dtype)


def test_original_key_spelling_loads(tmp_path):
    """The original gpt2 files: bare keys (h.0..., wte), the attention-mask buffers
    attn.bias / attn.masked_bias, and lm_head.weight written out (equal to wte)."""
    hf = gpt2_folder(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    T = SHAPES["32x4x2"]["n_positions"]
    for i in range(SHAPES["32x4x2"]["n_layer"]):
        bare[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
        bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    bare["lm_head.weight"] = bare["wte.weight"].copy()
    safetensors.numpy.save_file(bare, path)
    idx = ids()
    assert_close(ours(load_model(tmp_path), idx), theirs(hf, idx), torch.float32)


def test_untied_head_loads(tmp_path):
    hf = gpt2_folder(tmp_path, tie_word_embeddings=False)
    model = load_model(tmp_path)
    assert model.lm_head.weight is not model.tok_emb.weight
    idx = ids()
    assert_close(ours(model, idx), theirs(hf, idx), torch.float32)


def test_tied_head_is_one_parameter_with_both_gradients(tmp_path):
    """One Parameter in two places: listed once, counted once (as transformers counts),
    and its gradient is torch's wte gradient, the embedding's and the head's summed."""
    hf = gpt2_folder(tmp_path, dtype=torch.float64)
    model = load_model(tmp_path).train()
    assert model.lm_head.weight is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "lm_head.weight" not in names
    assert len(model.parameters()) == len({id(p) for p in model.parameters()})
    assert count_parameters(model)[1] == hf.num_parameters() == total_params(model.config)
    opt = ml.AdamW(model.parameters(), lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)

    idx = ids()
    targets = np.roll(idx, -1, axis=1)
    _, loss = model(idx, targets)
    loss.backward()
    out = hf.eval()(torch.from_numpy(idx)).logits  # eval: GPT-2 dropout off (minilora has 0)
    loss_t = torch.nn.functional.cross_entropy(
        out.flatten(0, 1), torch.from_numpy(targets).flatten()
    )
    loss_t.backward()
    wte = hf.transformer.wte.weight
    assert hf.lm_head.weight is wte
    np.testing.assert_allclose(model.tok_emb.weight.grad, wte.grad.numpy(), rtol=1e-10, atol=1e-12)
    # the head's share reaches every row, the embedding's only the rows of ids in idx
    unused = np.setdiff1d(np.arange(SHAPES["32x4x2"]["vocab_size"]), idx)
    assert unused.size and (np.abs(model.tok_emb.weight.grad[unused]).sum(axis=1) > 0).all()


def test_tied_model_round_trips_in_minilora_format(tmp_path):
    gpt2_folder(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    save_model(model, tmp_path / "m.safetensors")
    again = load_model(tmp_path / "m.safetensors")
    assert again.config == model.config
    assert again.lm_head.weight is again.tok_emb.weight
    idx = ids()
    np.testing.assert_array_equal(ours(again, idx), ours(model, idx))


def edit_config(folder: Path, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model_type": "llama"}, ["model_type='llama'", "'gpt2'"]),
        ({"activation_function": "gelu"}, ["activation_function='gelu'", "gelu_new"]),
        ({"activation_function": "relu"}, ["activation_function='relu'"]),
        ({"scale_attn_by_inverse_layer_idx": True}, ["scale_attn_by_inverse_layer_idx=True"]),
        ({"add_cross_attention": True}, ["add_cross_attention=True"]),
        ({"scale_attn_weights": False}, ["scale_attn_weights=False"]),
        ({"n_inner": 64}, ["n_inner=64", "n_embd=32"]),
        ({"n_embd": 48}, ["wte.weight", "(50, 32)", "(50, 48)"]),
        ({"n_layer": 3}, ["config.json says n_layer=3, but the file holds 2 layers"]),
        ({"n_layer": 1}, ["unexpected tensor 'transformer.h.1.ln_1.weight'"]),
        ({"n_head": 5}, ["n_embd=32 must be divisible by n_head=5"]),
        ({"layer_norm_epsilon": -1}, ["layer_norm_epsilon=-1"]),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_config_is_refused(tmp_path, changes, words):
    gpt2_folder(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    assert "config.json" in str(e.value) or "model.safetensors" in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_bad_tensors_are_refused(tmp_path):
    gpt2_folder(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].T
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    message = str(e.value)
    assert str(path) in message
    assert "missing tensor 'h.1.mlp.c_fc.bias'" in message
    assert (
        "transformer.h.0.attn.c_attn.weight has shape (96, 32), config.json implies (32, 96)"
        in message
    )
    assert "lm_head.weight differs from the token embedding" in message


def test_missing_weights_file(tmp_path):
    gpt2_folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        load_model(tmp_path)


def test_config_fields_are_checked():
    # (hf_model_type is not a GPTConfig field: test_checkpoint checks it in model files)
    with pytest.raises(ValueError, match="tie_word_embeddings=1"):
        ml.GPTConfig(tie_word_embeddings=1)


# --------------------------------------------------------------------------------------
# Adapters, minilora -> PEFT
# --------------------------------------------------------------------------------------


def randomize_lora(model, seed: int, bias: str):
    """Non-zero A and B (B is zero at init), and moved biases where the adapter holds them."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if "lora_" in name or (bias != "none" and p.requires_grad):
            p.data = p.data + 0.3 * rng.standard_normal(p.shape).astype(p.dtype)


def peft_model(folder, adapter, dtype):
    base = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize(
    "shape, targets, rslora, bias",
    [
        ("32x4x2", ["q_proj", "v_proj"], False, "none"),
        ("48x3x3", ["q_proj", "v_proj"], True, "lora_only"),
        ("32x4x2", ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], False, "all"),
        ("48x3x3", ["k_proj", "fc1"], True, "all"),
        ("32x4x2", ["o_proj"], False, "lora_only"),  # attn.c_proj, not mlp.c_proj
        ("48x3x3", ["fc2"], False, "none"),  # mlp.c_proj, not attn.c_proj
        ("32x4x2", ["blocks.1.attn.q_proj", "blocks.0.mlp.fc1"], True, "none"),
    ],
)
def test_minilora_adapter_loads_in_peft(tmp_path, shape, targets, rslora, bias):
    dtype = torch.float64
    gpt2_folder(tmp_path / "hf", shape, dtype)
    model = load_model(tmp_path / "hf")
    config = ml.LoRAConfig(r=2, lora_alpha=3, target_modules=targets, use_rslora=rslora, bias=bias)
    ml.apply_lora(model, config)
    randomize_lora(model, 5, bias)
    save_adapter(model, tmp_path / "adapter", config)

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] is True
    assert "c_proj" not in written["target_modules"]  # never the over-matching bare name
    theirs_model = peft_model(tmp_path / "hf", tmp_path / "adapter", dtype)
    idx = ids(shape)
    want = ours(model, idx)
    assert np.abs(want - ours(load_model(tmp_path / "hf"), idx)).max() > 1e-3  # it matters
    assert_close(want, theirs(theirs_model, idx), dtype)
    # and back: the saved GPT-2 adapter loads in minilora with the same logits
    again = load_model(tmp_path / "hf")
    load_adapter(again, tmp_path / "adapter")
    assert_close(ours(again, idx), want, dtype)


@pytest.mark.parametrize(
    "targets, words",
    [
        (["q_proj", "lm_head"], "lm_head shares its weight with tok_emb"),
        (["tok_emb"], "tok_emb shares its weight with lm_head"),
    ],
)
def test_merging_an_adapter_on_the_tied_weight_is_refused(tmp_path, targets, words):
    """GPT-2's head and token embedding are one Parameter: an adapter on either trains,
    saves and loads (tests/test_gpt2_peft_matrix.py), but merged it would change both uses.
    merge_lora and merge_and_unload refuse it, naming the layers, and change nothing."""
    gpt2_folder(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    ml.apply_lora(model, ml.LoRAConfig(r=2, target_modules=targets))
    randomize_lora(model, 5, "none")
    idx = ids()
    want, before = ours(model, idx), snapshot(model)
    for merge in (ml.merge_lora, ml.merge_and_unload):
        with pytest.raises(ValueError, match="nothing was merged") as e:
            merge(model)
        assert words in str(e.value)
        assert snapshot(model) == before
    np.testing.assert_array_equal(ours(model, idx), want)
    # what the refusal prevents: the layer merged on its own changes the other use too
    wte = model.tok_emb.weight.data.copy()
    model.get_submodule(targets[-1]).merge()
    assert np.abs(model.tok_emb.weight.data - wte).max() > 1e-2
    assert np.abs(ours(model, idx) - want).max() > 1e-2


# --------------------------------------------------------------------------------------
# Adapters, PEFT -> minilora
# --------------------------------------------------------------------------------------


def peft_adapter(folder, adapter, dtype, seed=3, **lora_kwargs):
    """A PEFT LoRA on GPT2LMHeadModel with random (non-zero) A, B and trainable biases,
    saved; returns the PEFT model."""
    base = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(adapter)
    return model.eval()


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ("32x4x2", dict(target_modules=["c_attn"])),
        ("48x3x3", dict(target_modules=["c_attn", "c_proj"], use_rslora=True, bias="all")),
        ("32x4x2", dict(target_modules=["c_attn", "c_proj", "c_fc"], bias="lora_only")),
        ("48x3x3", dict(target_modules=["mlp.c_proj"], bias="lora_only", use_rslora=True)),
        ("32x4x2", dict(target_modules="all-linear", bias="all")),
        ("48x3x3", dict(target_modules=r".*\.h\.[02]\.attn\.c_attn")),
        ("48x3x3", dict(target_modules=["c_fc"], layers_to_transform=[1])),
    ],
)
def test_peft_adapter_loads_in_minilora(tmp_path, shape, kwargs):
    dtype = torch.float64
    gpt2_folder(tmp_path / "hf", shape, dtype)
    hf = peft_adapter(tmp_path / "hf", tmp_path / "adapter", dtype, r=2, lora_alpha=5, **kwargs)
    model = load_model(tmp_path / "hf")
    config = load_adapter(model, tmp_path / "adapter")
    assert config.r == 2 and config.use_rslora == kwargs.get("use_rslora", False)
    idx = ids(shape)
    want = theirs(hf, idx)
    assert np.abs(want - ours(load_model(tmp_path / "hf"), idx)).max() > 1e-3  # it matters
    assert_close(ours(model, idx), want, dtype)
    # and on: saved again by minilora, it loads in PEFT with the same logits
    save_adapter(model, tmp_path / "again", config)
    assert_close(theirs(peft_model(tmp_path / "hf", tmp_path / "again", dtype), idx), want, dtype)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"use_dora": True}, ["missing", "c_attn.lora_magnitude_vector"]),
        ({"modules_to_save": ["lm_head"]}, ["missing 'lm_head.weight'"]),
        ({"modules_to_save": ["c_fc"]}, ["modules_to_save ['c_fc'] match none of"]),
        ({"layers_pattern": "blocks", "layers_to_transform": [0]}, ["layers_pattern='blocks'"]),
        ({"target_modules": ["c_attn", "lm_head"]}, ["lm_head"]),
        ({"target_modules": ["wte"]}, ["h.0.attn.c_attn is not adapted by target_modules"]),
        ({"target_modules": ["ln_f"]}, ["matches none of GPT-2's LoRA modules"]),
        (
            {"target_modules": ["transformer.h.1.attn.c_attn"], "layers_to_transform": [0]},
            ["h.0.attn.c_attn.lora_A.weight': transformer.h.0.attn.c_attn is not adapted"],
        ),
        ({"r": 3}, ["lora_A", "expected (3, 32)"]),
        ({"fan_in_fan_out": "yes"}, ["fan_in_fan_out='yes'"]),
        ({"rank_pattern": {"c_attn": 4}}, ["c_attn.lora_A.weight has shape (2, 32)", "(4, 32)"]),
    ],
    ids=lambda v: str(v)[:40],
)
def test_unsupported_peft_adapter_is_refused(tmp_path, changes, words):
    gpt2_folder(tmp_path / "hf")
    peft_adapter(
        tmp_path / "hf", tmp_path / "adapter", torch.float32, r=2, target_modules=["c_attn"]
    )
    path = tmp_path / "adapter" / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    model = load_model(tmp_path / "hf")
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        load_adapter(model, tmp_path / "adapter")
    for word in words:
        assert word in str(e.value)
    assert snapshot(model) == before


def test_a_head_adapter_of_another_base_is_refused_naming_the_tied_weight(tmp_path):
    """PEFT saves the tied head's weight (lm_head.base_layer.weight, GPT-2's wte) with an
    lm_head adapter: it must be this model's embedding."""
    gpt2_folder(tmp_path / "hf")
    gpt2_folder(tmp_path / "other", seed=1)
    peft_adapter(
        tmp_path / "other", tmp_path / "adapter", torch.float32, r=2, target_modules=["lm_head"]
    )
    model = load_model(tmp_path / "hf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="lm_head.base_layer.weight is the tied head's weight"):
        load_adapter(model, tmp_path / "adapter")
    assert snapshot(model) == before
    load_adapter(load_model(tmp_path / "other"), tmp_path / "adapter")  # its own base: loads


def test_layer_norm_epsilon_and_gelu_spelling_follow_config(tmp_path):
    """A large eps changes the logits visibly, so it must be read from config.json; the
    tanh GELU may be spelt "gelu_pytorch_tanh"."""
    hf = gpt2_folder(tmp_path, layer_norm_epsilon=0.5, activation_function="gelu_pytorch_tanh")
    model = load_model(tmp_path)
    assert model.config.layer_norm_epsilon == 0.5
    idx = ids()
    assert_close(ours(model, idx), theirs(hf, idx), torch.float32)


def test_config_that_is_not_json_is_refused(tmp_path):
    gpt2_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(tmp_path)


# --------------------------------------------------------------------------------------
# benchmarks/gpt2_peft.py still runs (--quick: a tiny GPT-2), on the same weights
# --------------------------------------------------------------------------------------


@pytest.mark.slow  # about 20 s: two fresh processes measure each engine's memory
def test_gpt2_peft_benchmark_quick(tmp_path, monkeypatch):
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    import gpt2_peft

    result = gpt2_peft.main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "gpt2_peft.json").read_text())
    assert written["command"].startswith("python benchmarks/gpt2_peft.py")
    # the same weights and batch: the same first loss
    assert result["first_loss"]["minilora"] == pytest.approx(
        result["first_loss"]["torch"], rel=1e-5
    )
    # PEFT's fused c_attn adapter: rank 2r, 3C rows of B, so twice minilora's parameters
    assert result["trainable_params"]["torch"] == 2 * result["trainable_params"]["minilora"]
    for engine in ("minilora", "torch"):
        assert 0 < result[engine]["min_s"] <= result[engine]["median_s"]
        assert result["memory"][engine]["peak_mib"] >= result["memory"][engine]["loaded_mib"] > 0
    assert result["memory"]["minilora"]["step_traced_mib"] > 0
    # --quick: the step and greedy generation at batch 1 and 8, at --threads (1) only
    jobs = result["by_threads"][1]
    assert sorted(jobs) == ["generate_b1", "generate_b8", "step"]
    for t in jobs.values():
        assert t["q1"] <= t["ratio"] <= t["q3"] and "x" in t["text"]
    assert all(0 <= share <= 1 for share in result["same_tokens"].values())


def test_greedy_generation_equals_transformers(tmp_path):
    """minilora's KV-cached decoding on the loaded GPT-2 picks transformers' tokens (large
    random weights, so that the tokens vary instead of repeating one)."""
    hf = gpt2_folder(tmp_path, dtype=torch.float64, noise=1.0)
    model = load_model(tmp_path)
    prompt = ids()[:, :4]
    with torch.no_grad():
        want = hf.generate(
            torch.from_numpy(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0
        ).numpy()
    assert len(np.unique(want[:, 4:])) > 4
    np.testing.assert_array_equal(model.generate(prompt, 8, temperature=0), want)


@pytest.mark.filterwarnings("ignore:load_model.*float16")
def test_float16_with_large_residual_entries_equals_transformers(tmp_path):
    """A float16 GPT-2 whose residual stream holds entries far (> 256) from their row's
    mean: layer norm must square x - μ in float32 (as PyTorch does), not in float16, where
    it overflows 65504 and every logit after it is wrong. minilora's float16 logits equal
    transformers' float16 ones (to float16 rounding) and pick the float32 model's tokens."""
    hf = gpt2_folder(tmp_path / "f32", dtype=torch.float32)
    with torch.no_grad():  # one channel of every position 300 to 900 from the others
        hf.transformer.wpe.weight[:, 5] += torch.linspace(300.0, 900.0, 16)
    hf.to(torch.float16).save_pretrained(tmp_path / "f16", safe_serialization=True)
    hf16, idx = hf.to(torch.float16), ids()
    model = load_model(tmp_path / "f16")
    got, want16 = ours(model, idx), theirs(hf16, idx)
    want32 = theirs(hf.to(torch.float32), idx)
    assert got.dtype == np.float16 and np.isfinite(got).all()
    np.testing.assert_allclose(got, want16, rtol=2e-2, atol=2e-2 * np.abs(want32).max())
    np.testing.assert_array_equal(got.argmax(-1), want32.argmax(-1))
