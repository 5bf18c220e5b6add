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
  judgement involved, and held-out examples are generated from a different seed.

The tokenizer is one character per token. Only the output and end positions are trained
and scored (the rest of the targets are ``IGNORE_INDEX``).
"""

from __future__ import annotations

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
        """A random batch: ``x`` and ``y`` int64 arrays of shape (batch_size, block_size)."""
        tasks = generator.integers(0, len(self.tasks), (batch_size,))
        lengths = generator.integers(self.min_len, self.max_len + 1, (batch_size,))
        digits = generator.integers(0, 10, (batch_size, self.max_len))
        xs, ys = [], []
        for t, n, d in zip(tasks.tolist(), lengths.tolist(), digits.tolist(), strict=True):
            x, y = self.example(self.tasks[t], d[:n])
            xs.append(x)
            ys.append(y)
        x = backend.array(xs, dtype=backend.int64, device=device)
        y = backend.array(ys, dtype=backend.int64, device=device)
        return x, y

    def eval_set(self, seed: int, n: int, device: str = "cpu"):
        """A fixed held-out set: the same ``seed`` always gives the same examples."""
        return self.batch(backend.Generator(seed), n, device)


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
