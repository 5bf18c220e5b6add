"""The notebooks' check_* helpers: each accepts the right answer and refuses wrong ones
without printing the answer."""

import numpy as np
import pytest

import minilora as ml
from minilora.autograd import Function
from minilora.course import exercises
from minilora.study import accounting


class Softplus(Function):
    """A stable softplus, as exercise 1 of notebook 1 asks."""

    def forward(self, x):
        self.x = x
        return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))

    def backward(self, g):
        return (g / (1 + np.exp(-self.x)),)


class NaiveSoftplus(Softplus):
    def forward(self, x):
        self.x = x
        return np.log(1 + np.exp(x))


class WrongBackward(Softplus):
    def backward(self, g):
        return (g * np.exp(self.x),)


def test_check_softplus(capsys):
    exercises.check_softplus(Softplus)
    assert capsys.readouterr().out.startswith("right:")
    with pytest.raises(AssertionError, match="not stable for large"):
        exercises.check_softplus(NaiveSoftplus)
    with pytest.raises(AssertionError, match="the backward is wrong"):
        exercises.check_softplus(WrongBackward)


def test_check_parameter_count(capsys):
    config = ml.GPTConfig(vocab_size=16, block_size=16, n_layer=3, n_head=2, n_embd=32)
    true = sum(p.size for p in ml.GPT(config).parameters())
    exercises.check_parameter_count(config, true)
    assert f"{true:,}" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="too low") as e:
        exercises.check_parameter_count(config, true - 1)
    assert f"{true:,}" not in str(e.value)


def test_check_gpt2_medium_and_adapter_baseline(capsys):
    shape = accounting.get_preset("gpt2-medium").shape
    exercises.check_gpt2_medium_lora(shape.n_layer * 2 * 4 * 2 * shape.n_embd)
    with pytest.raises(AssertionError, match="too high"):
        exercises.check_gpt2_medium_lora(10**9)
    L, d = 96, 12288  # GPT-3: one adapter and two layer norms per block
    exercises.check_adapter_baseline(L * (2 * d * 4 + 4 + d) + 2 * (2 * L) * d)
    with pytest.raises(AssertionError, match="too low"):
        exercises.check_adapter_baseline(1)
    assert capsys.readouterr().out.count("right:") == 2
