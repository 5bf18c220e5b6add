"""The code being graded, as a check sees it.

A check (minilora/course/checks.py) never imports the student's modules: it reaches them
through ``ctx.student``, an object with the methods of :class:`InProcess`. Everything a
check gets back is either a plain value (a NumPy array, a number, a string, None, a dtype,
or a tuple, list or dict of those) or a stand-in for an object that lives with the student's
code (a Tensor, a layer, a function), which it can call, read and set attributes of, index,
iterate and combine with ``+ - * / @ ** -``. So that the same check runs whether the
student's code runs in this process or in another one (the grader's worker, reached through
``sandbox.Remote``, minilora/course/sandbox.py), a check keeps to these rules:

- Arrays cross by value. Read a tensor's numbers with ``ctx.value(t)``; change them by
  assignment (``p.data = p.data + d``), never in place (``p.data[...] += d``).
- Identity and type through the student object: ``ctx.student.same(a, b)``, not ``a is b``;
  ``ctx.student.is_tensor(x)``, not ``isinstance``; ``ctx.student.id(x)``, not ``id(x)``.
- No ``with`` on the student's objects (``no_grad``), and no function of the grader's handed
  to the student's code (a lambda that calls the student's code is fine: it runs here).
- No ``==`` or ``<`` between the student's objects (compare their values), and no dunder
  attribute read from them.
"""

from __future__ import annotations

import importlib

from minilora import backend

np = backend.module_for("cpu")  # NumPy


class InProcess:
    """The student's ``minilora`` package, imported in this process."""

    def module(self, name: str):
        """The student's ``minilora.<name>`` ("functional", "experiments.demo", ...)."""
        return importlib.import_module(f"minilora.{name}")

    def is_tensor(self, x) -> bool:
        return isinstance(x, self.module("autograd").Tensor)

    def value(self, x):
        """A plain copy of ``x``: a tensor's data, an array, or ``x`` itself."""
        if self.is_tensor(x):
            x = x.data
        return np.array(self.module("backend").to_numpy(x)) if hasattr(x, "shape") else x

    def same(self, a, b) -> bool:
        return a is b

    def id(self, x) -> int:
        return id(x)
