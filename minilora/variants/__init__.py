"""LoRA's variants (docs/relatives.md, docs/math.md): DoRA, PiSSA, VeRA, LoRA+, LoRA on
embeddings, per-module rank and alpha patterns, and several named adapters on one model.
Each builds on the book's ``LoRALinear`` (a subclass or a wrapper), never a branch inside it.

Importing this package registers DoRA, PiSSA, embedding LoRA, LoRA's bias on ``lora_B`` and
the patterns with the book's ``lora.py`` (its extension points), so that ``apply_lora`` knows
``use_dora``, ``init_lora_weights="pissa"``, embedding targets, ``lora_bias`` and
``rank_pattern``; ``import minilora``
imports it.
"""

from minilora.variants import dora, embedding, lora_bias, patterns, pissa  # lora_bias after dora

__all__ = ["dora", "embedding", "lora_bias", "patterns", "pissa"]
