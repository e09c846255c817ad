"""Read evaluation questions from files into :class:`Item` rows, failing early on bad data.

``spellxfer evaluate --questions FILE [FILE …]`` accepts two kinds of file:

* our own JSONL from ``spellxfer data build`` (``position_test.jsonl``, ``count_val.jsonl`` …),
  whose rows carry ``id``, ``task``, ``subtask``, ``question``, ``answer`` and metadata
  (``word``, ``letter``, ``position``, ``word_kind``, ``n_tokens``);
* a user's JSONL, CSV or TSV whose question and answer live under other names
  (``question_field``/``answer_field``) and which may have no ``task`` at all (``task``).

Formats, by suffix
    ``.jsonl`` / ``.json``: one JSON object per line, blank lines skipped. ``.csv``: comma
    separated with a header row; ``.tsv``: the same with tabs. Files are UTF-8, a leading byte
    order mark is allowed (spreadsheet exports write one).

Rows
    ``task`` comes from the row's ``task`` field or column, else from the ``task`` argument; it
    must be ``position`` or ``count`` (spellxfer trains on spelling and evaluates transfer only).
    ``subtask`` comes from a ``subtask`` field if there is one. ``id`` comes from an ``id`` field,
    else ``"{stem}:{line}"``; ids must be unique within a file. Every other field is kept in
    :attr:`Item.meta` as read. Answers are normalised the way the scorer compares them: a letter is
    lower-cased, an integer written in canonical decimal (``"03"`` → ``"3"``; a JSON number ``3``
    → ``"3"``). A count answer must be a non-negative integer; a position answer is a letter
    (``nth_letter``) or a non-negative integer (``letter_index``).

Limits
    A question holds at most :data:`MAX_QUESTION_CHARS` characters (4,000; ours are ~100): the
    cost of generation grows with the prompt, and an 8 MB question would otherwise run for
    minutes at gigabytes of memory before anything is reported. Two files given to one run must
    have different names, since runs are compared item by item on (file name, id).

Every problem a user can cause is a :class:`~spellxfer.core.errors.SpellxferError` with a one-line
message that starts ``file:line:`` (or ``file:`` for whole-file problems such as a missing column),
so it is caught before any generation is spent.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import parse_json
from spellxfer.tasks.names import TASKS
from spellxfer.tasks.parsing import AnswerKind, answer_kind

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
# Fields that become Item attributes rather than meta (besides the question and answer fields).
_RESERVED = ("id", "task", "subtask")
MAX_QUESTION_CHARS = 4000
"""Longest question accepted, in characters (about 1,000 Qwen3 tokens); see docs/evaluation.md."""
# Metadata fields the evaluation breaks accuracy down by (evaluate.BREAKDOWNS): checked when the
# file is read, so a bad value fails before the model runs rather than after.
_TEXT_META = ("word", "word_kind", "letter")
_INTEGER_META = ("position", "n_tokens")


@dataclass(frozen=True)
class Item:
    """One evaluation question with its normalised gold answer and where it came from."""

    id: str
    """The row's ``id`` field, else ``"{file stem}:{line}"``; unique within its file."""
    file: str
    """The file name as it was given to :func:`load_questions`."""
    line: int
    """1-based line of the row in ``file``; for CSV/TSV the line the record starts on (header = 1)."""
    task: str
    """``"position"`` or ``"count"``."""
    subtask: str | None
    """``nth_letter``, ``letter_index``, ``word_length``, ``letter_count``, a user's own name, or None."""
    question: str
    """The question text exactly as read (sent to the model)."""
    answer: str
    """Gold answer: one lower-case letter or a canonical non-negative decimal integer (``"3"``)."""
    kind: AnswerKind
    """``"letter"`` or ``"integer"``: which parser :func:`spellxfer.tasks.parsing.parse_answer` uses."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Every other field of the row as read (``word``, ``letter``, ``position``, ``word_kind``, …)."""


def load_questions(
    paths: Sequence[str | Path],
    task: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[Item]:
    """Load and validate evaluation questions from JSONL/JSON-lines, CSV or TSV files.

    Args:
        paths: question files, read in order; items keep that order and the order within each file.
        task: ``"position"`` or ``"count"`` for rows that have no ``task`` of their own (a user's
            file); a row's own ``task`` always wins.
        question_field: name of the question field or column.
        answer_field: name of the gold-answer field or column.
        limit: read at most this many rows from *each* file (the first ones; rows after them are
            not read or validated), e.g. for a quick smoke run over several files.

    Returns:
        The items of all files, in file order.

    Raises:
        SpellxferError: for a missing, unreadable, empty, non-UTF-8 or malformed file, a missing
            question/answer column, a row without a question, answer or task, a task other than
            position or count, an answer that does not fit its task, or a duplicate id in a file.
            The message is one line naming the file and line (or column).
    """
    if isinstance(paths, (str, Path)):
        # A lone string would otherwise be iterated character by character.
        paths = [paths]
    if not paths:
        raise SpellxferError("no question files given; pass --questions FILE [FILE ...]")
    if task is not None and task not in TASKS:
        raise SpellxferError(f"--task must be one of {'|'.join(TASKS)}, got {task!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SpellxferError(f"limit must be a positive number of rows per file, got {limit!r}")

    seen: dict[str, str] = {}
    for path in map(str, paths):
        # Items are keyed by (file name, id) in metrics.json and in paired comparisons: the same
        # name twice would merge two files' items (or count one file's items twice).
        name = Path(path).name
        if name in seen:
            if Path(seen[name]).resolve() == Path(path).resolve():
                same = "is given twice"
            else:
                same = f"has the same name as {seen[name]}"
            raise _error(path, None, f"{same}; runs match items by file name and id, so each question "
                                     "file needs its own name")
        seen[name] = path
    items: list[Item] = []
    for path in paths:
        items.extend(_load_file(str(path), task, question_field, answer_field, limit))
    return items


def _load_file(
    name: str, default_task: str | None, question_field: str, answer_field: str, limit: int | None
) -> list[Item]:
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        found = f"file type {suffix!r}" if suffix else "a file without a suffix"
        raise _error(name, None, f"cannot read {found}; expected {', '.join(SUFFIXES)}")
    text = _read_text(name, path)
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(name, text, question_field, answer_field)
    else:
        rows = _csv_rows(name, text, "\t" if suffix == ".tsv" else ",", question_field, answer_field)

    items: list[Item] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        item = _make_item(name, path.stem, line, row, default_task, question_field, answer_field)
        if item.id in first_line:
            raise _error(name, line, f"duplicate id {item.id!r} (first on line {first_line[item.id]})")
        first_line[item.id] = line
        items.append(item)
        # Stop here, not at the top of the loop: asking the row generator for one more row would
        # parse (and possibly reject) a row past the limit.
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise _error(name, None, "empty file (no rows)")
    return items


def _read_text(name: str, path: Path) -> str:
    if path.exists() and not path.is_file() and not path.is_dir():
        # a FIFO or a device (a link to /dev/zero, say) would be read forever
        raise _error(name, None, "is not a regular file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _error(name, None, "no such file") from None
    except IsADirectoryError:
        raise _error(name, None, "is a directory, expected a question file") from None
    except OSError as e:
        raise _error(name, None, f"cannot read ({e.strerror})") from None
    try:
        # utf-8-sig drops a leading byte order mark, which would otherwise glue itself to the
        # first CSV column name ("\ufeffquestion") or make the first JSON line invalid.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Decoding the whole file at once gives a byte offset; count newlines to turn it into a line.
        line = data.count(b"\n", 0, e.start) + 1
        raise _error(
            name, line, f"not valid UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8"
        ) from None


def _jsonl_rows(name: str, text: str, question_field: str, answer_field: str) -> Iterator[tuple[int, dict]]:
    # split("\n"), not splitlines(): splitlines() also breaks at U+2028 and U+0085, which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings, and would shift line numbers.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        row = parse_json(raw, f"{name}:{line}")
        if not isinstance(row, dict):
            raise _error(name, line, f"expected a JSON object per line, got {_json_type(row)}")
        for field_name, flag in ((question_field, "--question-field"), (answer_field, "--answer-field")):
            if field_name not in row:
                raise _error(name, line, f"no field {field_name!r} (fields: {', '.join(row)}); use {flag}")
        yield line, row


def _csv_rows(
    name: str, text: str, delimiter: str, question_field: str, answer_field: str
) -> Iterator[tuple[int, dict]]:
    # csv.reader rather than DictReader: DictReader skips blank lines internally, so the line a
    # record starts on could no longer be recovered from line_num.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise _error(name, start, f"invalid CSV ({e})") from None
        # Spreadsheets export trailing empty rows as ",,,"; they hold no question, like blank lines.
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = cells
            for column, flag in ((question_field, "--question-field"), (answer_field, "--answer-field")):
                if column not in header:
                    raise _error(
                        name, None, f"no column {column!r} (columns: {', '.join(header)}); use {flag}"
                    )
            continue
        if len(cells) != len(header):
            # Usually an unquoted delimiter inside a question, which would shift every later column.
            raise _error(
                name,
                start,
                f"{len(cells)} fields but the header has {len(header)} columns "
                "(quote fields that contain the delimiter)",
            )
        yield start, dict(zip(header, cells))


def _make_item(
    name: str,
    stem: str,
    line: int,
    row: dict[str, Any],
    default_task: str | None,
    question_field: str,
    answer_field: str,
) -> Item:
    question = row.get(question_field)
    if question is None or (isinstance(question, str) and not question.strip()):
        raise _error(name, line, f"empty question ({question_field!r})")
    if not isinstance(question, str):
        raise _error(name, line, f"question ({question_field!r}) is {_json_type(question)}, expected text")
    if len(question) > MAX_QUESTION_CHARS:
        raise _error(name, line, f"question ({question_field!r}) is {len(question):,} characters long; "
                                 f"the limit is {MAX_QUESTION_CHARS:,} (docs/evaluation.md)")

    task = _task(name, line, row.get("task"), default_task)
    answer, kind = _answer(name, line, row.get(answer_field), answer_field, task)

    raw_id = row.get("id")
    if raw_id is None or raw_id == "":
        item_id = f"{stem}:{line}"
    elif isinstance(raw_id, str) or (isinstance(raw_id, int) and not isinstance(raw_id, bool)):
        item_id = str(raw_id)
    else:
        raise _error(name, line, f"id is {_json_type(raw_id)}, expected a string or integer")

    subtask = row.get("subtask")
    if subtask is not None and not isinstance(subtask, str):
        raise _error(name, line, f"subtask is {_json_type(subtask)}, expected text")
    if subtask is not None:
        # An empty CSV cell means "no subtask", like a missing column.
        subtask = subtask.strip() or None

    check_breakdown_fields(name, line, row)

    skip = {question_field, answer_field, *_RESERVED}
    return Item(
        id=item_id,
        file=name,
        line=line,
        task=task,
        subtask=subtask,
        question=question,
        answer=answer,
        kind=kind,
        meta={key: value for key, value in row.items() if key not in skip},
    )


def _task(name: str, line: int, raw: Any, default_task: str | None) -> str:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if default_task is None:
            raise _error(name, line, f"row has no task; add a 'task' field or pass --task {'|'.join(TASKS)}")
        return default_task
    if not isinstance(raw, str):
        raise _error(name, line, f"task is {_json_type(raw)}, expected {' or '.join(TASKS)}")
    task = raw.strip().lower()
    if task not in TASKS:
        raise _error(name, line, f"task {raw!r} is not evaluated; evaluation is {' and '.join(TASKS)} only")
    return task


def _answer(name: str, line: int, raw: Any, answer_field: str, task: str) -> tuple[str, AnswerKind]:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise _error(name, line, f"empty answer ({answer_field!r})")
    # JSON writers often store counts as numbers; bool is an int subclass but never an answer.
    if isinstance(raw, int) and not isinstance(raw, bool):
        text = str(raw)
    elif isinstance(raw, str):
        text = raw.strip()
    else:
        raise _error(name, line, f"{task} answer {raw!r} is {_json_type(raw)}, expected text or an integer")

    # answer_kind is the scorer's own definition of a valid gold answer, so every item loaded here
    # is one that spellxfer.tasks.parsing.score accepts.
    try:
        kind = answer_kind(text)
    except SpellxferError:
        kind = None
    if task == "count" and kind != "integer":
        raise _error(name, line, f"count answer {raw!r} is not a non-negative integer")
    if kind is None:
        raise _error(
            name, line, f"position answer {raw!r} is neither a single letter nor a non-negative integer"
        )
    # The same normalisation the scorer applies to gold answers: "R" → "r", "03" → "3".
    return (text.lower() if kind == "letter" else text.lstrip("0") or "0"), kind


def check_breakdown_fields(name: str, line: int, row: dict[str, Any]) -> None:
    """Raise unless the fields accuracy is broken down by have usable values (a question row, or
    a predictions row that copied them): ``word``, ``word_kind``, ``letter``: text; ``position``
    (1-based, negative from the end) and ``n_tokens``: integers, or integer text in a CSV cell.
    Null or an empty cell means absent."""
    for key in _TEXT_META:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise _error(name, line, f"{key} is {_json_type(value)}, expected text")
    for key in _INTEGER_META:
        value = row.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(name, line, f"{key} {value!r} is not an integer")
        if key == "n_tokens" and value < 0:
            raise _error(name, line, f"n_tokens {value} is negative")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a decimal number",
    }
    return names.get(type(value), type(value).__name__)


def _error(name: str, line: int | None, message: str) -> SpellxferError:
    where = name if line is None else f"{name}:{line}"
    # The CLI promises one line per error; names and values from the file must not break that.
    text = f"{where}: {message}".replace("\r", "\\r").replace("\n", "\\n")
    return SpellxferError(text)
