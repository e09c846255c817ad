"""Word-length and token-count buckets: how data build stratifies its samples and how evaluate
and analyze break accuracy down."""

from __future__ import annotations

LENGTH_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("2-3", 2, 3),
    ("4-6", 4, 6),
    ("7-9", 7, 9),
    ("10-12", 10, 12),
    ("13-14", 13, 14),
    ("15+", 15, 99),
)


def length_bucket(n: int) -> str:
    """The length bucket of an ``n``-letter word (``n`` ≥ 1). The last bucket is open-ended, and a
    one-letter word — never an evaluation word of ours, but possible in a user's question file —
    gets a bucket of its own, ``"1"``."""
    if n < 1:
        raise ValueError(f"no length bucket for {n} letters")
    for name, lo, hi in LENGTH_BUCKETS:
        if lo <= n <= hi:
            return name
    return LENGTH_BUCKETS[-1][0] if n > LENGTH_BUCKETS[-1][2] else str(n)


def token_bucket(n: int) -> str:
    """The token-count bucket of a word that tokenizes into ``n`` tokens: ``1``, ``2``, ``3`` or ``4+``."""
    return str(n) if n < 4 else "4+"
