"""Experiments: the main demo (``minilora demo``), LoRA beside its relatives
(``minilora compare``, docs/relatives.md) and training on little data (docs/little_data.md).
"""
