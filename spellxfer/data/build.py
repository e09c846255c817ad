"""``python -m spellxfer data build``: leak-free spelling / position / count datasets.

Order of work, which is what makes the splits leak-free:

1. evaluation words first — English words (stratified by length and Qwen3 token count) plus
   ≥ 10% pronounceable nonce words; validation and test words are disjoint; no evaluation word is
   a word of any training template;
2. training words = the English-only Qwen3 token subset minus every evaluation word, minus any
   word whose reversal is an evaluation word (reversed spelling would spell it out);
3. rows: spelling questions for training words only; position and count questions for evaluation
   words only, with ``letter_index`` and ``letter_count`` answers rebalanced (below);
4. a few-shot pool (``fewshot_pool.jsonl``): solved position and count questions about words of
   their own, drawn like evaluation words and disjoint from training, validation and test words,
   for ``evaluate --shots K``;
5. the non-spelling control (``control_train.jsonl``, task ``control``): row for row the training
   file's words with no letter-level structure — the word repeated whole (``repeat``) or its case
   changed (``case``) — for the study's control arm (``fit --data.train_set control``). Row *i*
   is about the same word as row *i* of ``spelling_train.jsonl``, so any selection of spelling
   rows has a control of the same words and row count. It draws from its own seeded stream:
   adding it changed no other file.

Every JSONL file holds rows of one schema (:mod:`spellxfer.data.schema`), and the dataset card
(``README.md``, :mod:`spellxfer.data.card`) carries its fixed ``datasets`` Features, so
``datasets.load_dataset(DIR)`` loads all splits at once. ``--chat_export true`` also writes the
training rows as chat ``messages`` (``spelling_train_chat.jsonl``).

Answer balance: ``letter_index`` asks about a letter drawn uniformly from the word's distinct
letters unless its answer already holds :data:`LETTER_INDEX_CAP` of the split's rows (then about
another letter); ``letter_count`` picks the letter whose count is the least-used answer so far
among those the word allows. No ``letter_index`` answer can exceed 15%; ``letter_count`` comes
close to the lowest largest share its words allow: only words with a letter repeated 3+ times
can have an answer above 2 (about a fifth of them), so one of 0, 1, 2 holds at least a third of
the rest (≈ 25%; docs/data.md#answer-balance).

Trained on spelling, evaluated on position and count only: no position or count question is ever
written to the training file, nor to the control file.

Each training row records its ``separator``: the :data:`~spellxfer.tasks.templates.SEPARATORS`
style between its letters (``spaces`` for the capitals form of ``spell``; null for
``spell_numbered`` and every control row), which ``fit --data.separator`` selects on.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from spellxfer import __version__
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_output_dir, check_output_dir, write_json, write_jsonl
from spellxfer.core.tables import print_table
from spellxfer.data.checks import split_problems
from spellxfer.data.words import (
    LENGTH_SHARES,
    NONCE_SHARE,
    english_token_subset,
    english_words,
    eval_candidates,
    nonce_word,
)
from spellxfer.tasks import templates as T
from spellxfer.tasks.buckets import LENGTH_BUCKETS, length_bucket, token_bucket
from spellxfer.tasks.chat import chat_messages, load_qwen3_tokenizer
from spellxfer.tasks.names import CONTROL_SUBTASKS, TRAINING_SUBTASKS

console = Console(stderr=True)


@dataclass(frozen=True)
class Profile:
    val_words: int  # each evaluation word yields one row per subtask (4 rows)
    test_words: int
    train_words: int | None  # None: every eligible word of the token subset
    rows_per_train_word: int  # `spell` plus this many − 1 other spelling subtasks
    shot_words: int  # few-shot pool words, each with one solved question per subtask


PROFILES = {
    # CPU demo: a few minutes of fit and evaluation with the embedded 135M model.
    "demo": Profile(val_words=40, test_words=100, train_words=600, rows_per_train_word=2, shot_words=20),
    # The real experiment: ≥ 50k training rows, ≥ 1k validation and ≥ 5k test rows per task.
    "full": Profile(val_words=600, test_words=2600, train_words=None, rows_per_train_word=3, shot_words=100),
}
FEWSHOT_FILE = "fewshot_pool.jsonl"
FILES = ("spelling_train.jsonl", "position_val.jsonl", "position_test.jsonl", "count_val.jsonl",
         "count_test.jsonl")
"""What fit and evaluation need; the few-shot pool is written beside them (only ``--shots`` reads it)."""
CONTROL_FILE = "control_train.jsonl"
"""The non-spelling control: the training words, row for row, with no letter-level structure
(``fit --data.train_set control``; not needed by a spelling fit, so not in :data:`FILES`)."""
CHAT_FILE = "spelling_train_chat.jsonl"
"""The training rows as chat ``messages`` (``--chat_export true``)."""
CARD_FILE = "README.md"
LETTER_INDEX_CAP = 0.15
"""Most rows of a split one letter_index answer may hold (the natural share of "1" is ~18%, and
always answering "1" would otherwise be a strong trivial baseline)."""


def build(
    out: str,
    profile: Literal["demo", "full"] = "demo",
    seed: int = 0,
    overwrite: bool = False,
    chat_export: bool = False,
) -> int:
    """Build spelling training data and position / count evaluation sets.

    Writes spelling_train.jsonl, control_train.jsonl (the non-spelling control arm's training
    rows: the same words, row for row), position_{val,test}.jsonl, count_{val,test}.jsonl,
    fewshot_pool.jsonl (solved examples for ``evaluate --shots``, about words of their own),
    qwen3_english_tokens.json, README.md (the dataset card: splits, sizes, fixed ``datasets``
    Features) and manifest.json. The same seed gives byte-identical files.

    Args:
        out: Output directory (must be empty or absent unless --overwrite).
        profile: ``demo`` (small, for the CPU demo) or ``full`` (the real experiment).
        seed: Random seed; every choice derives from it.
        overwrite: Replace a non-empty output directory (``--overwrite true``).
        chat_export: Also write spelling_train_chat.jsonl: each training row as chat
            ``messages`` (user: the question; assistant: the answer), for trainers that read
            conversations (``--chat_export true``).
    """
    if profile not in PROFILES:
        raise SpellxferError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    check_output_dir(out, overwrite)
    t0 = time.perf_counter()
    with atomic_output_dir(out, overwrite) as tmp:
        manifest = _build_into(tmp, PROFILES[profile], profile, seed, chat_export)
    _print_summary(manifest, Path(out), time.perf_counter() - t0)
    return 0


def _build_into(tmp: Path, prof: Profile, profile: str, seed: int, chat_export: bool) -> dict:
    from spellxfer.data.card import dataset_card  # imports datasets: only a build pays for it

    with console.status("loading the Qwen3 tokenizer and word lists"):
        tok = load_qwen3_tokenizer()
        subset = english_token_subset(tok)
        banned = T.training_template_words()

    with console.status("choosing evaluation words"):
        rng = random.Random(f"spellxfer-eval-words-{seed}")
        val_words, test_words, shot_words = _choose_eval_words(rng, tok, prof, banned)
        # the few-shot pool's words are shown to the model at evaluation: kept out of training too
        eval_set = set(val_words) | set(test_words) | set(shot_words)

    train_pool = sorted(
        w for w in {e[2] for e in subset["entries"]} if w not in eval_set and w[::-1] not in eval_set
    )
    rng = random.Random(f"spellxfer-train-{seed}")
    if prof.train_words is not None:
        train_pool = sorted(rng.sample(train_pool, prof.train_words))
    train_rows = _spelling_rows(rng, train_pool, prof.rows_per_train_word)
    control_rows = _control_rows(random.Random(f"spellxfer-control-{seed}"), train_rows)

    files: dict[str, list[dict]] = {"spelling_train.jsonl": train_rows, CONTROL_FILE: control_rows}
    for split, words in (("val", val_words), ("test", test_words)):
        rng = random.Random(f"spellxfer-{split}-{seed}")
        pos, cnt = _eval_rows(rng, words)
        files[f"position_{split}.jsonl"] = _with_ids(pos, f"position_{split}")
        files[f"count_{split}.jsonl"] = _with_ids(cnt, f"count_{split}")
    rng = random.Random(f"spellxfer-shots-{seed}")
    pos, cnt = _eval_rows(rng, shot_words)
    files[FEWSHOT_FILE] = _with_ids(pos + cnt, FEWSHOT_FILE.removesuffix(".jsonl"))
    _add_n_tokens(tok, [r for name, rows in files.items() if name not in TRAIN_FILES for r in rows])
    _assert_leak_free(train_rows, eval_set)
    _assert_leak_free(control_rows, eval_set, spelled=False)
    problems = split_problems(files)
    if problems:
        raise RuntimeError(f"split overlap: {problems[0]}")

    manifest = {
        "spellxfer_version": __version__,
        "profile": profile,
        "seed": seed,
        "policy": "trained on spelling only; evaluated on position and count only",
        "control": f"{CONTROL_FILE}: the non-spelling control arm "
                   f"(task control: {', '.join(CONTROL_SUBTASKS)}), "
                   "the training words row for row, no letter-level structure",
        "sources": {
            "english_words": f"wordfreq {subset['source']['wordfreq']} top lists",
            "tokenizer": "Qwen3 BPE rebuilt from dashscope==2.0.2 qwen.tiktoken",
            "training_words": f"English-only Qwen3 token subset ({subset['n_words']} words)",
        },
        "rows": {},
        "distinct_words": {},
        "sha256": {},
    }
    for name in (*FILES, CONTROL_FILE, FEWSHOT_FILE):
        rows = files[name]
        write_jsonl(tmp / name, rows)
        by_subtask = dict(sorted(Counter(r["subtask"] for r in rows).items()))
        manifest["rows"][name] = {"total": len(rows), **by_subtask}
        manifest["distinct_words"][name] = len({r["word"] for r in rows})
        manifest["sha256"][name] = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
    if chat_export:
        # the conversation the trainer renders: user turn = question, assistant turn = answer
        chats = [{"messages": chat_messages(r["question"], r["answer"])} for r in train_rows]
        write_jsonl(tmp / CHAT_FILE, chats)
        manifest["rows"][CHAT_FILE] = {"total": len(train_rows)}
        manifest["distinct_words"][CHAT_FILE] = manifest["distinct_words"]["spelling_train.jsonl"]
        manifest["sha256"][CHAT_FILE] = hashlib.sha256((tmp / CHAT_FILE).read_bytes()).hexdigest()
    write_json(tmp / "qwen3_english_tokens.json", subset)
    manifest["sha256"]["qwen3_english_tokens.json"] = hashlib.sha256(
        (tmp / "qwen3_english_tokens.json").read_bytes()
    ).hexdigest()
    manifest["majority_answer_share"] = {
        name: {
            sub: round(Counter(r["answer"] for r in rows if r["subtask"] == sub).most_common(1)[0][1]
                       / sum(r["subtask"] == sub for r in rows), 4)
            for sub in sorted({r["subtask"] for r in rows})
        }
        for name, rows in files.items()
        if name not in TRAIN_FILES
    }
    card = dataset_card(manifest, [*FILES, CONTROL_FILE, FEWSHOT_FILE], CHAT_FILE if chat_export else None)
    (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    manifest["sha256"][CARD_FILE] = hashlib.sha256((tmp / CARD_FILE).read_bytes()).hexdigest()
    write_json(tmp / "manifest.json", manifest)
    return manifest


def _choose_eval_words(rng: random.Random, tok, prof: Profile,
                       banned: frozenset[str]) -> tuple[list[str], list[str], list[str]]:
    """Disjoint validation, test and few-shot pool words, each stratified by length, token count
    and kind. The pool is drawn last, so adding it left the validation and test words unchanged."""
    sizes = {"val": prof.val_words, "test": prof.test_words, "shots": prof.shot_words}
    n_nonce = {k: max(2, -(-n * NONCE_SHARE // 1)) for k, n in sizes.items()}  # ceil, ≥ 10% of rows
    n_english = {k: int(n - n_nonce[k]) for k, n in sizes.items()}
    # Per length bucket, draw from the most frequent 4× quota candidates: common words, not the
    # names and rarities at the tail of a 150k list, while still leaving room to stratify.
    by_bucket: dict[str, list[str]] = {b: [] for b, _, _ in LENGTH_BUCKETS}
    for w in eval_candidates():
        if w not in banned:
            by_bucket[length_bucket(len(w))].append(w)
    total_en = sum(n_english.values())
    pool = [w for b, ws in by_bucket.items() for w in ws[: 4 * round(total_en * LENGTH_SHARES[b]) + 50]]
    rng.shuffle(pool)
    ntok = dict(zip(pool, (len(ids) for ids in tok(pool, add_special_tokens=False)["input_ids"])))
    # queues[length bucket][token bucket] → words in random order
    queues: dict[str, dict[str, list[str]]] = {b: {} for b, _, _ in LENGTH_BUCKETS}
    for w in pool:
        queues[length_bucket(len(w))].setdefault(token_bucket(ntok[w]), []).append(w)

    known = english_words(150_000)
    seen: set[str] = set()
    chosen: dict[str, list[str]] = {}
    for split in ("val", "test", "shots"):
        words: list[str] = []
        for b, _, _ in LENGTH_BUCKETS:
            quota = round(n_english[split] * LENGTH_SHARES[b])
            qs = [queues[b][k] for k in sorted(queues[b])]
            taken = 0
            while taken < quota and any(qs):
                for q in qs:  # round-robin over token counts spreads 1..4+ tokens within a length
                    if q and taken < quota:
                        words.append(q.pop())
                        taken += 1
        leftovers = [w for b in queues.values() for q in b.values() for w in q]
        rng.shuffle(leftovers)
        while len(words) < n_english[split]:  # rounding shortfall
            w = leftovers.pop()
            queues[length_bucket(len(w))][token_bucket(ntok[w])].remove(w)
            words.append(w)
        seen.update(words)
        # Nonce words start at 4 letters: nearly every pronounceable 2-3 letter string is some
        # English word or abbreviation in wordfreq's list.
        lengths = [rng.randint(max(lo, 4), max(min(hi, 18), 4)) for b, lo, hi in LENGTH_BUCKETS
                   for _ in range(round(n_nonce[split] * LENGTH_SHARES[b]))]
        while len(lengths) < n_nonce[split]:
            lengths.append(rng.randint(4, 12))
        for n in lengths[: int(n_nonce[split])]:
            for _ in range(10_000):
                w = nonce_word(rng, n)
                if w not in known and w not in seen and w not in banned:
                    break
            else:
                raise RuntimeError(f"could not draw a fresh {n}-letter nonce word")
            words.append(w)
            seen.add(w)
        chosen[split] = sorted(words)
    return chosen["val"], chosen["test"], chosen["shots"]


def _spelling_rows(rng: random.Random, words: list[str], per_word: int) -> list[dict]:
    rows = []
    for w in words:
        subtasks = ["spell"] + rng.sample(TRAINING_SUBTASKS[1:], per_word - 1)
        for sub in subtasks:
            q, a, sep = T.spelling_row(rng, w, sub)
            rows.append({"task": "spelling", "subtask": sub, "question": q, "answer": a, "word": w,
                         "separator": sep})
    rng.shuffle(rows)
    return _with_ids(rows, "spelling_train")


def _control_rows(rng: random.Random, spelling_rows: list[dict]) -> list[dict]:
    """One control row per spelling row, about the same word, in the same order (step 5 of the
    module docstring)."""
    rows = []
    for r in spelling_rows:
        sub = rng.choice(CONTROL_SUBTASKS)
        q, a = T.control_row(rng, r["word"], sub)
        rows.append({"task": "control", "subtask": sub, "question": q, "answer": a, "word": r["word"],
                     "separator": None})
    return _with_ids(rows, CONTROL_FILE.removesuffix(".jsonl"))


def _eval_rows(rng: random.Random, words: list[str]) -> tuple[list[dict], list[dict]]:
    english = english_words(150_000)
    position, count = [], []
    count_seen: Counter = Counter()
    index_seen: Counter = Counter()
    index_cap = max(1, int(LETTER_INDEX_CAP * len(words)))
    for w in words:
        kind = "english" if w in english else "nonce"
        base = {"word": w, "word_kind": kind}

        pos = rng.choice([-1, -2, -3][: min(3, len(w))]) if rng.random() < 0.25 else rng.randint(1, len(w))
        q, a = T.nth_letter_question(rng, w, pos)
        position.append({"task": "position", "subtask": "nth_letter", "question": q, "answer": a,
                         **base, "letter": None, "position": pos})

        letter = _capped_index_letter(rng, w, index_seen, index_cap)
        q, a = T.letter_index_question(rng, w, letter)
        position.append({"task": "position", "subtask": "letter_index", "question": q, "answer": a,
                         **base, "letter": letter, "position": None})

        q, a = T.word_length_question(rng, w)
        count.append({"task": "count", "subtask": "word_length", "question": q, "answer": a,
                      **base, "letter": None, "position": None})

        letter = _balanced_count_letter(rng, w, count_seen)
        q, a = T.letter_count_question(rng, w, letter)
        count.append({"task": "count", "subtask": "letter_count", "question": q, "answer": a,
                      **base, "letter": letter, "position": None})
    rng.shuffle(position)
    rng.shuffle(count)
    return position, count


def _capped_index_letter(rng: random.Random, word: str, seen: Counter, cap: int) -> str:
    """A letter of ``word`` drawn uniformly from those whose first position (the answer) is still
    below ``cap`` rows; if every one is at the cap, one with the least-used answer."""
    first = {c: word.index(c) + 1 for c in sorted(set(word))}
    options = [c for c, p in first.items() if seen[p] < cap]
    if not options:
        least = min(seen[p] for p in first.values())
        options = [c for c, p in first.items() if seen[p] == least]
    letter = rng.choice(options)
    seen[first[letter]] += 1
    return letter


def _balanced_count_letter(rng: random.Random, word: str, seen: Counter) -> str:
    """A letter whose count in ``word`` (0 for a letter it lacks) is the least-used answer so far
    among those the word allows; ties go to the larger answer, the scarcer one (only words with a
    repeated letter allow 2, 3, …), then to a random letter."""
    counts = Counter(word)
    by_answer: dict[int, list[str]] = {0: sorted(set("abcdefghijklmnopqrstuvwxyz") - set(counts))}
    for c, k in sorted(counts.items()):
        by_answer.setdefault(k, []).append(c)
    answer = min(by_answer, key=lambda k: (seen[k], -k))
    seen[answer] += 1
    return rng.choice(by_answer[answer])


def _with_ids(rows: list[dict], stem: str) -> list[dict]:
    return [{"id": f"{stem}-{i:06d}", **r} for i, r in enumerate(rows)]


def _add_n_tokens(tok, rows: list[dict]) -> None:
    """n_tokens: how many Qwen3 tokens overlap the word's characters in the question as asked."""
    enc = tok([r["question"] for r in rows], add_special_tokens=False, return_offsets_mapping=True)
    for r, offsets in zip(rows, enc["offset_mapping"]):
        start = r["question"].index(f" '{r['word']}'") + 2
        end = start + len(r["word"])
        r["n_tokens"] = sum(1 for s, e in offsets if s < end and e > start)


_WORD_RE = re.compile(r"[A-Za-z]+")
TRAIN_FILES = ("spelling_train.jsonl", CONTROL_FILE)  # rows without evaluation fields (n_tokens, …)


def _assert_leak_free(train_rows: list[dict], eval_words: set[str], spelled: bool = True) -> None:
    """Guard in the builder itself (tests recompute it independently from the files).

    ``spelled``: the answer's letters joined (forwards and reversed) must not be an evaluation
    word either. Control answers spell nothing out (``cat cat``, ``CAT``): their words are checked.
    """
    for r in train_rows:
        text = r["question"] + " " + r["answer"]
        found = {w.lower() for w in _WORD_RE.findall(text)} & eval_words
        letters = re.sub("[^a-z]", "", r["answer"].lower()) if spelled else ""
        if found or letters in eval_words or letters[::-1] in eval_words:
            raise RuntimeError(f"leak: training row {r['id']} contains evaluation word(s) {found or letters}")


def _print_summary(manifest: dict, out: Path, seconds: float) -> None:
    table = Table(title=f"data build → {out}  (profile {manifest['profile']}, "
                        f"seed {manifest['seed']}, {seconds:.1f} s)")
    for col in ("file", "rows", "by subtask", "words", "max answer share"):
        table.add_column(col)
    for name, counts in manifest["rows"].items():
        subs = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total")
        share = manifest["majority_answer_share"].get(name, {})
        table.add_row(name, str(counts["total"]), subs, str(manifest["distinct_words"][name]),
                      ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
    print_table(table)
