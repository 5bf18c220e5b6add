"""Studying LoRA: closed-form parameter, memory and FLOP counts (docs/accounting.md) and the
paper's section 7 analyses of what LoRA learns (notebook 09).
"""
