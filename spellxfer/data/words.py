"""Word sources: the English-only Qwen3 token subset (training), English and nonce words (evaluation).

The English-only token subset (docs/qwen3_guide.md states the rule): a Qwen3 vocabulary entry
belongs to it when, after removing the byte-level leading-space marker ``Ġ``, it is 2+ ASCII
letters, all lowercase or capitalised (``house``, ``House``; not ``HTTP`` or ``iPhone``), and its
lowercase form is among ``wordfreq``'s 100,000 most frequent English words.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache
from importlib.metadata import version

ENGLISH_LIST_SIZE = 100_000
EVAL_LIST_SIZE = 150_000
SPACE_MARKER = "Ġ"  # byte-level BPE's rendering of a leading space

# Share of evaluation words per length bucket: long words are over-sampled relative to English
# because they are where tokenisation hides letters and where transfer is most interesting.
LENGTH_SHARES = {"2-3": 0.10, "4-6": 0.24, "7-9": 0.24, "10-12": 0.20, "13-14": 0.11, "15+": 0.11}
NONCE_SHARE = 0.15  # ≥ 10% of evaluation rows are nonce words, whatever the rounding
MAX_EVAL_LEN = 20


@lru_cache(maxsize=4)
def _wordfreq_list(n: int) -> tuple[str, ...]:
    # lazy: only building the data reads the word lists; training, evaluation and benches load this
    # module through the data package on machines that carry built data but not wordfreq
    import wordfreq

    return tuple(wordfreq.top_n_list("en", n))


def english_words(n: int = ENGLISH_LIST_SIZE) -> frozenset[str]:
    return frozenset(_wordfreq_list(n))


def english_token_subset(tokenizer) -> dict:
    """The English-only entries of a Qwen3 vocabulary, as the JSON artifact ``data build`` writes.

    Returns ``{"rule", "source", "n_entries", "n_words", "counts_by_length", "entries"}`` where
    each entry is ``[token_id, token, word, leading_space]``.
    """
    vocab = english_words()
    n_ranks = 151_643  # ordinary BPE tokens; the 26 added tokens above them are never words
    entries = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n_ranks)))):
        space = tok.startswith(SPACE_MARKER)
        core = tok[1:] if space else tok
        if (
            len(core) >= 2
            and core.isascii()
            and core.isalpha()
            and (core.islower() or (core[0].isupper() and core[1:].islower()))
            and core.lower() in vocab
        ):
            entries.append([i, tok, core.lower(), space])
    words = sorted({e[2] for e in entries})
    return {
        "rule": (
            "token minus leading-space marker is >= 2 ASCII letters, lowercase or capitalised, and "
            f"its lowercase form is in wordfreq's top {ENGLISH_LIST_SIZE} English words"
        ),
        "source": {"wordfreq": version("wordfreq")},
        "n_entries": len(entries),
        "n_words": len(words),
        "counts_by_length": {str(k): v for k, v in sorted(Counter(len(w) for w in words).items())},
        "entries": entries,
    }


def eval_candidates() -> list[str]:
    """English words eligible for evaluation, in wordfreq's frequency order."""
    return [
        w
        for w in _wordfreq_list(EVAL_LIST_SIZE)
        if w.isascii() and w.isalpha() and w.islower() and 2 <= len(w) <= MAX_EVAL_LEN
        and re.search("[aeiouy]", w)
    ]


_ONSETS = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl pr sk sl sp st tr ch sh th".split()
_VOWELS = "a e i o u a e i o ai ea ou".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "rk", "ng"]


def nonce_word(rng: random.Random, length: int) -> str:
    """A pronounceable random letter string of exactly ``length`` letters (consonant-vowel syllables)."""
    out = ""
    while len(out) < length:
        out += rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
    return out[:length]


def letter_counts(word: str) -> Counter:
    return Counter(word.lower())
