"""Loading evaluation questions: our JSONL schema, users' JSONL/CSV/TSV, and every way a file can be bad.

Each bad-file case pins the one-line message the CLI will print, including the file and the line a
user has to open to fix it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import read_jsonl

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.parsing import score
from spellxfer.tasks.questions import Item, load_questions

# Rows exactly as `spellxfer data build` writes them (one per subtask).
OUR_ROWS = [
    {
        "id": "position_val-000000",
        "task": "position",
        "subtask": "nth_letter",
        "question": "In the word 'developing', which letter comes last? Reply with just the letter.",
        "answer": "g",
        "word": "developing",
        "word_kind": "english",
        "letter": None,
        "position": -1,
        "n_tokens": 2,
    },
    {
        "id": "position_val-000001",
        "task": "position",
        "subtask": "letter_index",
        "question": "At what position does the letter 'o' first appear in the word 'expression'?",
        "answer": "9",
        "word": "expression",
        "word_kind": "english",
        "letter": "o",
        "position": None,
        "n_tokens": 1,
    },
    {
        "id": "count_val-000000",
        "task": "count",
        "subtask": "word_length",
        "question": "How many letters are in the word 'blorf'?",
        "answer": "5",
        "word": "blorf",
        "word_kind": "nonce",
        "letter": None,
        "position": None,
        "n_tokens": 2,
    },
    {
        "id": "count_val-000001",
        "task": "count",
        "subtask": "letter_count",
        "question": "How many times does 'r' appear in 'strawberry'?",
        "answer": "3",
        "word": "strawberry",
        "word_kind": "english",
        "letter": "r",
        "position": None,
        "n_tokens": 3,
    },
]


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    # newline="" keeps the exact line endings the test wrote, so line numbers are what we count.
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return path


def error_at(path: Path, line: int | None, pattern: str):
    """pytest.raises for a SpellxferError whose message starts with ``path:line:`` and matches pattern."""
    where = str(path) if line is None else f"{path}:{line}"
    return pytest.raises(SpellxferError, match=rf"^{re.escape(where)}: .*{pattern}")


def one_line(excinfo) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message


# --------------------------------------------------------------------------------------------------
# Our own files
# --------------------------------------------------------------------------------------------------


def test_our_jsonl_keeps_ids_tasks_and_meta(tmp_path):
    path = write_jsonl(tmp_path / "mixed_val.jsonl", OUR_ROWS, blank_after=2)
    items = load_questions([path])

    assert [i.id for i in items] == [r["id"] for r in OUR_ROWS]
    # Line 3 is blank, so the last two rows sit on lines 4 and 5.
    assert [i.line for i in items] == [1, 2, 4, 5]
    assert [(i.task, i.subtask, i.answer, i.kind) for i in items] == [
        ("position", "nth_letter", "g", "letter"),
        ("position", "letter_index", "9", "integer"),
        ("count", "word_length", "5", "integer"),
        ("count", "letter_count", "3", "integer"),
    ]
    first = items[0]
    assert first.file == str(path)
    assert first.question == OUR_ROWS[0]["question"]
    assert first.meta == {
        "word": "developing",
        "word_kind": "english",
        "letter": None,
        "position": -1,
        "n_tokens": 2,
    }
    assert items[3].meta["letter"] == "r" and items[3].meta["n_tokens"] == 3


def test_every_file_data_build_writes_for_evaluation_loads(demo_data):
    for name in ("position_val.jsonl", "position_test.jsonl", "count_val.jsonl", "count_test.jsonl"):
        rows = read_jsonl(demo_data / name)
        items = load_questions([demo_data / name])
        assert len(items) == len(rows)
        for item, row in zip(items, rows):
            assert (item.id, item.task, item.subtask, item.question) == (
                row["id"], row["task"], row["subtask"], row["question"],
            )
            assert item.meta["word"] == row["word"] and item.meta["n_tokens"] == row["n_tokens"]
            # The loaded gold answer is one the scorer accepts and calls right when echoed.
            assert score(f"The answer is {item.answer}.", item.answer) == (item.answer, True)


def test_spelling_training_file_is_refused(demo_data):
    path = demo_data / "spelling_train.jsonl"
    with error_at(path, 1, r"task 'spelling' is not evaluated; evaluation is position and count only"):
        load_questions([path], task="position")


def test_paths_given_as_strings_are_reported_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "q.jsonl", OUR_ROWS[:1])
    assert load_questions(["q.jsonl"])[0].file == "q.jsonl"
    assert load_questions("q.jsonl")[0].id == OUR_ROWS[0]["id"]


# --------------------------------------------------------------------------------------------------
# Users' files
# --------------------------------------------------------------------------------------------------


def test_csv_with_other_column_names_and_task_argument(tmp_path):
    path = write_text(
        tmp_path / "mine.csv",
        "prompt,gold,source\n"
        '"How many r\'s are in ""strawberry""?",03,hand\n'
        "How many letters in 'cat'?, 3 ,hand\n",
    )
    items = load_questions([path], task="count", question_field="prompt", answer_field="gold")

    assert items == [
        Item(
            id="mine:2",
            file=str(path),
            line=2,
            task="count",
            subtask=None,
            question='How many r\'s are in "strawberry"?',
            answer="3",
            kind="integer",
            meta={"source": "hand"},
        ),
        Item(
            id="mine:3",
            file=str(path),
            line=3,
            task="count",
            subtask=None,
            question="How many letters in 'cat'?",
            answer="3",
            kind="integer",
            meta={"source": "hand"},
        ),
    ]


def test_a_row_task_wins_over_the_task_argument(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "answer": "4", "task": "count"}])
    assert load_questions([path], task="position")[0].task == "count"


def test_tsv_with_task_and_subtask_columns(tmp_path):
    path = write_text(
        tmp_path / "q.tsv",
        "id\ttask\tsubtask\tquestion\tanswer\tword\n"
        "a\tposition\tnth_letter\tWhat is the 2nd letter of 'cat', as in \"a, b\"?\tA\tcat\n"
        "b\tcount\t\tHow many letters in 'cat'?\t3\tcat\n",
    )
    items = load_questions([path])
    assert [(i.id, i.line, i.task, i.subtask, i.answer, i.kind) for i in items] == [
        ("a", 2, "position", "nth_letter", "a", "letter"),
        ("b", 3, "count", None, "3", "integer"),
    ]
    # Commas are ordinary characters in a TSV.
    assert items[0].question == "What is the 2nd letter of 'cat', as in \"a, b\"?"
    assert items[0].meta == {"word": "cat"}


def test_bom_prefixed_csv(tmp_path):
    path = write_text(
        tmp_path / "excel.csv", "question,answer\r\nFirst letter of 'dog'?,d\r\n", encoding="utf-8-sig"
    )
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    [item] = load_questions([path], task="position")
    assert (item.question, item.answer, item.line) == ("First letter of 'dog'?", "d", 2)


def test_csv_line_is_where_a_multiline_record_starts(tmp_path):
    path = write_text(
        tmp_path / "q.csv",
        "question,answer\n"
        "\"How many letters\nare in 'cat'?\",3\n"
        "\n"
        ",,\n"  # wrong width, but blank: skipped like an empty line
        "How many letters in 'a'?,1\n",
    )
    items = load_questions([path], task="count")
    assert [i.line for i in items] == [2, 6]
    assert [i.id for i in items] == ["q:2", "q:6"]


def test_numeric_json_answers_are_normalised(tmp_path):
    rows = [
        {"question": "How many letters in 'strawberry'?", "answer": 10},
        {"question": "How many z in 'cat'?", "answer": 0},
        {"question": "Where is 't' in 'cat'?", "answer": "003", "task": "position"},
        {"question": "Last letter of 'CAT'?", "answer": " T ", "task": "position"},
    ]
    items = load_questions([write_jsonl(tmp_path / "q.jsonl", rows)], task="count")
    assert [(i.answer, i.kind) for i in items] == [
        ("10", "integer"),
        ("0", "integer"),
        ("3", "integer"),
        ("t", "letter"),
    ]


def test_limit_applies_to_each_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": f"q{i}?", "answer": i} for i in range(5)])
    # Row 4 of b is bad, but a limit of 3 never reads it.
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"r{i}?", "answer": i} for i in range(3)] + ["oops"])
    items = load_questions([a, b], task="count", limit=3)
    assert [(Path(i.file).name, i.question) for i in items] == [
        ("a.jsonl", "q0?"), ("a.jsonl", "q1?"), ("a.jsonl", "q2?"),
        ("b.jsonl", "r0?"), ("b.jsonl", "r1?"), ("b.jsonl", "r2?"),
    ]
    # Without a limit that covers it, b is read to the end and its bad row is found.
    with error_at(b, 4, "expected a JSON object per line, got a string"):
        load_questions([a, b], task="count", limit=10)
    with pytest.raises(SpellxferError, match="limit must be a positive number of rows per file, got 0"):
        load_questions([a], task="count", limit=0)


def test_id_falls_back_to_stem_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.v2.jsonl",
        [
            {"question": "q?", "answer": 1},
            {"id": 7, "question": "r?", "answer": 2},
            {"question": "s?", "answer": 3},
        ],
        blank_after=1,
    )
    assert [i.id for i in load_questions([path], task="count")] == ["mine.v2:1", "7", "mine.v2:4"]


def test_duplicate_ids_in_a_file_are_refused_but_not_across_files(tmp_path):
    rows = [{"id": "x", "question": "q?", "answer": 1}, {"id": "y", "question": "r?", "answer": 2},
            {"id": "x", "question": "s?", "answer": 3}]
    bad = write_jsonl(tmp_path / "dup.jsonl", rows)
    with error_at(bad, 3, r"duplicate id 'x' \(first on line 1\)") as excinfo:
        load_questions([bad], task="count")
    one_line(excinfo)

    one = write_jsonl(tmp_path / "one.jsonl", rows[:1])
    two = write_jsonl(tmp_path / "two.jsonl", rows[:1])
    assert [i.id for i in load_questions([one, two], task="count")] == ["x", "x"]


# --------------------------------------------------------------------------------------------------
# Bad files: each error names the file and line, in one line
# --------------------------------------------------------------------------------------------------

GOOD = json.dumps({"question": "How many letters in 'cat'?", "answer": "3"})

# (file name, content as bytes, task argument, line in the message or None, message pattern)
BAD_FILES = [
    (
        "missing_task.jsonl",
        f"{GOOD}\n",
        None,
        1,
        r"row has no task; add a 'task' field or pass --task position\|count",
    ),
    ("missing_task.csv", "question,answer\nq?,3\n", None, 2, r"pass --task position\|count"),
    (
        "spelling.jsonl",
        GOOD[:-1] + ', "task": "spelling"}\n',
        "count",
        1,
        r"task 'spelling' is not evaluated; evaluation is position and count only",
    ),
    (
        "other_task.csv",
        "question,answer,task\nq?,3,count\nq?,3,arithmetic\n",
        None,
        3,
        r"task 'arithmetic' is not evaluated",
    ),
    ("empty.jsonl", "", "count", None, r"empty file \(no rows\)"),
    ("blank.jsonl", "\n  \n\n", "count", None, r"empty file \(no rows\)"),
    ("header_only.csv", "question,answer\n", "count", None, r"empty file \(no rows\)"),
    (
        "invalid.jsonl",
        f"{GOOD}\n\n{{'question': 'q?'}}\n",
        "count",
        3,
        r"invalid JSON \(Expecting property name",
    ),
    ("truncated.jsonl", f"{GOOD}\n{GOOD[:20]}\n", "count", 2, r"invalid JSON \("),
    ("list.jsonl", f"{GOOD}\n[1, 2]\n", "count", 2, r"expected a JSON object per line, got a list"),
    ("array.json", f"[{GOOD}]\n", "count", 1, r"expected a JSON object per line, got a list"),
    (
        "no_question_column.csv",
        "prompt,gold,note\nq?,3,x\n",
        "count",
        None,
        r"no column 'question' \(columns: prompt, gold, note\); use --question-field$",
    ),
    (
        "no_answer_column.tsv",
        "question\tgold\nq?\t3\n",
        "count",
        None,
        r"no column 'answer' \(columns: question, gold\); use --answer-field$",
    ),
    (
        "no_answer_field.jsonl",
        f'{GOOD}\n{{"question": "q?", "gold": 3}}\n',
        "count",
        2,
        r"no field 'answer' \(fields: question, gold\); use --answer-field$",
    ),
    (
        "no_question_field.jsonl",
        '{"prompt": "q?", "answer": 3}\n',
        "count",
        1,
        r"no field 'question' \(fields: prompt, answer\); use --question-field$",
    ),
    ("empty_question.csv", "question,answer\nq?,3\n  ,3\n", "count", 3, r"empty question \('question'\)"),
    (
        "number_question.jsonl",
        '{"question": 5, "answer": 3}\n',
        "count",
        1,
        r"question \('question'\) is a number, expected text$",
    ),
    ("null_question.jsonl", '{"question": null, "answer": 3}\n', "count", 1, r"empty question"),
    ("empty_answer.csv", "question,answer\nq?,3\nr?,\n", "count", 3, r"empty answer \('answer'\)"),
    ("null_answer.jsonl", f'{GOOD}\n{{"question": "q?", "answer": null}}\n', "count", 2, r"empty answer"),
    (
        "count_word.jsonl",
        '{"question": "q?", "answer": "three"}\n',
        "count",
        1,
        r"count answer 'three' is not a non-negative integer$",
    ),
    (
        "count_letter.csv",
        "question,answer,task\nq?,r,count\n",
        None,
        2,
        r"count answer 'r' is not a non-negative integer",
    ),
    (
        "count_negative.jsonl",
        '{"question": "q?", "answer": -1}\n',
        "count",
        1,
        r"count answer -1 is not a non-negative",
    ),
    (
        "count_float.jsonl",
        '{"question": "q?", "answer": 3.0}\n',
        "count",
        1,
        r"count answer 3\.0 is a decimal number, expected text or an integer$",
    ),
    (
        "position_word.jsonl",
        '{"question": "q?", "answer": "rr"}\n',
        "position",
        1,
        r"position answer 'rr' is neither a single letter nor a non-negative integer$",
    ),
    ("position_sign.csv", "question,answer\nq?,+3\n", "position", 2, r"position answer '\+3' is neither"),
    (
        "bad_ragged.csv",
        "question,answer\nHow many a, b in 'ab'?,2\n",
        "count",
        2,
        r"3 fields but the header has 2 columns \(quote fields that contain the delimiter\)",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "task", "line", "pattern"), BAD_FILES, ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_is_refused_with_file_and_line(tmp_path, name, content, task, line, pattern):
    path = write_text(tmp_path / name, content)
    with error_at(path, line, pattern) as excinfo:
        load_questions([path], task=task)
    one_line(excinfo)


def test_missing_file_and_unsupported_suffix(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [json.loads(GOOD)])
    missing = tmp_path / "nope.jsonl"
    # The good file before it is read first; the error still names the missing one.
    with error_at(missing, None, "no such file$"):
        load_questions([good, missing], task="count")
    folder = tmp_path / "d.jsonl"
    folder.mkdir()
    with error_at(folder, None, "is a directory, expected a question file$"):
        load_questions([folder], task="count")
    text = write_text(tmp_path / "q.txt", "question,answer\nq?,3\n")
    with error_at(text, None, r"cannot read file type '\.txt'; expected \.jsonl, \.json, \.csv, \.tsv"):
        load_questions([text], task="count")


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("question,answer\nq?,3\nWhere is 'é' in 'café'?,4\n".encode("latin-1"))
    with error_at(path, 3, r"not valid UTF-8 \(byte 0xe9\); save the file as UTF-8") as excinfo:
        load_questions([path], task="position")
    one_line(excinfo)


def test_messages_stay_on_one_line_when_the_file_has_newlines(tmp_path):
    # A quoted header cell with a newline in it must not split the CLI's error line.
    path = write_text(tmp_path / "q.csv", '"ques\ntion",answer\nq?,3\n')
    with error_at(
        tmp_path / "q.csv", None, r"no column 'question' \(columns: ques\\ntion, answer\)"
    ) as excinfo:
        load_questions([path], task="count")
    one_line(excinfo)


def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [json.loads(GOOD)])
    with pytest.raises(SpellxferError, match=r"--task must be one of position\|count, got 'spelling'"):
        load_questions([path], task="spelling")
    with pytest.raises(SpellxferError, match="no question files given"):
        load_questions([])
