"""Experiments: the main demo (``minilora demo``), LoRA beside its relatives
(``minilora compare``, docs/relatives.md), training on little data (docs/little_data.md),
and the timing they and the benchmarks share (alternating rounds, paired ratios, and
"within noise" where the spread covers the difference).
"""
