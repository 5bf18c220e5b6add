"""The benchmark scripts still run (``--quick``) and write the JSON the docs rely on.

Nothing here times anything or asserts a speed: benchmarks measure, tests check that the
measuring code has not rotted, and that the optimizer-state bytes a real step holds equal
the accounting formula (an exact check, not a timing).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_module():
    """Import a benchmark script as a module (they import their neighbour ``common``)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_quick(bench_module, name: str, out: Path, *extra) -> dict:
    result = bench_module(name).main(["--quick", "--out", str(out), *extra])
    written = json.loads((out / f"{name}.json").read_text())
    assert written["benchmark"] == name
    assert written["quick"] is True and written["threads"] == 1
    for key in ("cpu", "cpu_count", "numpy", "numpy_blas", "python"):
        assert key in written["machine"]
    assert written["command"].startswith(f"python benchmarks/{name}.py")
    return result


def check_summary(s: dict) -> None:
    assert s["n"] >= 1 and 0 < s["min_s"] <= s["median_s"]


@pytest.mark.oracle
def test_train_step_quick(bench_module, tmp_path):
    pytest.importorskip("torch", reason="the PyTorch side of the comparison needs torch")
    result = run_quick(bench_module, "train_step", tmp_path)
    (row,) = result["rows"]
    assert row["config"] == "tiny"
    check_summary(row["minilora"])
    check_summary(row["torch"])
    assert row["q1"] <= row["ratio"] <= row["q3"] and row["ratio"] > 0
    # the same weights and batch: the first step's losses agree
    assert row["first_loss"]["minilora"] == pytest.approx(row["first_loss"]["torch"], rel=1e-4)


@pytest.mark.oracle
def test_train_step_times_the_reference_ops_too(bench_module, tmp_path):
    pytest.importorskip("torch", reason="the PyTorch side of the comparison needs torch")
    from minilora import backend

    before = backend.get_ops()
    result = run_quick(bench_module, "train_step", tmp_path, "--ops-compare")
    (row,) = result["rows"]
    check_summary(row["reference"])
    assert row["reference_vs_fast"]["ratio"] > 0 and "IQR" in row["reference_vs_fast"]["text"]
    # both minilora variants start from the same weights and batch: the same first loss
    assert row["first_loss"]["reference"] == pytest.approx(row["first_loss"]["minilora"], rel=1e-5)
    assert backend.get_ops() == before  # the switch was put back


def test_lora_vs_full_quick_and_optimizer_state_equals_the_formula(bench_module, tmp_path):
    result = run_quick(bench_module, "lora_vs_full", tmp_path)
    rows = {r["variant"]: r for r in result["rows"]}
    assert "full" in rows and any(r["targets"] for r in result["rows"])
    for r in rows.values():
        assert r["optimizer_state_bytes"] == r["optimizer_state_bytes_formula"]
        assert r["optimizer_state_bytes"] == 2 * 4 * r["trainable_params"]  # AdamW, float32
        assert r["peak_step_bytes"] > 0
        check_summary(r["step"])
    assert rows["full"]["ratio"] == 1.0
    lora = [r for r in rows.values() if r["targets"]]
    assert all(r["optimizer_state_bytes"] < rows["full"]["optimizer_state_bytes"] for r in lora)
    assert result["target"]["optimizer_state_exact"] is True


def test_inference_quick(bench_module, tmp_path):
    result = run_quick(bench_module, "inference", tmp_path)
    for row in result["rows"]:
        assert row["merged_matches_unmerged"]
        for key in ("base", "unmerged", "merged"):
            check_summary(row[key])
        assert row["merged_over_base"]["ratio"] > 0
    assert "worst" in result["target"]


def test_relatives_latency_quick(bench_module, tmp_path):
    result = run_quick(bench_module, "relatives_latency", tmp_path)
    variants = ("lora_merged", "lora_unmerged", "adapter_houlsby", "adapter_lin", "prefix")
    assert [row["batch_size"] for row in result["rows"]] == [1, 16]
    for row in result["rows"]:
        assert row["merged_matches_unmerged"]
        for key in ("base", *variants):
            check_summary(row[key])
        assert set(row["over_base"]) == set(variants)
        assert all(r["q1"] <= r["ratio"] <= r["q3"] for r in row["over_base"].values())
    assert set(result["targets"]) >= {
        "adapters_slower_than_merged_at_batch_1",
        "merged_over_base_worst_paired",
    }


def test_breakdown_quick(bench_module, tmp_path):
    result = run_quick(bench_module, "breakdown", tmp_path, "--no-torch")
    (row,) = result["rows"]
    assert set(row["categories"]) == {"matmul", "other_ops", "optimizer", "engine"}
    assert 0 < row["matmul_share"] < 1
    assert row["matmuls_per_step"] == len(row["matmul_shapes"]) > 0
    assert any(op["op"] == "LinearFunction" and op["matmul_s"] > 0 for op in row["ops"])
    check_summary(row["matmuls_alone"])


def test_report_collects_results_and_the_gpu_file(bench_module, tmp_path):
    """The report reads what the scripts wrote (here a stand-in result) and prints the
    GPU comparison when its JSON is there; scripts are skipped so nothing is timed."""
    (tmp_path / "lora_vs_full.json").write_text(
        json.dumps(
            {
                "config": "wide",
                "target": {
                    "qv_ratios": [0.6],
                    "worst_lora_ratio": 0.7,
                    "met": True,
                    "optimizer_state_exact": True,
                },
            }
        )
    )
    (tmp_path / "gpu_vs_cpu.json").write_text(json.dumps({"speedup": 3.0}))
    report = run_quick(bench_module, "report", tmp_path, "--skip", SKIP_ALL)
    assert report["gpu_vs_cpu"] == {"speedup": 3.0}
    assert [t["met"] for t in report["targets"]] == ["met", "met"]
    assert report["failed_scripts"] == []


SKIP_ALL = "train_step,lora_vs_full,inference,breakdown,generate,seq_len"


def test_report_reads_issue_15_targets_from_generate_seq_len_and_train_step(bench_module, tmp_path):
    """Stand-in results of train_step, seq_len and generate: each of issue 15's targets is a
    row, met or MISSED on its own number (the worst T, config or batch decides)."""

    def ratios(r):
        return {"ratio": r, "q1": r, "q3": r}

    def step_row(config, r):
        return {"config": config, **ratios(r)}

    (tmp_path / "train_step.json").write_text(
        json.dumps(
            {
                "target": {"ratio": 0.95, "met": True},
                "rows": [step_row("tiny", 2.0), step_row("small", 0.95), step_row("medium", 0.85)],
            }
        )
    )

    def seq_row(T, r, ml_bytes):
        peak = {"minilora": ml_bytes, "torch_explicit": 300, "torch_sdpa": 200}
        return {
            "T": T,
            "over_torch_sdpa": ratios(r),
            "over_torch_explicit": ratios(0.5),
            "peak_step_bytes": peak,
        }

    (tmp_path / "seq_len.json").write_text(
        json.dumps({"rows": [seq_row(512, 0.97, 210), seq_row(64, 1.5, 190)]})
    )

    def gen_row(config, batch, ml, torch):
        tps = {"minilora": ml, "torch_sdpa": torch}
        return {"config": config, "batch_size": batch, "torch_sdpa": {}, "tokens_per_s": tps}

    gen = [gen_row("tiny", 1, 90, 100), gen_row("small", 1, 200, 100), gen_row("tiny", 16, 5, 4)]
    (tmp_path / "generate.json").write_text(json.dumps({"rows": gen}))
    report = run_quick(bench_module, "report", tmp_path, "--skip", SKIP_ALL)
    rows = {t["target"]: t for t in report["targets"] if t["target"].startswith("15:")}
    assert {k: (v["value"], v["met"]) for k, v in rows.items()} == {
        "15: step / PyTorch (small)": (0.95, "MISSED"),
        "15: step / PyTorch (medium)": (0.85, "met"),
        "15: step / PyTorch sdpa (T=512)": (0.97, "met"),
        "15: peak step memory / PyTorch sdpa": (1.05, "MISSED"),
        "15: generation tok/s / PyTorch sdpa (B=1)": (0.9, "MISSED"),
        "15: generation tok/s / PyTorch sdpa (B=16)": (1.25, "met"),
    }


def test_generate_quick_gives_the_tokens_of_pytorch_with_a_kv_cache(bench_module, tmp_path):
    result = run_quick(bench_module, "generate", tmp_path)
    (row,) = result["rows"]
    assert row["config"] == "tiny" and row["batch_size"] == 1
    check_summary(row["minilora"])
    check_summary(row["no_cache"])
    assert row["tokens_per_s"]["minilora"] > 0
    if "torch_sdpa" in row:  # with PyTorch: the same greedy tokens from the same weights
        assert row["same_tokens_as_torch"] is True
        assert row["minilora_over_torch_sdpa"]["ratio"] > 0
        assert "met" in result["target"]


@pytest.mark.oracle
def test_seq_len_quick_times_three_engines_from_the_same_weights(bench_module, tmp_path):
    pytest.importorskip("torch", reason="the PyTorch side of the comparison needs torch")
    result = run_quick(bench_module, "seq_len", tmp_path, "--no-memory")
    (row,) = result["rows"]
    assert row["T"] == 64 and result["target"]["T"] == 64
    for engine in ("minilora", "torch_explicit", "torch_sdpa"):
        check_summary(row[engine])
    losses = row["first_loss"]  # the same weights and batch: the same first loss
    assert losses["torch_sdpa"] == pytest.approx(losses["minilora"], rel=1e-4)
    assert losses["torch_explicit"] == pytest.approx(losses["minilora"], rel=1e-4)


def test_seq_len_measures_a_step_peak_memory_in_a_fresh_process(bench_module):
    peak = bench_module("seq_len").peak_memory("minilora", 64, 1, tokens=128)
    assert peak > 0
