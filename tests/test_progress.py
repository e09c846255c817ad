"""Progress a person can read, on a terminal or in a log file.

A live Rich bar prints nothing until it ends when stdout is a file, so a long fit or evaluation
looked hung; there, spellxfer prints plain, rate-limited lines without ANSI codes. On a terminal
the fit's bar counts optimizer steps out of the fit's total.
"""

from __future__ import annotations

import io
import re

import lightning as L
import torch

from spellxfer.core.progress import PlainProgress, duration
from spellxfer.training.progress import StepRichProgressBar


def test_plain_progress_prints_counts_rate_and_eta_and_honours_its_interval():
    out = io.StringIO()
    p = PlainProgress("fit", 10, unit="steps", stream=out, every=0)
    for done in range(1, 11):
        p.update(done, extra="loss 1.2345")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("fit: 10/10 steps (100%) · ")
    assert (
        "ETA" in lines[4] and "ETA" not in lines[-1] and all(line.endswith("loss 1.2345") for line in lines)
    )
    # a long interval: the first line and the last only
    out = io.StringIO()
    p = PlainProgress("generating", 100, stream=out, every=3600)
    printed = [p.update(done) for done in range(1, 101)]
    assert printed.count(True) == 2 and printed[0] and printed[-1]
    assert re.fullmatch(
        r"generating: 100/100 items \(100%\) · [0-9.]+ items/s · elapsed \d+:\d\d",
        out.getvalue().splitlines()[-1],
    )


def test_durations_read_as_clock_times():
    assert (duration(5), duration(75), duration(3725)) == ("0:05", "1:15", "1:02:05")


class _Line(L.LightningModule):
    """The smallest real fit: a linear layer on random points (the bar is what is under test)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4)  # 16 batches an epoch


def _rich_bar_frames(**limits) -> list[str]:
    """The bar's frames as drawn on a 120-column terminal (rich skips some in between)."""
    out = io.StringIO()
    bar = StepRichProgressBar(
        console_kwargs={"file": out, "force_terminal": True, "width": 120, "color_system": None}
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
        **limits,
    )
    trainer.fit(_Line())
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).replace("\n", "\r").split("\r")
    return [" ".join(f.split()) for f in frames if f.strip()]


def test_the_rich_bar_counts_optimizer_steps_out_of_max_steps():
    """max_epochs -1 with max_steps: Lightning's own bar read `Epoch 0/-2` and counted batches
    (12/6 with two batches a step)."""
    frames = _rich_bar_frames(max_steps=6, max_epochs=-1, accumulate_grad_batches=2)
    assert frames[0].startswith("step 0/6 0/6 ")
    assert frames[-1].startswith("step 6/6 ━") and " 6/6 " in frames[-1]
    assert not [f for f in frames if "Epoch" in f or "/-2" in f or "12/6" in f]


def test_the_rich_bar_shows_the_epoch_when_epochs_bound_the_fit():
    frames = _rich_bar_frames(max_epochs=2)  # 16 batches an epoch, no step limit
    assert frames[0].startswith("epoch 1/2 · step 0/32 0/32 ")
    assert frames[-1].startswith("epoch 2/2 · step 32/32 ━") and " 32/32 " in frames[-1]


def test_a_loop_writing_to_a_file_prints_plain_progress_lines_and_yields_every_item(monkeypatch):
    from spellxfer.core.progress import tracked

    monkeypatch.setenv("SPELLXFER_PROGRESS_EVERY", "0")  # a line per item
    log = io.StringIO()  # not a terminal, as a job's log file
    items = tracked(iter("abc"), "comparing runs with the base model", "runs", stream=log)
    assert list(items) == ["a", "b", "c"]
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("comparing runs with the base model: 0/3 runs (0%)")
    assert lines[-1].startswith("comparing runs with the base model: 3/3 runs (100%)")
    assert len(lines) == 4 and "\x1b[" not in log.getvalue()  # no ANSI codes in a file
