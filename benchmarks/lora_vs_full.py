"""LoRA against full fine-tuning: step time, optimizer-state bytes and peak memory.

On a configuration where the linear layers' matmuls dominate ("wide": C = 512, short
sequences), one training step (forward, backward, AdamW) of full fine-tuning is
alternated with LoRA on q_proj/v_proj and on every linear layer of the blocks, at a few
ranks. For each variant:

* step time (median) and its ratio to full fine-tuning (target: <= 0.8 for LoRA);
* optimizer-state bytes read from the arrays (``AdamW.state_nbytes()``), which must equal
  ``accounting.optimizer_state_bytes(accounting.trainable_params(...))`` exactly (the
  script stops if they differ);
* peak memory of one step (after a warm-up step, so the moments already exist), traced
  by ``tracemalloc`` (NumPy reports its array allocations to it), next to the
  accounting's estimate of the saved activations plus gradients.

    python benchmarks/lora_vs_full.py [--quick] [--threads N] [--config wide]
"""

from __future__ import annotations

import tracemalloc

import common
from common import CONFIGS, ms

from minilora import AdamW, LoRAConfig, apply_lora
from minilora.study import accounting

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
VARIANTS = [("full", None, None)] + [
    (f"lora {name} r={r}", targets, r)
    for name, targets in (("q,v", ["q_proj", "v_proj"]), ("all", ALL_LINEAR))
    for r in (4, 16, 64)
]
QUICK_VARIANTS = [VARIANTS[0], VARIANTS[1], VARIANTS[4]]


def setup(bench, targets, r):
    model = common.build_model(bench)
    lora = None
    if targets is not None:
        lora = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets)
        apply_lora(model, lora)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer, lora


def peak_bytes(step) -> int:
    """Peak bytes allocated (and traced) while ``step`` runs, above what was live before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        step()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def run(config: str, variants, repeats: int) -> list[dict]:
    bench = CONFIGS[config]
    x, y = common.batch(bench)
    shape = accounting.ModelShape.from_config(bench.config)
    steps, rows = {}, []
    for name, targets, r in variants:
        model, optimizer, lora = setup(bench, targets, r)
        step = common.minilora_step(model, optimizer, x, y)
        step()  # creates the optimizer state
        trainable = accounting.trainable_params(shape, lora)
        expected = accounting.optimizer_state_bytes(trainable, "float32", "adamw")
        measured = optimizer.state_nbytes()
        if measured != expected:
            raise SystemExit(
                f"{name}: optimizer state holds {measured} bytes but the accounting formula "
                f"says {expected}"
            )
        memory = accounting.train_memory(
            shape, lora, "float32", bench.batch_size, bench.config.block_size
        )
        rows.append(
            {
                "variant": name,
                "targets": targets,
                "r": r,
                "trainable_params": trainable,
                "optimizer_state_bytes": measured,
                "optimizer_state_bytes_formula": expected,
                "optimizer_state_matches": measured == expected,
                "peak_step_bytes": peak_bytes(step),
                "activations_plus_gradients_formula": memory["activations"] + memory["gradients"],
            }
        )
        steps[name] = step
    times = common.alternate(steps, repeats, warmup=0)
    for row in rows:
        row["step"] = common.summary(times[row["variant"]])
        row.update(common.ratio(times, row["variant"], "full"))
    return rows


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="wide", choices=sorted(CONFIGS))
    args = p.parse_args(argv)
    common.set_threads(args.threads, torch_too=False)
    config = "tiny" if args.quick else args.config
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    repeats = 3 if args.quick else (args.repeats or 10)
    rows = run(config, variants, repeats)
    print(f"\n{config} ({CONFIGS[config].describe()}), float32, {args.threads} thread(s)")
    table = [
        {
            "variant": r["variant"],
            "trainable": r["trainable_params"],
            "ms": ms(r["step"]["median_s"]),
            "ratio": r["text"],
            "state": r["optimizer_state_bytes"],
            "formula": "==" if r["optimizer_state_matches"] else "DIFFERS",
            "peak": r["peak_step_bytes"] / 2**20,
            "est": r["activations_plus_gradients_formula"] / 2**20,
        }
        for r in rows
    ]
    print(
        common.table(
            table,
            [
                ("variant", "variant"),
                ("trainable", "trainable"),
                ("ms", "step ms"),
                ("ratio", "/ full (paired)"),
                ("state", "AdamW state B"),
                ("formula", "formula"),
                ("peak", "peak MiB"),
                ("est", "act+grad MiB (formula)"),
            ],
        )
    )
    lora_rows = [r for r in rows if r["targets"] is not None]
    result = {
        "config": config,
        "shape": CONFIGS[config].describe(),
        "rows": rows,
        "target": {
            "ratio_at_most": 0.8,
            "worst_lora_ratio": max(r["ratio"] for r in lora_rows),
            "qv_ratios": [r["ratio"] for r in lora_rows if len(r["targets"]) == 2],
            "met": all(r["ratio"] <= 0.8 for r in lora_rows if len(r["targets"]) == 2),
            "optimizer_state_exact": all(r["optimizer_state_matches"] for r in rows),
        },
    }
    common.write_json(args.out, "lora_vs_full", result, args)
    return result


if __name__ == "__main__":
    main()
