"""LightningCLI for ``python -m spellxfer fit|validate|test|predict --config configs/….yaml``.

What it adds to Lightning's own CLI:

- ``--experiment NAME`` names the run. Outputs go to ``checkpoints/<experiment>/`` (checkpoints,
  ``manifest.json``, ``best_adapter/``, W&B files) with training logs in
  ``results/training_logs/<experiment>/`` and a JSONL metrics log in
  ``results/metrics/<experiment>.jsonl``; ``--trainer.default_root_dir DIR`` moves all of them
  under DIR. ``validate`` / ``test`` / ``predict`` log to ``training_logs/<subcommand>/`` and
  ``<subcommand>_metrics.jsonl`` (``<experiment>-<subcommand>.jsonl``), never into the fit's logs.
- a ``ModelCheckpoint`` (``--checkpoint.*``) and an ``EarlyStopping`` (``--early_stopping.*``;
  ``--early_stopping.enabled false`` leaves it out) watching ``val/position_accuracy``
  (generation-scored) by default — the scored checkpoint is
  written right after each validation, as ``best-step{N}.ckpt`` (top k); a second checkpoint
  callback writes ``step{N}.ckpt`` every ``--checkpoint.every_n_train_steps`` steps, keeps the
  last K (``--keep_last_k``) and owns ``last.ckpt``, the resume point;
- atomic checkpoint writes, RNG + in-epoch resume state, the run manifest and the best adapter
  (:mod:`spellxfer.training.checkpointing`);
- a validation of the base model (LoRA at initialisation) at step 0, ranked with the others by
  the scored checkpoint and early stopping, so ``best_adapter/`` can be "no fine-tuning"
  (:mod:`spellxfer.training.step_zero`);
- loggers that refuse any metric outside the whitelist (:mod:`spellxfer.training.loggers`):
  CSV/JSONL always, W&B (offline unless credentials are configured; ``WANDB_MODE=disabled``
  turns it off), runs grouped by experiment;
- ``data.model`` follows ``model.model``, and Lightning's distributed sampler is off because the
  DataModule shards its own length-grouped batches;
- checks before anything loads or is written: the run name (``--experiment``: no path
  separators, no ``..``), trainer limits and the accelerator, and any ``--ckpt_path`` (read with
  ``weights_only=True``; its LoRA shape must match the configured model). A mistake is one
  ``error:`` line naming the key and the config file (or flag) that set it, and a failed command
  removes the run directory, logs and metrics file it created (never a pre-existing run's, and
  never one that holds a checkpoint to resume from).

Trained on spelling, validated on position and count only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from argparse import ArgumentError
from pathlib import Path

import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from rich.table import Table

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import check_run_name
from spellxfer.core.tables import print_table
from spellxfer.models.registry import check_lora_layout
from spellxfer.tasks.metric_names import check_metric_name
from spellxfer.training.checkpointing import (
    AtomicCheckpointIO,
    PredictionsWriter,
    ResumeState,
    RunManifest,
    StepCheckpoint,
    load_fit_checkpoint,
)
from spellxfer.training.datamodule import SpellingDataModule
from spellxfer.training.module import SpellingLoRAModule
from spellxfer.training.progress import default_progress_bar
from spellxfer.training.step_zero import StepZeroValidation

# Hyper-parameters that decide which LoRA tensors exist and their shapes: a checkpoint written
# with other values cannot be loaded into the configured model.
LORA_SHAPE_KEYS = ("model", "lora_r", "target_modules")


class OptionalEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` plus ``enabled``: ``--early_stopping.enabled false`` (YAML
    ``early_stopping: {enabled: false}``) fits to ``max_steps`` without it — the callback is left
    out of the Trainer, so nothing watches, records or stops.

    Args:
        monitor: The metric to watch (a val/ metric).
        enabled: False: no early stopping in this fit (the other early_stopping keys are unused).
    """

    def __init__(self, monitor: str, enabled: bool = True, **kwargs) -> None:
        super().__init__(monitor=monitor, **kwargs)
        self.enabled = enabled

    @property
    def state_key(self) -> str:
        # Lightning's own key (EarlyStopping{'monitor': …, 'mode': …}): checkpoints written before
        # this subclass existed resume with their patience.
        return EarlyStopping.__qualname__ + super().state_key.removeprefix(type(self).__qualname__)


class SpellxferCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        self._argv = list(sys.argv[1:])
        self._new_outputs: list[tuple[Path, Path]] = []
        try:
            super().__init__(*args, **kwargs)
        except Exception:
            self._remove_new_outputs()
            raise

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except (ValueError, RecursionError) as e:
            # not jsonargparse's ArgumentError: Python's int() or YAML giving up on a value
            raise _parse_error(e, self._argv) from None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's own step — a ``--ckpt_path`` file's hyper-parameters become the model's
        config — with the file read by :func:`load_fit_checkpoint` (weights_only, and a damaged or
        foreign file is one error line naming it, not torch's traceback)."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # "last" and friends: checked in before_instantiate_classes
        hparams = dict(load_fit_checkpoint(ckpt_path, resume=sub == "fit", mmap=True)["hyper_parameters"])
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except (ArgumentError, SystemExit) as e:
            raise SpellxferError(
                f"checkpoint {ckpt_path}: its hyper_parameters do not fit spellxfer's module ({_one_line(e)})"
            ) from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--experiment", type=str, default="default", help="Run name: output folders and the W&B group."
        )
        parser.add_argument(
            "--keep_last_k",
            type=int,
            default=3,
            help="Step checkpoints kept (every --checkpoint.every_n_train_steps), "
            "besides last.ckpt and the best ones.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/position_accuracy",  # the default; any val/ metric works
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 2,
                "checkpoint.filename": "best-step{step}",
                "checkpoint.auto_insert_metric_name": False,
                # a resumed run re-saves best-step{N}.ckpt under the same name, never a -v1 twin
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(OptionalEarlyStopping, "early_stopping")
        parser.set_defaults(
            {
                "early_stopping.monitor": "val/position_accuracy",
                "early_stopping.mode": "max",
                "early_stopping.patience": 3,
            }
        )
        parser.link_arguments("model.model", "data.model")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.keep_last_k < 1:
            raise self._error(
                "keep_last_k", f"must be ≥ 1 (it holds the resume point), got {cfg.keep_last_k}"
            )
        try:
            check_run_name(cfg.experiment, "--experiment")
        except SpellxferError as e:
            raise self._error("experiment", str(e).removeprefix("--experiment ")) from None
        self._check_trainer(cfg)
        experiment, trainer = cfg.experiment, cfg.trainer
        explicit_root = trainer.default_root_dir is not None
        root = Path(trainer.default_root_dir) if explicit_root else Path("checkpoints") / experiment
        self._check_checkpoint(cfg, root)
        if cfg.data.build_profile is None:
            # Without a build profile prepare_data only checks the files: fail before the Trainer
            # prints its banner and before any model loads.
            SpellingDataModule(cfg.data.data_dir, cfg.model.model, build_profile=None).prepare_data()
        trainer.default_root_dir = str(root)
        cfg.checkpoint.dirpath = cfg.checkpoint.dirpath or str(root)
        outputs = [root, Path(cfg.checkpoint.dirpath)]
        if trainer.logger is None or trainer.logger is True:
            log_dir = root / "training_logs" if explicit_root else Path("results/training_logs") / experiment
            jsonl = (
                root / "metrics.jsonl" if explicit_root else Path("results/metrics") / f"{experiment}.jsonl"
            )
            if self.subcommand not in (None, "fit"):
                # validate / test / predict beside a fit: their own CSV version and JSONL, so they
                # neither restart the fit's metrics.csv nor append rows to its learning curve
                log_dir = log_dir / self.subcommand
                jsonl = jsonl.with_name(
                    f"{self.subcommand}_{jsonl.name}"
                    if explicit_root
                    else f"{experiment}-{self.subcommand}.jsonl"
                )
            outputs += [log_dir, jsonl]
            loggers = [
                {
                    "class_path": "spellxfer.training.loggers.WhitelistedCSVLogger",
                    "init_args": {
                        "save_dir": str(log_dir),
                        "name": "",
                        "version": "",
                        "jsonl_path": str(jsonl),
                    },
                }
            ]
            if os.environ.get("WANDB_MODE") != "disabled" and importlib.util.find_spec("wandb"):
                loggers.append(
                    {
                        "class_path": "spellxfer.training.loggers.WhitelistedWandbLogger",
                        "init_args": {
                            "project": "spellxfer",
                            "group": experiment,
                            "name": experiment,
                            "save_dir": str(root),
                        },
                    }
                )
            trainer.logger = loggers
        # What this command may create, with the nearest folder above each that exists already;
        # removed again if the command fails (see _remove_new_outputs).
        self._new_outputs = [(p, _existing_ancestor(p)) for p in dict.fromkeys(outputs) if not p.exists()]
        # Two checkpoint callbacks with one job each. The scored one (--checkpoint.*) saves right
        # after each validation, so a checkpoint is ranked by its own step's score (saving every N
        # training steps would rank it by the previous validation's). The step one saves every
        # N steps, keeps the last K and owns last.ckpt, the resume point.
        every = cfg.checkpoint.every_n_train_steps
        cfg.checkpoint.every_n_train_steps = None
        cfg.checkpoint.save_last = False
        self._run = {"root": root, "keep": cfg.keep_last_k, "every": every, "config": cfg.as_dict()}

    def _check_trainer(self, cfg) -> None:
        """Trainer values Lightning would accept and then fail on (or silently ignore) mid-run."""
        t = cfg.trainer
        accelerator = t.accelerator if isinstance(t.accelerator, str) else None
        if accelerator in ("gpu", "cuda") and not _cuda_available():
            raise self._error(
                "trainer.accelerator",
                f"{accelerator} asked for, but this machine has no CUDA GPU "
                "(torch.cuda.is_available() is False); use cpu or auto",
            )
        if accelerator == "tpu":
            raise self._error("trainer.accelerator", "tpu is not supported; use gpu, cpu or auto")
        limits = (
            ("max_steps", t.max_steps, "-1 (no limit) or ≥ 1"),
            ("max_epochs", t.max_epochs, "-1 (no limit), ≥ 1 or null"),
            ("min_steps", t.min_steps, "≥ 0 or null"),
            ("min_epochs", t.min_epochs, "≥ 0 or null"),
        )
        for key, value, valid in limits:
            bad = value is not None and (value < 0 if key.startswith("min") else (value == 0 or value < -1))
            if bad:
                raise self._error(f"trainer.{key}", f"must be {valid}, got {value}")
        for key in ("log_every_n_steps", "accumulate_grad_batches", "check_val_every_n_epoch"):
            value = t.get(key)
            if isinstance(value, int) and value < 1:
                raise self._error(f"trainer.{key}", f"must be ≥ 1, got {value}")
        if t.gradient_clip_val is not None and t.gradient_clip_val < 0:
            # a negative norm bound flips the gradients' sign in torch's clipping
            raise self._error("trainer.gradient_clip_val", f"must be ≥ 0 or null, got {t.gradient_clip_val}")
        if t.num_sanity_val_steps is not None and t.num_sanity_val_steps < -1:
            raise self._error(
                "trainer.num_sanity_val_steps", f"must be ≥ 0, or -1 for all, got {t.num_sanity_val_steps}"
            )
        if cfg.early_stopping.patience < 0:
            raise self._error("early_stopping.patience", f"must be ≥ 0, got {cfg.early_stopping.patience}")
        for key in (
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
            "limit_predict_batches",
        ):
            value = t.get(key)
            if isinstance(value, (int, float)) and (value < 0 or (isinstance(value, float) and value > 1)):
                # Lightning checks these too, but only after printing its device banner
                raise self._error(
                    f"trainer.{key}", f"must be a batch count ≥ 0 or a fraction in [0, 1], got {value}"
                )
        vci = t.val_check_interval
        if isinstance(vci, (int, float)) and (vci <= 0 or (isinstance(vci, float) and vci > 1)):
            raise self._error(
                "trainer.val_check_interval",
                f"must be a batch count ≥ 1 or a fraction of an epoch in (0, 1], got {vci}",
            )
        every = cfg.checkpoint.every_n_train_steps
        if every is not None and every < 0:
            raise self._error(
                "checkpoint.every_n_train_steps",
                f"must be ≥ 1 (or 0 / null: only after validation), got {every}",
            )
        for key in ("checkpoint.monitor", "early_stopping.monitor"):
            name = cfg.get(key)
            if name is not None:
                try:
                    check_metric_name(name)
                except SpellxferError as e:
                    raise self._error(key, str(e)) from None
                if not name.startswith(("val/", "train/")):
                    raise self._error(
                        key,
                        f"{name!r} is not a logged metric; use a val/ metric such as val/position_accuracy",
                    )
        if cfg.get("weights_only") is False:
            # Lightning would unpickle the checkpoint in full; ours load tensors and plain values only.
            raise self._error(
                "weights_only",
                "false is not supported: spellxfer reads checkpoints as tensors and "
                "plain values only, so no checkpoint can run code",
            )

    def _check_checkpoint(self, cfg, root: Path) -> None:
        """Read ``--ckpt_path`` (weights_only) and refuse it unless it fits the configured model."""
        ckpt = cfg.get("ckpt_path")
        if not ckpt or ckpt in ("best", "hpc", "registry"):
            return
        if ckpt == "last":
            path = Path(cfg.checkpoint.dirpath or root) / "last.ckpt"
            if not path.is_file():
                # Lightning would warn and train from scratch; a resume that silently restarts is worse.
                raise SpellxferError(
                    f"--ckpt_path last: no checkpoint {path} to resume from; "
                    "drop --ckpt_path to start a fresh run"
                )
        else:
            path = Path(ckpt)
            if not path.is_file():
                raise SpellxferError(f"--ckpt_path {ckpt}: no such checkpoint file")
        loaded = load_fit_checkpoint(path, resume=self.subcommand == "fit", mmap=True)
        saved = loaded["hyper_parameters"]
        check_lora_layout(
            loaded["state_dict"], saved.get("lora_r"), saved.get("target_modules") or (), f"checkpoint {path}"
        )
        for key in LORA_SHAPE_KEYS:
            want = cfg.model.get(key)
            have = saved.get(key)
            if key == "target_modules" and have is not None and want is not None:
                have, want = sorted(have), sorted(want)
            if have != want:
                raise self._error(
                    f"model.{key}",
                    f"{want!r} here, but checkpoint {path} was trained with {have!r}; "
                    f"set model.{key}: {have!r} to load it",
                )
        if self.subcommand == "fit":
            # best_adapter/ is exported from the run's best checkpoint when the fit ends: a
            # damaged or planted one is refused now, not after the whole run
            for state in loaded["callbacks"].values():
                best = state.get("best_model_path") if isinstance(state, dict) else None
                if best and Path(best).is_file() and Path(best).resolve() != path.resolve():
                    check_lora_layout(
                        load_fit_checkpoint(best, mmap=True)["state_dict"],
                        saved.get("lora_r"),
                        saved.get("target_modules") or (),
                        f"checkpoint {best}",
                    )

    def _error(self, key: str, message: str) -> SpellxferError:
        """A one-line error for config key ``key``, naming the config file or flag that set it."""
        where = _where_set(key, self._argv)
        return SpellxferError(f"{key}: {message}" + (f" ({where})" if where else ""), key=key)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except SpellxferError as e:
            # model / data arguments checked by their classes: add where the value came from
            if e.key and (where := _where_set(e.key, self._argv)):
                raise SpellxferError(f"{e} ({where})", key=e.key) from None
            raise
        except MisconfigurationException as e:  # Lightning's callbacks check their arguments
            raise SpellxferError(f"invalid configuration: {_one_line(e)}") from None

    def _remove_new_outputs(self) -> None:
        """After a failure: remove the outputs this command created — unless a checkpoint was
        written (a run that got that far is worth resuming) — and the empty folders above them."""
        created = [(p, stop) for p, stop in self._new_outputs if p.exists()]
        if any(next(p.rglob("*.ckpt"), None) for p, _ in created if p.is_dir()):
            return
        for p, stop in created:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            for parent in p.parents:  # folders made on the way (results/metrics/), if left empty
                if parent == stop or not parent.is_dir() or any(parent.iterdir()):
                    break
                parent.rmdir()

    # LightningCLI runs these in place of trainer.validate / trainer.test.
    def validate(self, verbose: bool = True, **kwargs) -> list[dict]:
        return self._evaluate(self.trainer.validate, "validate", verbose, **kwargs)

    def test(self, verbose: bool = True, **kwargs) -> list[dict]:
        return self._evaluate(self.trainer.test, "test", verbose, **kwargs)

    def _evaluate(self, run, stage: str, verbose: bool, **kwargs) -> list[dict]:
        """Run ``validate`` / ``test`` and print one table of its metrics. Lightning's own table
        has a column per dataloader and, the metrics being logged once per epoch over both
        (position and count), printed each one twice."""
        results = run(verbose=False, **kwargs)
        if verbose and self.trainer.is_global_zero:
            merged = {}
            for per_loader in results:
                merged.update({k.split("/dataloader_idx_")[0]: v for k, v in per_loader.items()})
            table = Table(
                f"{stage} metric",
                "value",
                title=f"{stage}: {kwargs.get('ckpt_path') or 'the model as configured'}",
            )
            for name, value in merged.items():
                table.add_row(name, f"{float(value):.4f}")
            print_table(table)
        return results

    def instantiate_trainer(self, **kwargs):
        run = self._run
        # (the learning rate is logged by the module, in the training rows: lr-AdamW)
        extra = [ResumeState(), RunManifest(config=run["config"]), PredictionsWriter(), StepZeroValidation()]
        # Lightning's idiom for "keep the last K": monitor the step counter, keep the top K.
        step_ckpt = StepCheckpoint(
            dirpath=str(run["root"]),
            filename="step{step}",
            monitor="step",
            mode="max",
            save_top_k=run["keep"],
            every_n_train_steps=run["every"],
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        extra.append(step_ckpt)
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *extra]
        kwargs["plugins"] = [*(kwargs.get("plugins") or []), AtomicCheckpointIO()]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as e:
            # Lightning validates its arguments here (devices, precision, strategy, …), raising
            # these three types; nothing else runs inside Trainer(...) that could raise them.
            raise SpellxferError(f"trainer configuration: {_one_line(e)}") from None
        # `trainer.checkpoint_callback` is the first ModelCheckpoint, and its best_model_path is
        # what best_adapter/ exports and `--ckpt_path best` loads: it must be the one watching the
        # val metric (--checkpoint.*), not this one (whose "best" is the latest step).
        trainer.callbacks.remove(step_ckpt)
        trainer.callbacks.append(step_ckpt)
        trainer.callbacks = [
            cb for cb in trainer.callbacks if not (isinstance(cb, OptionalEarlyStopping) and not cb.enabled)
        ]
        return trainer


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _where_set(key: str, argv: list[str]) -> str | None:
    """Where dotted ``key`` got its value — ``set in FILE`` or ``set by --FLAG`` — from the last
    source to set it on the command line (left to right, as LightningCLI reads it); None when only
    a class default gives it."""
    flag = f"--{key}"
    where = None
    sources = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            sources.append(("--config", argv[i + 1]))
        elif arg.startswith("--config="):
            sources.append(("--config", arg.split("=", 1)[1]))
        elif arg == flag or arg.startswith(flag + "="):
            sources.append(("flag", flag))
    for kind, source in sources:
        if kind == "flag":
            where = f"set by {source}"
            continue
        try:
            node = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            where = f"set in {source}"
    return where


_MISSING = object()


def _parse_error(e: Exception, argv: list[str]) -> SpellxferError:
    """jsonargparse's error, plus the config file it is about (its messages name the key only).

    A YAML file that does not parse, is not a mapping, nests too deeply or holds an integer too
    long to convert is named (with its line where YAML knows it); an unknown key or a value of the
    wrong type gets the file (or flag) that set it.
    """
    message = _one_line(e)
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not isinstance(e, ArgumentError) or message.startswith(
        ("Problems parsing config", "Unexpected config")
    ):
        for f in files:
            if (bad := _unreadable_config(Path(f))) is not None:
                return bad
    if not isinstance(e, ArgumentError):
        return SpellxferError(f"a command-line value: {message}")
    found = re.search(r"""does not accept option '([\w.]+)'|Parser key "([\w.]+)"|Key '([\w.]+)'""", message)
    key = next((g for g in found.groups() if g), None) if found else None
    where = _where_set(key, argv) if key else None
    return SpellxferError(
        f"{message}" + (f" ({where})" if where else "") + f" (see `{argv[0]} --help`)", key=key
    )


def _unreadable_config(path: Path) -> SpellxferError | None:
    """Why ``path`` cannot be a config file, or None if it reads as a YAML mapping."""
    try:
        node = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None  # jsonargparse's own message names a missing file
    except yaml.YAMLError as y:
        mark = getattr(y, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        return SpellxferError(f"{path}{line}: invalid YAML ({getattr(y, 'problem', None) or _one_line(y)})")
    except RecursionError:
        return SpellxferError(f"{path}: nested too deeply to be a config file")
    except ValueError as v:  # Python refuses int() of more than sys.get_int_max_str_digits() digits
        if "integer string conversion" in str(v):
            return SpellxferError(
                f"{path}: holds an integer of more than {sys.get_int_max_str_digits()} digits"
            )
        return SpellxferError(f"{path}: {_one_line(v)}")
    if node is not None and not isinstance(node, dict):
        return SpellxferError(
            f"{path}: a config file must be a mapping of keys (trainer:, model:, …), "
            f"not a {type(node).__name__}"
        )
    return None


class _Parsed(Exception):
    """Carries the parsed config out of ``LightningCLI.__init__``, which would go on to seed and
    instantiate."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config


class _ParseOnly(SpellxferCLI):
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        raise _Parsed(self.config)


def parse_fit_config(argv: list[str]):
    """The config ``python -m spellxfer fit <argv>`` runs with, as fit's own parser resolves it
    (signature defaults, then ``--config`` files and flags in order, ``data.model`` linked), with
    nothing seeded, loaded or written. A parse error is fit's one ``error:`` line naming the key
    and the file or flag that set it; the checks fit makes after parsing (trainer limits, the run
    name, ``--ckpt_path``) are left to the fit itself.
    """
    saved = sys.argv
    sys.argv = [saved[0], *argv]  # SpellxferCLI names the flag or file that set a bad value from it
    try:
        _ParseOnly(
            SpellingLoRAModule,
            SpellingDataModule,
            run=False,
            auto_configure_optimizers=False,
            trainer_defaults={"use_distributed_sampler": False},
            parser_kwargs={"prog": "python -m spellxfer fit", "exit_on_error": False},
        )
    except _Parsed as parsed:
        return parsed.config
    except ArgumentError as e:
        raise _parse_error(e, ["fit", *argv]) from None
    finally:
        sys.argv = saved
    raise AssertionError("unreachable: _ParseOnly stops after the parse")


def run_lightning_cli(argv: list[str]) -> int:
    """Hand ``fit|validate|test|predict …`` to LightningCLI; returns the exit code."""
    saved = sys.argv
    sys.argv = [saved[0], *argv]  # LightningCLI reads sys.argv; `args=` beside it only warns
    try:
        SpellxferCLI(
            SpellingLoRAModule,
            SpellingDataModule,
            # Rich's live bar on a terminal; plain lines every 30 s in a log file (training/progress.py)
            trainer_defaults={"callbacks": [default_progress_bar()], "use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
            # optimizer and schedule are model.* keys (configure_optimizers), not LightningCLI's
            # --optimizer / --lr_scheduler, so there is one way to set them
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "python -m spellxfer", "exit_on_error": False},
        )
    except ArgumentError as e:
        raise _parse_error(e, argv) from None
    except MisconfigurationException as e:
        # Lightning's own "your configuration is wrong" (an unknown monitor key, …), raised mid-run
        raise SpellxferError(f"trainer configuration: {_one_line(e)}") from None
    finally:
        sys.argv = saved
    return 0
