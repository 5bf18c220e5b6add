"""Text as training data: next-token windows that never reach the held-out end of a text,
prompt/response examples whose loss is on the responses only, held-out pairs never trained
on (duplicates included), and bad JSONL lines named by file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_gpt, randomize_weights
from tokenizer_files import END_OF_TEXT_ID, VOCAB_SIZE, write_small_tokenizer

from minilora import backend
from minilora.data import IGNORE_INDEX
from minilora.text.bpe import BPETokenizer
from minilora.text.corpus import (
    PromptResponse,
    TokenStream,
    held_out_loss,
    load_text_data,
    read_pairs,
    split_examples,
)


class Letters:
    """A stand-in tokenizer: "a" -> 1, "b" -> 2, ..., so examples can be checked by eye."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") + 1 for c in text]


EOT = 0  # Letters' end-of-text id

# --------------------------------------------------------------------------------------
# Plain text: a stream split by position
# --------------------------------------------------------------------------------------


def test_training_windows_never_reach_the_held_out_end_of_the_stream():
    ids = list(range(200))  # each id is its position, so a window shows where it came from
    data = TokenStream(ids, block_size=8, held_out=0.1)
    assert data.split == 180 and data.seq_len == 8
    gen, seen_x, seen_y = backend.Generator(0), set(), set()
    for _ in range(200):
        x, y = data.batch(gen, 16)
        assert x.shape == y.shape == (16, 8)
        assert (y == x + 1).all()  # next-token targets
        seen_x |= set(x.ravel().tolist())
        seen_y |= set(y.ravel().tolist())
    assert seen_x | seen_y == set(range(180))  # the whole training part, and nothing more
    x, y = data.held_out()
    assert (y == x + 1).all()
    assert x.min() == 180  # the held-out windows start at the split, not before it
    # they tile the held-out part: each target scored once (the 3-token tail left out)
    assert y.ravel().tolist() == list(range(181, 197))


def test_windows_shrink_to_fit_a_short_text_and_a_text_too_short_is_refused():
    data = TokenStream(list(range(30)), block_size=64, held_out=0.2)
    assert (data.split, data.seq_len) == (24, 5)  # the held-out part has 6 tokens
    x, y = data.held_out()
    assert x.tolist() == [[24, 25, 26, 27, 28]] and y.tolist() == [[25, 26, 27, 28, 29]]
    assert TokenStream(list(range(10)), 4, held_out=0.7).split == 3  # 7 held out, not 8
    with pytest.raises(ValueError, match="the text is 3 tokens"):
        TokenStream([1, 2, 3], block_size=8, held_out=0.5)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="held_out"):
            TokenStream(list(range(100)), 8, bad)


# --------------------------------------------------------------------------------------
# Prompt/response pairs
# --------------------------------------------------------------------------------------


def test_an_example_is_prompt_response_end_with_the_prompt_targets_ignored():
    data = PromptResponse([(1, "ab", "cd"), (2, "x", "y")], Letters(), 6, EOT, 0.5, seed=0)
    examples = dict(zip(["train", "held"], [data.train, data.held], strict=True))
    rows = {tuple(x): y for part in examples.values() for x, y in part}
    # "ab" + "cd" + end = [1, 2, 3, 4, 0]: x its first 4, y its last 4 with the position
    # predicting the prompt's "b" ignored; the longest example, so 4 is the padded length
    # (not the block's 6)
    assert data.seq_len == 4
    assert rows[(1, 2, 3, 4)] == [IGNORE_INDEX, 3, 4, 0]
    # "x" + "y" + end = [24, 25, 0]: a one-token prompt ignores nothing; padded with the end
    assert rows[(24, 25, 0, 0)] == [25, 0, IGNORE_INDEX, IGNORE_INDEX]
    assert data.held_out()[0].shape == (1, 4)


def test_the_loss_is_the_mean_over_response_tokens_only():
    texts = [("abc", "de"), ("f", "ghij"), ("kl", "m"), ("nop", "q"), ("r", "st")]
    pairs = [(n, p, r) for n, (p, r) in enumerate(texts)]
    data = PromptResponse(pairs, Letters(), 8, EOT, held_out=0.6, seed=0)
    x, y = data.held_out()
    model = randomize_weights(make_gpt(vocab_size=30, block_size=8, n_embd=8), seed=0)
    logits, loss = model(x, y)
    logp = logits.data - np.log(np.exp(logits.data).sum(-1, keepdims=True))  # (B, T, V)
    # the response tokens and the end, from the pairs themselves (not from y): the token
    # at sequence position j is predicted at position j - 1
    terms = []
    for b, (_, prompt, response) in enumerate(split_examples(pairs, 0.6, 0)[1]):
        tokens = Letters().encode(prompt + response) + [EOT]
        for j in range(len(prompt), len(tokens)):
            terms.append(logp[b, j - 1, tokens[j]])
    assert len(terms) == (y != IGNORE_INDEX).sum()
    np.testing.assert_allclose(loss.item(), -np.mean(terms), rtol=1e-5)


def test_held_out_pairs_are_never_trained_on_even_as_duplicates():
    pairs = [(n, f"q{n % 7}", f"a{n % 7}") for n in range(40)]  # 7 distinct, each repeated
    pairs += [(40, "q0", "other")]  # same prompt, another response: a pair of its own
    for seed in range(5):
        train, held = split_examples(pairs, 0.3, seed)
        assert sorted(train + held) == sorted(pairs)  # every line on exactly one side
        trained = {(p, r) for _, p, r in train}
        assert trained.isdisjoint({(p, r) for _, p, r in held})
        assert len({(p, r) for _, p, r in held}) == 2  # round(8 * 0.3) distinct pairs
    assert split_examples(pairs, 0.3, 0) == split_examples(pairs, 0.3, 0)  # a seed repeats
    assert split_examples(pairs, 0.3, 0) != split_examples(pairs, 0.3, 1)
    with pytest.raises(ValueError, match="at least 2"):
        split_examples([(1, "a", "b"), (2, "a", "b")], 0.5, 0)


def test_an_example_longer_than_the_block_is_refused_naming_its_line():
    pairs = [(1, "ab", "c"), (7, "abcdef", "ghi")]
    with pytest.raises(ValueError, match=r"line 7: prompt \+ response \+ end-of-text is 10"):
        PromptResponse(pairs, Letters(), 8, EOT, 0.5)
    with pytest.raises(ValueError, match="line 3: the prompt is empty"):
        PromptResponse([(1, "ab", "c"), (3, "", "x")], Letters(), 8, EOT, 0.5)


BAD_LINES = {
    "not JSON": ('{"prompt": "a", "response": }', "is not JSON"),
    "not an object": ('["a", "b"]', "is list; expected an object"),
    "no response": ('{"prompt": "a"}', 'has no "response"'),
    "no prompt": ('{"response": "a"}', 'has no "prompt"'),
    "a number": ('{"prompt": "a", "response": 3}', '"response" is int, expected a string'),
    "null": ('{"prompt": null, "response": "b"}', '"prompt" is NoneType, expected a string'),
}


@pytest.mark.parametrize("line, fragment", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(ValueError) as info:
        read_pairs(path)
    assert f"{path} line 2" in str(info.value) and fragment in str(info.value)


def test_read_pairs_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '\n{"prompt": "p", "response": "r"}\r\n\n{"prompt": "é\u2028x", "response": ""}\n',
        encoding="utf-8",
        newline="",
    )
    assert read_pairs(path) == [(2, "p", "r"), (4, "é\u2028x", "")]  # (U+2028 is no line end)
    path.write_bytes(b'{"prompt": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_pairs(path)


# --------------------------------------------------------------------------------------
# Files, with the hand-written BPE tokenizer
# --------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer(tmp_path) -> BPETokenizer:
    return BPETokenizer.from_file(write_small_tokenizer(tmp_path / "tokenizer.json"))


def test_load_text_data_reads_either_kind_by_extension(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("the low " * 30)
    stream = load_text_data(tmp_path / "a.txt", tokenizer, block_size=8, held_out=0.25)
    assert isinstance(stream, TokenStream) and stream.seq_len == 8
    assert stream.train_ids[:4] == [116, 257, 32, 260]  # "the low" (tests/test_bpe.py)
    lines = [json.dumps({"prompt": f"the {n}", "response": "low"}) for n in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    pairs = load_text_data(tmp_path / "a.jsonl", tokenizer, block_size=8, held_out=0.4)
    assert isinstance(pairs, PromptResponse) and len(pairs.held) == 2
    x, y = pairs.held_out()
    # the response is encoded on its own: "low" is [260], then the end-of-text
    assert [row[row != IGNORE_INDEX].tolist() for row in y] == [[260, END_OF_TEXT_ID]] * 2


def test_load_text_data_refuses_other_extensions_missing_files_and_a_tokenizer_without_end(
    tmp_path, tokenizer
):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"extension '.csv'; expected .txt \(plain text\)"):
        load_text_data(tmp_path / "a.csv", tokenizer, 8)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_data(tmp_path / "none.txt", tokenizer, 8)
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    no_end = BPETokenizer(tokenizer.vocab, [], {})
    with pytest.raises(ValueError, match="no <|endoftext|> token"):
        load_text_data(tmp_path / "a.jsonl", no_end, 8)
    with pytest.raises(ValueError, match=f"{tmp_path / 'a.jsonl'}: 1 distinct"):
        load_text_data(tmp_path / "a.jsonl", tokenizer, 8)


def test_held_out_loss_weights_batches_by_their_scored_targets():
    pairs = [(n, "ab"[: 1 + n % 2], "cdefg"[: 1 + n % 5]) for n in range(12)]
    data = PromptResponse(pairs, Letters(), 8, EOT, held_out=0.5, seed=0)
    x, y = data.held_out()
    model = randomize_weights(make_gpt(vocab_size=VOCAB_SIZE, block_size=8, n_embd=8), seed=1)
    whole = model(x, y)[1].item()  # one batch: the mean over every scored target
    for batch_size in (1, 2, 3):
        assert held_out_loss(model, x, y, batch_size) == pytest.approx(whole, rel=1e-5)
