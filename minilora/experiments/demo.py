"""The main job: the whole LoRA story on a laptop CPU, in under a minute, with no download.

1. Load the pretrained base model shipped with the package (``minilora pretrain``
   reproduces it): a tiny GPT that copies, reverses and sorts digit strings.
2. Show it cannot do the downstream task (sort descending).
3. Fine-tune it fully, and with LoRA at several ranks; print a table of trainable
   parameters, optimizer-state bytes, step time and downstream accuracy.
4. Save the adapter in PEFT's layout, load it back into a fresh base, merge it, and show
   that merged and unmerged logits agree and that merging removes the extra latency.

Every number is measured in this run; the verdict line compares LoRA with full fine-tuning
and says plainly when LoRA falls short.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from minilora import backend
from minilora.autograd import no_grad
from minilora.backend import manual_seed
from minilora.data import DOWNSTREAM_TASK, PRETRAIN_TASKS, DigitTasks
from minilora.experiments import timing
from minilora.interop import model_files, peft_adapters, safetensors_files
from minilora.lora import LoRAConfig, apply_lora, count_parameters, disable_adapters, merge_lora
from minilora.model import GPT, GPTConfig
from minilora.optim import AdamW
from minilora.train import cosine_schedule, evaluate, fine_tune, median, train

BASE_ASSET = "base.safetensors"  # in minilora/assets; `minilora pretrain --out F` reproduces it


@dataclass(frozen=True)
class PretrainRecipe:
    """How the shipped base model was trained (``minilora pretrain`` runs exactly this)."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0  # initialisation
    data_seed: int = 1  # the stream of training examples


@dataclass(frozen=True)
class DemoSettings:
    """Fine-tuning settings of the demo; ``quick()`` is the smoke-test version."""

    steps: int = 300
    batch_size: int = 64
    lr_full: float = 1e-3
    lr_lora: float = 1e-2
    ranks: tuple[int, ...] = (1, 4, 16)
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    adapter_rank: int = 4  # the adapter that is saved, merged and timed
    eval_examples: int = 512
    latency_repeats: int = 30
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> DemoSettings:
        return cls(steps=40, ranks=(1, 4), eval_examples=128, latency_repeats=15, seed=seed)


def pretrain(recipe: PretrainRecipe = PretrainRecipe(), device: str = "cpu", progress=True):
    """Train the base model on copy / reverse / sort-ascending; returns (model, history)."""
    tasks = DigitTasks(PRETRAIN_TASKS)
    config = GPTConfig(
        vocab_size=tasks.vocab_size,
        block_size=tasks.block_size,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        n_embd=recipe.n_embd,
    )
    manual_seed(recipe.seed)
    model = GPT(config, device=device)
    opt = AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    data = backend.Generator(recipe.data_seed)
    eval_x, eval_y = tasks.eval_set(seed=123, n=512, device=device)
    history = train(
        model,
        opt,
        lambda step: tasks.batch(data, recipe.batch_size, device),
        recipe.steps,
        lr_schedule=cosine_schedule(recipe.steps, recipe.warmup),
        eval_fn=lambda: evaluate(model, eval_x, eval_y),
        eval_every=max(recipe.steps // 10, 1),
        progress=progress,
        desc="pretrain",
    )
    return model, history


def base_model_path() -> Path:
    return Path(str(resources.files("minilora") / "assets" / BASE_ASSET))


def load_base(device: str = "cpu") -> GPT:
    path = base_model_path()
    if not path.exists():
        raise FileNotFoundError(
            f"the pretrained base model {path} is missing; reinstall minilora, or rebuild it "
            "with `minilora pretrain --out base.safetensors` and pass that file as --model "
            "or --base"
        )
    return model_files.load_model(path, device=device)


def fine_tune_on_digit_task(
    base: GPT,
    method: str,
    settings: DemoSettings,
    rank: int | None,
    progress=True,
    task: str = DOWNSTREAM_TASK,
    alpha: float | None = None,
):
    """Fine-tune a copy of ``base`` on ``task``: ``method`` "full" or "lora" (rank ``rank``,
    ``lora_alpha`` = ``alpha`` or 2·rank). Returns (model, optimizer, LoRAConfig, history)."""
    manual_seed(settings.seed)
    model = copy.deepcopy(base)
    if method == "lora":
        config = LoRAConfig(
            r=rank,
            lora_alpha=2 * rank if alpha is None else alpha,
            target_modules=list(settings.targets),
        )
        apply_lora(model, config)
        lr = settings.lr_lora
    else:
        config, lr = None, settings.lr_full
    history, opt = fine_tune(
        model,
        DigitTasks((task,)),
        settings.steps,
        lr,
        settings.batch_size,
        seed=settings.seed,
        progress=progress,
        desc=f"{method}" + (f" r={rank}" if rank else ""),
    )
    return model, opt, config, history


def run_demo(settings: DemoSettings, out: Path, device: str = "cpu", progress=True, echo=print):
    """The whole demo (the module docstring's four steps); writes results.json (and demo.png
    with matplotlib) to ``out`` and returns the results."""
    out.mkdir(parents=True, exist_ok=True)
    base = load_base(device)
    down = DigitTasks((DOWNSTREAM_TASK,)).eval_set(
        seed=2024, n=settings.eval_examples, device=device
    )
    pre = DigitTasks(PRETRAIN_TASKS).eval_set(seed=2025, n=settings.eval_examples, device=device)
    base_down, base_pre = _show_base(base, down, pre, echo)
    rows, models = _fine_tune_every_run(base, settings, down, progress)
    echo("")
    echo(_table(rows))
    lora_model, lora_config = (
        models.get(("lora", settings.adapter_rank)) or models[("lora", settings.ranks[-1])]
    )
    forgetting = _show_forgetting(models[("full", None)][0], lora_model, lora_config, pre, echo)
    max_diff, latency = _save_merge_and_time(
        base, lora_model, lora_config, out / "adapter", down[0], settings, echo
    )
    summary = verdict(rows)
    if settings.steps < DemoSettings.steps:  # --quick
        summary += f" ({settings.steps} steps, not {DemoSettings.steps}: too short to judge.)"
    echo("\n" + summary)
    results = {
        "settings": asdict(settings),
        "device": device,
        "base_accuracy": base_down,
        "base_pretrain_accuracy": base_pre,
        "runs": rows,
        "pretrain_accuracy_after": forgetting,
        "merge_max_abs_diff": max_diff,
        "latency": latency,
        "verdict": summary,
    }
    write_results(out / "results.json", results, _plot(rows, out / "demo.png"), echo)
    return results


def _show_base(base: GPT, down, pre, echo) -> tuple[float, float]:
    """Print the base model's size and its accuracy on the downstream task and on the
    pretraining tasks (``down``, ``pre``: held-out (x, y)); return the two accuracies."""
    echo(f"base model: {count_parameters(base)[1]:,} parameters, {base.config}")
    base_down = evaluate(base, *down)["accuracy"]
    base_pre = evaluate(base, *pre)["accuracy"]
    echo(
        f"base accuracy: pretraining tasks {base_pre:.1%}, downstream (sort descending) "
        f"{base_down:.1%}"
    )
    return base_down, base_pre


def _fine_tune_every_run(base: GPT, settings: DemoSettings, down, progress):
    """Full fine-tuning, then LoRA at each rank of ``settings``: a table row per run and the
    trained models, keyed by (method, rank), with their LoRAConfig."""
    rows, models = [], {}
    runs = [("full", None)] + [("lora", r) for r in settings.ranks]
    for method, rank in runs:
        model, opt, config, history = fine_tune_on_digit_task(
            base, method, settings, rank, progress
        )
        trainable, total = count_parameters(model)
        step_s = median([h["seconds"] for h in history[len(history) // 5 :]])
        acc = evaluate(model, *down)["accuracy"]
        rows.append(
            {
                "method": method,
                "rank": rank,
                "trainable_params": trainable,
                "total_params": total,
                "trainable_percent": 100 * trainable / total,
                "optimizer_state_bytes": opt.state_nbytes(),
                "step_ms": 1000 * step_s,
                "accuracy": acc,
                "loss_curve": [h["loss"] for h in history],
            }
        )
        models[(method, rank)] = (model, config)
    return rows, models


def _show_forgetting(full_model: GPT, lora_model: GPT, lora_config, pre, echo) -> dict:
    """Forgetting: the fully fine-tuned model has overwritten the base; LoRA can switch off.
    Returns the pretraining-task accuracies after fine-tuning."""
    pre_full = evaluate(full_model, *pre)["accuracy"]
    pre_lora = evaluate(lora_model, *pre)["accuracy"]
    with disable_adapters(lora_model):
        pre_lora_off = evaluate(lora_model, *pre)["accuracy"]
    echo(
        f"\npretraining tasks after fine-tuning: full {pre_full:.1%}, LoRA r={lora_config.r} "
        f"{pre_lora:.1%}, LoRA with adapters disabled {pre_lora_off:.1%} (the base is intact)"
    )
    echo(
        "  (an adapter is trained for one task: it saw only prompts that start with "
        f"{DOWNSTREAM_TASK!r}, so with it on, the copy, reverse and sort-ascending prompts get "
        "wrong answers; switched off, the base model answers them as before. Full fine-tuning "
        "has no switch: the base is overwritten.)"
    )
    return {"full": pre_full, "lora": pre_lora, "lora_disabled": pre_lora_off}


def _save_merge_and_time(
    base: GPT, lora_model: GPT, lora_config, adapter_dir: Path, x, settings, echo
) -> tuple[float, dict]:
    """Save the adapter (PEFT layout), load it into a fresh base, merge, compare the logits
    on ``x`` and time base, unmerged and merged. Returns (largest difference, latencies)."""
    peft_adapters.save_adapter(lora_model, adapter_dir, lora_config)
    served = copy.deepcopy(base)
    peft_adapters.load_adapter(served, adapter_dir)
    served.eval()
    with no_grad():
        unmerged_logits = served(x)[0].data
        merge_lora(served)
        merged_logits = served(x)[0].data
    xp = backend.get_array_module(merged_logits)
    max_diff = float(xp.abs(merged_logits - unmerged_logits).max())
    unmerged = copy.deepcopy(base)
    peft_adapters.load_adapter(unmerged, adapter_dir)
    base.eval(), unmerged.eval()
    models = {"base": base, "unmerged": unmerged, "merged": served}
    times = timing.alternate(timing.forwards(models, x), settings.latency_repeats)
    latency = {
        "median_seconds": timing.median_times(times),
        "over_base": {
            name: timing.paired_ratio(times, name, "base").as_dict()
            for name in ("unmerged", "merged")
        },
    }
    echo(
        f"\nadapter saved to {adapter_dir} (PEFT layout: adapter_config.json, "
        "adapter_model.safetensors)"
    )
    echo(f"merged vs unmerged logits: largest difference {max_diff:.2e}")
    echo(_latency_line(times, x.shape[0]))
    return max_diff, latency


def _latency_line(times: dict, batch: int) -> str:
    """Base, unmerged and merged: median milliseconds per forward, and each adapted model's
    paired ratio to the base with its spread, or "within noise" (minilora/experiments/timing.py)."""
    ms = {name: 1000 * t for name, t in timing.median_times(times).items()}
    rounds = len(times["base"])
    return (
        f"inference latency, batch of {batch} ({rounds} alternating rounds, medians): base "
        f"{ms['base']:.2f} ms, unmerged {ms['unmerged']:.2f} ms, merged {ms['merged']:.2f} ms; "
        f"to the base, paired by round: unmerged {timing.paired_ratio(times, 'unmerged', 'base')},"
        f" merged {timing.paired_ratio(times, 'merged', 'base')}"
    )


def _table(rows: list[dict]) -> str:
    head = (
        f"{'method':<7}{'rank':>5}{'trainable':>12}{'% of total':>12}{'optim bytes':>13}"
        f"{'step ms':>9}{'accuracy':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        rank = "-" if r["rank"] is None else str(r["rank"])
        lines.append(
            f"{r['method']:<7}{rank:>5}{r['trainable_params']:>12,}"
            f"{r['trainable_percent']:>11.2f}%{r['optimizer_state_bytes']:>13,}"
            f"{r['step_ms']:>9.1f}{r['accuracy']:>10.1%}"
        )
    return "\n".join(lines)


def verdict(rows: list[dict], within: float = 0.05, budget_percent: float = 5.0) -> str:
    """LoRA against full fine-tuning, within a parameter budget, in one line.

    The question the demo asks is whether LoRA matches full fine-tuning while training few
    parameters, so only LoRA runs that train at most ``budget_percent`` of the parameters
    compete: the smallest such rank within ``within`` (accuracy, 0.05 = 5 points) of full
    fine-tuning, or else the best of them. The line names the budget and the ranks inside
    it, and reports the runs over it separately, so that a higher rank's better accuracy
    is never hidden."""
    full = next(r for r in rows if r["method"] == "full")
    lora = [r for r in rows if r["method"] == "lora"]
    inside = [r for r in lora if r["trainable_percent"] <= budget_percent]
    over = [r for r in lora if r["trainable_percent"] > budget_percent]
    ranks = "LoRA " + ", ".join(f"r={r['rank']}" for r in inside) if inside else "no LoRA run"
    scope = f"verdict: with at most {budget_percent:g}% of the parameters trained ({ranks})"
    outside = "".join(
        f" Over the budget, r={r['rank']} trains {r['trainable_percent']:.2f}% and reaches "
        f"{r['accuracy']:.1%}."
        for r in over
    )
    close = [r for r in inside if r["accuracy"] >= full["accuracy"] - within]
    if close:
        r = close[0]
        return (
            f"{scope}, LoRA r={r['rank']} reaches {r['accuracy']:.1%} against full "
            f"fine-tuning's {full['accuracy']:.1%} while training "
            f"{r['trainable_percent']:.2f}% of the parameters.{outside}"
        )
    if not inside:
        return f"{scope}, there is nothing to compare.{outside}"
    best = max(inside, key=lambda r: r["accuracy"])
    return (
        f"{scope}, LoRA did NOT come within {100 * within:g} points of full fine-tuning "
        f"here: the best, r={best['rank']} ({best['trainable_percent']:.2f}% "
        f"of parameters), reaches {best['accuracy']:.1%} against {full['accuracy']:.1%}."
        f"{outside}"
    )


def _write_json(path: Path, obj) -> None:
    safetensors_files.atomic_write([(path, (json.dumps(obj, indent=2) + "\n").encode())])


def write_results(path: Path, results: dict, plot: Path | None, echo=print) -> None:
    """Write a job's results as JSON (atomically) and say where they and the plot went."""
    _write_json(path, results)
    no_plot = ' (for the plots, install the plots extra: pip install ".[plots]")'
    where = f" and {plot}" if plot else no_plot
    echo(f"\nwrote {path}{where}")


def _plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib  # optional extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        label = "full" if r["method"] == "full" else f"LoRA r={r['rank']}"
        ax1.plot(r["loss_curve"], label=label)
        ax2.scatter(r["trainable_params"], 100 * r["accuracy"], label=label)
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title="fine-tuning loss")
    ax2.set(
        xlabel="trainable parameters",
        ylabel="downstream accuracy (%)",
        xscale="log",
        title="accuracy vs trainable parameters",
    )
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
