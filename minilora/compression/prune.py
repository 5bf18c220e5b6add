"""Magnitude pruning at three levels (after Han et al. 2015, "Learning both Weights and
Connections for Efficient Neural Networks", arXiv 1506.02626).

* **Connections**: zero the fraction ``sparsity`` of the weights with the smallest |w|,
  per tensor (``scope="layer"``) or over all targeted tensors together (``"global"``).
  Exactly ``round(sparsity · n)`` weights are zeroed (ties broken by position). The shapes
  do not change, so a dense file is as large as before: only a sparse format
  (:func:`csr_nbytes`) or sparse kernels turn zeros into savings. A boolean
  ``weight_mask`` is kept on each pruned ``Linear``; :func:`reapply_masks` after an
  optimizer step keeps the zeros at zero during fine-tuning.
* **Neurons**: remove MLP hidden units whole, shrinking ``fc1`` (rows) and ``fc2``
  (columns), so the parameter count falls by 2·C + 1 per unit (fc1's row and bias, fc2's
  column; 2·C without biases). A unit j is scored by
  ‖fc1.weight[j]‖₂ · ‖fc2.weight[:, j]‖₂, a bound on how much signal it can pass (its
  activation is gelu(fc1 row · x + bias), and fc2's column carries it out; a unit whose
  outgoing weights are zero contributes nothing and scores zero).
* **Blocks**: drop whole Transformer blocks, by index or the least important ones, scored
  by how much each block changes the residual stream on calibration tokens,
  ‖block(x) - x‖ / ‖x‖ (a block that barely changes x is nearly the identity).

All three act in place on a minilora GPT (``compress.compressed`` works on a copy).
"""

from __future__ import annotations

import dataclasses

from minilora import backend
from minilora.autograd import no_grad
from minilora.compression.quantize import BLOCK_LINEARS, target_linears
from minilora.nn import Linear, Module, ModuleList, Parameter

SCOPES = ("layer", "global")


def _check_sparsity(sparsity) -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise TypeError(f"sparsity={sparsity!r} must be a number in [0, 1)")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
    return float(sparsity)


def n_pruned(sparsity: float, n: int) -> int:
    """How many of ``n`` values a ``sparsity`` removes: round(sparsity · n), half up."""
    return int(sparsity * n + 0.5)


def _smallest(magnitudes, k: int):
    """A boolean keep-mask (n,) that drops the k smallest values (stable: ties by index)."""
    xp = backend.get_array_module(magnitudes)
    keep = xp.ones(magnitudes.shape, dtype=backend.bool_)
    keep[xp.argsort(magnitudes, kind="stable")[:k]] = False
    return keep


def prune_connections(
    model: Module, sparsity: float, target_modules=BLOCK_LINEARS, scope: str = "layer"
) -> list[str]:
    """Zero the smallest-|w| weights of the targeted ``Linear`` layers, in place, and keep
    each layer's ``weight_mask`` (an existing mask is combined: pruned stays pruned).
    Returns the pruned paths."""
    sparsity = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} must be one of {SCOPES}")
    layers = target_linears(model, target_modules, "prune_connections")
    if scope == "layer":
        masks = [
            _smallest(abs(m.weight.data).reshape(-1), n_pruned(sparsity, m.weight.size))
            for _, m in layers
        ]
    else:  # one threshold for all: rank every weight of every layer together
        xp = backend.get_array_module(layers[0][1].weight.data)
        flat = xp.concatenate([abs(m.weight.data).reshape(-1) for _, m in layers])
        keep = _smallest(flat, n_pruned(sparsity, flat.size))
        ends = [0]
        for _, m in layers:
            ends.append(ends[-1] + m.weight.size)
        masks = [keep[a:b] for a, b in zip(ends[:-1], ends[1:], strict=True)]
    for (_, m), keep in zip(layers, masks, strict=True):
        keep = keep.reshape(m.weight.shape)
        previous = vars(m).get("weight_mask")
        m.weight_mask = keep if previous is None else keep & previous
    reapply_masks(model)
    return [path for path, _ in layers]


def reapply_masks(model: Module) -> None:
    """Zero every masked weight again (call after each optimizer step when fine-tuning)."""
    for _, m in model.named_modules():
        mask = vars(m).get("weight_mask")
        if mask is not None:
            m.weight.data[~mask] = 0


def sparsity_report(model: Module, target_modules=BLOCK_LINEARS) -> dict:
    """Exact zero counts of the targeted weights: ``{"layers": {path: (zeros, size)},
    "zeros": Z, "size": N, "sparsity": Z / N}``."""
    layers = {
        path: (int((m.weight.data == 0).sum()), int(m.weight.size))
        for path, m in target_linears(model, target_modules, "sparsity_report")
    }
    zeros = sum(z for z, _ in layers.values())
    size = sum(n for _, n in layers.values())
    return {"layers": layers, "zeros": zeros, "size": size, "sparsity": zeros / size}


def csr_nbytes(weight, value_bytes: int = 4, index_bytes: int = 4) -> int:
    """Bytes of ``weight`` (out, in) in compressed sparse rows: nnz values and nnz column
    indices, plus out + 1 row offsets. Smaller than dense only below ~50% density."""
    nnz = int((weight != 0).sum())
    return nnz * (value_bytes + index_bytes) + (weight.shape[0] + 1) * index_bytes


def mlp_layers(model: Module) -> list[tuple[str, Module]]:
    """(path, module) for every module with ``fc1`` and ``fc2`` Linear layers (the MLPs)."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if type(vars(m).get("fc1")) is Linear and type(vars(m).get("fc2")) is Linear
    ]


def neuron_scores(mlp: Module):
    """‖fc1.weight[j]‖₂ · ‖fc2.weight[:, j]‖₂ for each hidden unit j, shape (H,)."""
    xp = backend.get_array_module(mlp.fc1.weight.data)
    incoming = xp.sqrt((mlp.fc1.weight.data.astype(backend.float64) ** 2).sum(axis=1))  # (H,)
    outgoing = xp.sqrt((mlp.fc2.weight.data.astype(backend.float64) ** 2).sum(axis=0))  # (H,)
    return incoming * outgoing


def prune_neurons(model: Module, sparsity: float) -> dict[str, list[int]]:
    """Remove round(sparsity · H) hidden units of every MLP (the lowest
    :func:`neuron_scores`, ties by index), shrinking fc1 to (H', C) and fc2 to (C, H'),
    in place. Removes C + 1 + C parameters per unit (fc1's row and bias, fc2's column),
    C + C without biases. Returns each MLP's kept unit indices."""
    sparsity = _check_sparsity(sparsity)
    mlps = mlp_layers(model)
    if not mlps:
        raise ValueError("prune_neurons: the model has no MLP with fc1 and fc2 Linear layers")
    kept = {}
    for path, mlp in mlps:
        H = mlp.fc1.out_features
        keep = _smallest(neuron_scores(mlp), n_pruned(sparsity, H))
        xp = backend.get_array_module(keep)
        idx = xp.nonzero(keep)[0]  # (H',) ascending: the units keep their order
        mlp.fc1 = _sliced(mlp.fc1, idx, None)
        mlp.fc2 = _sliced(mlp.fc2, slice(None), idx)
        kept[path] = [int(i) for i in backend.to_numpy(idx)]
    return kept


def _sliced(linear: Linear, rows, cols) -> Linear:
    """A new ``Linear`` with ``weight[rows][:, cols]`` (and the bias, its mask, sliced to match)."""
    new = Linear.__new__(Linear)
    vars(new).update(vars(linear))  # training mode, anything else it carries
    weight = linear.weight.data[rows]
    if cols is not None:
        weight = weight[:, cols]
    new.weight = Parameter(weight.copy(), requires_grad=linear.weight.requires_grad)
    new.out_features, new.in_features = weight.shape
    if linear.bias is not None and cols is None:  # fc1: one bias per kept row
        new.bias = Parameter(linear.bias.data[rows].copy(), requires_grad=linear.bias.requires_grad)
    mask = vars(linear).get("weight_mask")
    if mask is not None:
        new.weight_mask = mask[rows] if cols is None else mask[rows][:, cols]
    return new


def drop_blocks(model: Module, indices) -> list[int]:
    """Remove the Transformer blocks at ``indices`` (in place; ``model.config.n_layer``
    follows). At least one block must remain. Returns the kept original indices."""
    n = len(model.blocks)
    indices = list(indices)
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
    if bad or len(set(indices)) != len(indices) or len(indices) >= n:
        raise ValueError(
            f"drop_blocks: indices={indices!r} must be distinct block indices in [0, {n}) that "
            "leave at least one block"
        )
    keep = [i for i in range(n) if i not in indices]
    model.blocks = ModuleList([model.blocks[i] for i in keep])
    model.config = dataclasses.replace(model.config, n_layer=len(keep))
    return keep


def block_importance(model: Module, idx) -> list[float]:
    """‖block(x) - x‖ / ‖x‖ for each block, on calibration token ids ``idx`` (B, T), in
    eval mode without a graph: how far each block moves the residual stream."""
    model.eval()
    idx = backend.to_device(backend.array(idx, dtype=backend.int64), model.device)  # (B, T)
    xp = backend.get_array_module(idx)
    scores = []
    with no_grad():
        positions = backend.arange(idx.shape[1], dtype=backend.int64, device=model.device)
        x = model.tok_emb(idx) + model.pos_emb(positions)  # (B, T, C), as GPT.forward
        for block in model.blocks:
            y = block(x)
            scores.append(float(xp.linalg.norm(y.data - x.data) / xp.linalg.norm(x.data)))
            x = y
    return scores


def drop_least_important_blocks(model: Module, n: int, idx) -> list[int]:
    """Drop the ``n`` blocks with the lowest :func:`block_importance` on ``idx`` (ties by
    index), in place; returns the kept original indices."""
    scores = block_importance(model, idx)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < len(scores):
        raise ValueError(f"drop_least_important_blocks: n={n!r} must be in [0, {len(scores)})")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return drop_blocks(model, order[:n])
