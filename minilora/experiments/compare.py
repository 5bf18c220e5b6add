"""LoRA among its relatives, measured side by side: ``minilora compare``.

Every method starts from the same shipped base model (which copies, reverses and sorts
digit strings ascending) and is judged on the same held-out examples of the downstream
task (sort descending), none of which any method ever trained on (``minilora.data``):

* adaptation: full fine-tuning, LoRA (unmerged and merged) and its variants DoRA, PiSSA and
  VeRA, Houlsby and Lin adapters, prefix-layer and prefix-embedding tuning, and QLoRA-style
  LoRA on an NF4 base;
* compression: the fully fine-tuned model compressed after training (truncated SVD, int8,
  int4, NF4, magnitude pruning), to show what compression is for: a smaller copy of the
  *whole* model, where LoRA keeps a small *update* beside a shared frozen base.

Each row says what was trained (``trainable_params``), what must be kept for this task
(``storage_bytes``; ``base_bytes`` is what the task shares with every other task: the frozen
base, float32 or NF4), held-out ``accuracy``, ``pretrain_accuracy`` on the pretraining tasks
with the method active (forgetting), forward latency relative to the base at batch 1 and 64
(the median of paired ratios over alternating rounds, with its interquartile range, or
"within noise": minilora/experiments/timing.py), and ``context_length``, the longest input
accepted. A prefix takes positions, so inputs longer than its context are counted as wrong:
that is the method's cost, not a bug of the table. See docs/relatives.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from minilora import backend
from minilora.backend import manual_seed
from minilora.compression import compress
from minilora.data import DOWNSTREAM_TASK, IGNORE_INDEX, PRETRAIN_TASKS, DigitTasks
from minilora.experiments import timing
from minilora.experiments.demo import load_base, write_results
from minilora.lora import LoRAConfig, apply_lora, count_parameters, merge_lora
from minilora.model import GPT
from minilora.relatives.adapters import AdapterConfig, apply_adapters
from minilora.relatives.prefix import PrefixConfig, apply_prefix_tuning
from minilora.train import evaluate, fine_tune, median
from minilora.variants.vera import VeraConfig, apply_vera

ADAPTATION = (
    "full",
    "lora",
    "lora_merged",
    "dora",
    "pissa",
    "vera",
    "adapter_houlsby",
    "adapter_lin",
    "prefix_layer",
    "prefix_embedding",
    "qlora",
)
COMPRESSION = ("svd", "int8", "int4", "nf4", "prune")
METHODS = ADAPTATION + COMPRESSION


@dataclass(frozen=True)
class CompareSettings:
    """What ``minilora compare`` trains and measures; ``quick()`` is the smoke version."""

    steps: int = 300  # optimizer steps per trained method
    batch_size: int = 64
    lr_full: float = 1e-3
    lr_peft: float = 1e-2  # LoRA, adapters, QLoRA: small, freshly initialised modules
    lr_vera: float = 1e-1  # VeRA trains only scaling vectors: they need larger steps
    lr_prefix: float = 1e-1  # prefixes learn nothing in 300 steps at 1e-2 (docs/relatives.md)
    r: int = 4  # LoRA and QLoRA rank (q_proj, v_proj, lora_alpha = 2r as in the demo)
    bottleneck: int = 4  # adapter width m
    num_virtual_tokens: int = 2  # prefix length P
    vera_r: int = 256  # VeRA's shared random projections (its default; wider than C = 64)
    svd_rank: int = 32  # of the block's Linear layers (C = 64)
    sparsity: float = 0.3  # magnitude pruning of connections, per layer
    eval_examples: int = 512
    latency_repeats: int = 30
    sweep_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)  # LoRA
    sweep_bottlenecks: tuple[int, ...] = (1, 2, 4, 8, 16)  # adapters (Houlsby)
    sweep_prefix: tuple[int, ...] = (1, 2, 4, 8)  # prefix-layer tokens
    sweep_svd_ranks: tuple[int, ...] = (8, 16, 24, 32, 48)
    sweep_sparsities: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> CompareSettings:
        return cls(
            steps=40,
            eval_examples=128,
            latency_repeats=15,
            sweep_ranks=(1, 4),
            sweep_bottlenecks=(1, 4),
            sweep_prefix=(1, 2),
            sweep_svd_ranks=(16, 32),
            sweep_sparsities=(0.3, 0.7),
            seed=seed,
        )


@dataclass
class Trained:
    """A fine-tuned model and what its row reports about training."""

    model: GPT
    trainable_params: int
    step_ms: float  # median milliseconds per training step (the first fifth left out: warm-up)


def adapt(
    build: Callable[[], GPT],
    lr: float,
    settings: CompareSettings,
    progress: bool = True,
    desc: str = "train",
) -> Trained:
    """Fine-tune the model ``build()`` returns (a copy of the base with what trains inserted,
    the rest frozen) on the downstream task; inputs longer than its context are left out."""
    manual_seed(settings.seed)  # every method starts from the same random state
    model = build()
    trainable = count_parameters(model)[0]
    tasks = DigitTasks((DOWNSTREAM_TASK,), max_len=longest_input(model))
    s = settings
    history, _ = fine_tune(
        model, tasks, s.steps, lr, s.batch_size, seed=s.seed, progress=progress, desc=desc
    )
    step_ms = 1000 * median([h["seconds"] for h in history[len(history) // 5 :]])
    return Trained(model.eval(), trainable, step_ms)


def copy_with(base: GPT, insert: Callable[[GPT], object]) -> Callable[[], GPT]:
    """A builder for :func:`adapt`: a copy of ``base`` changed in place by ``insert``."""

    def build() -> GPT:
        model = copy.deepcopy(base)
        insert(model)
        return model

    return build


def longest_input(model: GPT) -> int:
    """The most digits a task input can have so that the line fits the model's context
    (task letter, n digits, '=', n output digits: 2n + 2 positions)."""
    return min((model.context_length - 2) // 2, DigitTasks().max_len)


def accuracy(model: GPT, x, y) -> float:
    """Exact match over all examples; those that do not fit the model's context are wrong.

    ``x``, ``y`` (N, T). An example needs the positions up to its last scored target.
    """
    xp = backend.get_array_module(y)
    T = x.shape[1]
    scored = y != IGNORE_INDEX  # (N, T)
    needed = T - xp.argmax(scored[:, ::-1], axis=1)  # (N,) positions up to the last scored
    ctx = min(model.context_length, T)
    fits = backend.to_numpy(needed <= ctx)  # (N,) bool, on the host for indexing
    if not fits.any():
        return 0.0
    keep = backend.array(fits.nonzero()[0], dtype=backend.int64, device=backend.device_of(x))
    kept = evaluate(model, x[keep][:, :ctx], y[keep][:, :ctx])["accuracy"]
    return kept * int(fits.sum()) / x.shape[0]


def lora_config(r: int, **variant) -> LoRAConfig:
    """The LoRA every comparison uses: rank ``r`` on ``q_proj`` and ``v_proj`` (the paper's
    choice), ``lora_alpha = 2r`` as in the demo; ``variant`` adds DoRA, PiSSA, ..."""
    return LoRAConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], **variant)


def _adaptation_builders(base: GPT, s: CompareSettings) -> dict:
    """How each trained method makes its model from the base, and its learning rate."""
    return {
        "full": (copy_with(base, lambda m: None), s.lr_full),
        "lora": (copy_with(base, lambda m: apply_lora(m, lora_config(s.r))), s.lr_peft),
        "dora": (
            copy_with(base, lambda m: apply_lora(m, lora_config(s.r, use_dora=True))),
            s.lr_peft,
        ),
        "pissa": (
            copy_with(base, lambda m: apply_lora(m, lora_config(s.r, init_lora_weights="pissa"))),
            s.lr_peft,
        ),
        "vera": (copy_with(base, lambda m: apply_vera(m, VeraConfig(r=s.vera_r))), s.lr_vera),
        "adapter_houlsby": (
            copy_with(base, lambda m: apply_adapters(m, AdapterConfig("houlsby", s.bottleneck))),
            s.lr_peft,
        ),
        "adapter_lin": (
            copy_with(base, lambda m: apply_adapters(m, AdapterConfig("lin", s.bottleneck))),
            s.lr_peft,
        ),
        "prefix_layer": (
            copy_with(
                base,
                lambda m: apply_prefix_tuning(m, PrefixConfig("layer", s.num_virtual_tokens)),
            ),
            s.lr_prefix,
        ),
        "prefix_embedding": (
            copy_with(
                base,
                lambda m: apply_prefix_tuning(m, PrefixConfig("embedding", s.num_virtual_tokens)),
            ),
            s.lr_prefix,
        ),
        # LoRA on an NF4 base (double quantization), dequantized in the forward
        "qlora": (
            lambda: compress.compressed(base, "qlora", config=lora_config(s.r)),
            s.lr_peft,
        ),
    }


def _trained_bytes(model: GPT) -> int:
    """Bytes of the arrays that were trained: what an adapter-style method keeps per task."""
    return sum(int(p.data.nbytes) for p in model.parameters() if p.requires_grad)


def run_compare(
    settings: CompareSettings, out: Path, device: str = "cpu", progress=True, echo=print
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    base = load_base(device).eval()
    dx, dy = DigitTasks((DOWNSTREAM_TASK,)).eval_set(2024, settings.eval_examples, device)
    px, py = DigitTasks(PRETRAIN_TASKS).eval_set(2025, settings.eval_examples, device)
    base_bytes = compress.storage_bytes(base)

    models: dict[str, GPT] = {}
    info: dict[str, dict] = {}
    nf4_base = compress.compressed(base, "nf4", double_quant=True)  # what QLoRA keeps shared
    for method, (build, lr) in _adaptation_builders(base, settings).items():
        trained = adapt(build, lr, settings, progress, method)
        models[method] = trained.model
        standalone = method == "full"
        # PiSSA changed the frozen base (to the residual): for the shared original base it
        # keeps the rank-2r conversion, twice its trained arrays (minilora/variants/pissa.py)
        per_task = (2 if method == "pissa" else 1) * _trained_bytes(trained.model)
        info[method] = {
            "trainable_params": trained.trainable_params,
            "step_ms": trained.step_ms,
            "storage_bytes": base_bytes if standalone else per_task,
            "base_bytes": 0
            if standalone
            else compress.storage_bytes(nf4_base if method == "qlora" else base),
        }
    merged = copy.deepcopy(models["lora"])
    merge_lora(merged)
    models["lora_merged"] = merged
    info["lora_merged"] = dict(info["lora"])

    full = models["full"]
    compression_options = {
        "svd": {"rank": settings.svd_rank},
        "int8": {},
        "int4": {},
        "nf4": {},
        "prune": {"sparsity": settings.sparsity},
    }
    for method, options in compression_options.items():
        models[method] = compress.compressed(full, method, **options).eval()
        info[method] = {
            "trainable_params": info["full"]["trainable_params"],
            "step_ms": None,  # nothing trains: compressed after full fine-tuning
            "storage_bytes": compress.storage_bytes(models[method]),
            "base_bytes": 0,
        }

    seq_len = min(min(m.context_length for m in models.values()), dx.shape[1])
    latency = {}
    for batch in (1, 64):
        fns = timing.forwards({"base": base, **models}, dx[:batch, :seq_len])
        times = timing.alternate(fns, settings.latency_repeats)
        latency[batch] = {m: timing.paired_ratio(times, m, "base") for m in METHODS}

    rows = []
    for method in METHODS:
        model = models[method]
        rows.append(
            {
                "method": method,
                **info[method],
                "accuracy": accuracy(model, dx, dy),
                "pretrain_accuracy": accuracy(model, px, py),
                "latency_b1": latency[1][method].as_dict(),
                "latency_b64": latency[64][method].as_dict(),
                "context_length": model.context_length,
            }
        )
    echo(
        f"base: {count_parameters(base)[1]:,} parameters, {base_bytes:,} bytes; downstream "
        f"{accuracy(base, dx, dy):.1%}, pretraining tasks {accuracy(base, px, py):.1%}"
    )
    echo(table(rows))
    echo(
        "\nCompression rows compress the fully fine-tuned model after training; a prefix's "
        "inputs longer than its context count as wrong."
    )
    echo(
        f"\nlatency of a forward of {seq_len} positions, relative to the base model: the "
        f"median of {settings.latency_repeats} paired ratios (one per alternating round) and "
        'their interquartile range; "within noise" where that range contains 1.00x or is '
        "wider than the difference (this run cannot tell the model from the base)"
    )
    echo(latency_table(latency))

    sweep = run_sweep(base, full, settings, dx, dy, px, py, progress)
    results = {
        "settings": asdict(settings),
        "device": device,
        "latency_seq_len": seq_len,
        "rows": rows,
        "sweep": sweep,
    }
    write_results(out / "compare.json", results, _plot(sweep, out / "compare.png"), echo)
    return results


def run_sweep(base, full, settings, dx, dy, px, py, progress) -> dict:
    """Accuracy against trainable parameters for LoRA, adapters and prefix tuning; accuracy
    and storage against SVD rank, bits and sparsity for compression of the full model."""
    s = settings
    points = []
    for kind, sizes, lr, make in (
        ("lora", s.sweep_ranks, s.lr_peft, lambda n: lambda m: apply_lora(m, lora_config(n))),
        (
            "adapter_houlsby",
            s.sweep_bottlenecks,
            s.lr_peft,
            lambda n: lambda m: apply_adapters(m, AdapterConfig("houlsby", n)),
        ),
        (
            "prefix_layer",
            s.sweep_prefix,
            s.lr_prefix,
            lambda n: lambda m: apply_prefix_tuning(m, PrefixConfig("layer", n)),
        ),
    ):
        for size in sizes:
            build = copy_with(base, make(size))
            trained = adapt(build, lr, s, progress, f"{kind} {size}")
            points.append(
                {
                    "method": kind,
                    "size": size,
                    "trainable_params": trained.trainable_params,
                    "accuracy": accuracy(trained.model, dx, dy),
                    "pretrain_accuracy": accuracy(trained.model, px, py),
                }
            )
    compression = []
    variants = (
        [("svd", "rank", r, {"rank": r}) for r in s.sweep_svd_ranks]
        + [("prune", "sparsity", p, {"sparsity": p}) for p in s.sweep_sparsities]
        + [("int8", "bits", 8, {}), ("int4", "bits", 4, {}), ("nf4", "bits", 4, {})]
    )
    for method, knob, value, options in variants:
        model = compress.compressed(full, method, **options)
        compression.append(
            {
                "method": method,
                knob: value,
                "storage_bytes": compress.storage_bytes(model),
                "accuracy": accuracy(model, dx, dy),
            }
        )
    return {"adaptation": points, "compression": compression}


def table(rows: list[dict]) -> str:
    head = (
        f"{'method':<18}{'trainable':>11}{'step ms':>9}{'stored bytes':>14}{'accuracy':>10}"
        f"{'pretrain':>10}{'context':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        step = "-" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        lines.append(
            f"{r['method']:<18}{r['trainable_params']:>11,}{step:>9}{r['storage_bytes']:>14,}"
            f"{r['accuracy']:>10.1%}{r['pretrain_accuracy']:>10.1%}{r['context_length']:>9}"
        )
    return "\n".join(lines)


def latency_table(latency: dict[int, dict[str, timing.PairedRatio]]) -> str:
    """One line per method: its paired ratio to the base at each batch size, with spread."""
    batches = list(latency)
    cells = {m: [str(latency[b][m]) for b in batches] for m in latency[batches[0]]}
    width = 2 + max(len(c) for row in cells.values() for c in row)  # two spaces at least
    head = f"{'method':<18}" + "".join(f"{f'batch {b}':<{width}}" for b in batches)
    lines = [head.rstrip(), "-" * len(head.rstrip())]
    for method, row in cells.items():
        lines.append((f"{method:<18}" + "".join(f"{c:<{width}}" for c in row)).rstrip())
    return "\n".join(lines)


def _plot(sweep: dict, path: Path) -> Path | None:
    try:
        import matplotlib  # optional extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for kind in ("lora", "adapter_houlsby", "prefix_layer"):
        pts = [p for p in sweep["adaptation"] if p["method"] == kind]
        ax1.plot(
            [p["trainable_params"] for p in pts],
            [100 * p["accuracy"] for p in pts],
            marker="o",
            label=kind,
        )
    ax1.set(
        xlabel="trainable parameters",
        ylabel="held-out accuracy (%)",
        xscale="log",
        title="adaptation: accuracy vs trainable parameters",
    )
    ax1.legend()
    for ax, knob in ((ax2, "rank"), (ax3, "sparsity")):
        pts = [p for p in sweep["compression"] if knob in p]
        ax.plot([p[knob] for p in pts], [100 * p["accuracy"] for p in pts], marker="o")
        twin = ax.twinx()
        twin.plot([p[knob] for p in pts], [p["storage_bytes"] for p in pts], "--", color="gray")
        twin.set_ylabel("stored bytes (dashed)")
        name = "SVD rank" if knob == "rank" else "pruned fraction"
        ax.set(xlabel=name, ylabel="held-out accuracy (%)", title=f"compression: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
