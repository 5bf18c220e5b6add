"""LoRA's variants (docs/relatives.md, docs/math.md): DoRA, PiSSA, VeRA, LoRA+, LoRA on
embeddings, per-module rank and alpha patterns, and several named adapters on one model.
Each builds on the book's ``LoRALinear`` (a subclass or a wrapper), never a branch inside it.
"""
