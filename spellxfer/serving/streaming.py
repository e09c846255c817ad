"""A chat reply on its way to a stream: generated token ids in, text out as soon as no later token
can take it back.

The finished reply a client gets without ``stream`` is shaped by
:func:`~spellxfer.tasks.parsing.strip_thinking` (cut at the end-of-turn marker, think blocks
dropped, surrounding whitespace stripped) and then cut before the first ``stop`` sequence. A stream
must never send a character that this shaping would later remove, so per token:

- :class:`Detokenizer` turns the token into the text it adds, decoding a window of a few tokens
  (constant work per token, not the whole reply again) and holding a piece while it ends in half a
  UTF-8 character (byte-level BPE tokens can split one);
- :func:`sendable` keeps the part of the reply so far that every continuation keeps: it holds back
  leading and trailing whitespace, everything from a think tag or the end marker on, everything
  from a ``stop`` sequence on, and a tail that could be the start of any of these ("<|im_" might
  become ``<|im_end|>``; with ``stop=["\\n\\n"]`` a trailing "\\n" waits for the next token).

In the inference worker, :func:`streamed_steps` runs the generation in a thread with the
engine's per-step hook and hands each step's new text to LitServe's streaming loop as it comes.

What was held back goes out with the last chunk: the server sends the finished reply's text after
what the stream already sent, so the chunks of a stream join to the reply served without
``stream``. One case cannot be held back: a ``</think>`` after visible text makes the finished reply
drop everything before it, and what was streamed cannot be recalled (Qwen3 served non-thinking
writes no think tags: the template closes the think block before the reply starts).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator

from spellxfer.tasks.parsing import END_MARKERS, THINK_TAGS, strip_end_of_turn, strip_thinking

HELD_TAGS = END_MARKERS + THINK_TAGS
"""Tags whose first characters are held back at the end of the text until the next token shows
whether the tag is being written."""

STEPS_AHEAD = 8
"""Decode steps a streamed generation may run ahead of what has been yielded; it then waits.
Handing a step's text on takes far less than a decode step, so this only holds generation back
when the consumer stalls, and it bounds the steps in memory."""


def chat_content(reply: str, stops: tuple[str, ...] = ()) -> tuple[str, bool]:
    """A chat reply's content as the API returns it: the raw reply (special tokens written out)
    shaped by ``strip_thinking``, then cut before the first of ``stops`` (OpenAI's ``stop``: the
    sequence is not returned); and whether a stop sequence cut it."""
    content = strip_thinking(reply)
    hits = [content.find(s) for s in stops if s in content]
    return (content[: min(hits)], True) if hits else (content, False)


class Detokenizer:
    """The text each generated token adds (vLLM's incremental detokenization).

    Decodes the tokens since the last emitted piece together with the piece before them, so that
    tokenizers whose pieces depend on their neighbour (leading spaces, multi-token characters)
    decode as they would in the whole reply."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window: the piece before the unread tokens, for context
        self.read = 0  # tokens up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int) -> str:
        """Append a token; the text it completes ("" while a character or piece is incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


def token_pieces(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    """The text each of ``ids`` adds to the reply (special tokens add none by default)."""
    detokenizer = Detokenizer(tokenizer, skip_special_tokens)
    return [detokenizer.add(t) for t in ids]


def sendable(text: str, stops: tuple[str, ...] = ()) -> tuple[str, bool]:
    """The start of the reply that the finished reply keeps, however ``text`` (generated so far,
    special tokens written out) continues; and whether the reply's text is complete (an end
    marker or a ``stop`` sequence was written: nothing more will be added, only held text sent)."""
    cut = strip_end_of_turn(text)
    ended = len(cut) < len(text)
    tags = [cut.find(tag) for tag in THINK_TAGS if tag in cut]
    if tags:  # a think block is dropped from the reply, and what surrounds it depends on its end
        cut = cut[: min(tags)]
    cut = cut.lstrip()
    hits = [cut.find(s) for s in stops if s in cut]
    end = min(hits, default=len(cut))
    # a stop sequence or tag that has begun but is not complete may still end the reply earlier
    pending = len(cut) if ended else _unfinished(cut, (*stops, *HELD_TAGS))
    if pending < end:
        return cut[:pending].rstrip(), False
    cut = cut[:end]
    return cut.rstrip(), ended or bool(hits)


def _unfinished(text: str, tags: tuple[str, ...]) -> int:
    """Where the earliest tail of ``text`` that is the start (not the whole) of one of ``tags``
    begins; ``len(text)`` when there is none."""
    longest = max(map(len, tags), default=0)
    for p in range(max(0, len(text) - longest + 1), len(text)):
        rest = text[p:]
        if any(len(rest) < len(tag) and tag.startswith(rest) for tag in tags):
            return p
    return len(text)


class StreamedReply:
    """One streamed reply: :meth:`add` each generated token, send what it returns."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.detokenizer = Detokenizer(tokenizer)  # markers written out: sendable cuts at them
        self.stops = stops
        self.text = ""  # everything generated so far
        self.sent = ""  # what add has returned so far, joined
        self.done = False

    def add(self, token: int) -> str:
        """The text that may be sent after this token ("" while nothing new is certain)."""
        if self.done:  # the reply's text is complete: the rest goes out with the last chunk
            return ""
        self.text += self.detokenizer.add(token)
        safe, self.done = sendable(self.text, self.stops)
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent) :], safe
        return delta


def streamed_steps(generate: Callable, replies: dict[int, StreamedReply], message: Callable) -> Generator:
    """Run ``generate(on_step)`` in a thread — a generation whose engine calls ``on_step(rows,
    tokens)`` after each decode step (:attr:`~spellxfer.models.generation.GenerationEngine.on_step`)
    — and yield ``message({row: text})`` for each step that adds text to one of ``replies`` (keyed
    by the engine's input index). Returns what ``generate`` returns and raises what it raises,
    once the thread has ended (the same pattern as transformers' ``TextIteratorStreamer``, with a
    bounded queue: see :data:`STEPS_AHEAD`). Closing the generator early stops the generation at
    its next step."""
    steps: queue.Queue = queue.Queue(maxsize=STEPS_AHEAD)
    closed = threading.Event()
    result: dict = {}

    def on_step(rows: list[int], tokens: list[int]) -> None:
        if closed.is_set():
            raise RuntimeError("the stream was closed")
        steps.put((rows, tokens))

    def run() -> None:
        try:
            result["value"] = generate(on_step)
        except BaseException as e:  # raised in the consumer's thread below
            result["error"] = e
        finally:
            steps.put(None)

    thread = threading.Thread(target=run, name="spellxfer-stream", daemon=True)
    thread.start()
    finished = False
    try:
        for rows, tokens in iter(steps.get, None):
            deltas = {k: replies[k].add(t) for k, t in zip(rows, tokens) if k in replies}
            if any(deltas.values()):
                yield message({k: d for k, d in deltas.items() if d})
        finished = True
    finally:
        if not finished:  # closed early: let a thread blocked on the full queue run into `closed`
            closed.set()
            for _ in iter(steps.get, None):
                pass
        thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
