"""A training step of minilora against the same model in PyTorch eager, on the CPU.

Forward, backward and an AdamW update, float32, the same weights (loaded into
``examples/torch_gpt.py``'s port by name), the same batch and the same thread count, for
the tiny, small and medium configurations. The two steps alternate in one run; the table
gives medians and minilora / PyTorch ratios (target: <= 1.0 on the small configuration).
With ``--ops-compare`` a third variant joins the alternation: minilora on its reference ops
alone (``MINILORA_OPS=reference``), to state what the fast path buys.

    python benchmarks/train_step.py [--quick] [--threads N] [--configs tiny,small,medium]
                                    [--ops-compare]
"""

from __future__ import annotations

import common
from common import CONFIGS, ms

from minilora import AdamW, backend

DEFAULT_REPEATS = {"tiny": 40, "small": 20, "medium": 10}


def on_reference_ops(step):
    """``step`` run with the engine on the reference ops (functional.py alone)."""

    def run():
        with backend.use_ops("reference"):
            return step()

    return run


def run(name: str, repeats: int, ops_compare: bool = False) -> dict:
    bench = CONFIGS[name]
    model = common.build_model(bench)
    x, y = common.batch(bench)
    twin, twin_opt = common.torch_twin(model)  # built before training changes the weights
    steps = {
        "minilora": common.minilora_step(model, AdamW(model.parameters(), lr=1e-3), x, y),
        "torch": common.torch_step(twin, twin_opt, x, y),
    }
    if ops_compare:
        ref = common.build_model(bench)  # the same weights, trained separately
        ref_step = common.minilora_step(ref, AdamW(ref.parameters(), lr=1e-3), x, y)
        steps["reference"] = on_reference_ops(ref_step)
    first = {k: f() for k, f in steps.items()}  # the first step's losses: same weights
    times = common.alternate(steps, repeats, warmup=1)
    out = {
        "config": name,
        "shape": bench.describe(),
        "tokens_per_step": bench.tokens,
        "first_loss": first,
        "minilora": common.summary(times["minilora"]),
        "torch": common.summary(times["torch"]),
        **common.ratio(times, "minilora", "torch"),
    }
    if ops_compare:
        vs_fast = common.ratio(times, "reference", "minilora")
        out["reference"] = common.summary(times["reference"])
        out["reference_vs_fast"] = vs_fast
    return out


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,small,medium", help="comma-separated names")
    p.add_argument(
        "--ops-compare",
        action="store_true",
        help="also time minilora on its reference ops (what the fast path buys)",
    )
    args = p.parse_args(argv)
    if common.optional_torch() is None:
        raise SystemExit('train_step.py needs PyTorch (pip install -e ".[oracle]")')
    common.set_threads(args.threads)
    names = ["tiny"] if args.quick else args.configs.split(",")
    rows = []
    for name in names:
        repeats = 3 if args.quick else (args.repeats or DEFAULT_REPEATS.get(name, 10))
        rows.append(run(name, repeats, args.ops_compare))
        r = rows[-1]
        reference = (
            f", reference ops {ms(r['reference']['median_s']):.1f} ms "
            f"(the fast path's time times {r['reference_vs_fast']['text']})"
            if args.ops_compare
            else ""
        )
        print(
            f"{name}: minilora {ms(r['minilora']['median_s']):.1f} ms, "
            f"torch {ms(r['torch']['median_s']):.1f} ms, ratio {r['text']}{reference}",
            flush=True,
        )
    table_rows = [
        {
            "config": r["config"],
            "shape": r["shape"],
            "minilora": ms(r["minilora"]["median_s"]),
            "torch": ms(r["torch"]["median_s"]),
            "ratio": r["text"],
            **(
                {
                    "reference": ms(r["reference"]["median_s"]),
                    "ref_fast": r["reference_vs_fast"]["text"],
                }
                if args.ops_compare
                else {}
            ),
        }
        for r in rows
    ]
    columns = [
        ("config", "config"),
        ("shape", "shape"),
        ("minilora", "minilora ms"),
        ("torch", "torch ms"),
        ("ratio", "minilora/torch (paired)"),
    ]
    if args.ops_compare:
        columns += [("reference", "reference-ops ms"), ("ref_fast", "reference/fast")]
    print(f"\ntraining step, float32, {args.threads} thread(s); medians in ms")
    print(common.table(table_rows, columns))
    result = {"rows": rows, "target": {"config": "small", "ratio_at_most": 1.0}}
    small = [r for r in rows if r["config"] == "small"]
    if small:
        result["target"]["ratio"] = small[0]["ratio"]
        result["target"]["met"] = small[0]["ratio"] <= 1.0
    common.write_json(args.out, "train_step", result, args)
    return result


if __name__ == "__main__":
    main()
