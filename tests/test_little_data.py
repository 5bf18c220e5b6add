"""Little data: the fixed training set is honest, and the experiment measures what it says."""

import numpy as np
import pytest

from minilora import backend
from minilora.data import DOWNSTREAM_TASK, STOI, DigitTasks, is_held_out
from minilora.experiments import little_data
from minilora.experiments.little_data import LittleDataSettings, run_little_data, training_set


def inputs(x) -> list[tuple[int, ...]]:
    """The input digits of every example in ``x`` (N, T)."""
    rows = np.asarray(x).tolist()
    return [tuple(row[1 : row.index(STOI["="])]) for row in rows]


@pytest.mark.parametrize("n", [1, 32, 128])
def test_training_set_has_n_downstream_examples_none_held_out(n):
    data = training_set(n, seed=3)
    assert len(data) == n and data.x.shape[0] == data.y.shape[0] == n
    assert (np.asarray(data.x)[:, 0] == STOI[DOWNSTREAM_TASK]).all()
    assert not any(is_held_out(list(d)) for d in inputs(data.x))
    held = DigitTasks((DOWNSTREAM_TASK,)).eval_set(2024, 512)[0]  # what the experiment scores
    assert set(inputs(data.x)).isdisjoint(inputs(held))


def test_the_same_seed_gives_the_same_set_and_another_seed_another():
    a, b, c = training_set(64, seed=5), training_set(64, seed=5), training_set(64, seed=6)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


def test_batches_come_from_the_fixed_set_only():
    data = training_set(8, seed=0)
    rows = {tuple(r) for r in np.asarray(data.x).tolist()}
    generator = backend.Generator(1)
    for _ in range(20):
        x, y = data.batch(generator, 16)
        assert x.shape == (16, data.x.shape[1]) and y.shape == x.shape
        assert {tuple(r) for r in np.asarray(x).tolist()} <= rows
    # and all of it is used: 320 draws from 8 examples miss none
    seen = {tuple(r) for _ in range(20) for r in np.asarray(data.batch(generator, 16)[0]).tolist()}
    assert seen == rows


@pytest.mark.parametrize("n", [0, -1, 2.5, True, "8"])
def test_a_bad_size_is_refused_naming_it(n):
    with pytest.raises(ValueError, match=rf"n={n!r}"):
        training_set(n)


def test_a_tiny_run_reports_every_method_and_size(monkeypatch):
    """Accuracies in [0, 1]; the training accuracy is measured on the n training examples;
    LoRA with its adapters disabled is the base (its frozen weights never moved)."""
    scored = []
    real = little_data.accuracy

    def spy(model, x, y):
        scored.append(np.asarray(x).copy())
        return real(model, x, y)

    monkeypatch.setattr(little_data, "accuracy", spy)
    s = LittleDataSettings(sizes=(4, 8), ranks=(1, 2), steps=2, batch_size=4, eval_examples=16)
    results = run_little_data(s, progress=False, echo=lambda *a: None)
    rows = results["rows"]
    assert [(r["n"], r["method"], r["r"]) for r in rows] == [
        (n, m, r) for n in (4, 8) for m, r in (("full", None), ("lora", 1), ("lora", 2))
    ]
    keys = ("train_accuracy", "accuracy", "pretrain_accuracy")
    base = results["base"]
    for row in rows:
        assert all(0.0 <= row[k] <= 1.0 for k in keys)
        assert row["gap"] == pytest.approx(row["train_accuracy"] - row["accuracy"])
        assert row["epochs"] == pytest.approx(2 * 4 / row["n"])
        if row["method"] == "lora":
            assert row["trainable_params"] == 2 * 2 * row["r"] * 2 * 64  # L, q and v, r(C+C)
            assert row["pretrain_accuracy_disabled"] == base["pretrain_accuracy"]
        else:
            assert row["pretrain_accuracy_disabled"] is None
    # each run scores its own training set first: the n examples of training_set(n, seed)
    first = 0
    for row in rows:
        assert np.array_equal(scored[first], training_set(row["n"], s.seed).x)
        first += 3 if row["method"] == "full" else 4  # train, held out, pretrain (, disabled)
    assert len(scored) == first + 2  # then the base: held out and pretrain
