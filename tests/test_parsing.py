"""The answer-parsing rule, pinned by replies of the kind small instruct models actually write.

Each row is (reply, gold, expected parse). A row's expected parse is what a person applying the
rule in ``spellxfer.tasks.parsing`` by hand would write down; ``score`` must then call the reply
correct exactly when that parse equals the normalised gold answer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.parsing import (
    answer_kind,
    parse_answer,
    parse_integer,
    parse_letter,
    score,
    strip_thinking,
)

LETTER_ROWS = [
    # SmolLM2's house style: the echoed word is quoted too, but only single letters are candidates.
    ('The 3rd letter of the word "strawberry" is "S".', "r", "s"),
    ('The 3rd letter of the word "strawberry" is "r".', "r", "r"),
    ('The third letter of the word "strawberry" is "t".', "r", "t"),
    ("The third letter is r.", "r", "r"),
    ("The third letter is R", "r", "r"),
    ("It's r.", "r", "r"),
    ("The letter you're looking for is r.", "r", "r"),
    ("R.", "r", "r"),
    ("r", "r", "r"),
    ("  r  \n", "r", "r"),
    ("**r**", "r", "r"),
    ("*R*", "r", "r"),
    ("__r__", "r", "r"),
    ("_r_", "r", "r"),
    ("`r`", "r", "r"),
    ("The answer is: r", "r", "r"),
    ("Answer: R", "r", "r"),
    ("Answer:\n\nr", "r", "r"),
    ("The 3rd letter of 'strawberry' is \u2018r\u2019.", "r", "r"),
    ("The 3rd letter of \u201cstrawberry\u201d is \u201cr\u201d.", "r", "r"),
    ("The 3rd letter of **'strawberry'** is **'r'**.", "r", "r"),
    ('Sure! The 3rd letter of "strawberry" is:\n\n**R**', "r", "r"),
    ('The third letter is "r."', "r", "r"),
    ("The 3rd letter is r (the 18th letter of the alphabet).", "r", "r"),
    ("The letter 'S' is the first letter of 'strawberry'.", "s", "s"),
    ('The 3rd letter of "strawberry" is the letter R, which comes after T.', "r", "r"),
    ('The 1st letter of the word "ice" is I.', "i", "i"),
    ('The 2nd letter of the word "banana" is a.', "a", "a"),
    # Gold answers may be upper case in a hand-written file; comparison ignores case.
    ("The answer is r.", "R", "r"),
    # "is a vowel": the letter is followed by a word, so "a" is the article, not an answer.
    ("The 1st letter of 'apple' is a vowel.", "a", None),
    # "10th" is an ordinal; the letter after "is" is the answer.
    ("The 10th letter is y", "y", "y"),
    ("The 10th letter of the word 'strawberry' is 'y'.", "y", "y"),
    # Spelled-out words: hyphen and comma lists are not candidates, the stated answer is.
    ('The word "strawberry" is spelled S-T-R-A-W-B-E-R-R-Y. The 3rd letter is R.', "r", "r"),
    ("The spelling is: s, t, r, a, w, b, e, r, r, y. So the third letter is r.", "r", "r"),
    ("s-t-r-a-w-b-e-r-r-y", "r", None),
    ("The letters are: s, t, r, a, w, b, e, r, r, y.", "r", None),
    # ...but a quoted list is a list of candidates, and they disagree.
    ("Spelled out: 's', 't', 'r', 'a', 'w'. The third one is 'r'.", "r", None),
    # Two different answers: no answer, even though one of them is right.
    ("the 3rd letter is 'r', not 's'", "r", None),
    ("The 3rd letter is 'r' or 's'.", "r", None),
    ("The 3rd letter is 'r' and the 4th letter is 'a'.", "r", None),
    ("I think the answer is r, but it could be s.", "r", None),
    # A quoted letter is a candidate wherever it appears, so an aside naming another letter counts.
    ("The 3rd letter is 'r', which comes after 't'.", "r", None),
    # An unquoted contrast is not a candidate, so the stated answer stands.
    ("The 3rd letter is r, not s", "r", "r"),
    # No answer-bearing pattern at all.
    ("The 3rd letter is either r or s.", "r", None),
    ("What is the 3rd letter of the word 'strawberry'?", "r", None),
    ("strawberry", "s", None),
    ('"strawberry"', "s", None),
    ("", "r", None),
    # A reply that also mentions the word's length still has one letter answer.
    ('The 3rd letter of "strawberry" is "r". The word "strawberry" has 10 letters.', "r", "r"),
    # Chat markup: reasoning and anything after the end of turn are not the reply.
    ("<think>\n\n</think>\n\nThe third letter is r.", "r", "r"),
    ("<think>\nMaybe it is 's'? No: s-t-r.\n</think>\n\nThe 3rd letter is **r**.", "r", "r"),
    ("<think>\nLet me spell it: s, t, r", "r", None),
    ("The 3rd letter is r<|im_end|>", "r", "r"),
    ("The 3rd letter is r.<|im_end|>\n<|im_start|>user\nAnd the 4th? It is 'a'.", "r", "r"),
]

INTEGER_ROWS = [
    ("The word 'house' has 5 letters.", "5", "5"),
    ("The word 'cat' has 3 letters.", "3", "3"),
    ("There are 3 r's in strawberry.", "3", "3"),
    ("There are 3 R's in STRAWBERRY.", "3", "3"),
    ('The letter "r" appears 3 times in the word "strawberry".', "3", "3"),
    ("The letter 'e' appears 2 times in 'bee'.", "2", "2"),
    ("The letter 's' appears 1 time in 'house'.", "1", "1"),
    ("The answer is: 3", "3", "3"),
    ("The count is 3.", "3", "3"),
    ("3", "3", "3"),
    ("**5**", "5", "5"),
    ("Answer: 5<|im_end|>", "5", "5"),
    ("The answer is 03.", "3", "3"),
    ("The letter 'r' first appears at position 3.", "3", "3"),
    # An indexing convention is not a second answer, but a second index is.
    ("The letter 'r' first appears at position 3 (1-indexed).", "3", "3"),
    ("The letter 'r' is at index 2 (0-based), i.e. position 3.", "3", None),
    # Number words, including hyphenated compounds and "once"/"twice".
    ("three", "3", "3"),
    ("Three.", "3", "3"),
    ("Ten.", "10", "10"),
    ("Fifteen.", "15", "15"),
    ("twenty-one", "21", "21"),
    ("The word has twenty-one letters.", "21", "21"),
    ('The word "strawberry" has ten letters.', "10", "10"),
    ("'house' is a five-letter word.", "5", "5"),
    ("The word 'house' contains five letters: h, o, u, s, e.", "5", "5"),
    ('"strawberry" has 10 letters: s-t-r-a-w-b-e-r-r-y.', "10", "10"),
    ("The letter 'r' appears twice.", "3", "2"),
    ("The letter 'w' appears once in 'strawberry'.", "1", "1"),
    # A number and its word that agree are one answer.
    ("The letter 'r' appears in 'strawberry' three (3) times.", "3", "3"),
    ("It appears 3 times. So the answer is 3.", "3", "3"),
    # Zero expressions.
    ("There are no z's in 'house'.", "0", "0"),
    ('The letter "z" does not appear in the word "house".', "0", "0"),
    ("The letter 'z' doesn't appear in 'house', so the count is 0.", "0", "0"),
    ("The letter 'q' never appears in 'house'.", "0", "0"),
    ("No, the letter 'z' is not in 'house'.", "0", "0"),
    ("None.", "0", "0"),
    ("zero", "0", "0"),
    # "No" on its own is not a count.
    ("No.", "0", None),
    # Whole numbers only: "10" is ten, never one.
    ("10", "1", "10"),
    ("10", "10", "10"),
    ("1", "10", "1"),
    # Ordinals and decimals are not integer candidates.
    ("The 10th letter is y", "10", None),
    ("The letter 'r' first appears at the 3rd position in 'strawberry'.", "3", None),
    ("The letter 's' is the 1st letter.", "1", None),
    ("3.5", "3", None),
    # Two different numbers: no answer.
    ("2 or 3", "3", None),
    ("The word has 10 letters and r appears 3 times", "3", None),
    ("The letter 'r' appears 3 times, not 2.", "3", None),
    ("The letter 'r' appears 3 times (positions 3, 8 and 9).", "3", None),
    ("There are 4 letters in 'tree': t, r, e, e. The letter 'e' appears twice.", "2", None),
    ("Step 1: write the word. Step 2: count. There are 3 r's.", "3", None),
    ("The word 'house' has 5 letters.\n\n1. h\n2. o\n3. u\n4. s\n5. e", "5", None),
    # Nothing answer-bearing.
    ("How many times does the letter 'r' appear in 'strawberry'?", "3", None),
    ("", "3", None),
    ("<think>\nh-o-u-s-e: 5 letters, or 6?\n</think>\n\nThe word has 5 letters.", "5", "5"),
    ("<think>\nCounting: s, t, r (1), a, w, b, e, r (2)", "3", None),
]

ROWS = LETTER_ROWS + INTEGER_ROWS


def test_table_is_large_enough_to_be_a_specification():
    assert len(ROWS) >= 70


@pytest.mark.parametrize(("reply", "gold", "expected"), ROWS)
def test_reply_parses_to_expected_answer_and_is_scored_by_it(reply, gold, expected):
    assert parse_answer(reply, answer_kind(gold)) == expected

    parsed, correct = score(reply, gold)
    assert parsed == expected
    normalised_gold = gold.lower() if gold.isalpha() else str(int(gold))
    assert correct is (expected is not None and expected == normalised_gold)


@pytest.mark.parametrize(("reply", "gold", "expected"), LETTER_ROWS)
def test_parse_letter_agrees_with_parse_answer(reply, gold, expected):
    assert parse_letter(reply) == expected


@pytest.mark.parametrize(("reply", "gold", "expected"), INTEGER_ROWS)
def test_parse_integer_returns_an_int(reply, gold, expected):
    assert parse_integer(reply) == (None if expected is None else int(expected))


def test_same_reply_parses_differently_by_kind():
    reply = "The letter 'r' appears 3 times."
    assert parse_answer(reply, "letter") == "r"
    assert parse_answer(reply, "integer") == "3"


def test_parse_answer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'word'"):
        parse_answer("r", "word")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("<think>\n\n</think>\n\nThe third letter is r.", "The third letter is r."),
        ("<think>s, t, r</think>A<think>again</think>B", "AB"),
        ("<think>\nstill thinking when the token limit hit", ""),
        ("The answer is 3.<think>second thoughts", "The answer is 3."),
        # Opening tag was part of the prompt (DeepSeek-R1-style templates).
        ("reasoning about s-t-r\n</think>\n\nr", "r"),
        ("The answer is 3.<|im_end|>", "The answer is 3."),
        ("The answer is 3.<|endoftext|><|endoftext|>", "The answer is 3."),
        ("3<|eot_id|>", "3"),
        ("r<|im_end|>\n<|im_start|>user\nNext question: 's'?", "r"),
        ("  plain reply  ", "plain reply"),
        ("", ""),
    ],
)
def test_strip_thinking(raw, clean):
    assert strip_thinking(raw) == clean


@pytest.mark.parametrize(
    ("gold", "kind"),
    [
        ("r", "letter"),
        ("R", "letter"),
        ("z", "letter"),
        ("0", "integer"),
        ("10", "integer"),
        ("007", "integer"),
    ],
)
def test_answer_kind(gold, kind):
    assert answer_kind(gold) == kind


@pytest.mark.parametrize("gold", ["", "rr", "-1", "3.5", " 3", "r ", "\u00e9", "\u0663", "three", "3rd"])
def test_answer_kind_rejects_malformed_gold_and_names_it(gold):
    with pytest.raises(SpellxferError) as excinfo:
        answer_kind(gold)
    assert repr(gold) in str(excinfo.value)


def test_answer_kind_rejects_non_string_gold():
    with pytest.raises(SpellxferError, match="is a int"):
        answer_kind(3)  # type: ignore[arg-type]


def test_score_normalises_gold_and_reply():
    assert score("The 3rd letter is R.", "r") == ("r", True)
    assert score("The 3rd letter is r.", "R") == ("r", True)
    assert score("It appears 3 times.", "03") == ("3", True)
    assert score("It appears 3 times.", "4") == ("3", False)


def test_score_counts_no_answer_as_wrong():
    assert score("2 or 3", "3") == (None, False)
    assert score("", "r") == (None, False)


def test_degenerate_replies_are_scored_without_error():
    # Small models sometimes loop until max_new_tokens; int() refuses strings over 4300 digits.
    assert score("1" * 5000, "3") == ("1" * 5000, False)
    assert score("The answer is 3. " + "3" * 5000, "3") == (None, False)
    assert score("r, " * 20000, "r") == (None, False)


def test_score_propagates_malformed_gold():
    with pytest.raises(SpellxferError, match="'strawberry'"):
        score("s", "strawberry")


def _docs_examples() -> list[tuple[str, str, str | None]]:
    """Rows of the "### Examples" table in docs/evaluation.md as (reply, gold, parsed)."""
    text = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    section = text.split("### Examples", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        # Data rows start with a code span; the header and separator rows do not.
        if not line.startswith("| `"):
            continue
        # GitHub tables need "|" escaped even inside code spans; split on unescaped pipes only.
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        reply, gold, parsed = cells[0], cells[1], cells[2]
        reply = reply[1:-1].replace("\\n", "\n")
        parsed_value = None if parsed.startswith("none") else parsed.split("`")[1]
        rows.append((reply, gold.strip("`"), parsed_value))
    return rows


def test_docs_example_table_matches_the_parser():
    examples = _docs_examples()
    assert len(examples) >= 12
    for reply, gold, expected in examples:
        assert score(reply, gold)[0] == expected, reply
