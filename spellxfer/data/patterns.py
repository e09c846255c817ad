"""Training patterns: which rows of a build a fit trains on, chosen without rebuilding the data.

The study's pattern arms (docs/results.md, pre-registration) vary what the model is trained on
along four dimensions, each a ``fit --data.X`` option and a sweep space parameter:

``variants``
    which spelling variants train — ``spell`` (spell only), ``spell+reversed``,
    ``spell+numbered``, ``spell+inverse`` or ``all`` (the four; default). The capitals form
    ("Spell 'cat' in capital letters" → ``C A T``) is part of ``spell``: the build writes it as
    15% of the ``spell`` rows (subtask ``spell``), and the pre-registration counts four variants.
``separator``
    ``any`` (default) or one :data:`~spellxfer.tasks.templates.SEPARATORS` style (``spaces``,
    ``commas``, ``dashes``, ``dots``, ``arrows``): keep the rows whose letters are separated that
    way (a row's ``separator`` field; capitals rows are ``spaces``). Rows without a separator
    style (``spell_numbered``'s ``1: x, 2: y``) are kept whatever the choice, so the separator
    does not also decide which variants train. ``inverse`` questions never use ``arrows``.
``distinct_words``
    None (default: every word) or N: only the rows of N words, the first N of a seeded shuffle of
    the file's words (same seed → same words; a larger N keeps the smaller N's words) that still
    have rows after ``variants`` and ``separator``.
``train_set``
    ``spelling`` (default) or ``control``: the non-spelling control (``control_train.jsonl``),
    row for row the same words — the rows at the positions the three options above select, so a
    control is matched to any pattern in words and row count. Trained on spelling, evaluated on
    position and count only: the control is the one arm trained on neither, and no arm ever
    trains on a position or count question.

The defaults select every row in file order: the training data of a build, unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.names import TRAINING_SUBTASKS
from spellxfer.tasks.templates import SEPARATORS

VARIANTS: dict[str, tuple[str, ...]] = {
    "spell": ("spell",),
    "spell+reversed": ("spell", "spell_reversed"),
    "spell+numbered": ("spell", "spell_numbered"),
    "spell+inverse": ("spell", "inverse"),
    "all": TRAINING_SUBTASKS,
}
"""Preset → the training subtasks it keeps (``spell`` includes its capitals form)."""
SEPARATOR_CHOICES = ("any", *(name for name, _ in SEPARATORS))
TRAIN_SETS = ("spelling", "control")


def check_patterns(variants, separator, distinct_words, train_set) -> None:
    """Raise one :class:`SpellxferError` naming the option for a value outside its choices."""
    if variants not in VARIANTS:
        raise SpellxferError(f"--data.variants must be one of {', '.join(VARIANTS)}, got {variants!r}",
                             key="data.variants")
    if separator not in SEPARATOR_CHOICES:
        raise SpellxferError(f"--data.separator must be one of {', '.join(SEPARATOR_CHOICES)}, "
                             f"got {separator!r}", key="data.separator")
    if distinct_words is not None and (isinstance(distinct_words, bool) or not isinstance(distinct_words, int)
                                       or distinct_words < 1):
        raise SpellxferError("--data.distinct_words must be null (every word) or an integer ≥ 1, "
                             f"got {distinct_words!r}", key="data.distinct_words")
    if train_set not in TRAIN_SETS:
        raise SpellxferError(f"--data.train_set must be one of {', '.join(TRAIN_SETS)}, got {train_set!r}",
                             key="data.train_set")


def word_order(words: Sequence[str], seed: int) -> list[str]:
    """The file's distinct words in the seeded order ``distinct_words`` takes them from."""
    order = sorted(set(words))
    random.Random(f"spellxfer-distinct-words-{seed}").shuffle(order)
    return order


def select_rows(subtasks: Sequence[str], separators: Sequence[str | None], words: Sequence[str], *,
                variants: str = "all", separator: str = "any", distinct_words: int | None = None,
                seed: int = 0, where: str = "the training file") -> list[int]:
    """Indices of the spelling rows a pattern trains on, in file order (columns of the spelling file).

    Raises:
        SpellxferError: naming the option when the selection is empty, when ``distinct_words``
            asks for more words than it has, or when ``separator`` is set on a build whose rows
            do not record it (built before the field existed).
    """
    check_patterns(variants, separator, distinct_words, "spelling")
    keep_subtasks = set(VARIANTS[variants])
    if separator != "any" and not any(s is not None for s in separators):
        raise SpellxferError(f"--data.separator {separator}: the rows of {where} record no separator "
                             "(built before the field existed); rebuild it with `spellxfer data build`",
                             key="data.separator")
    rows = [i for i, (sub, sep) in enumerate(zip(subtasks, separators))
            if sub in keep_subtasks and (separator == "any" or sep is None or sep == separator)]
    if not rows:
        raise SpellxferError(f"--data.variants {variants} with --data.separator {separator} "
                             f"leaves no rows of {where}", key="data.variants")
    if distinct_words is not None:
        present = {words[i] for i in rows}
        if distinct_words > len(present):
            raise SpellxferError(f"--data.distinct_words {distinct_words}: the selection has only "
                                 f"{len(present)} distinct words in {where}", key="data.distinct_words")
        chosen = set([w for w in word_order(words, seed) if w in present][:distinct_words])
        rows = [i for i in rows if words[i] in chosen]
    return rows
