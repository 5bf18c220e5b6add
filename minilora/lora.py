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
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass, field, fields, replace

from minilora import backend
from minilora import functional as F
from minilora.autograd import Tensor, is_grad_enabled
from minilora.model import check_positive_int
from minilora.nn import Embedding, Linear, Module, Parameter
from minilora.variants import patterns, pissa
from minilora.variants.embedding import LoRAEmbedding

BIAS_MODES = ("none", "all", "lora_only")
LORA_LEAVES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
INIT_MODES = ("gaussian", "kaiming", "pissa")


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
    use_dora: bool = False  # DoRA: a trainable magnitude per output row (docs/math.md#dora)
    # per-module overrides, matched as PEFT matches them (see minilora/variants/patterns.py)
    rank_pattern: dict = field(default_factory=dict)  # {module pattern: r}
    alpha_pattern: dict = field(default_factory=dict)  # {module pattern: lora_alpha}
    layers_to_transform: int | list[int] | None = None  # adapt targets in these layers only
    layers_pattern: str | list[str] | None = None  # the layer list's name, e.g. "blocks"

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
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoRAConfig: use_dora={self.use_dora!r} must be True or False")
        patterns.check_patterns(
            "LoRAConfig",
            self.rank_pattern,
            self.alpha_pattern,
            self.layers_to_transform,
            self.layers_pattern,
        )

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def adapts(self, path: str) -> bool:
        """True when the module at ``path`` is a target inside ``layers_to_transform``; as
        in PEFT, a target that is the full path is adapted whatever the layers say."""
        if path in self.target_modules:
            return True
        return is_target(self.target_modules, path) and patterns.in_layers(
            path, self.layers_to_transform, self.layers_pattern
        )

    def for_module(self, path: str) -> LoRAConfig:
        """This config with the ``r`` and ``lora_alpha`` that the patterns give ``path``."""
        r = patterns.pattern_value(self.rank_pattern, path, self.r)
        alpha = patterns.pattern_value(self.alpha_pattern, path, self.lora_alpha)
        return replace(self, r=r, lora_alpha=alpha)

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
    if init_lora_weights not in INIT_MODES:
        raise ValueError(
            f"{owner}: init_lora_weights={init_lora_weights!r} must be one of {INIT_MODES}"
        )


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


class LoRALinear(Linear):
    """A ``Linear`` with a LoRA bypass: ``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ``.

    Keeps ``weight`` and ``bias`` under their usual names (a base checkpoint still loads)
    and adds ``lora_A`` (r, in_features) and ``lora_B`` (out_features, r); with DoRA also
    ``lora_magnitude_vector`` (out_features,).
    """

    use_dora = False  # DoRA: a trainable magnitude per output row (set by _init_variants)
    merged_norm = None  # DoRA: the norm at merge time, which unmerge divides back out

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
        use_dora: bool = False,
        dtype=backend.DEFAULT_DTYPE,
        device: str = "cpu",
        generator=None,
    ):
        super().__init__(
            in_features, out_features, bias, dtype=dtype, device=device, generator=generator
        )
        # checked before any random draw, so a refused layer leaves the generator alone
        check_lora_settings("LoRALinear", r, lora_alpha, lora_dropout, init_lora_weights)
        check_rank(r, self.weight.shape, "this LoRALinear")  # (from_linear allows more)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator)
        self._init_variants(init_lora_weights, use_dora)

    @classmethod
    def from_linear(cls, linear: Linear, config: LoRAConfig, generator=None) -> LoRALinear:
        """Wrap an existing ``Linear``: the same weight and bias objects, plus the adapter.

        ``config.r`` may exceed min(out, in), as PEFT allows (a loaded adapter may): the
        extra rank adds parameters, not expressiveness. ``apply_lora`` refuses it for a
        new adapter."""
        layer = cls.__new__(cls)
        vars(layer).update(vars(linear))  # shares weight/bias (no copy), keeps training mode
        layer._init_lora(
            config.r,
            config.lora_alpha,
            config.lora_dropout,
            config.use_rslora,
            config.init_lora_weights,
            generator,
        )
        layer._init_variants(config.init_lora_weights, config.use_dora)
        return layer

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, generator):
        """Add the adapter (settings already checked by the caller)."""
        out_f, in_f = self.weight.shape
        gen = generator or backend.default_generator()
        dtype, device = self.weight.dtype, self.weight.device
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout = lora_dropout
        if init_lora_weights == "gaussian":  # PEFT's "gaussian": N(0, (1/r)²)
            A = gen.normal((r, in_f), std=1.0 / r, dtype=dtype, device=device)
        else:  # kaiming_uniform(a=√5) as loralib/PEFT: U(-1/√in, 1/√in) ("pissa": replaced)
            bound = 1.0 / math.sqrt(in_f)
            A = gen.uniform((r, in_f), -bound, bound, dtype=dtype, device=device)
        self.lora_A = Parameter(A)  # (r, in)
        self.lora_B = Parameter(backend.zeros((out_f, r), dtype, device))  # (out, r): zero
        # The bypass dropout draws from its own generator so that adding LoRA does not shift
        # the random stream the base model's dropouts draw from (zero-init stays bitwise).
        self.lora_generator = backend.Generator(int(gen.integers(0, 2**31 - 1, ()).item()))
        self.merged = False
        self.disable_adapters = False

    def _init_variants(self, init_lora_weights: str, use_dora: bool) -> None:
        """PiSSA's init and DoRA's magnitude, after :meth:`_init_lora` (docs/math.md#pissa,
        docs/math.md#dora)."""
        # PiSSA's layer holds the residual as its weight, not the base's W0
        self.residual_base = init_lora_weights == "pissa"
        if init_lora_weights == "pissa":  # A, B from W's top-r SVD; W becomes the residual
            A, B, residual = pissa.pissa_init(self.weight.data, self.r, self.scaling)
            self.lora_A.data, self.lora_B.data = A, B
            # a new array, not W0 edited in place: a weight tied elsewhere keeps W0
            self.weight = Parameter(residual, requires_grad=self.weight.requires_grad)
        self.use_dora = use_dora
        if use_dora:  # m = ‖W0 + s·B·A‖ per output row, so that at init m / ‖·‖ = 1
            w, A, B = self.weight.data, self.lora_A.data, self.lora_B.data
            self.lora_magnitude_vector = Parameter(F.dora_weight_norm(w, A, B, self.scaling))

    def forward(self, x: Tensor) -> Tensor:
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
        if self.disable_adapters:
            return F.linear(x, self.weight, self.bias)
        x_lora = None
        if self.lora_dropout > 0 and self.training:
            x_lora = F.dropout(x, self.lora_dropout, True, self.lora_generator)
        if self.use_dora:
            return F.dora_linear(
                x,
                self.weight,
                self.bias,
                self.lora_A,
                self.lora_B,
                self.lora_magnitude_vector,
                self.scaling,
                x_lora,
            )
        return F.lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, x_lora
        )

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
        """W + s·B·A as a new array, refused (ValueError) if ``safe_merge`` and not finite;
        with DoRA, m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (per output row)."""
        merged = self.weight.data + self.get_delta_weight()
        if self.use_dora:
            norm = F.dora_weight_norm(
                self.weight.data, self.lora_A.data, self.lora_B.data, self.scaling
            )
            merged *= (self.lora_magnitude_vector.data / norm)[:, None]
        xp = backend.get_array_module(merged)
        if safe_merge and not bool(xp.isfinite(merged).all()):
            raise ValueError(
                "merge refused: W + s·B·A contains NaN or inf (the adapter has diverged); the "
                "weight was left unchanged"
            )
        return merged

    def _set_merged(self, merged) -> None:
        if self.use_dora:  # kept for unmerge, as PEFT keeps it: W0 cannot be read back otherwise
            self.merged_norm = F.dora_weight_norm(
                self.weight.data, self.lora_A.data, self.lora_B.data, self.scaling
            )
        self.weight.data[...] = merged  # in place: optimizers keep their references
        self.merged = True

    def unmerge(self) -> None:
        """Take the adapter back out: W ← W - s·B·A. Warns and does nothing if not merged."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing was done", stacklevel=2)
            return
        if self.use_dora:  # W = (m / n) ⊙ (W0 + s·B·A)  =>  W0 = W ⊙ (n / m) - s·B·A
            self.weight.data *= (self.merged_norm / self.lora_magnitude_vector.data)[:, None]
            self.merged_norm = None
        self.weight.data -= self.get_delta_weight()
        self.merged = False

    def to_linear(self) -> Linear:
        """A plain ``Linear`` with the current weight (merge first to keep the adapter)."""
        linear = Linear.__new__(Linear)
        kept = ("in_features", "out_features", "weight", "bias", "training")
        vars(linear).update({k: v for k, v in vars(self).items() if k in kept})
        return linear

    def extra_repr(self) -> str:
        lora = f"r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"
        return f"{super().extra_repr()}, {lora}"


# ======================================================================================
# Model-level helpers
# ======================================================================================


def lora_layers(model: Module):
    """(path, layer) for every ``LoRALinear`` in ``model``."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapted_layers(model: Module):
    """(path, layer) for every ``LoRALinear`` and ``LoRAEmbedding`` in ``model``."""
    kinds = (LoRALinear, LoRAEmbedding)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]


def vera_paths(model: Module) -> list[str]:
    """The paths of the VeRA layers (:mod:`minilora.variants.vera`, which builds on this module),
    found by their trainable vectors ``vera_lambda_d``/``vera_lambda_b``."""
    names = [n for n, _ in model.named_parameters() if ".vera_lambda_" in n]
    return sorted({n.rpartition(".")[0] for n in names})


def tied_embeddings(model: Module, paths) -> list[str]:
    """The embeddings among ``paths`` whose table another layer also uses (GPT's
    ``tie_word_embeddings``): an adapter on them would be merged into that layer too, so
    merged and unmerged models would differ. LoRA refuses them."""
    owners = {}
    for path, m in model.named_modules():
        w = vars(m).get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append(path)
    chosen = [p for p in paths if isinstance(model.get_submodule(p), Embedding)]
    return [p for p in chosen if len(owners[id(model.get_submodule(p).weight)]) > 1]


def embedding_variant_problems(model: Module, paths, config: LoRAConfig) -> list[str]:
    """DoRA and PiSSA are implemented for ``LoRALinear`` only: an embedding among ``paths``
    with ``use_dora`` or ``init_lora_weights="pissa"`` is a problem (for the config's own
    rank and alpha there: :meth:`LoRAConfig.for_module`)."""
    if not (config.use_dora or config.init_lora_weights == "pissa"):
        return []
    chosen = [p for p in paths if isinstance(model.get_submodule(p), Embedding)]
    if not chosen:
        return []
    return [
        f"{chosen} are embeddings, and minilora implements use_dora={config.use_dora!r} and "
        f"init_lora_weights={config.init_lora_weights!r} for Linear layers only; adapt the "
        "embeddings with plain LoRA (use_dora=False, init 'gaussian' or 'kaiming')"
    ]


def adaptable_layers(model: Module):
    """(path, layer) for every plain ``Linear`` and ``Embedding``: what LoRA can target."""
    return [(p, m) for p, m in model.named_modules() if type(m) in (Linear, Embedding) and p]


def apply_lora(model: Module, config: LoRAConfig, generator=None) -> list[str]:
    """Replace every ``Linear`` that ``config.target_modules`` names (a leaf name, a
    suffix or a full path, see :func:`is_target`) by a ``LoRALinear`` wrapping it (an
    ``Embedding`` by a ``LoRAEmbedding``), inside ``config.layers_to_transform`` and with
    the rank and alpha of ``config.rank_pattern``/``alpha_pattern``, then freeze all but
    the adapters (and biases per ``config.bias``). Returns the replaced module paths.

    Raises ``ValueError``, changing nothing, when a target matches nothing (listing the
    available names), when a rank exceeds a layer's min(out, in), or when a target
    already has a LoRA layer (minilora keeps one adapter per layer).
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
    for path, m in chosen:  # check every rank first, so a bad config changes nothing
        check_rank(config.for_module(path).r, m.weight.shape, path)
    problems = embedding_variant_problems(model, [p for p, _ in chosen], config)
    if problems:
        raise ValueError(f"apply_lora: {problems[0]}; nothing was changed")
    tied = tied_embeddings(model, [p for p, _ in chosen])
    if tied:
        raise ValueError(
            f"apply_lora: {tied} share their weight with another layer (tie_word_embeddings); "
            "an embedding adapter there would also be merged into that layer. Nothing was changed"
        )
    return add_lora_layers(model, [p for p, _ in chosen], config, generator)


def add_lora_layers(model: Module, paths: list[str], config: LoRAConfig, generator=None):
    """Wrap the ``Linear`` at each path in a ``LoRALinear`` (an ``Embedding`` in a
    ``LoRAEmbedding``), with the path's rank and alpha, and mark only the adapters (and
    biases per ``config.bias``) trainable; no checks (:func:`apply_lora` checks first,
    ``load_adapter`` checks against the file). Returns ``paths``."""
    for path in paths:
        base, own = model.get_submodule(path), config.for_module(path)
        if isinstance(base, Embedding):
            layer = LoRAEmbedding.from_embedding(
                base, own.r, own.lora_alpha, own.use_rslora, own.scaling, generator
            )
        else:
            layer = LoRALinear.from_linear(base, own, generator)
        model.set_submodule(path, layer)
    mark_only_lora_as_trainable(model, config.bias)
    return paths


def mark_only_lora_as_trainable(model: Module, bias: str = "none") -> None:
    """Freeze everything but ``lora_A``/``lora_B``; ``bias`` says which biases also train:
    ``"none"``, ``"all"`` biases, or ``"lora_only"`` (biases of adapted layers)."""
    check_bias_mode(bias, "mark_only_lora_as_trainable")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name.rsplit(".", 1)[-1])
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)


def lora_state_dict(model: Module, bias: str = "none") -> dict:
    """The adapter's arrays (copies): every ``lora_A``/``lora_B`` (an embedding's
    ``lora_embedding_A``/``lora_embedding_B``, DoRA's ``lora_magnitude_vector``), plus
    biases per ``bias``."""
    check_bias_mode(bias, "lora_state_dict")
    lora_paths = {path for path, _ in lora_layers(model)}
    out = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = name.rpartition(".")[0]
        if leaf in LORA_LEAVES + ("lora_magnitude_vector",) or (
            leaf == "bias" and (bias == "all" or (bias == "lora_only" and owner in lora_paths))
        ):
            out[name] = p.data.copy()
    return out


def merge_lora(model: Module, safe_merge: bool = True) -> None:
    """Merge every unmerged adapter into its weight (see :meth:`LoRALinear.merge`).

    All or nothing: every merged weight is computed and checked before any is written.
    """
    layers = [layer for _, layer in adapted_layers(model) if not layer.merged]
    merged = [layer.merged_weight(safe_merge) for layer in layers]
    for layer, weight in zip(layers, merged, strict=True):
        layer._set_merged(weight)


def unmerge_lora(model: Module) -> None:
    for _, layer in adapted_layers(model):
        layer.unmerge()


def merge_and_unload(model: Module, safe_merge: bool = True) -> Module:
    """Merge every adapter and put plain ``Linear`` layers back (in place; returns model).

    The result is an ordinary GPT: same outputs as the adapted model, no LoRA parameters.
    """
    merge_lora(model, safe_merge)
    for path, layer in adapted_layers(model):
        base = layer.to_embedding() if isinstance(layer, LoRAEmbedding) else layer.to_linear()
        model.set_submodule(path, base)
    return model


@contextlib.contextmanager
def disable_adapters(model: Module):
    """Run the base model: inside the block every adapter is bypassed (PEFT's
    ``disable_adapter``). Merged layers cannot be disabled; unmerge them first."""
    layers = [layer for _, layer in adapted_layers(model)]
    merged = [path for path, layer in adapted_layers(model) if layer.merged]
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
