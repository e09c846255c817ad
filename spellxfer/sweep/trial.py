"""One sweep trial: a real ``fit`` in its own process, pruned from its metrics log, then ``evaluate``.

Lifecycle of :func:`run_trial` (Optuna calls it with a fresh or a retried trial):

1. draw the hyperparameters (a retry gets the ones of the trial it replaces);
2. prepare ``<sweep>/trial-NNNN/``: a retry of a trial that left a ``last.ckpt`` links that
   trial's ``checkpoints/`` and copies its ``metrics.jsonl``, so the fit resumes where the killed
   one stopped (same checkpoint directory, so Lightning restores its best-k bookkeeping too);
3. ``python -m spellxfer fit --config <base> --…overrides`` as a child process (a crash or an
   out-of-memory kill fails the trial, not the sweep), output in ``fit.log``; the parent tails
   ``metrics.jsonl``, reports each validation's objective to Optuna and kills the child when the
   pruner says so;
4. the best checkpoint's adapter (``adapter/``) is scored by ``python -m spellxfer evaluate`` on
   the test files for each decoding, paired against the base model (``eval/<decoding>/``).

``trial.json`` records the state at each step. Trained on spelling, evaluated on position and
count only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from spellxfer.core.outputs import atomic_file
from spellxfer.sweep.space import SweepSpace, flags
from spellxfer.training.checkpointing import load_checkpoint
from spellxfer.training.loggers import steps_trained


class TrialFailed(Exception):
    """The trial's fit or evaluation exited with an error; the message is its one-line reason."""


class Interrupted(Exception):
    """The sweep was asked to stop (Ctrl-C, SIGTERM); the trial is retried on the next run."""


class OverBudget(Exception):
    """Another worker started the last trial of the budget at the same moment as this one."""


@dataclass
class SweepContext:
    """What every worker of one sweep shares."""

    space: SweepSpace
    study: str
    sweep_dir: Path  # <results>/sweeps/<study>
    model: str
    test_files: list[Path]
    wandb: bool  # add the W&B logger to each fit (off when WANDB_MODE=disabled or wandb is missing)
    over_budget: Callable[[optuna.Trial], bool]
    # the progress display, called as (worker, trial=, phase=, step=, total=, value=, params=)
    progress: Callable[..., None]
    stop: threading.Event = field(default_factory=threading.Event)
    gpus: list[str] = field(default_factory=list)

    def trial_dir(self, number: int) -> Path:
        return self.sweep_dir / f"trial-{number:04d}"

    def base_dir(self, decoding: str) -> Path:
        return self.sweep_dir / "base" / decoding

    def env(self, worker: int) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.gpus:  # one GPU per worker, round robin: W > GPUs puts several small trials on one GPU
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[worker % len(self.gpus)]
        return env


def link_replicates(trial: optuna.Trial, space: SweepSpace, params: dict) -> tuple[int, int, int]:
    """``(config_id, replicate, seed)`` of a trial, queueing the other seeds of a new configuration.

    A trial the sampler drew is replicate 0 of a new configuration whose id is its own number; it
    enqueues ``replicates - 1`` trials with the same hyperparameters and replicate 1, 2, … in
    their user attributes, which the workers run next (queued trials go first). A queued
    replicate, and a retry (which inherits the user attributes), keeps the ids it has.
    """
    attrs = trial.user_attrs
    if attrs.get("config_id") is None:
        trial.set_user_attr("config_id", trial.number)
        trial.set_user_attr("replicate", 0)
    config_id, replicate = int(trial.user_attrs["config_id"]), int(trial.user_attrs["replicate"])
    if replicate == 0 and space.replicates > 1 and not attrs.get("replicates_queued"):
        for k in range(1, space.replicates):
            trial.study.enqueue_trial(
                params, user_attrs={"config_id": config_id, "replicate": k}, skip_if_exists=False
            )
        trial.set_user_attr("replicates_queued", True)  # a retry of this trial must not queue them again
    return config_id, replicate, space.replicate_seed(replicate)


def run_trial(trial: optuna.Trial, ctx: SweepContext, worker: int) -> float:
    """Fit, prune, evaluate one trial; returns the best validation value of the objective."""
    params, run, resume, record = begin_trial(trial, ctx, worker)
    seed = record["seed"]
    start, status, error = time.time(), "failed", None
    try:
        env = ctx.env(worker)
        objective, checkpoint = fit_trial(trial, ctx, worker, run, params, resume, env, seed)
        record.update(objective=objective, checkpoint=str(checkpoint))
        trial.set_user_attr("checkpoint", study_relative(ctx, checkpoint))
        for decoding in ctx.space.decodings:
            ctx.progress(worker, trial=trial.number, phase=f"evaluate ({decoding})")
            evaluate_trial(ctx, run, decoding, env)
        record_outcome(trial, ctx, run)
        status = "complete"
        return objective
    except optuna.TrialPruned:
        status = "pruned"
        raise
    except Interrupted:
        trial.set_user_attr("interrupted", True)
        error = "interrupted (Ctrl-C or SIGTERM); retried on the next run"
        raise
    except TrialFailed as e:
        error = str(e)
        raise
    except Exception as e:  # a bug in the sweep itself: the trial fails with it, the sweep goes on
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        if error:
            trial.set_user_attr("error", error)
        write_trial_json(
            run, record | {"status": status, "error": error, "duration_s": round(time.time() - start, 1)}
        )


def begin_trial(
    trial: optuna.Trial, ctx: SweepContext, worker: int | str
) -> tuple[dict, Path, Path | None, dict]:
    """Draw the trial's hyperparameters, make its directory and write its first ``trial.json``;
    returns (params, run dir, ``last.ckpt`` to resume from or None, the record).

    Raises:
        OverBudget: another worker took the budget's last trial at the same moment.
    """
    params = ctx.space.suggest(trial)
    if ctx.over_budget(trial):
        trial.set_user_attr("over_budget", True)
        raise OverBudget(f"trial {trial.number} started after another worker took the budget's last trial")
    config_id, replicate, seed = link_replicates(trial, ctx.space, params)
    for key in ("error", "interrupted", "checkpoint"):  # a retry inherits the user attrs of its predecessor
        if trial.user_attrs.get(key) is not None:
            trial.set_user_attr(key, None)
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    run = ctx.trial_dir(trial.number)
    trial.set_user_attr("run_dir", study_relative(ctx, run))
    resume = prepare_run_dir(run, ctx.trial_dir(history[-1]) if history else None)
    record = {
        "study": ctx.study,
        "number": trial.number,
        "status": "running",
        "params": params,
        "config_id": config_id,
        "replicate": replicate,
        "seed": seed,
        "objective_name": ctx.space.objective,
        "objective": None,
        "duration_s": None,
        "model": ctx.model,
        "checkpoint": None,
        "retry_of": history[-1] if history else None,
        "resumed_from": str(resume) if resume else None,
        "worker": f"{socket.gethostname()}:{os.getpid()}/{worker}",
    }
    write_trial_json(run, record)
    return params, run, resume, record


def study_relative(ctx: SweepContext, path: Path) -> str:
    """``path`` as the study stores it: relative to the study directory (``trial-0003/…``), so a
    study database that is copied or committed with its directory still finds its files."""
    try:
        return Path(path).resolve().relative_to(ctx.sweep_dir.resolve()).as_posix()
    except ValueError:  # not inside the study directory: kept as given
        return str(path)


def record_outcome(trial: optuna.Trial, ctx: SweepContext, run: Path) -> None:
    """What a finished trial did, in the study itself (beside trial.json and the CSV):
    :func:`outcome_attrs` of its directory."""
    for key, value in outcome_attrs(run, ctx.space.decodings).items():
        trial.set_user_attr(key, value)


def outcome_attrs(run: Path, decodings) -> dict:
    """A finished trial's outcome as the study records it, read from its directory: the optimizer
    steps it trained (early stopping ends some before max_steps) and its test scores per decoding
    — position and count accuracies and the transfer score — from ``eval/<decoding>/``."""
    attrs = {"steps_trained": steps_trained(run / "metrics.jsonl")}
    for decoding in decodings:
        try:
            metrics = json.loads((run / "eval" / decoding / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        scores = {k: metrics.get(k) for k in ("position_accuracy", "count_accuracy", "transfer_score")}
        attrs[f"test_{decoding}"] = {k: v for k, v in scores.items() if isinstance(v, int | float)}
    return attrs


def prepare_run_dir(run: Path, previous: Path | None) -> Path | None:
    """Create the trial's directory; returns the ``last.ckpt`` to resume from, if any."""
    run.mkdir(parents=True, exist_ok=True)
    ckpts = run / "checkpoints"
    if previous is not None and not ckpts.exists() and (previous / "checkpoints" / "last.ckpt").is_file():
        # The same directory, not a copy: Lightning keeps its best-k bookkeeping only when the
        # checkpoint directory of the resumed run is the one it was saved from.
        ckpts.symlink_to(os.path.relpath((previous / "checkpoints").resolve(), run), target_is_directory=True)
        if (previous / "metrics.jsonl").is_file():
            shutil.copyfile(previous / "metrics.jsonl", run / "metrics.jsonl")
    last = ckpts / "last.ckpt"
    return last if last.is_file() else None


def fit_argv(
    ctx: SweepContext, run: Path, params: dict, resume: Path | None, number: int, seed: int | None = None
) -> list[str]:
    """``python -m spellxfer fit --config <base> --…`` with this trial's values."""
    space = ctx.space
    loggers: list[dict] = [
        {
            "class_path": "spellxfer.training.loggers.WhitelistedCSVLogger",
            "init_args": {
                "save_dir": str(run / "training_logs"),
                "name": "",
                "version": "",
                "jsonl_path": str(run / "metrics.jsonl"),
            },
        }
    ]
    if ctx.wandb:  # one W&B run per trial, grouped by study
        loggers.append(
            {
                "class_path": "spellxfer.training.loggers.WhitelistedWandbLogger",
                "init_args": {
                    "project": "spellxfer",
                    "group": ctx.study,
                    "job_type": "sweep",
                    "name": f"{ctx.study}-trial-{number:04d}",
                    "save_dir": str(run),
                },
            }
        )
    argv = [sys.executable, "-m", "spellxfer", "fit", *space.fit_args()]
    argv += flags({p.flag: params[p.name] for p in space.parameters})
    # replicate 0 of a one-seed space keeps the base config's seed (whatever form it takes there),
    # exactly as without replicates; any other replicate (--replicate_configs) gets its own
    if seed is not None and (space.replicates > 1 or seed != space.base_seed):
        argv += ["--seed_everything", str(seed)]
    if (interval := space.val_check_interval(params)) is not None:
        argv += ["--trainer.val_check_interval", str(interval)]
    argv += [
        "--experiment",
        ctx.study,
        "--trainer.default_root_dir",
        str(run / "checkpoints"),
        "--trainer.logger",
        json.dumps(loggers),
        # the best checkpoint, early stopping and the pruner all follow the sweep's objective
        "--checkpoint.monitor",
        space.objective,
        "--checkpoint.mode",
        "max",
        "--checkpoint.filename",
        "best-step{step}",
        # the resume point is written after each validation, not every N steps: a step
        # checkpoint taken just before a validation resumes past it (Lightning fast-forwards
        # the interrupted validation), and a trial killed there would lose that score
        "--checkpoint.every_n_train_steps",
        "null",
        "--early_stopping.monitor",
        space.objective,
        "--early_stopping.mode",
        "max",
    ]
    if resume is not None:
        argv += ["--ckpt_path", str(resume)]
    return argv


def fit_trial(
    trial,
    ctx: SweepContext,
    worker: int,
    run: Path,
    params: dict,
    resume: Path | None,
    env,
    seed: int | None = None,
) -> tuple[float, Path]:
    """Run the fit child, reporting each validation to Optuna; returns (best objective, its checkpoint)."""
    objective, max_steps = ctx.space.objective, params.get("max_steps")
    ctx.progress(worker, trial=trial.number, phase="fit", step=0, total=max_steps, params=params)
    metrics, offset, reported = run / "metrics.jsonl", None, set()

    def watch(finished: bool) -> None:
        nonlocal offset
        offset, rows = read_rows(metrics, offset)
        for row in rows:
            # optimizer steps done: every row of a fit says so (global_step; 0 for the base
            # model's validation); older logs numbered rows without it one less
            step = int(row["global_step"]) if "global_step" in row else int(row["step"]) + 1
            ctx.progress(worker, step=step)
            if objective not in row or step in reported:  # a resumed fit may log a step again
                continue
            reported.add(step)
            trial.report(float(row[objective]), step)
            ctx.progress(worker, value=float(row[objective]))
            if not finished and trial.should_prune():
                raise optuna.TrialPruned(f"{objective} {row[objective]:.3f} at step {step}")

    try:
        rc = run_child(
            fit_argv(ctx, run, params, resume, trial.number, seed), run / "fit.log", env, ctx, watch
        )
    finally:
        if (run / "training_logs" / "config.yaml").is_file():  # the exact config LightningCLI ran
            shutil.copyfile(run / "training_logs" / "config.yaml", run / "fit.yaml")
    if rc != 0:
        raise TrialFailed(last_error(run / "fit.log", rc))
    best = best_checkpoint(run / "checkpoints", objective)
    if best is None:
        raise TrialFailed(
            f"no validation ran, so there is no {objective} and no best checkpoint "
            "(is trainer.max_steps below trainer.val_check_interval?)"
        )
    # fit exports the best checkpoint's adapter into its root; the contract keeps it at adapter/
    adapter = run / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    os.replace(run / "checkpoints" / "best_adapter", adapter)
    return best


def run_child(argv, log_path: Path, env, ctx: SweepContext, watch=None) -> int:
    """Run ``argv`` with its output appended to ``log_path``; ``watch()`` is called every 0.5 s and
    may raise to stop the child (which is then killed). Returns the exit code."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        # Same process group as the sweep: killing the sweep's group (a preempted session, Ctrl-C)
        # takes its children with it, so no orphaned fit keeps writing into a trial directory.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        try:
            while True:
                rc = proc.poll()
                if watch is not None:
                    watch(finished=rc is not None)
                if rc is not None:
                    if rc != 0 and ctx.stop.is_set():  # Ctrl-C reached the child first: still an interruption
                        raise Interrupted()
                    return rc
                if ctx.stop.is_set():
                    raise Interrupted()
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


def read_rows(path: Path, offset: tuple[int, int] | None) -> tuple[tuple[int, int] | None, list[dict]]:
    """Complete JSON lines appended to ``path`` since ``offset`` (the file's inode and a byte
    position; None: from the start); returns (new offset, rows).

    A resumed fit rewrites the file without the rows logged past its resume point (a new file,
    renamed into place): a new inode means reading it again from the start.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return offset, []
    with f:
        inode = os.fstat(f.fileno()).st_ino
        start = offset[1] if offset is not None and offset[0] == inode else 0
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return (inode, start + end), rows


def best_checkpoint(ckpt_dir: Path, objective: str) -> tuple[float, Path] | None:
    """(best objective value, its checkpoint) from the newest scored checkpoint's callback state."""
    newest = None
    for path in ckpt_dir.glob("best-step*.ckpt"):
        ckpt = load_checkpoint(path, mmap=True)
        if newest is None or ckpt["global_step"] > newest[0]:
            newest = (ckpt["global_step"], ckpt)
    if newest is None:
        return None
    for state in newest[1]["callbacks"].values():
        if isinstance(state, dict) and state.get("monitor") == objective and state.get("best_model_path"):
            score = state.get("best_model_score")
            return float(score), ckpt_dir / Path(state["best_model_path"]).name
    return None


def evaluation_args(ctx: SweepContext, run: Path, decoding: str) -> dict:
    """The ``evaluate`` arguments that score a trial's adapter on the test files with the space's
    ``evaluation:`` flags, paired against the base model: the unpacked sweep passes them to an
    ``evaluate`` process, a pack to the same function in its own process."""
    return {
        "model": ctx.model,
        "adapter": str(run / "adapter"),
        "questions": [str(p) for p in ctx.test_files],
        "decoding": decoding,
        **{k: v for k, v in ctx.space.evaluation.items() if v is not None},
        "out": str(run / "eval" / decoding),
        "overwrite": True,
        "compare_to": str(ctx.base_dir(decoding)),
    }


def evaluate_trial(ctx: SweepContext, run: Path, decoding: str, env) -> None:
    """``evaluate`` the trial's adapter on the test files, paired against the base model."""
    argv = [sys.executable, "-m", "spellxfer", "evaluate"]
    for key, value in evaluation_args(ctx, run, decoding).items():
        if isinstance(value, bool):
            value = str(value).lower()  # jsonargparse's true / false
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    rc = run_child(argv, run / "eval.log", env, ctx)
    if rc != 0:
        raise TrialFailed(f"evaluate ({decoding}): {last_error(run / 'eval.log', rc)}")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b")


def last_error(log: Path, rc: int) -> str:
    """The child's own one-line error (``error: …``), else the last exception line, else the exit code."""
    lines = [
        _ANSI.sub("", ln).strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()
    ]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
        if _EXCEPTION.match(line):
            return line
        if line.startswith("$ "):  # the start of this attempt: nothing above belongs to it
            break
    if rc < 0:
        why = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"killed by signal {signal.Signals(-rc).name}{why}"
    return f"exited with code {rc}; see {log}"


def write_trial_json(run: Path, record: dict) -> None:
    with atomic_file(run / "trial.json") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")
