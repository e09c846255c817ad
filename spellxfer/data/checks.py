"""``python -m spellxfer data check --data DIR``: the split rules of a built dataset, from its files.

The builder enforces these while it writes; this re-reads a dataset directory (one built here,
copied from elsewhere or edited by hand) and checks them again:

* validation, test and few-shot pool words are pairwise disjoint (the pool's solved examples are
  shown to the model during ``evaluate --shots K``, so a pool word must never be asked about);
* no training word is one of them, nor the reversal of one (spelling it backwards would spell the
  evaluation word out);
* no training row contains one of them as a word, nor spells one out, forward or reversed (the
  rule of docs/data.md#leak-freeness).

Only files that exist are checked; a dataset without a few-shot pool (built before the pool
existed) checks its other splits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import iter_jsonl

# file → split; the few-shot pool is a split of its own
SPLITS = {
    "position_val.jsonl": "val",
    "count_val.jsonl": "val",
    "position_test.jsonl": "test",
    "count_test.jsonl": "test",
    "fewshot_pool.jsonl": "few-shot pool",
    "spelling_train.jsonl": "train",
    "control_train.jsonl": "train",  # the non-spelling control arm: the same words, row for row
}
_WORD_RE = re.compile(r"[A-Za-z]+")


def split_problems(files: Mapping[str, list[dict]]) -> list[str]:
    """Every broken split rule in ``files`` (file name → rows, each with a ``word``), as one-line
    messages naming the word and where it is; empty when the splits are clean."""
    where: dict[str, dict[str, str]] = {}  # split → word → "file:line"
    for name, rows in files.items():
        split = SPLITS.get(name)
        if split is None:
            continue
        for line, row in enumerate(rows, start=1):
            where.setdefault(split, {}).setdefault(str(row["word"]).lower(), f"{name}:{line}")
    problems = []
    held_out = [s for s in ("val", "test", "few-shot pool") if s in where]
    for i, a in enumerate(held_out):
        for b in held_out[i + 1 :]:
            for w in sorted(where[a].keys() & where[b].keys()):
                problems.append(f"{a} word {w!r} ({where[a][w]}) is also a {b} word ({where[b][w]})")
    evaluated = {w: (s, loc) for s in held_out for w, loc in where[s].items()}
    train = where.get("train", {})
    for w, loc in sorted(train.items()):
        for form, how in ((w, ""), (w[::-1], "reversed ")):
            if form in evaluated:
                s, eloc = evaluated[form]
                problems.append(f"training word {w!r} ({loc}) is {how}the {s} word {form!r} ({eloc})")
    for name in ("spelling_train.jsonl", "control_train.jsonl"):
        for line, row in enumerate(files.get(name, []), start=1):
            text = f"{row['question']} {row['answer']}"
            found = {t.lower() for t in _WORD_RE.findall(text)}
            if name == "spelling_train.jsonl":  # control answers spell nothing out (`cat cat`, `CAT`)
                letters = re.sub("[^a-z]", "", row["answer"].lower())
                found |= {letters, letters[::-1]}
            for w in sorted(found & evaluated.keys()):
                s, eloc = evaluated[w]
                problems.append(f"training row {name}:{line} contains the {s} word {w!r} ({eloc})")
    return problems


def check_data(data: str) -> int:
    """Check a built dataset's splits: validation, test and few-shot pool words pairwise disjoint,
    and none of them in training (as a training word, reversed, or inside a training row).

    Args:
        data: A ``data build`` output directory.

    Returns:
        0 when every rule holds, 1 when one is broken (each broken rule is printed).
    """
    d = Path(data)
    if not d.is_dir():
        raise SpellxferError(f"--data {data}: no such directory (expected a `data build` output directory)")
    files = {}
    for name in SPLITS:
        if (d / name).is_file():
            rows = []
            for line, row in iter_jsonl(d / name):
                if not isinstance(row, dict) or not isinstance(row.get("word"), str):
                    raise SpellxferError(f"{d / name}:{line}: expected a JSON object with a text 'word'")
                has_text = all(isinstance(row.get(k), str) for k in ("question", "answer"))
                if SPLITS[name] == "train" and not has_text:
                    raise SpellxferError(
                        f"{d / name}:{line}: a training row needs text 'question' and 'answer'"
                    )
                rows.append(row)
            files[name] = rows
    if not files:
        raise SpellxferError(f"--data {data}: none of {', '.join(SPLITS)} there")
    problems = split_problems(files)
    console = Console()
    for p in problems:
        console.print(f"[red]{p}[/]", soft_wrap=True, highlight=False)
    words: dict[str, set[str]] = {}
    for name, rows in files.items():
        words.setdefault(SPLITS[name], set()).update(r["word"].lower() for r in rows)
    summary = ", ".join(f"{split} {len(ws):,}" for split, ws in words.items())
    status = "[green]clean[/]" if not problems else f"[bold red]{len(problems)} problem(s)[/]"
    console.print(f"data check {d}: {status}; distinct words: {summary}", highlight=False)
    return 1 if problems else 0
