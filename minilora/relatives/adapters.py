"""Adapter layers: a small trainable bottleneck after frozen sublayers.

Houlsby et al. 2019 (arXiv 1902.00751) and Lin et al. 2020 (arXiv 2004.03829) freeze the
pretrained model and insert, after a sublayer whose output is ``h`` (..., C), a bottleneck
with a residual connection::

    y = h + up(act(down(h)))     down: Linear(C -> m),  up: Linear(m -> C),  act: GELU or ReLU

``m`` (the ``bottleneck``) is much smaller than ``C``. ``up`` starts at zero (weight and
bias), so right after :func:`apply_adapters` every adapter is the identity and the model
computes exactly what the base model computed. Where the adapters go:

* ``"houlsby"``: two per block, on the attention's output projection (``attn.o_proj``) and
  on the MLP's (``mlp.fc2``): the adapter is applied to the sublayer's output, before the
  residual add, as in the paper (Houlsby et al., figure 2), and before the branch's
  dropout (which the demo's model does not use);
* ``"lin"``: one per block, on the MLP's output only (Lin et al.; their adapter also has a
  LayerNorm of its own, which this one leaves out).

Each adapted ``Linear`` becomes an :class:`AdapterLinear` that keeps ``weight`` and ``bias``
under their usual names (a base checkpoint still loads) and adds ``adapter_down`` and
``adapter_up`` (``Linear`` modules: ``adapter_down.weight`` (m, C), ``adapter_down.bias``
(m,), ``adapter_up.weight`` (C, m), ``adapter_up.bias`` (C,)). An adapter is composed of the
reference ops ``linear``, ``gelu`` (or ReLU as a product with the constant mask
``1[z > 0]``) and ``add``; it needs no op of its own.

Unlike LoRA's ``B A``, an adapter cannot be folded into the frozen weight (the
nonlinearity is in the way): it stays an extra, sequential pair of matmuls at inference.
The math, the parameter count and the latency argument: docs/math.md, "Adapter layers".
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

from minilora import backend
from minilora import functional as F
from minilora.autograd import Tensor
from minilora.interop import safetensors_files
from minilora.model import GPTConfig
from minilora.nn import LayerNorm, Linear, Module, Parameter

# Where each kind of adapter goes: module paths ending with these names.
ADAPTER_SITES = {"houlsby": ("attn.o_proj", "mlp.fc2"), "lin": ("mlp.fc2",)}
NONLINEARITIES = ("gelu", "relu")
ADAPTERS_FORMAT = "minilora-adapters"
ADAPTERS_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter settings."""

    adapter_type: str = "houlsby"  # "houlsby" (after attention and MLP) or "lin" (MLP only)
    bottleneck: int = 8  # m: the width of the bottleneck, C -> m -> C
    nonlinearity: str = "gelu"  # between down and up: "gelu" or "relu"
    train_layer_norms: bool = True  # also train every LayerNorm's weight and bias (Houlsby)
    init_std: float = 1e-2  # down's weight ~ N(0, init_std²) (Houlsby: near-identity init)

    def __post_init__(self):
        if self.adapter_type not in ADAPTER_SITES:
            raise ValueError(
                f"AdapterConfig: adapter_type={self.adapter_type!r} must be one of "
                f"{sorted(ADAPTER_SITES)}"
            )
        if isinstance(self.bottleneck, numbers.Integral) and not isinstance(self.bottleneck, bool):
            object.__setattr__(self, "bottleneck", int(self.bottleneck))  # numpy.int64(4) too
        if not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool):
            raise TypeError(
                f"AdapterConfig: bottleneck={self.bottleneck!r} must be an int, got "
                f"{type(self.bottleneck).__name__}"
            )
        if self.bottleneck < 1:
            raise ValueError(f"AdapterConfig: bottleneck={self.bottleneck} must be >= 1")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"AdapterConfig: nonlinearity={self.nonlinearity!r} must be one of "
                f"{list(NONLINEARITIES)}"
            )
        if not isinstance(self.train_layer_norms, bool):
            raise TypeError(
                f"AdapterConfig: train_layer_norms={self.train_layer_norms!r} must be a bool"
            )
        std = self.init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < math.inf:
            raise ValueError(f"AdapterConfig: init_std={std!r} must be a finite number >= 0")


def relu(x: Tensor) -> Tensor:
    """``max(x, 0)`` as ``x · 1[x > 0]``: a product with a constant mask, so the existing
    ``mul`` op gives the gradient ``g · 1[x > 0]`` (no new op needed)."""
    mask = (x.data > 0).astype(x.dtype)  # a constant: no gradient flows into it
    return x * Tensor(mask)


ACTIVATIONS = {"gelu": F.gelu, "relu": relu}


class AdapterLinear(Linear):
    """A frozen ``Linear`` followed by a bottleneck adapter with a residual connection::

        h = x Wᵀ + b                                   (..., out_features)
        y = h + act(h W_downᵀ + b_down) W_upᵀ + b_up   (..., out_features)

    ``weight`` and ``bias`` are the wrapped layer's own objects; ``adapter_down``
    (out_features -> m) and ``adapter_up`` (m -> out_features, zero at init) are new.
    """

    def __init__(self, linear: Linear, config: AdapterConfig, generator=None):
        # no Linear.__init__: the wrapped layer's parameters are reused, not redrawn
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.nonlinearity = config.nonlinearity
        C, m = linear.out_features, config.bottleneck
        dtype, device = linear.weight.dtype, linear.weight.device
        kw = {"dtype": dtype, "device": device, "generator": generator}
        self.adapter_down = Linear(C, m, init_std=config.init_std, **kw)  # weight (m, C)
        self.adapter_up = Linear(m, C, **kw)  # weight (C, m), zeroed below
        self.adapter_up.weight.data = backend.zeros((C, m), dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.weight, self.bias)  # (..., C): the frozen sublayer output
        z = self.adapter_down(h)  # (..., m)
        return h + self.adapter_up(ACTIVATIONS[self.nonlinearity](z))  # (..., C)

    def to_linear(self) -> Linear:
        """The wrapped ``Linear`` (the same weight and bias objects), without the adapter."""
        linear = Linear.__new__(Linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        m = self.adapter_down.out_features
        return f"{super().extra_repr()}, bottleneck={m}, nonlinearity={self.nonlinearity}"


def adapter_layers(model: Module) -> list[tuple[str, AdapterLinear]]:
    """(path, layer) for every ``AdapterLinear`` in ``model``."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, AdapterLinear)]


def adapter_sites(model: Module, config: AdapterConfig) -> list[str]:
    """The module paths that ``config.adapter_type`` adapts in ``model``, in model order."""
    suffixes = ADAPTER_SITES[config.adapter_type]
    return [
        path
        for path, _ in model.named_modules()
        if any(path == s or path.endswith("." + s) for s in suffixes)
    ]


def apply_adapters(model: Module, config: AdapterConfig, generator=None) -> list[str]:
    """Insert adapters where ``config.adapter_type`` says, freeze the base model, and
    return the adapted module paths. Only the adapters (and, with ``train_layer_norms``,
    every LayerNorm) train afterwards.

    Raises ``ValueError``, changing nothing, when the model has no such layers, when one
    of them is not a plain ``Linear`` (a LoRA layer, say), or when adapters are there
    already (minilora keeps one adapter per layer).
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    existing = [path for path, _ in adapter_layers(model)]
    if existing:
        raise ValueError(
            f"apply_adapters: the model already has adapters at {existing}; minilora keeps "
            "one adapter per layer, and nothing was changed"
        )
    paths = adapter_sites(model, config)
    if not paths:
        raise ValueError(
            f"apply_adapters: no module of the model ends with "
            f"{list(ADAPTER_SITES[config.adapter_type])} (adapter_type={config.adapter_type!r})"
        )
    wrong = [p for p in paths if type(model.get_submodule(p)) is not Linear]
    if wrong:
        kinds = [type(model.get_submodule(p)).__name__ for p in wrong]
        raise ValueError(
            f"apply_adapters: {wrong} are {kinds}, expected plain Linear layers (merge a LoRA "
            "adapter with merge_and_unload first); nothing was changed"
        )
    for path in paths:
        model.set_submodule(path, AdapterLinear(model.get_submodule(path), config, generator))
    mark_only_adapters_as_trainable(model, config.train_layer_norms)
    return paths


def mark_only_adapters_as_trainable(model: Module, train_layer_norms: bool) -> None:
    """Freeze everything but the adapters (and every LayerNorm with ``train_layer_norms``)."""
    model.requires_grad_(False)
    for _, layer in adapter_layers(model):
        layer.adapter_down.requires_grad_(True)
        layer.adapter_up.requires_grad_(True)
    if train_layer_norms:
        for m in model.modules():
            if isinstance(m, LayerNorm):
                m.requires_grad_(True)


def adapter_parameter_count(model_config: GPTConfig, config: AdapterConfig) -> int:
    """Trainable parameters after :func:`apply_adapters`, in closed form (the LoRA paper's
    count of adapter baselines, section 5.1)::

        n_adapters · (2·C·m + m + C)  +  [train_layer_norms] · n_ln · C · (2 if bias else 1)

    with C = n_embd, m = bottleneck, n_adapters = 2·n_layer (Houlsby) or n_layer (Lin),
    and n_ln = 2·n_layer + 1 LayerNorms (ln1 and ln2 per block, and ln_f). Per adapter:
    W_down (m·C) + b_down (m) + W_up (C·m) + b_up (C). With biases in the LayerNorms this
    is the paper's L̂_adpt (2 d_model r + r + d_model) + 2 L̂_LN d_model.
    """
    C, m, L = model_config.n_embd, config.bottleneck, model_config.n_layer
    n_adapters = len(ADAPTER_SITES[config.adapter_type]) * L
    per_layer_norm = C * (2 if model_config.bias else 1)
    layer_norms = (2 * L + 1) * per_layer_norm if config.train_layer_norms else 0
    return n_adapters * (2 * C * m + m + C) + layer_norms


# ======================================================================================
# Files: one .safetensors, the config in its metadata
# ======================================================================================


def adapter_state_dict(model: Module, config: AdapterConfig) -> dict:
    """The trained arrays (copies): every ``adapter_*`` parameter, and every LayerNorm's
    with ``train_layer_norms``, by module path."""
    norms = {p for p, m in model.named_modules() if isinstance(m, LayerNorm)}
    out = {}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        in_adapter = ".adapter_down." in f".{name}" or ".adapter_up." in f".{name}"
        if in_adapter or (config.train_layer_norms and owner in norms):
            out[name] = p.data.copy()
    return out


def save_adapters(model: Module, path, config: AdapterConfig) -> None:
    """Write the adapters (and trained LayerNorms) to one ``.safetensors`` file, with the
    ``AdapterConfig`` in its metadata; atomically (a failed save keeps the old file)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    sites = adapter_sites(model, config)
    have = [p for p, _ in adapter_layers(model)]
    if have != sites:
        raise ValueError(
            f"save_adapters: the model's adapters are at {have}, but adapter_type="
            f"{config.adapter_type!r} puts them at {sites}: is this the config they were "
            "added with?"
        )
    path = safetensors_files.check_destination(Path(path), "save_adapters")
    tensors = {k: backend.to_numpy(v) for k, v in adapter_state_dict(model, config).items()}
    metadata = {
        "format": ADAPTERS_FORMAT,
        "format_version": ADAPTERS_FORMAT_VERSION,
        "adapter_config": json.dumps(asdict(config), sort_keys=True),
    }
    safetensors_files.atomic_write([(path, safetensors_files.serialize(tensors, metadata))])


def load_adapters(model: Module, path) -> AdapterConfig:
    """Read a file written by :func:`save_adapters` into a base model (without adapters):
    adds the adapters, copies the arrays in, freezes the rest; returns the config.

    Every key and shape is checked against the adapted model first (all problems in one
    ``ValueError``); a file that is refused leaves ``model`` untouched.
    """
    path = Path(path)
    tensors, metadata = safetensors_files.read_safetensors(path, "load_adapters")
    if metadata.get("format") != ADAPTERS_FORMAT:
        raise ValueError(
            f"load_adapters: {path} is not a minilora adapters file: metadata format="
            f"{metadata.get('format')!r}, expected {ADAPTERS_FORMAT!r}"
        )
    if metadata.get("format_version") != ADAPTERS_FORMAT_VERSION:
        raise ValueError(
            f"load_adapters: {path} has format_version={metadata.get('format_version')!r}; "
            f"this minilora reads version {ADAPTERS_FORMAT_VERSION!r}"
        )
    try:
        config = AdapterConfig(**json.loads(metadata.get("adapter_config", "")))
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapters: {path} has an invalid adapter_config: {e}") from None
    # Build the adapted model's expected shapes without touching the model: the adapters'
    # shapes follow from the wrapped layers, the LayerNorms' from the model itself.
    if adapter_layers(model):
        raise ValueError(f"load_adapters: the model already has adapters; load {path} into a base")
    expected = {}
    for site in adapter_sites(model, config):
        layer = model.get_submodule(site)
        if type(layer) is not Linear:
            raise ValueError(
                f"load_adapters: {site} is a {type(layer).__name__}, expected a plain Linear"
            )
        C, m = layer.out_features, config.bottleneck
        shapes = {"adapter_down.weight": (m, C), "adapter_down.bias": (m,)}
        shapes |= {"adapter_up.weight": (C, m), "adapter_up.bias": (C,)}
        expected |= {f"{site}.{k}": s for k, s in shapes.items()}
    if config.train_layer_norms:
        for mpath, m in model.named_modules():
            if isinstance(m, LayerNorm):
                expected |= {
                    f"{mpath}.{k}": v.shape for k, v in vars(m).items() if isinstance(v, Parameter)
                }
    problems = [f"missing key {k}" for k in sorted(set(expected) - set(tensors))]
    problems += [f"unexpected key {k}" for k in sorted(set(tensors) - set(expected))]
    problems += [
        f"{k} has shape {tuple(tensors[k].shape)}, expected {expected[k]}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != tuple(expected[k])
    ]
    if not expected:
        problems.append(f"the model has no layer that adapter_type={config.adapter_type!r} adapts")
    if problems:
        raise ValueError(
            f"load_adapters: {path} does not fit the model:\n  " + "\n  ".join(problems)
        )
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    apply_adapters(model, config)
    try:
        model.load_state_dict(tensors, strict=False)  # keys and shapes checked above
    except BaseException:  # an array that cannot be cast: put the model back as it was
        for site, layer in adapter_layers(model):
            model.set_submodule(site, layer.to_linear())
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        raise
    return config
