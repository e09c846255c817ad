"""``<results>/metrics/<study>.csv``: one row per trial, rebuilt from the Optuna storage and the
trial directories after every trial (and at the end), so it is current even while workers run.

Columns: ``config_id`` / ``replicate`` / ``seed`` (the trials of one configuration share its
``config_id``, one per seed); the hyperparameters; ``status`` (complete, failed, pruned, running);
duration; the objective (best validation value); ``steps_trained`` (after early stopping); per
decoding the trial's test position / count accuracies with their 95% intervals, the base model's
on the same items, the paired deltas (bootstrap 95% interval, McNemar p) from ``compare.json``,
and per subtask the accuracy, the likelihood-probe accuracy, the best trivial baseline (name and
accuracy), whether the accuracy beats it, the constant-answer flag and the no-answer rate (these
last ones empty for a ``metrics.json`` written before ``evaluate`` reported them); the best
checkpoint; the error of a failed trial.
Position and count only: trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.table import Table

from spellxfer.core.outputs import atomic_file
from spellxfer.sweep.replicate import config_id, replicate
from spellxfer.sweep.trial import SweepContext, write_trial_json
from spellxfer.tasks.names import TASKS
from spellxfer.training.loggers import steps_trained

STATUS = {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed", TrialState.PRUNED: "pruned",
          TrialState.RUNNING: "running"}


def listed(t) -> bool:
    """Trials the CSV shows: started ones, except those that found the budget already spent."""
    return t.state in STATUS and not t.user_attrs.get("over_budget")


def trial_rows(study: optuna.Study, ctx: SweepContext) -> list[dict]:
    trials = [t for t in study.get_trials(deepcopy=False) if listed(t)]
    retried_as = {
        RetryHeartbeatStaleTrialCallback.retry_history(t)[-1]: t.number
        for t in study.get_trials(deepcopy=False)
        if RetryHeartbeatStaleTrialCallback.retry_history(t)
    }
    bases = {d: _read_json(ctx.base_dir(d) / "metrics.json") for d in ctx.space.decodings}
    now = dt.datetime.now()
    rows = []
    for t in trials:
        run = ctx.trial_dir(t.number)
        error = t.user_attrs.get("error")
        if t.state == TrialState.FAIL and not error:
            # no error recorded: the worker itself stopped (killed, preempted) and its heartbeat went stale
            error = "worker stopped mid-trial (no heartbeat)"
        end = t.datetime_complete or now
        row = {
            "study": ctx.study,
            "number": t.number,
            "status": STATUS[t.state],
            "config_id": config_id(t),
            "replicate": replicate(t),
            "seed": ctx.space.replicate_seed(replicate(t)),
        }
        row |= {p.name: t.params.get(p.name) for p in ctx.space.parameters}
        row |= {
            "objective_name": ctx.space.objective,
            "objective": t.value if t.state == TrialState.COMPLETE else None,
            "duration_s": round((end - t.datetime_start).total_seconds(), 1) if t.datetime_start else None,
            "steps_trained": steps_trained(run / "metrics.jsonl"),
        }
        for d in ctx.space.decodings:
            row |= _eval_columns(
                d,
                _read_json(run / "eval" / d / "metrics.json"),
                bases[d],
                _read_json(run / "eval" / d / "compare.json"),
            )
        checkpoint = t.user_attrs.get("checkpoint")
        if checkpoint and not Path(checkpoint).is_absolute():  # stored relative to the study directory
            checkpoint = str(ctx.sweep_dir / checkpoint)
        row |= {
            "checkpoint": checkpoint,
            "run_dir": str(run),
            "retry_of": (RetryHeartbeatStaleTrialCallback.retry_history(t) or [None])[-1],
            "retried_as": retried_as.get(t.number),
            "error": error,
        }
        rows.append(row)
        _sync_trial_json(run, row)
    return rows


def _eval_columns(d: str, metrics: dict | None, base: dict | None, compare: dict | None) -> dict:
    """Per decoding: test accuracies (generation, and the likelihood probe when ``evaluate`` ran
    it), the base model's, paired deltas, and per subtask the best trivial baseline and the answer
    diagnostics (columns empty where an older metrics.json lacks them)."""
    out: dict = {}
    for prefix, m in ((d, metrics), (f"{d}_base", base)):
        for task in TASKS:
            key = f"{task}_accuracy"
            out[f"{prefix}_{key}"] = m.get(key) if m else None
            out[f"{prefix}_{task}_ci_low"] = m.get(f"{key}_ci_low") if m else None
            out[f"{prefix}_{task}_ci_high"] = m.get(f"{key}_ci_high") if m else None
            out[f"{prefix}_{task}_n"] = m.get(f"{key}_n") if m else None
            out[f"{prefix}_{task}_likelihood_accuracy"] = m.get(f"{task}_likelihood_accuracy") if m else None
        out[f"{prefix}_transfer_score"] = m.get("transfer_score") if m else None
    for task in TASKS:
        g = (compare or {}).get("groups", {}).get(task)
        out[f"{d}_{task}_delta"] = g["diff"] if g else None
        out[f"{d}_{task}_delta_ci_low"] = g["ci_low"] if g else None
        out[f"{d}_{task}_delta_ci_high"] = g["ci_high"] if g else None
        out[f"{d}_{task}_delta_mcnemar_p"] = g["mcnemar_p"] if g else None
    subtasks = {**((base or {}).get("subtasks") or {}), **((metrics or {}).get("subtasks") or {})}
    for key in sorted(
        subtasks, key=lambda k: (TASKS.index(k.split("/")[0]) if k.split("/")[0] in TASKS else 9, k)
    ):
        s = ((metrics or {}).get("subtasks") or {}).get(key) or {}
        lik, diag, trivial = (
            s.get("likelihood") or {},
            s.get("diagnostics") or {},
            s.get("best_trivial") or {},
        )
        out |= {
            f"{d}_{key}_accuracy": s.get("accuracy"),
            f"{d}_{key}_likelihood_accuracy": lik.get("accuracy"),
            f"{d}_{key}_best_trivial": trivial.get("accuracy"),
            f"{d}_{key}_best_trivial_name": trivial.get("name"),
            f"{d}_{key}_beats_trivial": s.get("beats_trivial"),
            f"{d}_{key}_constant_answer": diag.get("constant_answer"),
            f"{d}_{key}_no_answer_rate": diag.get("no_answer_rate"),
        }
    return out


def _sync_trial_json(run: Path, row: dict) -> None:
    """A trial whose worker died still says "running" in its trial.json; the storage knows better."""
    record = _read_json(run / "trial.json")
    if record is None:
        return
    if record.get("status") == "running" and row["status"] == "failed":
        record |= {"status": "failed", "error": row["error"], "duration_s": row["duration_s"]}
    elif record.get("retried_as") == row["retried_as"]:
        return
    write_trial_json(run, record | {"retried_as": row["retried_as"]})


def write_csv(study: optuna.Study, ctx: SweepContext, path: Path) -> list[dict]:
    """Rewrite the study's CSV atomically; returns its rows."""
    rows = trial_rows(study, ctx)
    if rows:
        with atomic_file(path) as f:
            # the union of the rows' columns: a running trial has no evaluation columns yet
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)
    return rows


def summary_table(rows: list[dict], ctx: SweepContext, top: int = 5) -> Table:
    """The best complete trials by objective, with their test accuracies (first decoding)."""
    d = ctx.space.decodings[0]
    done = sorted((r for r in rows if r["status"] == "complete"), key=lambda r: -(r["objective"] or 0))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("complete", "pruned", "failed", "running")}
    table = Table(
        title=f"study {ctx.study}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + f" · test accuracies {d}, Δ vs base with 95% CI"
    )
    for col in (
        "trial",
        *(p.name for p in ctx.space.parameters),
        ctx.space.objective,
        "position",
        "Δ position",
        "count",
        "Δ count",
    ):
        table.add_column(col, justify="right")
    for r in done[:top]:
        cells = [str(r["number"]), *(_fmt(r[p.name]) for p in ctx.space.parameters), _fmt(r["objective"])]
        for task in TASKS:
            cells.append(_acc(r, f"{d}_{task}"))
            delta = r[f"{d}_{task}_delta"]
            if delta is None:
                cells.append("")
            else:
                low, high = r[f"{d}_{task}_delta_ci_low"], r[f"{d}_{task}_delta_ci_high"]
                cells.append(f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]")
        table.add_row(*cells)
    return table


def _acc(r: dict, prefix: str) -> str:
    acc = r[f"{prefix}_accuracy"]
    return "" if acc is None else f"{acc:.3f} [{r[f'{prefix}_ci_low']:.3f}, {r[f'{prefix}_ci_high']:.3f}]"


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
