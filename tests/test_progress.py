"""Progress a person can read when the output is a log file, not a terminal.

A live Rich bar prints nothing until it ends when stdout is a file, so a long fit or evaluation
looked hung; there, spellxfer prints plain, rate-limited lines without ANSI codes.
"""

from __future__ import annotations

import io
import re

from spellxfer.core.progress import PlainProgress, duration


def test_plain_progress_prints_counts_rate_and_eta_and_honours_its_interval():
    out = io.StringIO()
    p = PlainProgress("fit", 10, unit="steps", stream=out, every=0)
    for done in range(1, 11):
        p.update(done, extra="loss 1.2345")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("fit: 10/10 steps (100%) · ")
    assert "ETA" in lines[4] and "ETA" not in lines[-1] and all(line.endswith("loss 1.2345") for line in lines)
    # a long interval: the first line and the last only
    out = io.StringIO()
    p = PlainProgress("generating", 100, stream=out, every=3600)
    printed = [p.update(done) for done in range(1, 101)]
    assert printed.count(True) == 2 and printed[0] and printed[-1]
    assert re.fullmatch(r"generating: 100/100 items \(100%\) · [0-9.]+ items/s · elapsed \d+:\d\d", out.getvalue().splitlines()[-1])


def test_durations_read_as_clock_times():
    assert (duration(5), duration(75), duration(3725)) == ("0:05", "1:15", "1:02:05")
