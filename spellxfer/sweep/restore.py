"""Rebuild a sweep's Optuna study from its trial directories (``study restore``).

A sweep records each trial twice: in the study database and in the trial's own directory
(``trial.json``: number, status, parameters, configuration id, replicate, objective; ``eval/``:
the test scores). When the database is lost — a GPU box handed back before it was copied, or a
study directory committed without it — ``study restore`` writes a new database from the
directories, so that the same ``sweep`` command continues the study (``--replicate_configs``
plans phase 2 from the restored objectives; ``--from_study`` reads it for a control arm) and
``analyze --study`` reads it.

What comes back: every trial's number, state, parameters (with the space file's distributions),
objective, ``config_id``, ``replicate``, ``run_dir``, checkpoint, duration (ending at its
``trial.json``'s time) and test scores. What does not: heartbeats and the sampler's state (a random
or grid sampler needs none; TPE relearns from the restored trials). A trial that was still running
when the database was lost is restored as failed with the reason, so its number is kept and a later
trial never reuses its directory.
Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta
from pathlib import Path

from rich.console import Console

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import read_json
from spellxfer.sweep.space import Parameter, load_space
from spellxfer.sweep.trial import outcome_attrs

console = Console(stderr=True, highlight=False)

HEARTBEAT_S = 30  # sweep's default --heartbeat_s: the study's storage is opened as the sweep opens it

STATES = {"complete": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}
"""trial.json status → Optuna state; any other status (running, interrupted) is restored as FAIL."""


def restore(study_dir: str, space: str, study: str | None = None, storage: str | None = None) -> int:
    """Rebuild a sweep's Optuna study from its trial directories (trial.json) when the database is lost.

    Args:
        study_dir: The study directory (RESULTS/sweeps/STUDY, with trial-NNNN/trial.json).
        space: The space file the sweep ran (its parameters give each value's distribution).
        study: Study name (default: the one the trials' trial.json records).
        storage: Optuna storage URL (default: sqlite:///STUDY_DIR/../STUDY.db, where `sweep` keeps it).
    """
    import optuna  # heavy

    from spellxfer.sweep.run import open_study, record_study_settings, storage_url

    root = Path(study_dir)
    records = _records(root)
    name = study or records[0][1].get("study")
    if not name:
        raise SpellxferError(f"{records[0][0]}: no study name in trial.json; pass --study")
    spec = load_space(space)
    distributions = {p.name: _distribution(p) for p in spec.parameters}
    url = storage_url(storage) if storage else f"sqlite:///{(root.parent / f'{name}.db').resolve()}"
    trials = [_trial(path, rec, distributions, spec) for path, rec in records]  # every check first
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # the sweep's storage settings use Optuna's experimental heartbeats
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
        st = open_study(url, name, spec.objective, HEARTBEAT_S, sampler, None)
    if st.get_trials(deepcopy=False):
        raise SpellxferError(f"study {name} in {url} already has trials; restore into a new database")
    for t in trials:
        st.add_trial(t)
    record_study_settings(st, spec, spec.sampler, spec.pruner, spec.trials)
    st.set_user_attr("restored_from", str(root))
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    console.print(
        f"restored study {name}: {len(trials)} trials ("
        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
        + f") into {url}"
    )
    return 0


def _records(root: Path) -> list[tuple[Path, dict]]:
    """``(trial.json path, record)`` per ``trial-NNNN`` directory, numbered 0 … N−1 without gaps."""
    if not root.is_dir():
        raise SpellxferError(f"--study_dir {root}: no such directory (expected RESULTS/sweeps/STUDY)")
    records = []
    for d in sorted(root.glob("trial-*")):
        path = d / "trial.json"
        record = read_json(path)
        if not isinstance(record, dict) or not isinstance(record.get("number"), int):
            raise SpellxferError(f"{path}: expected a trial.json object with an integer number")
        if d.name != f"trial-{record['number']:04d}":
            raise SpellxferError(f"{path}: number {record['number']} is not its directory's ({d.name})")
        records.append((path, record))
    if not records:
        raise SpellxferError(f"--study_dir {root}: no trial-NNNN/trial.json (a sweep study directory)")
    numbers = [r["number"] for _, r in records]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise SpellxferError(
            f"--study_dir {root}: trial numbers must run 0 … {max(numbers)} without gaps (Optuna numbers "
            f"trials in order); missing {', '.join(map(str, missing[:5]))}"
        )
    return records


def _distribution(p: Parameter):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if p.values is not None:
        return CategoricalDistribution(list(p.values))
    if p.kind is int:
        return IntDistribution(int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return FloatDistribution(p.low, p.high, step=p.step, log=p.log)


def _allowed(dist, value) -> bool:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, int | float) and not isinstance(value, bool) and dist.low <= value <= dist.high


def _trial(path: Path, rec: dict, distributions: dict, spec):
    """One trial.json as an Optuna FrozenTrial to add; a value outside the space is an error."""
    from optuna.trial import TrialState, create_trial

    params = rec.get("params")
    if not isinstance(params, dict) or set(params) != set(distributions):
        raise SpellxferError(
            f"{path}: params {sorted(params or {})} are not the space file's {sorted(distributions)}"
        )
    for key, value in params.items():
        if not _allowed(distributions[key], value):
            raise SpellxferError(f"{path}: {key} {value!r} is not a value of the space file {spec.path}")
    status = rec.get("status")
    state = TrialState[STATES.get(status, "FAIL")]
    value = rec.get("objective")
    if state == TrialState.COMPLETE and not isinstance(value, int | float):
        raise SpellxferError(f"{path}: status complete without a numeric objective")
    attrs = {
        "config_id": int(rec.get("config_id", rec["number"])),
        "replicate": int(rec.get("replicate", 0)),
        "run_dir": path.parent.name,
        "restored": True,
    }
    attrs |= outcome_attrs(path.parent, spec.decodings)  # as the sweep records a finished trial
    if state == TrialState.FAIL:
        attrs["error"] = rec.get("error") or f"status {status} when the study database was lost"
    checkpoint = rec.get("checkpoint")
    if isinstance(checkpoint, str) and f"/{path.parent.name}/" in checkpoint:  # as the sweep stores it
        attrs["checkpoint"] = path.parent.name + "/" + checkpoint.split(f"/{path.parent.name}/", 1)[1]
    trial = create_trial(
        params=params,
        distributions=distributions,
        value=float(value) if state == TrialState.COMPLETE else None,
        state=state,
        user_attrs=attrs,
    )
    duration = rec.get("duration_s")
    if isinstance(duration, int | float) and duration >= 0:  # the CSV's duration_s: the end less its length
        end = datetime.fromtimestamp(path.stat().st_mtime)
        trial.datetime_complete, trial.datetime_start = end, end - timedelta(seconds=duration)
    return trial
