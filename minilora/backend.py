"""The array backend: the only module in minilora that imports NumPy (or CuPy).

Everything else asks this module for the array module that owns its inputs
(``get_array_module``), for devices by name (``"cpu"``, ``"cuda"``), and for random
numbers. Keeping the import in one place is what lets the same readable code run on a
GPU: an op written as ``xp = get_array_module(x); xp.exp(x)`` works on NumPy and CuPy
arrays alike.

Random numbers are always drawn on the host with NumPy's PCG64 generator and then moved
to the target device, so the same seed gives the same numbers on every device.

Matrix products go through :func:`matmul`, which can record what it computes (see
:class:`MatmulCounter`). Tests use that to *count* work, e.g. that a frozen weight never
gets a weight-gradient matmul, instead of timing it.
"""

from __future__ import annotations

import contextlib
import math
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
DEVICES = ("cpu", "cuda")

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
    """Return ``numpy`` or ``cupy``: the module that owns the given arrays."""
    cp = _cupy
    if cp is not None:
        for a in arrays:
            if isinstance(a, cp.ndarray):
                return cp
    return np


def device_of(array) -> str:
    """The device name (``"cpu"`` or ``"cuda"``) an array lives on."""
    cp = _cupy
    if cp is not None and isinstance(array, cp.ndarray):
        return "cuda"
    return "cpu"


def to_device(array, device: str):
    """Move an array to ``device``; returns the array itself when it is already there."""
    device = check_device(device)
    if device_of(array) == device:
        return array
    if device == "cuda":
        return cupy_module().asarray(array)
    return array.get()  # CuPy -> NumPy, an explicit copy to the host


def to_numpy(array) -> np.ndarray:
    """A NumPy copy (or view) of any array, for printing, saving and tests."""
    if device_of(array) == "cuda":
        return array.get()
    return np.asarray(array)


def array(data, dtype=None, device: str = "cpu"):
    """Create an array from Python data or an existing array, on ``device``."""
    out = np.asarray(data, dtype=dtype) if device_of(data) == "cpu" else data
    if dtype is not None and out.dtype != dtype:
        out = out.astype(dtype)
    return to_device(out, device)


def zeros(shape, dtype=DEFAULT_DTYPE, device: str = "cpu"):
    xp = cupy_module() if check_device(device) == "cuda" else np
    return xp.zeros(shape, dtype=dtype)


def ones(shape, dtype=DEFAULT_DTYPE, device: str = "cpu"):
    xp = cupy_module() if check_device(device) == "cuda" else np
    return xp.ones(shape, dtype=dtype)


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
    else:  # CuPy's equivalent of ufunc.at
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, indices, values)


def set_num_threads(n: int):
    """Limit the BLAS threads NumPy uses (returns the limiter; ``None`` restores nothing).

    minilora's matrices are small: one BLAS thread per process is usually fastest, and on a
    shared or busy machine extra threads spin and can make each matmul ten times slower.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads={n!r} must be a positive integer")
    from threadpoolctl import threadpool_limits  # noqa: PLC0415  (only needed here)

    return threadpool_limits(limits=n, user_api="blas")


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
