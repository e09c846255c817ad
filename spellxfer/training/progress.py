"""The fit's progress when its output is a log file, not a terminal.

``fit`` / ``validate`` / ``test`` use Lightning's ``RichProgressBar`` on a terminal. Redirected to
a file (a Studio job, ``nohup``, a sweep trial's ``fit.log``) a live bar shows nothing until the
run ends, so :func:`default_progress_bar` picks :class:`PlainProgressBar` there: a plain line every
``SPELLXFER_PROGRESS_EVERY`` seconds (default 30) with the optimizer step out of the total, steps/s,
the ETA and the last training loss, one line per validation with its position and count
accuracies, and no ANSI codes. Trained on spelling, validated on position and count only.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from spellxfer.core.progress import PlainProgress, is_terminal


def default_progress_bar() -> ProgressBar:
    """Rich's live bar on a terminal, plain lines otherwise."""
    return RichProgressBar() if is_terminal() else PlainProgressBar()


class PlainProgressBar(ProgressBar):
    """Lightning's progress-bar slot, filled with plain, rate-limited lines (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._train: PlainProgress | None = None
        self._eval: PlainProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _active(self, trainer: L.Trainer) -> bool:
        return self._enabled and trainer.is_global_zero and not trainer.sanity_checking

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps != -1 else trainer.estimated_stepping_batches
        total = int(total) if isinstance(total, int | float) and math.isfinite(total) else None
        self._train = PlainProgress("fit", total, unit="steps")
        self._train.done = trainer.global_step  # a resumed fit counts from its resume point

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._active(trainer) or self._train is None:
            return
        loss = trainer.callback_metrics.get("train/loss")
        self._train.update(trainer.global_step, extra=f"loss {float(loss):.4f}" if loss is not None else "")

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._active(trainer):
            total = self.total_val_batches
            self._eval = PlainProgress("validation", int(total) if math.isfinite(total) else None, unit="batches")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:  # fmt: skip
        if self._active(trainer) and self._eval is not None:
            self._eval.update(self._eval.done + 1)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self._active(trainer):
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k in ("val/position_accuracy", "val/count_accuracy", "val/transfer_score")}  # fmt: skip
        if shown:
            values = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
            print(f"validation at step {trainer.global_step}: {values}", flush=True)

    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._active(trainer):
            total = sum(trainer.num_test_batches)  # every test loader (position, count)
            self._eval = PlainProgress("test", int(total) if math.isfinite(total) else None, unit="batches")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:  # fmt: skip
        if self._active(trainer) and self._eval is not None:
            self._eval.update(self._eval.done + 1)
