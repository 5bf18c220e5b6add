"""VeRA adapters as PEFT folders: ``save_vera`` and ``load_vera`` (the layer and its op:
minilora/variants/vera.py).

``adapter_config.json`` with ``"peft_type": "VERA"``, and ``adapter_model.safetensors`` with
``base_model.model.<path>.vera_lambda_b`` / ``.vera_lambda_d`` and, with ``save_projection``
(PEFT's default), ``base_model.vera_A`` and ``base_model.vera_B``. The math: docs/math.md#vera.
A save is one commit, as an adapter's (minilora/interop/peft_adapters.py): the old adapter
or the new one, whenever the process dies.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from minilora import backend
from minilora.interop import hf_gpt2
from minilora.interop.files import JSON_LIMIT, read_file
from minilora.interop.peft_config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_BOOKKEEPING,
    PEFT_PREFIX,
    json_object,
    unset,
)
from minilora.interop.safetensors_files import (
    atomic_write,
    finish_interrupted_write,
    read_safetensors,
    serialize,
)
from minilora.lora import is_target
from minilora.nn import Linear, Module
from minilora.variants.patterns import paths_matching
from minilora.variants.vera import (
    VeraConfig,
    apply_vera,
    fused_vera_layers,
    projection_problem,
    projection_shape,
    row_offsets,
    vera_layers,
    vera_targets,
)

# PEFT keeps the shared projections on its wrapper, outside base_model.model
_PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")
# adapter_config.json keys that do not change what a trained VeRA adapter computes
_HARMLESS = PEFT_BOOKKEEPING | {"init_weights"}  # init only: the trained vectors replace it


def save_vera(model: Module, path, config: VeraConfig) -> None:
    """Write the model's VeRA adapter as PEFT does: λ vectors per layer, and the shared
    projections when ``config.save_projection``. The two files are one commit."""
    if not isinstance(config, VeraConfig):
        raise TypeError(f"save_vera: config must be a VeraConfig, got {type(config).__name__}")
    layers = vera_layers(model)
    if not layers:
        raise ValueError("save_vera: the model has no VeRA layers (call apply_vera first)")
    # module path in the file (minilora's, or GPT-2's) -> the VeRA layers it holds
    names = {p: [p] for p, _ in layers}
    gpt2 = hf_gpt2.is_gpt2(model)
    if gpt2:
        names, problems = hf_gpt2.vera_names(model, list(names))
        if problems:
            raise ValueError(
                "save_vera: a GPT-2 model's VeRA adapter is saved in GPT2LMHeadModel's names, "
                f"and {problems[0]}"
            )
    elif fused := fused_vera_layers(model):
        raise ValueError(
            f"save_vera: the VeRA layers {fused[0]} share one vera_lambda_d (fused), and PEFT "
            "holds a fused layer only as GPT-2's c_attn (a model loaded from a GPT-2 folder)"
        )
    wrong = [p for p, m in layers if not is_target(config.target_modules, p) or m.r != config.r]
    if wrong or any(m.merged for _, m in layers):
        raise ValueError(
            f"save_vera: the config (r={config.r}, target_modules={config.target_modules}) "
            f"does not describe the model's VeRA layers {wrong}, or a layer is merged"
        )
    tensors = {}
    for name, paths in names.items():  # a fused layer: one λ_d, the pieces' λ_b stacked
        pieces = [model.get_submodule(p) for p in paths]
        lambda_b = [m.vera_lambda_b.data for m in pieces]  # (out,) each
        xp = backend.get_array_module(*lambda_b)
        prefix = f"{PEFT_PREFIX}{name}."
        tensors[prefix + "vera_lambda_d"] = backend.to_numpy(pieces[0].vera_lambda_d.data)
        tensors[prefix + "vera_lambda_b"] = backend.to_numpy(xp.concatenate(lambda_b))
    if config.save_projection:
        shared = layers[0][1]
        for key, t in zip(_PROJECTION_KEYS, (shared.vera_A, shared.vera_B), strict=True):
            tensors[key] = backend.to_numpy(t.data).astype(backend.float32)
    peft_config = {
        "peft_type": "VERA",
        **config.to_dict(),
        "target_modules": list(names) if gpt2 else list(config.target_modules),
        "fan_in_fan_out": gpt2,  # GPT-2's Conv1D layers: PEFT sets it true
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "revision": None,
    }
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_vera: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
    weights = serialize(tensors, {"format": "pt"})
    atomic_write([(folder / ADAPTER_WEIGHTS_NAME, weights), (folder / ADAPTER_CONFIG_NAME, text)])


def load_vera(model: Module, path) -> VeraConfig:
    """Load a PEFT VeRA folder into a base ``model`` (no adapters yet) and return its
    config; the model is left in eval mode. Projections come from the file when it holds
    them, else they are drawn from ``projection_prng_key`` as PEFT draws them. Everything
    is checked first; on any problem nothing in the model changes."""
    folder = Path(path)
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"load_vera: no adapter folder at {folder}") from None
    if not stat.S_ISDIR(mode):
        raise ValueError(f"load_vera: {folder} is a file; expected an adapter folder")
    finish_interrupted_write(folder, "load_vera")  # a save killed after its commit point
    config_path = folder / ADAPTER_CONFIG_NAME
    data = read_file(config_path, "load_vera", "a JSON file", JSON_LIMIT)
    tensors, _ = read_safetensors(folder / ADAPTER_WEIGHTS_NAME, "load_vera", half_to_float32=True)
    gpt2 = hf_gpt2.is_gpt2(model) and not any(
        k.startswith(tuple(f"{PEFT_PREFIX}{n}." for n in ("blocks", "tok_emb", "pos_emb")))
        for k in tensors
    )
    config, names = _read_vera_config(config_path, data, model, gpt2)
    problems = []
    if vera_layers(model) or any("lora_" in n for n, _ in model.named_parameters()):
        problems.append("the model already has adapters; load_vera needs a base model")
    chosen, unmatched = vera_targets(model, config.target_modules)
    if unmatched:
        problems.append(f"target_modules {unmatched} match no Linear layer in the model")
    # module path in the file -> [(minilora layer, its rows of the module's outputs)]
    layout = names if gpt2 else {p: [(p, slice(None))] for p, _ in chosen}
    fused = [[p for p, _ in pieces] for pieces in layout.values() if len(pieces) > 1]
    out = {p: m.weight.shape[0] for p, m in chosen}
    expected = {}
    for name, pieces in layout.items():
        expected[f"{PEFT_PREFIX}{name}.vera_lambda_d"] = (config.r,)
        expected[f"{PEFT_PREFIX}{name}.vera_lambda_b"] = (sum(out[p] for p, _ in pieces),)
    if chosen:
        max_out, max_in = projection_shape(chosen, row_offsets(chosen, fused))
        if config.save_projection:
            expected[_PROJECTION_KEYS[0]] = (config.r, max_in)
            expected[_PROJECTION_KEYS[1]] = (max_out, config.r)
        elif problem := projection_problem(config.r, max_out, max_in):  # drawn: not read
            problems.append(problem)
    for key in sorted(tensors):
        if key not in expected:
            problems.append(f"unexpected key {key!r}")
        elif tuple(tensors[key].shape) != expected[key]:
            problems.append(
                f"{key} has shape {tuple(tensors[key].shape)}, expected {expected[key]}"
            )
    problems += [f"missing key {k!r}" for k in sorted(set(expected) - set(tensors))]
    if problems:
        raise ValueError(
            f"load_vera: {folder} does not fit the model; nothing was changed:\n  "
            + "\n  ".join(problems)
        )
    projections = None
    if config.save_projection:
        projections = tuple(tensors[k] for k in _PROJECTION_KEYS)
    apply_vera(model, config, projections=projections, fused=fused)
    for name, pieces in layout.items():  # a fused layer's λ_d is its pieces' one Parameter
        prefix = f"{PEFT_PREFIX}{name}."
        for path, rows in pieces:
            layer = model.get_submodule(path)
            _copy_into(layer.vera_lambda_d, tensors[prefix + "vera_lambda_d"])
            _copy_into(layer.vera_lambda_b, tensors[prefix + "vera_lambda_b"][rows])
    model.eval()
    return config


def _copy_into(p, arr) -> None:
    """``p``'s data becomes a copy of the host array ``arr``, in ``p``'s dtype and device."""
    p.data = backend.array(arr, dtype=p.dtype, device=p.device).copy()


def _read_vera_config(path: Path, data: bytes, model: Module, gpt2: bool) -> tuple:
    """adapter_config.json as a ``VeraConfig``: every key honoured, harmless, or refused
    when set (ValueError naming the file and every problem), and {GPT-2 module path:
    [(minilora path, its rows of the module's outputs)]} for a ``gpt2`` adapter
    (GPT2LMHeadModel's names, its targets matched there as PEFT matches them). A string
    ``target_modules`` is PEFT's regular expression over module paths and becomes the
    paths it matches."""
    raw = json_object(path, data, "load_vera")
    problems = []
    if raw.get("peft_type") != "VERA":
        problems.append(f"peft_type={raw.get('peft_type')!r}, expected 'VERA'")
    read = {"peft_type", "r", "target_modules", "projection_prng_key", "save_projection", "bias"}
    read |= {"d_initial", "vera_dropout"}  # init and training only, kept in the config
    read |= {"fan_in_fan_out"} if gpt2 else set()  # GPT-2's Conv1D: PEFT sets it true
    for key, value in sorted(raw.items()):
        if key not in read | _HARMLESS and not unset(value):
            problems.append(
                f"{key}={value!r} is not supported by minilora's VeRA; it must be unset"
            )
    fields_ = {k: raw[k] for k in read - {"peft_type", "fan_in_fan_out"} if raw.get(k) is not None}
    targets, names = fields_.get("target_modules"), {}
    if gpt2 and targets is not None:
        names, found = hf_gpt2.vera_targets_from_gpt2(model, targets)
        fields_["target_modules"] = [p for pieces in names.values() for p, _ in pieces]
        problems += found
    elif isinstance(targets, str):
        paths = [p for p, m in model.named_modules() if type(m) is Linear and p]
        fields_["target_modules"], found = paths_matching(targets, paths)
        problems += found
    if problems:
        raise ValueError(
            f"load_vera: {path} is not a usable VeRA config:\n  " + "\n  ".join(problems)
        )
    try:
        return VeraConfig(**fields_), names
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_vera: {path}: {e}") from None
