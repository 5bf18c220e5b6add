"""LoRA: a frozen weight plus a trainable low-rank bypass (Hu et al. 2021, arXiv 2106.09685).

    h = W0 x + s · B A x,   W0 (out, in) frozen,  A (r, in),  B (out, r),  s = lora_alpha / r

``A`` starts random and ``B`` at zero, so right after :func:`apply_lora` the model computes
exactly what the base model computed. Only ``A`` and ``B`` train. Where the savings come
from: ``W0`` has ``requires_grad=False``, so the engine never asks any op for its gradient
(``Function.needs_input_grad``) and the ``dW0 = gᵀ x`` matmul is never computed; the
optimizer keeps no state for it either. The fused ``functional.lora_linear`` adds no saving
of its own; it keeps the layer's forward and backward on one page, and saves one small
temporary, the low-rank code ``u = x Aᵀ`` (N, r), for ``dB``. For serving,
:meth:`LoRALinear.merge` folds the update into the weight, ``W = W0 + s·B·A``, so inference
costs one matmul, as before.

Names follow PEFT (``LoraConfig``, ``lora_A``, ``lora_B``, ``target_modules``,
``merge_and_unload``, ``print_trainable_parameters``) and loralib
(``mark_only_lora_as_trainable``, ``lora_state_dict``). The math, derivations and choices
are in docs/math.md.

This module is plain LoRA only. LoRA's variants (minilora/variants/: DoRA, PiSSA, embedding
LoRA, rank and alpha patterns) plug in through the few named registries below, which they
fill when imported (``import minilora`` imports them), the way minilora/fast/ fills
``backend.FAST_OPS``: a config check, a filter and per-module settings for targets, a
check of the chosen targets, a named init, and the function that wraps each kind of base
layer. A variant never adds a branch here; it subclasses ``LoRALinear`` or wraps a layer.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass, field, fields

from minilora import backend
from minilora import functional as F
from minilora.autograd import Tensor, is_grad_enabled
from minilora.model import check_positive_int
from minilora.nn import Linear, Module, Parameter

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("gaussian", "kaiming")  # the book's own inits; variants add to LORA_INITS

# --------------------------------------------------------------------------------------
# Extension points: filled by minilora/variants/ when imported (plain LoRA leaves them empty)
# --------------------------------------------------------------------------------------
CONFIG_CHECKS = []  # check(config): ValueError for a field a variant reads (use_dora, patterns)
TARGET_FILTERS = []  # keep(config, path) -> bool: may leave a target out (layers_to_transform)
MODULE_SETTINGS = []  # settings(config, path) -> that module's config (rank_pattern, alpha_pattern)
TARGET_CHECKS = []  # problems(model, paths, config) -> list[str], before any change (embeddings)
LORA_INITS = {}  # init_lora_weights name -> init(layer), after A and B are drawn (PiSSA)
LORA_LAYERS = {}  # base class -> wrap(base, config, generator) -> adapted layer (Linear below;
#                   the variants add Embedding and replace Linear's to build DoRA layers)
MODEL_EDITS = []  # edit(model, config): after the LoRA layers are in, before freezing (tokens)
ADAPTER_PARAMETERS = set()  # leaf names of adapter parameters not named lora_* (tokens' delta)
OTHER_LAYERS = []  # adapter layers that are not LoRA layers (trainable tokens, VeRA), merged,
#                    unmerged, unloaded and disabled with them (:func:`adapter_layers`)


@dataclass
class LoRAConfig:
    """LoRA settings, with PEFT's field names (``peft.LoraConfig``)."""

    r: int = 8  # rank of the update B·A
    lora_alpha: float = 8  # scaling s = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the bypass input only, training only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"  # which biases train: "none", "all", or "lora_only" (adapted layers)
    use_rslora: bool = False  # rank-stabilised scaling lora_alpha / sqrt(r)
    init_lora_weights: str = "gaussian"  # A ~ N(0, 1/r²) (PEFT's "gaussian"), "kaiming", "pissa"
    use_dora: bool = False  # DoRA (minilora/variants/dora.py): a trainable magnitude per row
    lora_bias: bool = False  # a trainable bias on lora_B (minilora/variants/lora_bias.py)
    # per-module overrides, matched as PEFT matches them (see minilora/variants/patterns.py)
    rank_pattern: dict = field(default_factory=dict)  # {module pattern: r}
    alpha_pattern: dict = field(default_factory=dict)  # {module pattern: lora_alpha}
    layers_to_transform: int | list[int] | None = None  # adapt targets in these layers only
    layers_pattern: str | list[str] | None = None  # the layer list's name, e.g. "blocks"
    # modules trained in full and saved with the adapter (a head, a LayerNorm), named as
    # targets are; a weight one of them shares with another module is copied (untied) first
    modules_to_save: list[str] | None = None
    # rows of the token embedding trained in full (minilora/variants/trainable_tokens.py):
    # [ids] for tok_emb, or {embedding name: [ids]}
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self):
        if self.init_lora_weights is True:  # PEFT's default spelling of the kaiming init
            self.init_lora_weights = "kaiming"
        # NumPy scalars (r=numpy.int64(4), from an array or a sweep) are plain numbers here,
        # so that checks, arithmetic and json.dumps treat them like int and float
        # (bools stay bools, to be refused below)
        if isinstance(self.r, numbers.Integral) and not isinstance(self.r, bool):
            self.r = int(self.r)
        if not isinstance(self.lora_alpha, bool):
            if isinstance(self.lora_alpha, numbers.Integral):
                self.lora_alpha = int(self.lora_alpha)
            elif isinstance(self.lora_alpha, numbers.Real):
                self.lora_alpha = float(self.lora_alpha)
        check_lora_settings(
            "LoRAConfig", self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights
        )
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(
                f"LoRAConfig: target_modules={self.target_modules!r} must be a non-empty list of "
                "module names such as ['q_proj', 'v_proj']"
            )
        check_bias_mode(self.bias, "LoRAConfig")
        saved = self.modules_to_save
        if saved is not None and not (
            isinstance(saved, list) and all(isinstance(t, str) and t for t in saved)
        ):
            raise ValueError(
                f"LoRAConfig: modules_to_save={saved!r} must be None or a list of module names "
                "such as ['lm_head']"
            )
        for check in CONFIG_CHECKS:
            check(self)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def adapts(self, path: str) -> bool:
        """True when the module at ``path`` is a target (:func:`is_target`) that every
        filter in ``TARGET_FILTERS`` keeps (``layers_to_transform``)."""
        return is_target(self.target_modules, path) and all(
            keep(self, path) for keep in TARGET_FILTERS
        )

    def for_module(self, path: str) -> LoRAConfig:
        """This config as the module at ``path`` gets it: each of ``MODULE_SETTINGS`` in
        turn may change it (``rank_pattern`` and ``alpha_pattern`` give its r, lora_alpha)."""
        config = self
        for settings in MODULE_SETTINGS:
            config = settings(config, path)
        return config

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LoraConfig = LoRAConfig  # PEFT's spelling


def is_target(target_modules, path: str) -> bool:
    """PEFT's rule for a list of targets: a module is adapted when its path is one of them
    or ends with ``"." + target``, so a leaf name (``"q_proj"``), a suffix
    (``"attn.q_proj"``) and a full path (``"blocks.0.attn.q_proj"``) all work."""
    return any(path == t or path.endswith("." + t) for t in target_modules)


def check_lora_settings(owner: str, r, lora_alpha, lora_dropout, init_lora_weights) -> None:
    """Refuse settings that would give a NaN, infinite or meaningless adapter."""

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    check_positive_int(owner, "r", r)
    if not number(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"{owner}: lora_alpha={lora_alpha!r} must be a finite positive number")
    F.check_probability(owner, "lora_dropout", lora_dropout)
    modes = INIT_MODES + tuple(LORA_INITS)
    if init_lora_weights not in modes:
        raise ValueError(f"{owner}: init_lora_weights={init_lora_weights!r} must be one of {modes}")


def check_rank(r, weight_shape: tuple, where: str) -> None:
    """Refuse a rank that is not an integer in [1, min(out, in)]: B·A, of shape (out, in),
    cannot have a larger rank."""
    out_f, in_f = weight_shape
    about = f"r={r!r} for {where} (weight shape ({out_f}, {in_f}) = (out, in))"
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(
            f"{about} is not a positive integer; r must be an integer in [1, {min(out_f, in_f)}]"
        )
    if r > min(out_f, in_f):
        raise ValueError(
            f"{about} is larger than min(out, in) = {min(out_f, in_f)}; the rank of B·A cannot "
            "exceed it"
        )


def check_bias_mode(bias, owner: str = "bias") -> None:
    """Refuse a bias mode other than "none", "all" or "lora_only"."""
    if bias not in BIAS_MODES:
        raise ValueError(f"{owner}: bias={bias!r} must be one of {BIAS_MODES}")


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = α / r, or α / √r with rsLoRA: keeps the update's size stable as r changes."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALayer:
    """What every adapted layer is (PEFT's ``LoraLayer``): a base layer plus an adapter, with
    ``r``, ``lora_alpha``, ``scaling``, ``merged`` and ``disable_adapters``, and the methods
    ``get_delta_weight()``, ``merged_weight(safe_merge)``, ``merge()``, ``unmerge()`` and
    ``get_base_layer()``. The model-level helpers below work on any of them:
    ``LoRALinear`` here, ``LoRAEmbedding`` in minilora/variants/embedding.py."""


class LoRALinear(Linear, LoRALayer):
    """A ``Linear`` with a LoRA bypass: ``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ``.

    Keeps ``weight`` and ``bias`` under their usual names (a base checkpoint still loads)
    and adds ``lora_A`` (r, in_features) and ``lora_B`` (out_features, r).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: str = "gaussian",
        dtype=backend.DEFAULT_DTYPE,
        device: str = "cpu",
        generator=None,
    ):
        super().__init__(
            in_features, out_features, bias, dtype=dtype, device=device, generator=generator
        )
        # checked before any random draw, so a refused layer leaves the generator alone
        check_lora_settings(type(self).__name__, r, lora_alpha, lora_dropout, init_lora_weights)
        check_rank(r, self.weight.shape, f"this {type(self).__name__}")  # (from_linear allows more)
        self.update_layer(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator)

    @classmethod
    def from_linear(cls, linear: Linear, config: LoRAConfig, generator=None) -> LoRALinear:
        """Wrap an existing ``Linear``: the same weight and bias objects, plus the adapter.

        ``config.r`` may exceed min(out, in), as PEFT allows (a loaded adapter may): the
        extra rank adds parameters, not expressiveness. ``apply_lora`` refuses it for a
        new adapter."""
        layer = cls.__new__(cls)
        vars(layer).update(vars(linear))  # shares weight/bias (no copy), keeps training mode
        layer.update_layer(
            config.r,
            config.lora_alpha,
            config.lora_dropout,
            config.use_rslora,
            config.init_lora_weights,
            generator,
        )
        return layer

    def update_layer(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator):
        """Add the adapter (PEFT's name; settings already checked by the caller): A and B
        (:meth:`_init_lora`), then the init a variant registered under this name in
        ``LORA_INITS``, if any (PiSSA). A subclass adds its own parameters after it (DoRA)."""
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator)
        if init_lora_weights in LORA_INITS:
            LORA_INITS[init_lora_weights](self)

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator):
        """Add A and B, and the bypass dropout's generator."""
        out_f, in_f = self.weight.shape
        gen = generator or backend.default_generator()
        dtype, device = self.weight.dtype, self.weight.device
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout = lora_dropout
        if init_lora_weights == "gaussian":  # PEFT's "gaussian": N(0, (1/r)²)
            A = gen.normal((r, in_f), std=1.0 / r, dtype=dtype, device=device)
        else:  # kaiming_uniform(a=√5) as loralib/PEFT: U(-1/√in, 1/√in) (a variant's init follows)
            bound = 1.0 / math.sqrt(in_f)
            A = gen.uniform((r, in_f), -bound, bound, dtype=dtype, device=device)
        self.lora_A = Parameter(A)  # (r, in)
        self.lora_B = Parameter(backend.zeros((out_f, r), dtype, device))  # (out, r): zero
        # The bypass dropout draws from its own generator so that adding LoRA does not shift
        # the random stream the base model's dropouts draw from (zero-init stays bitwise).
        self.lora_generator = backend.Generator(int(gen.integers(0, 2**31 - 1, ()).item()))
        self.merged = False
        self.disable_adapters = False

    def forward(self, x: Tensor) -> Tensor:
        """h = W x + b + s · B A d, with d = dropout(x) (x itself when there is no dropout):
        one fused op, ``functional.lora_linear``. Merged or disabled: h = W x + b."""
        if self.merged or self.disable_adapters:
            return self.base_forward(x)
        return F.lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.lora_input(x)
        )

    def base_forward(self, x: Tensor) -> Tensor:
        """W x + b alone: the adapter disabled, or merged into W."""
        if self.merged:
            # Inference (eval mode, or no_grad) on merged weights is what merging is for.
            # A training-mode forward that records gradients would train nothing: the
            # gradient cannot reach lora_A/lora_B through the merged weight.
            adapters_train = self.lora_A.requires_grad or self.lora_B.requires_grad
            if self.training and adapters_train and is_grad_enabled():
                raise RuntimeError(
                    "this LoRALinear is merged (its weight already contains s·B·A), so a "
                    "gradient would not reach lora_A/lora_B; call unmerge() before training, "
                    "or call eval() (or use no_grad()) for inference"
                )
        return F.linear(x, self.weight, self.bias)

    def lora_input(self, x: Tensor) -> Tensor | None:
        """The bypass input d: ``dropout(x)`` when training with ``lora_dropout`` > 0, else
        None, which the fused op reads as x itself (no copy, one gradient for x)."""
        if self.lora_dropout > 0 and self.training:
            return F.dropout(x, self.lora_dropout, True, self.lora_generator)
        return None

    def get_delta_weight(self):
        """ΔW = s · B @ A, shape (out, in): what merging adds to the weight."""
        return self.scaling * backend.matmul(self.lora_B.data, self.lora_A.data, "lora.merge")

    def merge(self, safe_merge: bool = True) -> None:
        """Fold the adapter into the weight: W ← W + s·B·A. Warns and does nothing if merged.

        With ``safe_merge`` (default) a result with NaN or inf is refused and W is unchanged.
        """
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing was done", stacklevel=2)
            return
        self._set_merged(self.merged_weight(safe_merge))

    def merged_weight(self, safe_merge: bool = True):
        """W + s·B·A as a new array, refused (ValueError) if ``safe_merge`` and not finite."""
        merged = self.weight.data + self.get_delta_weight()
        return check_merged(merged, safe_merge, "W + s·B·A")

    def _set_merged(self, merged) -> None:
        self.weight.data[...] = merged  # in place: optimizers keep their references
        self.merged = True

    def unmerge(self) -> None:
        """Take the adapter back out: W ← W - s·B·A. Warns and does nothing if not merged."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing was done", stacklevel=2)
            return
        self.weight.data -= self.get_delta_weight()
        self.merged = False

    def get_base_layer(self) -> Linear:
        """A plain ``Linear`` with the current weight (merge first to keep the adapter)."""
        linear = Linear.__new__(Linear)
        kept = ("in_features", "out_features", "weight", "bias", "training")
        vars(linear).update({k: v for k, v in vars(self).items() if k in kept})
        return linear

    def extra_repr(self) -> str:
        lora = f"r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"
        return f"{super().extra_repr()}, {lora}"


LORA_LAYERS[Linear] = LoRALinear.from_linear  # the book's own entry: a Linear gets a LoRALinear


def check_merged(merged, safe_merge: bool, formula: str):
    """``merged`` itself, or a ValueError when ``safe_merge`` and it holds NaN or inf (the
    adapter has diverged; the caller has not written it yet). ``formula``: what it is."""
    xp = backend.get_array_module(merged)
    if safe_merge and not bool(xp.isfinite(merged).all()):
        raise ValueError(
            f"merge refused: {formula} contains NaN or inf (the adapter has diverged); the "
            "weight was left unchanged"
        )
    return merged


# ======================================================================================
# Model-level helpers
# ======================================================================================


def lora_layers(model: Module):
    """(path, layer) for every ``LoRALinear`` in ``model``."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapted_layers(model: Module):
    """(path, layer) for every adapted layer (:class:`LoRALayer`) in ``model``: the
    ``LoRALinear`` layers and the variants' (``LoRAEmbedding``)."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALayer)]


def adapter_layers(model: Module):
    """(path, layer) for every layer that merging, unloading and disabling act on: the
    adapted layers and the variants' other adapter layers (``OTHER_LAYERS``)."""
    kinds = (LoRALayer, *OTHER_LAYERS)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]


def adaptable_layers(model: Module):
    """(path, layer) for every layer of a kind ``LORA_LAYERS`` can wrap (a plain ``Linear``;
    an ``Embedding`` with the variants): what LoRA can target."""
    return [(p, m) for p, m in model.named_modules() if type(m) in LORA_LAYERS and p]


def target_problems(model: Module, paths, config: LoRAConfig) -> list[str]:
    """What the variants' ``TARGET_CHECKS`` find wrong with adapting ``paths`` (an empty
    list when nothing is), e.g. DoRA asked of an embedding."""
    return [problem for check in TARGET_CHECKS for problem in check(model, paths, config)]


def apply_lora(model: Module, config: LoRAConfig, generator=None) -> list[str]:
    """Replace every ``Linear`` that ``config.target_modules`` names (a leaf name, a
    suffix or a full path, see :func:`is_target`) by a ``LoRALinear`` wrapping it (or the
    layer ``LORA_LAYERS`` builds for it: an ``Embedding``'s, DoRA's), inside
    ``config.layers_to_transform`` and with the rank and alpha of
    ``config.rank_pattern``/``alpha_pattern``, then freeze all but the adapters (and
    biases per ``config.bias``). Returns the replaced module paths.

    Raises ``ValueError``, changing nothing, when a target matches nothing (listing the
    available names), or when a target already has a LoRA layer (minilora keeps one
    adapter per layer). A rank above a layer's min(out, in) is built with a warning, as
    PEFT builds it (refused for PiSSA, whose SVD has no more directions).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    adapted = [p for p, _ in adapted_layers(model) if config.adapts(p)]
    if adapted:
        raise ValueError(
            f"apply_lora: {adapted} already have LoRA layers and minilora keeps one adapter "
            "per layer; nothing was changed. To train a new adapter on top of this one, "
            "call minilora.merge_and_unload(model) first"
        )
    linears = adaptable_layers(model)
    unmatched = [t for t in config.target_modules if not any(is_target([t], p) for p, _ in linears)]
    if unmatched:
        available = sorted({path.rsplit(".", 1)[-1] for path, _ in linears})
        raise ValueError(
            f"target_modules {unmatched} match no Linear or Embedding layer in the model; "
            f"available names: {available}"
        )
    chosen = [(p, m) for p, m in linears if config.adapts(p)]
    if not chosen:
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform!r} (layers_pattern="
            f"{config.layers_pattern!r}) leaves none of {config.target_modules} to adapt"
        )
    above = [p for p, m in chosen if config.for_module(p).r > min(m.weight.shape)]
    if above and config.init_lora_weights == "pissa":  # the SVD has min(out, in) directions
        path, m = next((p, m) for p, m in chosen if p in above)
        check_rank(config.for_module(path).r, m.weight.shape, path)
    if above:  # PEFT builds them too: a loaded adapter may have such a rank
        warnings.warn(
            f"apply_lora: the rank of {above} is above min(out, in) of their weights: B·A "
            "cannot have a larger rank, so the extra rank adds parameters, not expressiveness",
            stacklevel=2,
        )
    problems = target_problems(model, [p for p, _ in chosen], config)
    if problems:
        raise ValueError(f"apply_lora: {problems[0]}; nothing was changed")
    return add_lora_layers(model, [p for p, _ in chosen], config, generator)


def add_lora_layers(model: Module, paths: list[str], config: LoRAConfig, generator=None):
    """Wrap the ``Linear`` at each path in a ``LoRALinear`` (any layer in what
    ``LORA_LAYERS`` builds for its kind), with the path's rank and alpha, and mark only the
    adapters (and biases per ``config.bias``) trainable; no checks (:func:`apply_lora`
    checks first, ``load_adapter`` checks against the file). Returns ``paths``."""
    for path in paths:
        base, own = model.get_submodule(path), config.for_module(path)
        wrap = LORA_LAYERS[type(base)]  # LoRALinear.from_linear for a Linear
        model.set_submodule(path, wrap(base, own, generator))
    saved = [
        p for p, _ in model.named_modules() if p and is_target(config.modules_to_save or [], p)
    ]
    untie(model, saved)
    for edit in MODEL_EDITS:  # trainable tokens wrap their embedding (and a tied head)
        edit(model, config)
    mark_only_lora_as_trainable(model, config.bias)
    for path in saved:  # trained in full (PEFT's modules_to_save)
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)
    return paths


def untie(model: Module, paths) -> None:
    """Give each module at ``paths`` whose weight another module shares (GPT-2's tied head
    and embedding) a copy of its own, as PEFT's ``modules_to_save`` copies the module: it
    then trains and is saved alone, and the other use keeps the original. A config that
    says the model is tied (``tie_word_embeddings``) then says it is not."""
    for path in tied_layers(model, paths):
        module = model.get_submodule(path)
        module.weight = Parameter(module.weight.data.copy())
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False


def mark_only_lora_as_trainable(model: Module, bias: str = "none") -> None:
    """Freeze everything but ``lora_A``/``lora_B``; ``bias`` says which biases also train:
    ``"none"``, ``"all"`` biases, or ``"lora_only"`` (biases of adapted layers)."""
    check_bias_mode(bias, "mark_only_lora_as_trainable")
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_parameter(name))
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)


def is_lora_parameter(name: str) -> bool:
    """True for an adapter's parameter: PEFT names them ``lora_*`` (``lora_A``, ``lora_B``,
    and the variants' ``lora_embedding_A``, ``lora_magnitude_vector``, ...), or one of
    ``ADAPTER_PARAMETERS`` (the trainable tokens' ``trainable_tokens_delta``)."""
    leaf = name.rsplit(".", 1)[-1]
    return "lora_" in leaf or leaf in ADAPTER_PARAMETERS


def lora_state_dict(model: Module, bias: str = "none") -> dict:
    """The adapter's arrays (copies): every ``lora_*`` parameter (:func:`is_lora_parameter`),
    plus biases per ``bias``."""
    check_bias_mode(bias, "lora_state_dict")
    lora_paths = {path for path, _ in lora_layers(model)}
    out = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = name.rpartition(".")[0]
        if is_lora_parameter(name) or (
            leaf == "bias" and (bias == "all" or (bias == "lora_only" and owner in lora_paths))
        ):
            out[name] = p.data.copy()
    return out


def tied_layers(model: Module, paths) -> dict[str, list[str]]:
    """{path: the other modules that use its weight} for the ``paths`` whose weight is one
    ``Parameter`` with another module's (GPT-2's ``tie_word_embeddings``: ``lm_head`` and
    ``tok_emb``)."""
    owners = {}
    for path, m in model.named_modules():
        w = vars(m).get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append(path)
    tied = {}
    for path in paths:
        w = vars(model.get_submodule(path)).get("weight")
        others = [p for p in owners.get(id(w), []) if p != path]
        if others:
            tied[path] = others
    return tied


def check_untied(model: Module, paths, caller: str) -> None:
    """Refuse (ValueError) to merge an adapter on one of ``paths`` whose weight another
    layer shares (:func:`tied_layers`): merged, the update would reach both uses."""
    tied = tied_layers(model, paths)
    if tied:
        shares = "; ".join(f"{p} shares its weight with {', '.join(o)}" for p, o in tied.items())
        raise ValueError(
            f"{caller}: {shares} (tie_word_embeddings), so merging its adapter would change "
            "both and move the logits; nothing was merged. Keep this adapter unmerged (the "
            "adapted model computes the right logits) or adapt layers that are not tied"
        )


def merge_lora(model: Module, safe_merge: bool = True) -> None:
    """Merge every unmerged adapter into its weight (see :meth:`LoRALinear.merge`).

    All or nothing: every merged weight is computed and checked before any is written. An
    adapter on a weight another layer shares (a tied head or embedding) is refused before
    anything changes: merged, it would change both uses, so the merged model would not
    compute what the adapted one does (PEFT merges it anyway, with a warning).
    """
    pending = [(path, layer) for path, layer in adapter_layers(model) if not layer.merged]
    # a merge changes every use of a tied weight, unless the layer says it writes what every
    # use computes with (``merge_keeps_ties``: trainable tokens' rows)
    moved = [p for p, layer in pending if not getattr(layer, "merge_keeps_ties", False)]
    check_untied(model, moved, "merge_lora")
    layers = [layer for _, layer in pending]
    merged = [layer.merged_weight(safe_merge) for layer in layers]
    for layer, weight in zip(layers, merged, strict=True):
        layer._set_merged(weight)


def unmerge_lora(model: Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: Module, safe_merge: bool = True) -> Module:
    """Merge every adapter and put plain ``Linear`` layers back (in place; returns model).

    The result is an ordinary GPT: same outputs as the adapted model, no LoRA parameters.
    """
    merge_lora(model, safe_merge)
    for path, layer in adapter_layers(model):
        model.set_submodule(path, layer.get_base_layer())
    return model


@contextlib.contextmanager
def disable_adapters(model: Module):
    """Run the base model: inside the block every adapter is bypassed (PEFT's
    ``disable_adapter``). Merged layers cannot be disabled; unmerge them first."""
    layers = [layer for _, layer in adapter_layers(model)]
    merged = [path for path, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"cannot disable adapters that are merged: {merged}; unmerge first")
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for layer, prev in zip(layers, previous, strict=True):
            layer.disable_adapters = prev


def count_parameters(model: Module) -> tuple[int, int]:
    """``(trainable, all)`` parameters of a model; shared parameters count once and
    adapters are included in "all" (as PEFT's ``get_nb_trainable_parameters``)."""
    params = model.parameters()
    return sum(p.size for p in params if p.requires_grad), sum(p.size for p in params)


def print_trainable_parameters(model: Module) -> None:
    """Print PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
