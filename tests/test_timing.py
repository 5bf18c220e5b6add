"""minilora/experiments/timing.py: the order of the calls and the arithmetic of paired ratios,
checked with recorded calls and made-up times (never with timed assertions)."""

import pytest

from minilora.experiments import timing
from minilora.experiments.compare import latency_table


def recorder(calls: list, name: str):
    return lambda: calls.append(name)


def test_alternate_runs_a_warmup_round_then_flips_the_order_every_round():
    calls = []
    fns = {name: recorder(calls, name) for name in "ABC"}
    times = timing.alternate(fns, repeats=4, warmup=1)
    warmup = list("ABC")
    rounds = list("ABC") + list("CBA") + list("ABC") + list("CBA")
    assert calls == warmup + rounds
    assert {name: len(ts) for name, ts in times.items()} == {"A": 4, "B": 4, "C": 4}
    assert all(t >= 0.0 for ts in times.values() for t in ts)


def test_alternate_refuses_zero_rounds():
    with pytest.raises(ValueError, match="repeats is 0"):
        timing.alternate({"A": lambda: None}, repeats=0)


def test_the_ratio_is_paired_round_by_round_not_a_ratio_of_medians():
    # round 1 was slow for the base only: its ratio is low, the other rounds say 2x
    times = {"base": [1.0, 4.0, 9.0], "lora": [2.0, 2.0, 18.0]}
    assert timing.paired_ratios(times, "lora", "base") == [2.0, 0.5, 2.0]
    r = timing.paired_ratio(times, "lora", "base")
    assert r.median == 2.0 and r.rounds == 3  # the ratio of medians would say 2 / 4 = 0.5
    assert (r.q1, r.q3) == (1.25, 2.0)  # quartiles of [0.5, 2, 2], within the data


def test_a_variant_equal_to_the_base_is_within_noise():
    same = {"base": [1.0, 1.3, 0.9, 5.0, 1.1], "copy": [1.0, 1.3, 0.9, 5.0, 1.1]}
    r = timing.paired_ratio(same, "copy", "base")
    assert (r.median, r.q1, r.q3) == (1.0, 1.0, 1.0) and r.within_noise
    # the same model timed under changing load: ratios scatter on both sides of 1
    noisy = {"base": [1.0, 1.2, 0.9, 1.1, 1.0], "copy": [1.1, 1.0, 1.0, 1.0, 0.9]}
    r = timing.paired_ratio(noisy, "copy", "base")
    assert r.q1 < 1.0 < r.q3 and r.within_noise
    assert str(r).startswith("within noise (") and f"IQR {r.q1:.2f}-{r.q3:.2f}" in str(r)


def test_a_clear_difference_is_a_finding_and_a_wide_spread_is_noise():
    slower = timing.PairedRatio(median=1.44, q1=1.22, q3=1.52, rounds=15)
    assert not slower.within_noise
    assert str(slower) == "1.44x (IQR 1.22-1.52)"
    # all above 1, but the spread is wider than the effect: this run cannot tell
    wide = timing.PairedRatio(median=1.2, q1=1.05, q3=1.9, rounds=15)
    assert wide.within_noise and str(wide) == "within noise (1.20x, IQR 1.05-1.90)"
    assert wide.as_dict() == {
        "median": 1.2,
        "q1": 1.05,
        "q3": 1.9,
        "rounds": 15,
        "within_noise": True,
    }


def test_the_latency_table_prints_the_spread_and_says_noise_in_words():
    latency = {
        1: {
            "full": timing.PairedRatio(1.01, 0.97, 1.06, 15),
            "qlora": timing.PairedRatio(2.05, 1.95, 2.20, 15),
        },
        64: {
            "full": timing.PairedRatio(0.99, 0.95, 1.02, 15),
            "qlora": timing.PairedRatio(1.40, 1.30, 1.52, 15),
        },
    }
    lines = latency_table(latency).splitlines()
    assert lines[0].split() == ["method", "batch", "1", "batch", "64"]
    full = next(line for line in lines if line.startswith("full"))
    qlora = next(line for line in lines if line.startswith("qlora"))
    assert full.count("within noise") == 2 and "IQR 0.97-1.06" in full
    assert "2.05x (IQR 1.95-2.20)" in qlora and "1.40x (IQR 1.30-1.52)" in qlora
    assert "noise" not in qlora
    # a spread with a long number still leaves the columns apart
    latency[1]["full"] = timing.PairedRatio(1.11, 0.90, 102.94, 15)
    full = next(line for line in latency_table(latency).splitlines() if line.startswith("full"))
    assert "IQR 0.90-102.94)  within noise" in full
