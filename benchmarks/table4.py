"""Why LoRA r=4 falls short of full fine-tuning here, when the LoRA paper's Table 4 finds
them level on GPT-3 (docs/table4.md quotes what this script prints).

The demo's recipe (``DemoSettings``: the shipped base model, the downstream task sort
descending, 300 steps, adapters on q_proj and v_proj, ``lora_alpha = 2r``) is run as full
fine-tuning and as LoRA at a sweep of ranks. Then:

* accuracy against rank, and the smallest rank within 1 point of full fine-tuning: the rank a
  model of this width needs for this task;
* the spectrum of the update full fine-tuning made to each q_proj and v_proj (64 × 64): how
  many directions hold 90% and 99% of ``‖ΔW‖²``, its stable rank ``‖ΔW‖²_F / σ₁²``, and the
  share a rank-4 update could hold at best (Eckart–Young), beside the same for the update
  LoRA finds at rank 64 (free to use every direction);
* the same numbers set against the width: ``r / n_embd`` here and in GPT-3 (12288).

Nothing is timed: accuracy and spectra are deterministic for a seed on one machine.

    python benchmarks/table4.py [--quick]
"""

from __future__ import annotations

import common

from minilora import backend
from minilora.data import DOWNSTREAM_TASK, DigitTasks
from minilora.experiments.demo import DemoSettings, fine_tune_on_digit_task, load_base
from minilora.study import analysis
from minilora.train import evaluate

RANKS = (1, 2, 4, 8, 16, 64)
GPT3_WIDTH = 12288  # d_model of GPT-3 175B (Brown et al. 2020, Table 2.1)


def energy_rank(s, share: float) -> int:
    """How many of the singular values ``s`` (descending) hold ``share`` of ``Σ s²``."""
    xp = backend.get_array_module(s)
    cumulative = xp.cumsum(s**2) / xp.sum(s**2)
    return int(xp.searchsorted(cumulative, share)) + 1


def spectrum(delta_weight, r: int = 4) -> dict:
    """How low-rank an update is: directions for 90% and 99% of its energy, its stable
    rank, and the share of ``‖ΔW‖²`` the best rank-``r`` approximation holds."""
    s = analysis.singular_values(delta_weight)
    return {
        "directions_90": energy_rank(s, 0.90),
        "directions_99": energy_rank(s, 0.99),
        "stable_rank": analysis.stable_rank(delta_weight),
        f"best_rank_{r}_share": float((s[:r] ** 2).sum() / (s**2).sum()),
    }


def updates(model, base) -> dict:
    """ΔW of every adapted matrix: W - W0 for full fine-tuning, s·B·A for LoRA."""
    found = {}
    for i, block in enumerate(model.blocks):
        for name in ("q_proj", "v_proj"):
            layer = getattr(block.attn, name)
            if hasattr(layer, "get_delta_weight"):
                delta = layer.get_delta_weight()
            else:
                delta = layer.weight.data - getattr(base.blocks[i].attn, name).weight.data
            found[f"blocks.{i}.attn.{name}"] = delta
    return found


def main(argv=None) -> dict:
    args = common.parser(__doc__.split("\n\n")[0]).parse_args(argv)
    common.set_threads(args.threads, torch_too=False)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    ranks = (4, 64) if args.quick else RANKS
    base = load_base()
    x, y = DigitTasks((DOWNSTREAM_TASK,)).eval_set(seed=2024, n=settings.eval_examples)
    width = base.config.n_embd
    runs, spectra = [], {}
    for method, rank in [("full", None)] + [("lora", r) for r in ranks]:
        model, *_ = fine_tune_on_digit_task(base, method, settings, rank, progress=False)
        label = "full" if rank is None else f"r={rank}"
        trainable = sum(p.size for p in model.parameters() if p.requires_grad)
        runs.append(
            {
                "run": label,
                "rank": rank,
                "trainable": trainable,
                "accuracy": evaluate(model, x, y)["accuracy"],
            }
        )
        if label in ("full", f"r={max(ranks)}"):
            spectra[label] = {k: spectrum(d) for k, d in updates(model, base).items()}
    full = runs[0]["accuracy"]
    within = [r["rank"] for r in runs[1:] if r["accuracy"] >= full - 0.01]
    result = {
        "steps": settings.steps,
        "eval_examples": settings.eval_examples,
        "n_embd": width,
        "runs": runs,
        "rank_needed": min(within) if within else None,
        "spectra": spectra,
        "r4_share_of_width": 4 / width,
        "r4_share_of_width_gpt3": 4 / GPT3_WIDTH,
    }
    print(f"{settings.steps} steps, {settings.eval_examples} held-out examples, n_embd = {width}")
    shown = [{**r, "held_out": f"{r['accuracy']:.1%}"} for r in runs]
    print(
        common.table(shown, [("run", "run"), ("trainable", "trainable"), ("held_out", "held out")])
    )
    print(f"smallest rank within 1 point of full fine-tuning: {result['rank_needed']}")
    for label, per_matrix in spectra.items():
        print(f"\nthe update of {label} (of {width} directions):")
        rows = [{"matrix": k, **v} for k, v in per_matrix.items()]
        columns = [("matrix", "matrix"), ("directions_90", "90%"), ("directions_99", "99%")]
        columns += [("stable_rank", "stable rank"), ("best_rank_4_share", "best rank-4 share")]
        print(common.table(rows, columns))
    print(
        f"\nr = 4 is {result['r4_share_of_width']:.2%} of this model's width "
        f"and {result['r4_share_of_width_gpt3']:.3%} of GPT-3's"
    )
    common.write_json(args.out, "table4", result, args)
    return result


if __name__ == "__main__":
    main()
