"""The likelihood probe: which answer does the model find most likely, whatever it would write?

Generation scoring (the primary score) asks the model to answer and parses its reply, so it
measures answer format as much as knowledge: a model that spells the word out instead of
answering scores zero whether or not it knows the letter. The probe ranks whole candidate answers
in a fixed frame instead.

The frame
    The exact chat prompt used for generation (few-shot turns included), continued in the
    assistant turn with a fixed sentence for the subtask, identical for every model
    (:func:`answer_frame`)::

        nth_letter     The 3rd letter of 'cat' is "
        letter_index   The first 'a' in 'cat' is at position "
        word_length    The number of letters in 'cat' is "
        letter_count   The number of times 'a' appears in 'cat' is "
        (unknown)      The answer is "

    Measured on the base SmolLM2-135M, directly after the assistant tag P(one letter +
    end-of-turn) is about e^-15 for every letter, and for "the first letter of 'cat'" 'n' and
    'e' outrank 'c': an unframed probe would measure answer format again.
The candidates
    A letter answer: the 26 letters, lower and upper case both scored, and a letter keeps its
    better form. Otherwise the integers 0 … max(30, gold) (:func:`candidate_answers`).
The score
    ``log P(candidate + '"' | prompt + frame)``, summed over the candidate's tokens; the probe's
    answer is the top candidate. The text after the frame is tokenized on its own and appended
    (with byte-level BPE tokenizers ``is "`` + ``12"`` tokenizes exactly as the joined string).

Batching: each prompt + frame is encoded once and every candidate continues from its KV cache.
Where the static decoder supports the model (:func:`~spellxfer.models.static_decode.
static_decode_unsupported`: Qwen3, Llama / SmolLM2, on CUDA and on a CPU alike) the prefixes go
through the generation engine's own prefill into its static cache, and all candidates of a
prefix follow in *one* forward: packed side by side after the prefix, each attending to the
prefix and its own earlier tokens only (a 4-D mask), each at the positions it would have if it
were alone. Elsewhere (``path="eager"``) a plain batched forward of the prefixes fills a
``DynamicCache`` that is repeated per candidate, and the candidates run as one batch after it.
Both equal scoring every full sequence on its own (tests, within 1e-4).
"""

from __future__ import annotations

import inspect
import math
import string
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import DynamicCache

from spellxfer.core.errors import SpellxferError
from spellxfer.evaluation.diagnostics import CONSTANT_SHARE, TOP_ANSWERS
from spellxfer.evaluation.stats import accuracy_summary
from spellxfer.models import static_decode
from spellxfer.models.attention import STATIC_NAME, attention_implementation
from spellxfer.models.generation import auto_batch_size
from spellxfer.tasks.chat import chat_token_ids, format_chat, plain_token_ids
from spellxfer.tasks.templates import ordinal

GENERIC_FRAME = 'The answer is "'
CLOSING_QUOTE = '"'
MIN_LARGEST_INTEGER = 30
"""Integer candidates run from 0 to max(this, gold)."""
MAX_INTEGER_GOLD = 1000
"""Largest integer gold answer the probe scores (0 … gold would be that many candidates)."""

ProbePath = Literal["auto", "static", "eager"]


def answer_frame(subtask: str | None, meta: Mapping) -> str:
    """The fixed answer frame for a question of ``subtask`` whose row carries ``meta`` (``word``,
    ``letter``, ``position``); the generic frame when the subtask is unknown or a field it needs
    is missing."""
    word, letter, position = meta.get("word"), meta.get("letter"), meta.get("position")
    if isinstance(position, str) and position.strip().lstrip("+-").isdigit():
        position = int(position)  # a CSV cell
    if not isinstance(word, str) or not word:
        return GENERIC_FRAME
    if subtask == "nth_letter" and isinstance(position, int) and not isinstance(position, bool):
        if position > 0 or position in (-1, -2, -3):
            return f"The {ordinal(position)} letter of '{word}' is \""
    if subtask == "letter_index" and isinstance(letter, str) and letter:
        return f"The first '{letter}' in '{word}' is at position \""
    if subtask == "word_length":
        return f"The number of letters in '{word}' is \""
    if subtask == "letter_count" and isinstance(letter, str) and letter:
        return f"The number of times '{letter}' appears in '{word}' is \""
    return GENERIC_FRAME


def candidate_answers(kind: str, gold: str) -> list[tuple[str, str]]:
    """``(answer, scored text)`` pairs: each letter twice (``("a", 'a"')``, ``("a", 'A"')``) for a
    letter gold answer, else ``(str(i), f'{i}"')`` for i in 0 … max(30, gold)."""
    if kind == "letter":
        return [(c, form + CLOSING_QUOTE) for c in string.ascii_lowercase for form in (c, c.upper())]
    top = max(MIN_LARGEST_INTEGER, int(gold))
    if top > MAX_INTEGER_GOLD:
        raise SpellxferError(f"integer answer {gold} is above the likelihood probe's limit of "
                             f"{MAX_INTEGER_GOLD} (it scores every integer from 0 to the answer); "
                             "use --scoring generation")
    return [(str(i), f"{i}{CLOSING_QUOTE}") for i in range(top + 1)]


@dataclass(frozen=True)
class ProbeResult:
    """The probe's verdict on one question."""

    answer: str
    """The top candidate (a lower-case letter or an integer, like gold answers)."""
    correct: bool
    gold_logprob: float
    """log P(gold + closing quote | prompt + frame), natural log; a letter's better form."""
    gold_rank: int
    """1 + the number of candidates scored strictly above the gold answer."""


def rank_answers(kind: str, gold: str, logprobs: Sequence[float]) -> ProbeResult:
    """The verdict from the log-probabilities of :func:`candidate_answers` (same order)."""
    best: dict[str, float] = {}
    for (answer, _), lp in zip(candidate_answers(kind, gold), logprobs, strict=True):
        best[answer] = max(best.get(answer, -math.inf), lp)
    top = max(best, key=lambda a: best[a])  # first on a tie: candidate order
    g = best[gold]
    rank = 1 + sum(v > g for v in best.values())
    return ProbeResult(answer=top, correct=top == gold, gold_logprob=g, gold_rank=rank)


def probe_summary(results: Sequence[ProbeResult], best_trivial: Mapping | None = None) -> dict:
    """metrics.json's ``likelihood`` block for one group of items (one result per item): accuracy
    with a Wilson 95% interval, the gold answer's mean rank and mean log-probability, the probe's
    own answer distribution (``top_answers``, ``constant_answer``: the rule of
    :mod:`~spellxfer.evaluation.diagnostics`), and whether the interval lies above
    ``best_trivial`` (when given)."""
    n = len(results)
    s = accuracy_summary([[r.correct] for r in results])
    top = [[a, c / n] for a, c in Counter(r.answer for r in results).most_common(TOP_ANSWERS)]
    out = {"accuracy": s["accuracy"], "ci_low": s["ci_low"], "ci_high": s["ci_high"], "n": s["n"],
           "gold_mean_rank": sum(r.gold_rank for r in results) / n,
           "gold_mean_logprob": sum(r.gold_logprob for r in results) / n,
           "top_answers": top, "constant_answer": bool(top and top[0][1] > CONSTANT_SHARE)}
    if best_trivial is not None:
        out["beats_trivial"] = bool(s["ci_low"] > best_trivial["accuracy"])
    return out


def too_large_answer(items) -> str | None:
    """Where the first item whose integer answer exceeds :data:`MAX_INTEGER_GOLD` is (``file:line:
    …``), or None when the probe can score every item."""
    for it in items:
        if it.kind == "integer" and int(it.answer) > MAX_INTEGER_GOLD:
            return (f"{it.file}:{it.line}: answer {it.answer} is above the likelihood probe's limit of "
                    f"{MAX_INTEGER_GOLD:,} (it scores every integer from 0 to the answer)")
    return None


def probe_items(model, tokenizer, items, conversations, batch_size: int | str = "auto",
                label: str | None = "probing", before_rows=None):
    """Run the probe over evaluation items.

    Args:
        model: The causal LM (with its adapter, if any).
        tokenizer: Its tokenizer.
        items: :class:`~spellxfer.tasks.questions.Item` rows.
        conversations: Each item's chat turns, exactly as generation renders them (few-shot
            examples included); the frame continues the assistant turn that follows.
        batch_size: Prefixes per batch, or ``auto``.
        label: The progress bar's label; None: no bar (a packed sweep shows its own progress).
        before_rows: Optional :attr:`LikelihoodScorer.before_rows` (packed sweep trials: each
            item through its own trial's adapter).

    Returns:
        ``(results, likelihood_prompts, seconds, scorer)``: a :class:`ProbeResult` per item, the
        rendered prompt + frame each candidate continues, the wall time in seconds, and the
        :class:`LikelihoodScorer` (its ``path`` and ``last_batch_size`` go into metrics.json).
    """
    frames = [answer_frame(it.subtask, it.meta) for it in items]
    prompts = [format_chat(tokenizer, conv) for conv in conversations]
    chat_ids = chat_token_ids(tokenizer, conversations)
    prefixes = [ids + plain_token_ids(tokenizer, f) for ids, f in zip(chat_ids, frames)]
    texts = sorted({text for it in items for _, text in candidate_answers(it.kind, it.answer)})
    ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
    conts = [[ids[text] for _, text in candidate_answers(it.kind, it.answer)] for it in items]
    scorer = LikelihoodScorer(model, tokenizer, batch_size)
    scorer.before_rows = before_rows
    with (Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), transient=False) if label is not None else nullcontext()) as bar:
        task = bar.add_task(label, total=len(items)) if bar is not None else None
        t0 = time.perf_counter()
        advance = (lambda n: bar.advance(task, n)) if bar is not None else None
        scores = scorer.score(prefixes, conts, progress=advance)
        seconds = time.perf_counter() - t0
    results = [rank_answers(it.kind, it.answer, s) for it, s in zip(items, scores)]
    return results, [p + f for p, f in zip(prompts, frames)], seconds, scorer


# ---- scoring --------------------------------------------------------------------------------------

CPU_BATCH_SIZE = 32
"""Prefixes per batch on a CPU (each carries its 31–52 candidates), as many as generation's."""
EAGER_MAX_ROWS = 1024
"""Most (prefix, candidate) rows one eager batch holds: each row is a copy of its prefix's cache."""
_LOGIT_ELEMENTS = 2**26
"""Vocabulary-wide logits materialised at once, in float32 (256 MB)."""


class LikelihoodScorer:
    """``log P(continuation | prefix)`` for many continuations of each prefix, sharing the prefix.

    ``path="auto"`` takes the static decoder's prefill where the model supports it, else the
    eager path (see the module docstring); ``batch_size`` is prefixes per batch (``auto``: from
    free GPU memory, :data:`CPU_BATCH_SIZE` on a CPU). The model is used in eval mode under
    ``torch.inference_mode``; no parameter changes.
    """

    def __init__(self, model, tokenizer, batch_size: int | str = "auto", path: ProbePath = "auto"):
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise SpellxferError(f"batch_size must be 'auto' or an integer ≥ 1, got {batch_size!r}")
        if path not in ("auto", "static", "eager"):
            raise SpellxferError(f"probe path must be auto, static or eager, got {path!r}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        why = static_decode.static_decode_unsupported(model)
        if path == "static" and why is not None:
            raise SpellxferError(f"the static probe path cannot run this model: {why}")
        self.path = path if path != "auto" else ("static" if why is None else "eager")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.last_batch_size: int | None = None
        self.before_rows = None
        """Optional callable ``(indices) -> None``, called before every forward with the prefix
        index (input order) of each of its rows, in row order; as the generation engine's
        ``before_batch``, packed sweep trials point each row at its trial's adapter with it."""

    @torch.inference_mode()
    def score(self, prefixes: Sequence[list[int]], continuations: Sequence[Sequence[list[int]]],
              progress=None) -> list[list[float]]:
        """Per prefix, the summed log-probability of each of its continuations (token id lists,
        each ≥ 1 token), in input order. ``progress(n_prefixes_done)`` is called after each batch."""
        if len(prefixes) != len(continuations):
            raise ValueError("one list of continuations per prefix")
        if any(not p for p in prefixes) or any(not c for cs in continuations for c in cs):
            raise ValueError("prefixes and continuations need at least one token each")
        order = sorted(range(len(prefixes)), key=lambda i: (len(prefixes[i]), i))
        out: list[list[float]] = [[] for _ in prefixes]
        device = next(self.model.parameters()).device
        size = self._batch_size(prefixes, continuations, device)
        self.last_batch_size = size
        was_training = self.model.training
        self.model.eval()
        try:
            start = 0
            while start < len(order):
                idx = order[start : start + size]
                if self.path == "eager":  # bounded by rows: each (prefix, candidate) copies the cache
                    rows, k = 0, 0
                    while k < len(idx) and (k == 0 or rows + len(continuations[idx[k]]) <= EAGER_MAX_ROWS):
                        rows += len(continuations[idx[k]])
                        k += 1
                    idx = idx[:k]
                run = self._score_static if self.path == "static" else self._score_eager
                scores = run([prefixes[i] for i in idx], [continuations[i] for i in idx], device, idx)
                for i, s in zip(idx, scores):
                    out[i] = s
                if progress is not None:
                    progress(len(idx))
                start += len(idx)
        finally:
            self.model.train(was_training)
        return out

    def _rows(self, indices: list[int]) -> None:
        if self.before_rows is not None:
            self.before_rows(indices)

    def _batch_size(self, prefixes, continuations, device: torch.device) -> int:
        if self.batch_size != "auto":
            return self.batch_size
        if device.type != "cuda":
            return CPU_BATCH_SIZE
        longest = max(len(p) for p in prefixes)
        packed = max(sum(len(c) - 1 for c in cs) for cs in continuations)
        # a prefix and its packed candidates cost about what a prompt of their joint length does
        return auto_batch_size(self.model, longest + packed, 1, cap=512)

    # ---- the static path ------------------------------------------------------------------------
    def _score_static(self, prefixes: list[list[int]], conts: list[Sequence[list[int]]], device,
                      idx: list[int]) -> list[list[float]]:
        lengths = torch.tensor([len(p) for p in prefixes])
        width = int(lengths.max())
        ids = torch.tensor([p + [self.pad_id] * (width - len(p)) for p in prefixes])
        # Each candidate's tokens but its last are fed (the last is only predicted), side by side.
        feed, cand, offset, target = [], [], [], []
        for cs in conts:
            f, c, o, t = [], [], [], []
            for j, toks in enumerate(cs):
                f += toks[:-1]
                c += [j] * (len(toks) - 1)
                o += range(len(toks) - 1)
                t += toks[1:]
            feed.append(f), cand.append(c), offset.append(o), target.append(t)
        packed = max(len(f) for f in feed)
        decoder = static_decode.static_decoder(self.model)
        self._rows(idx)  # the prefill and the packed candidates alike: one row per prefix
        state = decoder.prefill(ids.to(device), lengths.to(device), max(packed, 1), graphs=False)
        scores = _first_token_logprobs(state.logits, conts)
        if packed == 0:
            return scores

        def pad(rows, value):
            return torch.tensor([r + [value] * (packed - len(r)) for r in rows], device=device)

        tokens, cand_t, offset_t = pad(feed, self.pad_id), pad(cand, -1), pad(offset, 0)
        lengths = lengths.to(device)
        slots = lengths[:, None] + torch.arange(packed, device=device)  # packed token k → slot P_b + k
        positions = lengths[:, None] + offset_t  # where the token would sit if its candidate were alone
        bucket = state.bucket
        # visible[b, k, s]: prefix slots, and the slots of token k's own candidate up to k
        rel = torch.arange(bucket.length, device=device)[None, :] - lengths[:, None]  # [n, L] packed index
        in_pack = (rel >= 0) & (rel < packed)
        slot_cand = torch.where(in_pack, cand_t.gather(1, rel.clamp(0, packed - 1)), -2)
        k = torch.arange(packed, device=device)[None, :, None]
        same_cand = slot_cand[:, None, :] == cand_t[:, :, None]
        visible = (rel < 0)[:, None, :] | (same_cand & (rel[:, None, :] <= k))
        cache_arg = {decoder.cache_kwarg: _PackedCache(bucket, slots)}
        with attention_implementation(decoder.base, STATIC_NAME):
            hidden = decoder.body(input_ids=tokens, attention_mask=visible[:, None], position_ids=positions,
                                  use_cache=True, **cache_arg).last_hidden_state
        real = cand_t >= 0
        lp = _target_logprobs(decoder.head, hidden[real], pad(target, 0)[real]).tolist()
        for b, j, v in zip(real.nonzero(as_tuple=True)[0].tolist(), cand_t[real].tolist(), lp):
            scores[b][j] += v
        return scores

    # ---- the eager path -------------------------------------------------------------------------
    def _score_eager(self, prefixes: list[list[int]], conts: list[Sequence[list[int]]], device,
                     idx: list[int]) -> list[list[float]]:
        model = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cache_kwarg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        width = max(len(p) for p in prefixes)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prefixes], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=base.config)
        self._rows(idx)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_kwarg: cache}).logits[:, -1]
        scores = _first_token_logprobs(logits, conts)
        pairs = [(b, j) for b, cs in enumerate(conts) for j, toks in enumerate(cs) if len(toks) > 1]
        if not pairs:
            return scores
        rows = torch.tensor([b for b, _ in pairs], device=device)
        cache.batch_select_indices(rows)  # one copy of its prefix's cache per candidate row
        longest = max(len(conts[b][j]) - 1 for b, j in pairs)
        cands = [conts[b][j] for b, j in pairs]
        feed = torch.tensor([c[:-1] + [self.pad_id] * (longest - len(c) + 1) for c in cands],
                            device=device)
        feed_mask = torch.tensor([[1] * (len(c) - 1) + [0] * (longest - len(c) + 1) for c in cands],
                                 device=device)
        real_lengths = mask.sum(-1)[rows]
        self._rows([idx[b] for b, _ in pairs])  # one row per (prefix, candidate)
        hidden_logits = model(input_ids=feed, attention_mask=torch.cat([mask[rows], feed_mask], dim=1),
                              position_ids=real_lengths[:, None] + torch.arange(longest, device=device),
                              use_cache=True, **{cache_kwarg: cache}).logits
        target = torch.tensor([c[1:] + [0] * (longest - len(c) + 1) for c in cands], device=device)
        lp = hidden_logits.float().log_softmax(-1).gather(-1, target[..., None])[..., 0]
        lp = (lp * feed_mask).sum(-1).tolist()
        for (b, j), v in zip(pairs, lp):
            scores[b][j] += v
        return scores


class _PackedCache:
    """The static bucket seen by packed candidate tokens: token ``k`` of row ``b`` writes its key and
    value to slot ``slots[b, k]``, and every query sees the row's whole buffer (the mask decides)."""

    def __init__(self, bucket, slots: torch.Tensor):
        self.bucket, self.slots = bucket, slots

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        n = key.shape[0]
        keys, values = self.bucket.keys[layer_idx][:n], self.bucket.values[layer_idx][:n]
        index = self.slots[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
        keys.scatter_(2, index, key)
        values.scatter_(2, index, value)
        return keys, values


def _first_token_logprobs(logits: torch.Tensor, conts: list[Sequence[list[int]]]) -> list[list[float]]:
    """Per prefix, log P(each continuation's first token) from the prefix's last logits ``[n, vocab]``."""
    lp = logits.float().log_softmax(-1)
    rows = torch.tensor([b for b, cs in enumerate(conts) for _ in cs], device=lp.device)
    firsts = torch.tensor([toks[0] for cs in conts for toks in cs], device=lp.device)
    flat = lp[rows, firsts].tolist()
    out, i = [], 0
    for cs in conts:
        out.append(flat[i : i + len(cs)])
        i += len(cs)
    return out


def _target_logprobs(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log_softmax(head(hidden))[target]`` per row, a few hundred vocabulary-wide rows at a time."""
    out = []
    step = max(1, _LOGIT_ELEMENTS // head.weight.shape[0])
    for i in range(0, hidden.shape[0], step):
        logits = head(hidden[i : i + step]).float()
        out.append(logits.log_softmax(-1).gather(-1, target[i : i + step, None])[:, 0])
    return torch.cat(out) if out else hidden.new_zeros(0)
