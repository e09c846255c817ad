"""Few-shot prompts for ``evaluate --shots K``: K solved examples before the question.

The examples are earlier chat turns — a user turn with a pool question, an assistant turn with
its bare gold answer ("c", "3") — followed by the evaluated question, so the model sees the
answer format it is asked for. Zero-shot (K = 0) is the default and renders the single user turn.

The pool
    ``fewshot_pool.jsonl``, written by ``data build`` beside the question files: one solved
    question per subtask for each of its own words (20 in ``demo``, 100 in ``full``), disjoint
    from the training, validation and test words (``data check`` verifies it). ``--shot_pool
    FILE`` takes any question file instead (same columns as ``--questions``); whatever the pool,
    evaluation refuses one that shares a word or a question with the evaluated items.
Which examples
    K pool questions of the item's subtask (of its task and answer type when the pool has no
    such subtask, e.g. for a user's file), drawn without replacement by a generator seeded with
    the item's file name and id: the same item always gets the same examples, whatever else is
    evaluated beside it, and both scorers see the same prompt.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.questions import Item, load_questions

MAX_SHOTS = 16
POOL_FILE = "fewshot_pool.jsonl"


def resolve_pool(shot_pool: str | None, questions: list[str]) -> str:
    """``--shot_pool``, else the ``fewshot_pool.jsonl`` beside the first question file that has one."""
    if shot_pool is not None:
        return shot_pool
    for q in questions:
        candidate = Path(q).parent / POOL_FILE
        if candidate.is_file():
            return str(candidate)
    raise SpellxferError(f"--shots needs a few-shot pool: none of the question files has a {POOL_FILE} "
                         "beside it (`data build` writes one); pass --shot_pool FILE")


def load_pool(path: str, items: list[Item], shots: int) -> dict[tuple, list[Item]]:
    """The pool's items grouped by subtask and by (task, answer type), checked against ``items``:
    no shared word or question, and at least ``shots`` examples for every item."""
    if isinstance(shots, bool) or not isinstance(shots, int) or not 0 < shots <= MAX_SHOTS:
        raise SpellxferError(f"--shots must be an integer from 0 to {MAX_SHOTS}, got {shots!r}")
    pool = load_questions([path])
    asked_words = {str(it.meta["word"]).lower(): it for it in items if it.meta.get("word")}
    asked_questions = {it.question: it for it in items}
    for ex in pool:
        word = str(ex.meta.get("word") or "").lower()
        clash = asked_words.get(word) if word else None
        if clash is None and ex.question in asked_questions:
            clash = asked_questions[ex.question]
        if clash is not None:
            example = "word " + repr(word) if word else "question"
            raise SpellxferError(f"{ex.file}:{ex.line}: few-shot example {example} is also evaluated "
                                 f"({clash.file}:{clash.line}); the pool must be disjoint from "
                                 "the evaluated items")
    groups: dict[tuple, list[Item]] = defaultdict(list)
    for ex in pool:
        if ex.subtask:
            groups[("subtask", ex.subtask)].append(ex)
        groups[("type", ex.task, ex.kind)].append(ex)
    for it in items:
        got = len(groups.get(_key(it, groups), []))
        if got < shots:
            what = f"subtask {it.subtask}" if it.subtask else f"{it.task} questions with {it.kind} answers"
            raise SpellxferError(f"{it.file}:{it.line}: --shots {shots} needs {shots} examples of {what} "
                                 f"in {path}, it has {got}")
    return dict(groups)


def _key(item: Item, groups) -> tuple:
    by_subtask = ("subtask", item.subtask)
    return by_subtask if by_subtask in groups else ("type", item.task, item.kind)


def conversation(item: Item, pool: dict[tuple, list[Item]] | None, shots: int) -> list[dict[str, str]]:
    """The chat turns for ``item``: ``shots`` solved pool examples, then its question."""
    turns: list[dict[str, str]] = []
    if shots and pool:
        rng = random.Random(f"spellxfer-shots:{Path(item.file).name}:{item.id}")
        for ex in rng.sample(pool[_key(item, pool)], shots):
            turns += [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.answer}]
    return turns + [{"role": "user", "content": item.question}]
