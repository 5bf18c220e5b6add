"""LoRA adapters as PEFT folders: ``save_adapter`` and ``load_adapter``.

A folder holds ``adapter_config.json`` (peft_config.py) and ``adapter_model.safetensors``
with ``base_model.model.<module path>.lora_A.weight`` (r, in) and ``.lora_B.weight``
(out, r), so an adapter trained here loads in PEFT and back. Everything is checked before
the model changes. The layout and names: docs/porting.md, "Names across libraries".

A save is one commit (``safetensors_files.atomic_write``): both files are written in full
to temporary names beside their destinations and fsync'ed; a journal naming them is then
moved into place (the commit point); the two files replace their predecessors; the journal
goes. A save killed before the commit point leaves the old adapter; one killed after it
leaves the journal, and ``load_adapter`` (or the next save) completes the move first, so
the folder loads as the new adapter. Never new weights beside an old config.

The weights record the config saved with them; ``load_adapter`` warns, naming each field,
when ``adapter_config.json`` differs from it in a field that changes what the adapter
computes (bookkeeping such as ``base_model_name_or_path`` is edited freely):
docs/porting.md, "An edited config is named, never silent".
"""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from pathlib import Path

from minilora import backend
from minilora.interop import hf_gpt2
from minilora.interop.files import JSON_LIMIT, read_file
from minilora.interop.peft_config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    SAVED_CONFIG_KEY,
    edited_fields,
    peft_config_dict,
    read_adapter_config,
)
from minilora.interop.safetensors_files import (
    atomic_write,
    finish_interrupted_write,
    host_copy,
    read_safetensors,
    serialize,
)
from minilora.lora import (
    LoRAConfig,
    adaptable_layers,
    adapted_layers,
    add_lora_layers,
    is_target,
    lora_layers,
    lora_state_dict,
    target_problems,
)
from minilora.nn import Embedding, Linear, Module
from minilora.variants import multi_adapter, pissa, trainable_tokens
from minilora.variants.dora import DoRALinear
from minilora.variants.lora_bias import LoRABiasLinear
from minilora.variants.patterns import paths_matching

# The adapter's matrices, whose shapes say the rank (a Linear's, an embedding's)
LORA_MATRICES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def save_adapter(
    model: Module,
    path,
    config: LoRAConfig,
    adapter_name: str | None = None,
    path_initial_model_for_weight_conversion=None,
) -> None:
    """Write the model's LoRA adapter as a PEFT folder: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (``lora_A``/``lora_B``, DoRA's ``lora_magnitude_vector``,
    and biases per ``config.bias``).

    ``config`` must describe the model's LoRA layers (same targets, ``r``, ``lora_alpha``,
    ``use_rslora``, ``use_dora``). A model without LoRA layers, or with merged ones, is
    refused. ``adapter_name``: save that adapter instead of the active one
    (minilora.variants.multi_adapter; PEFT's ``save_pretrained(selected_adapters=[name])``, without
    the name in the keys).

    ``path_initial_model_for_weight_conversion`` (PEFT's name), for a PiSSA adapter: the
    folder this adapter was saved to right after ``apply_lora``, before training. The
    adapter is then written as a plain LoRA adapter of rank 2r for the ORIGINAL base
    weights (:func:`minilora.variants.pissa.pissa_to_lora`), which PEFT and minilora load on the
    base model without any SVD.
    """
    files = adapter_files(model, config, adapter_name, path_initial_model_for_weight_conversion)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_adapter: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    # one commit: the old adapter or the new one, whenever the process dies (module docstring)
    atomic_write([(folder / name, data) for name, data in files.items()])


def adapter_files(
    model: Module,
    config: LoRAConfig,
    adapter_name: str | None = None,
    path_initial_model_for_weight_conversion=None,
) -> dict[str, bytes]:
    """The files :func:`save_adapter` writes, {file name: bytes}, once everything it checks
    holds (a ValueError when not). Cheap for an adapter: a fine-tune calls it before its
    first step to learn that what it trains can be saved."""
    if adapter_name is not None:
        with multi_adapter.using_adapter(model, adapter_name):
            return adapter_files(model, config, None, path_initial_model_for_weight_conversion)
    if not isinstance(model, Module):
        raise TypeError(f"save_adapter: model must be a Module, got {type(model).__name__}")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"save_adapter: config must be a LoRAConfig, got {type(config).__name__}")
    if not adapted_layers(model):
        raise ValueError(
            "save_adapter: the model has no LoRA layers (call apply_lora first); to save a "
            "plain model use save_model"
        )
    problems = _existing_lora_problems(model, config)
    if problems:
        raise ValueError(
            "save_adapter: the config does not describe the model's LoRA layers:\n  "
            + "\n  ".join(problems)
        )
    arrays = lora_state_dict(model, config.bias)
    arrays.update({n: p.data.copy() for n, p in _saved_parameters(model, config).items()})
    adapted = {p for p, _ in adapted_layers(model)}
    peft_config = peft_config_dict(config)
    if hf_gpt2.is_gpt2(model) and config.init_lora_weights == "pissa":
        problems = hf_gpt2.pissa_problems(model)
        if problems:
            raise ValueError(
                "save_adapter: PEFT would load this PiSSA adapter of a GPT-2 as another "
                "function (PiSSA on attn.c_proj, mlp.c_fc and mlp.c_proj saves, and so does "
                "one loaded from PEFT, untrained on c_attn):\n  " + "\n  ".join(problems)
            )
    if path_initial_model_for_weight_conversion is not None:
        arrays, peft_config = _pissa_as_lora(
            model, config, Path(path_initial_model_for_weight_conversion), arrays, peft_config
        )
    if hf_gpt2.is_gpt2(model):  # in GPT2LMHeadModel's names: fused c_attn, Conv1D layers
        arrays, adapted, peft_config = hf_gpt2.adapter_to_gpt2(model, config, peft_config)
    tensors = {peft_key(name, adapted): host_copy(arr) for name, arr in arrays.items()}
    text = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
    # "format": "pt" is what PEFT writes; the config recorded beside the weights lets
    # load_adapter name the fields edited since (a hand edit, or files of two saves)
    record = json.dumps(peft_config, sort_keys=True)
    weights = serialize(tensors, {"format": "pt", SAVED_CONFIG_KEY: record})
    return {ADAPTER_WEIGHTS_NAME: weights, ADAPTER_CONFIG_NAME: text}


def _pissa_as_lora(model, config, initial: Path, arrays: dict, peft_config: dict):
    """The arrays and config of a PiSSA adapter rewritten as a rank-2r LoRA adapter for
    the original base: A' = [A; A0], B' = [B, -B0], lora_alpha doubled (√2 with rsLoRA) so
    the scaling stays; A0, B0 read from the ``initial`` folder. Refuses what it cannot
    convert exactly."""
    where = "save_adapter: path_initial_model_for_weight_conversion"
    if config.init_lora_weights != "pissa" or config.use_dora:
        raise ValueError(
            f"{where} converts a PiSSA adapter (init_lora_weights='pissa', use_dora=False); "
            f"the config has init_lora_weights={config.init_lora_weights!r}, "
            f"use_dora={config.use_dora!r}"
        )
    fields, _ = read_adapter_config(
        initial / ADAPTER_CONFIG_NAME,
        read_file(initial / ADAPTER_CONFIG_NAME, "save_adapter"),
    )
    saved = LoRAConfig(**fields)  # checked by read_adapter_config
    keys = ("r", "lora_alpha", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern")
    problems = [
        f"{key}={getattr(saved, key)!r} in {initial}, expected {getattr(config, key)!r} "
        "(this adapter's)"
        for key in keys
        if getattr(saved, key) != getattr(config, key)
    ]
    tensors, _ = read_safetensors(initial / ADAPTER_WEIGHTS_NAME, "save_adapter")
    adapted = {p for p, _ in lora_layers(model)}
    initial_arrays = {}
    for name, arr in arrays.items():
        if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B"):
            continue
        key = peft_key(name, adapted)
        if key not in tensors or tuple(tensors[key].shape) != tuple(arr.shape):
            got = tuple(tensors[key].shape) if key in tensors else "missing"
            problems.append(f"{key} in {initial}: {got}, expected shape {tuple(arr.shape)}")
        else:
            initial_arrays[name] = tensors[key].astype(arr.dtype)  # host arrays
    if problems:
        raise ValueError(f"{where}={str(initial)!r} does not fit:\n  " + "\n  ".join(problems))
    converted = dict(arrays)
    for path in adapted:
        A, B = f"{path}.lora_A", f"{path}.lora_B"
        converted[A], converted[B] = pissa.pissa_to_lora(
            host_copy(arrays[A]), host_copy(arrays[B]), initial_arrays[A], initial_arrays[B]
        )  # on the host, where the file is written from
    peft_config = {
        **peft_config,
        "r": 2 * config.r,
        "lora_alpha": pissa.converted_alpha(config.lora_alpha, config.use_rslora),
        "rank_pattern": {k: 2 * r for k, r in config.rank_pattern.items()},
        "alpha_pattern": {
            k: pissa.converted_alpha(a, config.use_rslora) for k, a in config.alpha_pattern.items()
        },
        "init_lora_weights": True,
    }
    return converted, peft_config


def load_adapter(model: Module, path, adapter_name: str | None = None) -> LoRAConfig:
    """Load a PEFT adapter folder into ``model`` and return its ``LoRAConfig``; the model
    is left in eval mode, as ``PeftModel.from_pretrained`` leaves it.

    ``adapter_name``: load the folder as a new adapter of that name beside the model's
    adapters, not active (PEFT's ``load_adapter(model_id, adapter_name)``; see
    minilora.variants.multi_adapter); into a model without adapters, as its active adapter.

    A base model gets LoRA layers (as ``apply_lora`` with the folder's config) before the
    arrays are copied in; a model that already has LoRA layers must have exactly the
    config's targets, ``r``, ``lora_alpha`` and ``use_rslora``. Everything is checked
    first; on any problem nothing in the model changes. Arrays are cast to the dtype and
    moved to the device of the parameters they load into (float16 and bfloat16 adapters
    are upcast, with a warning).

    Every key of adapter_config.json is either honoured, known to be harmless, or refused
    when set: an option minilora does not implement is never silently ignored. PEFT's
    ``target_modules`` forms all work (names, suffixes, full paths, a regular expression,
    ``"all-linear"``); a string is resolved against the model into the full paths it
    matches. ``rank_pattern``, ``alpha_pattern``, ``layers_to_transform`` and
    ``layers_pattern`` are honoured as PEFT honours them (:mod:`minilora.variants.patterns`); a
    GPT-2 adapter is converted at one rank, so its patterns must repeat ``r``. The
    init (``init_lora_weights`` true, false, ``"gaussian"``, ``"orthogonal"``) does not
    change what a trained adapter computes; the returned config says ``"gaussian"`` for
    ``"gaussian"`` and ``"kaiming"`` (PEFT's default, true) for the others. A PiSSA adapter
    (``"pissa"``) loads only on a base model, whose adapted weights it replaces by their
    SVD residuals first (as PEFT does); DoRA's ``lora_magnitude_vector`` loads with
    ``use_dora``.
    """
    if not isinstance(model, Module):
        raise TypeError(f"load_adapter: model must be a Module, got {type(model).__name__}")
    if adapter_name is not None:
        with multi_adapter.adding_adapter(model, adapter_name):
            return load_adapter(model, path)
    folder = Path(path)
    config, tensors = _read_config(model, folder)  # 1. the folder as a LoRAConfig and tensors
    expected, problems = _adapter_plan(model, config)  # 2. what the model needs
    _check_tensors(folder, tensors, expected, config, problems)  # 3. every problem, or none
    fused = {}  # PiSSA on a GPT-2: the residuals of the fused c_attn, as PEFT's
    if hf_gpt2.is_gpt2(model) and config.init_lora_weights == "pissa":
        fused = hf_gpt2.fused_pissa_residuals(model, config)
    _apply_adapter(model, config, tensors)  # 4. everything checked: now change the model
    for path, residual in fused.items():
        layer = model.get_submodule(path)
        layer.weight.data, layer.fused_residual = residual, True  # saved as PEFT loads it
    return config


def _read_folder(folder: Path) -> tuple[Path, bytes, dict, dict]:
    """(the config's path, its bytes, the tensors by PEFT key, the weights' metadata) of an
    adapter folder, a save that was killed after its commit point completed first."""
    try:  # os.stat, not Path.exists: a symlink loop or a path under a file is an OSError
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"load_adapter: no adapter folder at {folder}") from None
    if not stat.S_ISDIR(mode):
        raise ValueError(
            f"load_adapter: {folder} is a file; expected a folder holding "
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    finish_interrupted_write(folder, "load_adapter")
    config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    if not os.path.lexists(weights_path):  # a link is checked when it is read
        hint = ""
        if (folder / "adapter_model.bin").exists():
            hint = (
                " (adapter_model.bin is a pickle file, which minilora never loads; convert it "
                "to safetensors with PEFT: model.save_pretrained(folder, "
                "safe_serialization=True))"
            )
        raise FileNotFoundError(f"load_adapter: {weights_path} does not exist{hint}")
    config_bytes = read_file(config_path, "load_adapter", "a JSON file", JSON_LIMIT)
    tensors, metadata = read_safetensors(weights_path, "load_adapter", half_to_float32=True)
    return config_path, config_bytes, tensors, metadata


def _read_config(model: Module, folder: Path) -> tuple[LoRAConfig, dict]:
    """Step 1 of load_adapter: the folder's LoRAConfig, its targets resolved against
    ``model``, and its tensors by PEFT key in minilora's module names (a GPT-2 adapter's
    mapped from GPT-2's)."""
    config_path, config_bytes, tensors, metadata = _read_folder(folder)
    # A PEFT adapter of GPT2LMHeadModel, for a model loaded from GPT-2: mapped into
    # minilora's names (checked first), then loaded as any other
    gpt2 = hf_gpt2.is_gpt2(model) and not any(
        k.startswith(tuple(f"{PEFT_PREFIX}{n}." for n in ("blocks", "tok_emb", "pos_emb")))
        for k in tensors
    )
    fields, selection = read_adapter_config(config_path, config_bytes, conv1d=gpt2)
    if SAVED_CONFIG_KEY in metadata:  # saved by minilora: which fields were edited since?
        edits = edited_fields(metadata[SAVED_CONFIG_KEY], json.loads(config_bytes))
        if edits:  # loaded as the config says, as PEFT loads it; but never silently
            warnings.warn(
                f"load_adapter: {config_path} is not the config saved with its weights; "
                "fields that change what the adapter computes differ (saved -> now): "
                + "; ".join(edits)
                + ". Loading it as it is now (as PEFT does); put the saved values back if "
                "the edit was not meant",
                stacklevel=3,
            )
    if gpt2:
        # the layers, ranks and alphas chosen by hf_gpt2 on GPT-2's paths
        per_layer = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern")
        fields = {k: v for k, v in fields.items() if k not in per_layer}
        fields, arrays, problems = hf_gpt2.adapter_from_gpt2(
            model, fields, selection, tensors, PEFT_PREFIX
        )
        _refuse(folder, problems, "the GPT-2 model")
        adapted = set(fields["target_modules"])
        tensors = {peft_key(name, adapted): arr for name, arr in arrays.items()}
    fields["target_modules"], problems = _resolve_targets(model, fields["target_modules"], tensors)
    if selection["exclude_modules"] is not None and not gpt2 and not problems:
        fields["target_modules"], problems = _exclude(model, fields, selection["exclude_modules"])
    _refuse(folder, problems)
    try:
        return LoRAConfig(**fields), tensors
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {config_path}: {e}") from None


def _refuse(folder: Path, problems: list[str], what: str = "the model") -> None:
    """A ValueError naming ``folder`` and every problem, when there are any."""
    if problems:
        raise ValueError(
            f"load_adapter: {folder} does not fit {what}; nothing was changed:\n  "
            + "\n  ".join(problems)
        )


def _apply_adapter(model: Module, config: LoRAConfig, tensors: dict) -> None:
    """Step 4 of load_adapter, once every tensor is checked: LoRA layers for a base model
    (as apply_lora with ``config``), each array cast and moved into its parameter, eval mode."""
    if not adapted_layers(model):
        add_lora_layers(model, [p for p, _ in _adapter_paths(model, config)], config)
    params = dict(model.named_parameters())
    for key, arr in tensors.items():
        p = params[param_name(key)]  # every key was checked: a KeyError is a bug
        p.data = backend.array(arr, dtype=p.dtype, device=p.device).copy()  # cast, move
    model.eval()


def _has_patterns(config: LoRAConfig) -> bool:
    """True when some layer may get its own rank or alpha, or only some layers adapt."""
    return bool(config.rank_pattern or config.alpha_pattern) or config.layers_to_transform not in (
        None,
        [],
    )


def _resolve_targets(model: Module, targets, tensors: dict) -> tuple[list[str], list[str]]:
    """PEFT's ``target_modules`` as a list minilora matches with :func:`is_target`, and the
    problems found. A list is kept (names, suffixes and full paths match as in PEFT). A
    string is PEFT's regular expression, matched in full against module paths, and becomes
    the list of the paths it matches; ``"all-linear"`` is every Linear layer, the output
    layer ``lm_head`` only when the file adapts it (PEFT leaves out a transformers model's
    output layer, not a plain module's). A string without regex syntax stays a name, as
    minilora always read it (in PEFT it matches only a top-level module of that name)."""
    if not isinstance(targets, str) or re.escape(targets) == targets:
        return targets, []
    paths = [p for p, m in model.named_modules() if isinstance(m, Linear) and p]
    embeddings = [p for p, m in model.named_modules() if isinstance(m, Embedding) and p]
    if targets.lower() == "all-linear":
        adapts_head = any(key.startswith(f"{PEFT_PREFIX}lm_head.lora_") for key in tensors)
        return [p for p in paths if p != "lm_head" or adapts_head], []
    chosen, problems = paths_matching(targets, paths + embeddings)
    if problems:
        return [], problems
    if not chosen:
        return [], [
            f"target_modules={targets!r} (a regular expression over module paths) matches no "
            f"Linear layer in the model; the paths are {paths}"
        ]
    return chosen, []


def _exclude(model: Module, fields: dict, exclude) -> tuple[list[str], list[str]]:
    """PEFT's ``exclude_modules``: the full paths of the layers ``fields`` targets, less
    those ``exclude`` names (a regular expression matched in full, or a list of names,
    suffixes and paths as targets are matched), and the problems found."""
    config = LoRAConfig(**fields)
    chosen = [p for p, _ in adaptable_layers(model) if config.adapts(p)]
    if isinstance(exclude, str):
        excluded, problems = paths_matching(exclude, chosen)
    else:
        excluded, problems = [p for p in chosen if is_target(exclude, p)], []
    kept = [p for p in chosen if p not in excluded]
    if not kept and not problems:
        problems = [f"exclude_modules={exclude!r} leaves none of {chosen} to adapt"]
    return kept, [p.replace("target_modules", "exclude_modules") for p in problems]


def _adapter_paths(model: Module, config: LoRAConfig) -> list:
    """(path, layer) of the layers the adapter is on: the model's LoRA layers when it has
    some, else the Linear and Embedding layers that ``config`` adapts."""
    if adapted_layers(model):
        return adapted_layers(model)
    return [(p, m) for p, m in adaptable_layers(model) if config.adapts(p)]


def _adapter_plan(model: Module, config: LoRAConfig) -> tuple[dict, list[str]]:
    """Step 2 of load_adapter: what the adapter must hold for this model, {parameter path:
    shape}, and the problems that stop it from fitting at all (targets that match nothing,
    layers that layers_to_transform leaves out, existing LoRA layers that disagree with the
    config, a PiSSA adapter for a model that has LoRA layers already)."""
    problems = []
    if adapted_layers(model):
        problems += _existing_lora_problems(model, config)
    else:
        linears = adaptable_layers(model)
        unmatched = [
            t for t in config.target_modules if not any(is_target([t], p) for p, _ in linears)
        ]
        if unmatched:
            available = sorted({p.rsplit(".", 1)[-1] for p, _ in linears})
            problems.append(
                f"target_modules {unmatched} match no Linear or Embedding layer in the model; "
                f"available names: {available}"
            )
        elif not any(config.adapts(p) for p, _ in linears):
            problems.append(
                f"layers_to_transform={config.layers_to_transform!r} (layers_pattern="
                f"{config.layers_pattern!r}) leaves none of {config.target_modules} to adapt"
            )
    # r may exceed min(out, in): PEFT builds such layers (the extra rank is redundant)
    chosen = _adapter_paths(model, config)
    problems += target_problems(model, [p for p, _ in chosen], config)
    if config.init_lora_weights == "pissa" and adapted_layers(model):
        problems.append(
            "init_lora_weights='pissa': a PiSSA adapter loads only on a base model (its "
            "weights become the SVD residuals); the model already has LoRA layers"
        )
    expected = {}
    for p, m in chosen:
        r = config.for_module(p).r
        if isinstance(m, Embedding):  # PEFT's layout: A (r, V), B (C, r)
            V, C = m.weight.shape
            expected[f"{p}.lora_embedding_A"] = (r, V)
            expected[f"{p}.lora_embedding_B"] = (C, r)
            continue
        out_f, in_f = m.weight.shape
        expected[f"{p}.lora_A"] = (r, in_f)
        expected[f"{p}.lora_B"] = (out_f, r)
        if config.use_dora:
            expected[f"{p}.lora_magnitude_vector"] = (out_f,)
        if config.lora_bias:
            expected[f"{p}.lora_B_bias"] = (out_f,)
    expected.update({n: p.shape for n, p in _saved_parameters(model, config).items()})
    expected.update(trainable_tokens.expected_arrays(model, config))  # (n, C) each
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                expected[name] = param.shape
    elif config.bias == "lora_only":
        for p, m in chosen:
            if getattr(m, "bias", None) is not None:
                expected[f"{p}.bias"] = m.bias.shape
    return expected, problems


def _saved_parameters(model: Module, config: LoRAConfig) -> dict:
    """{parameter path: Parameter} of the modules ``config.modules_to_save`` names (PEFT
    saves them whole: ``base_model.model.<path>.weight``)."""
    out = {}
    for path, module in model.named_modules():
        if path and is_target(config.modules_to_save or [], path):
            for leaf in ("weight", "bias"):
                if vars(module).get(leaf) is not None:
                    out[f"{path}.{leaf}"] = vars(module)[leaf]
    return out


def _existing_lora_problems(model: Module, config: LoRAConfig) -> list[str]:
    """Ways in which the model's LoRA layers differ from what ``config`` describes."""
    problems = []
    layers = adapted_layers(model)
    targets = config.target_modules
    for path, layer in layers:
        if not config.adapts(path):
            problems.append(
                f"the model has a LoRA layer {path}, not in target_modules (or outside "
                "layers_to_transform)"
            )
        own = config.for_module(path)
        has = {a: getattr(layer, a) for a in ("r", "lora_alpha", "use_rslora")}
        has["use_dora"] = isinstance(layer, DoRALinear)
        has["lora_bias"] = isinstance(layer, LoRABiasLinear)
        for attr, value in has.items():
            if value != getattr(own, attr):
                problems.append(
                    f"config says {attr}={getattr(own, attr)!r} but the LoRA layer {path} "
                    f"has {attr}={value!r}"
                )
        if layer.merged:
            problems.append(f"the LoRA layer {path} is merged; call unmerge_lora(model) first")
    problems += trainable_tokens.existing_problems(model, config)
    plain = [p for p, _ in adaptable_layers(model) if config.adapts(p)]
    if plain:
        problems.append(f"target_modules names layers that have no LoRA in the model: {plain}")
    paths = [p for p, m in model.named_modules() if isinstance(m, (Linear, Embedding)) and p]
    missing = sorted(t for t in targets if not any(is_target([t], p) for p in paths))
    if missing:
        problems.append(f"target_modules {missing} match no layer in the model")
    return problems


def param_name(key: str) -> str | None:
    """The model's parameter path for a PEFT key, or None when the key is not PEFT's:
    ``base_model.model.<path>.lora_A.weight`` -> ``<path>.lora_A``,
    ``base_model.model.<path>.lora_B.bias`` -> ``<path>.lora_B_bias`` (``lora_bias``),
    ``base_model.model.<path>.base_layer.bias`` -> ``<path>.bias`` (PEFT's spelling of an
    adapted layer's own bias) and ``base_model.model.<path>.bias`` -> ``<path>.bias``."""
    if not key.startswith(PEFT_PREFIX):
        return None
    name = key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
    owner, _, leaf = name.rpartition(".")
    if owner.endswith((".lora_A", ".lora_B")) and leaf == "weight":
        return owner
    if owner.endswith(".lora_B") and leaf == "bias":  # lora_bias: PEFT's lora_B is a Linear
        return f"{owner}_bias"
    if leaf in ("lora_A", "lora_B", "lora_B_bias"):
        return None  # a bare .lora_A without .weight is not PEFT's spelling
    return name


def peft_key(name: str, adapted=frozenset()) -> str:
    """The inverse of :func:`param_name`; ``adapted``: the paths of the LoRA layers, whose
    own bias PEFT keeps under ``base_layer`` (as its wrapper holds the original Linear)."""
    owner, _, leaf = name.rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        return f"{PEFT_PREFIX}{name}.weight"
    if leaf == "lora_B_bias":
        return f"{PEFT_PREFIX}{owner}.lora_B.bias"
    if leaf in ("lora_embedding_A", "lora_embedding_B"):  # PEFT: Parameters, no .weight
        return PEFT_PREFIX + name
    if owner in adapted and leaf != "lora_magnitude_vector":  # PEFT keeps m beside lora_A
        return f"{PEFT_PREFIX}{owner}.base_layer.{leaf}"
    return PEFT_PREFIX + name


def _check_tensors(
    folder: Path, tensors: dict, expected: dict, config: LoRAConfig, problems: list[str]
) -> None:
    """Step 3 of load_adapter: the file's tensors (PEFT keys) against the expected
    {parameter path: shape}; a ValueError naming these problems and the plan's
    (``problems``), when there are any."""
    problems = list(problems)
    for key in sorted(tensors):
        name = param_name(key)
        if name not in expected:
            problems.append(f"unexpected key {key!r}")
            continue
        got, want = tuple(tensors[key].shape), tuple(expected[name])
        if got == want:
            continue
        owner, _, leaf = name.rpartition(".")
        r = config.for_module(owner).r
        says = f"config says r={r}" + (" (rank_pattern)" if r != config.r else "")
        if leaf.endswith("A") and leaf in LORA_MATRICES and len(got) == 2 and got[1] == want[1]:
            problems.append(f"{says} but {leaf} for {owner} has shape {got}")
        elif leaf.endswith("B") and leaf in LORA_MATRICES and len(got) == 2 and got[0] == want[0]:
            problems.append(f"{says} but {leaf} for {owner} has shape {got}")
        else:
            what = f"{leaf} for {owner}" if leaf in LORA_MATRICES else name
            problems.append(f"{what} has shape {got}, expected {want}")
    present = [param_name(key) for key in tensors]
    for name in sorted({n for n in present if present.count(n) > 1} - {None}):
        problems.append(f"{name} is given twice (with and without .base_layer)")
    adapted = {n.rpartition(".")[0] for n in expected if n.endswith(("lora_A", "lora_embedding_A"))}
    for name in sorted(set(expected) - set(present)):
        problems.append(f"missing key {peft_key(name, adapted)!r}")
    _refuse(folder, problems)
