"""Token counts of each question's word with the *evaluated* model's tokenizer.

The question files carry ``n_tokens`` from the Qwen3 tokenizer (the data build's). For a sweep of
another model — SmolLM2's BPE splits words differently (the two agree on 76.8% of the full test
words) — the token-count breakdown must count with that model's tokenizer, the pieces the model
actually sees. The count is the same as the data build's: the tokens that overlap the word's
characters in the question as asked (``spellxfer.data.build._add_n_tokens``).
"""

from __future__ import annotations

from pathlib import Path


def recount(model: str | None, rows: list[dict]) -> tuple[dict[tuple[str, str], int], dict]:
    """``{(question file name, id): n_tokens}`` with ``model``'s tokenizer, and what was done.

    Rows without a word (or whose question does not quote it) keep their file's count. When the
    tokenizer cannot be loaded here (a hub model on an offline machine), every row keeps the
    file's count and the returned note says so.
    """
    items = {}
    for r in rows:
        word, question = r.get("word"), r.get("question")
        if isinstance(word, str) and word and isinstance(question, str) and f" '{word}'" in question:
            items.setdefault((Path(r["file"]).name, r["id"]), (question, word, r.get("n_tokens")))
    info = {
        "tokenizer": model,
        "source": "question file (Qwen3 tokenizer, from the data build)",
        "n_items": len(items),
        "agreement_with_file": None,
    }
    if not model or not items:
        return {}, info
    try:
        from spellxfer.models.registry import load_tokenizer  # torch + transformers: only with a model

        tok = load_tokenizer(model)
    except Exception as e:  # an unknown or unreachable tokenizer: the file's counts, said plainly
        info["source"] += f"; {model}'s tokenizer could not be loaded ({type(e).__name__})"
        return {}, info
    keys = list(items)
    questions = [items[k][0] for k in keys]
    enc = tok(questions, add_special_tokens=False, return_offsets_mapping=True)
    counts = {}
    for key, question, offsets in zip(keys, questions, enc["offset_mapping"]):
        word = items[key][1]
        start = question.index(f" '{word}'") + 2
        end = start + len(word)
        counts[key] = sum(1 for s, e in offsets if s < end and e > start)
    given = [(counts[k], items[k][2]) for k in keys if isinstance(items[k][2], int)]
    info |= {
        "source": f"recounted with the {model} tokenizer",
        "agreement_with_file": sum(a == b for a, b in given) / len(given) if given else None,
    }
    return counts, info
