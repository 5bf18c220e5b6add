"""Fine-tuning on little data: does LoRA overfit less than full fine-tuning?

The LoRA paper (Hu et al., 2021, appendix F.3, GPT-3 on small subsets of MNLI) reports
LoRA ahead of full fine-tuning when training examples are few; a common reading is that a
low-rank update has less room to memorise, so it overfits less. Here the shipped base model
is fine-tuned on a *fixed* training set of ``n`` downstream examples (sort descending,
inputs from the training side of the split, never held out) for every ``n`` in ``sizes``:
full fine-tuning, and LoRA at each rank in ``ranks`` (q_proj and v_proj, ``lora_alpha`` =
2r as in the demo).

Every run takes the same number of optimizer steps (``steps``) with minibatches of
``batch_size`` drawn with replacement from its ``n`` examples, so a small set is seen many
more times (``steps * batch_size / n`` epochs) and has every chance to be memorised. Each
row reports accuracy on the ``n`` training examples, on the held-out examples (``gap`` is
the difference), and on the pretraining tasks' held-out examples with the method active
(forgetting) and, for LoRA, with its adapters disabled (which must equal the base: the
frozen weights never moved). See docs/little_data.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from minilora import backend
from minilora.backend import manual_seed
from minilora.data import DOWNSTREAM_TASK, PRETRAIN_TASKS, DigitTasks
from minilora.experiments.compare import accuracy, copy_with, lora_config
from minilora.experiments.demo import load_base
from minilora.lora import apply_lora, count_parameters, disable_adapters
from minilora.train import fine_tune


@dataclass(frozen=True)
class LittleDataSettings:
    """What the little-data experiment trains; ``quick()`` is the smoke version."""

    sizes: tuple[int, ...] = (32, 128, 512, 2048)  # training examples n
    ranks: tuple[int, ...] = (1, 4, 16)  # LoRA ranks r
    steps: int = 100  # optimizer steps for every n and method
    batch_size: int = 32
    lr_full: float = 1e-3  # as minilora compare
    lr_lora: float = 1e-2
    eval_examples: int = 512
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> LittleDataSettings:
        return cls(sizes=(32, 512), ranks=(4,), steps=30, eval_examples=128, seed=seed)


@dataclass(frozen=True)
class FixedSet:
    """``n`` examples drawn once; ``batch`` samples minibatches from them (with replacement),
    so that :func:`minilora.train.fine_tune` trains on this set and nothing else.

    ``x``, ``y`` (n, T) int64 arrays, from the training side of the held-out split.
    """

    x: object
    y: object

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, generator: backend.Generator, batch_size: int, device: str = "cpu"):
        idx = generator.integers(0, len(self), (batch_size,), device=backend.device_of(self.x))
        return self.x[idx], self.y[idx]  # (batch_size, T) each


def training_set(n: int, seed: int = 0, device: str = "cpu") -> FixedSet:
    """A fixed set of ``n`` downstream training examples; the same seed gives the same set."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r}: expected a positive number of training examples")
    x, y = DigitTasks((DOWNSTREAM_TASK,)).batch(backend.Generator(seed), n, device)
    return FixedSet(x, y)


def _lora(r: int):
    return lambda model: apply_lora(model, lora_config(r))


def run_little_data(
    settings: LittleDataSettings, device: str = "cpu", progress=True, echo=print
) -> dict:
    """Train every method on every training-set size; return ``{"settings", "base", "rows"}``.

    Each row: ``n``, ``method`` ("full" or "lora"), ``r`` (None for full),
    ``trainable_params``, ``epochs``, ``train_accuracy``, ``accuracy`` (held out), ``gap``,
    ``pretrain_accuracy`` (method active) and ``pretrain_accuracy_disabled`` (LoRA only).
    """
    s = settings
    base = load_base(device).eval()
    dx, dy = DigitTasks((DOWNSTREAM_TASK,)).eval_set(2024, s.eval_examples, device)
    px, py = DigitTasks(PRETRAIN_TASKS).eval_set(2025, s.eval_examples, device)
    methods = [("full", None, lambda m: None, s.lr_full)]
    methods += [("lora", r, _lora(r), s.lr_lora) for r in s.ranks]
    rows = []
    for n in s.sizes:
        data = training_set(n, s.seed, device)
        for method, r, insert, lr in methods:
            manual_seed(s.seed)  # every run starts from the same random state
            model = copy_with(base, insert)()
            desc = f"n={n} {method}" + (f" r={r}" if r else "")
            fine_tune(
                model, data, s.steps, lr, s.batch_size, seed=s.seed, progress=progress, desc=desc
            )
            model.eval()
            train_acc, held_out = accuracy(model, data.x, data.y), accuracy(model, dx, dy)
            row = {
                "n": n,
                "method": method,
                "r": r,
                "trainable_params": count_parameters(model)[0],
                "epochs": s.steps * s.batch_size / n,
                "train_accuracy": train_acc,
                "accuracy": held_out,
                "gap": train_acc - held_out,
                "pretrain_accuracy": accuracy(model, px, py),
                "pretrain_accuracy_disabled": None,
            }
            if method == "lora":
                with disable_adapters(model):
                    row["pretrain_accuracy_disabled"] = accuracy(model, px, py)
            rows.append(row)
    results = {
        "settings": asdict(s),
        "base": {"accuracy": accuracy(base, dx, dy), "pretrain_accuracy": accuracy(base, px, py)},
        "rows": rows,
    }
    echo(table(results))
    return results


def table(results: dict) -> str:
    b = results["base"]
    head = (
        f"{'n':>5} {'method':<9}{'trainable':>10}{'epochs':>8}{'train':>8}{'held out':>10}"
        f"{'gap':>8}{'pretrain':>10}{'disabled':>10}"
    )
    lines = [
        f"base: held out {b['accuracy']:.1%}, pretraining tasks {b['pretrain_accuracy']:.1%}",
        head,
        "-" * len(head),
    ]
    for r in results["rows"]:
        name = r["method"] + (f" r={r['r']}" if r["r"] else "")
        disabled = r["pretrain_accuracy_disabled"]
        lines.append(
            f"{r['n']:>5} {name:<9}{r['trainable_params']:>10,}{r['epochs']:>8.1f}"
            f"{r['train_accuracy']:>8.1%}{r['accuracy']:>10.1%}{r['gap']:>+8.1%}"
            f"{r['pretrain_accuracy']:>10.1%}"
            + (f"{disabled:>10.1%}" if disabled is not None else "")
        )
    return "\n".join(lines)
