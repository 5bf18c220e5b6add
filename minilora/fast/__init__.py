"""The fast path: faster versions of a few hot ops (ops.py), each proven equal to its
reference op in ``minilora/functional.py`` (tests/test_fast.py), and the process settings
for speed that the command and the benchmarks apply (process.py). Importing this package
registers the fast ops; ``MINILORA_OPS=reference`` runs the engine without them.
"""

from minilora.fast import ops, process

__all__ = ["ops", "process"]
