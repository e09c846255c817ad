"""Adapter-sized checkpoints that resume exactly, and survive being killed mid-write.

- The LightningModule puts only the trainable (LoRA) weights in ``state_dict`` (a Qwen3-4B r16
  checkpoint is 397 MB of fp32 LoRA weights + AdamW state, measured on an H100, not 8 GB);
  Lightning adds optimizer, scheduler and loop state; the DataModule adds its position inside the epoch and
  :class:`ResumeState` the RNG states, so a resumed run trains on the same batches with the
  same randomness as an uninterrupted one.
- :class:`AtomicCheckpointIO` writes to a temporary file in the same directory, fsyncs, then
  renames: a kill during a save leaves the previous ``last.ckpt`` intact, never a truncated one.
  Every checkpoint is read by :func:`load_checkpoint` (``torch.load(weights_only=True)``: tensors
  and plain values only), Lightning's own resume and ``validate --ckpt_path`` included, so a file
  dropped in place of a checkpoint can never run code; a file that is not a ``fit`` checkpoint is
  one ``error:`` line naming it.
- :class:`StepCheckpoint` writes the resume point (``last.ckpt``) *after* the validation of its
  step, and :class:`ResumeState` drops what a killed run wrote past the resume point (its later
  checkpoints, its later ``metrics.jsonl`` rows): a resumed run repeats the uninterrupted run's
  validations, model selection and logged rows exactly.
- :class:`RunManifest` writes ``manifest.json`` beside the checkpoints (config, data manifest
  hash, git commit, package versions) and exports the best checkpoint's adapter as a PEFT
  directory loadable with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import signal
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file, atomic_output_dir, git_commit, package_versions
from spellxfer.models.registry import check_lora_state, write_loadable_base
from spellxfer.training.cards import write_card
from spellxfer.training.loggers import WhitelistedCSVLogger

KILL_ENV = "SPELLXFER_TEST_KILL_AT"


def kill_point(name: str, step: int) -> None:
    """Test hook: SIGKILL this process when ``SPELLXFER_TEST_KILL_AT`` is ``name@step``.

    The resume tests die at exact moments (between a checkpoint write and its step's validation,
    mid-validation, …) that a timed kill only hits by luck. Points: ``train_batch`` (after the
    optimizer step, before any checkpoint of that step), ``validation_start``,
    ``validation_batch`` (after the first validation batch), ``saved:<file name>`` (right after
    that checkpoint file is renamed into place) and ``fit_end`` (before ``best_adapter/`` is
    written). Unset — always, outside the tests — it does nothing.
    """
    if os.environ.get(KILL_ENV) == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """A checkpoint file as a dict, read with ``torch.load(weights_only=True)``.

    Only tensors and plain Python values can come out, so a tampered file never runs code. A file
    that is missing, empty, truncated, not a ``torch.save`` archive, or holds pickled objects is a
    one-line :class:`~spellxfer.core.errors.SpellxferError` naming it. ``mmap``: map tensor storage
    instead of reading it (cheap when only the metadata is wanted).
    """
    path = Path(path)
    if not path.is_file():
        raise SpellxferError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise SpellxferError(f"checkpoint {path}: empty file")
    # torch.save has written zip archives since torch 1.6; `fit` never writes anything else.
    if not zipfile.is_zipfile(path):
        raise SpellxferError(f"checkpoint {path}: not a torch.save archive (truncated, or another format)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes would add stderr lines
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise SpellxferError(
            f"checkpoint {path}: holds a pickled Python object{what}, not only tensors and plain values; "
            "refused (checkpoints written by `fit` never hold one)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SpellxferError(f"checkpoint {path}: corrupt torch.save archive ({reason})") from None
    if not isinstance(ckpt, dict):
        raise SpellxferError(f"checkpoint {path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def load_fit_checkpoint(path: str | Path, *, resume: bool = False, mmap: bool = False) -> dict:
    """:func:`load_checkpoint`, then check it is a checkpoint written by ``fit`` (LoRA weights
    and the module's hyper-parameters; with ``resume``, also the optimizer and loop state)."""
    ckpt = load_checkpoint(path, mmap=mmap)
    needed = ["state_dict", "hyper_parameters", "global_step"]
    if resume:
        needed += ["optimizer_states", "lr_schedulers", "loops", "callbacks"]
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise SpellxferError(
            f"checkpoint {path}: not a `fit` checkpoint (no {', '.join(missing)}; "
            "a plain state dict or another tool's file?)"
        )
    if not isinstance(ckpt["state_dict"], dict) or not isinstance(ckpt["hyper_parameters"], dict):
        raise SpellxferError(f"checkpoint {path}: state_dict / hyper_parameters are not dicts")
    if not any("lora_" in k for k in ckpt["state_dict"]):
        raise SpellxferError(f"checkpoint {path}: holds no LoRA weights")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file beside the target, fsync, os.replace (atomic on POSIX); every
    load through :func:`load_checkpoint` (weights_only, whatever Lightning or a flag asks for)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_file(path, "wb") as f:
            torch.save(checkpoint, f)
        kill_point(f"saved:{Path(path).name}", int(checkpoint.get("global_step", -1)))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        # `weights_only` is ignored on purpose: Lightning (and `--weights_only false`) may ask for
        # a full unpickle, which would run whatever code a tampered file carries.
        return load_checkpoint(path, map_location=map_location or "cpu")


class StepCheckpoint(ModelCheckpoint):
    """The resume point: ``step{N}.ckpt`` every N optimizer steps (the last K kept) and ``last.ckpt``.

    A save due at a step after which validation runs waits for that validation (Lightning's own
    deferral, as it does at an epoch's last batch): the checkpoint then holds the validation's
    outcome — the scored checkpoint it produced, early stopping's patience, the logged rows.
    Written before it, a resume would restart after the validation without running it (Lightning
    fast-forwards a validation due at the restored batch), losing it from model selection.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and not self._should_skip_saving_checkpoint(trainer) and _validation_follows(trainer):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Validation once per epoch (val_check_interval 1.0) makes Lightning save at the epoch's
        # end instead of after validation: a save deferred to that validation happens here.
        if self._defer_save_until_validation and not self._should_skip_saving_checkpoint(trainer):
            self._defer_save_until_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_epoch_end(trainer, pl_module)


def _validation_follows(trainer) -> bool:
    """Whether the training loop validates right after the current batch.

    The loop's own decision (``_should_check_val_fx``, private in Lightning 2.6): copying its rules
    (val_check_interval as batches or a fraction, check_val_every_n_epoch, the last batch, a stop
    request) would drift from it. The kill-and-resume tests pin the behaviour.
    """
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def _saved_step(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path, mmap=True).get("global_step"))
    except (SpellxferError, TypeError, ValueError):
        return None  # not ours to judge (or remove): a foreign or damaged file stays


def _rng_state() -> dict:
    # Only tensors and plain Python values, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """Save the RNG states (Python, NumPy, torch, CUDA) in every checkpoint and restore them when
    training resumes, so dropout and any other randomness continue as if never interrupted. The
    position inside the epoch is the DataModule's own state (``SpellingDataModule.state_dict``)."""

    def __init__(self):
        self._rng: dict | None = None
        self._resumed_step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["spellxfer_rng"] = _rng_state()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._rng = checkpoint.get("spellxfer_rng")
        self._resumed_step = int(checkpoint["global_step"])

    def on_train_start(self, trainer, pl_module) -> None:
        # After the restore and the dataloader setup, right before the first resumed batch.
        if self._rng is not None:
            _set_rng_state(self._rng)
            self._rng = None
        if self._resumed_step is not None and trainer.global_rank == 0:
            _drop_abandoned_checkpoints(trainer, self._resumed_step)
            for logger in trainer.loggers:
                if isinstance(logger, WhitelistedCSVLogger):
                    logger.discard_from(self._resumed_step)
        self._resumed_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kill_point("train_batch", trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        kill_point("validation_start", trainer.global_step)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            kill_point("validation_batch", trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        kill_point("fit_end", trainer.global_step)


def _drop_abandoned_checkpoints(trainer, step: int) -> None:
    """Remove the checkpoints a killed run saved after ``step``, the step it resumes from.

    The resumed run retrains from there and saves its own (identical) ones; the killed run's would
    otherwise stay behind untracked by top-k, beside their re-saved twins. Only when resuming the
    run in its own directory, and only files the checkpoint callbacks do not track.
    """
    resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
    callbacks = trainer.checkpoint_callbacks
    tracked = {
        Path(p).resolve()
        for cb in callbacks
        for p in (*cb.best_k_models, cb.best_model_path, cb.last_model_path)
        if p
    }
    dirs = {Path(cb.dirpath).resolve() for cb in callbacks if cb.dirpath}
    if resumed is None or resumed.parent not in dirs:
        return
    removed = []
    for d in dirs:
        for p in sorted(d.glob("*.ckpt")):
            if (
                p.resolve() not in tracked | {resumed}
                and (saved := _saved_step(p)) is not None
                and saved > step
            ):
                p.unlink()
                removed.append(p.name)
    if removed:
        rank_zero_info(
            f"resuming at step {step}: removed {', '.join(removed)}, saved after it by the interrupted run"
        )


class PredictionsWriter(L.pytorch.callbacks.BasePredictionWriter):
    """``predict`` → ``<default_root_dir>/predictions.jsonl`` (one row per test question)."""

    def __init__(self):
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions
        if batches and batches[0] and isinstance(batches[0][0], list):
            batches = [b for loader in batches for b in loader]  # several loaders: [loader][batch][row]
        rows = [row for batch in batches for row in batch]
        with atomic_file(Path(trainer.default_root_dir) / "predictions.jsonl") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


class RunManifest(L.Callback):
    """manifest.json beside the checkpoints, the data hparams and full config to the loggers, and
    the best adapter as a PEFT directory."""

    def __init__(self, config: dict | None = None):
        self.config = config or {}

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        dm = trainer.datamodule
        data_manifest = Path(dm.data_dir) / "manifest.json" if dm is not None else None
        manifest = {
            "policy": "trained on spelling only; validated on position and count only",
            "hyperparameters": dict(pl_module.hparams),
            "data_dir": str(dm.data_dir) if dm is not None else None,
            "data_manifest_sha256": hashlib.sha256(data_manifest.read_bytes()).hexdigest()
            if data_manifest is not None and data_manifest.is_file()
            else None,
            "git_commit": git_commit(),
            "versions": package_versions(),
            "config": self.config,
        }
        with atomic_file(out / "manifest.json") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.write("\n")
        # Lightning logs the module's hparams (flat); the data's and the whole resolved config go
        # beside them, nested, so W&B's run config and hparams.yaml hold everything the run used.
        extra = json.loads(
            json.dumps(
                {"data": dict(dm.hparams) if dm is not None else {}, "config": self.config}, default=str
            )
        )
        for logger in trainer.loggers:
            logger.log_hyperparams(extra)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        dm = trainer.datamodule
        facts = training_facts(
            dm.hparams if dm is not None else {},
            trainer.accumulate_grad_batches,
            trainer.max_steps,
            trainer.global_step,
        )
        export_adapter(
            pl_module,
            Path(trainer.default_root_dir) / "best_adapter",
            best or None,
            data_dir=dm.hparams.get("data_dir") if dm is not None else None,
            facts=facts,
        )


def training_facts(data_hparams, accumulate: int, max_steps: int, steps_trained: int) -> dict:
    """What a model card adds to the module's hyperparameters: the data's batch size, the
    trainer's accumulation and step budget, and the optimizer steps actually trained."""
    return {
        "batch_size": data_hparams.get("batch_size"),
        "accumulate_grad_batches": int(accumulate),
        "max_steps": int(max_steps),
        "steps_trained": int(steps_trained),
    }


def selection_note(ckpt_path: str | None) -> str:
    """How a fit's ``best_adapter/`` was chosen, for its model card."""
    if not ckpt_path:
        return "The weights are the module's at the end of training (no validation ran)."
    return (
        f"The weights are those of `{Path(ckpt_path).name}`, the checkpoint with the best "
        "validation transfer score (position and count validation questions; step 0, the base "
        "model, takes part)."
    )


def export_adapter(
    pl_module, out: Path, ckpt_path: str | None = None, data_dir: str | None = None, facts: dict | None = None
) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors + a model card).

    With ``ckpt_path``, the LoRA weights come from that checkpoint; otherwise the module's own.
    """
    lm = pl_module.lm
    current = None
    if ckpt_path:
        current = {k: v.detach().clone() for k, v in pl_module.trainable_state_dict().items()}
        state = load_fit_checkpoint(ckpt_path)["state_dict"]
        check_lora_state(state, current, f"checkpoint {ckpt_path}")
        pl_module.load_state_dict(state, strict=False)
    with atomic_output_dir(out, overwrite=True) as tmp:
        lm.save_pretrained(tmp)
        hp = pl_module.hparams
        write_loadable_base(tmp, hp.model, hp.get("seed", 0))
        write_card(
            tmp,
            base_model=hp.model,
            hparams={**hp, **(facts or {})},
            data_dir=data_dir,
            selection=selection_note(ckpt_path),
        )
    if current is not None:
        pl_module.load_state_dict(current, strict=False)
    return out
