"""Whole models as files: ``save_model`` writes one ``.safetensors`` file, ``load_model``
reads it back, or a Hugging Face GPT-2 folder (``config.json`` and ``model.safetensors``).

A model file holds every parameter under its module path (``blocks.0.attn.q_proj.weight``)
and, in the header's ``__metadata__``, the format name, its version and the config; a file
is refused, naming every problem, before any model is built. Format: docs/porting.md.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from minilora import backend
from minilora.interop import hf_gpt2, hub
from minilora.interop.files import JSON_LIMIT, read_file
from minilora.interop.peft_config import ADAPTER_CONFIG_NAME, PEFT_PREFIX
from minilora.interop.safetensors_files import (
    SAFETENSORS_DTYPES,
    atomic_write,
    check_destination,
    host_copy,
    read_header,
    read_tensors,
    serialize,
)
from minilora.lora import adapted_layers
from minilora.model import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from minilora.nn import Dropout, Embedding, LayerNorm, Linear, ModuleList
from minilora.variants.vera import vera_layers

MODEL_FORMAT = "minilora.model"
MODEL_FORMAT_VERSION = "1"


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
    layers += [p for p, _ in vera_layers(model)]
    if layers:
        raise ValueError(
            f"save_model: the model has LoRA layers ({', '.join(layers)}); save_model writes "
            "plain models only. Call minilora.merge_and_unload(model) first to save the "
            "adapted model with the adapter folded into its weights, or "
            "save_adapter(model, folder, config) to save only the adapter"
        )
    _refuse_extra_layers(model)
    path = check_destination(Path(path), "save_model")
    tensors = {name: host_copy(p.data) for name, p in model.named_parameters()}
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "config": _config_json(model.config),
    }
    atomic_write([(path, serialize(tensors, metadata))])


# The stored config: GPTConfig's fields and "hf_model_type", which names the config's class:
# null for a GPTConfig, "gpt2" for an hf_gpt2.GPT2Config (a model loaded from a GPT-2 folder,
# whose adapters keep GPT-2's names after a save and a load). Every file records it.
_HF_MODEL_TYPES = (None, "gpt2")


def _config_json(config: GPTConfig) -> str:
    """The config as the file's metadata stores it (sorted keys: the same bytes each time)."""
    model_type = "gpt2" if isinstance(config, hf_gpt2.GPT2Config) else None
    return json.dumps({**config.to_dict(), "hf_model_type": model_type}, sort_keys=True)


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

    ``path`` may also be a Hugging Face hub id (``"gpt2"``, ``"org/name"``), found in
    huggingface_hub's cache (the ``hub`` extra; ``HF_HOME`` and ``HF_HUB_OFFLINE`` honoured)
    when no local file or folder of that name exists (minilora/interop/hub.py).

    A GPT-2 is mapped into minilora's names (minilora/interop/hf_gpt2.py); its head stays tied to
    the token embedding, and its adapters are saved and loaded in GPT-2's names, so
    that PEFT loads them on ``GPT2LMHeadModel``.

    The stored ``GPTConfig`` is checked against the tensors wherever the shapes tell
    (``vocab_size``, ``block_size``, ``n_embd``, ``n_layer``, ``bias``); ``n_head`` (any
    divisor of ``n_embd`` gives the same shapes) and ``dropout`` (no tensor at all) cannot
    be checked, and are trusted as written.
    """
    device = backend.check_device(device)
    path = hub.local_path(path, "load_model")  # a local path wins over a hub id
    # lexists: a dangling or looping config.json link is a GPT-2 folder, refused as such
    if path.is_dir() and os.path.lexists(path / hf_gpt2.CONFIG_NAME):
        return _say_half_precision(_load_gpt2(path, device), path)
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
    entries, metadata, data_start = read_header(path, "load_model")
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
    model = _load_into(model, path, read_tensors(path, "load_model", entries, data_start))
    return _say_half_precision(model, path)


def _say_half_precision(model: GPT, path: Path) -> GPT:
    """``model``, after one line (a warning) saying what a float16 model computes in."""
    if model.tok_emb.weight.dtype == backend.float16:
        warnings.warn(
            f"load_model: {path} holds float16 weights: the model computes in float16, with "
            "layer norm, softmax and the loss in float32 (as PyTorch does), and trains "
            "through float32 master weights",
            stacklevel=3,
        )
    return model


def _load_gpt2(folder: Path, device: str) -> GPT:
    """A Hugging Face GPT-2 folder as a minilora GPT; every tensor is checked against
    config.json before the model is built."""
    config_path, weights_path = folder / hf_gpt2.CONFIG_NAME, folder / hf_gpt2.WEIGHTS_NAME
    text = read_file(config_path, "load_model", "a JSON file", JSON_LIMIT)
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"load_model: {config_path} is not valid JSON: {e}") from None
    config = hf_gpt2.gpt_config(raw, config_path)
    if not os.path.lexists(weights_path):  # a link is checked when it is read
        raise FileNotFoundError(
            f"load_model: {weights_path} does not exist (minilora reads one safetensors file: "
            "not pytorch_model.bin, a pickle it never loads, nor sharded weights; save with "
            "save_pretrained(folder, safe_serialization=True))"
        )
    # The shapes from the header: when they fit, the model is built before any tensor is
    # read (loading then holds the model and the tensors, no more); when they do not,
    # state_dict_from_gpt2 refuses the file, naming every problem, before a model is built.
    entries, _, data_start = read_header(weights_path, "load_model")
    shapes = {name: tuple(entry["shape"]) for name, entry in entries}
    params, problems = hf_gpt2.gpt2_shape_problems(shapes, config)
    if not problems:
        dtypes = [entry["dtype"] for name, entry in entries if name in params]
        model = _new_model(weights_path, config, dtypes, device)
    tensors = read_tensors(weights_path, "load_model", entries, data_start)
    state = hf_gpt2.state_dict_from_gpt2(tensors, config, weights_path)
    del tensors  # the state's views keep what they need, and free it as they are loaded
    return _load_into(model, weights_path, state)


def _new_model(path: Path, config: GPTConfig, dtypes: list[str], device: str) -> GPT:
    """A new GPT in the one dtype of the file's parameters (safetensors names, "F32")."""
    dtypes = sorted({SAFETENSORS_DTYPES[d] for d in dtypes})
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
    model_type = raw.get("hf_model_type")  # absent: a plain GPT, as null
    fields = {key: value for key, value in raw.items() if key != "hf_model_type"}
    try:
        config = (hf_gpt2.GPT2Config if model_type == "gpt2" else GPTConfig)(**fields)
        if model_type not in _HF_MODEL_TYPES:
            raise ValueError(f"GPTConfig: hf_model_type={model_type!r} must be None or 'gpt2'")
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
    # blocks 0 to n_layer - 1, compared without listing n_layer of them (10**9 would not fit)
    if len(blocks) != config.n_layer or blocks != {str(i) for i in range(len(blocks))}:
        problems.append(
            f"config says n_layer={config.n_layer} but the file has blocks {sorted(blocks)}"
        )
    if problems:
        raise ValueError(
            f"load_model: {path}: the config disagrees with the tensors:\n  "
            + "\n  ".join(problems)
        )
    return config
