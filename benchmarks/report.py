"""Run every benchmark and print one report: each target, met or missed, with its number.

Runs ``train_step.py``, ``lora_vs_full.py``, ``inference.py``, ``breakdown.py``,
``generate.py`` and ``seq_len.py`` (each in its own process, in that order), reads their JSON
from the results folder, and prints the targets: the first ones, then issue 15's (a step
<= 0.9x PyTorch on small and medium and <= 1.0x at T=512, generation tokens/s >= PyTorch's
with a KV cache at batch 1 and 16, peak step memory <= PyTorch's, merged/base latency <= 1.02
at every shape). Outside ``--quick``, inference runs at every configuration (tiny, small,
medium) and generation without its no-cache variant (the slowest part, and no target). The
GPU comparison (``benchmarks/gpu_vs_cpu.py``) is not run here; if its result
``gpu_vs_cpu.json`` is in the results folder, it is printed with the rest.

    python benchmarks/report.py [--quick] [--threads N] [--skip NAME,...]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import common

SCRIPTS = ("train_step", "lora_vs_full", "inference", "breakdown", "generate", "seq_len")
NEEDS_TORCH = ("train_step", "seq_len")
# Arguments of a full (not --quick) run beyond the common ones.
FULL_ARGS = {"inference": ("--configs", "tiny,small,medium"), "generate": ("--no-full-window",)}


def run_script(name: str, args) -> bool:
    cmd = [
        sys.executable,
        str(Path(__file__).with_name(f"{name}.py")),
        "--threads",
        str(args.threads),
        "--out",
        str(args.out),
    ]
    if args.quick:
        cmd.append("--quick")
    else:
        cmd += FULL_ARGS.get(name, ())
    print(f"\n=== {' '.join(['python', f'benchmarks/{name}.py', *cmd[2:]])}", flush=True)
    return subprocess.run(cmd, check=False).returncode == 0


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def targets(results: dict) -> list[dict]:
    rows = []

    def add(what, value, goal, met, note=""):
        rows.append(
            {
                "target": what,
                "value": value,
                "goal": goal,
                "met": "met" if met else "MISSED",
                "note": note,
            }
        )

    r = results.get("train_step")
    if r and "ratio" in r["target"]:
        add("minilora / PyTorch step (small)", r["target"]["ratio"], "<= 1.0", r["target"]["met"])
    r = results.get("lora_vs_full")
    if r:
        t = r["target"]
        add(
            f"LoRA q,v / full step ({r['config']})",
            max(t["qv_ratios"]),
            "<= 0.8",
            t["met"],
            f"all-linear worst {t['worst_lora_ratio']:.2f}",
        )
        add(
            "optimizer state == formula",
            "exact" if t["optimizer_state_exact"] else "differs",
            "exact",
            t["optimizer_state_exact"],
        )
    r = results.get("inference")
    if r:
        t = r["target"]
        shapes = ", ".join(f"{x['config']} B={x['batch_size']}" for x in r.get("rows", ()))
        note = f"paired by round, worst of {shapes}"
        add("merged / base inference (15: every shape)", t["worst"], "<= 1.02", t["met"], note)
    r = results.get("breakdown")
    if r and "matmul_share" in r["target"]:
        add(
            "matmul share of a step (medium)",
            r["target"]["matmul_share"],
            ">= 0.60",
            r["target"]["met"],
        )
    issue_15_targets(results, add)
    return rows


def issue_15_targets(results: dict, add) -> None:
    """Issue 15's targets, each from the script that measures it (nothing when it did not run)."""
    r = results.get("train_step")
    for row in r["rows"] if r else ():
        if row["config"] in ("small", "medium"):
            add(
                f"15: step / PyTorch ({row['config']})",
                row["ratio"],
                "<= 0.9",
                row["ratio"] <= 0.9,
                f"IQR {row['q1']:.2f}-{row['q3']:.2f}; the port with explicit attention",
            )
    r = results.get("seq_len")
    if r:
        longest = max(r["rows"], key=lambda row: row["T"])
        sdpa, expl = longest["over_torch_sdpa"], longest["over_torch_explicit"]
        add(
            f"15: step / PyTorch sdpa (T={longest['T']})",
            sdpa["ratio"],
            "<= 1.0",
            sdpa["ratio"] <= 1.0,
            f"IQR {sdpa['q1']:.2f}-{sdpa['q3']:.2f}; explicit port {expl['ratio']:.2f}",
        )
        memory = [row for row in r["rows"] if "peak_step_bytes" in row]
        if memory:
            over = {
                row["T"]: row["peak_step_bytes"]["minilora"]
                / max(1, row["peak_step_bytes"]["torch_sdpa"])
                for row in memory
            }
            add(
                "15: peak step memory / PyTorch sdpa",
                max(over.values()),
                "<= 1.0",
                max(over.values()) <= 1.0,
                "worst T; " + ", ".join(f"T={T}: {v:.2f}" for T, v in over.items()),
            )
    r = results.get("generate")
    rows = [row for row in r["rows"] if "torch_sdpa" in row] if r else []
    for batch in sorted({row["batch_size"] for row in rows}):
        at = {
            row["config"]: row["tokens_per_s"]["minilora"] / row["tokens_per_s"]["torch_sdpa"]
            for row in rows
            if row["batch_size"] == batch
        }
        add(
            f"15: generation tok/s / PyTorch sdpa (B={batch})",
            min(at.values()),
            ">= 1.0",
            min(at.values()) >= 1.0,
            "worst config; " + ", ".join(f"{k}: {v:.2f}" for k, v in at.items()),
        )


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--skip", default="", help="scripts not to run (their last JSON is used)")
    args = p.parse_args(argv)
    common.set_threads(args.threads)  # (the scripts set their own; this is for the record)
    skip = {s for s in args.skip.split(",") if s}
    if common.optional_torch() is None:
        print("PyTorch is not installed: skipping " + ", ".join(NEEDS_TORCH))
        skip |= set(NEEDS_TORCH)
    failed = [name for name in SCRIPTS if name not in skip and not run_script(name, args)]
    results = {name: load(args.out, name) for name in SCRIPTS}  # skipped: an earlier run's
    results = {k: v for k, v in results.items() if v is not None}
    rows = targets(results)
    print("\n=== targets")
    print(
        common.table(
            rows,
            [
                ("target", "target"),
                ("value", "value"),
                ("goal", "goal"),
                ("met", "result"),
                ("note", "note"),
            ],
        )
    )
    gpu = load(args.out, "gpu_vs_cpu")
    if gpu is not None:
        print("\n=== GPU vs CPU (benchmarks/results/gpu_vs_cpu.json, from gpu_vs_cpu.py)")
        print(json.dumps(gpu, indent=2))
    report = {
        "targets": rows,
        "failed_scripts": failed,
        "gpu_vs_cpu": gpu,
        "results": sorted(results),
    }
    common.write_json(args.out, "report", report, args)
    if failed:
        raise SystemExit(f"benchmark scripts failed: {failed}")
    return report


if __name__ == "__main__":
    main()
