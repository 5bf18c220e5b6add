"""A minilora-saved adapter_config.json edited by hand (minilora.interop.peft_adapters): the
weights record the config saved with them (safetensors ``__metadata__``), and load_adapter
compares the fields that change what the adapter computes.

* bookkeeping fields (``base_model_name_or_path``, ``revision``, ``inference_mode``,
  ``task_type``, ``peft_version``) are edited freely: the adapter loads, silently, the same;
* an edited field that changes the result loads as the config says (as PEFT loads it), with a
  warning that names the field and both values; so do weights from another save.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
from helpers import TINY_2x2, logits_of, make_gpt, randomize_weights

import minilora as ml
from minilora.interop.peft_adapters import load_adapter, save_adapter
from minilora.interop.safetensors_files import read_safetensors, serialize
from minilora.lora import lora_layers

IDX = np.array([[1, 2, 3, 4], [4, 3, 2, 1]])


def saved(folder, alpha=4):
    """A base model, and its adapter (non-zero B, ``lora_alpha``) saved to ``folder``:
    (base, adapted model)."""
    base = randomize_weights(make_gpt(TINY_2x2, dtype=np.float64), 0)
    model = copy.deepcopy(base)
    config = ml.LoRAConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    ml.apply_lora(model, config)
    for _, layer in lora_layers(model):
        layer.lora_B.data += 0.5
    save_adapter(model, folder, config)
    return base, model


def edit(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}, indent=4))


BOOKKEEPING = {
    "base_model_name_or_path": "my-org/my-base",
    "revision": "v2",
    "inference_mode": False,
    "task_type": "CAUSAL_LM",
    "peft_version": "0.13.2",
}


@pytest.mark.parametrize("changes", [{k: v} for k, v in BOOKKEEPING.items()] + [BOOKKEEPING])
def test_bookkeeping_fields_are_edited_freely(tmp_path, changes):
    base, model = saved(tmp_path / "a")
    edit(tmp_path / "a", **changes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a word
        load_adapter(base, tmp_path / "a")
    np.testing.assert_array_equal(logits_of(base, IDX), logits_of(model, IDX))


@pytest.mark.parametrize(
    "changes, named, scaling",
    [
        ({"lora_alpha": 16}, "lora_alpha: 4 -> 16", 8.0),
        ({"use_rslora": True}, "use_rslora: false -> true", 4 / np.sqrt(2)),
        ({"alpha_pattern": {"q_proj": 8}}, 'alpha_pattern: {} -> {"q_proj": 8}', None),
        ({"lora_alpha": 6, "revision": "v2"}, r"lora_alpha: 4 -> 6(?!.*revision)", 3.0),
    ],
)
def test_an_edited_field_that_changes_the_result_is_named(tmp_path, changes, named, scaling):
    base, model = saved(tmp_path / "a")
    edit(tmp_path / "a", **changes)
    with pytest.warns(UserWarning, match=f"not the config saved with its weights.*{named}"):
        config = load_adapter(base, tmp_path / "a")
    for key, value in changes.items():  # loaded as the config says, as PEFT loads it
        assert key in BOOKKEEPING or getattr(config, key) == value
    layers = dict(lora_layers(base))
    if scaling is not None:
        assert all(layer.scaling == pytest.approx(scaling) for layer in layers.values())
    assert np.abs(logits_of(base, IDX) - logits_of(model, IDX)).max() > 1e-3


def test_weights_from_another_save_are_named(tmp_path):
    saved(tmp_path / "a", alpha=4)
    saved(tmp_path / "b", alpha=16)
    shutil.copy(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a")
    with pytest.warns(UserWarning, match="lora_alpha: 16 -> 4"):
        load_adapter(make_gpt(TINY_2x2, dtype=np.float64), tmp_path / "a")


def test_weights_without_the_record_load_silently(tmp_path):
    # PEFT's own files, or minilora's from before the record: nothing to compare
    base, model = saved(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors, _ = read_safetensors(weights, "test")
    weights.write_bytes(serialize(tensors, {"format": "pt"}))
    edit(tmp_path / "a", lora_alpha=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(base, tmp_path / "a")
