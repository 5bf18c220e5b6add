"""Several named LoRA adapters on one model, with PEFT's names: ``add_adapter``,
``set_adapter``, ``active_adapter``, ``delete_adapter``, ``add_weighted_adapter``.

The design, in one sentence: **the model is always a one-adapter minilora model.** The
active adapter's ``LoRALinear`` layers sit in the model exactly as :func:`apply_lora`
left them, so every existing name still holds (``blocks.0.attn.q_proj.lora_A``), and
saving, loading, merging, :func:`disable_adapters` and training all work on it unchanged.
The other adapters wait on a *shelf* beside the model: for each name, its
``{module path: LoRALinear}``, outside the module tree, so they are not in
``named_parameters``, get no gradient and no optimizer state. :func:`set_adapter` swaps:
the active adapter's layers go to the shelf (a plain ``Linear`` sharing the same weight
takes each one's place) and the chosen adapter's layers come back. A layer that the
active adapter does not target is a plain ``Linear``, so it computes the base model.

Why not PEFT's layout, where every adapted layer holds a dict ``lora_A[name]`` for all
adapters? It would change the parameter names minilora saves and teaches, and every
function that reads ``layer.lora_A``; whole layers on a shelf change nothing of what a
one-adapter reader already knows. The adapter that :func:`apply_lora` (or a
``load_adapter`` into a base model) creates is called ``"default"``, as in PEFT.

The rules (each refused with a ``ValueError`` naming the problem):

* The active adapter is never deleted (PEFT would quietly switch to another one):
  :func:`set_adapter` to another first, or :func:`unload` every adapter.
* Adapters are swapped only while unmerged and enabled: a merged weight holds the active
  adapter, and a layer swapped inside ``disable_adapters`` would come back enabled.
* Biases are shared by every adapter, so, as in PEFT, a model with several adapters trains
  no bias (``bias="none"``); adding or loading a second adapter leaves what the base
  trains as it was.
* Saving and loading by name: ``peft_adapters.save_adapter(model, folder, config,
  adapter_name=name)`` and ``peft_adapters.load_adapter(model, folder, adapter_name=name)``
  (PEFT's ``save_pretrained(selected_adapters=...)`` and ``load_adapter(model_id,
  adapter_name)``); the files are PEFT's, without the name in the keys.
* An optimizer holds the parameters it was given: build it after :func:`set_adapter`.
* Only ``LoRALinear`` adapters are named and swapped: a model with an embedding adapter
  (``LoRAEmbedding``) or VeRA layers is refused, and so is an added adapter that would put
  one in.
* ``add_weighted_adapter`` refuses DoRA adapters: a DoRA update is not ``s·B·A`` alone
  (its magnitude rescales the whole weight), so no combination of A's and B's holds it;
  nor does one hold ``lora_bias``'s bias on ``lora_B``, which is refused too.
* ``merge_and_unload`` (and :func:`unload`) leave a base model: the shelved adapters go
  with the LoRA layers, as in PEFT. LoRA layers that replaced the ones the shelf knows
  (by hand, or ``apply_lora`` after ``merge_and_unload``) start afresh as ``"default"``.

:func:`add_weighted_adapter` makes a new adapter from weighted existing ones, by every
``combination_type`` PEFT has: ``"cat"`` exactly (the weighted sum of the updates, rank
Σ rᵢ), ``"svd"`` (its best rank-k approximation), and PEFT's ``"linear"``, TIES, DARE and
magnitude pruning (merge_methods.py), each as PEFT computes it, on GPT-2's fused ``c_attn``
too. :func:`merge_and_unload` with ``adapter_names`` merges several adapters at once, and
:func:`mixed_batch` runs each row of a batch through its own adapter (PEFT's
``adapter_names=[...]``). The math, and why only "cat" is the weighted sum, are in
docs/math.md, "Several adapters, and combining them" and "Combining adapters the ways PEFT
does".
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

from minilora import backend
from minilora.autograd import Tensor, no_grad
from minilora.lora import (
    LoRAConfig,
    adapted_layers,
    add_lora_layers,
    apply_lora,
    check_rank,
    lora_layers,
)
from minilora.nn import Module
from minilora.variants import merge_methods
from minilora.variants.dora import DoRALinear
from minilora.variants.embedding import LoRAEmbedding
from minilora.variants.lora_bias import LoRABiasLinear
from minilora.variants.trainable_tokens import token_layers
from minilora.variants.vera import vera_layers

DEFAULT_ADAPTER = "default"  # PEFT's name for the adapter get_peft_model creates
_SHELF = "_lora_adapter_shelf"  # the attribute of the model that holds the shelf


@dataclass
class _Shelf:
    """Which adapter is active (and its layers, to notice when they were replaced), and
    the layers of every other adapter, by name."""

    active: str
    layers: dict  # {path: LoRALinear}: the active adapter's layers, as in the model
    shelved: dict  # {name: {path: LoRALinear}}


def _check_supported(model: Module, caller: str) -> None:
    """Refuse a model with layers the shelf cannot swap: embedding adapters (LoRA or
    trainable tokens) and VeRA."""
    embeddings = [p for p, m in adapted_layers(model) if isinstance(m, LoRAEmbedding)]
    embeddings += list(token_layers(model))  # trainable tokens: the rows are one adapter's
    vera = [p for p, _ in vera_layers(model)]
    if embeddings or vera:
        raise ValueError(
            f"{caller}: several named adapters hold LoRA layers on Linear layers only; the "
            f"model has embedding adapters {embeddings} and VeRA layers {vera}. Use one "
            "adapter (apply_lora / load_adapter without adapter_name), or merge_and_unload first"
        )


def _shelf(model: Module, caller: str) -> _Shelf:
    """The model's shelf; a new one, with the model's LoRA layers as ``"default"``, when it
    has none or its LoRA layers are no longer those the shelf knows."""
    if not isinstance(model, Module):
        raise TypeError(f"{caller}: model must be a Module, got {type(model).__name__}")
    _check_supported(model, caller)
    current = dict(lora_layers(model))
    if not current:
        raise ValueError(
            f"{caller}: the model has no LoRA adapter; add one first with "
            f"apply_lora(model, config) (it is called {DEFAULT_ADAPTER!r}) or "
            "add_adapter(model, adapter_name, config)"
        )
    shelf = vars(model).get(_SHELF)
    known = shelf is not None and shelf.layers.keys() == current.keys()
    if not known or any(shelf.layers[p] is not layer for p, layer in current.items()):
        shelf = _Shelf(DEFAULT_ADAPTER, current, {})
        vars(model)[_SHELF] = shelf  # a plain attribute: not a Module, not a Parameter
    return shelf


def active_adapter(model: Module) -> str:
    """The name of the adapter whose layers are in the model (PEFT's ``active_adapter``)."""
    return _shelf(model, "active_adapter").active


def adapter_names(model: Module) -> list[str]:
    """Every adapter's name, the active one first (PEFT: ``model.peft_config.keys()``)."""
    shelf = _shelf(model, "adapter_names")
    return [shelf.active, *shelf.shelved]


def _adapter_layers(shelf: _Shelf, name, caller: str) -> dict:
    if name == shelf.active:
        return shelf.layers
    if name not in shelf.shelved:
        raise ValueError(
            f"{caller}: no adapter named {name!r}; the model has {[shelf.active, *shelf.shelved]}"
        )
    return shelf.shelved[name]


def _check_new_name(name, shelf: _Shelf | None, caller: str) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{caller}: adapter_name={name!r} must be a non-empty string")
    if shelf is not None and (name == shelf.active or name in shelf.shelved):
        raise ValueError(
            f"{caller}: an adapter named {name!r} already exists; pick another name or "
            f"delete_adapter(model, {name!r}) first"
        )


def _check_swappable(shelf: _Shelf, caller: str) -> None:
    merged = [p for p, layer in shelf.layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{caller}: the active adapter {shelf.active!r} is merged into {merged}; call "
            "unmerge_lora(model) first"
        )
    if any(layer.disable_adapters for layer in shelf.layers.values()):
        raise ValueError(
            f"{caller}: called inside disable_adapters(model); adapters cannot be swapped "
            "while disabled"
        )


def _unplug(model: Module, layers: dict) -> None:
    """Put a plain Linear (the same weight and bias objects) in place of each layer (a plain
    Embedding in place of an embedding adapter, which only a refused addition brings)."""
    for path, layer in layers.items():
        model.set_submodule(path, layer.get_base_layer())


def _refresh(model: Module, layers: dict) -> None:
    """Give shelved layers the weight, bias, mode and device the model has now (model.to()
    and model.eval() do not see the shelf)."""
    for path, layer in layers.items():
        current = model.get_submodule(path)
        if current is not layer:
            layer.weight, layer.bias = current.weight, current.bias
            layer.training = current.training
            layer.to(backend.device_of(current.weight.data))


def _plug(model: Module, layers: dict) -> None:
    """Put shelved layers back in the model, as the model is now."""
    _refresh(model, layers)
    for path, layer in layers.items():
        model.set_submodule(path, layer)


def set_adapter(model: Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter: its layers go into the model, the active
    one's go to the shelf. Its parameters keep their ``requires_grad`` (new adapters train)."""
    shelf = _shelf(model, "set_adapter")
    if adapter_name == shelf.active:
        return
    layers = _adapter_layers(shelf, adapter_name, "set_adapter")
    _check_swappable(shelf, "set_adapter")
    _unplug(model, shelf.layers)
    shelf.shelved[shelf.active] = shelf.layers
    _plug(model, layers)
    del shelf.shelved[adapter_name]
    shelf.active, shelf.layers = adapter_name, layers


@contextlib.contextmanager
def using_adapter(model: Module, adapter_name: str):
    """Make ``adapter_name`` active inside the block, and the previous one again after it
    (how ``save_adapter(..., adapter_name=...)`` saves a shelved adapter)."""
    previous = active_adapter(model)
    set_adapter(model, adapter_name)
    try:
        yield model
    finally:
        set_adapter(model, previous)


@contextlib.contextmanager
def adding_adapter(model: Module, adapter_name: str):
    """Inside the block the model is its base model (the active adapter is on the shelf);
    the LoRA layers the block adds (``apply_lora``, ``load_adapter``) become the adapter
    ``adapter_name``, shelved, and the active adapter comes back. On an exception
    anything the block added is dropped. On a model without adapters, the new one is
    simply the active one, named ``adapter_name``."""
    if not isinstance(model, Module):
        raise TypeError(f"add_adapter: model must be a Module, got {type(model).__name__}")
    _check_supported(model, "add_adapter")
    shelf = _shelf(model, "add_adapter") if lora_layers(model) else None
    _check_new_name(adapter_name, shelf, "add_adapter")
    if shelf is not None and any(getattr(m, "residual_base", False) for _, m in lora_layers(model)):
        raise ValueError(
            f"add_adapter: the active adapter is PiSSA, whose layers hold the residual "
            f"W0 - s·B·A instead of the base weight, so {adapter_name!r} would adapt the "
            "residual; keep PiSSA the only adapter, or save it converted to plain LoRA "
            "(save_adapter(..., path_initial_model_for_weight_conversion=...)) and load that"
        )
    if shelf is not None:
        _check_swappable(shelf, "add_adapter")
        _unplug(model, shelf.layers)
    base_flags = [(p, p.requires_grad) for p in model.parameters()]  # the base's, alone
    try:
        yield model
        _check_supported(model, "add_adapter")  # the block added an embedding adapter
        added = dict(lora_layers(model))
        biases = [n for n, p in model.named_parameters() if n.endswith(".bias") and p.requires_grad]
        if shelf is not None and biases:  # a loaded adapter with bias "all" or "lora_only"
            raise ValueError(
                f"add_adapter: the new adapter {adapter_name!r} trains biases {biases}, which "
                "every adapter shares; a model with several adapters trains none (as in PEFT)"
            )
    except BaseException:  # drop what the block added; the model is as it was
        _unplug(model, dict(adapted_layers(model)))
        for p, flag in base_flags:
            p.requires_grad_(flag)
        if shelf is not None:
            _plug(model, shelf.layers)
        raise
    if shelf is None:  # a model without adapters: the new one is simply the active one
        vars(model)[_SHELF] = _Shelf(adapter_name, added, {})
        return
    _unplug(model, added)
    for p, flag in base_flags:  # apply_lora/load_adapter re-marked what trains
        p.requires_grad_(flag)
    _plug(model, shelf.layers)
    shelf.shelved[adapter_name] = added


def add_adapter(model: Module, adapter_name: str, config: LoRAConfig, generator=None) -> None:
    """Add a new adapter, as ``apply_lora`` on the base model would create it (same
    checks, same init), under ``adapter_name``; the active adapter stays active (as in
    PEFT). Adapters may differ in ``r``, ``lora_alpha``, ``use_rslora`` and targets."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"add_adapter: config must be a LoRAConfig, got {type(config).__name__}")
    if lora_layers(model) and config.init_lora_weights == "pissa":
        raise ValueError(
            f"add_adapter: {adapter_name!r} has init_lora_weights='pissa', which replaces the "
            "base weights by their residual, under the adapters the model already has; PiSSA "
            "must be the only adapter (apply it to a model without adapters)"
        )
    if lora_layers(model):
        trained = [
            n for n, p in model.named_parameters() if n.endswith(".bias") and p.requires_grad
        ]
        if config.bias != "none" or trained:
            raise ValueError(
                f"add_adapter: biases are shared by every adapter, so a model with several "
                f"adapters trains none (as in PEFT); got bias={config.bias!r} and trainable "
                f"biases {trained}; use bias='none' for every adapter"
            )
    with adding_adapter(model, adapter_name):
        apply_lora(model, config, generator)


def delete_adapter(model: Module, adapter_name: str) -> None:
    """Drop a shelved adapter. The active one is refused: set another active first, or
    :func:`unload` every adapter."""
    shelf = _shelf(model, "delete_adapter")
    if adapter_name == shelf.active:
        others = list(shelf.shelved)
        hint = f"set_adapter(model, {others[0]!r}) first" if others else "it is the only one"
        raise ValueError(
            f"delete_adapter: {adapter_name!r} is the active adapter ({hint}); to remove every "
            "adapter use unload(model) (or merge_and_unload(model) to keep the active one)"
        )
    _adapter_layers(shelf, adapter_name, "delete_adapter")  # refuses an unknown name
    del shelf.shelved[adapter_name]


def unload(model: Module) -> Module:
    """Remove every adapter without merging: the base model again (PEFT's ``unload``)."""
    shelf = _shelf(model, "unload")
    _check_swappable(shelf, "unload")
    _unplug(model, shelf.layers)
    del vars(model)[_SHELF]
    return model


# ======================================================================================
# Merging several adapters, and one adapter per row of a batch
# ======================================================================================

BASE_ADAPTER = "__base__"  # PEFT's name, in adapter_names, for a row the base model computes


def merge_and_unload(
    model: Module, safe_merge: bool = True, adapter_names: list[str] | None = None
) -> Module:
    """Merge the adapters ``adapter_names`` (the active one when None) into the base
    weights, one after the other in that order, and remove every adapter: a plain model
    computing ``W0 + Σ ΔWᵢ`` on each layer (PEFT's ``merge_and_unload(adapter_names=...)``).
    All or nothing: with ``safe_merge`` a non-finite result leaves every weight as it was.
    The active adapter must be unmerged and enabled."""
    caller = "merge_and_unload"
    shelf = _shelf(model, caller)
    names = [shelf.active] if adapter_names is None else adapter_names
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise TypeError(f"{caller}: adapter_names={adapter_names!r} must be a non-empty list")
    if len(set(names)) != len(names):
        raise ValueError(f"{caller}: adapter_names={names!r} names an adapter twice")
    layers = [_adapter_layers(shelf, name, caller) for name in names]
    _check_swappable(shelf, caller)
    before = {}  # {path: (weight, bias) before any merge}, to put back if one is refused
    try:
        for by_path in layers:
            _refresh(model, by_path)  # shelved layers read the model's (merged so far) weight
            for path, layer in by_path.items():
                bias = None if layer.bias is None else layer.bias.data.copy()
                before.setdefault(path, (layer.weight.data.copy(), bias))
                layer._set_merged(layer.merged_weight(safe_merge))  # W ← W + ΔWᵢ (b too)
                layer.merged = False  # W holds it now; the layer goes with unload below
    except ValueError:
        for path, (weight, bias) in before.items():
            module = model.get_submodule(path)
            module.weight.data[...] = weight
            if bias is not None:
                module.bias.data[...] = bias
        raise
    return unload(model)


class MixedBatchLinear(Module):
    """A layer's stand-in inside :func:`mixed_batch`: the rows of the batch whose adapter
    adapts this layer go through that adapter's layer, the others through the base layer;
    the outputs are put back in the batch's order. Inference only: no gradient flows."""

    def __init__(self, routes: list, batch_size: int):
        super().__init__()
        self.routes = routes  # [(row indices, a LoRA layer or the base Linear)]: not children
        self.batch_size = batch_size
        self.training = False  # inference only (mixed_batch refuses a training model)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != self.batch_size:
            raise ValueError(
                f"mixed_batch: the batch has {x.shape[0]} rows but adapter_names names "
                f"{self.batch_size} adapters; give one name per row"
            )
        xp = backend.get_array_module(x.data)
        out = None
        with no_grad():
            for rows, layer in self.routes:
                y = layer(Tensor(x.data[rows])).data  # (n_rows, T, out)
                if out is None:
                    out = xp.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype)
                out[rows] = y
        return Tensor(out)


@contextlib.contextmanager
def mixed_batch(model: Module, adapter_names: list[str]):
    """Inside the block, row i of every batch the model runs (a forward, ``generate``)
    goes through adapter ``adapter_names[i]``, or the base model for ``"__base__"``: PEFT's
    ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``. Each
    row computes exactly what its adapter alone computes. For inference: the model must be
    in eval mode (as PEFT asks), its active adapter unmerged and enabled."""
    caller = "mixed_batch"
    shelf = _shelf(model, caller)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"{caller}: adapter_names={adapter_names!r} must be a list, one per row")
    if not adapter_names:
        raise ValueError(f"{caller}: adapter_names is empty; give one name per row")
    chosen = {n: _adapter_layers(shelf, n, caller) for n in adapter_names if n != BASE_ADAPTER}
    _check_swappable(shelf, caller)
    if model.training:
        raise ValueError(
            f"{caller}: the model is in training mode; one adapter per row is for inference: "
            "call model.eval() first"
        )
    for layers in chosen.values():
        _refresh(model, layers)
    adapted = set().union(*chosen.values())
    originals = {p: m for p, m in model.named_modules() if p in adapted}
    xp = backend.module_for(backend.device_of(next(iter(model.parameters())).data))
    for path, current in originals.items():
        base = current.get_base_layer() if hasattr(current, "get_base_layer") else current
        routes = {}  # {id(layer): (layer, rows)}: rows that share a layer run together
        for i, name in enumerate(adapter_names):
            layer = chosen[name].get(path, base) if name in chosen else base
            routes.setdefault(id(layer), (layer, []))[1].append(i)
        routes = [(xp.asarray(rows), layer) for layer, rows in routes.values()]
        model.set_submodule(path, MixedBatchLinear(routes, len(adapter_names)))
    try:
        yield model
    finally:
        for path, layer in originals.items():
            model.set_submodule(path, layer)


# ======================================================================================
# Combining adapters
# ======================================================================================


def add_weighted_adapter(
    model: Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: backend.Generator | None = None,
) -> LoRAConfig:
    """Add ``adapter_name``, made of the adapters ``adapters`` weighted by ``weights``, on
    every layer any of them adapts; returns its config (to save it with). Every
    ``combination_type`` PEFT offers, computed as PEFT computes it (docs/math.md,
    "Combining adapters the ways PEFT does"), with ``ΔWᵢ = sᵢ Bᵢ Aᵢ`` (each adapter's own
    scaling, rsLoRA included). As PEFT, the new adapter has ``lora_alpha = r``; and it has
    ``use_rslora=False``, so its scaling is exactly 1 (PEFT copies the first adapter's
    ``use_rslora``, which scales an rsLoRA combination by √r).

    * ``"cat"``: exactly ``Σ wᵢ ΔWᵢ``: ``A = [w₁s₁A₁; w₂s₂A₂; …]`` (rows stacked),
      ``B = [B₁ B₂ …]``; rank ``Σ rᵢ``.
    * ``"svd"``: the best rank-k approximation of ``Σ wᵢ ΔWᵢ`` (Eckart–Young),
      ``k = svd_rank`` or the largest rank: ``B = U_k S_k``, ``A = V_kᵀ``.
    * ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``:
      the ΔWᵢ merged by that method (merge_methods.py), then its rank-k SVD.
    * ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``:
      the A's merged with weights ``sign(wᵢsᵢ)·√|wᵢsᵢ|`` and the B's with ``√|wᵢsᵢ|``,
      separately, as PEFT does; all adapters need the same rank, kept. Not the weighted
      sum of the updates: ``B A`` has cross terms ``Bᵢ Aⱼ`` (docs/math.md).

    ``density`` (in [0, 1], the fraction of entries kept) is required by the pruning
    methods (ties, dare, magnitude_prune) and refused by the others;
    ``majority_sign_method`` ("total" or "frequency") is TIES' sign election. DARE draws
    its masks from ``generator`` (the default generator when None).

    On a model whose PEFT twin fuses layers that minilora keeps apart (GPT-2's ``c_attn``
    is q, k and v), every method works on the fused layer, as PEFT does: the result has
    one A for q, k and v, and is saved at its rank.
    """
    caller = "add_weighted_adapter"
    shelf = _shelf(model, caller)
    _check_combination(combination_type, svd_rank, density, majority_sign_method, caller)
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"{caller}: adapters={adapters!r} must be a non-empty list of names")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(
            f"{caller}: weights={weights!r} must be a list of {len(adapters)} numbers, one per "
            "adapter"
        )
    for w in weights:
        if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"{caller}: weight {w!r} in weights must be a finite number")
    layers = [_adapter_layers(shelf, name, caller) for name in adapters]
    dora = [n for n, by_path in zip(adapters, layers, strict=True) if _uses_dora(by_path)]
    if dora:
        raise ValueError(
            f"{caller}: adapters {dora} use DoRA, whose update is not s·B·A alone (the "
            "magnitude rescales the whole weight), so no combination of B's and A's holds it"
        )
    biased = [
        n
        for n, by_path in zip(adapters, layers, strict=True)
        if any(isinstance(layer, LoRABiasLinear) for layer in by_path.values())
    ]
    if biased:
        raise ValueError(
            f"{caller}: adapters {biased} have lora_bias, a bias on lora_B that is not part of "
            "s·B·A, so no combination of B's and A's holds it (PEFT's drops it)"
        )
    _check_new_name(adapter_name, shelf, caller)
    for by_path in layers:  # shelved adapters, on the model's device
        _refresh(model, by_path)

    factors = [peft_factors(model, by_path) for by_path in layers]
    units, r = _combination_plan(model, factors, adapters, combination_type, svd_rank)
    gen = generator or backend.default_generator()
    result = {}  # {path: (A, B)}
    for unit, pieces in units.items():  # in the model's order, as PEFT draws DARE's masks
        terms = [
            (float(w), *by_unit[unit][:3])
            for w, by_unit in zip(weights, factors, strict=True)
            if unit in by_unit
        ]
        A, B = _combine(combination_type, terms, r, density, majority_sign_method, gen)
        for path, rows in pieces:  # a fused layer: one A for all, B split by output rows
            result[path] = (A.copy(), B[rows].copy())

    paths = [p for p, _ in model.named_modules() if p in result]
    first = next(iter(layers[0].values()))
    config = LoRAConfig(
        r=r, lora_alpha=r, lora_dropout=first.lora_dropout, target_modules=paths, bias="none"
    )
    with adding_adapter(model, adapter_name):
        add_lora_layers(model, paths, config, backend.Generator(0))  # the init is overwritten
    for path, layer in shelf.shelved[adapter_name].items():
        layer.lora_A.data, layer.lora_B.data = result[path]
    return config


# PEFT's names, in PEFT's order; the ones that prune take a density, the TIES ones a sign
COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_PRUNING = ("ties", "dare_ties", "dare_linear", "magnitude_prune")

# How PEFT holds the LoRA factors of a model whose PEFT twin fuses layers minilora keeps
# apart (GPT-2's c_attn is q, k and v): {config class: function(model, {path: LoRALinear})
# -> {fused layer: (A (r, in), B (out, r), [(path, its output rows)])}}, registered by the
# module that loads such models (interop/hf_gpt2.py). Other models: one layer per path.
PEFT_FACTORS: dict = {}


def _check_combination(kind, svd_rank, density, majority_sign_method, caller: str) -> None:
    if kind not in COMBINATION_TYPES:
        raise ValueError(f"{caller}: combination_type={kind!r} must be one of {COMBINATION_TYPES}")
    if svd_rank is not None and not kind.endswith("svd"):
        raise ValueError(
            f"{caller}: svd_rank={svd_rank!r} is used by the '*svd' types only; leave it None"
        )
    prunes = kind.removesuffix("_svd") in _PRUNING
    if prunes and (
        not isinstance(density, numbers.Real) or isinstance(density, bool) or not 0 <= density <= 1
    ):
        raise ValueError(
            f"{caller}: combination_type={kind!r} prunes: density={density!r} must be the "
            "fraction of entries kept, a number in [0, 1]"
        )
    if not prunes and density is not None:
        raise ValueError(
            f"{caller}: density={density!r} is used by {list(_PRUNING)} (and their '_svd' "
            f"forms) only, not {kind!r}; leave it None"
        )
    if majority_sign_method not in merge_methods.MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"{caller}: majority_sign_method={majority_sign_method!r} must be one of "
            f"{merge_methods.MAJORITY_SIGN_METHODS}"
        )


def peft_factors(model: Module, layers: dict) -> dict:
    """One adapter's factors as PEFT holds them: {layer: (A (r, in), B (out, r), scaling,
    [(path, the output rows it computes)])}; one layer per path, or the fused layers of
    ``PEFT_FACTORS`` (all their paths listed, adapted or not: PEFT adapts the whole layer)."""
    fused = PEFT_FACTORS.get(type(getattr(model, "config", None)))
    if fused is None:
        return {
            path: (layer.lora_A.data, layer.lora_B.data, layer.scaling, [(path, slice(None))])
            for path, layer in layers.items()
        }
    out = {}
    for unit, (A, B, pieces) in fused(model, layers).items():
        scalings = sorted({layers[path].scaling for path, _ in pieces if path in layers})
        if len(scalings) > 1:  # one PEFT layer has one scaling
            raise ValueError(
                f"add_weighted_adapter: the layers of {unit} ({[p for p, _ in pieces]}) have "
                f"scalings {scalings}; PEFT holds them as one layer with one scaling"
            )
        out[unit] = (A, B, scalings[0], pieces)
    return out


def _combination_plan(model, factors: list, adapters: list, kind: str, svd_rank) -> tuple:
    """({layer: pieces} in the model's order, the new rank), or a ValueError before anything
    is computed: ranks that differ where the method needs one, an SVD rank too large."""
    ranks = [max(f[0].shape[0] for f in by_unit.values()) for by_unit in factors]
    if kind == "cat":
        r = sum(ranks)
    elif kind.endswith("svd"):
        r = svd_rank or max(ranks)
    elif len(set(ranks)) > 1:
        raise ValueError(
            f"add_weighted_adapter: combination_type={kind!r} adds the A's and the B's "
            f"entry by entry, so every adapter needs the same rank; {adapters} have ranks "
            f"{ranks} (use 'cat' or 'svd')"
        )
    else:
        r = ranks[0]
    position = {path: i for i, (path, _) in enumerate(model.named_modules())}
    units = {}
    for by_unit in factors:
        for unit, (A, B, _, pieces) in by_unit.items():
            if kind in ("linear", *_PRUNING) and A.shape[0] != r:
                raise ValueError(
                    f"add_weighted_adapter: {unit} has rank {A.shape[0]}, not {r}, in one "
                    f"adapter; combination_type={kind!r} needs one rank everywhere"
                )
            if kind.endswith("svd"):  # a rank-k SVD needs k <= min(out, in)
                check_rank(r, (B.shape[0], A.shape[1]), unit)
            units.setdefault(unit, pieces)
    order = sorted(units, key=lambda u: min(position[p] for p, _ in units[u]))
    return {unit: units[unit] for unit in order}, r


def _uses_dora(layers: dict) -> bool:
    return any(isinstance(layer, DoRALinear) for layer in layers.values())


def _combine(kind: str, terms: list, r: int, density, sign_method: str, generator) -> tuple:
    """(A (r, in), B (out, r)) of one layer from its terms [(w, A, B, s)], by ``kind``."""
    if kind == "cat":
        return _cat(terms, r)
    method = kind.removesuffix("_svd")
    weights = [w for w, _, _, _ in terms]
    if kind.endswith("svd"):
        deltas = [s * backend.matmul(B, A, "lora.merge") for _, A, B, s in terms]  # (out, in)
        method = "linear" if method == "svd" else method
        delta = merge_methods.merge(method, deltas, weights, density, sign_method, generator)
        return _svd(delta, r)
    # A's and B's merged separately: √|wᵢsᵢ| on each, the sign of wᵢsᵢ on A (as PEFT)
    roots = [math.sqrt(abs(w * s)) for w, _, _, s in terms]
    signed = [
        root if w * s >= 0 else -root for root, (w, _, _, s) in zip(roots, terms, strict=True)
    ]
    As, Bs = [A for _, A, _, _ in terms], [B for _, _, B, _ in terms]
    A = merge_methods.merge(method, As, signed, density, sign_method, generator)
    B = merge_methods.merge(method, Bs, roots, density, sign_method, generator)
    return A.astype(As[0].dtype, copy=False), B.astype(Bs[0].dtype, copy=False)


def _cat(terms: list, r: int) -> tuple:
    """A (r, in) = the wᵢsᵢAᵢ stacked, B (out, r) = the Bᵢ side by side, zero-padded to r."""
    out_f, in_f = terms[0][2].shape[0], terms[0][1].shape[1]
    dtype, device = terms[0][1].dtype, backend.device_of(terms[0][1])
    A, B = backend.zeros((r, in_f), dtype, device), backend.zeros((out_f, r), dtype, device)
    row = 0
    for w, lora_A, lora_B, s in terms:  # the weight and the scaling go into A, as in PEFT
        rank = lora_A.shape[0]
        A[row : row + rank] = lora_A * w * s  # (r_i, in)
        B[:, row : row + rank] = lora_B  # (out, r_i)
        row += rank
    return A, B


def _svd(delta, k: int) -> tuple:
    """The top-k SVD of ``delta`` (out, in): A = V_kᵀ (k, in), B = U_k S_k (out, k)."""
    xp = backend.get_array_module(delta)
    U, S, Vh = xp.linalg.svd(delta, full_matrices=False)  # U (out, m), S (m,), Vh (m, in)
    return Vh[:k].copy(), U[:, :k] * S[:k]
