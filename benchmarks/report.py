"""Run every benchmark and print one report: each target, met or missed, with its number.

Runs ``train_step.py``, ``lora_vs_full.py``, ``inference.py`` and ``breakdown.py`` (each
in its own process, in that order), reads their JSON from the results folder, and prints
the targets. The GPU comparison (``benchmarks/gpu_vs_cpu.py``) is not run here; if its
result ``gpu_vs_cpu.json`` is in the results folder, it is printed with the rest.

    python benchmarks/report.py [--quick] [--threads N] [--skip NAME,...]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import common

SCRIPTS = ("train_step", "lora_vs_full", "inference", "breakdown")
NEEDS_TORCH = ("train_step",)


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
        medians = t.get("worst_ratio_of_medians", 0.0)
        note = f"worst row, paired; ratio of medians {medians:.2f}"
        add("merged / base inference", t["worst"], "<= 1.02", t["met"], note)
    r = results.get("breakdown")
    if r and "matmul_share" in r["target"]:
        add(
            "matmul share of a step (medium)",
            r["target"]["matmul_share"],
            ">= 0.60",
            r["target"]["met"],
        )
    return rows


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
