"""Checkpoints: whole models and PEFT-compatible adapters, in safetensors and JSON only.

Two kinds of file, both plain data (nothing is ever loaded with pickle):

* ``save_model`` / ``load_model``: one ``.safetensors`` file holding every parameter of a
  :class:`~minilora.model.GPT` under its module path (``blocks.0.attn.q_proj.weight``), and
  in the header's ``__metadata__`` the format name, its version and the ``GPTConfig``.
* ``save_adapter`` / ``load_adapter``: a folder in Hugging Face PEFT's layout, so an adapter
  trained here loads in PEFT and back (for a model with the same module names)::

      adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, ...}
      adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   (r, in)
                                   base_model.model.<module path>.lora_B.weight   (out, r)
                                   base_model.model.<module path>.bias            (per ``bias``;
                                   <path>.base_layer.bias for an adapted layer, as PEFT)

* ``load_model`` also reads a Hugging Face GPT-2 folder (``config.json`` and
  ``model.safetensors``); adapters of such a model are saved and loaded in GPT-2's module
  names, as PEFT's on ``GPT2LMHeadModel`` (the mapping: minilora/interop/hf_gpt2.py).

Three promises, each tested in tests/test_checkpoint.py:

* **Refuse, don't guess.** A truncated or corrupt file, a header that is not JSON, a dtype
  minilora does not use, NaN or infinite weights, missing or unexpected keys, wrong shapes,
  a config that disagrees with the tensors, or an adapter_config.json option minilora does
  not implement (``use_dora``, ``alora_invocation_tokens``, ...: every key is honoured,
  known harmless, or refused when set) raise ``ValueError`` naming the file and *every*
  problem found. A missing file or folder raises ``FileNotFoundError``; a device or a pipe
  is refused before it is read.
* **A failed load leaves the model untouched.** ``load_adapter`` checks every key and
  shape against the model first, and only then adds LoRA layers and copies arrays in.
* **A failed save leaves the old file intact.** Every file is written to a temporary name
  in the same folder, flushed and fsync'ed, then moved over the destination with
  ``os.replace`` (atomic on POSIX and Windows); on any error the temporary file is removed,
  and one a killed process left is removed by the next save. An adapter's weights record
  the SHA-256 of its config, so a save killed between its two replacements is refused on
  load instead of loading new weights with the old config.

Saves are byte-for-byte reproducible: the same model gives the same bytes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path

import safetensors
import safetensors.numpy

from minilora import backend
from minilora.interop import hf_gpt2
from minilora.lora import (
    LORA_LEAVES,
    LoRAConfig,
    adaptable_layers,
    adapted_layers,
    add_lora_layers,
    embedding_variant_problems,
    is_target,
    lora_layers,
    tied_embeddings,
    vera_paths,
)
from minilora.lora import lora_state_dict as _lora_state_dict
from minilora.model import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from minilora.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList
from minilora.variants import multi_adapter, pissa

MODEL_FORMAT = "minilora.model"
MODEL_FORMAT_VERSION = "1"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper path; the adapter name is not in saved keys

# The dtypes minilora computes in; anything else in a model file is refused, not
# converted. Adapters may also be bfloat16 (NumPy has none): upcast to float32, with a warning.
_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64"}
_HALF_DTYPES = {"BF16": "bfloat16", "F16": "float16"}

# Written into the weights' __metadata__ by save_adapter: the SHA-256 of the
# adapter_config.json saved with them, so that a save killed between its two file
# replacements (new weights beside the old config) is refused on load, not loaded as a
# different model. PEFT and transformers ignore metadata they do not know.
CONFIG_DIGEST_KEY = "minilora.adapter_config_sha256"

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
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
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
# Every other key (lora_bias, exclude_modules, target_parameters,
# alora_invocation_tokens, modules_to_save, ...) is refused unless its value is null, false
# or empty: an option minilora does not implement would otherwise load silently wrong.
_UNSET = (None, False, "", [], {})
# PEFT inits that leave the base weights as they were: a trained adapter's A and B replace
# whatever they drew, so they all load the same. PiSSA, OLoRA, LoftQ, CorDA and the like
# rewrite the base weights when the adapter is created; of them minilora does PiSSA (on a
# base model it redoes the SVD, as PEFT does), and refuses the others.
_INITS = (True, False, "gaussian", "orthogonal", "pissa")


# ======================================================================================
# Whole models
# ======================================================================================


def save_model(model: GPT, path) -> None:
    """Write every parameter of ``model`` and its ``GPTConfig`` to one ``.safetensors`` file.

    A model with LoRA layers is refused: fold the adapter in with ``merge_and_unload``
    first, or save only the adapter with :func:`save_adapter`. So is one with any other
    layer a plain GPT lacks (adapter layers, a prefix): load_model could not rebuild it;
    the error names what saves those instead.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_model: model must be a GPT, got {type(model).__name__}")
    layers = [p for p, _ in adapted_layers(model)]
    layers += vera_paths(model)
    if layers:
        raise ValueError(
            f"save_model: the model has LoRA layers ({', '.join(layers)}); save_model writes "
            "plain models only. Call minilora.merge_and_unload(model) first to save the "
            "adapted model with the adapter folded into its weights, or "
            "save_adapter(model, folder, config) to save only the adapter"
        )
    _refuse_extra_layers(model)
    path = _check_destination(Path(path), "save_model")
    tensors = {name: _host_copy(p.data) for name, p in model.named_parameters()}
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    atomic_write([(path, serialize(tensors, metadata))])


# The layers of a plain GPT, the only model load_model can rebuild from its config.
_PLAIN_LAYERS = (GPT, ModuleList, Block, CausalSelfAttention, MLP, Linear, Embedding, LayerNorm)
_PLAIN_LAYERS += (Dropout,)
# What to save instead, for the layers minilora's relatives add (by class name: those
# modules build on this one, so it cannot import them).
_SAVE_INSTEAD = {
    "AdapterLinear": "save the adapters alone with "
    "minilora.relatives.adapters.save_adapters(model, "
    "path, config) and load them onto the base with load_adapters",
    "PrefixEncoder": "save the prefix alone with "
    "minilora.relatives.prefix.save_prefix(model, path) "
    "and load it onto the base with load_prefix",
}


def _refuse_extra_layers(model: GPT) -> None:
    """A ValueError naming every layer of ``model`` that a plain GPT does not have (adapter
    layers, a prefix, quantized or factored layers): load_model would refuse the file."""
    extra = {}  # class name -> paths
    for path, module in model.named_modules():
        if path and type(module) not in _PLAIN_LAYERS:  # the root: a GPT (or a relative's)
            extra.setdefault(type(module).__name__, []).append(path)
    if not extra:
        return
    found = "; ".join(f"{kind} at {', '.join(paths)}" for kind, paths in sorted(extra.items()))
    advice = [_SAVE_INSTEAD.get(kind) for kind in sorted(extra)]
    advice = (
        "; ".join(a for a in advice if a)
        or "minilora has no file for them: save the base model before converting it"
    )
    raise ValueError(
        f"save_model: the model has layers a plain GPT does not ({found}); save_model writes "
        f"plain models only, which load_model rebuilds from their config: {advice}"
    )


def load_model(path, device: str = "cpu") -> GPT:
    """Read a file written by :func:`save_model`, or a Hugging Face GPT-2 folder
    (``config.json`` and ``model.safetensors``, as ``save_pretrained`` writes them): a new
    ``GPT`` on ``device``, in the file's dtype, in eval mode, with every parameter loaded
    (strict: no missing or unexpected keys).

    A GPT-2 is mapped into minilora's names (minilora/interop/hf_gpt2.py); its head stays tied to
    the token embedding, and its adapters are saved and loaded in GPT-2's names, so
    that PEFT loads them on ``GPT2LMHeadModel``.

    The stored ``GPTConfig`` is checked against the tensors wherever the shapes tell
    (``vocab_size``, ``block_size``, ``n_embd``, ``n_layer``, ``bias``); ``n_head`` (any
    divisor of ``n_embd`` gives the same shapes) and ``dropout`` (no tensor at all) cannot
    be checked, and are trusted as written.
    """
    device = backend.check_device(device)
    path = Path(path)
    if path.is_dir() and (path / hf_gpt2.CONFIG_NAME).exists():
        return _load_gpt2(path, device)
    if path.is_dir():
        hint = (
            "; it looks like an adapter folder: use load_adapter(model, folder)"
            if (path / ADAPTER_CONFIG_NAME).exists()
            else ""
        )
        raise ValueError(
            f"load_model: {path} is a folder, expected a .safetensors file or a Hugging Face "
            f"GPT-2 folder (with {hf_gpt2.CONFIG_NAME}){hint}"
        )
    # The header first: the config is checked against its shapes, and the model built,
    # before any tensor is read (loading then holds the model and the tensors, no more).
    entries, metadata, data_start = _read_header(path, "load_model")
    shapes = {name: tuple(entry["shape"]) for name, entry in entries}

    fmt = metadata.get("format")
    if fmt != MODEL_FORMAT:
        hint = ""
        if any(k.startswith(PEFT_PREFIX) for k in shapes):
            hint = " (its keys look like a PEFT adapter: use load_adapter)"
        raise ValueError(
            f"load_model: {path} is not a minilora model file: metadata format={fmt!r}, "
            f"expected {MODEL_FORMAT!r}{hint}"
        )
    version = metadata.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise ValueError(
            f"load_model: {path} has format_version={version!r}; this minilora reads "
            f"version {MODEL_FORMAT_VERSION!r}"
        )
    config = _model_config(path, metadata.get("config"), shapes)
    model = _new_model(path, config, [entry["dtype"] for _, entry in entries], device)
    return _load_into(model, path, _read_tensors(path, "load_model", entries, data_start))


def _load_gpt2(folder: Path, device: str) -> GPT:
    """A Hugging Face GPT-2 folder as a minilora GPT; every tensor is checked against
    config.json before the model is built."""
    config_path, weights_path = folder / hf_gpt2.CONFIG_NAME, folder / hf_gpt2.WEIGHTS_NAME
    text = _read_file(config_path, "load_model")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"load_model: {config_path} is not valid JSON: {e}") from None
    config = hf_gpt2.gpt_config(raw, config_path)
    if not weights_path.exists():
        raise FileNotFoundError(
            f"load_model: {weights_path} does not exist (minilora reads one safetensors file: "
            "not pytorch_model.bin, a pickle it never loads, nor sharded weights; save with "
            "save_pretrained(folder, safe_serialization=True))"
        )
    # The shapes from the header: when they fit, the model is built before any tensor is
    # read (loading then holds the model and the tensors, no more); when they do not,
    # state_dict_from_gpt2 refuses the file, naming every problem, before a model is built.
    entries, _, data_start = _read_header(weights_path, "load_model")
    shapes = {name: tuple(entry["shape"]) for name, entry in entries}
    params, problems = hf_gpt2.gpt2_shape_problems(shapes, config)
    if not problems:
        dtypes = [entry["dtype"] for name, entry in entries if name in params]
        model = _new_model(weights_path, config, dtypes, device)
    tensors = _read_tensors(weights_path, "load_model", entries, data_start)
    state = hf_gpt2.state_dict_from_gpt2(tensors, config, weights_path)
    del tensors  # the state's views keep what they need, and free it as they are loaded
    return _load_into(model, weights_path, state)


def _new_model(path: Path, config: GPTConfig, dtypes: list[str], device: str) -> GPT:
    """A new GPT in the one dtype of the file's parameters (safetensors names, "F32")."""
    dtypes = sorted({_SAFETENSORS_DTYPES[d] for d in dtypes})
    if len(dtypes) > 1:
        raise ValueError(f"load_model: {path} mixes dtypes {dtypes}; expected one dtype")
    dtype = backend.resolve_dtype(dtypes[0]) if dtypes else backend.DEFAULT_DTYPE
    return GPT(config, dtype=dtype, device=device)


def _load_into(model: GPT, path: Path, tensors: dict) -> GPT:
    """``model`` loaded with ``tensors`` (strict), in eval mode.

    ``tensors`` is emptied: each array is dropped once it is loaded, smallest first, so
    that loading holds the model and the file's tensors, never a third copy of them."""
    problems = model.state_dict_problems(tensors)  # all checked before any is loaded
    if problems:
        raise ValueError(
            f"load_model: {path} does not match its own config: load_state_dict refused the "
            "state dict:\n  " + "\n  ".join(problems)
        )
    for name in sorted(tensors, key=lambda name: tensors[name].nbytes):
        model.load_state_dict({name: tensors.pop(name)}, strict=False)  # replaces the init
    return model.eval()  # as PyTorch's from_pretrained: inference unless told otherwise


def _model_config(path: Path, text, shapes: dict) -> GPTConfig:
    """The GPTConfig stored in the metadata, checked against the tensors before any model
    is built (a corrupt n_embd=10**6 must fail here, not in a huge allocation)."""
    if not isinstance(text, str):
        raise ValueError(f"load_model: {path} has no 'config' in its metadata")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(
            f"load_model: {path}: the 'config' metadata is not valid JSON: {e}"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"load_model: {path}: the 'config' metadata must be a JSON object")
    try:
        config = GPTConfig(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_model: {path}: invalid config {raw}: {e}") from None

    problems = []
    C = config.n_embd
    for name, want in (
        ("tok_emb.weight", (config.vocab_size, C)),
        ("pos_emb.weight", (config.block_size, C)),
    ):
        got = shapes.get(name)
        if got != want:
            problems.append(f"config implies {name} of shape {want}, the file has {got}")
    blocks = {k.split(".")[1] for k in shapes if k.startswith("blocks.") and k.count(".") > 1}
    want_blocks = {str(i) for i in range(config.n_layer)}
    if blocks != want_blocks:
        problems.append(
            f"config says n_layer={config.n_layer} but the file has blocks {sorted(blocks)}"
        )
    if problems:
        raise ValueError(
            f"load_model: {path}: the config disagrees with the tensors:\n  "
            + "\n  ".join(problems)
        )
    return config


# ======================================================================================
# Adapters (PEFT layout)
# ======================================================================================


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
    if adapter_name is not None:
        with multi_adapter.using_adapter(model, adapter_name):
            return save_adapter(model, path, config, None, path_initial_model_for_weight_conversion)
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
    arrays = _lora_state_dict(model, config.bias)
    adapted = {p for p, _ in adapted_layers(model)}
    peft_config = _peft_config_dict(config)
    if hf_gpt2.is_gpt2(model) and (config.use_dora or config.init_lora_weights == "pissa"):
        raise ValueError(
            "save_adapter: DoRA and PiSSA adapters of a GPT-2 model are not supported yet"
        )
    if path_initial_model_for_weight_conversion is not None:
        arrays, peft_config = _pissa_as_lora(
            model, config, Path(path_initial_model_for_weight_conversion), arrays, peft_config
        )
    if hf_gpt2.is_gpt2(model):  # in GPT2LMHeadModel's names: fused c_attn, Conv1D layers
        if len(adapted) != len(lora_layers(model)) or _has_patterns(config):
            raise ValueError(
                "save_adapter: a GPT-2 model's adapter is saved in GPT2LMHeadModel's names, "
                "for LoRA layers of one rank on c_attn, c_proj and c_fc; this one has an "
                "embedding adapter, rank_pattern, alpha_pattern or layers_to_transform"
            )
        arrays, adapted, peft_config = hf_gpt2.adapter_to_gpt2(model, config, peft_config)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_adapter: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)

    tensors = {_peft_key(name, adapted): _host_copy(arr) for name, arr in arrays.items()}
    text = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
    # "format": "pt" is what PEFT writes, for transformers; the digest binds the two files
    digest = hashlib.sha256(text).hexdigest()
    weights = serialize(tensors, {"format": "pt", CONFIG_DIGEST_KEY: digest})
    # Both files are written in full before either replaces its predecessor; a crash
    # between the two replacements leaves files whose digest disagrees, refused on load.
    atomic_write([(folder / ADAPTER_WEIGHTS_NAME, weights), (folder / ADAPTER_CONFIG_NAME, text)])


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
    fields, _ = _read_adapter_config(
        initial / ADAPTER_CONFIG_NAME, _read_file(initial / ADAPTER_CONFIG_NAME, "save_adapter")
    )
    saved = LoRAConfig(**fields)  # checked by _read_adapter_config
    keys = ("r", "lora_alpha", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern")
    problems = [
        f"{key}={getattr(saved, key)!r} in {initial}, expected {getattr(config, key)!r} "
        "(this adapter's)"
        for key in keys
        if getattr(saved, key) != getattr(config, key)
    ]
    tensors, _ = _read_safetensors(initial / ADAPTER_WEIGHTS_NAME, "save_adapter")
    adapted = {p for p, _ in lora_layers(model)}
    initial_arrays = {}
    for name, arr in arrays.items():
        if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B"):
            continue
        key = _peft_key(name, adapted)
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
            _host_copy(arrays[A]), _host_copy(arrays[B]), initial_arrays[A], initial_arrays[B]
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
    try:  # os.stat, not Path.exists: a symlink loop or a path under a file is an OSError
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"load_adapter: no adapter folder at {folder}") from None
    if not stat.S_ISDIR(mode):
        raise ValueError(
            f"load_adapter: {folder} is a file; expected a folder holding "
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    if not weights_path.exists():
        hint = ""
        if (folder / "adapter_model.bin").exists():
            hint = (
                " (adapter_model.bin is a pickle file, which minilora never loads; convert it "
                "to safetensors with PEFT: model.save_pretrained(folder, "
                "safe_serialization=True))"
            )
        raise FileNotFoundError(f"load_adapter: {weights_path} does not exist{hint}")
    config_bytes = _read_file(config_path, "load_adapter")
    tensors, metadata = _read_safetensors(weights_path, "load_adapter", half_to_float32=True)
    digest = metadata.get(CONFIG_DIGEST_KEY)
    if digest is not None and digest != hashlib.sha256(config_bytes).hexdigest():
        raise ValueError(
            f"load_adapter: {folder}: {ADAPTER_CONFIG_NAME} is not the config that was saved "
            f"with {ADAPTER_WEIGHTS_NAME} (its SHA-256 differs from the one recorded in the "
            "weights): a save was interrupted between the two files, or one of them was "
            "replaced or edited. Nothing was changed; save the adapter again"
        )
    # A PEFT adapter of GPT2LMHeadModel, for a model loaded from GPT-2: mapped into
    # minilora's names (checked first), then loaded as any other
    gpt2 = hf_gpt2.is_gpt2(model) and any(
        k.startswith((f"{PEFT_PREFIX}transformer.", f"{PEFT_PREFIX}h.")) for k in tensors
    )
    fields, layers = _read_adapter_config(config_path, config_bytes, conv1d=gpt2)
    if gpt2 and (fields.get("use_dora") or fields["init_lora_weights"] == "pissa"):
        raise ValueError(
            f"load_adapter: {config_path}: use_dora={fields.get('use_dora', False)!r}, "
            f"init_lora_weights={fields['init_lora_weights']!r}: DoRA and PiSSA adapters of a "
            "GPT-2 model are not supported yet; nothing was changed"
        )
    if gpt2:
        # converted at one rank (patterns that repeat r), the layers chosen by hf_gpt2
        per_layer = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern")
        fields = {k: v for k, v in fields.items() if k not in per_layer}
        fields, arrays, problems = hf_gpt2.adapter_from_gpt2(
            model, fields, layers, tensors, PEFT_PREFIX
        )
        if problems:
            raise ValueError(
                f"load_adapter: {folder} does not fit the GPT-2 model; nothing was changed:\n  "
                + "\n  ".join(problems)
            )
        adapted = set(fields["target_modules"])
        tensors = {_peft_key(name, adapted): arr for name, arr in arrays.items()}
    fields["target_modules"], problems = _resolve_targets(model, fields["target_modules"], tensors)
    if problems:
        raise ValueError(
            f"load_adapter: {folder} does not fit the model; nothing was changed:\n  "
            + "\n  ".join(problems)
        )
    try:
        config = LoRAConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {config_path}: {e}") from None

    expected, problems = _adapter_plan(model, config)
    if config.init_lora_weights == "pissa" and adapted_layers(model):
        problems.append(
            "init_lora_weights='pissa': a PiSSA adapter loads only on a base model (its "
            "weights become the SVD residuals); the model already has LoRA layers"
        )
    adapted = [p for p, _ in _adapter_paths(model, config)]
    problems += _tensor_problems(tensors, expected, config)
    if problems:
        raise ValueError(
            f"load_adapter: {folder} does not fit the model; nothing was changed:\n  "
            + "\n  ".join(problems)
        )
    # Everything checked: now (and only now) change the model.
    if not adapted_layers(model):
        add_lora_layers(model, adapted, config)
    params = dict(model.named_parameters())
    for key, arr in tensors.items():
        p = params[_param_name(key)]  # every key was checked above: a KeyError is a bug
        p.data = backend.array(arr, dtype=p.dtype, device=p.device).copy()  # cast, move
    model.eval()
    return config


def _peft_config_dict(config: LoRAConfig) -> dict:
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
        "fan_in_fan_out": False,
        "task_type": None,
        "base_model_name_or_path": None,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
    }


def _has_patterns(config: LoRAConfig) -> bool:
    """True when some layer may get its own rank or alpha, or only some layers adapt."""
    return bool(config.rank_pattern or config.alpha_pattern) or config.layers_to_transform not in (
        None,
        [],
    )


def _read_adapter_config(path: Path, data: bytes, conv1d: bool = False) -> tuple[dict, tuple]:
    """Parse and check adapter_config.json: (the LoRAConfig fields, with target_modules as
    written, and (layers_to_transform, layers_pattern)), or a ValueError naming the file
    and every problem. Each key is honoured, known to be harmless, or refused when set.
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
    # A GPT-2 adapter is converted at one rank and alpha: a pattern that repeats them is
    # plain LoRA (minilora's own models take any pattern, checked by LoRAConfig below)
    for key, name, want in (("rank_pattern", "r", r), ("alpha_pattern", "lora_alpha", alpha)):
        pattern = raw.get(key)
        if unset(pattern):
            continue
        if not isinstance(pattern, dict):
            problems.append(f"{key}={pattern!r} must be a dict from module patterns to {name}")
        elif conv1d and any(v != want for v in pattern.values()):
            problems.append(
                f"{key}={pattern!r} is not supported for a GPT-2 adapter: minilora converts "
                f"one {name} for every layer ({name}={want!r})"
            )
    layers = raw.get("layers_to_transform")
    if not unset(layers) and not (
        _index(layers) or (isinstance(layers, list) and all(_index(i) for i in layers))
    ):
        problems.append(f"layers_to_transform={layers!r} must be a layer index or a list of them")
    layers_pattern = raw.get("layers_pattern")
    if not unset(layers_pattern) and not (
        isinstance(layers_pattern, str)
        or (isinstance(layers_pattern, list) and all(isinstance(t, str) for t in layers_pattern))
    ):
        problems.append(f"layers_pattern={layers_pattern!r} must be a name or a list of names")
    init = raw.get("init_lora_weights", True)  # PEFT's default is true (kaiming)
    if not any(init == i and type(init) is type(i) for i in _INITS):
        problems.append(
            f"init_lora_weights={init!r} is not supported by minilora: it loads adapters whose "
            "init left the base weights as they were (true, false, 'gaussian', 'orthogonal') "
            "and PiSSA ('pissa'); OLoRA, LoftQ and the like change the base weights otherwise"
        )
    for key in ("use_rslora", "use_dora"):
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
    for key in ("lora_dropout", "bias", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        if raw.get(key) is not None:
            fields[key] = raw[key]
    if not unset(layers) and not isinstance(targets, str):  # PEFT ignores it for a regex
        fields["layers_to_transform"] = layers
        fields["layers_pattern"] = None if unset(layers_pattern) else layers_pattern
    try:
        LoRAConfig(**fields)  # the remaining checks (bias, dropout); the targets come later
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {path}: {e}") from None
    return fields, (None if unset(layers) else layers, layers_pattern)


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


def _index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    try:
        chosen = [p for p in paths + embeddings if re.fullmatch(targets, p)]
    except re.error as e:
        return [], [f"target_modules={targets!r} is not a valid regular expression: {e}"]
    if not chosen:
        return [], [
            f"target_modules={targets!r} (a regular expression over module paths) matches no "
            f"Linear layer in the model; the paths are {paths}"
        ]
    return chosen, []


def _adapter_paths(model: Module, config: LoRAConfig) -> list:
    """(path, layer) of the layers the adapter is on: the model's LoRA layers when it has
    some, else the Linear and Embedding layers that ``config`` adapts."""
    if adapted_layers(model):
        return adapted_layers(model)
    return [(p, m) for p, m in adaptable_layers(model) if config.adapts(p)]


def _adapter_plan(model: Module, config: LoRAConfig) -> tuple[dict, list[str]]:
    """What the adapter must hold for this model: {parameter path: shape}, and the
    problems that stop it from fitting at all (targets that match nothing, layers that
    layers_to_transform leaves out, existing LoRA layers that disagree with the config)."""
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
    problems += embedding_variant_problems(model, [p for p, _ in chosen], config)
    tied = tied_embeddings(model, [p for p, _ in chosen])
    if tied:
        problems.append(f"{tied} share their weight with another layer (tie_word_embeddings)")
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
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                expected[name] = param.shape
    elif config.bias == "lora_only":
        for p, m in chosen:
            if getattr(m, "bias", None) is not None:
                expected[f"{p}.bias"] = m.bias.shape
    return expected, problems


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
        for attr in ("r", "lora_alpha", "use_rslora", "use_dora"):
            if getattr(layer, attr) != getattr(own, attr):
                problems.append(
                    f"config says {attr}={getattr(own, attr)!r} but the LoRA layer {path} "
                    f"has {attr}={getattr(layer, attr)!r}"
                )
        if layer.merged:
            problems.append(f"the LoRA layer {path} is merged; call unmerge_lora(model) first")
    plain = [p for p, _ in adaptable_layers(model) if config.adapts(p)]
    if plain:
        problems.append(f"target_modules names layers that have no LoRA in the model: {plain}")
    paths = [p for p, m in model.named_modules() if isinstance(m, (Linear, Embedding)) and p]
    missing = sorted(t for t in targets if not any(is_target([t], p) for p in paths))
    if missing:
        problems.append(f"target_modules {missing} match no layer in the model")
    return problems


def _param_name(key: str) -> str | None:
    """The model's parameter path for a PEFT key, or None when the key is not PEFT's:
    ``base_model.model.<path>.lora_A.weight`` -> ``<path>.lora_A``,
    ``base_model.model.<path>.base_layer.bias`` -> ``<path>.bias`` (PEFT's spelling of an
    adapted layer's own bias) and ``base_model.model.<path>.bias`` -> ``<path>.bias``."""
    if not key.startswith(PEFT_PREFIX):
        return None
    name = key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
    owner, _, leaf = name.rpartition(".")
    if owner.endswith((".lora_A", ".lora_B")) and leaf == "weight":
        return owner
    if leaf in ("lora_A", "lora_B"):
        return None  # a bare .lora_A without .weight is not PEFT's spelling
    return name


def _peft_key(name: str, adapted=frozenset()) -> str:
    """The inverse of :func:`_param_name`; ``adapted``: the paths of the LoRA layers, whose
    own bias PEFT keeps under ``base_layer`` (as its wrapper holds the original Linear)."""
    owner, _, leaf = name.rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        return f"{PEFT_PREFIX}{name}.weight"
    if leaf in ("lora_embedding_A", "lora_embedding_B"):  # PEFT: Parameters, no .weight
        return PEFT_PREFIX + name
    if owner in adapted and leaf != "lora_magnitude_vector":  # PEFT keeps m beside lora_A
        return f"{PEFT_PREFIX}{owner}.base_layer.{leaf}"
    return PEFT_PREFIX + name


def _tensor_problems(tensors: dict, expected: dict, config: LoRAConfig) -> list[str]:
    """Compare the file's tensors (PEFT keys) with the expected {parameter path: shape}."""
    problems = []
    for key in sorted(tensors):
        name = _param_name(key)
        if name not in expected:
            problems.append(f"unexpected key {key!r}")
            continue
        got, want = tuple(tensors[key].shape), tuple(expected[name])
        if got == want:
            continue
        owner, _, leaf = name.rpartition(".")
        r = config.for_module(owner).r
        says = f"config says r={r}" + (" (rank_pattern)" if r != config.r else "")
        if leaf.endswith("A") and leaf in LORA_LEAVES and len(got) == 2 and got[1] == want[1]:
            problems.append(f"{says} but {leaf} for {owner} has shape {got}")
        elif leaf.endswith("B") and leaf in LORA_LEAVES and len(got) == 2 and got[0] == want[0]:
            problems.append(f"{says} but {leaf} for {owner} has shape {got}")
        else:
            what = f"{leaf} for {owner}" if leaf in LORA_LEAVES else name
            problems.append(f"{what} has shape {got}, expected {want}")
    present = [_param_name(key) for key in tensors]
    for name in sorted({n for n in present if present.count(n) > 1} - {None}):
        problems.append(f"{name} is given twice (with and without .base_layer)")
    adapted = {n.rpartition(".")[0] for n in expected if n.endswith(("lora_A", "lora_embedding_A"))}
    for name in sorted(set(expected) - set(present)):
        problems.append(f"missing key {_peft_key(name, adapted)!r}")
    return problems


# ======================================================================================
# safetensors, read and written
# ======================================================================================


def serialize(tensors: dict, metadata: dict) -> bytes:
    """safetensors bytes with a canonical header, so equal inputs give equal bytes.

    The safetensors library lays out the data and writes the header, but its
    ``__metadata__`` is a Rust HashMap whose key order changes from call to call. We
    re-emit the header with sorted keys; data offsets are relative to the end of the
    header, so the data bytes stay valid. The header is padded with spaces to a multiple
    of 8 bytes, as the library does, so the data stays aligned.
    """
    raw = safetensors.numpy.save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def _read_file(path: Path, caller: str) -> bytes:
    """The bytes of a regular file (see :func:`_check_regular_file`)."""
    _check_regular_file(path, caller)
    return path.read_bytes()


def _check_regular_file(path: Path, caller: str) -> None:
    """Refuse a missing path, a folder, a device (/dev/zero), a pipe or a socket before it
    is opened: reading one could block or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{caller}: no such file: {path}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{caller}: {path} is a folder, expected a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{caller}: {path} is not a regular file (a device, pipe or socket?)")


def _read_safetensors(path: Path, caller: str, half_to_float32: bool = False) -> tuple[dict, dict]:
    """(tensors as host arrays, metadata) from a safetensors file, or a ValueError that
    names the file and what is wrong with it: :func:`_read_header`, then
    :func:`_read_tensors`."""
    entries, metadata, data_start = _read_header(path, caller, half_to_float32)
    return _read_tensors(path, caller, entries, data_start, half_to_float32), metadata


def _read_header(path: Path, caller: str, half_to_float32: bool = False):
    """(entries, metadata, data_start) of a safetensors file whose structure and dtypes are
    valid, or a ValueError that names the file and what is wrong with it. ``entries``:
    (name, {"dtype", "shape", "data_offsets"}) in the file's order; the data begins at
    byte ``data_start``. No tensor is read: a caller can check shapes first."""
    _check_regular_file(path, caller)
    with open(path, "rb") as f:  # a file we may not read: PermissionError, saying so
        # The library validates the structure from the file's header: header length,
        # JSON, dtypes, shapes, offsets that tile the data and end where the file ends.
        # Its errors (SafetensorError, or anything else a hostile file provokes) become
        # one ValueError that names the file.
        try:
            with safetensors.safe_open(str(path), framework="numpy"):
                pass
        except BaseException as e:  # a Rust panic surfaces as a BaseException subclass
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise ValueError(
                f"{caller}: {path} is not a valid safetensors file (truncated or corrupt?): {e}"
            ) from e
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            metadata = header.pop("__metadata__", None) or {}
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"])
        except Exception as e:  # validated above, so this is not expected; still never leak
            raise ValueError(f"{caller}: {path} could not be read: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"{caller}: {path} has a __metadata__ that is not a JSON object")
    known = {**_SAFETENSORS_DTYPES, **(_HALF_DTYPES if half_to_float32 else {})}
    bad = [f"{name}: {v['dtype']}" for name, v in entries if v["dtype"] not in known]
    if bad:
        raise ValueError(
            f"{caller}: {path} holds tensors of a dtype minilora does not use ({', '.join(bad)}); "
            f"expected one of {sorted(known.values())}"
        )
    return entries, metadata, 8 + n


def _read_tensors(path: Path, caller: str, entries, data_start: int, half_to_float32=False):
    """The tensors of :func:`_read_header`'s ``entries``, as host arrays by name.

    Each tensor is read from the file straight into its own new array, one at a time, so
    reading holds the tensors once (not the file's bytes beside them).

    NaN and infinite values are refused, naming the tensor: no trained model holds them,
    and loading them would only print "loss nan" later. With ``half_to_float32`` (adapters)
    float16 and bfloat16 tensors are upcast to float32 (exactly), with a warning.
    """
    try:
        with open(path, "rb") as f:  # in the file's order: one pass over it
            tensors = {name: _read_tensor(f, data_start, v) for name, v in entries}
    except Exception as e:  # validated by _read_header, so this is not expected either
        raise ValueError(f"{caller}: {path} could not be read: {e}") from e
    xp = backend.module_for("cpu")
    not_finite = sorted(name for name, a in tensors.items() if not xp.isfinite(a).all())
    if not_finite:
        raise ValueError(
            f"{caller}: {path} holds NaN or infinite values in {', '.join(not_finite)}; "
            "a trained model never does (did training diverge?)"
        )
    half = sorted({_HALF_DTYPES[v["dtype"]] for _, v in entries if v["dtype"] in _HALF_DTYPES})
    if half and half_to_float32:
        tensors = {name: a.astype(xp.float32) for name, a in tensors.items()}
        warnings.warn(
            f"{caller}: {path} holds {' and '.join(half)} tensors; they were upcast to float32 "
            "(exactly: every such value is a float32 value)",
            stacklevel=4,
        )
    return tensors


def _read_tensor(f, data_start: int, entry: dict):
    """One tensor of a safetensors file (header ``entry``; the data begins at byte
    ``data_start``) read into a new native-order host array: the file's bytes go straight
    into it, with no second copy (little-endian machines; bfloat16 is widened)."""
    xp = backend.module_for("cpu")
    begin, end = entry["data_offsets"]
    if entry["dtype"] == "BF16":  # NumPy has no bfloat16: its bits are a float32's top half
        dtype = xp.dtype("<u2")
    else:
        dtype = xp.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
    array = xp.empty(entry["shape"], dtype=dtype)
    f.seek(data_start + begin)
    if f.readinto(array.reshape(-1).view(xp.uint8)) != end - begin:
        raise ValueError("the file ended inside a tensor (changed while being read?)")
    if entry["dtype"] == "BF16":
        return (array.astype(xp.uint32) << 16).view(xp.float32)
    return array.astype(dtype.newbyteorder("="), copy=False)  # no copy when already native


def _host_copy(array):
    """A contiguous host (NumPy) copy of a parameter array, from any device."""
    return backend.to_numpy(array).copy()  # ndarray.copy() is C-contiguous


# ======================================================================================
# Atomic writes
# ======================================================================================


def _check_destination(path: Path, caller: str) -> Path:
    if path.is_dir():
        raise ValueError(
            f"{caller}: {path} is a folder; give a file name such as model.safetensors"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{caller}: the folder {path.parent} does not exist")
    return path


# Temporary files are named ".<destination name>.minilora-tmp-<random>", beside the
# destination; a process killed mid-save leaves one, removed by the next save there.
_TEMP_MARK = ".minilora-tmp-"


def atomic_write(files: list[tuple[Path, bytes]]) -> None:
    """Write each (destination, bytes) to a temporary file beside it, flushed and fsync'ed,
    then move them into place with ``os.replace``. Nothing is replaced until every
    temporary file is complete; on any error the temporary files are removed and the
    destinations keep their previous content.

    A destination that is a symbolic link is written through to its target (the link
    stays a link); one that is not a regular file (a device, a pipe) is refused.
    Temporary files a killed save left beside a destination are removed first (two
    processes saving to the same file at once are not supported: one fails).

    (With several files there is still a short window between the replaces in which a
    crash leaves a new file beside an old one; each file on its own is never partial.
    ``save_adapter`` records a digest that makes such a pair refused on load.)
    """
    files = [(Path(os.path.realpath(dest)), data) for dest, data in files]
    for dest, _ in files:
        if dest.exists() and not dest.is_file():  # /dev/null, a pipe: never replace one
            raise ValueError(f"{dest} exists and is not a regular file; refusing to replace it")
    for dest, _ in files:
        stale = glob.escape(str(dest.parent / f".{dest.name}{_TEMP_MARK}")) + "*"
        for leftover in glob.glob(stale):
            _remove_quietly(leftover)
    pending = []  # temporary paths not yet moved into place
    try:
        for dest, data in files:
            pending.append((_write_temp(dest, data), dest))
        while pending:
            tmp, dest = pending[0]
            os.replace(tmp, dest)
            pending.pop(0)
            _fsync_dir(dest.parent)
    finally:
        for tmp, _ in pending:
            _remove_quietly(tmp)


def _write_temp(dest: Path, data: bytes) -> str:
    # Same folder as the destination: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}{_TEMP_MARK}", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        # mkstemp creates the file private (0600); give it the mode a normal save would
        os.chmod(tmp, _file_mode(dest))
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _file_mode(dest: Path) -> int:
    """Keep the permissions of the file being replaced, else 0666 minus the umask."""
    try:
        return dest.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)  # the only way to read the umask is to set it
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened on Windows, so skip."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "load_adapter",
    "load_model",
    "save_adapter",
    "save_model",
    "serialize",
]
