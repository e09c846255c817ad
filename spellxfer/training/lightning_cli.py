"""LightningCLI for ``python -m spellxfer fit|validate|test|predict --config configs/….yaml``.

What it adds to Lightning's own CLI:

- ``--experiment NAME`` names the run. Outputs go to ``checkpoints/<experiment>/`` (checkpoints,
  ``manifest.json``, ``best_adapter/``, W&B files) with training logs in
  ``results/training_logs/<experiment>/`` and a JSONL metrics log in
  ``results/metrics/<experiment>.jsonl``; ``--trainer.default_root_dir DIR`` moves all of them
  under DIR.
- a ``ModelCheckpoint`` (``--checkpoint.*``) and an ``EarlyStopping`` (``--early_stopping.*``)
  watching ``val/position_accuracy`` (generation-scored) by default — the scored checkpoint is
  written right after each validation, as ``best-step{N}.ckpt`` (top k); a second checkpoint
  callback writes ``step{N}.ckpt`` every ``--checkpoint.every_n_train_steps`` steps, keeps the
  last K (``--keep_last_k``) and owns ``last.ckpt``, the resume point;
- atomic checkpoint writes, RNG + in-epoch resume state, the run manifest and the best adapter
  (:mod:`spellxfer.training.checkpointing`);
- loggers that refuse any metric outside the whitelist (:mod:`spellxfer.training.transfer_metrics`):
  CSV/JSONL always, W&B (offline unless credentials are configured; ``WANDB_MODE=disabled``
  turns it off), runs grouped by experiment;
- ``data.model`` follows ``model.model``, and Lightning's distributed sampler is off because the
  DataModule shards its own length-grouped batches.

Trained on spelling, validated on position and count only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from spellxfer.errors import SpellxferError
from spellxfer.models.spelling_model import SpellingLoRAModule
from spellxfer.training.checkpointing import AtomicCheckpointIO, PredictionsWriter, ResumeState, RunManifest
from spellxfer.training.data_loaders import SpellingDataModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Project-wide defaults, loaded before the user's --config files (which override any key). They
# live in the checkout; an installed package without them falls back to the class defaults.
DEFAULT_CONFIGS = [
    str(p)
    for p in (Path(__file__).resolve().parents[2] / "configs" / "training" / f for f in ("optimizer.yaml", "scheduler.yaml"))
    if p.is_file()
]


class SpellxferCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", type=str, default="default",
                            help="Run name: output folders and the W&B group.")  # fmt: skip
        parser.add_argument("--keep_last_k", type=int, default=3,
                            help="Step checkpoints kept (every --checkpoint.every_n_train_steps), "
                                 "besides last.ckpt and the best ones.")  # fmt: skip
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/position_accuracy",  # the seed's choice; any val/ metric works
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 2,
                "checkpoint.filename": "best-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {"early_stopping.monitor": "val/position_accuracy", "early_stopping.mode": "max",
             "early_stopping.patience": 3}  # fmt: skip
        )
        parser.link_arguments("model.model", "data.model")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.keep_last_k < 1:
            raise SpellxferError(f"keep_last_k must be ≥ 1 (it holds the resume point), got {cfg.keep_last_k}")
        experiment, trainer = cfg.experiment, cfg.trainer
        explicit_root = trainer.default_root_dir is not None
        root = Path(trainer.default_root_dir) if explicit_root else Path("checkpoints") / experiment
        ckpt = cfg.get("ckpt_path")
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and not Path(ckpt).is_file():
            raise SpellxferError(f"--ckpt_path {ckpt}: no such checkpoint file")
        last = Path(cfg.checkpoint.dirpath or root) / "last.ckpt"
        if ckpt == "last" and not last.is_file():
            # Lightning would warn and train from scratch; a resume that silently restarts is worse.
            raise SpellxferError(f"--ckpt_path last: no checkpoint {last} to resume from; "
                                 "drop --ckpt_path to start a fresh run")  # fmt: skip
        if cfg.data.build_profile is None:
            # Without a build profile prepare_data only checks the files: fail before the Trainer
            # prints its banner and before any model loads.
            SpellingDataModule(cfg.data.data_dir, cfg.model.model, build_profile=None).prepare_data()
        trainer.default_root_dir = str(root)
        cfg.checkpoint.dirpath = cfg.checkpoint.dirpath or str(root)
        if trainer.logger is None or trainer.logger is True:
            log_dir = root / "training_logs" if explicit_root else Path("results/training_logs") / experiment
            jsonl = root / "metrics.jsonl" if explicit_root else Path("results/metrics") / f"{experiment}.jsonl"
            loggers = [{"class_path": "spellxfer.training.transfer_metrics.WhitelistedCSVLogger",
                        "init_args": {"save_dir": str(log_dir), "name": "", "version": "",
                                      "jsonl_path": str(jsonl)}}]  # fmt: skip
            if os.environ.get("WANDB_MODE") != "disabled" and importlib.util.find_spec("wandb"):
                loggers.append({"class_path": "spellxfer.training.transfer_metrics.WhitelistedWandbLogger",
                                "init_args": {"project": "spellxfer", "group": experiment, "name": experiment,
                                              "save_dir": str(root)}})  # fmt: skip
            trainer.logger = loggers
        # Two checkpoint callbacks with one job each. The scored one (--checkpoint.*) saves right
        # after each validation, so a checkpoint is ranked by its own step's score (saving every N
        # training steps would rank it by the previous validation's). The step one saves every
        # N steps, keeps the last K and owns last.ckpt, the resume point.
        every = cfg.checkpoint.every_n_train_steps
        cfg.checkpoint.every_n_train_steps = None
        cfg.checkpoint.save_last = False
        self._run = {"root": root, "keep": cfg.keep_last_k, "every": every, "config": cfg.as_dict()}

    def instantiate_trainer(self, **kwargs):
        run = self._run
        extra = [ResumeState(), RunManifest(config=run["config"]), PredictionsWriter()]
        # Lightning's idiom for "keep the last K": monitor the step counter, keep the top K.
        step_ckpt = ModelCheckpoint(dirpath=str(run["root"]), filename="step{step}", monitor="step", mode="max",
                                    save_top_k=run["keep"], every_n_train_steps=run["every"], save_last=True,
                                    auto_insert_metric_name=False)  # fmt: skip
        extra.append(step_ckpt)
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *extra]
        kwargs["plugins"] = [*(kwargs.get("plugins") or []), AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        # `trainer.checkpoint_callback` is the first ModelCheckpoint, and its best_model_path is
        # what best_adapter/ exports and `--ckpt_path best` loads: it must be the one watching the
        # val metric (--checkpoint.*), not this one (whose "best" is the latest step).
        trainer.callbacks.remove(step_ckpt)
        trainer.callbacks.append(step_ckpt)
        return trainer


def run_lightning_cli(argv: list[str]) -> int:
    """Hand ``fit|validate|test|predict …`` to LightningCLI; returns the exit code."""
    # The DataModule restores its in-epoch position itself (state_dict / load_state_dict), which
    # Lightning's generic check for a resumable *dataloader* does not see.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    # "Seed set to N" (an info line; the seed is in the saved config) would otherwise come before
    # the one `error: …` line of a config mistake caught after seeding.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    saved = sys.argv
    sys.argv = [saved[0], *argv]  # LightningCLI reads sys.argv; `args=` beside it only warns
    try:
        SpellxferCLI(
            SpellingLoRAModule,
            SpellingDataModule,
            trainer_defaults={"callbacks": [RichProgressBar()], "use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
            # optimizer and schedule are model.* keys (configure_optimizers), not LightningCLI's
            # --optimizer / --lr_scheduler, so there is one way to set them
            auto_configure_optimizers=False,
            parser_kwargs={
                "prog": "python -m spellxfer",
                "exit_on_error": False,
                **{cmd: {"default_config_files": DEFAULT_CONFIGS} for cmd in SUBCOMMANDS},
            },
        )
    finally:
        sys.argv = saved
    return 0
