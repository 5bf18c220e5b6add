"""Merging task tensors, as PEFT's ``peft/utils/merge_utils.py`` does: task arithmetic,
magnitude pruning, TIES and DARE, in NumPy (CuPy on a GPU), one function per method.

A *task tensor* is one adapter's contribution to one layer (a ΔW, or a ``lora_A`` or a
``lora_B``); ``weights`` holds one number per tensor. Every method returns one tensor of
the same shape. ``add_weighted_adapter`` (multi_adapter.py) picks which tensors:

* ``task_arithmetic``: Σ wᵢ Tᵢ.
* ``magnitude_prune``: keep the ``density`` fraction of each Tᵢ's entries that are largest
  in absolute value, then Σ wᵢ Tᵢ.
* ``ties`` (Yadav et al. 2023, "TIES-Merging"): magnitude-prune each Tᵢ, elect a sign per
  entry (the sign of Σ Tᵢ, or of Σ sign(Tᵢ)), then average, entry by entry, the wᵢ Tᵢ whose
  sign agrees with it.
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2023, "Language Models are Super Mario"): drop
  each entry with probability 1 - ``density`` and divide the survivors by ``density``, so
  that each entry's expectation is unchanged; then task arithmetic or TIES.

The formulas, and which combinations are exact: docs/math.md, "Combining adapters the
ways PEFT does". DARE's masks come from a minilora ``Generator`` (PEFT draws them with
``torch.bernoulli``: the same distribution, not the same numbers).
"""

from __future__ import annotations

from minilora import backend

MAJORITY_SIGN_METHODS = ("total", "frequency")


def magnitude_based_pruning(tensor, density: float):
    """``tensor`` with all but its k = ⌊density · size⌋ entries of largest absolute value
    set to zero (PEFT: ``torch.topk`` on the flattened absolute values)."""
    xp = backend.get_array_module(tensor)
    k = int(density * tensor.size)
    keep = xp.argsort(-xp.abs(tensor).reshape(-1))[:k]  # the k largest |entries|
    mask = xp.zeros(tensor.size, dtype=tensor.dtype)
    mask[keep] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor, density: float, rescale: bool, generator: backend.Generator):
    """``tensor`` with each entry kept with probability ``density`` (a Bernoulli mask drawn
    from ``generator``), divided by ``density`` when ``rescale``: then E[result] = tensor."""
    device = backend.device_of(tensor)
    u = generator.random(tensor.shape, dtype=backend.float64, device=device)  # U[0, 1)
    pruned = tensor * (u < density)  # P(u < density) = density
    return pruned / density if rescale else pruned


def prune(tensor, density: float, method: str, rescale: bool = False, generator=None):
    """PEFT's ``prune``: nothing is pruned at density 1; ``method`` "magnitude" or "random"."""
    if density >= 1:
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale, generator)


def calculate_majority_sign_mask(stacked, method: str = "total"):
    """(n, ...) bool: where each of the n stacked tensors has the elected sign, the sign of
    Σ Tᵢ ("total") or of Σ sign(Tᵢ) ("frequency"), +1 on a tie. A zero entry never agrees."""
    xp = backend.get_array_module(stacked)
    sign = xp.sign(stacked)
    magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    majority = xp.where(magnitude >= 0, 1, -1)
    return sign == majority


def disjoint_merge(weighted, majority_sign_mask):
    """Entry by entry, the mean of the (already weighted) tensors that have the elected
    sign; 0 where none has it."""
    xp = backend.get_array_module(weighted)
    kept = (weighted * majority_sign_mask).sum(axis=0)
    count = majority_sign_mask.sum(axis=0)
    return kept / xp.maximum(count, 1)


def _weighted(tensors: list, weights: list):
    """The (n, ...) stack of wᵢ Tᵢ."""
    xp = backend.get_array_module(tensors[0])
    return xp.stack([w * t for w, t in zip(weights, tensors, strict=True)])


def task_arithmetic(tensors: list, weights: list):
    """Σ wᵢ Tᵢ."""
    return _weighted(tensors, weights).sum(axis=0)


def magnitude_prune(tensors: list, weights: list, density: float):
    """Σ wᵢ prune(Tᵢ), each Tᵢ pruned to its ``density`` largest entries."""
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors: list, weights: list, density: float, majority_sign_method: str = "total"):
    """TIES: prune by magnitude, elect the sign (of the pruned, unweighted tensors), then
    the mean of the agreeing wᵢ Tᵢ."""
    xp = backend.get_array_module(tensors[0])
    pruned = [prune(t, density, "magnitude") for t in tensors]
    mask = calculate_majority_sign_mask(xp.stack(pruned), majority_sign_method)
    return disjoint_merge(_weighted(pruned, weights), mask)


def dare_linear(tensors: list, weights: list, density: float, generator: backend.Generator):
    """DARE then task arithmetic: Σ wᵢ (mᵢ ⊙ Tᵢ) / density, mᵢ Bernoulli(density)."""
    pruned = [prune(t, density, "random", True, generator) for t in tensors]
    return task_arithmetic(pruned, weights)


def dare_ties(
    tensors: list,
    weights: list,
    density: float,
    generator: backend.Generator,
    majority_sign_method: str = "total",
):
    """DARE then TIES' sign election and disjoint mean."""
    xp = backend.get_array_module(tensors[0])
    pruned = [prune(t, density, "random", True, generator) for t in tensors]
    mask = calculate_majority_sign_mask(xp.stack(pruned), majority_sign_method)
    return disjoint_merge(_weighted(pruned, weights), mask)


def merge(method: str, tensors: list, weights: list, density, majority_sign_method, generator):
    """One of the methods above by PEFT's name ("linear" is task arithmetic)."""
    if method == "linear":
        return task_arithmetic(tensors, weights)
    if method == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if method == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if method == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if method == "dare_ties":
        return dare_ties(tensors, weights, density, generator, majority_sign_method)
    raise ValueError(f"merge: unknown method {method!r}")
