"""Offline tasks for the demo: digit-string transformations, generated on the fly.

Every example is one line of characters::

    S 3 1 4 1 = 1 1 3 4 .        sort ascending
    ^task ^input  ^sep ^output ^end

Pretraining teaches a task *family*: copy (``C``), reverse (``R``) and sort ascending
(``S``). The downstream task is sort **descending** (``D``), which the base model has never
seen. Why this is a fair LoRA demonstration:

* it is *related*: descending sort is ascending sort followed by reversal, both of which
  the base model can already do, so a small change of the weights should suffice (LoRA's
  hypothesis: the update needed for adaptation has low intrinsic rank);
* it is *new*: the base model has never seen ``D``, and it does badly on it (it answers
  with one of the tasks it knows), so any gain is the adapter's;
* it is *exact*: an answer is right or wrong (exact match of the whole output), with no
  judgement involved;
* it is *held out*: a fixed eighth of all digit strings (chosen by a hash of the digits,
  :func:`is_held_out`) is reserved for evaluation. ``batch`` never emits one, whatever the
  task, and ``eval_set`` draws only those, so no evaluation input was ever trained on, in
  pretraining or in fine-tuning. A different seed alone would not do: there are only 1000
  three-digit strings, and most held-out short inputs would also occur in training.

The tokenizer is one character per token. Only the output and end positions are trained
and scored (the rest of the targets are ``IGNORE_INDEX``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from minilora import backend

VOCAB = "0123456789=.CRSD"  # digits, separator, end (also padding), then the task tokens
STOI = {ch: i for i, ch in enumerate(VOCAB)}
IGNORE_INDEX = -100
PRETRAIN_TASKS = ("C", "R", "S")
DOWNSTREAM_TASK = "D"
TASKS = {
    "C": lambda digits: digits,  # copy
    "R": lambda digits: digits[::-1],  # reverse
    "S": lambda digits: sorted(digits),  # sort ascending
    "D": lambda digits: sorted(digits, reverse=True),  # sort descending (downstream)
}
HELD_OUT_EVERY = 8  # one digit string in 8 is reserved for evaluation


def is_held_out(digits) -> bool:
    """True for the digit strings reserved for evaluation (about 1 in ``HELD_OUT_EVERY``).

    The choice depends on the digits only (not on the task): a held-out input is never
    trained on under any task. CRC-32 is a fixed, well-mixed hash (Python's ``hash`` of a
    string changes from run to run), so the split is the same on every machine. Every
    length has inputs on both sides (checked down to one digit by the tests).
    """
    return zlib.crc32(bytes(digits)) % HELD_OUT_EVERY == 0


def encode(text: str) -> list[int]:
    """Characters to ids (spaces are ignored)."""
    try:
        return [STOI[ch] for ch in text if ch != " "]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the vocabulary {VOCAB!r}") from None


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


@dataclass(frozen=True)
class DigitTasks:
    """Examples of the given tasks with ``min_len``..``max_len`` digits, padded to a block."""

    tasks: tuple[str, ...] = PRETRAIN_TASKS
    min_len: int = 3
    max_len: int = 8

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks={self.tasks!r}: each must be one of {sorted(TASKS)}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(
                f"min_len={self.min_len}, max_len={self.max_len}: need 1 <= min_len <= max_len"
            )

    @property
    def block_size(self) -> int:
        """Tokens a model needs to see: task, digits, '=', output (the end is predicted)."""
        return 2 * self.max_len + 2

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    def example(self, task: str, digits: list[int]) -> tuple[list[int], list[int]]:
        """One sequence as (input ids, target ids), both block_size long."""
        out = TASKS[task](digits)
        line = [STOI[task], *digits, STOI["="], *out, STOI["."]]
        pad = self.block_size + 1 - len(line)
        line += [STOI["."]] * pad
        x, y = line[:-1], line[1:]
        # score only the output digits and the end marker: positions that predict them
        first = len(digits) + 1  # predicting position of the first output digit is at '='
        y = [t if first <= i <= first + len(digits) else IGNORE_INDEX for i, t in enumerate(y)]
        return x, y

    def batch(self, generator: backend.Generator, batch_size: int, device: str = "cpu"):
        """A random training batch: ``x`` and ``y`` int64 arrays of shape (batch_size, block_size).

        Never contains a held-out input (:func:`is_held_out`): those are redrawn.
        """
        return self._sample(generator, batch_size, held_out=False, device=device)

    def eval_set(self, seed: int, n: int, device: str = "cpu"):
        """A fixed evaluation set of ``n`` examples whose inputs are all held out.

        The same ``seed`` always gives the same examples. Short inputs may repeat (there are
        only about 125 held-out three-digit strings).
        """
        return self._sample(backend.Generator(seed), n, held_out=True, device=device)

    def _sample(self, generator: backend.Generator, n: int, held_out: bool, device: str):
        """``n`` examples whose inputs are held out (``held_out=True``) or not: a task and a
        length per example, then digits drawn until they fall on the requested side."""
        tasks = generator.integers(0, len(self.tasks), (n,))
        lengths = generator.integers(self.min_len, self.max_len + 1, (n,))
        xs, ys = [], []
        for t, length in zip(tasks.tolist(), lengths.tolist(), strict=True):
            digits = generator.integers(0, 10, (length,)).tolist()
            while is_held_out(digits) != held_out:  # rejection sampling: the sides never meet
                digits = generator.integers(0, 10, (length,)).tolist()
            x, y = self.example(self.tasks[t], digits)
            xs.append(x)
            ys.append(y)
        x = backend.array(xs, dtype=backend.int64, device=device)
        y = backend.array(ys, dtype=backend.int64, device=device)
        return x, y


def exact_match(logits, y) -> float:
    """Fraction of sequences whose every scored position is predicted correctly.

    With teacher forcing, "every argmax right" is exactly "greedy decoding produces the
    whole answer": if all are right, each greedy step sees the right prefix; if one is
    wrong, the first wrong one is also wrong in greedy decoding (same prefix before it).
    ``logits`` (B, T, V) array, ``y`` (B, T) int array.
    """
    xp = backend.get_array_module(logits)
    if backend.device_of(y) == "cpu":  # host targets (a list, a NumPy array) go to the logits
        y = backend.array(y, device=backend.device_of(logits))
    pred = logits.argmax(axis=-1)
    scored = y != IGNORE_INDEX
    wrong = (pred != y) & scored
    return float(xp.mean(~wrong.any(axis=1)))
