"""Timing that holds on a busy machine: alternate the variants, pair each round, and say
when the difference is noise.

A laptop or a shared lab machine runs other work while we time, and that load comes and
goes within a second. Timing variant A for a while and then variant B would charge each
with whatever the machine did meanwhile, so every timing here is made the same way:

1. **Alternate**: one round runs every variant once; the order flips every round
   (A B C, then C B A, then A B C, ...), so that a slow drift of the machine and the
   position in a round hit every variant alike.
2. **Pair**: each round gives the ratio of a variant's time to the base's time *in that
   round*. Load that changes from one round to the next slows both alike and cancels.
3. **Summarise**: the median of the paired ratios, with their interquartile range (the
   middle half of the rounds). When that range contains 1.00x, or is wider than the
   distance from 1.00x, this run cannot tell the variant from the base: the result is
   *within noise*, and is printed in those words, not as a number that looks like a finding.

``minilora demo``, ``minilora compare``, the notebooks and ``benchmarks/`` all time with
these functions. Timings are never asserted in tests (tests/test_timing.py checks the
order of the calls and the arithmetic, with made-up times).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from minilora import backend
from minilora.autograd import no_grad


def alternate(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times in alternating rounds (A B C, C B A, A B C, ...).

    ``warmup`` untimed rounds run first (caches, lazily created optimizer state, the
    allocator's pools). Returns ``{name: [seconds of round 0, round 1, ...]}``: entry ``i``
    of every list comes from the same round, which is what :func:`paired_ratio` pairs.
    """
    if repeats < 1:
        raise ValueError(f"repeats is {repeats}; expected at least 1 timed round")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            backend.synchronize()  # a GPU runs asynchronously: wait before reading the clock
            t0 = time.perf_counter()
            fns[name]()
            backend.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def forwards(models: dict, x) -> dict[str, Callable[[], object]]:
    """One inference forward of ``x`` (B, T) per model, under ``no_grad``, ready for
    :func:`alternate`."""

    def forward(model):
        def run():
            with no_grad():
                return model(x)[0]

        return run

    return {name: forward(model) for name, model in models.items()}


@dataclass(frozen=True)
class PairedRatio:
    """A variant's time over the base's, summarised over paired rounds.

    ``median`` of the per-round ratios; ``q1``, ``q3`` their quartiles (the spread);
    ``rounds`` how many rounds were paired.
    """

    median: float
    q1: float
    q3: float
    rounds: int

    @property
    def within_noise(self) -> bool:
        """True when the spread covers the effect: the interquartile range contains 1.00x,
        or the median is closer to 1.00x than the range is wide."""
        return self.q1 <= 1.0 <= self.q3 or abs(self.median - 1.0) < self.q3 - self.q1

    def __str__(self) -> str:
        spread = f"IQR {self.q1:.2f}-{self.q3:.2f}"
        if self.within_noise:
            return f"within noise ({self.median:.2f}x, {spread})"
        return f"{self.median:.2f}x ({spread})"

    def as_dict(self) -> dict:
        return {**asdict(self), "within_noise": self.within_noise}


def paired_ratios(times: dict[str, list[float]], name: str, base: str) -> list[float]:
    """Round by round, ``name``'s time over ``base``'s (``times`` from :func:`alternate`)."""
    return [t / b for t, b in zip(times[name], times[base], strict=True)]


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> PairedRatio:
    """The median of the per-round ratios of ``name`` to ``base``, with its quartiles."""
    ratios = paired_ratios(times, name, base)
    median = statistics.median(ratios)
    if len(ratios) == 1:
        q1 = q3 = median
    else:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return PairedRatio(median, q1, q3, len(ratios))


def median_times(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds per call of each variant."""
    return {name: statistics.median(ts) for name, ts in times.items()}
