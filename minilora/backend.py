"""The array backend: the only module in minilora that imports NumPy (or CuPy).

Everything else asks this module for the array module that owns its inputs
(``get_array_module``), for devices by name (``"cpu"``, ``"cuda"``), and for random
numbers. Keeping the import in one place is what lets the same readable code run on a
GPU: an op written as ``xp = get_array_module(x); xp.exp(x)`` works on NumPy and CuPy
arrays alike.

Random numbers are always drawn on the host with NumPy's PCG64 generator and then moved
to the target device, so the same seed gives the same numbers on every device.

Three devices: ``"cpu"`` (NumPy), ``"cuda"`` (CuPy, when installed with a GPU) and
``"standin"``, a CPU stand-in for a GPU: NumPy arrays behind CuPy's rules (they refuse
implicit conversion to NumPy), so tests without a GPU still catch host fallbacks. See
the "stand-in device" section below.

Matrix products go through :func:`matmul`, which can record what it computes (see
:class:`MatmulCounter`). Tests use that to *count* work, e.g. that a frozen weight never
gets a weight-gradient matmul, instead of timing it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types
from dataclasses import dataclass, field

import numpy as np

# The default dtype for parameters and activations. Gradient checks use float64.
DEFAULT_DTYPE = np.float32

float16 = np.float16
float32 = np.float32
float64 = np.float64
int64 = np.int64
bool_ = np.bool_

DTYPES = {"float16": float16, "float32": float32, "float64": float64}
DEVICES = ("cpu", "cuda", "standin")

ndarray = np.ndarray


# --------------------------------------------------------------------------------------
# CuPy, looked up lazily and never required
# --------------------------------------------------------------------------------------

_cupy = None
_cupy_checked = False


def cupy_module():
    """Return the ``cupy`` module, or ``None`` when it is not installed or has no device."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy  # noqa: PLC0415  (lazy on purpose: CuPy is optional)

            if cupy.cuda.runtime.getDeviceCount() > 0:
                _cupy = cupy
        except Exception:  # ImportError, or CUDA driver/runtime missing
            _cupy = None
    return _cupy


def cuda_available() -> bool:
    """True when CuPy is installed and at least one CUDA device is visible."""
    return cupy_module() is not None


def check_device(device: str) -> str:
    """Validate a device name and return it in canonical form."""
    if not isinstance(device, str) or device.split(":")[0] not in DEVICES:
        raise ValueError(f"device={device!r} is not a known device; expected one of {DEVICES}")
    name = device.split(":")[0]
    if name == "cuda" and not cuda_available():
        raise RuntimeError(
            "device='cuda' was requested but CuPy with a CUDA device is not available; "
            "install the gpu extra (pip install 'minilora[gpu]') or use device='cpu'"
        )
    return name


def get_array_module(*arrays):
    """Return the module that owns the given arrays: ``numpy``, ``cupy`` or ``standin``."""
    cp = _cupy
    for a in arrays:
        if isinstance(a, StandInArray):
            return standin
        if cp is not None and isinstance(a, cp.ndarray):
            return cp
    return np


def device_of(array) -> str:
    """The device name (``"cpu"``, ``"cuda"`` or ``"standin"``) an array lives on.

    Anything that is not a device array (a NumPy array, a Python number or list) is host
    data: ``"cpu"``.
    """
    if isinstance(array, StandInArray):
        return "standin"
    cp = _cupy
    if cp is not None and isinstance(array, cp.ndarray):
        return "cuda"
    return "cpu"


def module_for(device: str):
    """The array module that creates arrays on ``device``."""
    name = check_device(device)
    if name == "cuda":
        return cupy_module()
    return standin if name == "standin" else np


def to_device(array, device: str):
    """Move an array to ``device``; returns the array itself when it is already there.

    A move between two devices goes through the host; every move is an explicit copy, and
    is recorded inside :func:`recording_copies`.
    """
    device = check_device(device)
    source = device_of(array)
    if source == device:
        return array
    _record_copy(source, device, array)
    host = np.asarray(array) if source == "cpu" else array.get()  # .get(): device -> host
    if device == "cpu":
        return host
    if device == "cuda":
        return cupy_module().asarray(host)
    return standin.asarray(host)  # a copy, as cupy.asarray: device memory is not host memory


def to_numpy(array) -> np.ndarray:
    """A NumPy copy (or view) of any array, for printing, saving and tests."""
    source = device_of(array)
    if source != "cpu":
        _record_copy(source, "cpu", array)
        return array.get()
    return np.asarray(array)


def array(data, dtype=None, device: str | None = None):
    """Create an array from Python data or an existing array, on ``device``.

    ``device=None`` keeps an existing array where it is (Python data goes to the host).
    """
    source = device_of(data)
    out = np.asarray(data, dtype=dtype) if source == "cpu" else data
    if dtype is not None and out.dtype != dtype:
        out = out.astype(dtype)
    return to_device(out, source if device is None else device)


def zeros(shape, dtype=DEFAULT_DTYPE, device: str = "cpu"):
    return module_for(device).zeros(shape, dtype=dtype)


def ones(shape, dtype=DEFAULT_DTYPE, device: str = "cpu"):
    return module_for(device).ones(shape, dtype=dtype)


def arange(n: int, dtype=int64, device: str = "cpu"):
    """0, 1, ..., n-1 created directly on ``device`` (no host-to-device copy)."""
    return module_for(device).arange(n, dtype=dtype)


def broadcast_shapes(*shapes) -> tuple:
    """The shape that NumPy's broadcasting gives ``shapes`` (``ValueError`` if none).

    Shapes are host tuples whatever the device, so this is NumPy's function for every
    device (CuPy has no ``broadcast_shapes``).
    """
    return np.broadcast_shapes(*shapes)


def synchronize() -> None:
    """Wait until the GPU has finished all queued work (a no-op without CuPy).

    GPU calls return before the work is done, so a timer must synchronise before it
    reads the clock, or it measures only the time to queue the kernels.
    """
    if _cupy is not None:
        _cupy.cuda.Device().synchronize()


def unravel_index(flat: int, shape: tuple) -> tuple:
    """The multi-index (a tuple of ints) of flat position ``flat`` in a C-ordered array."""
    return tuple(int(i) for i in np.unravel_index(int(flat), shape))


def is_floating(array) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def is_integer(array) -> bool:
    return np.issubdtype(array.dtype, np.integer)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def resolve_dtype(dtype):
    """Accept ``"float32"``, ``np.float32`` or a NumPy dtype; return a NumPy scalar type."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; expected one of {list(DTYPES)}")
        return DTYPES[dtype]
    return np.dtype(dtype).type


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` where repeated indices accumulate (in place)."""
    xp = get_array_module(target)
    if xp is np:
        np.add.at(target, indices, values)
    elif xp is standin:
        np.add.at(target._a, _index(indices), _unwrap(values))
    else:  # CuPy's equivalent of ufunc.at
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, indices, values)


def max_keepdims(x, axis: int):
    """``x.max(axis=axis, keepdims=True)``, for the shift before a softmax's ``exp``.

    On NumPy, ``fmax.reduce`` finds the same maxima several times faster than ``max``
    (which propagates NaN element by element). They differ only on a row holding NaN,
    which a softmax turns into NaN either way.
    """
    if get_array_module(x) is np:
        return np.fmax.reduce(x, axis=axis, keepdims=True)
    return x.max(axis=axis, keepdims=True)


def set_num_threads(n: int):
    """Limit the BLAS threads NumPy uses (returns the limiter; ``None`` restores nothing).

    minilora's matrices are small: one BLAS thread per process is usually fastest, and on a
    shared or busy machine extra threads spin and can make each matmul ten times slower.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads={n!r} must be a positive integer")
    from threadpoolctl import threadpool_limits  # noqa: PLC0415  (only needed here)

    return threadpool_limits(limits=n, user_api="blas")


def keep_freed_host_memory() -> bool:
    """Ask the C library's ``malloc`` to keep freed memory for reuse (glibc; else a no-op).

    A training step allocates the same large arrays every step (activations, gradients,
    the temporaries of each op, megabytes each) and frees them again. By default glibc
    serves big requests with fresh ``mmap`` pages and hands freed memory at the top of the
    heap back to the OS, so the next step touches brand-new pages: each 4 KiB page costs a
    page fault and a zero fill, which on our (virtualised) machines cost several times the
    arithmetic of an elementwise op (GELU's forward inside a training step measured 7.1 ms
    with the default and 1.8 ms with this; docs/performance.md). Raising the two thresholds
    keeps that memory in the process for the next step, as PyTorch's caching allocators
    do; the price is that the process's resident memory stays near its peak.

    The ``minilora`` command and the benchmarks call it; importing minilora does not (a
    library should not change its user's allocator behind their back). It does nothing
    when the environment variable ``MINILORA_KEEP_FREED_MEMORY`` is ``0``. Returns True
    when the setting was applied.
    """
    if os.environ.get("MINILORA_KEEP_FREED_MEMORY", "1") == "0":
        return False
    import ctypes  # noqa: PLC0415  (only needed here)

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError, TypeError):  # no mallopt: not glibc (macOS, Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    # mmap only requests above 32 MiB (glibc's largest allowed value); give memory back to
    # the OS only when 1 GiB at the top of the heap is free
    mmap_ok = mallopt(m_mmap_threshold, 32 * 2**20)
    return bool(mmap_ok) and bool(mallopt(m_trim_threshold, 2**30))


# --------------------------------------------------------------------------------------
# Seeded random numbers, identical on every device
# --------------------------------------------------------------------------------------


class Generator:
    """A seeded random-number generator whose draws do not depend on the device.

    Numbers are drawn on the host (NumPy PCG64) in the requested dtype and then moved to
    ``device``; drawing on the host costs a copy per draw on a GPU, which is the price of
    bitwise-identical initialisation and dropout masks across devices.
    """

    def __init__(self, seed: int = 0):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed={seed!r} must be an int")
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def normal(self, shape, std: float = 1.0, dtype=DEFAULT_DTYPE, device: str = "cpu"):
        out = self._rng.standard_normal(shape, dtype=np.float64) * std
        return to_device(out.astype(dtype), device)

    def uniform(self, shape, low: float, high: float, dtype=DEFAULT_DTYPE, device: str = "cpu"):
        out = self._rng.uniform(low, high, size=shape)
        return to_device(out.astype(dtype), device)

    def random(self, shape, dtype=DEFAULT_DTYPE, device: str = "cpu"):
        """Uniform numbers in [0, 1)."""
        out = self._rng.random(shape, dtype=np.float64)
        return to_device(out.astype(dtype), device)

    def integers(self, low: int, high: int, shape, device: str = "cpu"):
        out = self._rng.integers(low, high, size=shape, dtype=np.int64)
        return to_device(out, device)

    def permutation(self, n: int):
        return self._rng.permutation(n)


# --------------------------------------------------------------------------------------
# Matrix products, with an optional counter
# --------------------------------------------------------------------------------------


@dataclass
class MatmulRecord:
    name: str  # what the product computes, e.g. "linear.dweight"
    shape_a: tuple
    shape_b: tuple
    flops: int  # 2 * (batch) * m * k * n multiply-adds counted as two operations


@dataclass
class MatmulCounter:
    """Records every product computed through :func:`matmul` inside ``counting()``."""

    records: list[MatmulRecord] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.records)

    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def count(self, name: str) -> int:
        return sum(1 for r in self.records if r.name == name)


_counter: MatmulCounter | None = None


@contextlib.contextmanager
def counting():
    """Count the matrix products computed inside the block::

    with backend.counting() as c:
        loss.backward()
    assert c.count("linear.dweight") == 0
    """
    global _counter
    previous, _counter = _counter, MatmulCounter()
    try:
        yield _counter
    finally:
        _counter = previous


def matmul(a, b, name: str = "matmul"):
    """``a @ b`` (batched like ``numpy.matmul``), recorded when a counter is active."""
    out = a @ b
    if _counter is not None:
        k = a.shape[-1]
        _counter.records.append(
            MatmulRecord(name, tuple(a.shape), tuple(b.shape), 2 * k * math.prod(out.shape))
        )
    return out


# --------------------------------------------------------------------------------------
# Copies between devices, recorded on request
# --------------------------------------------------------------------------------------


@dataclass
class CopyRecord:
    source: str  # device names, e.g. "cuda" -> "cpu"
    target: str
    shape: tuple


_copies: list[CopyRecord] | None = None


@contextlib.contextmanager
def recording_copies():
    """Record every copy between devices made by :func:`to_device` and :func:`to_numpy`::

    with backend.recording_copies() as copies:
        loss.backward()
    assert not [c for c in copies if c.target == "cpu"]   # nothing went to the host

    (``float(x)``, ``int(x)`` and ``.item()`` of one element are host reads too, but not
    array copies, and are not recorded.)
    """
    global _copies
    previous, _copies = _copies, []
    try:
        yield _copies
    finally:
        _copies = previous


def _record_copy(source: str, target: str, array) -> None:
    if _copies is not None:
        shape = tuple(array.shape) if hasattr(array, "shape") else np.shape(array)  # or a list
        _copies.append(CopyRecord(source, target, shape))


# --------------------------------------------------------------------------------------
# The stand-in device: a GPU's rules, on the CPU
# --------------------------------------------------------------------------------------
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
# tests (the ``device`` fixture) and by ``--device standin`` on the command line.

_IMPLICIT_CONVERSION = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
    "a NumPy array explicitly."
)  # CuPy's own message

# What CuPy's module has and minilora may use (extend only with names CuPy also has).
_STANDIN_FUNCTIONS = (
    "abs", "absolute", "all", "any", "arange", "argmax", "broadcast_to", "clip",
    "concatenate", "cumsum", "empty", "empty_like", "exp", "expm1", "full", "full_like",
    "isfinite", "isinf", "isnan", "log", "log1p", "matmul", "max", "maximum", "mean", "min",
    "minimum", "ones", "ones_like", "sort", "sqrt", "square", "stack", "sum", "tanh",
    "triu", "where", "zeros", "zeros_like",
)  # fmt: skip
_STANDIN_CONSTANTS = (
    "inf", "nan", "pi", "newaxis", "bool_", "float16", "float32", "float64", "int32",
    "int64", "dtype",
)  # fmt: skip
# What CuPy's arrays have and minilora may use; no route to host memory (.data, .ctypes,
# .tobytes(), .flat) is offered.
_STANDIN_ARRAY_ATTRIBUTES = frozenset((
    "T", "all", "any", "argmax", "argmin", "astype", "clip", "copy", "cumsum", "dtype",
    "fill", "flatten", "itemsize", "max", "mean", "min", "nbytes", "ndim", "nonzero",
    "prod", "ravel", "repeat", "reshape", "shape", "size", "squeeze", "std", "strides",
    "sum", "swapaxes", "take", "transpose", "var",
))  # fmt: skip


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


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and",
              "or", "xor"):  # fmt: skip
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
    "minilora.standin", "The stand-in device's array module: a CuPy-like face on NumPy."
)
standin.ndarray = StandInArray
standin.asarray = standin.array = _standin_asarray
for _name in _STANDIN_FUNCTIONS:
    setattr(standin, _name, _on_standin(getattr(np, _name)))
for _name in _STANDIN_CONSTANTS:
    setattr(standin, _name, getattr(np, _name))
