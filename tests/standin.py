"""The stand-in device: a GPU's rules, on the CPU (a test double, registered by tests).

CI has no GPU, yet most bugs a GPU run finds are not about the GPU: they are host
fallbacks, places where code quietly treats a device array as a NumPy array
(``numpy.asarray(x)``, ``np.exp(x)``, ``x + host_array``, handing ``x`` to safetensors)
or calls a NumPy function CuPy does not have. CuPy refuses all of these; NumPy accepts
them, so a CPU-only test suite never sees them. ``register()`` adds a device named
"standin" to minilora's backend (``backend.register_device``): an array module that
stores its data in NumPy but follows CuPy's rules:

* its arrays refuse implicit conversion: ``numpy.asarray(x)`` raises CuPy's TypeError,
  and NumPy ufuncs refuse them (``__array_ufunc__ = None``). ``x.get()`` is the explicit
  copy to the host. ``float(x)``, ``int(x)``, ``bool(x)``, ``x.item()`` and
  ``x.tolist()`` work, as in CuPy (on a GPU each one waits for the device);
* arithmetic or functions that mix its arrays with NumPy arrays raise TypeError, as
  CuPy does ("Unsupported type <class 'numpy.ndarray'>");
* reductions and scalar indexing give 0-d arrays, not NumPy scalars, as CuPy does;
* its module and its arrays offer only names that CuPy also has (_STANDIN_FUNCTIONS,
  _STANDIN_ARRAY_ATTRIBUTES), so code that uses a NumPy-only function fails here too.

Stricter than CuPy in two places, on purpose: host arrays are refused as values in
``x[...] = v`` and in numpy-ufunc calls (CuPy copies or dispatches some of them).
The numbers are NumPy's, so a run on "standin" is bitwise the run on "cpu". It says
nothing about GPU speed or GPU rounding: it is a guard for correctness.
"""

from __future__ import annotations

import functools
import types

import numpy as np

from minilora import backend

#
# CI has no GPU, yet most bugs a GPU run finds are not about the GPU: they are host
# fallbacks, places where code quietly treats a device array as a NumPy array
# (``numpy.asarray(x)``, ``np.exp(x)``, ``x + host_array``, handing ``x`` to safetensors)
# or calls a NumPy function CuPy does not have. CuPy refuses all of these; NumPy accepts
# them, so a CPU-only test suite never sees them. The "standin" device is a third array
# module that stores its data in NumPy but follows CuPy's rules:
#
# * its arrays refuse implicit conversion: ``numpy.asarray(x)`` raises CuPy's TypeError,
#   and NumPy ufuncs refuse them (``__array_ufunc__ = None``). ``x.get()`` is the explicit
#   copy to the host. ``float(x)``, ``int(x)``, ``bool(x)``, ``x.item()`` and
#   ``x.tolist()`` work, as in CuPy (on a GPU each one waits for the device);
# * arithmetic or functions that mix its arrays with NumPy arrays raise TypeError, as
#   CuPy does ("Unsupported type <class 'numpy.ndarray'>");
# * reductions and scalar indexing give 0-d arrays, not NumPy scalars, as CuPy does;
# * its module and its arrays offer only names that CuPy also has (_STANDIN_FUNCTIONS,
#   _STANDIN_ARRAY_ATTRIBUTES), so code that uses a NumPy-only function fails here too.
#
# Stricter than CuPy in two places, on purpose: host arrays are refused as values in
# ``x[...] = v`` and in numpy-ufunc calls (CuPy copies or dispatches some of them).
# The numbers are NumPy's, so a run on "standin" is bitwise the run on "cpu". It says
# nothing about GPU speed or GPU rounding: it is a guard for correctness, used by the
# tests (the ``device`` fixture).

_IMPLICIT_CONVERSION = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
    "a NumPy array explicitly."
)  # CuPy's own message

# What CuPy's module has and minilora may use (extend only with names CuPy also has).
_STANDIN_FUNCTIONS = (
    "abs",
    "absolute",
    "all",
    "any",
    "arange",
    "argmax",
    "argsort",
    "broadcast_to",
    "clip",
    "concatenate",
    "cumsum",
    "empty",
    "empty_like",
    "exp",
    "expm1",
    "full",
    "full_like",
    "isfinite",
    "isinf",
    "isnan",
    "log",
    "log1p",
    "matmul",
    "max",
    "maximum",
    "mean",
    "min",
    "minimum",
    "nonzero",
    "ones",
    "ones_like",
    "repeat",
    "searchsorted",
    "sign",
    "sort",
    "sqrt",
    "square",
    "stack",
    "sum",
    "tanh",
    "triu",
    "where",
    "zeros",
    "zeros_like",
)
_STANDIN_CONSTANTS = (
    "inf",
    "nan",
    "pi",
    "newaxis",
    "bool_",
    "float16",
    "float32",
    "float64",
    "int32",
    "int64",
    "uint8",
    "dtype",
    "finfo",  # cupy.finfo is numpy's
)
# What CuPy's arrays have and minilora may use; no route to host memory (.data, .ctypes,
# .tobytes(), .flat) is offered.
_STANDIN_ARRAY_ATTRIBUTES = frozenset(
    (
        "T",
        "all",
        "any",
        "argmax",
        "argmin",
        "astype",
        "clip",
        "copy",
        "cumsum",
        "dtype",
        "fill",
        "flatten",
        "itemsize",
        "max",
        "mean",
        "min",
        "nbytes",
        "ndim",
        "nonzero",
        "prod",
        "ravel",
        "repeat",
        "reshape",
        "shape",
        "size",
        "squeeze",
        "std",
        "strides",
        "sum",
        "swapaxes",
        "take",
        "transpose",
        "var",
    )
)


class StandInArray:
    """An array on the ``"standin"`` device: NumPy data behind CuPy's rules (see above)."""

    __slots__ = ("_a",)
    __array_ufunc__ = None  # np.exp(x) and host_array + x refuse it, as for a GPU array
    __hash__ = None

    def __init__(self, data: np.ndarray):
        self._a = data

    # ---- the guard: no implicit way to the host ------------------------------------

    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT_CONVERSION)

    def get(self) -> np.ndarray:
        """A NumPy copy on the host (the explicit device-to-host copy, as in CuPy)."""
        return self._a.copy()

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    def __float__(self) -> float:
        return float(self._a)  # one element only, as in NumPy and CuPy

    def __int__(self) -> int:
        return int(self._a)

    def __bool__(self) -> bool:
        return bool(self._a)

    def __index__(self) -> int:
        return self._a.__index__()

    def __format__(self, spec: str) -> str:
        return format(self._a, spec)

    def __repr__(self) -> str:
        return f"standin:{self._a!r}"

    # ---- the rest of an array, each result a stand-in array again --------------------

    def __getattr__(self, name: str):
        if name not in _STANDIN_ARRAY_ATTRIBUTES:
            raise AttributeError(
                f"a stand-in device array has no attribute {name!r} (it offers what CuPy's "
                "arrays offer; use .get() for a NumPy copy)"
            )
        value = getattr(self._a, name)
        return _on_standin(value) if callable(value) else _wrap(value)

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __getitem__(self, index):
        return _wrap(self._a[_index(index)])

    def __setitem__(self, index, value):
        value = _operand(value)
        if value is NotImplemented:
            raise TypeError(f"Unsupported type {type(value)}")
        self._a[_index(index)] = value

    def __copy__(self) -> StandInArray:
        return StandInArray(self._a.copy())

    def __deepcopy__(self, memo) -> StandInArray:
        return StandInArray(self._a.copy())

    def __reduce__(self):
        return StandInArray, (self._a,)


def _operand(x):
    """An operand for NumPy: a stand-in array's data, or a scalar; host arrays refused."""
    if isinstance(x, StandInArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")  # CuPy refuses host arrays here
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return x
    return NotImplemented  # e.g. a Tensor: let its reflected operator answer


def _binary(name: str):
    def op(self, other):
        other = _operand(other)
        if other is NotImplemented:
            return NotImplemented
        return _wrap(getattr(self._a, name)(other))

    return op


def _inplace(name: str):
    def op(self, other):
        other = _operand(other)
        if other is NotImplemented:
            return NotImplemented
        getattr(self._a, name)(other)
        return self

    return op


def _unary(name: str):
    return lambda self: _wrap(getattr(self._a, name)())


for _name in (
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "matmul",
    "and",
    "or",
    "xor",
    "lshift",
    "rshift",
):
    setattr(StandInArray, f"__{_name}__", _binary(f"__{_name}__"))
    setattr(StandInArray, f"__r{_name}__", _binary(f"__r{_name}__"))
    setattr(StandInArray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(StandInArray, f"__{_name}__", _binary(f"__{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(StandInArray, f"__{_name}__", _unary(f"__{_name}__"))


def _wrap(x):
    """NumPy results as stand-in arrays; NumPy scalars become 0-d arrays, as in CuPy."""
    if isinstance(x, np.ndarray):
        return StandInArray(x)
    if isinstance(x, np.generic):
        return StandInArray(np.asarray(x))
    if isinstance(x, (tuple, list)):
        return type(x)(_wrap(v) for v in x)
    return x


def _unwrap(x):
    """Arguments for NumPy: stand-in arrays unwrapped (also inside lists and tuples);
    host arrays refused, as CuPy's functions refuse them."""
    if isinstance(x, StandInArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    if isinstance(x, (tuple, list)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _index(index):
    """An index for NumPy. Host index arrays are allowed: CuPy copies them to the device."""
    if isinstance(index, StandInArray):
        return index._a
    if isinstance(index, tuple):
        return tuple(_index(i) for i in index)
    return index


def _on_standin(fn):
    """``fn`` (a NumPy function or array method) taking and returning stand-in arrays."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        out = fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        return _wrap(out)

    return call


def _standin_asarray(data, dtype=None):
    """Host data or a stand-in array -> a stand-in array. Host data is copied, as
    ``cupy.asarray`` copies it into device memory."""
    if isinstance(data, StandInArray):
        return data if dtype is None or data.dtype == dtype else data.astype(dtype)
    return StandInArray(np.array(data, dtype=dtype, copy=True))


standin = types.ModuleType(
    "standin", "The stand-in device's array module: a CuPy-like face on NumPy."
)
standin.ndarray = StandInArray
standin.asarray = standin.array = _standin_asarray
for _name in _STANDIN_FUNCTIONS:
    setattr(standin, _name, _on_standin(getattr(np, _name)))
for _name in _STANDIN_CONSTANTS:
    setattr(standin, _name, getattr(np, _name))


class _UfuncWithAt:
    """``standin.add``: CuPy's ``cupy.add`` with its ``at`` (scatter-add, repeats accumulate)."""

    def __call__(self, a, b):
        return _wrap(np.add(*_unwrap((a, b))))

    def at(self, target, indices, values) -> None:
        np.add.at(_unwrap(target), _index(indices), _unwrap(values))


standin.add = _UfuncWithAt()


def _linalg(fn):
    """A ``np.linalg`` function on stand-in arrays; a named-tuple result as a plain tuple."""

    def call(a, **kwargs):
        out = fn(_unwrap(a), **kwargs)
        return _wrap(tuple(out) if isinstance(out, tuple) else out)

    return call


standin.linalg = types.SimpleNamespace(  # cupy.linalg's names that minilora uses
    norm=_on_standin(np.linalg.norm),
    svd=_linalg(np.linalg.svd),  # (U, S, Vh), or S alone with compute_uv=False
    qr=_linalg(np.linalg.qr),  # (Q, R)
)


def register() -> None:
    """Make "standin" a device minilora accepts (idempotent)."""
    if "standin" not in backend.devices():
        backend.register_device("standin", standin)
