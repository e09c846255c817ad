"""Progress a person can read in a log file.

Rich draws live bars on a terminal; when the output goes to a file or a pipe (a job's log, ``nohup
… > fit.log``) a live bar prints nothing until it ends, so a 40-minute fit or a 16-minute
evaluation looks hung. There, long work prints one plain line instead — what is done, the rate,
the time left — at the start, at most every ``SPELLXFER_PROGRESS_EVERY`` seconds (default 30) and
at the end, with no ANSI codes.
"""

from __future__ import annotations

import os
import sys
import time

DEFAULT_EVERY_S = 30.0


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stdout) is a terminal a live bar can redraw."""
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or a stand-in stream
        return False


def every_s() -> float:
    """Seconds between plain progress lines (``SPELLXFER_PROGRESS_EVERY``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("SPELLXFER_PROGRESS_EVERY", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def duration(seconds: float) -> str:
    """``75`` → ``1:15``; ``3725`` → ``1:02:05``."""
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
    """``update(done)`` prints ``label: done/total (pct) · rate unit/s · elapsed · ETA`` (plus any
    ``extra`` text) when ``every`` seconds have passed since the last line, and at the end.

    Args:
        label: What is being done (``fit``, ``generating``).
        total: Units of work in all, or None when unknown (no percentage, no ETA).
        unit: What a unit is (``steps``, ``items``).
        stream: Where lines go (default stdout); flushed after each line.
        every: Seconds between lines (default :func:`every_s`).
    """

    def __init__(self, label: str, total: int | None, unit: str = "items", stream=None,
                 every: float | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stdout
        self.every = every_s() if every is None else every
        self.start = time.monotonic()
        self.last: float | None = None
        self.done = 0

    def update(self, done: int, extra: str = "", force: bool = False) -> bool:
        """Record ``done`` units; print a line if one is due (or ``force``). Returns whether it printed."""
        self.done = done
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if not (force or finished or self.last is None or now - self.last >= self.every):
            return False
        self.last = now
        print(self.line(now, extra), file=self.stream, flush=True)
        return True

    def line(self, now: float, extra: str = "") -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {self.done}/{self.total if self.total is not None else '?'} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s" if rate else f"– {self.unit}/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if self.total and rate and self.done < self.total:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        if extra:
            parts.append(extra)
        return " · ".join(parts)


def tracked(items, description: str, unit: str = "items", stream=None):
    """Yield ``items`` with a live Rich bar on a terminal, else :class:`PlainProgress` lines (at
    the start, every :func:`every_s` seconds and at the end) on ``stream`` (default stdout), so a
    long loop also shows progress when its output goes to a file."""
    items = list(items)
    stream = stream or sys.stdout
    if is_terminal(stream):
        from rich.progress import track

        yield from track(items, description=description, transient=True)
        return
    progress = PlainProgress(description, len(items), unit, stream=stream)
    progress.update(0)
    for done, item in enumerate(items, 1):
        yield item
        progress.update(done)
