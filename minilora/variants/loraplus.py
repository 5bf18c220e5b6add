"""LoRA+: a larger learning rate for B than for A (Hayou et al. 2024, arXiv 2402.12354).

In ``h = W0 x + s·B·A x`` the two factors are not symmetric: B starts at zero and its
gradient ``s·gᵀ(A x)`` scales with the width differently from A's. The paper shows that
with one learning rate for both, feature learning is inefficient at large width, and that
``lr_B = λ · lr_A`` with ``λ = loraplus_lr_ratio`` (16 in their experiments) fixes it. Only
the optimizer changes: :func:`create_loraplus_optimizer` (PEFT's name) builds parameter
groups for any optimizer of minilora/optim.py.

The groups, every trainable parameter in exactly one:

* ``lora_B`` matrices: ``lr · loraplus_lr_ratio``, weight decay ``loraplus_weight_decay``;
* ``lora_A`` and any other trainable matrix: ``lr``, weight decay ``loraplus_weight_decay``;
* embedding LoRA (``lora_embedding_A``/``lora_embedding_B``): ``loraplus_lr_embedding``, as
  PEFT;
* vectors (biases, LayerNorm weights, DoRA's ``lora_magnitude_vector``): ``lr``, no weight
  decay. The ratio is an argument about B's shape (out, r); a vector is not B, so it keeps
  A's rate. PEFT puts every 1-D parameter in B's group, which gives biases the boosted rate.

Empty groups are left out. Discussion: docs/math.md#lora-plus.
"""

from __future__ import annotations

import math

from minilora.nn import Module
from minilora.optim import AdamW, Optimizer


def create_loraplus_optimizer(
    model: Module,
    optimizer_cls: type[Optimizer] = AdamW,
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs,
) -> Optimizer:
    """``optimizer_cls`` over the model's trainable parameters in LoRA+'s groups (module
    docstring); ``kwargs`` (betas, eps, momentum...) go to the optimizer unchanged."""
    if not isinstance(model, Module):
        raise TypeError(
            f"create_loraplus_optimizer: model must be a Module, got {type(model).__name__}"
        )
    for name, value in (
        ("lr", lr),
        ("loraplus_lr_ratio", loraplus_lr_ratio),
        ("loraplus_lr_embedding", loraplus_lr_embedding),
        ("loraplus_weight_decay", loraplus_weight_decay),
    ):
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"create_loraplus_optimizer: {name}={value!r} must be a finite non-negative number"
            )
    if "weight_decay" in kwargs:
        raise ValueError(
            "create_loraplus_optimizer: pass loraplus_weight_decay (for the matrices), not "
            f"weight_decay={kwargs['weight_decay']!r}; vectors never decay"
        )
    groups = loraplus_groups(model)
    settings = {
        "A": {"lr": lr, "weight_decay": loraplus_weight_decay},
        "B": {"lr": lr * loraplus_lr_ratio, "weight_decay": loraplus_weight_decay},
        "embedding": {"lr": loraplus_lr_embedding, "weight_decay": loraplus_weight_decay},
        "vectors": {"lr": lr, "weight_decay": 0.0},
    }
    param_groups = [
        {"params": [p for _, p in groups[key]], **settings[key]} for key in settings if groups[key]
    ]
    if not param_groups:
        raise ValueError(
            "create_loraplus_optimizer: the model has no trainable parameters (apply_lora first?)"
        )
    return optimizer_cls(param_groups, lr=lr, **kwargs)


def loraplus_groups(model: Module) -> dict[str, list]:
    """The model's trainable ``(name, parameter)`` pairs by LoRA+ group: ``"A"``, ``"B"``,
    ``"embedding"``, ``"vectors"`` (see the module docstring)."""
    groups = {"A": [], "B": [], "embedding": [], "vectors": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("lora_embedding_"):
            groups["embedding"].append((name, p))
        elif p.ndim < 2:
            groups["vectors"].append((name, p))
        elif leaf == "lora_B":
            groups["B"].append((name, p))
        else:
            groups["A"].append((name, p))
    return groups
