"""Text as training data: a plain-text file, or prompt/response pairs, as (x, y) blocks.

Two kinds of file, each with a held-out part that training never sees:

* **plain text** (``.txt``): the whole file is one token stream, and the model learns to
  predict every next token (``y`` is ``x`` shifted by one). The split is by position: the
  last ``held_out`` fraction of the stream is held out, and training windows are drawn
  from the part before it only, so no held-out token is ever a training input or target
  (:class:`TokenStream`).
* **prompt/response pairs** (``.jsonl``, one ``{"prompt": ..., "response": ...}`` object a
  line): each example is the prompt's tokens, the response's, then the end-of-text token.
  The targets at positions that predict prompt tokens are ``IGNORE_INDEX``, so the loss
  is the mean over response tokens (and the end-of-text) only: the model learns to answer,
  not to write prompts. The split is by example: identical pairs go to the same side, so
  a held-out example never appears, even as a duplicate, in training
  (:class:`PromptResponse`).

:func:`load_text_data` picks the kind from the file's extension.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from minilora import backend
from minilora.autograd import no_grad
from minilora.backend import manual_seed
from minilora.data import IGNORE_INDEX
from minilora.interop import files
from minilora.lora import LoRAConfig, apply_lora
from minilora.text.bpe import END_OF_TEXT
from minilora.train import fine_tune


def read_text(path) -> str:
    """The UTF-8 text of ``path``; an error names the file and what is wrong with it."""
    data = files.read_file(path, "data", "a .txt or .jsonl file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data {path} is not UTF-8 text: byte {e.start}: {e.reason}") from None


def _check_fraction(held_out: float) -> None:
    if not (isinstance(held_out, (int, float)) and 0 < held_out < 1):
        raise ValueError(f"held_out={held_out!r} must be a fraction strictly between 0 and 1")


class TokenStream:
    """A token stream for next-token prediction, split by position.

    The last ``held_out`` fraction of ``ids`` (rounded, at least one token) is held out. Windows
    hold ``seq_len`` = min(``block_size``, what each part allows) tokens: a training window
    is ``x = ids[s : s + seq_len]``, ``y = ids[s + 1 : s + seq_len + 1]`` at a random start
    ``s`` with every position in the training part; the held-out windows tile the held-out
    part, each target scored once (a tail shorter than a window is left out).
    """

    def __init__(self, ids: list[int], block_size: int, held_out: float = 0.1):
        _check_fraction(held_out)
        n = len(ids)
        self.split = n - max(1, round(n * held_out))  # the first held-out position
        self.train_ids, self.held_ids = list(ids[: self.split]), list(ids[self.split :])
        self.seq_len = min(block_size, len(self.train_ids) - 1, len(self.held_ids) - 1)
        if self.seq_len < 1:
            raise ValueError(
                f"the text is {n} tokens; with held_out={held_out} the training part has "
                f"{len(self.train_ids)} and the held-out part {len(self.held_ids)}, and each "
                "needs at least 2 (an input and its next token): give a longer text"
            )

    def batch(self, generator: backend.Generator, batch_size: int, device: str = "cpu"):
        """``batch_size`` random training windows: x, y int64 arrays (batch_size, seq_len)."""
        T = self.seq_len
        starts = generator.integers(0, len(self.train_ids) - T, (batch_size,)).tolist()
        x = [self.train_ids[s : s + T] for s in starts]
        y = [self.train_ids[s + 1 : s + T + 1] for s in starts]
        return _arrays(x, y, device)

    def held_out(self, device: str = "cpu"):
        """Every held-out window: x, y int64 arrays (windows, seq_len)."""
        T, ids = self.seq_len, self.held_ids
        starts = range(0, len(ids) - T, T)
        x = [ids[s : s + T] for s in starts]
        y = [ids[s + 1 : s + T + 1] for s in starts]
        return _arrays(x, y, device)


def read_pairs(path) -> list[tuple[int, str, str]]:
    """(line number, prompt, response) for each line of a JSONL file; blank lines are
    skipped. A bad line is an error naming the file, the line and the problem."""
    pairs = []
    # lines end at "\n" only: str.splitlines would also cut at U+2028 and other characters
    # that JSON allows inside a string
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{where} is not JSON: {e}") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where} is {type(item).__name__}; expected an object")
        for key in ("prompt", "response"):
            if key not in item:
                raise ValueError(
                    f'{where} has no "{key}"; expected {{"prompt": ..., "response": ...}}'
                )
            if not isinstance(item[key], str):
                raise ValueError(
                    f'{where}: "{key}" is {type(item[key]).__name__}, expected a string'
                )
        pairs.append((number, item["prompt"], item["response"]))
    return pairs


def split_examples(pairs: list, held_out: float, seed: int) -> tuple[list, list]:
    """(training, held-out) pairs: the distinct (prompt, response) pairs are shuffled with
    ``seed`` and the last ``held_out`` fraction (at least one) is held out; duplicates
    follow their pair, so nothing held out is ever trained on."""
    _check_fraction(held_out)
    groups: dict[tuple[str, str], list] = {}
    for pair in pairs:
        groups.setdefault((pair[-2], pair[-1]), []).append(pair)
    if len(groups) < 2:
        raise ValueError(
            f"{len(groups)} distinct prompt/response pair(s); a held-out split needs at least 2"
        )
    keys = list(groups)
    order = [keys[i] for i in backend.Generator(seed).permutation(len(keys)).tolist()]
    n_held = min(max(1, round(len(keys) * held_out)), len(keys) - 1)
    train = [p for key in order[: len(keys) - n_held] for p in groups[key]]
    held = [p for key in order[len(keys) - n_held :] for p in groups[key]]
    return train, held


class PromptResponse:
    """Prompt/response examples padded to the longest of them, the loss on responses only.

    An example is ``prompt + response + [eot_id]`` (L tokens): ``x`` its first L - 1 tokens,
    ``y`` its last L - 1, with ``y`` set to ``IGNORE_INDEX`` where it is a prompt token.
    Both are padded to ``seq_len``, the longest example's L - 1 (``x`` with ``eot_id``, ``y``
    with ``IGNORE_INDEX``: a causal model's earlier positions never see the padding), not to
    ``block_size``: a GPT-2's 1024 would make every step on short pairs many times slower.
    An example longer than ``block_size + 1`` tokens is refused, naming its line, rather
    than cut short.
    """

    def __init__(self, pairs, tokenizer, block_size: int, eot_id: int, held_out=0.1, seed=0):
        self.block_size = block_size
        train, held = split_examples(pairs, held_out, seed)
        train = [self._example(tokenizer, eot_id, *p) for p in train]
        held = [self._example(tokenizer, eot_id, *p) for p in held]
        self.seq_len = max(len(x) for x, _ in train + held)
        self.train = [self._pad(x, y, eot_id) for x, y in train]
        self.held = [self._pad(x, y, eot_id) for x, y in held]

    def _example(self, tokenizer, eot_id: int, line, prompt: str, response: str):
        p, r = tokenizer.encode(prompt), tokenizer.encode(response) + [eot_id]
        if not p:
            raise ValueError(
                f"line {line}: the prompt is empty (the first response token is predicted "
                "from the prompt's last token)"
            )
        tokens = p + r
        if len(tokens) - 1 > self.block_size:
            raise ValueError(
                f"line {line}: prompt + response + end-of-text is {len(tokens)} tokens; the "
                f"model's block_size {self.block_size} takes at most {self.block_size + 1} "
                "(the inputs and the last target): shorten it"
            )
        x = tokens[:-1]
        y = [IGNORE_INDEX] * (len(p) - 1) + r  # y[i] = tokens[i + 1]; prompt targets ignored
        return x, y

    def _pad(self, x: list, y: list, eot_id: int):
        pad = self.seq_len - len(x)
        return x + [eot_id] * pad, y + [IGNORE_INDEX] * pad

    def batch(self, generator: backend.Generator, batch_size: int, device: str = "cpu"):
        """``batch_size`` random training examples: x, y int64 (batch_size, seq_len)."""
        rows = generator.integers(0, len(self.train), (batch_size,)).tolist()
        return _arrays(*zip(*(self.train[i] for i in rows), strict=True), device)

    def held_out(self, device: str = "cpu"):
        """Every held-out example: x, y int64 arrays (examples, seq_len)."""
        return _arrays(*zip(*self.held, strict=True), device)


DATA_KINDS = {".txt": "plain text", ".jsonl": "prompt/response pairs"}


def check_data_path(path) -> Path:
    """``path`` as a Path, if it names a file whose extension says what it holds."""
    path = Path(path)
    if path.suffix.lower() not in DATA_KINDS:
        kinds = ", ".join(f"{ext} ({kind})" for ext, kind in DATA_KINDS.items())
        raise ValueError(f"data {path} has extension {path.suffix or '(none)'!r}; expected {kinds}")
    files.check_regular_file(path, "data", "a .txt or .jsonl file")
    return path


def load_text_data(path, tokenizer, block_size: int, held_out: float = 0.1, seed: int = 0):
    """A :class:`TokenStream` for a ``.txt`` file, a :class:`PromptResponse` for ``.jsonl``;
    ``seed`` shuffles the examples before the split (JSONL)."""
    path = check_data_path(path)
    if path.suffix.lower() == ".txt":
        return TokenStream(tokenizer.encode(read_text(path)), block_size, held_out)
    eot_id = tokenizer.token_to_id(END_OF_TEXT)
    if eot_id is None:
        raise ValueError(
            f"the tokenizer has no {END_OF_TEXT} token, which ends each response of {path}"
        )
    pairs = read_pairs(path)
    try:
        return PromptResponse(pairs, tokenizer, block_size, eot_id, held_out, seed)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def held_out_loss(model, x, y, batch_size: int = 32) -> float:
    """The mean cross-entropy over every scored target of (x, y), in eval mode, without a
    graph: batches are weighted by their scored targets, so the result does not depend on
    ``batch_size``."""
    model.eval()
    total, count = 0.0, 0
    with no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            n = int((yb != IGNORE_INDEX).sum())
            if n:
                total += model(xb, yb)[1].item() * n
                count += n
    return total / count


def fine_tune_lora_on_text(
    model,
    data,
    config: LoRAConfig,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
    before_training: Callable | None = None,
) -> list[dict]:
    """LoRA fine-tuning of ``model`` in place on ``data`` (a :class:`TokenStream` or
    :class:`PromptResponse`): ``apply_lora`` with ``config``, AdamW on the adapter only,
    a cosine schedule with a short warm-up. Returns the history of :func:`train.train`.
    ``before_training(model)`` is called once the LoRA layers are in, before the first
    step (``minilora finetune`` checks there that the adapter it trains can be saved)."""
    manual_seed(seed)  # the adapter's initialisation
    apply_lora(model, config)
    if before_training is not None:
        before_training(model)
    history, _ = fine_tune(
        model, data, steps, lr, batch_size, seed=seed, progress=progress, desc=f"lora r={config.r}"
    )
    return history


def _arrays(x, y, device: str):
    return (
        backend.array(list(x), dtype=backend.int64, device=device),
        backend.array(list(y), dtype=backend.int64, device=device),
    )
