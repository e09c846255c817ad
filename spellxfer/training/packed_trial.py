"""One sweep trial trained inside a pack: a fit's config, data order, optimizer and checkpoints,
no Trainer loop.

A packed trial is configured by the very ``fit`` command line the unpacked sweep would run
(:func:`~spellxfer.sweep.trial.fit_argv`), parsed and instantiated by spellxfer's
LightningCLI without running it: the same defaults, the same checks and one-line errors, the same
``SpellingLoRAModule`` hyper-parameters, ``SpellingDataModule`` (hence the same length-grouped
batches in the same order), loggers (``metrics.jsonl``) and callbacks. The pack
(:mod:`spellxfer.sweep.pack`) owns the model and runs the forward / backward of all its
trials at once; this class does, per trial, what Lightning's fit loop does around them, with
Lightning's rules:

- accumulation: gradients are zeroed at the first micro-batch of each window, and the optimizer
  (plus gradient clipping and the per-step LR schedule) steps after ``accumulate_grad_batches``
  micro-batches or at an epoch's last batch; each micro-batch's loss is divided by the window;
- validation after the batch whose running count (``check_val_every_n_epoch: null``) or in-epoch
  count is a multiple of ``val_check_interval``; training stops at ``max_steps`` or ``max_epochs``;
- logging: the training row (with the learning rate of its step) every ``log_every_n_steps``
  optimizer steps, each row numbered with the optimizer steps done, as the module numbers a
  fit's rows (``step`` and ``global_step``);
- step 0: the base model (LoRA at initialisation) is validated once before the first batch, as
  :class:`~spellxfer.training.step_zero.StepZeroValidation` does in a fit: logged, seen by early
  stopping and ranked by the scored checkpoint (``best-step0.ckpt``), with no step checkpoint;
- after each validation: early stopping, then the scored checkpoint (top k), then the step
  checkpoint (last K) and ``last.ckpt``, each a Lightning checkpoint (state dict under the module's
  names, optimizer, schedule, loop counters, data position, callback states) written atomically,
  so ``best_checkpoint``, ``export`` and a resume read them as they read a fit's;
- at the end: ``best_adapter/`` from the best checkpoint, moved to the trial's ``adapter/``.

Resuming reads any such checkpoint (the pack's or a fit's), drops what a killed run wrote after it
(later checkpoints, later ``metrics.jsonl`` rows) and continues with the same batches.
Trained on spelling, validated on position and count only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import threading
from argparse import ArgumentError
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import lightning
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from spellxfer.core.errors import SpellxferError
from spellxfer.evaluation.metrics import TransferAccuracy
from spellxfer.models.registry import write_loadable_base
from spellxfer.training.cards import write_card
from spellxfer.training.checkpointing import (
    AtomicCheckpointIO,
    RunManifest,
    _rng_state,
    _saved_step,
    kill_point,
    load_fit_checkpoint,
    selection_note,
    training_facts,
)
from spellxfer.training.cli import SpellxferCLI, _parse_error
from spellxfer.training.datamodule import SpellingDataModule
from spellxfer.training.loggers import WhitelistedCSVLogger
from spellxfer.training.module import SpellingLoRAModule, build_optimizer, lora_config
from spellxfer.training.progress import PlainProgressBar
from spellxfer.training.step_zero import StepZeroValidation

# Hyper-parameters that decide the shared base model: every trial of a pack must agree on them.
SHARED_KEYS = ("model", "backend", "load_in_4bit", "gradient_checkpointing", "kernels")
RANDOM_WEIGHTS = ("tiny-qwen3", "qwen3-4b-shape")  # their weights come from model.seed, shared too
_CLI_LOCK = threading.Lock()  # LightningCLI reads sys.argv and sets process-wide logging levels


class TrialError(Exception):
    """This trial (and only this one) failed; the message is its one-line reason."""


@dataclass(frozen=True)
class _Micro:
    """A micro-batch handed to the pack: where it stands in the trial's fit."""

    index: int  # micro-batches the trial trained before it
    batch_idx: int  # its index in its epoch
    is_last: bool  # the epoch's last batch
    steps: bool  # ends an accumulation window: the optimizer steps after it
    validates: bool  # validation follows it
    tokens: int  # real tokens


@contextmanager
def _quiet_lightning():
    """Lightning's info lines (seed, devices, tips) would print once per packed trial."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def build_fit_cli(argv: list[str]):
    """``python -m spellxfer fit <argv>`` parsed and instantiated (module, data, trainer with its
    loggers and callbacks) but not run. A config mistake raises the fit's own one-line error."""
    with _CLI_LOCK, _quiet_lightning():
        saved = sys.argv
        sys.argv = [saved[0], *argv]  # SpellxferCLI names the flag or file that set a bad value from it
        try:
            return SpellxferCLI(
                SpellingLoRAModule,
                SpellingDataModule,
                run=False,
                # run_lightning_cli's defaults, so the saved config is the fit's to the line
                # the unpacked trial's fit writes to fit.log, not a terminal: its plain progress bar
                trainer_defaults={"callbacks": [PlainProgressBar()], "use_distributed_sampler": False},
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                parser_kwargs={"prog": "python -m spellxfer fit", "exit_on_error": False},
            )
        except ArgumentError as e:
            raise _parse_error(e, argv) from None
        except MisconfigurationException as e:
            raise SpellxferError(f"trainer configuration: {' '.join(str(e).split())}") from None
        finally:
            sys.argv = saved


def check_packable(cli) -> None:
    """Refuse trainer settings the packed loop does not reproduce (rather than ignore them)."""
    t = cli.trainer
    bad = []
    if t.num_devices != 1 or t.num_nodes != 1:
        bad.append("trainer.devices / num_nodes: a pack trains on one device")
    if str(t.precision).startswith(("16", "64", "transformer-engine")):
        bad.append(f"trainer.precision {t.precision}: packs run float32 on a CPU and bf16 autocast on CUDA")
    for key, default in (("limit_train_batches", 1.0), ("limit_val_batches", 1.0), ("overfit_batches", 0.0)):
        if getattr(t, key) != default:
            bad.append(f"trainer.{key} {getattr(t, key)}")
    if t.fast_dev_run:
        bad.append("trainer.fast_dev_run")
    if t.min_steps is not None or t.fit_loop.min_epochs is not None:
        bad.append("trainer.min_steps / min_epochs")
    if not isinstance(t.val_check_interval, int | float) or isinstance(t.val_check_interval, bool):
        bad.append(f"trainer.val_check_interval {t.val_check_interval!r} (time-based)")
    if cli.model.hparams.backend == "unsloth":  # auto means hf in a pack: Unsloth is not an option there
        bad.append("model.backend unsloth (Unsloth patches the model for one adapter; use hf)")
    if bad:
        raise SpellxferError(
            f"--pack: not supported in packed trials: {'; '.join(bad)}; run this sweep without --pack"
        )


class PackedTrial:
    """A trial's state between the pack's steps (see the module docstring).

    Args:
        name: Its adapter's name in the pack (``t0007``).
        argv: The ``fit`` arguments of this trial (without ``fit``).
        run: The trial directory.
        resume: A ``last.ckpt`` to resume from, or None.
        log: ``log(line)`` appends to the trial's ``fit.log``.
    """

    def __init__(self, name: str, argv: list[str], run: Path, resume: Path | None, log):
        self.name, self.argv, self.run, self.resume, self.log = name, argv, run, resume, log
        self.cli = build_fit_cli(argv)
        check_packable(self.cli)
        self.module, self.dm, self.trainer = self.cli.model, self.cli.datamodule, self.cli.trainer
        self.hp = self.module.hparams
        t = self.trainer
        self.seed = int(self.cli.config.get("seed_everything") or 0)
        self.accumulate = int(t.accumulate_grad_batches)
        self.max_steps = int(t.max_steps)
        max_epochs = t.fit_loop.max_epochs
        self.max_epochs = (-1 if self.max_steps != -1 else 1000) if max_epochs is None else int(max_epochs)
        self.log_every = int(t.log_every_n_steps)
        self.clip_val, self.clip_algorithm = t.gradient_clip_val, t.gradient_clip_algorithm or "norm"
        self.check_every_epochs = t.check_val_every_n_epoch
        self.es = t.early_stopping_callback
        self.scored = t.checkpoint_callback  # the one watching the objective (see instantiate_trainer)
        self.step_ckpt = next(cb for cb in t.checkpoint_callbacks if cb is not self.scored)
        self.step_zero = next((cb for cb in t.callbacks if isinstance(cb, StepZeroValidation)), None)
        self.io = AtomicCheckpointIO()
        self.metric = TransferAccuracy()
        # loop counters, Lightning's meaning: epoch, batches of this epoch done, all batches done,
        # optimizer steps done
        self.epoch, self.in_epoch, self.total_batches, self.global_step = 0, 0, 0, 0
        self._epoch_done = False  # the last batch of `epoch` was trained; the next batch opens the next epoch
        self.validations = 0  # validation passes so far (Lightning counts their batches in the checkpoint)
        self.should_stop = False
        self.stepped = False  # the last micro-batch ended an accumulation window
        self.validate_now = False
        self.params: list[torch.nn.Parameter] = []
        self.optimizer = self.scheduler = None
        self._iterator = None
        self._pending: list[_Micro] = []  # micro-batches handed to the pack, not yet backpropagated
        self._last = None  # (time, real tokens) of the previous pack step, for tokens/s

    # ---- setup ------------------------------------------------------------------------------------
    def shared_settings(self) -> dict:
        """The settings of the base model this trial needs (equal across a pack)."""
        hp = self.hp
        keys = SHARED_KEYS + (("seed",) if hp.model in RANDOM_WEIGHTS else ())
        return {k: (list(hp[k]) if isinstance(hp[k], list) else hp[k]) for k in keys} | {
            "device": self.trainer.strategy.root_device.type
        }

    def setup_data(self, cache: dict) -> None:
        """Read and tokenize the data once per pack for all trials with the same data settings, with
        one tokenizer per model name (loading Qwen3's is most of a trial's start)."""
        dm = self.dm
        tokenizer = ("tokenizer", dm.model_name)
        if tokenizer in cache:
            dm.tokenizer = cache[tokenizer]
        cache[tokenizer] = dm.tokenizer
        key = (str(dm.data_dir), dm.model_name, dm.max_length, tuple(sorted(dm.limits.items())), dm.pattern)
        if key in cache:
            dm.train_examples, dm.eval_items, dm.n_dropped = cache[key]
        dm.setup("fit")
        cache[key] = (dm.train_examples, dm.eval_items, dm.n_dropped)
        self.num_batches = len(dm.train_dataloader())
        acc = self.accumulate
        if self.max_epochs == -1:
            self.total_steps = self.max_steps
        else:  # Trainer.estimated_stepping_batches
            steps = math.ceil(self.num_batches / acc) * max(self.max_epochs, 1)
            self.total_steps = min(steps, self.max_steps) if self.max_steps != -1 else steps
        vci = self.trainer.val_check_interval
        self.val_check_batch = int(vci) if isinstance(vci, int) else max(1, int(self.num_batches * vci))

    def attach(self, lora) -> None:
        """Add this trial's adapter to the pack (``lora``: its PackedLoRA), build its optimizer and
        schedule, write its manifest, and restore its checkpoint when resuming."""
        self.lora = lora
        self.params = lora.add(self.name, lora_config(self.hp), self.seed)
        self.optimizer, self.scheduler = build_optimizer(self.hp, self.params, self.total_steps)
        for logger in self.trainer.loggers:  # what Lightning logs: the module's hparams (the data's: below)
            logger.log_hyperparams({k: v for k, v in self.module.hparams.items() if k != "_class_path"})
        manifest = next(cb for cb in self.trainer.callbacks if isinstance(cb, RunManifest))
        view = SimpleNamespace(
            global_rank=0,
            default_root_dir=self.trainer.default_root_dir,
            datamodule=self.dm,
            loggers=self.trainer.loggers,
        )
        manifest.on_fit_start(view, self.module)
        self._write_config()
        if self.resume is not None:
            self._restore(self.resume)

    def _write_config(self) -> None:
        """The exact config this trial runs, as fit saves it (training_logs/config.yaml → fit.yaml)."""
        text = self.cli.parser.dump(self.cli.config, skip_none=False)
        # the fit subcommand's own two keys, which a parser without subcommands does not have
        text += f"ckpt_path: {json.dumps(str(self.resume)) if self.resume else 'null'}\nweights_only: null\n"
        log_dir = Path(self.trainer.log_dir or self.run / "training_logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "config.yaml").write_text(text, encoding="utf-8")
        shutil.copyfile(log_dir / "config.yaml", self.run / "fit.yaml")

    def _restore(self, path: Path) -> None:
        ckpt = load_fit_checkpoint(path, resume=True)
        self.log(f"Restoring states from the checkpoint path at {path} (step {ckpt['global_step']})")
        self.lora.load_state(self.name, ckpt["state_dict"], f"checkpoint {path}")
        self.optimizer.load_state_dict(ckpt["optimizer_states"][0])
        self.scheduler.load_state_dict(ckpt["lr_schedulers"][0])
        for cb in self._stateful_callbacks():
            if cb.state_key in ckpt["callbacks"]:
                cb.load_state_dict(ckpt["callbacks"][cb.state_key])
        self.global_step, self.epoch = int(ckpt["global_step"]), int(ckpt["epoch"])
        progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        self.total_batches, self.in_epoch = (
            int(progress["total"]["completed"]),
            int(progress["current"]["completed"]),
        )
        val = ckpt["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"]
        self.validations = int(val) // max(1, self.val_batches_per_pass())
        position = ckpt.get(type(self.dm).__name__) or {}
        if self.in_epoch >= self.num_batches:  # saved at an epoch's last batch: the next epoch is due
            self._epoch_done = True
        elif position:
            self.dm.load_state_dict(position)
        for logger in self.trainer.loggers:
            if isinstance(logger, WhitelistedCSVLogger):
                logger.discard_from(self.global_step)
        self._drop_abandoned(path)

    def _drop_abandoned(self, resumed: Path) -> None:
        """Remove checkpoints the killed run saved after the resume point (as ResumeState does)."""
        tracked = {
            Path(p).resolve()
            for cb in (self.scored, self.step_ckpt)
            for p in (*cb.best_k_models, cb.best_model_path, cb.last_model_path)
            if p
        }
        for d in {Path(cb.dirpath).resolve() for cb in (self.scored, self.step_ckpt)}:
            for p in sorted(d.glob("*.ckpt")):
                if (
                    p.resolve() not in tracked | {resumed.resolve()}
                    and (s := _saved_step(p)) is not None
                    and s > self.global_step
                ):
                    p.unlink()
                    self.log(
                        f"resuming at step {self.global_step}: removed {p.name}, "
                        "saved after it by the interrupted run"
                    )

    # ---- training micro-batches -------------------------------------------------------------------
    def next_batches(self, window: bool = False) -> list[dict]:
        """This trial's next micro-batch — or, with ``window``, every micro-batch up to the end of
        its accumulation window (or a validation, or the epoch's end) — exactly the ones its fit
        would train on next. ``after_backward`` takes their losses once they are backpropagated."""
        if self._epoch_done:
            self.epoch, self.in_epoch, self._iterator, self._epoch_done = self.epoch + 1, 0, None, False
        if self._iterator is None:
            loader = self.dm.train_dataloader()  # a resumed position applies to this first loader only
            loader.batch_sampler.set_epoch(self.epoch)
            self._iterator = iter(loader)
        every = self.check_every_epochs
        epoch_ok = every is None or (self.epoch + 1) % every == 0
        batches: list[dict] = []
        self._pending = []
        while True:
            batch = next(self._iterator)
            k = len(batches)
            idx = self.in_epoch + k  # the batch's index in its epoch
            last = idx + 1 == self.num_batches
            count = (self.total_batches + k + 1) if every is None else idx + 1
            micro = _Micro(
                index=self.total_batches + k,
                batch_idx=idx,
                is_last=last,
                steps=(idx + 1) % self.accumulate == 0 or last,
                validates=epoch_ok and count % self.val_check_batch == 0,
                tokens=int(batch["n_real_tokens"]),
            )
            batches.append(batch)
            self._pending.append(micro)
            if not window or micro.steps or micro.validates or micro.is_last:
                return batches

    def dropout_seeds(self) -> list[int]:
        """Each pending micro-batch's dropout seed: the trial's seed and the micro-batch's index."""
        return [self.seed * 1_000_003 + m.index for m in self._pending]

    @property
    def steps_now(self) -> bool:
        """Whether the pending micro-batches end an accumulation window (the optimizer steps after them)."""
        return self._pending[-1].steps

    @property
    def starts_window(self) -> bool:
        """Whether the pending micro-batches open an accumulation window (gradients zeroed before them)."""
        return self._pending[0].batch_idx % self.accumulate == 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def after_backward(self, losses: list[float], now: float) -> None:
        """Count the pending micro-batches, step at the end of the accumulation window, log, and
        decide on validation. ``losses``: each one's loss (undivided, as fit logs it); ``now``: the
        pack step's start, for tokens/s."""
        tokens = sum(m.tokens for m in self._pending)
        rate = (
            self._last[1] / (now - self._last[0]) if self._last is not None and now > self._last[0] else None
        )
        self._last = (now, tokens)
        for micro, loss in zip(self._pending, losses):
            self.stepped = micro.steps
            self.in_epoch += 1
            self.total_batches += 1
            if self.stepped:
                if self.clip_val:
                    clip = (
                        torch.nn.utils.clip_grad_norm_
                        if self.clip_algorithm == "norm"
                        else torch.nn.utils.clip_grad_value_
                    )
                    clip(self.params, self.clip_val)
                lr = self.optimizer.param_groups[0]["lr"]  # this step's (the schedule steps after it)
                self.optimizer.step()
                self.scheduler.step()
                self.global_step += 1
                if self.global_step % self.log_every == 0:
                    row = {
                        "train/loss": loss,
                        "train/real_tokens": float(micro.tokens),
                        f"lr-{type(self.optimizer).__name__}": lr,
                    }
                    if rate is not None:
                        row["train/tokens_per_second"] = rate
                    self._log_metrics(row)
            kill_point("train_batch", self.global_step)
            self.validate_now = micro.validates
            self._epoch_done = micro.is_last
        self._pending = []

    def grads_finite(self) -> torch.Tensor:
        """A 0-dim bool tensor: are this trial's gradients finite (checked before its optimizer step)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.tensor(True)
        return torch.isfinite(torch.nn.utils.get_total_norm(grads))

    def _log_metrics(self, metrics: dict) -> None:
        """A row as the module logs it in a fit: numbered with the optimizer steps done."""
        row = {**metrics, "global_step": float(self.global_step), "epoch": self.epoch}
        for logger in self.trainer.loggers:
            logger.log_metrics(row, step=self.global_step)

    @property
    def done(self) -> bool:
        if self.should_stop or (self.max_steps != -1 and self.global_step >= self.max_steps):
            return True
        return self.max_epochs != -1 and self.epoch + self._epoch_done >= self.max_epochs

    # ---- validation, checkpoints ------------------------------------------------------------------
    def val_batches_per_pass(self) -> int:
        """Batches of one fit validation: per loader (position, count), its items over eval_batch_size."""
        size = self.dm.eval_batch_size
        return sum(
            math.ceil(len(v) / (len(v) if size == "auto" else size)) if v else 0
            for v in self.dm.eval_items["val"].values()
        )

    @property
    def validates_at_step_zero(self) -> bool:
        """Whether the base model's step-0 validation is due (once per fit, before its first batch)."""
        return (
            self.step_zero is not None
            and not self.step_zero.done
            and self.global_step == 0
            and self.total_batches == 0
            and self.val_batches_per_pass() > 0
        )

    def val_items(self) -> list:
        items = self.dm.eval_items["val"]
        return [*items["position"], *items["count"]]

    def after_validation(self, items: list, correct: list[bool]) -> dict[str, float]:
        """Score a validation, log it, apply early stopping and write the checkpoints; returns the
        logged metrics."""
        kill_point("validation_batch", self.global_step)
        step_zero = self.validates_at_step_zero
        if step_zero:
            self.step_zero.done = True  # set first: the checkpoint this validation writes carries it
        self.metric.update([it.task for it in items], [it.subtask for it in items], correct)
        values = {f"val/{k}": v for k, v in self.metric.compute().items()}
        self.metric.reset()
        # A fit's checkpoints count the validation batches of later validations only, not the step-0
        # one (run from on_train_start); test_sweep_pack compares the loop state with a fit's.
        self.validations += 0 if step_zero else 1
        self._log_metrics({k: float(v) for k, v in values.items()})
        self._early_stopping(values)
        self._save_checkpoints(values, step_zero)
        return {k: float(v) for k, v in values.items()}

    def _early_stopping(self, values: dict) -> None:
        """What ``EarlyStopping._run_early_stopping_check`` does after a validation, on this trial's
        callback: Lightning's own criterion (``_evaluate_stopping_criteria``, private in 2.6) updates
        its best score, patience and stopping reason, so the checkpointed state is the fit's."""
        es = self.es
        if es is None:
            return
        if es.monitor not in values:
            raise TrialError(
                f"early_stopping.monitor {es.monitor} is not a logged metric ({', '.join(values)})"
            )
        stop, reason = es._evaluate_stopping_criteria(values[es.monitor].float().squeeze())
        if stop:
            es.stopped_epoch = self.epoch
            es.stopping_reason_message = reason
            self.should_stop = True
            self.log(f"early stopping at step {self.global_step}: {reason}")

    def _save_checkpoints(self, values: dict, step_zero: bool = False) -> None:
        """What the two checkpoint callbacks do after a validation, in Lightning's order. At step
        0 only a scored checkpoint ranking a validation metric saves (StepZeroValidation re-arms
        it); the step checkpoint has nothing to save before the first optimizer step."""
        candidates = {**values, "step": torch.tensor(self.global_step), "epoch": torch.tensor(self.epoch)}
        if step_zero:
            if (self.scored.monitor or "").startswith("val/"):
                self._save_top_k(self.scored, candidates.get(self.scored.monitor), candidates)
            return
        self._save_top_k(self.scored, candidates.get(self.scored.monitor), candidates)
        self._save_top_k(self.step_ckpt, candidates["step"], candidates)
        last = self.step_ckpt.format_checkpoint_name(candidates, self.step_ckpt.CHECKPOINT_NAME_LAST)
        self.step_ckpt.last_model_path = last
        self._write(last)

    def _save_top_k(self, cb, current, candidates: dict) -> None:
        """``ModelCheckpoint._update_best_and_save`` on the callback's own state."""
        if current is None:
            raise TrialError(f"checkpoint.monitor {cb.monitor} is not a logged metric")
        if not cb.check_monitor_top_k(self.trainer, current):
            return
        k = cb.save_top_k
        removed = None
        if len(cb.best_k_models) == k and k > 0:
            removed = cb.kth_best_model_path
            cb.best_k_models.pop(removed)
        if torch.isnan(current):
            current = torch.tensor(float("inf" if cb.mode == "min" else "-inf"))
        path = cb.format_checkpoint_name(candidates)
        cb.current_score = current
        cb.best_k_models[path] = current
        if len(cb.best_k_models) == k:
            worst = max if cb.mode == "min" else min
            cb.kth_best_model_path = worst(cb.best_k_models, key=cb.best_k_models.get)
            cb.kth_value = cb.best_k_models[cb.kth_best_model_path]
        best = min if cb.mode == "min" else max
        cb.best_model_path = best(cb.best_k_models, key=cb.best_k_models.get)
        cb.best_model_score = cb.best_k_models[cb.best_model_path]
        self._write(path)
        if removed and removed != path and Path(removed).is_file():
            Path(removed).unlink()

    def _stateful_callbacks(self) -> list:
        return [cb for cb in (self.es, self.step_zero, self.scored, self.step_ckpt) if cb is not None]

    def _write(self, path: str) -> None:
        self.io.save_checkpoint(self.checkpoint(), path)

    def checkpoint(self) -> dict:
        """A Lightning checkpoint of this trial as it stands (the keys and layout fit writes)."""
        t = self.trainer
        loops = {
            "fit_loop": t.fit_loop.state_dict(),
            "validate_loop": t.validate_loop.state_dict(),
            "test_loop": t.test_loop.state_dict(),
            "predict_loop": t.predict_loop.state_dict(),
        }
        fit = loops["fit_loop"]
        batches, steps = (
            fit["epoch_loop.batch_progress"],
            fit["epoch_loop.automatic_optimization.optim_progress"],
        )
        for scope, n in (("total", self.total_batches), ("current", self.in_epoch)):
            batches[scope].update(ready=n, started=n, processed=n, completed=n)
        for scope in ("total", "current"):
            fit["epoch_loop.scheduler_progress"][scope].update(
                ready=self.global_step, completed=self.global_step
            )
            steps["optimizer"]["step"][scope].update(ready=self.global_step, completed=self.global_step)
            steps["optimizer"]["zero_grad"][scope].update(
                ready=self.global_step, started=self.global_step, completed=self.global_step
            )
        batches["is_last_batch"] = self._epoch_done
        epoch = self.epoch
        for scope in ("total", "current"):
            fit["epoch_progress"][scope].update(
                ready=epoch + 1, started=epoch + 1, processed=epoch, completed=epoch
            )
        # Lightning counts a batch's step here only after the validation that follows it (the
        # checkpoints are written during that validation): one less right after a step
        fit["epoch_loop.state_dict"]["_batches_that_stepped"] = (
            self.global_step - 1 if self.stepped else self.global_step
        )
        val = fit[
            "epoch_loop.val_loop.batch_progress"
        ]  # one batch per loader and validation, as fit loads them
        per_pass = self.val_batches_per_pass()
        for scope, n in (
            ("total", self.validations * per_pass),
            ("current", per_pass if self.validations else 0),
        ):
            val[scope].update(ready=n, started=n, processed=n, completed=n)
        val["is_last_batch"] = self.validations > 0
        # as Lightning stores them: only callbacks with a non-empty state
        callbacks = {cb.state_key: state for cb in self._stateful_callbacks() if (state := cb.state_dict())}
        return {
            "epoch": epoch,
            "global_step": self.global_step,
            "pytorch-lightning_version": lightning.__version__,
            "state_dict": self.lora.state(self.name),
            "loops": loops,
            "callbacks": callbacks,
            "optimizer_states": [self.optimizer.state_dict()],
            "lr_schedulers": [self.scheduler.state_dict()],
            "hparams_name": "kwargs",
            "hyper_parameters": dict(self.hp),
            "datamodule_hparams_name": "kwargs",
            "datamodule_hyper_parameters": dict(self.dm.hparams),
            type(self.dm).__name__: {"epoch": epoch, "batches_done": self.in_epoch},
            "spellxfer_rng": _rng_state(),
        }

    # ---- the end ----------------------------------------------------------------------------------
    def finish(self) -> tuple[float, Path]:
        """Export the best checkpoint's adapter (as fit does) into ``adapter/``, keep its weights in
        the pack for the test evaluation; returns (best objective, best checkpoint)."""
        kill_point("fit_end", self.global_step)
        for logger in self.trainer.loggers:
            logger.finalize("success")
        best = self.scored.best_model_path
        if not best:
            raise TrialError(
                f"no validation ran, so there is no {self.scored.monitor} and no best checkpoint "
                "(is trainer.max_steps below trainer.val_check_interval?)"
            )
        self.lora.load_state(self.name, load_fit_checkpoint(best)["state_dict"], f"checkpoint {best}")
        exported = self.lora.save_adapter(self.name, Path(self.trainer.default_root_dir) / "best_adapter")
        adapter = self.run / "adapter"  # the sweep's contract keeps it at adapter/
        if adapter.exists():
            shutil.rmtree(adapter)
        os.replace(exported, adapter)
        write_loadable_base(adapter, self.hp.model, self.hp.seed)
        facts = training_facts(self.dm.hparams, self.accumulate, self.max_steps, self.global_step)
        write_card(
            adapter,
            base_model=self.hp.model,
            hparams={**self.hp, **facts},
            data_dir=self.dm.hparams.get("data_dir"),
            selection=selection_note(best),
        )
        return float(self.scored.best_model_score), Path(best)

    def close(self, status: str = "failed") -> None:
        for logger in self.trainer.loggers:
            try:
                logger.finalize(status)
            except Exception:  # a logger that cannot flush must not hide why the trial ended
                pass


def fit_log(run: Path):
    """``log(line)``: append a line to the trial's ``fit.log`` (what its fit's output would hold)."""
    path = run / "fit.log"

    def log(line: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")

    return log


def command_line(argv: list[str]) -> str:
    """The fit command a packed trial stands for, as the unpacked sweep would run it."""
    return " ".join(
        [sys.executable, "-m", "spellxfer", "fit", *(a if " " not in a else json.dumps(a) for a in argv)]
    )
