"""The digit tasks: held-out evaluation inputs are never trained on, and eval sets are fixed."""

import itertools

import numpy as np
import pytest

from minilora import backend
from minilora.data import (
    DOWNSTREAM_TASK,
    HELD_OUT_EVERY,
    IGNORE_INDEX,
    PRETRAIN_TASKS,
    STOI,
    TASKS,
    DigitTasks,
    is_held_out,
)


def pairs(x) -> set[tuple[str, tuple[int, ...]]]:
    """The (task, input digits) of every example in a batch ``x`` (B, T)."""
    out = set()
    for row in np.asarray(x).tolist():
        task = next(t for t in TASKS if STOI[t] == row[0])
        digits = tuple(row[1 : row.index(STOI["="])])
        out.add((task, digits))
    return out


@pytest.mark.parametrize("length", [1, 2, 3])
def test_every_length_has_inputs_on_both_sides_of_the_split(length):
    """Else rejection sampling would never end for that length."""
    strings = list(itertools.product(range(10), repeat=length))
    held = sum(is_held_out(list(d)) for d in strings)
    assert 0 < held < len(strings)
    if length == 3:  # a hash, so close to 1 in HELD_OUT_EVERY
        assert abs(held - len(strings) / HELD_OUT_EVERY) < 0.3 * len(strings) / HELD_OUT_EVERY


def test_the_split_depends_on_the_digits_only_and_is_fixed():
    # CRC-32 values pinned: the split must not change between runs, machines or versions
    assert is_held_out([]) is True  # crc32(b"") == 0
    assert [is_held_out([d]) for d in range(10)].count(True) == 1
    assert is_held_out((3, 1, 4)) == is_held_out([3, 1, 4])


def test_training_batches_never_contain_an_eval_input():
    """Over many batches of every task, no (task, digits) of the eval sets appears."""
    tasks = DigitTasks((*PRETRAIN_TASKS, DOWNSTREAM_TASK), min_len=3, max_len=4)
    x_eval, _ = tasks.eval_set(seed=2024, n=512)
    held = pairs(x_eval)
    generator = backend.Generator(1)
    trained = set()
    for _ in range(200):  # 12800 examples: every 3-digit input about 10 times over
        trained |= pairs(tasks.batch(generator, 64)[0])
    assert all(is_held_out(list(d)) for _, d in held)
    assert not any(is_held_out(list(d)) for _, d in trained)
    assert held.isdisjoint(trained)
    # the test has teeth: the training stream covers almost all non-held-out 3-digit inputs
    three = {d for _, d in trained if len(d) == 3}
    assert len(three) > 0.95 * 1000 * (1 - 1 / HELD_OUT_EVERY)


def test_a_held_out_input_is_not_trained_on_under_another_task_either():
    x_eval, _ = DigitTasks((DOWNSTREAM_TASK,), max_len=3).eval_set(seed=0, n=64)
    down_inputs = {d for _, d in pairs(x_eval)}
    pre = DigitTasks(PRETRAIN_TASKS, max_len=3)
    generator = backend.Generator(0)
    seen = set()
    for _ in range(50):
        seen |= {d for _, d in pairs(pre.batch(generator, 64)[0])}
    assert down_inputs and down_inputs.isdisjoint(seen)


def test_eval_set_has_the_size_and_tasks_it_claims_and_is_deterministic():
    tasks = DigitTasks(("C", "S"), min_len=3, max_len=6)
    x, y = tasks.eval_set(seed=5, n=100)
    assert x.shape == y.shape == (100, tasks.block_size)
    assert x.dtype == y.dtype == np.int64
    x2, y2 = tasks.eval_set(seed=5, n=100)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, tasks.eval_set(seed=6, n=100)[0])
    found = pairs(x)
    assert {t for t, _ in found} == {"C", "S"}
    assert {len(d) for _, d in found} == {3, 4, 5, 6}
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        task = next(t for t in TASKS if STOI[t] == row_x[0])
        digits = row_x[1 : row_x.index(STOI["="])]
        scored = [t for t in row_y if t != IGNORE_INDEX]
        assert scored == [*TASKS[task](digits), STOI["."]]  # the answer, then the end


def test_batch_is_deterministic_for_a_generator_seed():
    tasks = DigitTasks()
    a = tasks.batch(backend.Generator(3), 32)
    b = tasks.batch(backend.Generator(3), 32)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
