"""``python -m spellxfer sweep``: hyperparameter search with Optuna over real ``fit`` runs.

Lifecycle: validate the space file → open (or continue) the study in its storage → build the
data and evaluate the base model once per study → W workers, each looping "ask a trial → run it
(:mod:`spellxfer.sweep.trial`) → tell → rewrite the CSV" → summary table.

- **Resumable.** The study lives in an RDB storage (SQLite under ``<results>/sweeps/`` by default,
  any SQLAlchemy URL such as PostgreSQL for many machines). Each running trial sends a heartbeat;
  a trial whose worker died (preempted session, SIGKILL) goes stale after 2 heartbeats, is marked
  failed, and Optuna's ``RetryHeartbeatStaleTrialCallback`` queues a retry with the same
  hyperparameters, which resumes from the dead trial's ``last.ckpt``. Running the same command
  again continues the study until ``--trials`` trials have finished.
- **Failure-tolerant.** A trial whose fit or evaluation fails (bad value, crash, out of memory) is
  recorded as failed with its error line; the sweep goes on.
- **Parallel.** ``--workers W`` threads share the storage, each running its trials as child
  processes pinned to one GPU (round robin over the visible GPUs).
- **Packed.** ``--pack K`` (or the space file's ``pack:``): each worker trains up to K trials at
  once in this process on one frozen base model, every step one forward and backward for all of
  them, each row through its own trial's LoRA (:mod:`spellxfer.sweep.pack`); the trial
  directories are the same as unpacked.
- **Tracked.** Each trial's fit logs to W&B (project ``spellxfer``, group = study) through the
  whitelisted logger, offline without credentials, off with ``WANDB_MODE=disabled``.

Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import check_run_name
from spellxfer.core.tables import print_table

MAX_RETRIES = 10  # retries of one trial whose worker keeps dying (a preemption loop, not a bug in the trial)
INTERRUPT_GRACE_S = 30
"""Seconds Ctrl-C or SIGTERM waits for the workers to stop their children and record their trials
as interrupted (a second Ctrl-C stops at once)."""


def sweep(
    space: str,
    study: str,
    sampler: Literal["grid", "random", "tpe"] | None = None,
    trials: int | None = None,
    storage: str | None = None,
    workers: int = 1,
    pruner: Literal["none", "median", "hyperband"] | None = None,
    results_dir: str = "results",
    heartbeat_s: int = 30,
    pack: int | None = None,
    pack_kernel: Literal["auto", "loop", "concat", "grouped"] = "auto",
    pack_window: bool = False,
    pack_evaluation: Literal["exact", "packed"] = "exact",
    pack_scorers: int = 0,
    replicate_configs: str | None = None,
    replicates: int | None = None,
    from_study: str | None = None,
    hours: float | None = None,
) -> int:
    """Search hyperparameters with Optuna over real `fit` runs (resumable, parallel, failure-tolerant).

    Each trial is a `fit` in its own process, then `evaluate` of its best adapter on the position /
    count test sets against the base model. Run the same command again to continue after a
    preemption; --workers, or the same command on several machines with a PostgreSQL --storage, to
    run trials in parallel. Writes RESULTS/sweeps/STUDY/trial-NNNN/ and RESULTS/metrics/STUDY.csv.
    Trained on spelling, evaluated on position and count only.

    Args:
        space: Space file (configs/sweeps/NAME.yaml): base fit config, hyperparameters, objective, budget.
        study: Study name; the same name continues the same study.
        sampler: grid, random or tpe (default: the space file's sampler).
        trials: Configurations to finish (complete, pruned or failed; a retried trial counts once),
            each trained with the space file's `replicates` seeds; default: the space file's
            budget.trials.
        storage: Optuna storage URL, e.g. postgresql+psycopg://user:pw@host/db (the postgres extra)
            (default: sqlite:///RESULTS/sweeps/STUDY.db).
        workers: Trials run at once by this process (one GPU each, round robin).
        pruner: none, median or hyperband (default: the space file's pruner).
        results_dir: Root of the outputs.
        heartbeat_s: Seconds between a running trial's heartbeats; a trial silent for twice
            that long is taken as dead and retried.
        pack: Trials each worker trains at once in this process, sharing one base model on its
            device (default: the space file's pack; none: each trial is its own fit process).
        pack_kernel: How packed training computes each row's LoRA update: loop (per trial),
            concat (stacked adapters, two products per layer), grouped (torch._grouped_mm);
            auto: loop on a CPU, concat on CUDA (docs/performance.md).
        pack_window: Each packed step trains a whole accumulation window of every trial (one
            optimizer step) instead of one micro-batch, so trials of any accumulation keep pace.
        pack_evaluation: How packed trials get their test scores: exact (each finished trial's
            adapter through `evaluate`'s own code, in this process: the numbers of the unpacked
            sweep and of the base model's evaluation) or packed (several trials' prompts mixed in
            one generation pass: faster on small test sets, but its numerics are not the base's,
            so a trial's paired difference from the base includes that; docs/training.md).
        pack_scorers: With --pack_evaluation exact: 0 scores each finished trial in the pack's own
            process while its pack-mates wait; N > 0 scores up to N finished trials at once, each
            by the unpacked sweep's `evaluate` process, while the pack trains on (the same
            numbers; each process loads its own copy of the base model: for small models).
        replicate_configs: More seeds of chosen configurations: auto:K (the best validation
            objective plus K-1 others spread over its range) or configuration ids (0,7,12); queues
            the replicates 0..N-1 (--replicates) each lacks, runs only those, and ends.
        replicates: Seeds per chosen configuration with --replicate_configs (replicate k trains
            with seed_everything = base seed + k; 0 is the base seed).
        from_study: With --replicate_configs: take the configurations (ids, params, objectives)
            from this study of the same storage (e.g. the spelling study, for the control arm).
        hours: Stop starting trials after this many hours, running ones finish (default: the
            space file's budget.hours).
    """
    import optuna  # heavy: `sweep --help` imports this module

    from spellxfer.sweep.results import summary_table, write_csv  # optuna: not for `sweep --help`
    from spellxfer.sweep.space import load_space, make_pruner, make_sampler  # optuna: not for `sweep --help`
    from spellxfer.sweep.trial import SweepContext, run_trial  # optuna: not for `sweep --help`

    spec = load_space(space)
    check_run_name(study, "--study")
    for name, value in (
        ("trials", trials),
        ("workers", workers),
        ("heartbeat_s", heartbeat_s),
        ("pack", pack),
        ("replicates", replicates),
    ):
        if value is not None and value < 1:
            raise SpellxferError(f"--{name} must be ≥ 1, got {value}")
    if hours is not None and not hours > 0:
        raise SpellxferError(f"--hours must be a positive number of hours, got {hours}")
    if replicate_configs is None and (replicates is not None or from_study is not None):
        option = "--replicates" if replicates is not None else "--from_study"
        raise SpellxferError(f"{option} needs --replicate_configs (auto:K or configuration ids)")
    if replicate_configs is not None and replicates is None:
        raise SpellxferError("--replicate_configs needs --replicates N (seeds per chosen configuration)")
    if from_study is not None:
        check_run_name(from_study, "--from_study")
        if from_study == study:
            from_study = None  # its own configurations: the plain --replicate_configs
    sampler = sampler or spec.sampler
    spec.check_sampler(sampler)
    pruner = pruner or spec.pruner
    pack = pack or spec.pack
    if pack_evaluation not in ("exact", "packed"):
        raise SpellxferError(f"--pack_evaluation must be exact or packed, got {pack_evaluation!r}")
    if pack_scorers < 0:
        raise SpellxferError(f"--pack_scorers must be ≥ 0, got {pack_scorers}")
    if pack_scorers and pack_evaluation != "exact":
        raise SpellxferError("--pack_scorers needs --pack_evaluation exact (packed scoring runs in the pack)")
    if pack_kernel not in ("auto", "loop", "concat", "grouped"):
        raise SpellxferError(f"--pack_kernel must be auto, loop, concat or grouped, got {pack_kernel!r}")
    n_trials = trials or spec.trials
    if sampler == "grid":
        n_trials = min(n_trials, spec.grid_size())  # the grid has no more points to give
    model, data = base_settings(spec)
    if pack:
        if spec.fit.model.backend == "unsloth":
            raise SpellxferError(
                f"--pack: {spec.base} sets model.backend unsloth, which patches a model for one "
                f"adapter; packed trials share an hf model: add `model.backend: hf` under fixed: "
                f"in {spec.path}"
            )
        scoring = spec.fit.model.scoring  # the base config's, with fixed: applied (fit's parser)
        if scoring != "generation":
            raise SpellxferError(
                f"--pack: model.scoring {scoring} is not supported in packed trials (their validation "
                f"scores by generation only); remove it from {spec.base} / fixed: in {spec.path}, "
                "or run this sweep without --pack"
            )

    results = Path(results_dir)
    sweep_dir = results / "sweeps" / study
    url = storage_url(storage) if storage else f"sqlite:///{(results / 'sweeps' / f'{study}.db').resolve()}"
    if storage is None:
        (results / "sweeps").mkdir(parents=True, exist_ok=True)  # where the default SQLite file lives
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happened
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    main_study = open_study(
        url, study, spec.objective, heartbeat_s, make_sampler(spec, sampler), make_pruner(pruner)
    )
    record_study_settings(main_study, spec, sampler, pruner, n_trials)
    console = Console()
    queued = None
    if replicate_configs is not None:
        queued = queue_replicates(
            main_study, spec, replicate_configs, replicates, from_study, storage, results, sweep_dir, console
        )
        n_trials = 0  # no new configuration: run the queued replicates, then end
    sweep_dir.mkdir(parents=True, exist_ok=True)  # only once the study opened: a bad --storage leaves nothing

    test_files = prepare_data_and_base(spec, model, data, sweep_dir, console)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    overall = progress.add_task(
        f"study {study} ({sampler}, {pruner} pruner): trials finished",
        total=n_trials * spec.replicates if queued is None else queued,
    )
    worker_tasks = [progress.add_task(f"  worker {i}: starting", total=None) for i in range(workers)]
    shown: dict[int, dict] = {i: {} for i in range(workers)}

    def show(worker: int, **fields) -> None:
        s = shown[worker]
        if "trial" in fields and fields["trial"] != s.get("trial"):
            s.clear()
        s.update(fields)
        params = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.get("params", {}).items()
        )
        value = f" {spec.objective} {s['value']:.3f}" if "value" in s else ""
        desc = f"  worker {worker}: trial {s.get('trial', '-')} {s.get('phase', '')}{value} {params}"
        progress.update(
            worker_tasks[worker], description=desc, completed=s.get("step", 0), total=s.get("total")
        )

    ctx = SweepContext(
        space=spec,
        study=study,
        sweep_dir=sweep_dir,
        model=model,
        test_files=test_files,
        wandb=wandb_enabled(),
        # with --replicate_configs only queued trials run (they carry a config_id; a new draw has none)
        over_budget=(
            (lambda t: over_budget(t.study, t.number, n_trials))
            if queued is None
            else (lambda t: t.user_attrs.get("config_id") is None)
        ),
        progress=show,
        gpus=visible_gpus(),
    )
    csv_path = results / "metrics" / f"{study}.csv"
    csv_lock = threading.Lock()

    def after_trial(st, frozen) -> None:
        if frozen.user_attrs.get("interrupted"):
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(st, frozen)
        if not frozen.user_attrs.get("over_budget"):
            state = {
                "COMPLETE": f"complete: {spec.objective} {frozen.value:.3f}"
                if frozen.value is not None
                else "",
                "PRUNED": "pruned",
                "FAIL": f"failed: {frozen.user_attrs.get('error')}",
            }[frozen.state.name]
            console.print(
                f"trial {frozen.number} {state} ({', '.join(f'{k}={v}' for k, v in frozen.params.items())})",
                soft_wrap=True,
                highlight=False,
            )
        with csv_lock:
            rows = write_csv(st, ctx, csv_path)
        progress.update(
            overall, completed=sum(r["status"] != "running" and r["retried_as"] is None for r in rows)
        )

    hours = hours or spec.hours
    # trials start before the deadline only; running ones finish (a pack keeps stepping its own)
    deadline = time.monotonic() + hours * 3600 if hours else None
    errors: list[BaseException] = []
    kernel = pack_kernel if pack_kernel != "auto" else ("concat" if ctx.gpus else "loop")

    def work_packed(index: int) -> None:
        from spellxfer.sweep.pack import run_pack  # torch: only packed workers train in this process

        try:
            st = open_study(
                url, study, spec.objective, heartbeat_s, make_sampler(spec, sampler), make_pruner(pruner)
            )
            run_pack(
                ctx, st, index, pack, n_trials, after_trial, deadline, heartbeat_s, kernel, pack_window,
                pack_evaluation, pack_scorers,
            )
        except BaseException as e:  # a bug: stop everyone and re-raise it in the main thread
            errors.append(e)
            ctx.stop.set()

    def work(index: int) -> None:
        try:
            st = open_study(
                url, study, spec.objective, heartbeat_s, make_sampler(spec, sampler), make_pruner(pruner)
            )
            while not ctx.stop.is_set() and (deadline is None or time.monotonic() < deadline):
                optuna.storages.fail_stale_trials(st)
                step = plan(st, n_trials)
                if step == "done":
                    break
                if step == "wait":  # another worker's trial is running; if it dies, its retry is ours
                    show(index, phase="waiting for the other workers' trials")
                    ctx.stop.wait(min(heartbeat_s, 5))
                    continue
                st.optimize(
                    lambda t: run_trial(t, ctx, index),
                    n_trials=1,
                    catch=(Exception,),
                    callbacks=[after_trial],
                )
            show(index, trial="-", phase="done")
        except BaseException as e:  # a bug: stop everyone and re-raise it in the main thread
            errors.append(e)
            ctx.stop.set()

    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # preemption usually starts with SIGTERM
    target = work_packed if pack else work
    # Each worker sets its event as its last act, and the main thread waits on the events, not on
    # Thread.join: a join that Ctrl-C interrupts can leave a running thread marked stopped (seen on
    # Python 3.11), and the process then exited while its workers were still recording their
    # interrupted trials, which stayed `running` until their heartbeats went stale.
    finished = [threading.Event() for _ in range(workers)]

    def worker(index: int) -> None:
        try:
            target(index)
        finally:
            finished[index].set()

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"sweep-worker-{i}", daemon=True)
        for i in range(workers)
    ]
    try:
        with progress:
            with csv_lock:
                write_csv(main_study, ctx, csv_path)
            for t in threads:
                t.start()
            try:
                for done in finished:
                    done.wait()  # Ctrl-C interrupts the wait (a lock acquire, on POSIX)
            except KeyboardInterrupt:
                ctx.stop.set()  # workers kill their children; interrupted trials are queued for retry
                until = time.monotonic() + INTERRUPT_GRACE_S
                for done in finished:
                    done.wait(max(0.0, until - time.monotonic()))
                raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        with csv_lock:
            rows = write_csv(main_study, ctx, csv_path)
    if errors:
        raise errors[0]
    print_table(summary_table(rows, ctx), console)
    console.print(f"wrote {csv_path} ({len(rows)} trials) and {sweep_dir}/trial-*/")
    return 0


def queue_replicates(
    study,
    spec,
    replicate_configs: str,
    n: int,
    from_study: str | None,
    storage,
    results: Path,
    sweep_dir: Path,
    console,
) -> int:
    """Enqueue the missing replicates of the chosen configurations (:mod:`spellxfer.sweep.replicate`),
    print the choice, write ``replicate-plan.json``; returns how many trials are queued to run."""
    import optuna  # heavy: `sweep --help` imports this module
    from optuna.trial import TrialState  # with optuna

    from spellxfer.sweep.replicate import plan_replicates, write_plan  # optuna: not for `sweep --help`

    optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed and its retry queued first
    source = study
    if from_study is not None:
        path = results / "sweeps" / f"{from_study}.db"
        if storage is None and not path.is_file():
            raise SpellxferError(f"--from_study {from_study}: no study database {path}")
        url = storage_url(storage) if storage else f"sqlite:///{path.resolve()}"
        try:
            source = optuna.load_study(study_name=from_study, storage=url)
        except KeyError:
            raise SpellxferError(f"--from_study {from_study}: no such study in {_redact(url)}") from None
    plan = plan_replicates(study, source, replicate_configs, n, [p.name for p in spec.parameters], from_study)
    plan["study"] = study.study_name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_plan(sweep_dir / "replicate-plan.json", plan)
    for c in plan["configurations"]:
        value = (
            f"{spec.objective} {c['objective']:.4f}"
            if c["objective"] is not None
            else "no complete replicate 0"
        )
        todo = ", ".join(map(str, c["enqueued"])) or "none (all present)"
        console.print(
            f"configuration {c['config_id']} ({c['role']}, {value}): replicates queued {todo}",
            soft_wrap=True,
            highlight=False,
        )
    waiting = sum(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))
    console.print(
        f"wrote {sweep_dir / 'replicate-plan.json'}; {waiting} queued trial(s) to run", highlight=False
    )
    return waiting


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def open_study(url: str, name: str, objective: str, heartbeat_s: int, sampler, pruner):
    """Create or load the study (maximising ``objective``) in an RDB storage with heartbeats."""
    import optuna  # heavy: `sweep --help` imports this module
    import sqlalchemy.exc  # with optuna's storage

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    last_error = None
    for attempt in range(5):  # workers on several machines may create the tables at the same moment
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_s,
                grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRIES
                ),
            )
            st = optuna.create_study(
                study_name=name,
                storage=storage,
                direction="maximize",
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
            break
        except (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.ProgrammingError,
        ) as e:
            last_error = e
            time.sleep(0.5 + attempt)
        except (sqlalchemy.exc.ArgumentError, ModuleNotFoundError, ValueError) as e:
            raise SpellxferError(f"--storage {_redact(url)}: {str(e).splitlines()[0]}") from None
    else:
        raise SpellxferError(
            f"--storage {_redact(url)}: cannot open the database "
            f"({str(getattr(last_error, 'orig', last_error)).strip().splitlines()[0]})"
        )
    recorded = st.user_attrs.get("objective")
    if recorded is None:
        st.set_user_attr("objective", objective)
    elif recorded != objective:
        raise SpellxferError(f"study {name} maximises {recorded}, not {objective}; use another --study name")
    if st.metric_names != [objective]:  # Optuna's dashboard and trials_dataframe name the value by it
        st.set_metric_names([objective])
    return st


def record_study_settings(study, spec, sampler: str, pruner: str, n_trials: int) -> None:
    """The sweep's settings in the study itself, so a database read on its own says what ran: the
    space file (path and parsed content), the sampler and pruner actually used (command-line
    choices win over the file), its seed and the trial budget. Written by each run of the sweep
    (a resumed study may be run with another budget: the latest run's settings are kept)."""
    try:
        content = yaml.safe_load(Path(spec.path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):  # already parsed once by load_space; a race with an editor
        content = None
    settings = {
        "space_file": str(spec.path),
        "space": content,
        "sampler": sampler,
        "pruner": pruner,
        "seed": spec.seed,
        "budget_trials": n_trials,
        "decodings": list(spec.decodings),
        "policy": "trained on spelling only; evaluated on position and count only",
    }
    for key, value in settings.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


# PostgreSQL drivers SQLAlchemy can use for --storage; psycopg 3 is the `postgres` extra.
POSTGRES_DRIVERS = {
    "postgresql+psycopg": ("psycopg", "pip install 'spellxfer[postgres]'"),
    "postgresql+psycopg2": (
        "psycopg2",
        "pip install psycopg2-binary, or use postgresql+psycopg:// with pip install 'spellxfer[postgres]'",
    ),
}


def storage_url(url: str) -> str:
    """``--storage`` as SQLAlchemy opens it: a bare ``postgresql://`` means psycopg 3 (SQLAlchemy's
    own default would be psycopg2); a PostgreSQL driver that is not installed is one error line
    naming what to install."""
    scheme = url.split("://", 1)[0]
    if scheme == "postgresql":
        url, scheme = "postgresql+psycopg" + url[len("postgresql") :], "postgresql+psycopg"
    if scheme in POSTGRES_DRIVERS:
        module, install = POSTGRES_DRIVERS[scheme]
        if importlib.util.find_spec(module) is None:
            raise SpellxferError(
                f"--storage {_redact(url)}: the PostgreSQL driver {module} is not installed ({install})"
            )
    return url


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def counts_toward_budget(t) -> bool:
    """A trial as the budget counts it (one per configuration): not a retry (the retried trial
    already counts), not a queued seed of a configuration (its replicate 0 counts), and not one
    that found the budget spent."""
    return (
        "failed_trial" not in t.system_attrs
        and not t.user_attrs.get("over_budget")
        and not t.user_attrs.get("replicate")
    )


def plan(study, n_trials: int) -> str:
    """``run`` a trial (a queued retry, or a new one within budget), ``wait`` for running ones,
    or ``done``."""
    from optuna.trial import TrialState  # heavy: `sweep --help` imports this module

    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return "run"
    if sum(counts_toward_budget(t) for t in trials) < n_trials:
        return "run"
    return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"


def over_budget(study, number: int, n_trials: int) -> bool:
    """True for a new trial numbered past the budget: two workers that both saw one trial left
    both ask, and the storage gives them consecutive numbers; the later one gives way."""
    trials = study.get_trials(deepcopy=False)
    this = next(t for t in trials if t.number == number)
    if not counts_toward_budget(this):
        return False
    return sum(counts_toward_budget(t) and t.number < number for t in trials) >= n_trials


def base_settings(spec) -> tuple[str, dict]:
    """The model and data settings every trial shares: the base config with the fixed overrides,
    as fit's parser resolved them (:func:`spellxfer.sweep.space.parse_base`)."""
    from spellxfer.models.registry import check_model_name  # imports torch

    model, data = spec.fit.model.model, spec.fit.data.as_dict()
    if not data["data_dir"]:
        raise SpellxferError(
            f"{spec.base}: data.data_dir: expected a directory path, got {data['data_dir']!r}"
        )
    try:
        check_model_name(model)
    except SpellxferError as e:
        raise SpellxferError(f"{spec.base}: model.model: {e}") from None
    return model, data


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (several sweep processes preparing the same study wait in turn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_data_and_base(spec, model: str, data: dict, sweep_dir: Path, console) -> list[Path]:
    """Build the data directory if missing, and evaluate the base model once per study and decoding."""
    from spellxfer.training.datamodule import EVAL_FILES, SpellingDataModule  # imports torch and lightning

    data_dir = Path(data["data_dir"])
    test_files = [data_dir / EVAL_FILES["test"][task] for task in ("position", "count")]
    with _locked(sweep_dir / ".prepare.lock"):
        SpellingDataModule(
            str(data_dir), model, build_profile=data.get("build_profile", "demo"), seed=data.get("seed", 0)
        ).prepare_data()
        for decoding in spec.decodings:
            out = sweep_dir / "base" / decoding
            if (out / "metrics.json").is_file():
                continue
            console.print(
                f"evaluating the base model {model} ({decoding}) on {', '.join(map(str, test_files))} …"
            )
            flags = [a for k, v in spec.evaluation.items() if v is not None for a in (f"--{k}", str(v))]
            argv = [
                sys.executable,
                "-m",
                "spellxfer",
                "evaluate",
                "--model",
                model,
                "--questions",
                *map(str, test_files),
                "--decoding",
                decoding,
                *flags,
                "--out",
                str(out),
                "--overwrite",
                "true",
            ]
            log = sweep_dir / "base" / f"{decoding}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w", encoding="utf-8") as f:
                rc = subprocess.run(
                    argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                ).returncode
            if rc != 0:
                from spellxfer.sweep.trial import last_error  # imports optuna

                raise SpellxferError(f"base model evaluation ({decoding}) failed: {last_error(log, rc)}")
    return test_files


def wandb_enabled() -> bool:
    return os.environ.get("WANDB_MODE") != "disabled" and importlib.util.find_spec("wandb") is not None


def visible_gpus() -> list[str]:
    """The GPUs workers are pinned to: CUDA_VISIBLE_DEVICES if set, else every GPU torch sees."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch  # heavy: only when CUDA_VISIBLE_DEVICES is unset

    return [str(i) for i in range(torch.cuda.device_count())]
