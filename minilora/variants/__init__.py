"""LoRA's variants (docs/relatives.md, docs/math.md): DoRA, PiSSA, VeRA, LoRA+, LoRA on
embeddings, trainable tokens, per-module rank and alpha patterns, and several named adapters
on one model.
Each builds on the book's ``LoRALinear`` (a subclass or a wrapper), never a branch inside it.

Importing this package registers DoRA, PiSSA, embedding LoRA, LoRA's bias on ``lora_B``,
trainable tokens and the patterns with the book's ``lora.py`` (its extension points), so that
``apply_lora`` knows ``use_dora``, ``init_lora_weights="pissa"``, embedding targets,
``lora_bias``, ``trainable_token_indices`` and ``rank_pattern``; ``import minilora`` imports it.
"""

from minilora.variants import (  # lora_bias after dora: it wraps DoRA's choice of layer
    dora,
    embedding,
    lora_bias,
    patterns,
    pissa,
    trainable_tokens,
)

__all__ = ["dora", "embedding", "lora_bias", "patterns", "pissa", "trainable_tokens"]
