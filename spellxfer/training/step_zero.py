"""Validation at step 0, so that "do not fine-tune" can win checkpoint selection.

LoRA starts with B = 0, so before the first optimizer step the adapted model *is* the base model.
Validating it then gives every fit a step-0 point on its learning curve, and — because the scored
``ModelCheckpoint`` saves ``best-step0.ckpt`` and early stopping records the score — a run whose
fine-tuning only hurt ends with ``best_adapter/`` equal to the base model (an adapter with B = 0),
not with the least-bad fine-tuned checkpoint.

The validation runs once per fit, right before the first training batch, through the training
loop's own validation loop (the same metrics, loggers and checkpoint callbacks as every later
validation). Its "done" flag is part of the checkpoint, so a run resumed from any checkpoint never
repeats it. Trained on spelling, validated on position and count only.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from spellxfer.training.checkpointing import StepCheckpoint


class StepZeroValidation(L.Callback):
    """Validate the base model (LoRA at initialisation) once, before the first optimizer step."""

    def __init__(self) -> None:
        self.done = False

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done = bool(state_dict.get("done", False))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.done or trainer.global_step != 0 or not trainer.enable_validation:
            return
        if trainer.limit_val_batches == 0:
            return
        self.done = True  # set first: the checkpoint this validation writes must carry it
        for cb in trainer.checkpoint_callbacks:
            # only a callback ranking by a validation metric: a train/ metric has no step-0 value
            monitor = cb.monitor or ""
            if (
                isinstance(cb, ModelCheckpoint)
                and not isinstance(cb, StepCheckpoint)
                and monitor.startswith("val/")
            ):
                # ModelCheckpoint starts with "last saved at step 0" (nothing to save before any
                # step); the step-0 score must be saved and ranked like any other. Private in
                # Lightning 2.6; test_training's step-0 tests pin the outcome.
                cb._last_global_step_saved = -1
        # What the training loop itself does around a validation (training_epoch_loop.on_advance_end).
        loop = trainer.fit_loop.epoch_loop
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        loop.val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
