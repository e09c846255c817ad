"""Answer parsing and exact-match scoring for position and count questions.

spellxfer trains on spelling and evaluates on position and count only. Every evaluation question
has a gold answer that is a string: one lowercase letter (``nth_letter``) or a non-negative decimal
integer (``letter_index``, ``word_length``, ``letter_count``). Models answer in free text, so a
reply has to be parsed before it can be compared with the gold answer.

The rule
--------
1. Clean the reply with :func:`strip_thinking`: cut it at the first chat end marker
   (``<|im_end|>``, ``<|endoftext|>``, …) and drop ``<think>…</think>`` reasoning.
2. Collect every *candidate answer* in what is left, using only the explicit answer-bearing
   patterns listed below for the gold answer's kind (letter or integer).
3. If all candidates agree after normalisation (letters lower-cased, integers as ``int``), that
   value is the parsed answer. If there are no candidates, or two *different* candidates, the reply
   has no answer: it parses to ``None`` and is scored wrong.

There is no "the gold label appears somewhere in the reply" leniency: a reply that hedges
("2 or 3") or names a second answer ("'r', not 's'") is wrong even if one of its values is right.
The point is that anyone re-scoring the raw outputs by hand with this rule gets our numbers.

Letter candidates
    * a single letter in quotes of any kind: ``'r'``, ``"r"``, ``“r”``, ``‘r’``, ```r```
      (a full stop or comma inside the quotes is allowed: ``"r."``);
    * a single letter in bold or italics: ``**r**``, ``*r*``, ``__r__``, ``_r_``;
    * ``is r`` / ``it's r`` / ``was r`` / ``be r`` / ``answer: r`` where the letter is followed directly by
      punctuation, by an opening parenthesis or dash, or by the end of a line, so "is a vowel"
      yields nothing but "is a." yields ``a``;
    * ``letter r`` where the letter stands alone ("the letter r appears", "3rd letter: r");
    * a reply that is just one letter with optional punctuation or markup (``R.``, `` r ``).

    Quoted multi-letter strings (the echoed word ``"strawberry"``) are not candidates, nor are
    letters in a spelled-out list (``s-t-r-a-w``, "is: s, t, r") unless each is quoted or bold.

Integer candidates
    * standalone decimal numbers: not part of an ordinal (``3rd``, ``10th``), not part of a
      decimal (``3.5`` yields nothing), not inside a word (``r2``), not an indexing convention
      (``1-indexed``, ``0-based``); ``10`` is never read as ``1``;
    * number words ``zero`` … ``twenty``, the tens ``thirty`` … ``ninety`` and compounds
      (``twenty-one``, ``twenty one``);
    * ``once`` = 1, ``twice`` = 2, ``thrice`` = 3;
    * zero expressions: ``no r's`` / ``no 'z'`` / ``no letters``, ``none``, ``does not appear``,
      ``doesn't occur``, ``does not contain``, ``never appears``, ``is not in``, ``isn't present``.

    Ordinals (``third``, ``3rd``) are never numbers, so "the 3rd position" yields nothing.

:class:`spellxfer.evaluation.metrics.TransferAccuracy` aggregates the per-item verdicts into
position and count accuracy.
"""

from __future__ import annotations

import re
from typing import Literal

from spellxfer.core.errors import SpellxferError

AnswerKind = Literal["letter", "integer"]

# --------------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------------

# Everything after an end-of-turn marker is not part of the reply: with skip_special_tokens=False a
# model that runs past its turn can invent a new "user" turn, and padding repeats <|endoftext|>.
END_MARKERS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "</s>"
)
THINK_TAGS = ("<think>", "</think>")
_END_MARKER = re.compile("|".join(map(re.escape, END_MARKERS)))
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_end_of_turn(text: str) -> str:
    """``text`` up to the first chat end marker (``<|im_end|>`` and the others :func:`strip_thinking`
    cuts at); the rest as generated."""
    marker = _END_MARKER.search(text)
    return text[: marker.start()] if marker else text


def strip_thinking(text: str) -> str:
    """Return the visible answer part of a raw generation.

    Cuts the text at the first chat end marker (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``,
    ``<|end_of_text|>``, ``<|end|>``, ``<end_of_turn>``, ``</s>``), removes every complete
    ``<think>…</think>`` block, drops everything up to a ``</think>`` whose opening tag was part of
    the prompt (templates such as DeepSeek-R1's end the prompt with ``<think>``), drops an
    unterminated ``<think>`` and everything after it (generation hit the token limit while
    reasoning, so there is no answer), and strips surrounding whitespace.
    """
    marker = _END_MARKER.search(text)
    if marker:
        text = text[: marker.start()]
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


# --------------------------------------------------------------------------------------------------
# Gold answers
# --------------------------------------------------------------------------------------------------

_GOLD_LETTER = re.compile(r"[A-Za-z]")
# [0-9], not \d: \d also matches other scripts' digits ("٣"), which int() would quietly accept.
_GOLD_INTEGER = re.compile(r"[0-9]+")


def answer_kind(gold: str) -> AnswerKind:
    """Classify a gold answer: one ASCII letter is ``"letter"``, a run of ASCII digits ``"integer"``.

    Raises:
        SpellxferError: for anything else (empty, several letters, signs, spaces, non-strings), so
            a malformed evaluation file fails before any generation is spent on it.
    """
    if not isinstance(gold, str):
        raise SpellxferError(
            f"gold answer {gold!r} is a {type(gold).__name__}; expected a string holding one letter "
            "(nth_letter) or a non-negative decimal integer (letter_index, word_length, letter_count)"
        )
    if _GOLD_LETTER.fullmatch(gold):
        return "letter"
    if _GOLD_INTEGER.fullmatch(gold):
        return "integer"
    raise SpellxferError(
        f"gold answer {gold!r} is neither a single ASCII letter (nth_letter) nor a non-negative "
        "decimal integer (letter_index, word_length, letter_count)"
    )


def _normalise_gold(gold: str, kind: AnswerKind) -> str:
    # "03" and "3" are the same integer; letters compare case-insensitively.
    return gold.lower() if kind == "letter" else gold.lstrip("0") or "0"


# --------------------------------------------------------------------------------------------------
# Letter candidates
# --------------------------------------------------------------------------------------------------

_OPEN_QUOTES = "'\"“‘`"
_CLOSE_QUOTES = "'\"”’`"
# The opening quote must not follow a letter or digit and the closing one must not be followed by
# one, so apostrophes in "r's", "don't 't'" or "'r's" never pair up into a fake quoted letter.
_QUOTED_LETTER = re.compile(
    rf"(?<![A-Za-z0-9])[{_OPEN_QUOTES}]([A-Za-z])[.,]?[{_CLOSE_QUOTES}](?![A-Za-z0-9])"
)
_MARKUP_LETTER = re.compile(r"(?<![A-Za-z0-9*_])(\*\*|\*|__|_)([A-Za-z])\1(?![A-Za-z0-9*_])")
# "is r." / "answer: r": the letter must end the sentence, clause or line, because "is a vowel" and
# "is I think" use a bare letter as an ordinary word. A comma only counts when no other lone letter
# follows it, so a spelled-out list "is: s, t, r" yields nothing. "was"/"be" are included so that a
# hedge ("is r, but it could be s.") yields two candidates instead of passing as "r".
_IS_LETTER = re.compile(
    r"\b(?:is|was|be|answer|it['’]s|that['’]s)(?:[ \t]*[:=]\s*|\s+)([A-Za-z])"
    r"(?=[.;:!?)\]*_]|,(?![ \t]*[A-Za-z](?![A-Za-z]))|[ \t]*[(\u2013\u2014]|[ \t]*$)",
    re.IGNORECASE | re.MULTILINE,
)
# After the noun "letter" a lone letter is the letter being named, whatever follows it; hyphens and
# apostrophes are excluded so "letter s-t-r" and "letter r's" yield nothing.
_LETTER_NOUN = re.compile(r"\bletter(?:[ \t]*:[ \t]*|[ \t]+)([A-Za-z])(?![A-Za-z0-9'’-])", re.IGNORECASE)
_BARE_LETTER = re.compile(r"[\W_]*([A-Za-z])[\W_]*")


def _letter_candidates(text: str) -> set[str]:
    found = {m.group(1) for m in _QUOTED_LETTER.finditer(text)}
    found |= {m.group(2) for m in _MARKUP_LETTER.finditer(text)}
    found |= {m.group(1) for m in _IS_LETTER.finditer(text)}
    found |= {m.group(1) for m in _LETTER_NOUN.finditer(text)}
    bare = _BARE_LETTER.fullmatch(text)
    if bare:
        found.add(bare.group(1))
    return {letter.lower() for letter in found}


def parse_letter(reply: str) -> str | None:
    """Parse a single-letter answer from a raw reply by the module's rule.

    Returns the lower-cased letter when every letter candidate agrees, else ``None``
    (no candidate, or two different ones).
    """
    found = _letter_candidates(strip_thinking(reply))
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------------------------------
# Integer candidates
# --------------------------------------------------------------------------------------------------

_UNITS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUE = {word: value for value, word in enumerate(_UNITS)}
_WORD_VALUE.update({word: 20 + 10 * i for i, word in enumerate(_TENS)})
_WORD_VALUE.update({"once": 1, "twice": 2, "thrice": 3})

# Not preceded by a word character or a decimal point, not followed by a word character (ordinal
# suffixes "3rd", units "3x") or by a decimal fraction ("3.5"). Hyphens are allowed ("a 5-letter
# word") except in an indexing convention: "position 3 (1-indexed)" states one answer, not two.
_NOT_CONVENTION = r"(?!-(?:indexed|based)\b)"
_DIGITS = re.compile(rf"(?<![\w.])([0-9]+)(?![\w]|\.[0-9]){_NOT_CONVENTION}")
_TENS_RE = "|".join(_TENS)
_UNITS_1_9 = "|".join(_UNITS[1:10])
# Compounds come first in the alternation so "twenty-one" is one candidate (21), not 20 and 1. A lone
# tens word must not start an ordinal compound: "twenty-first" is not 20.
_NUMBER_WORD = re.compile(
    rf"\b(?:(?P<tens>{_TENS_RE})[- ](?P<unit>{_UNITS_1_9})"
    rf"|(?P<word>(?:{_TENS_RE})(?!-(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth))"
    rf"|{'|'.join(_UNITS)}|once|twice|thrice))\b{_NOT_CONVENTION}",
    re.IGNORECASE,
)
_ZERO_PHRASE = re.compile(
    r"\bnone\b"
    # "no r's", "no 'z'", "no z", "no letters": "no" followed by a lone (possibly quoted, possibly
    # pluralised) letter or a counting noun; "No," and "no such" yield nothing.
    r"|\bno\s+(?:[" + _OPEN_QUOTES + r"]?[A-Za-z][" + _CLOSE_QUOTES + r"]?(?:['’]?s)?"
    r"|letters?|occurrences?|instances?|times|matches)(?![A-Za-z])"
    r"|\b(?:does|do|did)\s+not\s+(?:appear|occur|contain)"
    r"|\b(?:doesn['’]t|don['’]t|didn['’]t)\s+(?:appear|occur|contain)"
    r"|\bnever\s+(?:appears|occurs)"
    r"|\b(?:is|are)\s+not\s+(?:in|present)\b|\b(?:isn['’]t|aren['’]t)\s+(?:in|present)\b",
    re.IGNORECASE,
)


def _integer_candidates(text: str) -> set[str]:
    # Kept as canonical decimal strings rather than ints: a degenerate reply can hold a run of
    # thousands of digits, and int() refuses strings over 4300 digits (sys.get_int_max_str_digits).
    found = {m.group(1).lstrip("0") or "0" for m in _DIGITS.finditer(text)}
    for m in _NUMBER_WORD.finditer(text):
        if m.group("tens"):
            value = _WORD_VALUE[m.group("tens").lower()] + _WORD_VALUE[m.group("unit").lower()]
        else:
            value = _WORD_VALUE[m.group("word").lower()]
        found.add(str(value))
    if _ZERO_PHRASE.search(text):
        found.add("0")
    return found


def _parse_integer_text(reply: str) -> str | None:
    found = _integer_candidates(strip_thinking(reply))
    return found.pop() if len(found) == 1 else None


def parse_integer(reply: str) -> int | None:
    """Parse a non-negative integer answer from a raw reply by the module's rule.

    Returns the integer when every integer candidate agrees, else ``None``
    (no candidate, or two different ones). A lone number longer than Python's int conversion limit
    (4300 digits) raises ValueError here; :func:`parse_answer` and :func:`score` never convert and
    so handle such replies.
    """
    value = _parse_integer_text(reply)
    return None if value is None else int(value)


def parse_answer(reply: str, kind: AnswerKind) -> str | None:
    """Parse ``reply`` for an answer of ``kind`` and return it normalised as a string.

    Letters come back lower-cased (``"r"``), integers in plain decimal (``"3"``), matching how
    :func:`score` normalises gold answers. ``None`` means the reply has no answer.
    """
    if kind == "letter":
        return parse_letter(reply)
    if kind == "integer":
        return _parse_integer_text(reply)
    raise ValueError(f"answer kind must be 'letter' or 'integer', got {kind!r}")


def score(reply: str, gold: str) -> tuple[str | None, bool]:
    """Parse ``reply`` for the kind of answer ``gold`` is and compare exactly.

    Returns ``(parsed, correct)``; ``parsed`` is ``None`` when the reply has no answer, and then
    ``correct`` is False. Letters compare case-insensitively.

    Raises:
        SpellxferError: if ``gold`` is not a valid gold answer (see :func:`answer_kind`).
    """
    kind = answer_kind(gold)
    parsed = parse_answer(reply, kind)
    return parsed, parsed is not None and parsed == _normalise_gold(gold, kind)
