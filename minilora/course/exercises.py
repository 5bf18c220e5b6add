"""Checks for the notebooks' exercises that have a single answer.

Each ``check_*`` prints one line saying the answer is right, or raises ``AssertionError``
with a line saying what is wrong, without giving the answer away. The notebooks name the
helper under the exercise it checks.
"""

from __future__ import annotations

from minilora import backend
from minilora.autograd import Function, Tensor
from minilora.gradcheck import GradcheckError, gradcheck
from minilora.model import GPTConfig
from minilora.study import accounting


def _verdict(ok: bool, right: str, wrong: str) -> None:
    if not ok:
        raise AssertionError(wrong)
    print(f"right: {right}")


def check_softplus(softplus: type[Function]) -> None:
    """Notebook 1, exercise 1: ``softplus`` is a ``Function`` computing log(1 + eˣ) whose
    backward passes ``gradcheck`` and whose forward stays finite for |x| up to 1000."""
    x = backend.Generator(0).normal((3, 4), std=3.0, dtype=backend.float64)
    xp = backend.get_array_module(x)
    got = softplus()(Tensor(x)).numpy()
    want = xp.logaddexp(0.0, x)  # log(1 + eˣ), computed without overflow
    if not xp.allclose(got, want, rtol=1e-10, atol=1e-12):
        raise AssertionError("the forward is not log(1 + eˣ) (compare with np.logaddexp(0, x))")
    try:
        gradcheck(lambda t: softplus()(t), [x])
    except GradcheckError as e:
        raise AssertionError(f"the backward is wrong: {e}") from None
    big = backend.array([-1000.0, -50.0, 50.0, 1000.0], dtype=backend.float64)
    with xp.errstate(over="ignore", invalid="ignore"):
        out = softplus()(Tensor(big)).numpy()
    _verdict(
        bool(xp.isfinite(out).all()) and bool(xp.allclose(out, xp.logaddexp(0.0, big))),
        "softplus is right, its backward passes gradcheck, and it is stable",
        f"softplus({big.tolist()}) = {out.tolist()}: not stable for large |x| (for x > 0, "
        "log(1 + eˣ) = x + log(1 + e⁻ˣ))",
    )


def check_parameter_count(config: GPTConfig, answer: int) -> None:
    """Notebook 2, exercise 1: the parameter count of ``GPT(config)``, predicted."""
    true = accounting.total_params(config)
    _verdict(
        answer == true,
        f"GPT({config.n_layer} layers, n_embd={config.n_embd}) has {true:,} parameters",
        f"{answer:,} is {'too high' if answer > true else 'too low'}: count each block's "
        "four attention projections, two MLP layers and two layer norms (docs/accounting.md)",
    )


def check_gpt2_medium_lora(answer: int) -> None:
    """Notebook 5, exercise 2: GPT-2 medium's trainable parameters with LoRA r=4 on
    ``q_proj`` and ``v_proj``."""
    shape = accounting.get_preset("gpt2-medium").shape
    true = accounting.lora_params(shape, accounting.LoRASpec(["q_proj", "v_proj"], 4))
    per_layer = 2 * 4 * (2 * shape.n_embd)
    _verdict(
        answer == true,
        f"{true:,} trainable parameters ({per_layer:,} per layer, {shape.n_layer} layers)",
        f"{answer:,} is {'too high' if answer > true else 'too low'}: each adapted "
        "d × d matrix trains r·(d + d) numbers, in every layer",
    )


def check_adapter_baseline(answer: int) -> None:
    """Notebook 5, exercise 5: the adapter baseline's trainable parameters on GPT-3 175B,
    one adapter of bottleneck r = 4 and two layer norms per block."""
    shape = accounting.get_preset("gpt3-175b").shape
    L, d, r = shape.n_layer, shape.n_embd, 4
    true = L * (2 * d * r + r + d) + 2 * (2 * L) * d  # L̂_adpt = L, L̂_LN = 2L
    _verdict(
        answer == true,
        f"{true:,} parameters, {true / 1e6:.1f}M (LoRA r=4 on q, v: "
        f"{accounting.lora_params(shape, accounting.LoRASpec(['q_proj', 'v_proj'], r)):,})",
        f"{answer:,} is {'too high' if answer > true else 'too low'}: "
        f"L̂_adpt = {L} adapters, L̂_LN = {2 * L} layer norms, d = {d}",
    )


__all__ = [
    "check_adapter_baseline",
    "check_gpt2_medium_lora",
    "check_parameter_count",
    "check_softplus",
]
