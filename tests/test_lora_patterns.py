"""Per-module ranks and alphas (``rank_pattern``, ``alpha_pattern``) and
``layers_to_transform`` / ``layers_pattern`` (minilora/variants/patterns.py, LoRAConfig): PEFT's
matching rules, apply_lora honouring them, the parameter count, adapter files that carry
them, and PEFT parity on the PyTorch port (the same layers, ranks and logits; folders both
ways)."""

from __future__ import annotations

import json
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
    snapshot,
)
from peft_helpers import cross_both_ways, peft_config

from minilora.interop import peft_adapters
from minilora.lora import LoRAConfig, apply_lora, count_parameters, lora_layers
from minilora.study import accounting
from minilora.variants import patterns

IDX = np.array([[1, 4, 1, 0, 9, 3], [6, 1, 4, 2, 10, 5]], dtype=np.int64)
PATTERNED = LoRAConfig(
    r=2,
    lora_alpha=4,
    target_modules=["q_proj", "v_proj", "fc1"],
    rank_pattern={"fc1": 3, r"blocks\.1\.attn\.v_proj": 4},
    alpha_pattern={"v_proj": 6, "q_proj": 1},
)
LAYERED = LoRAConfig(
    r=2,
    lora_alpha=4,
    target_modules=["q_proj", "fc2"],
    rank_pattern={"fc2": 5},
    layers_to_transform=[1],
    layers_pattern="blocks",
)
PATHS = [
    f"blocks.{i}.{m}"
    for i in range(2)
    for m in ("attn.q_proj", "attn.v_proj", "mlp.fc1", "mlp.fc2")
] + ["lm_head", "tok_emb"]


def ranks(model) -> dict:
    return {p: (layer.r, layer.lora_alpha) for p, layer in lora_layers(model)}


# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------


def test_pattern_keys_match_a_leaf_a_suffix_or_a_regex_first_key_wins():
    keys = ["q_proj", r"blocks\.1\..*", "attn.v_proj"]
    assert patterns.get_pattern_key(keys, "blocks.0.attn.q_proj") == "q_proj"
    assert patterns.get_pattern_key(keys, "blocks.1.attn.q_proj") == "q_proj"  # first wins
    assert patterns.get_pattern_key(keys, "blocks.1.mlp.fc1") == r"blocks\.1\..*"
    assert patterns.get_pattern_key(keys, "blocks.0.attn.v_proj") == "attn.v_proj"
    assert patterns.get_pattern_key(keys, "blocks.0.mlp.fc1") is None
    assert patterns.get_pattern_key(["proj"], "blocks.0.attn.q_proj") is None  # whole names


def test_layer_index_is_found_as_peft_finds_it():
    assert patterns.layer_index("blocks.3.attn.q_proj", "blocks") == 3
    assert patterns.layer_index("blocks.3.attn.q_proj", ["h", "blocks"]) == 3
    # without a pattern PEFT wants a number after two components: HF's model.layers.3.
    assert patterns.layer_index("blocks.3.attn.q_proj") is None
    assert patterns.layer_index("model.layers.3.mlp.experts.0.fc1") == 3
    assert patterns.layer_index("lm_head", "blocks") is None


def test_apply_lora_gives_each_layer_its_rank_and_alpha():
    model = adapted(PATTERNED, np.float32)
    got = ranks(model)
    assert got == {
        "blocks.0.attn.q_proj": (2, 1),
        "blocks.0.attn.v_proj": (2, 6),
        "blocks.0.mlp.fc1": (3, 4),
        "blocks.1.attn.q_proj": (2, 1),
        "blocks.1.attn.v_proj": (4, 6),
        "blocks.1.mlp.fc1": (3, 4),
    }
    layer = model.get_submodule("blocks.1.attn.v_proj")
    assert layer.lora_A.shape == (4, 8) and layer.scaling == 6 / 4


def test_layers_to_transform_adapts_only_the_listed_layers():
    model = adapted(LAYERED, np.float32)
    assert ranks(model) == {"blocks.1.attn.q_proj": (2, 4), "blocks.1.mlp.fc2": (5, 4)}
    as_int = adapted(
        LoRAConfig(r=2, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="blocks")
    )
    assert list(ranks(as_int)) == ["blocks.0.attn.q_proj"]


def test_trainable_count_is_the_sum_over_layers_of_r_times_in_plus_out():
    model = adapted(PATTERNED, np.float32)
    C = 8
    closed_form = 2 * 2 * (C + C) + 2 * 3 * (C + 4 * C) + 2 * (C + C) + 4 * (C + C)
    assert count_parameters(model)[0] == closed_form
    with pytest.raises(ValueError, match="rank_pattern"):  # one rank per name: refused
        accounting.LoRASpec.from_config(PATTERNED)


def test_zero_init_equivalence_with_patterns():
    base = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
    np.testing.assert_array_equal(
        logits_of(adapted(PATTERNED, np.float32), IDX), logits_of(base, IDX)
    )


BAD = {
    "rank not int": (dict(rank_pattern={"q_proj": 2.5}), "rank_pattern={'q_proj': 2.5}"),
    "rank zero": (dict(rank_pattern={"q_proj": 0}), "rank_pattern={'q_proj': 0}"),
    "alpha negative": (dict(alpha_pattern={"q_proj": -1}), "alpha_pattern={'q_proj': -1}"),
    "not a dict": (dict(rank_pattern=[("q_proj", 2)]), "rank_pattern=[('q_proj', 2)]"),
    "bad regex": (dict(rank_pattern={"(q": 2}), "rank_pattern key '(q'"),
    "layers": (dict(layers_to_transform=["0"]), "layers_to_transform=['0']"),
    "layers_pattern": (dict(layers_pattern=3), "layers_pattern=3"),
}


@pytest.mark.parametrize("change, message", BAD.values(), ids=BAD.keys())
def test_bad_patterns_are_refused_naming_the_field(change, message):
    with pytest.raises(ValueError) as info:
        LoRAConfig(**change)
    assert message in str(info.value)


def test_a_pattern_rank_above_min_out_in_warns_naming_the_layer():
    model = make_gpt(TINY_2x2)
    config = LoRAConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 9})
    with pytest.warns(UserWarning, match=r"blocks.0.attn.q_proj.*above min"):
        apply_lora(model, config)
    assert model.blocks[0].attn.q_proj.lora_A.shape == (9, 8)


def test_layers_that_leave_nothing_are_refused():
    config = LoRAConfig(
        r=2, target_modules=["q_proj"], layers_to_transform=[5], layers_pattern="blocks"
    )
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\]"):
        apply_lora(make_gpt(TINY_2x2), config)


@pytest.mark.parametrize("config", [PATTERNED, LAYERED], ids=["patterned", "layered"])
def test_adapter_files_carry_the_patterns_and_round_trip(tmp_path, config):
    model = adapted(config, np.float32)
    randomize_trainable(model, 1, 0.3)
    peft_adapters.save_adapter(model, tmp_path, config)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["rank_pattern"] == config.rank_pattern
    assert raw["alpha_pattern"] == config.alpha_pattern
    assert raw["layers_to_transform"] == config.layers_to_transform
    fresh = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
    assert peft_adapters.load_adapter(fresh, tmp_path) == config
    assert ranks(fresh) == ranks(model)
    np.testing.assert_array_equal(logits_of(fresh, IDX), logits_of(model, IDX))


def test_a_model_whose_ranks_differ_from_the_patterns_is_refused(tmp_path):
    model = adapted(PATTERNED, np.float32)
    peft_adapters.save_adapter(model, tmp_path, PATTERNED)
    other = adapted(LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"]))
    before = snapshot(other)
    with pytest.raises(ValueError, match="config says r=3 but the LoRA layer blocks.0.mlp.fc1"):
        peft_adapters.load_adapter(other, tmp_path)
    assert snapshot(other) == before


# --------------------------------------------------------------------------------------
# PEFT on the PyTorch port (oracle)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch", reason="parity needs PyTorch")
    peft = pytest.importorskip("peft", reason="pattern parity needs PEFT")
    from examples.torch_gpt import TorchGPT, load_minilora_state

    return torch, peft, TorchGPT, load_minilora_state


@pytest.mark.oracle
def test_pattern_rules_agree_with_peft(oracle):
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    peft = oracle[1]
    keys = ["q_proj", r"blocks\.1\..*", "attn.v_proj", "fc"]
    for path in PATHS:
        theirs = get_pattern_key(keys, path)
        assert patterns.get_pattern_key(keys, path) == (None if theirs == path else theirs)
    for config in (
        PATTERNED,
        LAYERED,
        LoRAConfig(
            target_modules=["q_proj", "tok_emb"], layers_to_transform=0, layers_pattern=["blocks"]
        ),
        LoRAConfig(target_modules=["q_proj"], layers_to_transform=[0]),  # no pattern: none
    ):
        for path in PATHS:
            want = bool(check_target_module_exists(peft_config(peft, config), path))
            assert config.adapts(path) == want, (path, config)


@pytest.mark.oracle
@pytest.mark.parametrize("config", [PATTERNED, LAYERED], ids=["patterned", "layered"])
def test_peft_builds_the_same_layers_and_computes_the_same_logits(oracle, config):
    torch, peft, TorchGPT, load_minilora_state = oracle
    model = adapted(config, np.float64)
    randomize_trainable(model, 2, 0.3)
    port = peft.get_peft_model(TorchGPT(TINY_2x2).to(torch.float64), peft_config(peft, config))
    load_minilora_state(port, model.state_dict())  # strict: the same layers and shapes
    assert port.get_nb_trainable_parameters() == count_parameters(model)
    for path, layer in lora_layers(model):
        theirs = port.base_model.model.get_submodule(path)
        assert (theirs.r["default"], theirs.scaling["default"]) == (layer.r, layer.scaling), path
    port.eval()
    with torch.no_grad():
        want = port(torch.tensor(IDX))[0].numpy()
    np.testing.assert_allclose(logits_of(model, IDX), want, rtol=1e-10, atol=1e-12)


@pytest.mark.oracle
@pytest.mark.parametrize("config", [PATTERNED, LAYERED], ids=["patterned", "layered"])
def test_adapter_folders_cross_both_ways(oracle, tmp_path, config):
    torch, peft = oracle[:2]
    base = randomize_weights(make_gpt(TINY_2x2, 0, np.float32), 0)
    model = adapted(config, np.float32)
    randomize_trainable(model, 3, 0.3)
    read = cross_both_ways(torch, peft, model, config, base, tmp_path, IDX, std=0.3)
    assert ranks(base) == ranks(model)
    assert read.rank_pattern == config.rank_pattern
