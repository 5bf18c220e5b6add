"""Training and evaluation loops, with a progress bar and a history of metrics."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from minilora import backend
from minilora.autograd import no_grad
from minilora.data import exact_match
from minilora.optim import AdamW, Optimizer, clip_grad_norm_

LOG_INTERVAL = 5.0  # seconds between progress lines when stderr is not a terminal


class ProgressLog:
    """Progress for a log file: when stderr is not a terminal, a tqdm bar would write a
    carriage-return update many times a second (131 KB for one run), so instead print one
    plain line every ``LOG_INTERVAL`` seconds, and one at the end."""

    def __init__(self, desc: str, steps: int):
        self.desc, self.steps = desc, steps
        self.last = time.monotonic()

    def update(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL or step == self.steps:
            self.last = now
            print(
                f"{self.desc}: step {step}/{self.steps}, loss {loss:.4f}",
                file=sys.stderr,
                flush=True,
            )


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped at ``step``."""

    def __init__(self, step: int, loss: float):
        super().__init__(
            f"loss became {loss} at step {step}; training stopped (lower the learning rate or "
            "clip gradients). Nothing already saved was touched."
        )
        self.step, self.loss = step, loss


def train(
    model,
    optimizer: Optimizer,
    get_batch: Callable[[int], tuple],
    steps: int,
    *,
    grad_clip: float | None = 1.0,
    eval_fn: Callable[[], dict] | None = None,
    eval_every: int = 0,
    lr_schedule: Callable[[int], float] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict]:
    """Run ``steps`` optimizer steps; return the history as a list of dicts.

    ``get_batch(step) -> (x, y)`` supplies token ids and targets. Every ``eval_every``
    steps (and at the end) ``eval_fn()`` adds its metrics to the history.
    ``lr_schedule(step)`` gives a factor applied to every group's initial learning rate.
    A NaN or infinite loss raises :class:`NonFiniteLossError` naming the step.
    ``progress`` shows a bar on a terminal and a line every few seconds in a log
    (:class:`ProgressLog`).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict] = []
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    on_terminal = sys.stderr.isatty()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not (progress and on_terminal), leave=False)
    log = ProgressLog(desc, steps) if progress and not on_terminal else None
    for step in bar:
        x, y = get_batch(step)
        if lr_schedule is not None:
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * lr_schedule(step)
        backend.synchronize()  # on a GPU, time this step's work, not the previous one's
        t0 = time.perf_counter()
        _, loss = model(x, y)
        value = loss.item()
        if not math.isfinite(value):
            bar.close()
            raise NonFiniteLossError(step, value)
        optimizer.zero_grad()
        loss.backward()
        norm = clip_grad_norm_(params, grad_clip) if grad_clip else None
        optimizer.step()
        backend.synchronize()
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": value, "seconds": dt, "grad_norm": norm}
        if eval_fn is not None and eval_every and (step % eval_every == 0 or step == steps):
            record.update(eval_fn())
            model.train()
        history.append(record)
        bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{x.size / dt:,.0f}")
        if log is not None:
            log.update(step, value)
    return history


def fine_tune(
    model,
    data,
    steps: int,
    lr: float,
    batch_size: int,
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> tuple[list[dict], AdamW]:
    """The fine-tuning recipe every job shares: train ``model``'s trainable parameters in
    place on ``data`` (anything with ``.batch(generator, batch_size, device)``: digit tasks,
    a text stream, prompt/response pairs) with AdamW (no weight decay), a linear warm-up over
    the first ``steps // 15`` steps and a cosine decay, batches drawn from the generator
    ``seed + 1000``. What trains is whatever the caller left with ``requires_grad`` (all of
    it, or an adapter it inserted). Returns the history of :func:`train` and the optimizer.
    """
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    draws, device = backend.Generator(seed + 1000), model.device
    history = train(
        model,
        opt,
        lambda step: data.batch(draws, batch_size, device),
        steps,
        lr_schedule=cosine_schedule(steps, max(steps // 15, 1)),
        progress=progress,
        desc=desc,
    )
    return history, opt


def cosine_schedule(steps: int, warmup: int = 0, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up for ``warmup`` steps, then cosine decay from 1 to ``floor``."""

    def factor(step: int) -> float:
        if step <= warmup:
            return step / max(warmup, 1)
        progress = (step - warmup) / max(steps - warmup, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def evaluate(model, x, y, batch_size: int = 256) -> dict:
    """Loss and exact-match accuracy on a fixed set, in eval mode, without a graph."""
    model.eval()
    losses, accs, n = 0.0, 0.0, x.shape[0]
    with no_grad():
        for i in range(0, n, batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            logits, loss = model(xb, yb)
            losses += loss.item() * xb.shape[0]
            accs += exact_match(logits.data, yb) * xb.shape[0]
    return {"eval_loss": losses / n, "accuracy": accs / n}


def median(values) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
