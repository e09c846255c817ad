"""Answer diagnostics: what the replies of a run look like, beside whether they are right.

A model can move an accuracy by changing its answer *habits* (always "1", spelling the word out
instead of answering) rather than its knowledge; these make the habits visible per subtask:

``no_answer_rate``
    share of replies the parser finds no answer in (docs/evaluation.md#answer-parsing).
``top_answers``
    the five most common parsed answers with their share of *all* replies.
``constant_answer``
    true when one answer is more than half of the replies (:data:`CONSTANT_SHARE`).
``formats``
    replies per format class, decided in this order on the visible reply (end-of-turn and
    reasoning removed, :func:`~spellxfer.tasks.parsing.strip_thinking`):

    * ``bare``: only an answer — one letter or one number, with optional punctuation,
      quotes or markup (``R.``, ``**3**``);
    * ``letter_by_letter``: the word written out, three or more single letters in a row
      whatever the separators or numbering (``S-T-R-A-W``, ``s, t, r``, ``1. s 2. t 3. r``);
    * ``echoed``: the word itself (its letters, any case or quoting) or the question repeated;
    * ``sentence``: prose with at least two words (``The answer is 3.``);
    * ``other``: anything else, an empty reply included.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

from spellxfer.tasks.parsing import strip_thinking

FORMATS = ("bare", "sentence", "letter_by_letter", "echoed", "other")
"""Reply format classes (named so that no metrics.json key mentions spelling: none is reported)."""
CONSTANT_SHARE = 0.5
"""An answer given in more than this share of a group's replies makes it a constant-answer group."""
TOP_ANSWERS = 5

_BARE = re.compile(r"[\W_]*(?:[A-Za-z]|[0-9]+)[\W_]*")
_TOKENS = re.compile(r"[A-Za-z]+|[0-9]+")
_QUOTED_WORD = re.compile(r" '([A-Za-z]+)'")
_HINT = re.compile(r"\s*(?:Count from 1\.)?\s*Reply with just the (?:letter|number)\.\s*$")


def _letters(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def _normalised(text: str) -> str:
    return " ".join(_TOKENS.findall(text.lower()))


def reply_format(reply: str, word: str | None = None, question: str | None = None) -> str:
    """The format class of one raw reply (see the module docstring for the classes and their order).

    Args:
        reply: The raw generated text.
        word: The word the question asks about, if known (else taken from the question's quotes).
        question: The question asked, for recognising an echo.
    """
    visible = strip_thinking(reply)
    if not visible:
        return "other"
    if _BARE.fullmatch(visible):
        return "bare"
    tokens = _TOKENS.findall(visible)
    run = longest = 0
    for t in tokens:
        if t.isdigit():  # numbering of a spelled list ("1. s 2. t") does not break the run
            continue
        run = run + 1 if len(t) == 1 else 0
        longest = max(longest, run)
    if longest >= 3:
        return "letter_by_letter"
    if word is None and question:
        m = _QUOTED_WORD.findall(question)
        word = m[-1] if m else None
    if word and _letters(visible) == _letters(word):
        return "echoed"
    if question:
        asked = _normalised(_HINT.sub("", question))
        if asked and asked in _normalised(visible):
            return "echoed"
    words = [t for t in tokens if t.isalpha()]
    if len(words) >= 2 and any(len(w) > 1 for w in words):
        return "sentence"
    return "other"


def answer_diagnostics(rows: Iterable[Mapping]) -> dict:
    """Diagnostics of a group of prediction rows (``output``, ``parsed``, and ``word`` /
    ``question`` where known), one row per reply: every sample counts."""
    rows = list(rows)
    n = len(rows)
    if not n:
        return {}
    answers = Counter(r["parsed"] for r in rows if r.get("parsed") is not None)
    formats = Counter(reply_format(r["output"], r.get("word"), r.get("question")) for r in rows)
    top = [[answer, count / n] for answer, count in answers.most_common(TOP_ANSWERS)]
    return {
        "no_answer_rate": sum(r.get("parsed") is None for r in rows) / n,
        "top_answers": top,
        "constant_answer": bool(top and top[0][1] > CONSTANT_SHARE),
        "formats": {f: formats.get(f, 0) for f in FORMATS},
    }
