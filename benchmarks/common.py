"""What every benchmark script shares: configurations, timing, the machine, output.

Machines here are shared and noisy, so nothing is reported from a single time. Variants
are *alternated* in one run (A B, B A, A B, ...: the order flips every round so that a
slow drift of the machine hits both alike), each is timed many times, and we report
medians of the times and, for every ratio, the median of the per-round (paired) ratios
with their interquartile range, or "within noise" where that range covers the difference.
The timing itself is minilora's (minilora/experiments/timing.py), the same that
``minilora demo`` and ``minilora compare`` use.

Every script takes ``--quick`` (a few repeats, for smoke tests), ``--threads N`` (BLAS
threads for NumPy via threadpoolctl, intra-op threads for PyTorch; default 1) and
``--out DIR`` (where the JSON goes; default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `examples.torch_gpt` imports when run as a script
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from minilora import GPT, GPTConfig, fast, manual_seed  # noqa: E402

# the one timing implementation, shared with `minilora demo` and `minilora compare`; the
# scripts call common.alternate and common.forwards
from minilora.experiments.timing import alternate, forwards, paired_ratio  # noqa: E402, F401

fast.process.keep_freed_host_memory()  # as the minilora command does; off with ..._MEMORY=0

RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """A model shape and a batch: what one training step or forward works on."""

    name: str
    config: GPTConfig
    batch_size: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.config.block_size

    def describe(self) -> str:
        c = self.config
        return (
            f"L={c.n_layer} C={c.n_embd} nh={c.n_head} T={c.block_size} V={c.vocab_size} "
            f"B={self.batch_size}"
        )


CONFIGS = {
    # the demo's shipped base model and batch (minilora/experiments/demo.py)
    "tiny": Bench("tiny", GPTConfig(16, 18, n_layer=2, n_head=4, n_embd=64), 64),
    "small": Bench("small", GPTConfig(64, 64, n_layer=4, n_head=4, n_embd=128), 16),
    "medium": Bench("medium", GPTConfig(64, 128, n_layer=6, n_head=8, n_embd=256), 16),
    # wide and short: the linear layers' matmuls dominate (LoRA vs full fine-tuning)
    "wide": Bench("wide", GPTConfig(64, 32, n_layer=2, n_head=8, n_embd=512), 16),
}


def build_model(bench: Bench, seed: int = 0) -> GPT:
    manual_seed(seed)
    return GPT(bench.config)


def batch(bench: Bench, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and targets (B, T), the same for every engine."""
    rng = np.random.default_rng(seed)
    shape = (bench.batch_size, bench.config.block_size)
    V = bench.config.vocab_size
    return rng.integers(0, V, shape, dtype=np.int64), rng.integers(0, V, shape, dtype=np.int64)


# --------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------

_limiter = None  # threadpoolctl's limiter must stay alive for the limit to hold


def set_threads(n: int, torch_too: bool = True) -> None:
    """Use ``n`` threads in NumPy's BLAS and, if PyTorch is importable, in PyTorch."""
    global _limiter
    _limiter = fast.process.set_num_threads(n)
    if torch_too:
        torch = optional_torch()
        if torch is not None:
            torch.set_num_threads(n)


def optional_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def summary(seconds: list[float]) -> dict:
    """Median and spread (quartiles) of a list of times, in seconds."""
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return {
        "median_s": statistics.median(seconds),
        "q1_s": q[0],
        "q3_s": q[2],
        "min_s": min(seconds),
        "n": len(seconds),
    }


def ratio(times: dict, a: str, b: str) -> dict:
    """``a`` over ``b``, paired by round (:func:`minilora.experiments.timing.paired_ratio`):
    ``ratio`` is the median of the per-round ratios, ``q1`` and ``q3`` its quartiles,
    ``within_noise`` whether they cover the difference, and ``text`` what a table prints."""
    r = paired_ratio(times, a, b)
    return {
        "ratio": r.median,
        "q1": r.q1,
        "q3": r.q3,
        "rounds": r.rounds,
        "within_noise": r.within_noise,
        "text": str(r),
    }


# --------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, versions, BLAS and thread counts."""
    from threadpoolctl import threadpool_info

    blas = [
        {k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for lib in threadpool_info()
        if lib.get("user_api") == "blas"
    ]
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": blas,
    }
    torch = optional_torch()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_mkl"] = bool(torch.backends.mkl.is_available())
    return info


# --------------------------------------------------------------------------------------
# Command line and output
# --------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few repeats (a smoke test)")
    p.add_argument("--threads", type=int, default=1, help="BLAS / PyTorch threads (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    return p


def write_json(out: Path, name: str, result: dict, args: argparse.Namespace) -> Path:
    """Write ``result`` with the machine description and the command to ``out/name.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    result = {
        "benchmark": name,
        "command": "python " + " ".join([f"benchmarks/{name}.py", *sys.argv[1:]]),
        "threads": args.threads,
        "quick": args.quick,
        "machine": machine(),
        **result,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` is a list of (key, header); floats get 3 digits."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for c in cells:
        out.append("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))
    return "\n".join(out)


def ms(seconds: float) -> float:
    return seconds * 1e3


# --------------------------------------------------------------------------------------
# Training steps: minilora and its PyTorch twin
# --------------------------------------------------------------------------------------


def minilora_step(model, optimizer, x, y) -> Callable[[], float]:
    """One training step (forward, backward, AdamW), as ``minilora.train.train`` runs it,
    without gradient clipping; returns the loss."""

    def step() -> float:
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def torch_twin(model: GPT, lr: float = 1e-3, weight_decay: float = 1e-2):
    """The same GPT in PyTorch eager (``examples/torch_gpt.py``), with the same weights, and
    ``torch.optim.AdamW`` with the same settings as minilora's defaults. None without torch."""
    torch = optional_torch()
    if torch is None:
        return None
    from examples.torch_gpt import TorchGPT, load_minilora_state

    twin = TorchGPT(model.config)
    load_minilora_state(twin, model.state_dict())
    twin.train()
    trainable = [p for p in twin.parameters() if p.requires_grad]
    return twin, torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)


def torch_step(twin, optimizer, x, y) -> Callable[[], float]:
    torch = optional_torch()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> float:
        _, loss = twin(tx, ty)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step
