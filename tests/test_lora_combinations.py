"""LoRA's options together: DoRA and PiSSA with per-layer ranks (``rank_pattern``,
``alpha_pattern``), embedding adapters with DoRA, PiSSA, LoRA+ and several named adapters,
VeRA and several named adapters. Each pair either works (checked against the base model,
a round trip through the files, and PEFT on the PyTorch port) or is refused with a
message naming it, leaving the model as it was."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import safetensors.numpy
from helpers import TINY_2x2, logits_of, make_gpt, randomize_weights, snapshot

import minilora as ml
from minilora.compression.qlora import QLoRALinear, apply_qlora
from minilora.compression.quantize import quantize_model
from minilora.interop import peft_adapters
from minilora.lora import LoRAConfig, adapted_layers, apply_lora, lora_layers
from minilora.nn import Embedding
from minilora.variants import multi_adapter, vera
from minilora.variants.embedding import LoRAEmbedding
from minilora.variants.loraplus import create_loraplus_optimizer, loraplus_groups

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
PATTERNS = dict(
    r=2,
    lora_alpha=4,
    target_modules=["q_proj", "fc1"],
    rank_pattern={"fc1": 3, r"blocks\.1\.attn\.q_proj": 1},
    alpha_pattern={"q_proj": 1},
)
WANT_RANKS = {  # path: (r, lora_alpha) from PATTERNS
    "blocks.0.attn.q_proj": (2, 1),
    "blocks.0.mlp.fc1": (3, 4),
    "blocks.1.attn.q_proj": (1, 1),
    "blocks.1.mlp.fc1": (3, 4),
}


def base(dtype=np.float32):
    return randomize_weights(make_gpt(TINY_2x2, 0, dtype), 0)


def randomize_adapters(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.data += rng.normal(0, 0.3, p.shape).astype(p.dtype)


def ranks(model) -> dict:
    return {p: (layer.r, layer.lora_alpha) for p, layer in lora_layers(model)}


# --------------------------------------------------------------------------------------
# DoRA and PiSSA with per-layer ranks
# --------------------------------------------------------------------------------------


def test_dora_with_patterns_gives_each_layer_its_rank_and_round_trips(tmp_path):
    config = LoRAConfig(**PATTERNS, use_dora=True)
    model = base(np.float64)
    want = logits_of(model, IDX)
    apply_lora(model, config)
    assert ranks(model) == WANT_RANKS
    for path, layer in lora_layers(model):
        r, out_f = WANT_RANKS[path][0], layer.weight.shape[0]
        assert layer.use_dora and layer.lora_A.shape == (r, layer.weight.shape[1])
        assert layer.lora_magnitude_vector.shape == (out_f,)
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-12, atol=1e-12)  # m/‖·‖ = 1
    randomize_adapters(model, 1)
    trained = logits_of(model, IDX)
    peft_adapters.save_adapter(model, tmp_path, config)
    fresh = base(np.float64)
    assert peft_adapters.load_adapter(fresh, tmp_path) == config
    assert ranks(fresh) == WANT_RANKS
    np.testing.assert_array_equal(logits_of(fresh, IDX), trained)
    ml.merge_lora(fresh)
    np.testing.assert_allclose(logits_of(fresh, IDX), trained, rtol=1e-10, atol=1e-10)


def test_pissa_with_patterns_inits_each_layer_at_its_own_rank():
    config = LoRAConfig(**PATTERNS, init_lora_weights="pissa")
    model = base(np.float64)
    original = {p: model.get_submodule(p).weight.data.copy() for p in WANT_RANKS}
    want = logits_of(model, IDX)
    apply_lora(model, config)
    assert ranks(model) == WANT_RANKS
    for path, layer in lora_layers(model):
        r = WANT_RANKS[path][0]
        assert layer.lora_A.shape == (r, layer.weight.shape[1])
        assert layer.lora_B.shape == (layer.weight.shape[0], r)
        # residual + s·B·A is the original weight, and B·A has rank r (the top-r part)
        rebuilt = layer.weight.data + layer.get_delta_weight()
        np.testing.assert_allclose(rebuilt, original[path], rtol=1e-12, atol=1e-12)
        assert np.linalg.matrix_rank(layer.get_delta_weight()) == r
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-10, atol=1e-10)


def test_pissa_with_patterns_converts_to_plain_lora_at_twice_each_rank(tmp_path):
    config = LoRAConfig(**PATTERNS, init_lora_weights="pissa")
    original = base()
    model = copy.deepcopy(original)
    apply_lora(model, config)
    peft_adapters.save_adapter(model, tmp_path / "initial", config)
    randomize_adapters(model, 2)
    peft_adapters.save_adapter(
        model,
        tmp_path / "lora",
        config,
        path_initial_model_for_weight_conversion=tmp_path / "initial",
    )
    written = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"fc1": 6, r"blocks\.1\.attn\.q_proj": 2}
    assert written["alpha_pattern"] == {"q_proj": 2}
    loaded = peft_adapters.load_adapter(original, tmp_path / "lora")
    assert loaded.init_lora_weights == "kaiming"
    assert ranks(original) == {p: (2 * r, 2 * a) for p, (r, a) in WANT_RANKS.items()}
    want = logits_of(model, IDX)
    np.testing.assert_allclose(logits_of(original, IDX), want, rtol=1e-5, atol=1e-5)


@pytest.mark.oracle
def test_peft_builds_the_same_dora_layers_with_patterns_and_computes_the_same_logits():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch", reason="parity needs PyTorch")
    peft = pytest.importorskip("peft", reason="parity needs PEFT")
    from examples.torch_gpt import TorchGPT, load_minilora_state

    config = LoRAConfig(**PATTERNS, use_dora=True)
    model = base(np.float64)
    apply_lora(model, config)
    randomize_adapters(model, 3)
    port = peft.get_peft_model(
        TorchGPT(TINY_2x2).to(torch.float64),
        peft.LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            rank_pattern=dict(config.rank_pattern),
            alpha_pattern=dict(config.alpha_pattern),
            use_dora=True,
        ),
    )
    load_minilora_state(port, model.state_dict())  # strict: the same layers and shapes
    port.eval()
    with torch.no_grad():
        want = port(torch.tensor(IDX))[0].numpy()
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# Embedding adapters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant", [dict(use_dora=True), dict(init_lora_weights="pissa")], ids=["dora", "pissa"]
)
def test_dora_and_pissa_on_an_embedding_are_refused_naming_it(tmp_path, variant):
    model = base()
    before = snapshot(model)
    config = LoRAConfig(r=2, target_modules=["tok_emb", "q_proj"], **variant)
    with pytest.raises(ValueError, match=r"\['tok_emb'\] are embeddings.*Linear layers only"):
        apply_lora(model, config)
    assert snapshot(model) == before and not adapted_layers(model)
    # a folder that says so is refused by load_adapter too
    plain = base()
    apply_lora(plain, LoRAConfig(r=2, target_modules=["tok_emb"]))
    peft_adapters.save_adapter(plain, tmp_path, LoRAConfig(r=2, target_modules=["tok_emb"]))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw.update({"use_dora": True} if "use_dora" in variant else {"init_lora_weights": "pissa"})
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    weights = tmp_path / "adapter_model.safetensors"  # rewritten without the config's digest
    safetensors.numpy.save_file(safetensors.numpy.load_file(weights), weights)
    with pytest.raises(ValueError, match=r"\['tok_emb'\] are embeddings"):
        peft_adapters.load_adapter(model, tmp_path)
    assert snapshot(model) == before and not adapted_layers(model)


def test_loraplus_puts_the_embedding_adapter_at_loraplus_lr_embedding():
    model = base()
    apply_lora(model, LoRAConfig(r=2, target_modules=["tok_emb", "q_proj"]))
    groups = loraplus_groups(model)
    assert [n for n, _ in groups["embedding"]] == [
        "tok_emb.lora_embedding_A",
        "tok_emb.lora_embedding_B",
    ]
    assert all(".lora_embedding_" not in n for key in ("A", "B") for n, _ in groups[key])
    opt = create_loraplus_optimizer(
        model, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5
    )
    embedding = [g for g in opt.param_groups if g["params"][0] is groups["embedding"][0][1]]
    assert len(embedding) == 1 and embedding[0]["lr"] == 1e-5


# --------------------------------------------------------------------------------------
# Several named adapters: LoRALinear only
# --------------------------------------------------------------------------------------


def kinds(model) -> dict:
    return {p: type(m).__name__ for p, m in model.named_modules()}


def test_a_model_with_an_embedding_adapter_gets_no_second_named_adapter():
    model = base()
    apply_lora(model, LoRAConfig(r=2, target_modules=["tok_emb", "q_proj"]))
    before, tree = snapshot(model), kinds(model)
    with pytest.raises(ValueError, match=r"embedding adapters \['tok_emb'\]"):
        multi_adapter.add_adapter(model, "other", LoRAConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"embedding adapters \['tok_emb'\]"):
        multi_adapter.active_adapter(model)
    assert snapshot(model) == before and kinds(model) == tree


def test_a_named_adapter_on_an_embedding_is_refused_and_dropped(tmp_path):
    model = base()
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    before, tree = snapshot(model), kinds(model)
    config = LoRAConfig(r=2, target_modules=["tok_emb", "v_proj"])
    with pytest.raises(ValueError, match=r"embedding adapters \['tok_emb'\]"):
        multi_adapter.add_adapter(model, "emb", config)
    assert snapshot(model) == before and kinds(model) == tree
    assert multi_adapter.adapter_names(model) == ["default"]
    # loaded by name, into a model with adapters and into a base model
    source = base()
    apply_lora(source, config)
    peft_adapters.save_adapter(source, tmp_path, config)
    fresh = base()
    for target in (model, fresh):
        before, tree = snapshot(target), kinds(target)
        with pytest.raises(ValueError, match=r"embedding adapters \['tok_emb'\]"):
            peft_adapters.load_adapter(target, tmp_path, adapter_name="emb")
        assert snapshot(target) == before and kinds(target) == tree
    assert isinstance(fresh.tok_emb, Embedding) and not isinstance(fresh.tok_emb, LoRAEmbedding)


def test_a_model_with_vera_layers_gets_no_named_adapter():
    model = base()
    vera.apply_vera(model, vera.VeraConfig(r=2, target_modules=["q_proj"]))
    before, tree = snapshot(model), kinds(model)
    with pytest.raises(ValueError, match=r"VeRA layers \['blocks.0.attn.q_proj'"):
        multi_adapter.add_adapter(model, "lora", LoRAConfig(r=2, target_modules=["v_proj"]))
    assert snapshot(model) == before and kinds(model) == tree


def test_dora_adapters_are_not_combined():
    model = base()
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], use_dora=True))
    multi_adapter.add_adapter(model, "two", LoRAConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapters \['default'\] use DoRA"):
        multi_adapter.add_weighted_adapter(model, ["default", "two"], [1.0, 1.0], "sum", "cat")
    assert snapshot(model) == before
    assert multi_adapter.adapter_names(model) == ["default", "two"]


# --------------------------------------------------------------------------------------
# QLoRA with per-layer ranks
# --------------------------------------------------------------------------------------


def test_qlora_honours_rank_pattern_and_layers_to_transform():
    model = base()
    quantize_model(model, "nf4", 4)
    config = LoRAConfig(**PATTERNS, layers_to_transform=[0], layers_pattern="blocks")
    assert apply_qlora(model, config) == ["blocks.0.attn.q_proj", "blocks.0.mlp.fc1"]
    assert ranks(model) == {p: WANT_RANKS[p] for p in ("blocks.0.attn.q_proj", "blocks.0.mlp.fc1")}
    assert all(isinstance(m, QLoRALinear) for _, m in lora_layers(model))
