"""Process settings for speed, applied by the ``minilora`` command and the benchmarks (never
by importing minilora: a library should not change its user's threads or allocator behind
their back): BLAS threads, and glibc's ``malloc`` keeping freed memory for the next step.
Measurements: docs/performance.md.
"""

from __future__ import annotations

import os


def set_num_threads(n: int):
    """Limit the BLAS threads NumPy uses (returns the limiter; ``None`` restores nothing).

    Small matrices (the digit tasks' models) are fastest on one BLAS thread per process: on a
    shared or busy machine extra threads spin and can make each matmul ten times slower.
    GPT-2 small's are large enough to gain from every core; the ``minilora`` command picks
    the count by the model's size (``default_threads`` in minilora/cli/options.py).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads={n!r} must be a positive integer")
    from threadpoolctl import threadpool_limits  # only needed here

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
    import ctypes  # only needed here

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError, TypeError):  # no mallopt: not glibc (macOS, Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    # mmap only requests above 32 MiB (glibc's largest allowed value); give memory back to
    # the OS only when 1 GiB at the top of the heap is free
    mmap_ok = mallopt(m_mmap_threshold, 32 * 2**20)
    return bool(mmap_ok) and bool(mallopt(m_trim_threshold, 2**30))
