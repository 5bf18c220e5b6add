"""The array backend: the only module in minilora that imports NumPy (or CuPy).

Everything else asks this module for the array module that owns its inputs
(``get_array_module``), for devices by name (``"cpu"``, ``"cuda"``), and for random
numbers. Keeping the import in one place is what lets the same readable code run on a
GPU: an op written as ``xp = get_array_module(x); xp.exp(x)`` works on NumPy and CuPy
arrays alike.

Random numbers are always drawn on the host with NumPy's PCG64 generator and then moved
to the target device, so the same seed gives the same numbers on every device; the global
generator behind initialisation and dropout is reseeded by :func:`manual_seed`.

Which ops run is chosen here too: the reference ops of ``functional.py``, or the faster
versions that ``minilora/fast/ops.py`` registers in :data:`FAST_OPS` (:func:`set_ops`,
``MINILORA_OPS`` in the environment).

Matrix products go through :func:`matmul`, which can record what it computes (see
:class:`MatmulCounter`). Tests use that to *count* work, e.g. that a frozen weight never
gets a weight-gradient matmul, instead of timing it.
"""

from __future__ import annotations

import contextlib
import math
import os
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

ndarray = np.ndarray


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------
#
# "cpu" is NumPy. Every other device is an array module that follows CuPy's conventions:
# its arrays are instances of ``xp.ndarray``, ``xp.asarray(host_array)`` copies host data
# onto the device, and ``array.get()`` copies it back. "cuda" (CuPy) is registered the
# first time it is asked for and found; :func:`register_device` adds others (the test
# suite adds a CPU stand-in for a GPU this way, whose arrays follow CuPy's rules).

_device_modules: dict = {}  # device name -> array module, for every device but "cpu"
_cuda_checked = False


def cupy_module():
    """Return the ``cupy`` module, or ``None`` when it is not installed or has no device."""
    global _cuda_checked
    if not _cuda_checked:
        _cuda_checked = True
        try:
            import cupy  # lazy on purpose: CuPy is optional

            if cupy.cuda.runtime.getDeviceCount() > 0:
                _device_modules["cuda"] = cupy
        except Exception:  # ImportError, or CUDA driver/runtime missing
            pass
    return _device_modules.get("cuda")


def cuda_available() -> bool:
    """True when CuPy is installed and at least one CUDA device is visible."""
    return cupy_module() is not None


def register_device(name: str, xp) -> None:
    """Make ``name`` a device whose arrays belong to the array module ``xp`` (CuPy's
    conventions: ``xp.ndarray``, ``xp.asarray``, ``array.get()``)."""
    if not isinstance(name, str) or not name.isidentifier() or name in ("cpu", "cuda"):
        raise ValueError(f"register_device: name={name!r} must be a new identifier")
    _device_modules[name] = xp


def devices() -> tuple[str, ...]:
    """The device names :func:`check_device` accepts."""
    return ("cpu", "cuda", *(d for d in _device_modules if d != "cuda"))


def check_device(device: str) -> str:
    """Validate a device name (``"cuda:0"`` is read as ``"cuda"``) and return it."""
    name = device.split(":")[0] if isinstance(device, str) else None
    if name not in devices():
        raise ValueError(f"device={device!r} is not a known device; expected one of {devices()}")
    if name == "cuda" and not cuda_available():
        raise RuntimeError(
            "device='cuda' was requested but CuPy with a CUDA device is not available; "
            'install the gpu extra (pip install -e ".[gpu]" in a clone of minilora) or use '
            "device='cpu'"
        )
    return name


def get_array_module(*arrays):
    """Return the module that owns the given arrays: ``numpy``, or a device's (``cupy``)."""
    for a in arrays:
        if type(a) is not np.ndarray:
            for xp in _device_modules.values():
                if isinstance(a, xp.ndarray):
                    return xp
    return np


def device_of(array) -> str:
    """The device name an array lives on. Anything that is not a device array (a NumPy
    array, a Python number or list) is host data: ``"cpu"``."""
    if type(array) is not np.ndarray:
        for name, xp in _device_modules.items():
            if isinstance(array, xp.ndarray):
                return name
    return "cpu"


def module_for(device: str):
    """The array module that creates arrays on ``device``."""
    name = check_device(device)
    return np if name == "cpu" else _device_modules[name]


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
    return host if device == "cpu" else _device_modules[device].asarray(host)


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
    cupy = _device_modules.get("cuda")
    if cupy is not None:
        cupy.cuda.Device().synchronize()


def unravel_index(flat: int, shape: tuple) -> tuple:
    """The multi-index (a tuple of ints) of flat position ``flat`` in a C-ordered array."""
    return tuple(int(i) for i in np.unravel_index(int(flat), shape))


def is_floating(array) -> bool:
    # dtype.kind is what np.issubdtype(dtype, np.floating) decides, at a tenth of the cost
    # (it runs for most ops of every forward)
    return array.dtype.kind == "f"


def is_integer(array) -> bool:
    return array.dtype.kind in "iu"  # signed or unsigned; not bool


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def resolve_dtype(dtype):
    """Accept ``"float32"``, ``np.float32`` or a NumPy dtype; return a NumPy scalar type."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; expected one of {list(DTYPES)}")
        return DTYPES[dtype]
    return np.dtype(dtype).type


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


_default_generator = Generator(0)


def manual_seed(seed: int) -> None:
    """Reseed the global generator used for initialisation and dropout (like torch's)."""
    set_default_generator(Generator(seed))


def default_generator() -> Generator:
    """The global generator: what draws when no ``generator=`` is given."""
    return _default_generator


def set_default_generator(generator: Generator) -> Generator:
    """Make ``generator`` the global one; returns the previous one (to put it back)."""
    global _default_generator
    if not isinstance(generator, Generator):
        raise TypeError(f"generator must be a backend.Generator, got {type(generator).__name__}")
    previous, _default_generator = _default_generator, generator
    return previous


def torch_uniform_stream(seed: int, n: int):
    """``n`` numbers in [0, 1) (float64, each a multiple of 2⁻²⁴), the ones
    ``torch.Generator().manual_seed(seed)`` draws for a float32 ``uniform_`` on the CPU:
    32-bit MT19937 outputs (PyTorch seeds MT19937 as NumPy's ``RandomState(seed)`` does),
    each keeping its low 24 bits, times 2⁻²⁴. PyTorch then returns ``x·(to - from) + from``
    rounded to float32. Lets minilora rebuild PEFT's VeRA projections bit for bit without
    PyTorch (tests/test_vera.py checks it against PyTorch)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    raw = np.random.RandomState(int(seed)).randint(0, 2**32, size=n, dtype=np.uint32)
    return (raw & np.uint32(2**24 - 1)).astype(np.float64) * 2.0**-24


# --------------------------------------------------------------------------------------
# Which ops run: the reference ops (functional.py), or the fast path's (fast/ops.py)
# --------------------------------------------------------------------------------------

OPS_CHOICES = ("fast", "reference")

#: Reference op class -> its faster replacement; filled in by minilora/fast/ops.py.
FAST_OPS: dict[type, type] = {}


def check_ops(name, where: str) -> str:
    """``name`` if it is one of :data:`OPS_CHOICES`; else a ValueError naming ``where``."""
    if name not in OPS_CHOICES:
        raise ValueError(f"{where}={name!r} is not one of {OPS_CHOICES}")
    return name


#: The ops the engine runs unless ``MINILORA_OPS`` or :func:`set_ops` chooses. A student's
#: copy of an assignment says ``"reference"`` here (minilora/course/assignments.py), so that
#: its notebooks run the student's code.
DEFAULT_OPS = "fast"

_ops = check_ops(os.environ.get("MINILORA_OPS", DEFAULT_OPS), "MINILORA_OPS")


def set_ops(name: str) -> str:
    """Run the engine on ``"fast"`` ops (the default, :data:`DEFAULT_OPS`) or on the
    ``"reference"`` ops of functional.py alone; returns the previous setting."""
    global _ops
    previous, _ops = _ops, check_ops(name, "ops")
    return previous


def get_ops() -> str:
    """``"fast"`` or ``"reference"``: which ops the engine runs on."""
    return _ops


@contextlib.contextmanager
def use_ops(name: str):
    """``with use_ops("reference"):`` runs the block on those ops, then restores the setting."""
    previous = set_ops(name)
    try:
        yield
    finally:
        set_ops(previous)


def implementation(op: type) -> type:
    """The class that computes the reference op ``op``: its fast version, if there is one
    and the fast path is on; else ``op`` itself."""
    return FAST_OPS.get(op, op) if _ops == "fast" else op


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
