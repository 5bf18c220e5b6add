"""A small byte-level BPE tokenizer.json written by hand, for tests that need no library.

Its vocabulary: the 256 bytes, each as its GPT-2 character, with the byte's value as its id
(so "t" is 116 and "Ġ", the space, is 32); then five merges, best first, each making a new
token; then GPT-2's end-of-text token::

    rank 0  "Ġ" + "t"   -> "Ġt"    id 256
    rank 1  "h" + "e"   -> "he"    id 257
    rank 2  "Ġt" + "he" -> "Ġthe"  id 258
    rank 3  "l" + "o"   -> "lo"    id 259
    rank 4  "lo" + "w"  -> "low"   id 260
    rank 5  "t" + "h"   -> "th"    id 261
    added   "<|endoftext|>"        id 262 (special)
"""

from __future__ import annotations

import json

from minilora.text.bpe import BYTE_TO_CHAR

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "o"), ("lo", "w"), ("t", "h")]
END_OF_TEXT_ID = 262
VOCAB_SIZE = 263


def small_tokenizer(merges_as: str = "strings") -> dict:
    """The tokenizer.json object; ``merges_as`` "strings" ("a b", the older format) or
    "pairs" (["a", "b"], what tokenizers 0.20 and later write)."""
    vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
    for i, (a, b) in enumerate(MERGES):
        vocab[a + b] = 256 + i
    merges = [f"{a} {b}" if merges_as == "strings" else [a, b] for a, b in MERGES]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": END_OF_TEXT_ID,
                "content": "<|endoftext|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def write_small_tokenizer(path, merges_as: str = "strings", **changes):
    """Write the tokenizer (top-level keys replaced by ``changes``) to ``path``; returns it."""
    data = {**small_tokenizer(merges_as), **changes}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path
