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

Three promises, each tested in tests/test_checkpoint.py:

* **Refuse, don't guess.** A truncated or corrupt file, a header that is not JSON, a dtype
  minilora does not use, missing or unexpected keys, wrong shapes, or a config that
  disagrees with the tensors raise ``ValueError`` naming the file and *every* problem found.
  A missing file or folder raises ``FileNotFoundError``.
* **A failed load leaves the model untouched.** ``load_adapter`` checks every key and
  shape against the model first, and only then adds LoRA layers and copies arrays in.
* **A failed save leaves the old file intact.** Every file is written to a temporary name
  in the same folder, flushed and fsync'ed, then moved over the destination with
  ``os.replace`` (atomic on POSIX and Windows); on any error the temporary file is removed.

Saves are byte-for-byte reproducible: the same model gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import safetensors
import safetensors.numpy

from minilora import backend
from minilora.lora import LoRAConfig, apply_lora, lora_layers
from minilora.lora import lora_state_dict as _lora_state_dict
from minilora.model import GPT, GPTConfig
from minilora.nn import Linear, Module

MODEL_FORMAT = "minilora.model"
MODEL_FORMAT_VERSION = "1"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper path; the adapter name is not in saved keys

# The dtypes minilora computes in; anything else in a file is refused, not converted.
_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64"}

# PEFT config fields whose non-default values describe something minilora cannot load
# faithfully; refused with a message rather than silently ignored.
_UNSUPPORTED_PEFT = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
}


# ======================================================================================
# Whole models
# ======================================================================================


def save_model(model: GPT, path) -> None:
    """Write every parameter of ``model`` and its ``GPTConfig`` to one ``.safetensors`` file.

    A model with LoRA layers is refused: fold the adapter in with ``merge_and_unload``
    first, or save only the adapter with :func:`save_adapter`.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_model: model must be a GPT, got {type(model).__name__}")
    layers = [p for p, _ in lora_layers(model)]
    if layers:
        raise ValueError(
            f"save_model: the model has LoRA layers ({', '.join(layers)}); save_model writes "
            "plain models only. Call minilora.merge_and_unload(model) first to save the "
            "adapted model with the adapter folded into its weights, or "
            "save_adapter(model, folder, config) to save only the adapter"
        )
    path = _check_destination(Path(path), "save_model")
    tensors = {name: _host_copy(p.data) for name, p in model.named_parameters()}
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    atomic_write([(path, serialize(tensors, metadata))])


def load_model(path, device: str = "cpu") -> GPT:
    """Read a file written by :func:`save_model`: a new ``GPT`` on ``device``, in the
    file's dtype, with every parameter loaded (strict: no missing or unexpected keys)."""
    device = backend.check_device(device)
    path = Path(path)
    if path.is_dir():
        hint = (
            "; it looks like an adapter folder: use load_adapter(model, folder)"
            if (path / ADAPTER_CONFIG_NAME).exists()
            else ""
        )
        raise ValueError(f"load_model: {path} is a folder, expected a .safetensors file{hint}")
    tensors, metadata = _read_safetensors(path, "load_model")

    fmt = metadata.get("format")
    if fmt != MODEL_FORMAT:
        hint = ""
        if any(k.startswith(PEFT_PREFIX) for k in tensors):
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
    config = _model_config(path, metadata.get("config"), tensors)
    dtypes = sorted({backend.dtype_name(a.dtype) for a in tensors.values()})
    if len(dtypes) > 1:
        raise ValueError(f"load_model: {path} mixes dtypes {dtypes}; expected one dtype")
    dtype = backend.resolve_dtype(dtypes[0]) if dtypes else backend.DEFAULT_DTYPE

    model = GPT(config, dtype=dtype, device=device)
    try:
        model.load_state_dict(tensors, strict=True)
    except ValueError as e:
        raise ValueError(f"load_model: {path} does not match its own config: {e}") from None
    return model


def _model_config(path: Path, text, tensors: dict) -> GPTConfig:
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
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != want:
            problems.append(f"config implies {name} of shape {want}, the file has {got}")
    blocks = {k.split(".")[1] for k in tensors if k.startswith("blocks.") and k.count(".") > 1}
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


def save_adapter(model: Module, path, config: LoRAConfig) -> None:
    """Write the model's LoRA adapter as a PEFT folder: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (``lora_A``/``lora_B`` and biases per ``config.bias``).

    ``config`` must describe the model's LoRA layers (same targets, ``r``, ``lora_alpha``,
    ``use_rslora``). A model without LoRA layers, or with merged ones, is refused.
    """
    if not isinstance(model, Module):
        raise TypeError(f"save_adapter: model must be a Module, got {type(model).__name__}")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"save_adapter: config must be a LoRAConfig, got {type(config).__name__}")
    if not lora_layers(model):
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
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_adapter: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)

    tensors = {}
    adapted = {p for p, _ in lora_layers(model)}
    for name, arr in _lora_state_dict(model, config.bias).items():
        tensors[_peft_key(name, adapted)] = _host_copy(arr)
    weights = serialize(tensors, {"format": "pt"})  # what PEFT writes, for transformers
    text = json.dumps(_peft_config_dict(config), indent=2, sort_keys=True) + "\n"
    # Both files are written in full before either replaces its predecessor.
    atomic_write(
        [(folder / ADAPTER_WEIGHTS_NAME, weights), (folder / ADAPTER_CONFIG_NAME, text.encode())]
    )


def load_adapter(model: Module, path) -> LoRAConfig:
    """Load a PEFT adapter folder into ``model`` and return its ``LoRAConfig``.

    A base model gets LoRA layers (``apply_lora`` with the folder's config) before the
    arrays are copied in; a model that already has LoRA layers must have exactly the
    config's targets, ``r``, ``lora_alpha`` and ``use_rslora``. Everything is checked
    first; on any problem nothing in the model changes. Arrays are cast to the dtype and
    moved to the device of the parameters they load into.
    """
    if not isinstance(model, Module):
        raise TypeError(f"load_adapter: model must be a Module, got {type(model).__name__}")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"load_adapter: no adapter folder at {folder}")
    if not folder.is_dir():
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
    config = _read_adapter_config(config_path)
    tensors, _ = _read_safetensors(weights_path, "load_adapter")

    expected, problems = _adapter_plan(model, config)
    problems += _tensor_problems(tensors, expected, config.r)
    if problems:
        raise ValueError(
            f"load_adapter: {folder} does not fit the model; nothing was changed:\n  "
            + "\n  ".join(problems)
        )
    # Everything checked: now (and only now) change the model.
    if not lora_layers(model):
        apply_lora(model, config)
    params = dict(model.named_parameters())
    for key, arr in tensors.items():
        p = params[_param_name(key)]  # every key was checked above: a KeyError is a bug
        p.data = backend.array(arr, dtype=p.dtype, device=p.device).copy()  # cast, move
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
        "use_dora": False,
        "fan_in_fan_out": False,
        "task_type": None,
        "base_model_name_or_path": None,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _read_adapter_config(path: Path) -> LoRAConfig:
    """Parse and check adapter_config.json. Keys minilora does not know are ignored (older
    PEFT versions reject them, a common complaint); known keys with values minilora cannot
    honour (DoRA, per-layer ranks, ...) are refused."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"load_adapter: {path} does not exist") from None
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"load_adapter: {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"load_adapter: {path} must hold a JSON object, got {type(raw).__name__}")

    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type={raw.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if raw.get(key) is None:
            problems.append(f"{key} is missing")
    alpha = raw.get("lora_alpha")
    if alpha is not None and (
        not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < math.inf
    ):
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
    for key, allowed in _UNSUPPORTED_PEFT.items():
        if key in raw and not any(raw[key] == a and type(raw[key]) is type(a) for a in allowed):
            problems.append(f"{key}={raw[key]!r} is not supported by minilora")
    init = raw.get("init_lora_weights", True)  # PEFT's default is true (kaiming)
    if init is True:
        init = "kaiming"
    if init not in ("gaussian", "kaiming"):
        problems.append(f"init_lora_weights={init!r}: minilora knows true (kaiming) and 'gaussian'")
    if problems:
        raise ValueError(
            f"load_adapter: {path} is not a usable LoRA config:\n  " + "\n  ".join(problems)
        )

    fields = {
        "r": r,
        "lora_alpha": raw["lora_alpha"],
        "target_modules": targets,
        "init_lora_weights": init,
    }
    for key in ("lora_dropout", "bias", "use_rslora"):
        if raw.get(key) is not None:
            fields[key] = raw[key]
    try:
        config = LoRAConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {path}: {e}") from None
    if not isinstance(config.use_rslora, bool):
        raise ValueError(f"load_adapter: {path}: use_rslora={config.use_rslora!r} must be a bool")
    return config


def _adapter_plan(model: Module, config: LoRAConfig) -> tuple[dict, list[str]]:
    """What the adapter must hold for this model: {parameter path: shape}, and the
    problems that stop it from fitting at all (targets that match nothing, ranks too big,
    existing LoRA layers that disagree with the config)."""
    problems = []
    if lora_layers(model):
        problems += _existing_lora_problems(model, config)
        chosen = lora_layers(model)
    else:
        linears = [(p, m) for p, m in model.named_modules() if type(m) is Linear and p]
        available = sorted({p.rsplit(".", 1)[-1] for p, _ in linears})
        unmatched = [t for t in config.target_modules if t not in available]
        if unmatched:
            problems.append(
                f"target_modules {unmatched} match no Linear layer in the model; available "
                f"names: {available}"
            )
        chosen = [(p, m) for p, m in linears if p.rsplit(".", 1)[-1] in config.target_modules]
        for p, m in chosen:
            if config.r > min(m.weight.shape):
                problems.append(
                    f"config says r={config.r}, larger than min(out, in)={min(m.weight.shape)} "
                    f"of {p} (weight shape {m.weight.shape})"
                )
    expected = {}
    for p, m in chosen:
        out_f, in_f = m.weight.shape
        expected[f"{p}.lora_A"] = (config.r, in_f)
        expected[f"{p}.lora_B"] = (out_f, config.r)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                expected[name] = param.shape
    elif config.bias == "lora_only":
        for p, m in chosen:
            if m.bias is not None:
                expected[f"{p}.bias"] = m.bias.shape
    return expected, problems


def _existing_lora_problems(model: Module, config: LoRAConfig) -> list[str]:
    """Ways in which the model's LoRA layers differ from what ``config`` describes."""
    problems = []
    layers = lora_layers(model)
    targets = set(config.target_modules)
    lora_names = {p.rsplit(".", 1)[-1] for p, _ in layers}
    for path, layer in layers:
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in targets:
            problems.append(f"the model has a LoRA layer {path}, not in target_modules")
        for attr in ("r", "lora_alpha", "use_rslora"):
            if getattr(layer, attr) != getattr(config, attr):
                problems.append(
                    f"config says {attr}={getattr(config, attr)!r} but the LoRA layer {path} "
                    f"has {attr}={getattr(layer, attr)!r}"
                )
        if layer.merged:
            problems.append(f"the LoRA layer {path} is merged; call unmerge_lora(model) first")
    plain = [
        p
        for p, m in model.named_modules()
        if type(m) is Linear and p and p.rsplit(".", 1)[-1] in targets
    ]
    if plain:
        problems.append(f"target_modules names layers that have no LoRA in the model: {plain}")
    missing = sorted(targets - lora_names - {p.rsplit(".", 1)[-1] for p in plain})
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
    if owner in adapted:
        return f"{PEFT_PREFIX}{owner}.base_layer.{leaf}"
    return PEFT_PREFIX + name


def _tensor_problems(tensors: dict, expected: dict, r: int) -> list[str]:
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
        if leaf == "lora_A" and len(got) == 2 and got[1] == want[1]:
            problems.append(f"config says r={r} but lora_A for {owner} has shape {got}")
        elif leaf == "lora_B" and len(got) == 2 and got[0] == want[0]:
            problems.append(f"config says r={r} but lora_B for {owner} has shape {got}")
        else:
            what = f"{leaf} for {owner}" if leaf in ("lora_A", "lora_B") else name
            problems.append(f"{what} has shape {got}, expected {want}")
    present = [_param_name(key) for key in tensors]
    for name in sorted({n for n in present if present.count(n) > 1} - {None}):
        problems.append(f"{name} is given twice (with and without .base_layer)")
    adapted = {n.rpartition(".")[0] for n in expected if n.endswith(".lora_A")}
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


def _read_safetensors(path: Path, caller: str) -> tuple[dict, dict]:
    """(tensors as host arrays, metadata) from a safetensors file, or a ValueError that
    names the file and what is wrong with it. The file is read once, into memory."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{caller}: no such file: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{caller}: {path} is a folder, expected a .safetensors file") from None
    # The library validates the structure: header length, JSON, dtypes, shapes, offsets
    # that tile the data exactly. Its errors (SafetensorError, or anything else a hostile
    # file provokes) become one ValueError that names the file.
    try:
        views = safetensors.deserialize(data)
    except BaseException as e:  # a Rust panic surfaces as a BaseException subclass
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise ValueError(
            f"{caller}: {path} is not a valid safetensors file (truncated or corrupt?): {e}"
        ) from e
    bad = [f"{name}: {v['dtype']}" for name, v in views if v["dtype"] not in _SAFETENSORS_DTYPES]
    if bad:
        raise ValueError(
            f"{caller}: {path} holds tensors of a dtype minilora does not use ({', '.join(bad)}); "
            f"expected one of {sorted(_SAFETENSORS_DTYPES.values())}"
        )
    try:
        tensors = safetensors.numpy.load(data)
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except Exception as e:  # validated above, so this is not expected; still never leak
        raise ValueError(f"{caller}: {path} could not be read: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"{caller}: {path} has a __metadata__ that is not a JSON object")
    return tensors, metadata


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


def atomic_write(files: list[tuple[Path, bytes]]) -> None:
    """Write each (destination, bytes) to a temporary file beside it, flushed and fsync'ed,
    then move them into place with ``os.replace``. Nothing is replaced until every
    temporary file is complete; on any error the temporary files are removed and the
    destinations keep their previous content.

    (With several files there is still a short window between the replaces in which a
    crash leaves a new file beside an old one; each file on its own is never partial.)
    """
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
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
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
