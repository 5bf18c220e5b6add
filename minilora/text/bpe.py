"""Byte-level BPE, GPT-2's tokenizer, written to be read: text -> token ids -> text.

GPT-2 (and every tokenizer trained with Hugging Face ``tokenizers``' ``ByteLevel``
pre-tokenizer) turns text into ids in four steps:

1. **Added tokens.** Special strings such as ``<|endoftext|>`` are cut out of the text first
   and become their own ids; the rest is encoded piece by piece.
2. **Pre-tokenisation.** A regular expression (:data:`GPT2_PATTERN`) splits each piece into
   "words": a letter run with its leading space, a digit run, a punctuation run, whitespace,
   and the English contractions ``'s 't 're 've 'm 'll 'd``. Merges never cross a word
   boundary, so " the" is one token whatever follows it.
3. **Bytes as characters.** Each word is encoded as UTF-8, and each byte is written as one
   printable character (:func:`bytes_to_unicode`: ``" "`` becomes ``"Ġ"``). Every string,
   any language, any emoji, is a sequence of these 256 characters, so nothing is ever
   unknown.
4. **Merges by rank.** A word starts as one symbol per byte. The merge list, learned when
   the tokenizer was trained, ranks pairs of symbols: repeatedly, the adjacent pair with the
   best (lowest) rank is merged everywhere in the word, until no adjacent pair has a rank.
   Each final symbol is a token in the vocabulary (:meth:`BPETokenizer.bpe`).

Decoding runs backwards: ids -> token strings -> bytes (each character back to its byte)
-> UTF-8 text. docs/text.md walks through an example.

:class:`BPETokenizer` reads a Hugging Face ``tokenizer.json`` of this kind and refuses,
naming the value, any setting it does not implement (another model type, a normalizer,
a pre-tokenizer other than ``ByteLevel``). :func:`load_tokenizer` returns it, or the same
interface over the ``tokenizers`` library (the ``text`` extra), which reads every kind of
tokenizer.json and gives the same ids on this kind (tests/test_bpe.py checks it on many
strings).
"""

from __future__ import annotations

import heapq
import json

import regex  # the `regex` package: Python's `re` has no \p{L} (letter) or \p{N} (number)

from minilora.interop import files

# GPT-2's pre-tokenizer, as in its encoder.py and in tokenizers' ByteLevel: contractions,
# letters, digits and other symbols, each with at most one leading space; then whitespace
# runs, leaving the last space of a run to the word that follows it (\s+(?!\S)).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"  # GPT-2's end-of-text token, which also separates documents


def bytes_to_unicode() -> dict[int, str]:
    """A printable character for each of the 256 byte values, as GPT-2 maps them.

    Bytes that are already printable and not a space (``!`` to ``~``, ``¡`` to ``¬``, ``®``
    to ``ÿ``: 188 of them) stand for themselves; the other 68 (control bytes, the space,
    ...) are given the characters from U+0100 upwards, in byte order. So the space 0x20,
    the 33rd such byte, becomes U+0120 ``"Ġ"`` and the newline 0x0A becomes ``"Ċ"``.
    Vocabulary files are written in these characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    for n, b in enumerate(others):
        mapping[b] = chr(256 + n)
    return dict(sorted(mapping.items()))


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class BPETokenizer:
    """GPT-2's byte-level BPE: ``encode(text) -> ids``, ``decode(ids) -> text``.

    ``vocab`` maps token strings (in :func:`bytes_to_unicode`'s characters) to ids;
    ``merges`` lists symbol pairs, best first (a pair's rank is its index); ``added_tokens``
    maps strings such as ``<|endoftext|>`` that are matched in the text before anything
    else to their ids, and ``special`` names those of them that
    ``decode(ids, skip_special_tokens=True)`` leaves out. ``add_prefix_space`` puts a space
    before text that does not start with one (so the first word is encoded as every other
    word is); ``ignore_merges`` takes a word that is a whole vocabulary entry as it is.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        added_tokens: dict[str, int] | None = None,
        special: frozenset[str] = frozenset(),
        *,
        add_prefix_space: bool = False,
        ignore_merges: bool = False,
    ):
        self.vocab = dict(vocab)
        self.added_tokens = dict(added_tokens or {})
        self.special = frozenset(special)
        self.add_prefix_space = add_prefix_space
        self.ignore_merges = ignore_merges
        problems = [
            f"vocab: {token!r} has id {i!r}, expected an integer >= 0"
            for token, i in self.vocab.items()
            if not isinstance(i, int) or isinstance(i, bool) or i < 0
        ]
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            missing = [t for t in (a, b, a + b) if t not in self.vocab]
            if missing:
                problems.append(f"merge {rank} ({a!r}, {b!r}) uses {missing[0]!r}, not in vocab")
            self.ranks.setdefault((a, b), rank)  # a repeated pair keeps its first (best) rank
        if "" in self.added_tokens:
            problems.append("an added token is the empty string")
        if problems:
            raise ValueError("; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({i: t for t, i in self.added_tokens.items()})
        self._bytes = {i: _token_bytes(t) for i, t in self.id_to_token.items()}  # for decode
        # Added tokens are found before pre-tokenisation: the longest one wins where two
        # start at the same place (an alternation tries its branches in order).
        longest_first = sorted(self.added_tokens, key=len, reverse=True)
        self._added_pattern = (
            regex.compile("|".join(regex.escape(t) for t in longest_first))
            if longest_first
            else None
        )
        self._words = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_file(cls, path) -> BPETokenizer:
        """Read a Hugging Face ``tokenizer.json`` (see :func:`read_tokenizer_json`)."""
        try:
            return cls(**read_tokenizer_json(path))
        except ValueError as e:
            if str(e).startswith("tokenizer"):  # read_tokenizer_json's: it names the file
                raise
            raise ValueError(f"tokenizer {path}: {e}") from None  # BPETokenizer's checks

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included (ids an embedding must hold)."""
        return max(self.id_to_token, default=-1) + 1

    def token_to_id(self, token: str) -> int | None:
        return self.added_tokens.get(token, self.vocab.get(token))

    # ---- encoding -------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: added tokens matched first, the pieces between them split
        into words, each word's bytes merged by rank."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        start = 0
        for match in self._added_pattern.finditer(text) if self._added_pattern else ():
            ids += self._encode_piece(text[start : match.start()])
            ids.append(self.added_tokens[match.group()])
            start = match.end()
        ids += self._encode_piece(text[start:])
        return ids

    def _encode_piece(self, text: str) -> list[int]:
        if not text:
            return []
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        ids = []
        for word in self._words.findall(text):
            if word not in self._cache:  # text repeats its words: merge each one once
                chars = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
                self._cache[word] = [self.vocab[s] for s in self.bpe(chars)]
            ids += self._cache[word]
        return ids

    def bpe(self, word: str) -> list[str]:
        """The merge loop: ``word`` (bytes as characters, e.g. ``"Ġlower"``) -> its tokens.

        Start with one symbol per byte; while some adjacent pair has a rank, merge the pair
        with the lowest rank (the leftmost of equal ones), as the tokenizers library does.

        Searching every pair for the best after each merge would take time proportional to
        the word's length squared (minutes for a 256,000-letter word); instead the pairs
        wait in a heap ordered by (rank, position), and the symbols form a linked list, so
        each merge costs a heap operation: ``n log n`` for ``n`` bytes. A merge changes
        its two neighbouring pairs, so heap entries go stale; an entry is acted on only if
        its pair is still there when it comes out of the heap."""
        if self.ignore_merges and word in self.vocab:
            return [word]
        symbols: list[str | None] = list(word)  # None: merged into the symbol on its left
        unknown = [s for s in symbols if s not in self.vocab]
        if unknown:
            byte = CHAR_TO_BYTE[unknown[0]]
            raise ValueError(
                f"the byte 0x{byte:02x} (character {unknown[0]!r}) is not in the vocabulary; "
                "a byte-level vocabulary holds all 256 bytes (train with "
                "initial_alphabet=ByteLevel.alphabet())"
            )
        n = len(symbols)
        before = list(range(-1, n - 1))  # the position of the symbol on the left (-1: none)
        after = [*range(1, n), -1]  # the position of the symbol on the right (-1: none)
        heap: list[tuple[int, int, str, str]] = []  # (rank, position, left, right)

        def push(i: int) -> None:
            """Queue the pair starting at position i, if it has a rank."""
            if i >= 0 and after[i] >= 0:
                pair = (symbols[i], symbols[after[i]])
                if pair in self.ranks:
                    heapq.heappush(heap, (self.ranks[pair], i, *pair))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = after[i]
            if symbols[i] != left or j < 0 or symbols[j] != right:
                continue  # stale: a merge since it was queued changed this pair
            symbols[i], symbols[j] = left + right, None  # merge j into i, unlink j
            after[i] = after[j]
            if after[j] >= 0:
                before[after[j]] = i
            push(before[i])  # the new pairs (left neighbour, merged), (merged, right one)
            push(i)
        return [s for s in symbols if s is not None]

    # ---- decoding -------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``: each token's characters back to bytes, the bytes read as UTF-8
        (a sequence cut inside a character shows U+FFFD there, as ``tokenizers`` does)."""
        pieces = []
        for i in ids:
            i = int(i)
            if i not in self._bytes:
                raise ValueError(
                    f"decode: id {i} is not in the tokenizer (ids 0..{self.vocab_size - 1})"
                )
            if not (skip_special_tokens and self.id_to_token[i] in self.special):
                pieces.append(self._bytes[i])
        return b"".join(pieces).decode("utf-8", errors="replace")


def _token_bytes(token: str) -> bytes:
    """The bytes a token stands for: each character back to its byte; a token written in
    plain text instead (an added token such as "<|end of text|>", with a space) as its
    UTF-8, as the tokenizers library decodes it."""
    if all(c in CHAR_TO_BYTE for c in token):
        return bytes(CHAR_TO_BYTE[c] for c in token)
    return token.encode("utf-8")


# --------------------------------------------------------------------------------------
# Reading tokenizer.json
# --------------------------------------------------------------------------------------


class UnsupportedTokenizer(ValueError):
    """A tokenizer.json that uses a setting :class:`BPETokenizer` does not implement."""


def read_tokenizer_json(path) -> dict:
    """The arguments of :class:`BPETokenizer` from a Hugging Face ``tokenizer.json``.

    Reads ``model`` (``type`` "BPE", ``vocab``, ``merges`` as "a b" strings or [a, b]
    pairs, ``ignore_merges``), ``added_tokens`` and ``pre_tokenizer.add_prefix_space``.
    Refuses, with the value named, what this module does not implement: another model
    type, a normalizer, a pre-tokenizer other than GPT-2's ByteLevel regex, a decoder other
    than ByteLevel, a post-processor that adds tokens, BPE dropout, subword prefixes or
    suffixes, byte fallback, and added tokens that strip spaces or match whole words only.
    """
    data = files.read_file(path, "tokenizer", "a tokenizer.json file", files.JSON_LIMIT)
    try:
        data = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"tokenizer {path} is not a valid JSON file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"tokenizer {path} has no 'model' object; expected a tokenizer.json")

    def refuse(where: str, value, expected: str):
        raise UnsupportedTokenizer(
            f"tokenizer {path}: {where} is {value!r}; minilora's BPE reads {expected} only "
            "(with the tokenizers library installed, load_tokenizer reads any tokenizer it does)"
        )

    model = data["model"]
    if model.get("type", "BPE") != "BPE":
        refuse("model.type", model.get("type"), "'BPE'")
    for key, allowed in (
        ("dropout", (None, 0, 0.0)),
        ("continuing_subword_prefix", (None, "")),
        ("end_of_word_suffix", (None, "")),
        ("byte_fallback", (None, False)),
    ):
        if model.get(key) not in allowed:
            refuse(f"model.{key}", model.get(key), f"{allowed[0]!r}")
    for part, types in (
        ("normalizer", (None,)),
        ("pre_tokenizer", ("ByteLevel",)),
        ("decoder", (None, "ByteLevel")),
        ("post_processor", (None, "ByteLevel")),
    ):
        value = data.get(part)
        kind = value.get("type") if isinstance(value, dict) else value
        if kind not in types:
            refuse(part, kind, " or ".join(repr(t) for t in types))
    pre = data["pre_tokenizer"]
    if pre.get("use_regex", True) is not True:
        refuse("pre_tokenizer.use_regex", pre.get("use_regex"), "True (GPT-2's regex)")

    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError(f"tokenizer {path}: model.vocab must be an object of token: id")
    if not isinstance(model.get("merges", []), list):
        raise ValueError(f"tokenizer {path}: model.merges must be a list of merges")
    merges = []
    for n, merge in enumerate(model.get("merges", [])):
        if isinstance(merge, str) and merge.count(" ") == 1:
            merges.append(tuple(merge.split(" ")))
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(s, str) for s in merge):
            merges.append(tuple(merge))
        else:
            raise ValueError(
                f"tokenizer {path}: model.merges[{n}] is {merge!r}; expected 'a b' or ['a', 'b']"
            )
    if not isinstance(data.get("added_tokens") or [], list):
        raise ValueError(f"tokenizer {path}: added_tokens must be a list")
    added, special = {}, set()
    for n, entry in enumerate(data.get("added_tokens") or []):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("content"), str)
            and isinstance(entry.get("id"), int)
        ):
            raise ValueError(
                f"tokenizer {path}: added_tokens[{n}] is {entry!r}; expected an object with "
                "'id' and 'content'"
            )
        for flag in ("single_word", "lstrip", "rstrip"):
            if entry.get(flag):
                refuse(f"added_tokens[{n}].{flag} ({entry['content']!r})", True, "False")
        added[entry["content"]] = entry["id"]
        if entry.get("special"):
            special.add(entry["content"])
    return dict(
        vocab=vocab,
        merges=merges,
        added_tokens=added,
        special=frozenset(special),
        add_prefix_space=bool(pre.get("add_prefix_space", False)),
        ignore_merges=bool(model.get("ignore_merges", False)),
    )


# --------------------------------------------------------------------------------------
# The fast path: the tokenizers library behind the same interface
# --------------------------------------------------------------------------------------


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` with :class:`BPETokenizer`'s interface (``encode``,
    ``decode``, ``vocab_size``, ``token_to_id``). It reads any tokenizer.json the library
    does; for the byte-level BPE files that :class:`BPETokenizer` reads, the ids agree."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        # no post-processor tokens (a BOS, a template): minilora adds its own end-of-text
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        unknown = [i for i in ids if self.tokenizer.id_to_token(i) is None]
        if unknown:  # the library would drop them silently
            raise ValueError(
                f"decode: id {unknown[0]} is not in the tokenizer (ids 0..{self.vocab_size - 1})"
            )
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path, fast: bool | None = None) -> BPETokenizer | FastTokenizer:
    """A tokenizer from a Hugging Face ``tokenizer.json``.

    ``fast=None`` (the default): minilora's :class:`BPETokenizer`; for a file that uses a
    setting it does not implement (:class:`UnsupportedTokenizer`: a WordPiece model, a
    normalizer, ...), the ``tokenizers`` library when it is installed, else that refusal.
    ``fast=False``: minilora's only. ``fast=True``: :class:`FastTokenizer` over the library
    (``pip install -e ".[text]"`` in a clone of minilora), an error without it.

    minilora's is the default because it is not the slower one here: it merges each
    distinct word once, and on a 1 MB text it encoded faster than the library did
    (docs/text.md gives the measurement).
    """
    if not fast:
        try:
            return BPETokenizer.from_file(path)
        except UnsupportedTokenizer:
            if fast is False or _library() is None:
                raise
    tokenizers = _library()
    if tokenizers is None:
        raise ValueError(
            "load_tokenizer(fast=True) needs the tokenizers library: pip install -e "
            '".[text]" in a clone of minilora (or use fast=False, minilora\'s own BPE)'
        )
    files.check_regular_file(path, "tokenizer", "a tokenizer.json file")
    try:
        return FastTokenizer(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as e:  # the library raises a bare Exception for every parse error
        raise ValueError(f"tokenizer {path} could not be read: {e}") from None


def _library():
    """The tokenizers module, or None when it is not installed."""
    try:
        import tokenizers
    except ImportError:
        return None
    return tokenizers
