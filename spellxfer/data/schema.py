"""The one row schema of every ``data build`` file, as fixed ``datasets.Features``.

Every JSONL file of a build — ``spelling_train``, ``control_train`` (the non-spelling control),
``position_{val,test}``, ``count_{val,test}`` and ``fewshot_pool`` — holds rows of :data:`COLUMNS`,
so one ``datasets`` call loads them all as splits of one dataset. The Features are fixed rather
than inferred because JSON cannot type a null: ``position`` is null in every count row and
``letter`` in every training row, and
``datasets``' JSON loader types each column from the first file it reads (a column that is null
throughout that file becomes type ``null``, and the next file's integers "cannot be cast to
null"). The build writes these Features into its dataset card (``README.md``), so
``load_dataset(build_dir)`` applies them by itself; with ``data_files`` of your own, pass
``features=FEATURES``.

Training rows leave the evaluation-only columns (``word_kind``, ``letter``, ``position``,
``n_tokens``) out of the file, and evaluation rows leave out ``separator`` (training only);
loaded with these Features they are null.

Importing this module imports ``datasets`` (about a second): import it where a build or a fit
needs it, not at the top of a module every command loads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import datasets

COLUMNS: dict[str, tuple[str, str]] = {
    "id": ("string", "file stem + row number: `spelling_train-000000`, `count_test-000123`"),
    "task": ("string", "`spelling` (training only), `control` (the non-spelling control arm's training "
                       "only), `position` or `count` (evaluation only)"),
    "subtask": ("string", "`spell`, `spell_reversed`, `spell_numbered`, `inverse`; "
                          "control: `repeat`, `case`; "
                          "`nth_letter`, `letter_index`; `word_length`, `letter_count`"),
    "question": ("string", "the question as asked"),
    "answer": ("string", "the gold answer as text: a spelling, one lowercase letter or a decimal integer"),
    "word": ("string", "the word the question is about (lowercase)"),
    "word_kind": ("string", "`english` (in wordfreq's top 150,000) or `nonce`; null in training rows"),
    "letter": ("string", "the letter asked about (`letter_index`, `letter_count`); null otherwise"),
    "position": ("int64", "`nth_letter` only: 1-based from the start, negative from the end; null otherwise"),
    "n_tokens": ("int64", "Qwen3 tokens overlapping the word in the question as asked; "
                          "null in training rows"),
    "separator": ("string", "spelling rows: the separator style between the letters (`spaces`, `commas`, "
                            "`dashes`, `dots`, `arrows`); "
                            "null for `spell_numbered`, control and evaluation rows"),
}
"""Column → (``datasets`` dtype, meaning), in the order the files write them."""

FEATURES = datasets.Features({name: datasets.Value(dtype) for name, (dtype, _) in COLUMNS.items()})
"""The Features of every split of a build (see the module docstring)."""

CHAT_FEATURES = datasets.Features(
    {"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]}
)
"""The Features of ``spelling_train_chat.jsonl`` (``data build --chat_export true``)."""

_PYTHON_TYPES = {"string": str, "int64": int}


def row_problem(row: Mapping) -> str | None:
    """What keeps ``row`` (one parsed JSON line) out of :data:`FEATURES`, as a phrase for a
    ``file:line:`` message, or None when it fits: a key that is not a column, or a value that is
    not of its column's type (null always fits; a boolean is not an integer)."""
    for key, value in row.items():
        if key not in COLUMNS:
            return f"unknown field {key!r} (the data schema's fields: {', '.join(COLUMNS)})"
        dtype = COLUMNS[key][0]
        if value is not None and (isinstance(value, bool) or not isinstance(value, _PYTHON_TYPES[dtype])):
            kind = "text" if dtype == "string" else "an integer"
            return f"{key!r} must be {kind} or null, got {type(value).__name__} {value!r:.40}"
    return None


def load_split(path: str | Path) -> datasets.Dataset:
    """One file of a build as an in-memory ``datasets.Dataset`` with :data:`FEATURES`.

    Hand it a file whose every line has passed :func:`~spellxfer.core.outputs.iter_jsonl` and
    :func:`row_problem`: Arrow's JSON parser reports a bad row by neither file nor line, reads
    ``NaN`` or a 5,000-digit number into the text ``"nan"`` / ``"inf"``, and crashes on an object
    nested 20,000 deep. ``datasets`` writes Arrow files while it loads; they go to a temporary
    directory removed on return, never beside the data (a build directory may be read-only, and
    ``data check`` expects only the build's own files there).
    """
    with tempfile.TemporaryDirectory(prefix="spellxfer-datasets-") as cache, _quiet():
        return datasets.Dataset.from_json(str(path), features=FEATURES, keep_in_memory=True, cache_dir=cache)


@contextmanager
def _quiet() -> Iterator[None]:
    """No "Generating train split" bar in the middle of a fit's output; the setting is restored."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
