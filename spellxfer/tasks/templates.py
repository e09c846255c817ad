"""Question templates: spelling (training only), the non-spelling control (training only, the
study's control arm) and position / count (evaluation only).

Every word a *training* template contains is banned from evaluation (``training_template_words``),
so no evaluation word can reach training through template text. Evaluation questions always put
the word in single quotes after a space (`` 'strawberry'``): the quote is split off by Qwen's
pre-tokenizer, so the word is tokenized exactly as it is on its own, and ``n_tokens`` means the
same thing in every template.
"""

from __future__ import annotations

import random
import re

# ---- training: spelling only -------------------------------------------------------------------

# (name used in questions, separator placed between letters)
SEPARATORS: tuple[tuple[str, str], ...] = (
    ("spaces", " "),
    ("commas", ", "),
    ("dashes", "-"),
    ("dots", "."),
    ("arrows", " -> "),
)

SPELL = (
    "Spell the word '{word}' letter by letter, separated by {sep_name}.",
    "How do you spell '{word}'? Write each letter separated by {sep_name}.",
    "Break '{word}' into its letters, using {sep_name} between them.",
)
SPELL_CAPITALS = (
    "Spell '{word}' in capital letters, separated by spaces.",
    "Write out '{word}' letter by letter in uppercase, separated by spaces.",
)
SPELL_REVERSED = (
    "Spell '{word}' backwards, letter by letter, separated by {sep_name}.",
    "Write the letters of '{word}' in reverse order, separated by {sep_name}.",
)
SPELL_NUMBERED = (
    "Spell '{word}' and number each letter, in the form 1: x, 2: y.",
    "Write out '{word}' one letter at a time, numbering them in the form 1: x, 2: y.",
)
INVERSE = (
    "Which word is spelled {spelled}?",
    "Join these letters into one word: {spelled}",
    "What word do the letters {spelled} spell?",
)


# ---- training: the non-spelling control ---------------------------------------------------------
# The same words with no letter-level structure: the word repeated whole, or its case changed.
# Their words are banned from evaluation like the spelling templates'. Each is either a word the
# spelling templates already have or one outside every build's evaluation candidate pool
# (duplicate, thrice, capitals, lowercase): banning a word that was in the pool would shift the
# pool and change the evaluation (and hence training) words of every existing build.
CONTROL_REPEAT = (
    ("Duplicate the word '{word}'.", 2),
    ("Write the word '{word}' and its duplicate.", 2),
    ("Write the word '{word}' thrice.", 3),
)
"""(template, how many times the answer holds the word, separated by single spaces)."""
CONTROL_CASE = (
    ("Write the word '{word}' in uppercase.", "upper"),
    ("Write '{word}' in capitals.", "upper"),
    ("Write the word '{word}' in lowercase.", "lower"),  # asked with the word in capitals
)
"""(template, the case of the answer: the whole word at once, never letter by letter)."""


def training_template_words() -> frozenset[str]:
    """Every alphabetic word that training text contains besides the spelled words themselves
    (spelling and control templates, separator names)."""
    control = [t for t, _ in CONTROL_REPEAT + CONTROL_CASE]
    text = " ".join(SPELL + SPELL_CAPITALS + SPELL_REVERSED + SPELL_NUMBERED + INVERSE + tuple(control))
    text += " " + " ".join(name for name, _ in SEPARATORS)
    text = re.sub(r"\{[a-z_]+\}", " ", text)
    return frozenset(w.lower() for w in re.findall(r"[A-Za-z]+", text))


def spelling_row(rng: random.Random, word: str, subtask: str) -> tuple[str, str, str | None]:
    """(question, answer, separator name) for one spelling example of ``word``.

    The separator name is the :data:`SEPARATORS` style between the letters — of the answer, or
    of the question for ``inverse`` — and ``spaces`` for the capitals form of ``spell``; None for
    ``spell_numbered``, whose ``1: x, 2: y`` form has no separator style.
    """
    letters = list(word)
    if subtask == "spell":
        if rng.random() < 0.15:
            return rng.choice(SPELL_CAPITALS).format(word=word), " ".join(letters).upper(), "spaces"
        name, sep = rng.choice(SEPARATORS)
        return rng.choice(SPELL).format(word=word, sep_name=name), sep.join(letters), name
    if subtask == "spell_reversed":
        name, sep = rng.choice(SEPARATORS)
        return rng.choice(SPELL_REVERSED).format(word=word, sep_name=name), sep.join(reversed(letters)), name
    if subtask == "spell_numbered":
        answer = ", ".join(f"{i}: {c}" for i, c in enumerate(letters, 1))
        return rng.choice(SPELL_NUMBERED).format(word=word), answer, None
    if subtask == "inverse":
        name, sep = rng.choice(SEPARATORS[:4])  # arrows read oddly as a question
        return rng.choice(INVERSE).format(spelled=sep.join(letters)), word, name
    raise ValueError(f"unknown spelling subtask {subtask!r}")


def control_row(rng: random.Random, word: str, subtask: str) -> tuple[str, str]:
    """(question, answer) for one control example of ``word``: ``repeat`` (the word two or three
    times) or ``case`` (the word in capitals, or back to lowercase from capitals)."""
    if subtask == "repeat":
        template, times = rng.choice(CONTROL_REPEAT)
        return template.format(word=word), " ".join([word] * times)
    if subtask == "case":
        template, case = rng.choice(CONTROL_CASE)
        if case == "upper":
            return template.format(word=word), word.upper()
        return template.format(word=word.upper()), word
    raise ValueError(f"unknown control subtask {subtask!r}")


# ---- evaluation: position and count only ---------------------------------------------------------

LETTER_HINT = " Reply with just the letter."
NUMBER_HINT = " Reply with just the number."

NTH_LETTER = (
    "What is the {ordinal} letter of the word '{word}'?",
    "In the word '{word}', which letter comes {ordinal}?",
)
NTH_FROM_END = {-1: "last", -2: "second-to-last", -3: "third-to-last"}
LETTER_INDEX = (
    "At what position does the letter '{letter}' first appear in the word '{word}'? Count from 1.",
    "Counting from 1, where is the first '{letter}' in the word '{word}'?",
)
WORD_LENGTH = (
    "How many letters are in the word '{word}'?",
    "How many letters does the word '{word}' have?",
)
LETTER_COUNT = (
    "How many times does the letter '{letter}' appear in the word '{word}'?",
    "Count the letter '{letter}' in the word '{word}'. How many are there?",
)


def ordinal(n: int) -> str:
    """1 → '1st', 12 → '12th', -1 → 'last', -2 → 'second-to-last'."""
    if n < 0:
        return NTH_FROM_END[n]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def nth_letter_question(rng: random.Random, word: str, position: int) -> tuple[str, str]:
    q = rng.choice(NTH_LETTER).format(ordinal=ordinal(position), word=word) + LETTER_HINT
    return q, word[position - 1] if position > 0 else word[position]


def letter_index_question(rng: random.Random, word: str, letter: str) -> tuple[str, str]:
    q = rng.choice(LETTER_INDEX).format(letter=letter, word=word) + NUMBER_HINT
    return q, str(word.index(letter) + 1)


def word_length_question(rng: random.Random, word: str) -> tuple[str, str]:
    return rng.choice(WORD_LENGTH).format(word=word) + NUMBER_HINT, str(len(word))


def letter_count_question(rng: random.Random, word: str, letter: str) -> tuple[str, str]:
    q = rng.choice(LETTER_COUNT).format(letter=letter, word=word) + NUMBER_HINT
    return q, str(word.lower().count(letter.lower()))
