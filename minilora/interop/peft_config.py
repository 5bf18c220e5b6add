"""adapter_config.json, PEFT's LoRA config file, read into and written from ``LoRAConfig``.

Every key of a file is honoured, known to be harmless, or refused when set, so an option
minilora does not implement never loads silently wrong; also the PEFT folder's file names
and key prefix, shared by every adapter file. The format: docs/porting.md, "Names across
libraries" (file names), and docs/architecture.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from minilora.lora import LoRAConfig
from minilora.variants.patterns import is_layer_selection, is_name_selection

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper path; the adapter name is not in saved keys

# adapter_config.json keys that minilora reads and honours (or refuses, per value).
_PEFT_READ = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "bias",
        "use_rslora",
        "init_lora_weights",
        "use_dora",
        "lora_bias",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "modules_to_save",
        "trainable_token_indices",
    }
)
# Keys known not to change what a trained adapter computes, whatever their value:
# bookkeeping, and settings used only when an adapter is created (the init is checked
# through init_lora_weights) or only together with an option that is refused when set.
PEFT_BOOKKEEPING = frozenset(  # every PEFT method's config: where it came from, for what
    {
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "peft_version",
        "auto_mapping",
    }
)
_PEFT_HARMLESS = PEFT_BOOKKEEPING | frozenset(
    {
        "eva_config",
        "loftq_config",
        "corda_config",  # init only (init_lora_weights "eva", ...)
        "megatron_core",  # used only with megatron_config
        "qalora_group_size",  # used only with use_qalora
    }
)
# Every other key (target_parameters, alora_invocation_tokens, ...) is refused unless its
# value is null, false or empty: an option minilora does not implement would otherwise load
# silently wrong.
_UNSET = (None, False, "", [], {})
# PEFT inits that leave the base weights as they were: a trained adapter's A and B replace
# whatever they drew, so they all load the same (EVA draws A from activations, MiCA B from
# the weight's smallest singular vectors; neither touches the weight). PiSSA, OLoRA, LoftQ,
# CorDA and the like rewrite the base weights when the adapter is created; of them minilora
# does PiSSA (on a base model it redoes the SVD, as PEFT does), and refuses the others.
_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica", "pissa")


def peft_config_dict(config: LoRAConfig) -> dict:
    """adapter_config.json as PEFT writes it (PEFT spells the kaiming init ``true``)."""
    init = True if config.init_lora_weights == "kaiming" else config.init_lora_weights
    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(config.target_modules),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "init_lora_weights": init,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "fan_in_fan_out": False,
        "task_type": None,
        "base_model_name_or_path": None,
        "modules_to_save": config.modules_to_save,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "trainable_token_indices": config.trainable_token_indices,
    }


def read_adapter_config(path: Path, data: bytes, conv1d: bool = False) -> tuple[dict, dict]:
    """Parse and check adapter_config.json: (the LoRAConfig fields, with target_modules as
    written, and the selection as written: {layers_to_transform, layers_pattern,
    exclude_modules, rank_pattern, alpha_pattern}), or a ValueError naming the file and
    every problem. Each key is honoured, known to be harmless, or refused when set.
    ``conv1d``: the adapter is GPT-2's, whose Conv1D layers PEFT adapts with
    ``fan_in_fan_out`` true whatever the file says (hf_gpt2 maps them)."""
    raw = json_object(path, data, "load_adapter")

    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type={raw.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if raw.get(key) is None:
            problems.append(f"{key} is missing")
    alpha = raw.get("lora_alpha")
    if alpha is not None and not _positive_number(alpha):
        problems.append(f"lora_alpha={alpha!r} must be a positive finite number")
    r = raw.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        problems.append(f"r={r!r} must be a positive integer")
    targets = raw.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str)
        or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        problems.append(f"target_modules={targets!r} must be a module name or a list of them")
    read = _PEFT_READ | ({"fan_in_fan_out"} if conv1d else set())
    if conv1d and not isinstance(raw.get("fan_in_fan_out", True), bool):
        problems.append(f"fan_in_fan_out={raw['fan_in_fan_out']!r} must be true or false")
    for key, value in sorted(raw.items()):
        if key not in read | _PEFT_HARMLESS and not unset(value):
            problems.append(
                f"{key}={value!r} is not supported by minilora (a PEFT option it does not "
                "implement would make the adapter compute something else); it must be "
                "null, false or empty"
            )
    problems += _selection_problems(raw)
    saved, exclude = raw.get("modules_to_save"), raw.get("exclude_modules")
    layers, layers_pattern = raw.get("layers_to_transform"), raw.get("layers_pattern")
    init = raw.get("init_lora_weights", True)  # PEFT's default is true (kaiming)
    if not any(init == i and type(init) is type(i) for i in _INITS):
        problems.append(
            f"init_lora_weights={init!r} is not supported by minilora: it loads adapters whose "
            "init left the base weights as they were (true, false, 'gaussian', 'orthogonal', "
            "'eva', 'mica') and PiSSA ('pissa', with the exact SVD); OLoRA, LoftQ, CorDA and "
            "the fast SVD ('pissa_niter_N', randomised: PEFT's own loads of such an adapter "
            "differ with torch's seed) change the base weights otherwise"
        )
    for key in ("use_rslora", "use_dora", "lora_bias"):
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            problems.append(f"{key}={raw[key]!r} must be true or false")
    if problems:
        raise ValueError(
            f"load_adapter: {path} is not a usable LoRA config:\n  " + "\n  ".join(problems)
        )

    fields = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "init_lora_weights": init if init in ("gaussian", "pissa") else "kaiming",
    }
    keys = ("lora_dropout", "bias", "use_rslora", "use_dora", "lora_bias")
    for key in (*keys, "rank_pattern", "alpha_pattern"):
        if raw.get(key) is not None:
            fields[key] = raw[key]
    if not unset(saved):
        fields["modules_to_save"] = saved
    if not unset(raw.get("trainable_token_indices")):  # checked by LoRAConfig below
        fields["trainable_token_indices"] = raw["trainable_token_indices"]
    if not unset(layers) and not isinstance(targets, str):  # PEFT ignores it for a regex
        fields["layers_to_transform"] = layers
        fields["layers_pattern"] = None if unset(layers_pattern) else layers_pattern
    try:
        LoRAConfig(**fields)  # the remaining checks (bias, dropout); the targets come later
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {path}: {e}") from None
    selection = {
        "layers_to_transform": None if unset(layers) else layers,
        "layers_pattern": layers_pattern,
        "exclude_modules": None if unset(exclude) else exclude,
        "rank_pattern": raw.get("rank_pattern") or {},
        "alpha_pattern": raw.get("alpha_pattern") or {},
    }
    return fields, selection


def _selection_problems(raw: dict) -> list[str]:
    """What is wrong with the keys of ``raw`` (an adapter_config.json) that choose modules
    and their settings: the patterns, ``modules_to_save``, ``exclude_modules``,
    ``layers_to_transform`` and ``layers_pattern``."""
    problems = []
    for key, name in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        pattern = raw.get(key)
        if not unset(pattern) and not isinstance(pattern, dict):
            problems.append(f"{key}={pattern!r} must be a dict from module patterns to {name}")
    saved = raw.get("modules_to_save")
    if not unset(saved) and not (
        isinstance(saved, list) and all(isinstance(t, str) for t in saved)
    ):
        problems.append(f"modules_to_save={saved!r} must be a list of module names")
    exclude = raw.get("exclude_modules")
    if not unset(exclude) and not is_name_selection(exclude):
        problems.append(f"exclude_modules={exclude!r} must be a name, a list of names or a regex")
    layers = raw.get("layers_to_transform")
    if not unset(layers) and not is_layer_selection(layers):
        problems.append(f"layers_to_transform={layers!r} must be a layer index or a list of them")
    layers_pattern = raw.get("layers_pattern")
    if not unset(layers_pattern) and not is_name_selection(layers_pattern):
        problems.append(f"layers_pattern={layers_pattern!r} must be a name or a list of names")
    return problems


# The weights' safetensors __metadata__ key that records the adapter_config.json written
# with them (PEFT and transformers ignore it): load_adapter names the fields edited since.
SAVED_CONFIG_KEY = "minilora.adapter_config"


def edited_fields(saved_text: str, current: dict) -> list[str]:
    """The fields of ``current`` (an adapter_config.json, parsed) that differ from
    ``saved_text`` (the config recorded beside the weights) and may change what the adapter
    computes, as ``"name: saved -> now"``. Bookkeeping and init-only keys
    (``base_model_name_or_path``, ``revision``, ``task_type``, ...) are edited freely."""
    try:
        saved = json.loads(saved_text)
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        return [f"{SAVED_CONFIG_KEY} (the record itself is not a JSON object)"]
    missing = object()
    edits = []
    for key in sorted((saved.keys() | current.keys()) - _PEFT_HARMLESS):
        before, now = saved.get(key, missing), current.get(key, missing)
        if before != now or type(before) is not type(now):
            edits.append(
                f"{key}: {'(absent)' if before is missing else json.dumps(before)} -> "
                f"{'(absent)' if now is missing else json.dumps(now)}"
            )
    return edits


def json_object(path: Path, data, caller: str) -> dict:
    """``data`` (the bytes or text of ``path``) parsed as a JSON object, or a ValueError
    naming ``caller``, the file and what is wrong with it."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{caller}: {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{caller}: {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def unset(value) -> bool:
    return any(value == u and type(value) is type(u) for u in _UNSET)


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
