"""Trivial baselines: what an answer rule that never reads the word's letters would score.

Every accuracy spellxfer reports stands beside these, computed on the very same items (gold
answers only; no model involved):

``majority``
    one answer for the whole group: its most common gold answer.
``best_constant``
    one answer per subtask (per answer type, letter or integer, where the subtask is unknown, as
    in a user's file): each one's most common gold answer. The best any constant can do, since
    it is chosen on the scored items themselves; at the level of one subtask it equals
    ``majority``, above it (a task, a file) it is the stronger of the two.
``first_letter`` (groups holding ``nth_letter`` items with a ``word``)
    ``nth_letter`` questions answered with the word's first letter; every other question with
    its ``best_constant`` answer.
``always_1`` (groups holding ``letter_index`` items)
    ``letter_index`` questions answered "1"; every other question with its ``best_constant``
    answer.

``best_trivial`` is the highest of them, and an accuracy *beats* it only when its whole 95%
interval lies above (``ci_low > best_trivial``): a model that always answers "1" scores exactly
``always_1`` and never beats it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping


def _group_key(row: Mapping) -> str:
    """The unit a constant answer is chosen for: the subtask, else the answer type."""
    if row.get("subtask"):
        return f"subtask:{row['subtask']}"
    return "type:" + ("letter" if str(row["answer"]).isalpha() else "integer")


def trivial_baselines(rows: Iterable[Mapping]) -> dict[str, float]:
    """Accuracy of each trivial rule on ``rows`` (one per item: ``answer`` (normalised: a lower-case
    letter or a canonical integer), ``subtask`` (or None), and ``word`` where known).

    Returns ``{"majority": …, "best_constant": …}`` plus ``first_letter`` / ``always_1`` where the
    group holds items they apply to; an empty dict for no rows.
    """
    rows = list(rows)
    if not rows:
        return {}
    n = len(rows)
    golds = [str(r["answer"]) for r in rows]
    by_group: dict[str, Counter] = defaultdict(Counter)
    for r, gold in zip(rows, golds):
        by_group[_group_key(r)][gold] += 1
    constant = {key: counts.most_common(1)[0][0] for key, counts in by_group.items()}
    constant_right = [gold == constant[_group_key(r)] for r, gold in zip(rows, golds)]

    out = {
        "majority": Counter(golds).most_common(1)[0][1] / n,
        "best_constant": sum(constant_right) / n,
    }
    nth = [i for i, r in enumerate(rows)
           if r.get("subtask") == "nth_letter" and isinstance(r.get("word"), str) and r["word"]]
    if nth:
        right = list(constant_right)
        for i in nth:
            right[i] = golds[i] == rows[i]["word"][0].lower()
        out["first_letter"] = sum(right) / n
    index = [i for i, r in enumerate(rows) if r.get("subtask") == "letter_index"]
    if index:
        right = list(constant_right)
        for i in index:
            right[i] = golds[i] == "1"
        out["always_1"] = sum(right) / n
    return out


def best_trivial(baselines: Mapping[str, float]) -> dict:
    """``{"name", "accuracy"}`` of the highest baseline (the first listed on a tie)."""
    name = max(baselines, key=lambda k: baselines[k])
    return {"name": name, "accuracy": baselines[name]}


def baseline_fields(rows: Iterable[Mapping]) -> dict:
    """``trivial_baselines`` and ``best_trivial`` for one group, as metrics.json holds them."""
    baselines = trivial_baselines(rows)
    return {"trivial_baselines": baselines, "best_trivial": best_trivial(baselines)} if baselines else {}


def beats(ci_low: float, best: Mapping) -> bool:
    """Whether an accuracy whose 95% interval starts at ``ci_low`` beats ``best`` (a ``best_trivial``)."""
    return bool(ci_low > best["accuracy"])
