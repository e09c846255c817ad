"""Find and read the trial directories a sweep leaves (the layout is in docs/transfer_learning.md).

A study directory holds ``base/<decoding>/`` (the base model's evaluation, computed once) and one
``trial-NNNN/`` per Optuna trial with ``trial.json``, ``metrics.jsonl`` (the whitelisted Lightning
log) and ``eval/<decoding>/predictions.jsonl``. Runs come either from directories on disk
(``--runs``) or from the Optuna study itself (``--study`` / ``--storage``), where each trial's
directory is its ``run_dir`` user attribute (relative to ``<results-dir>/sweeps/<study>/``, or as an
older sweep stored it), else ``<results-dir>/sweeps/<study>/trial-NNNN``.

Only ``complete`` trials are analysed; the others, and complete trials without an evaluation for
the requested decoding, are counted and listed with the reason.

Every run belongs to an *arm*: ``spelling``, or ``control`` (trained on the non-spelling control
file) when its ``params.train_set`` or its ``fit.yaml``'s ``data.train_set`` says ``control``, or
when it comes from ``--control_runs``. Control runs are kept apart (``Discovery.control``): they are
never candidates for selection and are labelled ``control`` in every table.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import iter_jsonl, read_json, snippet
from spellxfer.core.progress import tracked
from spellxfer.evaluation.compare import predictions_file, read_predictions
from spellxfer.tasks.metric_names import check_metric_name

# Optuna's TrialState names → the statuses trial.json uses.
OPTUNA_STATUS = {"COMPLETE": "complete", "FAIL": "failed", "PRUNED": "pruned", "RUNNING": "running",
                 "WAITING": "waiting"}


SCORINGS = {"generation": "correct", "likelihood": "likelihood_correct"}
"""Scoring → the verdict field of a predictions.jsonl row: generation (the reply, parsed) is the
primary score; the likelihood probe is analysed beside it when every row carries its verdict."""


def item_scores(rows: list[dict], field: str = "correct") -> dict[tuple[str, str], dict]:
    """Per item, keyed like compare_predictions (question file name, id): its sample verdicts and row."""
    items: dict[tuple[str, str], dict] = {}
    for r in rows:
        e = items.setdefault((Path(r["file"]).name, r["id"]), {"row": r, "correct": []})
        e["correct"].append(bool(r[field]))
    return items


def word_of(item: dict, key: tuple[str, str]) -> str:
    """The cluster an item belongs to: its word, else itself.

    Questions about one word share its difficulty, so they are resampled together.
    """
    word = item["row"].get("word")
    return f"word:{word}" if isinstance(word, str) and word else f"item:{key[0]}:{key[1]}"


@dataclass
class Run:
    """One complete trial: its identity, hyperparameters and evaluation rows (base and fine-tuned)."""

    name: str
    """``trial-0007``, or ``<study>/trial-0007`` when runs come from several studies."""
    directory: Path
    trial: dict
    """``trial.json`` as written by the sweep."""
    params: dict
    predictions: list[dict]
    """Fine-tuned model's ``eval/<decoding>/predictions.jsonl`` rows."""
    base_predictions: list[dict]
    """The study's base model ``base/<decoding>/predictions.jsonl`` rows (same items)."""
    curve: list[dict] = field(default_factory=list)
    """Validation rows of ``metrics.jsonl``: ``step`` (optimizer steps done, 0 for the base model's
    step-0 validation) plus whitelisted ``val/…`` metrics only."""
    metrics: dict | None = None
    """The fine-tuned model's ``eval/<decoding>/metrics.json`` (None if absent or unreadable)."""
    base_metrics: dict | None = None
    """The study's ``base/<decoding>/metrics.json``."""
    steps_trained: int | None = None
    """Optimizer steps the fit ran (after early stopping), from ``metrics.jsonl``."""
    arm: str = "spelling"
    """``spelling`` or ``control`` (the non-spelling control arm): see the module docstring."""

    @property
    def config_id(self):
        """The configuration this run is a seed of (a trial from before replicates is its own)."""
        return self.trial.get("config_id", self.trial.get("number"))


@dataclass
class Discovery:
    runs: list[Run]
    status_counts: dict[str, int]
    """Every trial seen, by status (``complete`` counts only the analysed ones)."""
    skipped: list[dict]
    """``{"trial", "status", "reason"}`` for every trial that is not analysed."""
    omitted_metric_entries: int = 0
    """How many non-whitelisted metric entries were dropped from ``metrics.jsonl`` files.

    An entry is one key in one logged row.
    """
    control: list[Run] = field(default_factory=list)
    """The control arm's complete runs (``arm == "control"``), named ``control/<trial>``."""


def discover(runs: list[str] | None, study: str | None, storage: str | None, results_dir: str,
             decoding: str, control_runs: list[str] | None = None) -> Discovery:
    """Trial directories from ``--runs`` (trial or study directories) or from an Optuna study, and the
    control arm's from ``--control_runs`` (plus any of the former that trained on the control file)."""
    if bool(runs) == bool(study):
        raise SpellxferError("give either --runs DIR … or --study NAME --storage URL (exactly one of them)")
    if study:
        if not storage:
            raise SpellxferError(
                f"--study {study} needs --storage URL (e.g. sqlite:///{results_dir}/sweeps/{study}.db)"
            )
        entries = _entries_from_study(study, storage, Path(results_dir))
    else:
        entries = [e for d in runs for e in _entries_from_dir(Path(d))]
    found = _load(entries, decoding)
    control = [r for r in found.runs if r.arm == "control"]
    found.runs = [r for r in found.runs if r.arm == "spelling"]
    if not found.runs:
        raise SpellxferError(
            "every analysed run trained on the control file (train_set control): give the spelling "
            "arm's runs with --runs and the control arm's with --control_runs"
        )
    if control_runs:
        ctl = _load([e for d in control_runs for e in _entries_from_dir(Path(d))], decoding)
        for run in ctl.runs:
            if run.arm != "control" and _train_set(run.directory, run.trial) == "spelling":
                raise SpellxferError(
                    f"--control_runs: {run.directory} trained on train_set spelling (its params or "
                    "fit.yaml say so), not on the control file; pass it with --runs"
                )
            run.arm = "control"
        control += ctl.runs
        found.skipped += [s | {"trial": f"control/{s['trial']}"} for s in ctl.skipped]
        found.omitted_metric_entries += ctl.omitted_metric_entries
    for run in control:
        run.name = f"control/{run.name}"
    found.control = control
    return found


def _train_set(d: Path, trial: dict) -> str | None:
    """The training file a trial used.

    Its ``params.train_set`` when searched, else its ``fit.yaml``'s ``data.train_set`` (the config
    the fit ran), else None (not recorded: the spelling file, fit's default).
    """
    value = (trial.get("params") or {}).get("train_set")
    if value is None and (d / "fit.yaml").is_file():
        try:
            config = yaml.safe_load((d / "fit.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise SpellxferError(
                f"{d / 'fit.yaml'}: not readable YAML ({' '.join(str(e).split())[:200]})"
            ) from None
        data = config.get("data") if isinstance(config, dict) else None
        value = data.get("train_set") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _entries_from_dir(d: Path) -> list[tuple[Path, str | None]]:
    """``(trial directory, status or None = read trial.json)`` for a trial or a study directory."""
    if (d / "trial.json").is_file():
        return [(d, None)]
    trials = sorted(p for p in d.glob("trial-*") if p.is_dir()) if d.is_dir() else []
    if not trials:
        raise SpellxferError(
            f"--runs {d}: neither a trial directory (with trial.json) nor a study directory "
            "(with trial-NNNN/ subdirectories)"
        )
    return [(t, None) for t in trials]


def _entries_from_study(study: str, storage: str, results_dir: Path) -> list[tuple[Path, str | None]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        s = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        raise SpellxferError(
            f"--study {study}: no such study in --storage {storage}; run "
            f"`spellxfer sweep --study {study}` first (or check the name)"
        ) from None
    except Exception as e:  # SQLAlchemy / RDB errors: a bad URL or an unreadable database
        raise SpellxferError(
            f"--storage {storage}: cannot open the Optuna storage ({type(e).__name__}: {e})"
        ) from None
    study_dir = results_dir / "sweeps" / study
    entries, missing = [], []
    for t in s.get_trials(deepcopy=False):
        status = OPTUNA_STATUS.get(t.state.name, t.state.name.lower())
        run_dir = _trial_dir(t.user_attrs.get("run_dir"), study_dir, t.number)
        if status == "complete" and not (run_dir / "trial.json").is_file():
            missing.append(run_dir)
        entries.append((run_dir, status))
    if not entries:
        raise SpellxferError(
            f"--study {study} in {storage} has no trials yet; run `spellxfer sweep --study {study}` first"
        )
    if missing:
        raise SpellxferError(
            f"--study {study}: {len(missing)} complete trial(s) have no directory here (first: "
            f"{missing[0]}); analyze reads each one's trial.json, metrics.jsonl and "
            "eval/<decoding>/predictions.jsonl and the study's base/<decoding>/predictions.jsonl under "
            f"{study_dir}: copy the sweep's directory there (or pass --results_dir), or use --runs DIR"
        )
    return entries


def _trial_dir(recorded: str | None, study_dir: Path, number: int) -> Path:
    """A trial's directory: its ``run_dir`` attribute, stored relative to the study directory
    (older studies stored it as the sweep saw it, absolute or relative to where it ran), the
    first that exists; else ``<study_dir>/trial-NNNN``."""
    default = study_dir / f"trial-{number:04d}"
    if recorded:
        for candidate in (study_dir / recorded, Path(recorded)):
            if (candidate / "trial.json").is_file():
                return candidate
    return default


def _load(entries: list[tuple[Path, str | None]], decoding: str) -> Discovery:
    from spellxfer.training.loggers import steps_trained  # loads torch (seconds): not for --help

    trials = []
    for d, status in entries:
        trial = _read_trial(d) if status is None or status == "complete" else {"number": _number(d)}
        trials.append((d, status or trial.get("status", "unknown"), trial))
    several_studies = len({t.get("study") for _, s, t in trials if s == "complete"}) > 1
    counts: Counter = Counter()
    skipped, runs, omitted, bases = [], [], 0, {}
    for d, status, trial in tracked(trials, "reading trials", "trials"):
        label = f"{trial.get('study')}/{d.name}" if several_studies else d.name
        eval_dir = d / "eval" / decoding
        if status == "complete" and not predictions_file(eval_dir).is_file():
            status, reason = "complete_without_eval", f"no {eval_dir}/predictions.jsonl"
        else:
            reason = trial.get("error") or f"status {status}"
        counts[status] += 1
        if status != "complete":
            skipped.append({"trial": label, "status": status, "reason": reason})
            continue
        base_dir = d.parent / "base" / decoding
        if base_dir not in bases:
            if not predictions_file(base_dir).is_file():
                raise SpellxferError(
                    f"{d}: the study has no base-model evaluation ({base_dir}/predictions.jsonl)"
                )
            bases[base_dir] = (read_predictions(base_dir), _read_metrics(base_dir))
        curve, n_omitted = read_curve(d / "metrics.jsonl")
        omitted += n_omitted
        runs.append(
            Run(
                name=label,
                directory=d,
                trial=trial,
                params=dict(trial.get("params") or {}),
                predictions=read_predictions(eval_dir),
                base_predictions=bases[base_dir][0],
                curve=curve,
                metrics=_read_metrics(eval_dir),
                base_metrics=bases[base_dir][1],
                steps_trained=steps_trained(d / "metrics.jsonl"),
                arm="control" if _train_set(d, trial) == "control" else "spelling",
            )
        )
    if not runs:
        raise SpellxferError(
            f"no complete trial with an eval/{decoding}/ evaluation among {len(trials)} trial(s) "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})"
        )
    return Discovery(runs=runs, status_counts=dict(counts), skipped=skipped, omitted_metric_entries=omitted)


def _read_metrics(d: Path) -> dict | None:
    """``d/metrics.json`` as ``evaluate`` writes it, or None: the analysis recomputes every accuracy
    from the predictions and only reads the baselines and diagnostics from here, when present."""
    f = d / "metrics.json"
    if not f.is_file():
        return None
    try:
        m = read_json(f, allow_nan=True)
    except SpellxferError:
        return None
    return m if isinstance(m, dict) else None


def _number(d: Path) -> int | None:
    tail = d.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def _read_trial(d: Path) -> dict:
    f = d / "trial.json"
    if not f.is_file():
        raise SpellxferError(f"{d}: no trial.json (expected a sweep trial directory)")
    # allow_nan: the sweep's own writer stores a diverged objective as NaN
    trial = read_json(f, allow_nan=True)
    if not isinstance(trial, dict) or "status" not in trial:
        raise SpellxferError(f"{f}: expected an object with a 'status' key (complete|failed|pruned|running)")
    for key, ok, expected in _TRIAL_FIELDS:
        if trial.get(key) is not None and not ok(trial[key]):
            raise SpellxferError(f"{f}: {key} {snippet(trial[key])} is not {expected}")
    for name, value in (trial.get("params") or {}).items():
        if not _is_param_value(value):
            raise SpellxferError(
                f"{f}: params.{name} {snippet(value)} is not a hyperparameter value "
                "(text, true/false, or a finite number)"
            )
    return trial


def read_curve(path: Path) -> tuple[list[dict], int]:
    """Validation rows of a ``metrics.jsonl``: ``{"step", "val/…": …}`` with whitelisted metrics only.

    Returns the rows and how many metric keys were dropped because the whitelist
    (:func:`~spellxfer.tasks.metric_names.check_metric_name`) does not allow them.
    ``step`` is optimizer steps done (:func:`~spellxfer.training.loggers.optimizer_step`: a row's
    ``global_step``, else — in logs written before rows were renumbered — its step + 1), so a
    fit's step-0 validation of the base model is step 0.
    A missing file gives no rows: a curve is a nice-to-have, not a reason to fail. A file that is
    there must be what the training logger writes: objects with an integer ``step`` (or null) and
    numeric values (NaN allowed: a diverged loss is logged as NaN).
    """
    from spellxfer.training.loggers import optimizer_step  # loads torch (seconds): not for --help

    if not path.is_file():
        return [], 0
    rows, omitted = [], 0
    for line, row in iter_jsonl(path, allow_nan=True):
        if not isinstance(row, dict):
            raise SpellxferError(f"{path}:{line}: expected a JSON object per line (a logged metrics row)")
        step = row.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise SpellxferError(f"{path}:{line}: step {snippet(step)} is not an integer ≥ 0")
        global_step = row.get("global_step")
        if global_step is not None and (not _is_number(global_step) or global_step < 0):
            raise SpellxferError(f"{path}:{line}: global_step {snippet(global_step)} is not a number ≥ 0")
        kept = {}
        for key, value in row.items():
            if key in ("step", "global_step"):
                continue
            if not allowed_metric(key):
                omitted += 1
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise SpellxferError(f"{path}:{line}: {key} {snippet(value)} is not a number")
            if key.startswith("val/"):
                kept[key] = value
        if kept and step is not None:
            rows.append({"step": optimizer_step(row), **kept})
    return rows, omitted


def _is_param_value(value) -> bool:
    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, int | float):
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an integer beyond float range
            return False
    return False


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TRIAL_FIELDS = (
    ("status", lambda v: isinstance(v, str), "text (complete|failed|pruned|running)"),
    ("number", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer ≥ 0"),
    ("study", lambda v: isinstance(v, str), "text"),
    ("params", lambda v: isinstance(v, dict), "an object of hyperparameter values"),
    ("objective_name", lambda v: isinstance(v, str), "text"),
    ("objective", _is_number, "a number"),
    ("error", lambda v: isinstance(v, str), "text"),
)


def allowed_metric(name: str) -> bool:
    """Whether the training whitelist allows ``name``.

    Allowed are the training-loop metrics and the position / count / transfer metrics.
    """
    try:
        check_metric_name(name)
    except SpellxferError:
        return False
    return True
