"""The fit's progress, counted in optimizer steps, on a terminal or in a log file.

On a terminal ``fit`` / ``validate`` / ``test`` draw Lightning's Rich bar, whose description
:class:`StepRichProgressBar` makes the optimizer step out of the fit's total (``step 120/500``;
Lightning's own ``Epoch 0/-2`` said nothing when ``max_epochs`` is -1 and ``max_steps`` bounds
the fit), with the epoch out of ``max_epochs`` in front when epochs bound it. Redirected to a file
(a Studio job, ``nohup``, a sweep trial's ``fit.log``) a live bar shows nothing until the run
ends, so :func:`default_progress_bar` picks :class:`PlainProgressBar` there: a plain line every
``SPELLXFER_PROGRESS_EVERY`` seconds (default 30) with the optimizer step out of the total,
steps/s, the ETA and the last training loss, one line per validation with its position and count
accuracies, and no ANSI codes. Trained on spelling, validated on position and count only.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from spellxfer.core.progress import PlainProgress, is_terminal


def default_progress_bar() -> ProgressBar:
    """Rich's live bar on a terminal, plain lines otherwise."""
    return StepRichProgressBar() if is_terminal() else PlainProgressBar()


def step_total(trainer: L.Trainer) -> int | None:
    """Optimizer steps the fit will run: ``max_steps``, else Lightning's estimate from the epochs
    (None when neither bounds it)."""
    total = trainer.max_steps if trainer.max_steps != -1 else trainer.estimated_stepping_batches
    return int(total) if isinstance(total, int | float) and math.isfinite(total) else None


def train_description(trainer: L.Trainer, total: int | None) -> str:
    """``step 120/500``, or ``epoch 2/3 · step 120/450`` when ``max_epochs`` bounds the fit."""
    text = f"step {trainer.global_step}/{total}" if total else f"step {trainer.global_step}"
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > 1:
        text = f"epoch {trainer.current_epoch + 1}/{max_epochs} · {text}"
    return text


class StepRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, counting the fit's optimizer steps (see the module docstring).

    Lightning's training bar counts the batches of the current epoch out of ``max_steps`` (``12/6``
    with two batches a step) under ``Epoch 0/-2``; this one's description, count and rate are the
    optimizer steps of the whole fit. Through two of ``RichProgressBar``'s private methods
    (Lightning 2.6): ``_get_train_description`` and ``_update``; tests/test_progress.py pins the
    rendered bar.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._total: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = step_total(trainer)
        super().on_train_start(trainer, pl_module)

    @property
    def total_train_batches(self) -> int | float:
        return self._total if self._total is not None else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return train_description(self.trainer, self._total)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)  # not from 0 in a later epoch

    def _update(self, progress_bar_id, current: int, visible: bool = True, hard: bool = False) -> None:
        if (
            progress_bar_id is not None
            and progress_bar_id == self.train_progress_bar_id
            and self.progress is not None
        ):
            current = self.trainer.global_step  # Lightning passes the batch index in the epoch
            text, style = train_description(self.trainer, self._total), self.theme.description
            self.progress.update(progress_bar_id, description=f"[{style}]{text}" if style else text)
        super()._update(progress_bar_id, current, visible, hard)


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
        self._train = PlainProgress("fit", step_total(trainer), unit="steps")
        self._train.done = trainer.global_step  # a resumed fit counts from its resume point

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._active(trainer) or self._train is None:
            return
        loss = trainer.callback_metrics.get("train/loss")
        self._train.update(trainer.global_step, extra=f"loss {float(loss):.4f}" if loss is not None else "")

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._active(trainer):
            total = self.total_val_batches
            self._eval = PlainProgress(
                "validation", int(total) if math.isfinite(total) else None, unit="batches"
            )

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._active(trainer) and self._eval is not None:
            self._eval.update(self._eval.done + 1)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        # a fit's validations, one line each; `validate` prints its results table instead
        if not self._active(trainer) or trainer.state.fn != "fit":
            return
        shown = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k in ("val/position_accuracy", "val/count_accuracy", "val/transfer_score")
        }
        if shown:
            values = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
            print(f"validation at step {trainer.global_step}: {values}", flush=True)

    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._active(trainer):
            total = sum(trainer.num_test_batches)  # every test loader (position, count)
            self._eval = PlainProgress("test", int(total) if math.isfinite(total) else None, unit="batches")

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._active(trainer) and self._eval is not None:
            self._eval.update(self._eval.done + 1)
