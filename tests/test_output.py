"""What a person reads in a terminal or a log file: tables printed whole at any width, and no
third-party warnings that say nothing about the run.

Rich cut table cells with "…" at 80 columns, the width of any output that is not a terminal
(``letter_in…``, ``transfer_sc…``, intervals without their upper bound); known library
deprecations and tips filled stderr. Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

from conftest import REPO
from rich.console import Console
from rich.table import Table

from spellxfer.core.tables import print_table

SUBTASKS = ("letter_index", "nth_letter", "letter_count", "word_length")


def results_table() -> Table:
    """The shape of evaluate's table: indented subtask names, intervals, a flag."""
    table = Table(title="tiny-qwen3 · 16 items · sampled T=0.6 p=0.95 k=20 2 s (10.68 items/s) · probe 1 s")
    for col in ("metric", "generation [95% CI]", "probe [95% CI]", "gold rank", "n", "best trivial"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for task, subs in (("position", SUBTASKS[:2]), ("count", SUBTASKS[2:])):
        table.add_row(f"[bold]{task}", "0.000 [0.000, 0.324]", "0.125 [0.022, 0.471]", "", "8", "")
        for sub in subs:
            table.add_row(
                f"  {sub}",
                "0.000 [0.000, 0.561] [red]✗[/]",
                "0.200 [0.036, 0.624] ✗",
                "9.2",
                "5",
                "0.667 majority",
            )
    table.add_row("[bold]transfer_score", "0.000", "", "", "", "")
    return table


def rendered(table: Table, width: int, terminal: bool = False) -> str:
    out = io.StringIO()
    print_table(table, Console(file=out, width=width, force_terminal=terminal, color_system=None))
    return out.getvalue()


def test_a_table_at_80_columns_in_a_log_file_keeps_every_name_whole():
    text = rendered(results_table(), 80)
    assert "…" not in text
    for name in (*SUBTASKS, "transfer_score", "majority"):
        assert name in text, name  # one word each: wrapped between words, never cut or split
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.count("┏") == 1  # still a table


def test_a_table_too_narrow_for_its_words_becomes_plain_rows():
    text = rendered(results_table(), 40, terminal=True)
    assert "…" not in text and "┏" not in text
    lines, words = text.splitlines(), " ".join(text.split())  # lines wrap between words
    assert lines[0].startswith("tiny-qwen3 · 16 items")
    assert "metric: letter_index · generation [95% CI]: 0.000 [0.000, 0.561] ✗ · probe" in words
    assert "metric: transfer_score · generation [95% CI]: 0.000" in words
    assert max(len(line) for line in lines) <= 40


def test_a_table_that_fits_is_printed_as_rich_lays_it_out():
    table = Table("metric", "value")
    table.add_row("val/position/letter_index_accuracy", "0.25")
    text = rendered(table, 80)
    assert "│ val/position/letter_index_accuracy │ 0.25  │" in text


def test_evaluate_printed_into_a_pipe_shows_whole_subtask_names(demo_data, tmp_path):
    """The real command, stdout a pipe at 80 columns (what a job's log gets)."""
    questions = [str(demo_data / f) for f in ("position_val.jsonl", "count_val.jsonl")]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "spellxfer",
            "evaluate",
            "--model",
            "tiny-qwen3",
            "--questions",
            *questions,
            "--out",
            str(tmp_path / "eval"),
            "--limit",
            "8",
            "--max_new_tokens",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "…" not in p.stdout
    for name in ("letter_index", "letter_count", "word_length", "transfer_score"):
        assert name in p.stdout, name


def test_importing_spellxfer_installs_none_of_its_filters():
    """Filters for known third-party noise belong to spellxfer's entry point, never to a library
    import: a user's own code keeps the warnings it asked for. (torch, numpy and friends add
    their own filters on import; none of ours may be among them.)"""
    code = """
import logging, warnings
import spellxfer.cli, spellxfer.training.cli, spellxfer.training.packed_trial, spellxfer.evaluation.evaluate
from spellxfer.core.quiet import KNOWN_WARNINGS, LIGHTNING_INFO_LOGGERS
ours = {m for m, _, _ in KNOWN_WARNINGS} | {".*your dataloader is not resumable.*"}
installed = {f[1].pattern for f in warnings.filters if f[1] is not None}
assert not ours & installed, ours & installed
assert not any(logging.getLogger(n).filters for n in LIGHTNING_INFO_LOGGERS)
assert logging.getLogger("lightning.fabric.utilities.seed").level == logging.NOTSET
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_entry_point_filters_known_warnings_only_while_a_command_runs(monkeypatch, capsys):
    """Inside a command the known deprecations are ignored and any other warning still shows;
    after it, the filters are what they were."""
    import spellxfer.cli as cli

    seen = {}

    def command() -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use …", FutureWarning,
                                   "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
            warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use …", FutureWarning,
                                   "mine.py", 1, module="my_own_code")
            warnings.warn_explicit("a user's own warning", UserWarning, "mine.py", 2, module="my_own_code")
        seen["messages"] = [(str(w.message)[:20], w.filename) for w in caught]
        return 0

    before = list(warnings.filters)
    monkeypatch.setattr(cli, "_run_lightning", lambda argv: command())
    assert cli.main(["fit"]) == 0
    # the LeafSpec notice from Lightning is gone; the same text from other code, and a user's own, are not
    assert seen["messages"] == [("`isinstance(treespec", "mine.py"), ("a user's own warning", "mine.py")]
    assert warnings.filters == before


def test_off_a_terminal_a_command_turns_hugging_faces_bars_off_and_back(monkeypatch):
    """HF's tqdm bars ("Loading weights") are carriage-return redraws that pile up in a log file:
    off a terminal a command runs with them off, and the user's environment is as it was after."""
    from spellxfer.core.quiet import HF_BARS, quiet_third_party

    monkeypatch.delenv(HF_BARS, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with quiet_third_party():
        assert os.environ[HF_BARS] == "1"
    assert HF_BARS not in os.environ

    monkeypatch.setenv(HF_BARS, "0")  # the user's own choice wins
    with quiet_third_party():
        assert os.environ[HF_BARS] == "0"
    assert os.environ[HF_BARS] == "0"

    monkeypatch.delenv(HF_BARS)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal keeps its bars
    with quiet_third_party():
        assert HF_BARS not in os.environ
