"""Compression (docs/compression.md): int8, int4 and NF4 quantization, QLoRA (LoRA on a
4-bit base), truncated SVD, pruning, and ``compressed``, which applies them in one call.
"""
