"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv 2310.11454).

    h = W0 x + λ_b ⊙ (B (λ_d ⊙ (A x))),   W0 (out, in) frozen,
    A (r, in) and B (out, r) frozen and random, λ_d (r,) and λ_b (out,) trainable

LoRA trains A and B in every layer; VeRA draws one pair of random matrices for the whole
model, freezes them, and trains only two scaling vectors per layer: ``L̂ · (r + out)``
parameters for L̂ adapted layers, against LoRA's ``L̂ · r · (in + out)``. λ_b starts at zero,
so the adapted model starts equal to the base; λ_d starts at ``d_initial`` (0.1).

PEFT's names and layout (``peft.VeraConfig``): the shared ``vera_A`` (r, max in) and
``vera_B`` (max out, r) are sized to the largest in and out features among the targets,
and each layer slices ``vera_A[:, :in]`` and ``vera_B[:out, :]``. A fused layer that
minilora holds as several (GPT-2's ``c_attn`` as q, k and v: ``apply_vera``'s ``fused``)
is one PEFT layer: its pieces share one λ_d and read consecutive rows of ``vera_B``, from
``vera_offset``. The projections are drawn with kaiming-uniform, A first then B, from
``torch.Generator().manual_seed(projection_prng_key)``; :func:`vera_projections` draws the
same numbers bit for bit without PyTorch (``backend.torch_uniform_stream``). Adapter folders
are PEFT's, saved and loaded by minilora/interop/vera_adapters.py (``save_vera``,
``load_vera``). The math and the backward: docs/math.md#vera.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields

from minilora import backend, lora
from minilora import functional as F
from minilora.autograd import Function, Tensor, is_grad_enabled
from minilora.lora import LoRALinear, check_bias_mode, check_merged, check_untied, is_target
from minilora.model import check_positive_int
from minilora.nn import Linear, Module, Parameter

mm = backend.matmul
VERA_LEAVES = ("vera_lambda_d", "vera_lambda_b")


@dataclass
class VeraConfig:
    """VeRA settings, with PEFT's field names (``peft.VeraConfig``)."""

    r: int = 256  # rank of the shared random projections
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    projection_prng_key: int = 0  # seed of vera_A and vera_B (PyTorch's MT19937)
    save_projection: bool = True  # write vera_A and vera_B into the adapter file
    vera_dropout: float = 0.0  # dropout on the bypass input only, training only
    d_initial: float = 0.1  # λ_d's initial value (λ_b starts at 0)
    bias: str = "none"  # VeRA trains no biases here (PEFT's other modes are not built)

    def __post_init__(self):
        check_positive_int("VeraConfig", "r", self.r)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(
                f"VeraConfig: target_modules={self.target_modules!r} must be a non-empty list of "
                "module names such as ['q_proj', 'v_proj']"
            )
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 2**32:
            raise ValueError(
                f"VeraConfig: projection_prng_key={key!r} must be an integer in [0, 2**32)"
            )
        if not isinstance(self.save_projection, bool):
            raise ValueError(
                f"VeraConfig: save_projection={self.save_projection!r} must be true or false"
            )
        F.check_probability("VeraConfig", "vera_dropout", self.vera_dropout)
        d = self.d_initial
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
            raise ValueError(f"VeraConfig: d_initial={d!r} must be a finite number")
        check_bias_mode(self.bias, "VeraConfig")
        if self.bias != "none":
            raise ValueError(f"VeraConfig: bias={self.bias!r}; minilora's VeRA supports 'none'")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ======================================================================================
# The reference op
# ======================================================================================


class VeraLinearFunction(Function):
    """y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (d Aᵀ)) Bᵀ),  d the bypass input (x, or dropout(x)).

    x (..., in), W (out, in), b (out,), A (r, in), B (out, r), λ_d (r,), λ_b (out,).
    Flatten to N rows; u = d Aᵀ (N, r), v = λ_d ⊙ u (N, r), z = v Bᵀ (N, out). With g (N, out):

        dλ_b = Σ_rows g ⊙ z          (out,)
        gz   = g ⊙ λ_b               (N, out)
        gv   = gz B                  (N, r)
        dλ_d = Σ_rows gv ⊙ u         (r,)
        gu   = gv ⊙ λ_d              (N, r)
        dx   = g W [+ gu A when d is x]        dd = gu A   when d is separate
        dW   = gᵀ x,  db = Σ_rows g,  dA = guᵀ d,  dB = gzᵀ v   (frozen in VeRA: never asked)

    Derivation: docs/math.md#vera.
    """

    def forward(self, x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, x_lora=None):
        out_f, in_f = weight.shape
        r = vera_A.shape[0]
        want = {"vera_A": (r, in_f), "vera_B": (out_f, r), "lambda_d": (r,), "lambda_b": (out_f,)}
        got = {"vera_A": vera_A, "vera_B": vera_B, "lambda_d": lambda_d, "lambda_b": lambda_b}
        for name, shape in want.items():
            if tuple(got[name].shape) != shape:
                raise ValueError(
                    f"vera_linear: {name} has shape {tuple(got[name].shape)}, expected {shape} "
                    f"for weight {tuple(weight.shape)} and r={r}"
                )
        self.x_shape = x.shape
        x2 = x.reshape(-1, in_f)  # (N, in)
        d2 = x2 if x_lora is None else x_lora.reshape(x2.shape)  # (N, in) bypass input
        u = mm(d2, vera_A.T, "vera.A")  # (N, r)
        v = u * lambda_d  # (N, r)
        z = mm(v, vera_B.T, "vera.B")  # (N, out)
        y = mm(x2, weight.T, "linear") + lambda_b * z  # (N, out)
        if bias is not None:
            y += bias
        need_x, need_w, _, need_A, need_B, need_ld, need_lb, need_d = self.needs_input_grad
        self.separate = x_lora is not None
        # keep only what the asked-for gradients read (VeRA: u, z, the λ's, and A, B for dx)
        need_gu = need_x or need_d or need_A  # the gradient reaching the code u
        self.x2 = x2 if need_w else None
        self.d2 = d2 if need_A else None
        self.u = u if need_ld else None
        self.v = v if need_B else None
        self.z = z if need_lb else None
        self.weight = weight if need_x else None
        self.A = vera_A if (need_x or need_d) else None
        self.B = vera_B if (need_gu or need_ld) else None
        self.lambda_d = lambda_d if need_gu else None
        self.lambda_b = lambda_b
        return y.reshape(*x.shape[:-1], out_f)

    def backward(self, g):
        need_x, need_w, need_b, need_A, need_B, need_ld, need_lb, need_d = self.needs_input_grad
        x2, d2, u, v, z, weight = self.x2, self.d2, self.u, self.v, self.z, self.weight
        A, B, lambda_d, lambda_b = self.A, self.B, self.lambda_d, self.lambda_b
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gz = g2 * lambda_b  # (N, out)
        need_gu = need_x or need_d or need_A
        gv = mm(gz, B, "vera.dB_path") if (need_gu or need_ld) else None  # (N, r)
        gu = gv * lambda_d if need_gu else None  # (N, r)
        d_lb = (g2 * z).sum(axis=0) if need_lb else None  # (out,)
        d_ld = (gv * u).sum(axis=0) if need_ld else None  # (r,)
        dA = mm(gu.T, d2, "vera.dA") if need_A else None  # (r, in)
        dB = mm(gz.T, v, "vera.dB") if need_B else None  # (out, r)
        dw = mm(g2.T, x2, "linear.dweight") if need_w else None
        db = g2.sum(axis=0) if need_b else None
        dx = dd = None
        if need_x or need_d:
            dbypass = mm(gu, A, "vera.dinput") if (need_d or not self.separate) else None
            if need_x:
                dx = mm(g2, weight, "linear.dinput")
                if not self.separate:
                    dx = dx + dbypass
                dx = dx.reshape(self.x_shape)
            if need_d:
                dd = dbypass.reshape(self.x_shape)
        return dx, dw, db, dA, dB, d_ld, d_lb, dd


def vera_linear(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, x_lora=None) -> Tensor:
    """``x @ weight.T + bias + lambda_b * ((lambda_d * (x_lora @ vera_A.T)) @ vera_B.T)``."""
    return VeraLinearFunction()(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, x_lora)


# ======================================================================================
# The shared projections and the layer
# ======================================================================================


def vera_projections(r: int, max_in: int, max_out: int, projection_prng_key: int):
    """PEFT's shared ``vera_A`` (r, max_in) and ``vera_B`` (max_out, r), float32, drawn as
    PEFT draws them: kaiming-uniform U(-bound, bound), bound = √3 · √2 / √fan_in, A then B
    from one PyTorch generator seeded with ``projection_prng_key``."""
    shapes = [(r, max_in), (max_out, r)]
    x = backend.torch_uniform_stream(projection_prng_key, r * max_in + max_out * r)
    out, start = [], 0
    for rows, cols in shapes:
        bound = backend.array(math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols), backend.float32)
        width = (bound - (-bound)).astype(backend.float64)  # PyTorch: (to - from) in float32
        n = rows * cols
        values = x[start : start + n] * width + (-bound).astype(backend.float64)
        out.append(values.astype(backend.float32).reshape(rows, cols))
        start += n
    return out[0], out[1]


class VeraLinear(Linear):
    """A ``Linear`` with VeRA: keeps ``weight``/``bias``, references the shared frozen
    ``vera_A``/``vera_B`` (constants, not parameters) and adds ``vera_lambda_d`` (r,) and
    ``vera_lambda_b`` (out,)."""

    @classmethod
    def from_linear(
        cls,
        linear: Linear,
        vera_A: Tensor,
        vera_B: Tensor,
        config: VeraConfig,
        generator=None,
        offset: int = 0,
    ) -> VeraLinear:
        """``offset``: the first row of ``vera_B`` this layer reads (0, or its place in a
        fused layer, whose pieces read consecutive rows)."""
        layer = cls.__new__(cls)
        vars(layer).update(vars(linear))
        out_f, _ = layer.weight.shape
        dtype, device = layer.weight.dtype, layer.weight.device
        layer.r = config.r
        layer.vera_A, layer.vera_B = vera_A, vera_B  # (r, max in), (max out, r): shared
        layer.vera_offset = offset  # this layer reads vera_B[offset : offset + out]
        lambda_d = backend.ones((config.r,), dtype, device) * config.d_initial
        layer.vera_lambda_d = Parameter(lambda_d.astype(dtype))  # (r,)
        layer.vera_lambda_b = Parameter(backend.zeros((out_f,), dtype, device))  # (out,)
        layer.vera_dropout = config.vera_dropout
        gen = generator or backend.default_generator()
        layer.vera_generator = backend.Generator(int(gen.integers(0, 2**31 - 1, ()).item()))
        layer.merged = False
        layer.disable_adapters = False
        return layer

    def projections(self) -> tuple[Tensor, Tensor]:
        """This layer's slices: ``vera_A[:, :in]`` (r, in) and ``vera_B[o : o + out, :]``
        (out, r), o its ``vera_offset``.

        The shared projections are constants, not parameters, so ``Module.to`` does not move
        them: they follow the weight's device here (once: the move updates the shared Tensor)."""
        out_f, in_f = self.weight.shape
        for t in (self.vera_A, self.vera_B):
            t.data = backend.to_device(t.data, self.weight.device)
        o = self.vera_offset
        return Tensor(self.vera_A.data[:, :in_f]), Tensor(self.vera_B.data[o : o + out_f, :])

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            trains = self.vera_lambda_d.requires_grad or self.vera_lambda_b.requires_grad
            if self.training and trains and is_grad_enabled():
                raise RuntimeError(
                    "this VeraLinear is merged, so a gradient would not reach its scaling "
                    "vectors; call unmerge() before training, or eval() for inference"
                )
            return F.linear(x, self.weight, self.bias)
        if self.disable_adapters:
            return F.linear(x, self.weight, self.bias)
        x_lora = None
        if self.vera_dropout > 0 and self.training:
            x_lora = F.dropout(x, self.vera_dropout, True, self.vera_generator)
        A, B = self.projections()
        return vera_linear(
            x, self.weight, self.bias, A, B, self.vera_lambda_d, self.vera_lambda_b, x_lora
        )

    def get_delta_weight(self):
        """ΔW = (λ_b ⊙ B)(λ_d ⊙ A) = diag(λ_b) B diag(λ_d) A, shape (out, in)."""
        A, B = (t.data for t in self.projections())
        dtype = self.weight.dtype
        scaled_B = self.vera_lambda_b.data[:, None] * B.astype(dtype)  # (out, r)
        scaled_A = self.vera_lambda_d.data[:, None] * A.astype(dtype)  # (r, in)
        return mm(scaled_B, scaled_A, "vera.merge")

    def merge(self, safe_merge: bool = True) -> None:
        """W ← W + ΔW (refused, W unchanged, if ``safe_merge`` and the result is not finite)."""
        if self.merged:
            warnings.warn("VeraLinear.merge(): already merged; nothing was done", stacklevel=2)
            return
        self._set_merged(self.merged_weight(safe_merge))

    def merged_weight(self, safe_merge: bool = True):
        """W + ΔW as a new array, refused (ValueError) if ``safe_merge`` and not finite."""
        return check_merged(self.weight.data + self.get_delta_weight(), safe_merge, "W + ΔW")

    def _set_merged(self, merged) -> None:
        self.weight.data[...] = merged  # in place: optimizers keep their references
        self.merged = True

    def unmerge(self) -> None:
        """W ← W - ΔW."""
        if not self.merged:
            warnings.warn("VeraLinear.unmerge(): not merged; nothing was done", stacklevel=2)
            return
        self.weight.data -= self.get_delta_weight()
        self.merged = False

    # a plain Linear with the current weight (merge first to keep the adapter), as LoRA's
    get_base_layer = LoRALinear.get_base_layer

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, offset={self.vera_offset}, merged={self.merged}"
        )


# ======================================================================================
# Model-level helpers
# ======================================================================================


def vera_layers(model: Module) -> list:
    """(path, layer) for every ``VeraLinear`` in ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, VeraLinear)]


def vera_targets(model: Module, target_modules) -> tuple[list, list[str]]:
    """The plain ``Linear`` layers ``target_modules`` names, and the targets matching none."""
    linears = [(p, m) for p, m in model.named_modules() if type(m) is Linear and p]
    unmatched = [t for t in target_modules if not any(is_target([t], p) for p, _ in linears)]
    return [(p, m) for p, m in linears if is_target(target_modules, p)], unmatched


def fused_groups(model: Module, chosen: list, fused) -> list[list[str]]:
    """The groups of ``fused`` (lists of layer paths) that the chosen layers fill; a group
    partly chosen, a path that is no layer of ``model`` and a layer in two groups are
    refused (ValueError)."""
    layers = {p for p, m in model.named_modules() if isinstance(m, Linear)}
    if isinstance(fused, str) or not all(
        isinstance(g, (list, tuple)) and all(isinstance(p, str) for p in g) for g in fused
    ):
        raise ValueError(
            f"apply_vera: fused={fused!r} must be a list of groups of layer paths, such as "
            "hf_gpt2.vera_fused(model); nothing was changed"
        )
    unknown = [p for g in fused for p in g if p not in layers]
    if unknown:
        raise ValueError(
            f"apply_vera: fused names {unknown}, which are not Linear layers of the model; "
            "nothing was changed"
        )
    paths = [p for p, _ in chosen]
    groups = [list(g) for g in fused if any(p in paths for p in g)]
    partial = [g for g in groups if not all(p in paths for p in g)]
    if partial:
        raise ValueError(
            f"apply_vera: the fused layers {partial[0]} are one layer, adapted all or none, "
            f"but target_modules adapt only {[p for p in partial[0] if p in paths]}; "
            "nothing was changed"
        )
    flat = [p for g in groups for p in g]
    if len(set(flat)) != len(flat):
        raise ValueError(
            f"apply_vera: fused={fused!r} puts a layer in two groups; nothing was changed"
        )
    return groups


def row_offsets(chosen: list, groups: list[list[str]]) -> dict:
    """{path: the first row of ``vera_B`` it reads}: 0, or in a fused group the rows of the
    layers before it, as the pieces of one PEFT layer (0, C, 2C for GPT-2's q, k, v)."""
    offsets = {p: 0 for p, _ in chosen}
    outs = {p: m.weight.shape[0] for p, m in chosen}
    for group in groups:
        for i, path in enumerate(group):
            offsets[path] = sum(outs[p] for p in group[:i])
    return offsets


def projection_shape(chosen: list, offsets: dict | None = None) -> tuple[int, int]:
    """(max rows, max in) over the chosen layers: the size of the shared projections (a
    layer reads rows [offset, offset + out) of vera_B)."""
    offsets = offsets or {}
    rows = max(offsets.get(p, 0) + m.weight.shape[0] for p, m in chosen)
    return rows, max(m.weight.shape[1] for _, m in chosen)


def projection_problem(r: int, max_out: int, max_in: int) -> str | None:
    """Why projections of rank ``r`` for layers up to (max_out, max_in) are not drawn, or
    None. Each of the r directions adds one rank-one matrix ``B[:, k] A[k, :]``, and those
    span at most out · in dimensions: a larger r adds nothing VeRA can learn, only memory
    (an adapter_config.json's r would otherwise size an allocation of any size)."""
    if r <= max_out * max_in:
        return None
    return (
        f"r={r} is more than out * in = {max_out} * {max_in} = {max_out * max_in}: the shared "
        f"projections would hold {r * (max_in + max_out):,} numbers, and beyond out * in "
        "directions they add nothing VeRA can learn"
    )


def apply_vera(
    model: Module, config: VeraConfig, generator=None, projections=None, fused=()
) -> list[str]:
    """Replace every ``Linear`` that ``config.target_modules`` names by a ``VeraLinear``
    sharing one pair of frozen projections, and freeze everything but the λ vectors.
    ``projections``: (vera_A, vera_B) to use instead of drawing them (a loaded adapter's).
    ``fused``: groups of layer paths that are one layer in PEFT (GPT-2's ``c_attn`` as q,
    k and v: ``hf_gpt2.vera_fused(model)``); the layers of a targeted group share one λ_d
    Parameter and read consecutive rows of vera_B, as the one layer does (groups the
    targets miss are ignored, and half a group is refused; why it is PEFT's layer exactly:
    docs/math.md#vera).
    Returns the replaced paths; refuses (ValueError, nothing changed) targets that match
    nothing and a model that already has VeRA layers. As in PEFT, r may exceed a layer's
    min(out, in) (VeRA's r is often 256 or more)."""
    if not isinstance(config, VeraConfig):
        raise TypeError(f"config must be a VeraConfig, got {type(config).__name__}")
    if vera_layers(model):
        raise ValueError("apply_vera: the model already has VeRA layers; nothing was changed")
    chosen, unmatched = vera_targets(model, config.target_modules)
    if unmatched:
        raise ValueError(f"apply_vera: target_modules {unmatched} match no Linear layer")
    groups = fused_groups(model, chosen, fused)
    offsets = row_offsets(chosen, groups)
    max_out, max_in = projection_shape(chosen, offsets)
    if projections is None and (problem := projection_problem(config.r, max_out, max_in)):
        raise ValueError(f"apply_vera: {problem}; nothing was changed")
    if projections is None:
        projections = vera_projections(config.r, max_in, max_out, config.projection_prng_key)
    dtype, device = chosen[0][1].weight.dtype, chosen[0][1].weight.device
    A, B = (Tensor(backend.array(a, dtype=dtype, device=device)) for a in projections)
    layers = {}
    for path, m in chosen:
        layers[path] = VeraLinear.from_linear(m, A, B, config, generator, offsets[path])
        model.set_submodule(path, layers[path])
    for group in groups:  # one λ_d, as the one PEFT layer has: its gradient sums the uses
        for path in group[1:]:
            layers[path].vera_lambda_d = layers[group[0]].vera_lambda_d
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in VERA_LEAVES)
    return [p for p, _ in chosen]


def merge_vera(model: Module) -> None:
    """Merge every VeRA layer (W ← W + ΔW); a layer on a tied weight (GPT-2's ``lm_head``)
    is refused before anything changes, as :func:`minilora.lora.merge_lora` refuses it."""
    layers = vera_layers(model)
    check_untied(model, [path for path, layer in layers if not layer.merged], "merge_vera")
    for _, layer in layers:
        layer.merge()


def unmerge_vera(model: Module) -> None:
    for _, layer in vera_layers(model):
        layer.unmerge()


def merge_and_unload_vera(model: Module) -> Module:
    """Merge every VeRA layer and put plain ``Linear`` layers back (in place; returns
    model), PEFT's ``merge_and_unload``: the same outputs, no λ vectors. A fused layer's
    pieces each merge their own rows of ΔW with the group's one λ_d. All or nothing: every
    merged weight is computed and checked before any is written, and a layer on a tied
    weight is refused (see :func:`merge_vera`)."""
    layers = vera_layers(model)
    pending = [path for path, layer in layers if not layer.merged]
    check_untied(model, pending, "merge_and_unload_vera")
    merged = [
        layer.weight.data if layer.merged else layer.weight.data + layer.get_delta_weight()
        for _, layer in layers
    ]
    for (path, _), weight in zip(layers, merged, strict=True):
        check_merged(weight, True, f"{path}'s W + ΔW")
    for (path, layer), weight in zip(layers, merged, strict=True):
        layer.weight.data[...] = weight
        model.set_submodule(path, layer.get_base_layer())
    return model


def vera_parameter_count(model: Module) -> int:
    """The closed form L̂·(r + out): the trainable parameters of the model's VeRA layers,
    a fused layer's pieces counted as one layer (one λ_d, their λ_b's rows together)."""
    layers = [layer for _, layer in vera_layers(model)]
    lambda_ds = {id(layer.vera_lambda_d): layer.r for layer in layers}
    return sum(lambda_ds.values()) + sum(layer.weight.shape[0] for layer in layers)


def fused_vera_layers(model: Module) -> list[list[str]]:
    """The paths of the VeRA layers that share one λ_d (a fused layer's pieces), group by
    group in the model's order; a layer on its own is in none."""
    groups = {}
    for path, layer in vera_layers(model):
        groups.setdefault(id(layer.vera_lambda_d), []).append(path)
    return [g for g in groups.values() if len(g) > 1]


# minilora.merge_lora, unmerge_lora, merge_and_unload and disable_adapters act on VeRA's
# layers too, as PEFT's merge_and_unload acts on any adapter
lora.OTHER_LAYERS.append(VeraLinear)
