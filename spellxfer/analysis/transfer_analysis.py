"""``python -m spellxfer analyze``: which training patterns transfer to position and count.

Lifecycle: find the complete trials (``runs.discover``) → per run, compare the fine-tuned model
with the base model on the same items (``compare_predictions``: paired bootstrap interval of the
delta, exact McNemar p) and adjust the p-values across runs (Holm) → across runs, correlate
position with count and estimate hyperparameter effects (``effects``) → break the deltas down by
word length, Qwen3 token count, word kind and letter position → write the tables, figures and
``analysis.json`` atomically into ``--out``.

Multiple comparisons: Holm's step-down adjustment (family-wise error rate), over the 2 × n_runs
task-level tests (position and count of every run); subtask rows form a second family. Holm
needs no assumption about how the tests depend on each other — they do, since every run answers
the same items.

Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import track
from rich.table import Table

from spellxfer.analysis import effects
from spellxfer.analysis.columns import check_columns
from spellxfer.analysis.runs import Discovery, Run, allowed_metric, discover
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import (
    atomic_output_dir,
    check_output_dir,
    git_commit,
    package_versions,
    write_json,
)
from spellxfer.evaluation.compare import compare_predictions
from spellxfer.evaluation.stats import accuracy_summary, holm, paired_comparison
from spellxfer.tasks.names import TASKS

console = Console()
# Per task: test accuracy with its interval, the paired change from base with its interval, Holm p.
TASK_COLUMNS = [f"{t}_accuracy{s}" for t in TASKS
                for s in ("", "_ci_low", "_ci_high", "_delta", "_delta_ci_low", "_delta_ci_high", "_p_adj")]  # fmt: skip
TABLES = ("runs", "per_run_deltas", "metric_correlations", "top_transfer_configs", "hyperparameter_effects",
          "breakdowns")  # fmt: skip


def analyze(
    runs: list[str] | None = None,
    study: str | None = None,
    storage: str | None = None,
    out: str = "results/transfer_analysis",
    decoding: Literal["sampled", "greedy"] = "sampled",
    results_dir: str = "results",
    top: int = 10,
    n_boot: int = 2000,
    seed: int = 0,
    overwrite: bool = False,
) -> int:
    """Analyse a sweep: which training patterns transfer to position and count, with intervals.

    Per-run base → fine-tuned deltas (paired bootstrap, Holm-adjusted McNemar), position–count
    correlation, hyperparameter effects, top configurations and where the gains are (trained on
    spelling, evaluated on position and count only). Writes DIR/runs.csv, per_run_deltas.csv, metric_correlations.csv, top_transfer_configs.csv,
    hyperparameter_effects.csv, breakdowns.csv, figures/*.png and analysis.json.

    Args:
        runs: Trial directories (with trial.json) or study directories (with trial-NNNN/ and base/).
        study: Optuna study name (with --storage); each trial's directory is its run_dir user
            attribute, else RESULTS_DIR/sweeps/STUDY/trial-NNNN.
        storage: Optuna storage URL, e.g. sqlite:///results/sweeps/STUDY.db.
        out: Output directory (must be empty or absent unless --overwrite true).
        decoding: Which evaluation to analyse: eval/sampled or eval/greedy.
        results_dir: Where sweeps live, for trials without a run_dir attribute.
        top: How many configurations top_transfer_configs.csv lists.
        n_boot: Bootstrap resamples for every interval computed here.
        seed: Seed of every bootstrap (same inputs and seed, same numbers).
        overwrite: Replace a non-empty output directory.
    """
    for flag, value, low in (("top", top, 1), ("n_boot", n_boot, 1), ("seed", seed, 0)):
        if value < low:
            raise SpellxferError(f"--{flag} must be ≥ {low}, got {value}")
    check_output_dir(out, overwrite)
    found = discover(runs, study, storage, results_dir, decoding)
    result = analyse(found, n_boot=n_boot, seed=seed, top=top)
    result["info"] |= {"source": {"runs": runs, "study": study, "storage": storage}, "decoding": decoding,
                       "name": study or _common_name(found.runs)}  # fmt: skip
    from spellxfer.analysis import figures  # matplotlib: imported only when drawing

    with atomic_output_dir(out, overwrite) as tmp:
        for name in TABLES:
            check_columns(result[name], name).to_csv(tmp / f"{name}.csv", index=False, float_format="%.6g")
        result["info"]["figures"] = figures.draw_all(result, found.runs, tmp / "figures")
        write_json(tmp / "analysis.json", _jsonable(result["info"]))
    print_summary(result, Path(out))
    return 0


def analyse(found: Discovery, n_boot: int = 2000, seed: int = 0, top: int = 10) -> dict:
    """Every table of the analysis (pandas DataFrames) plus ``info`` (methods, counts, base accuracy)."""
    run_rows, delta_rows, breakdown_rows = [], [], []
    for run in track(found.runs, description="comparing runs with the base model", transient=True):
        row, deltas = _compare_run(run, n_boot, seed)
        run_rows.append(row)
        delta_rows += deltas
        breakdown_rows += _breakdowns(run, n_boot, seed)
    per_run = pd.DataFrame(delta_rows)
    for _, family in per_run.groupby(per_run["metric"].str.contains("/")):
        per_run.loc[family.index, "p_adj"] = holm(family["mcnemar_p"].tolist())
    per_run["significant"] = per_run["p_adj"] <= 0.05
    table = pd.DataFrame(run_rows)
    for task in TASKS:
        p_adj = per_run[per_run["metric"] == f"{task}_accuracy"].set_index("run")["p_adj"]
        table[f"{task}_accuracy_p_adj"] = table["run"].map(p_adj)
    breakdowns = pd.DataFrame(breakdown_rows)
    breakdowns = pd.concat([breakdowns, _pooled_breakdowns(breakdowns, n_boot, seed)], ignore_index=True)
    parts = [p for p in (effects.marginal_means(table, n_boot, seed), effects.importance(table, n_boot, seed)) if len(p)]
    hp = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=effects.COLUMNS)
    objective_cols = [c for c in table.columns if c.startswith(("val/", "test/"))]
    top_cols = ["run", "trial", "transfer_score", "transfer_score_ci_low", "transfer_score_ci_high", *objective_cols,
                *TASK_COLUMNS,
                *[c for c in table.columns if c.startswith("params.")], "run_dir"]  # fmt: skip
    top_configs = table.sort_values("transfer_score", ascending=False, kind="stable").head(top)[top_cols]
    top_configs.insert(0, "rank", range(1, len(top_configs) + 1))
    info = {
        "n_runs": len(found.runs),
        "status_counts": found.status_counts,
        "skipped": found.skipped,
        "omitted_metric_entries": found.omitted_metric_entries,
        "base": _base_summary(found.runs[0]),
        "n_boot": n_boot,
        "seed": seed,
        "methods": {
            "accuracy_interval": "Wilson 95% (one sample per item) or item bootstrap (K samples per item)",
            "delta": "fine-tuned − base on the same items; paired bootstrap 95% interval over items "
                     "(spellxfer.evaluation.compare.compare_predictions, 5,000 resamples); exact McNemar test",
            "multiple_comparisons": "Holm step-down (family-wise error rate 5%) over the 2 × n_runs task-level "
                                    "tests (position and count per run); subtasks form a second Holm family",
            "transfer_score": "mean of position and count accuracy; interval by bootstrapping the items of each "
                              f"task independently ({n_boot} resamples)",
            "across_runs": f"percentile bootstrap over runs, {n_boot} resamples, seed {seed}",
            "importance": "regression (not fANOVA): " + (hp["method"].iloc[-1] if (hp["kind"] == "importance").any()
                                                         else "no numeric hyperparameter varies"),
            "breakdowns": "per run: paired bootstrap of the delta within each bucket; 'all runs': mean over runs "
                          "with a percentile bootstrap over runs",
        },
        "provenance": {"packages": package_versions(), "git_commit": git_commit()},
        "selected_by_validation": selected_by_validation(table, objective_cols),
    }
    return {"runs": table, "per_run_deltas": per_run, "metric_correlations": effects.correlations(table, n_boot, seed),
            "top_transfer_configs": top_configs, "hyperparameter_effects": hp, "breakdowns": breakdowns, "info": info}  # fmt: skip


def selected_by_validation(table: pd.DataFrame, objective_cols: list[str]) -> dict | None:
    """The run a sweep would ship: the best validation objective (ties to the lower trial number,
    as Optuna's ``best_trial``), with its test numbers. Its test accuracy is an honest estimate;
    the top of ``top_transfer_configs`` is chosen on the test set itself and so is optimistic."""
    col = next((c for c in objective_cols if c.startswith("val/")), None)
    if col is None or table[col].isna().all():
        return None
    ranked = table.dropna(subset=[col]).sort_values([col, "trial"], ascending=[False, True], kind="stable")
    best = ranked.iloc[0]
    keys = ["transfer_score", "transfer_score_ci_low", "transfer_score_ci_high", *TASK_COLUMNS]
    return {"run": str(best["run"]), "objective": col, "objective_value": float(best[col]),
            "tied_runs": int((table[col] == best[col]).sum()),
            "test_rank": int((table["transfer_score"] > best["transfer_score"]).sum()) + 1,
            **{k: float(best[k]) for k in keys if k in best and pd.notna(best[k])}}  # fmt: skip


def item_scores(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per item, keyed like compare_predictions (question file name, id): its sample verdicts and row."""
    items: dict[tuple[str, str], dict] = {}
    for r in rows:
        e = items.setdefault((Path(r["file"]).name, r["id"]), {"row": r, "correct": []})
        e["correct"].append(bool(r["correct"]))
    return items


def _task_items(items: dict, task: str) -> list[tuple[str, str]]:
    return sorted(k for k, e in items.items() if e["row"]["task"] == task)


def _mean_of_two_ci(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile interval of (mean x + mean y) / 2, resampling the items of x and of y independently."""
    if not len(x) or not len(y):
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    mx = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    my = y[rng.integers(0, len(y), size=(n_boot, len(y)))].mean(axis=1)
    low, high = np.quantile((mx + my) / 2, [0.025, 0.975])
    return (float(low), float(high))


def _compare_run(run: Run, n_boot: int, seed: int) -> tuple[dict, list[dict]]:
    """One row of runs.csv (accuracies, deltas, params) and the run's per-group delta rows."""
    c = compare_predictions(run.base_predictions, run.predictions, "base", run.name)
    base, tuned = item_scores(run.base_predictions), item_scores(run.predictions)
    row = {"run": run.name, "trial": run.trial.get("number"), "study": run.trial.get("study"),
           "run_dir": str(run.directory)}  # fmt: skip
    means, diffs = {}, {}
    for task in TASKS:
        keys = _task_items(tuned, task)
        s = accuracy_summary([tuned[k]["correct"] for k in keys], n_boot=n_boot, seed=seed)
        row |= {f"{task}_accuracy": s["accuracy"], f"{task}_accuracy_ci_low": s["ci_low"],
                f"{task}_accuracy_ci_high": s["ci_high"], f"{task}_accuracy_n": s["n"]}  # fmt: skip
        g = c["groups"].get(task)
        row |= {f"{task}_accuracy_base": g["acc_a"] if g else math.nan, f"{task}_accuracy_delta": g["diff"] if g else math.nan,
                f"{task}_accuracy_delta_ci_low": g["ci_low"] if g else math.nan,
                f"{task}_accuracy_delta_ci_high": g["ci_high"] if g else math.nan,
                f"{task}_accuracy_mcnemar_p": g["mcnemar_p"] if g else math.nan}  # fmt: skip
        means[task] = np.array([np.mean(tuned[k]["correct"]) for k in keys])
        common = [k for k in keys if k in base]
        diffs[task] = np.array([np.mean(tuned[k]["correct"]) - np.mean(base[k]["correct"]) for k in common])
    row["transfer_score"] = (row["position_accuracy"] + row["count_accuracy"]) / 2
    row["transfer_score_ci_low"], row["transfer_score_ci_high"] = _mean_of_two_ci(means["position"], means["count"], n_boot, seed)
    row["transfer_score_delta"] = (row["position_accuracy_delta"] + row["count_accuracy_delta"]) / 2
    row["transfer_score_delta_ci_low"], row["transfer_score_delta_ci_high"] = _mean_of_two_ci(
        diffs["position"], diffs["count"], n_boot, seed)
    name = run.trial.get("objective_name")
    if name and allowed_metric(name) and run.trial.get("objective") is not None:
        row[name] = run.trial["objective"]
    row |= {f"params.{k}": v for k, v in run.params.items()}
    deltas = [{"run": run.name, "metric": f"{group}_accuracy", "base_accuracy": g["acc_a"], "tuned_accuracy": g["acc_b"],
               "delta": g["diff"], "delta_ci_low": g["ci_low"], "delta_ci_high": g["ci_high"],
               "mcnemar_p": g["mcnemar_p"], "n_items": g["n"]} for group, g in c["groups"].items()]  # fmt: skip
    return row, deltas


def _base_summary(run: Run) -> dict:
    items = item_scores(run.base_predictions)
    out = {}
    for task in TASKS:
        s = accuracy_summary([items[k]["correct"] for k in _task_items(items, task)])
        out[f"{task}_accuracy"] = {k: s[k] for k in ("accuracy", "ci_low", "ci_high", "n")}
    return out


def _breakdowns(run: Run, n_boot: int, seed: int) -> list[dict]:
    """Base vs fine-tuned accuracy and the paired delta in every bucket of every breakdown."""
    from spellxfer.evaluation.evaluate import BREAKDOWNS  # the buckets `evaluate` reports

    base, tuned = item_scores(run.base_predictions), item_scores(run.predictions)
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for key in sorted(set(base) & set(tuned)):
        row = base[key]["row"]
        for name, bucket_of in BREAKDOWNS.items():
            bucket = bucket_of(row)
            if bucket is not None:
                groups[(name, row["task"], bucket)].append(key)
    out = []
    for (name, task, bucket), keys in sorted(groups.items()):
        a = accuracy_summary([base[k]["correct"] for k in keys], n_boot=n_boot, seed=seed)
        b = accuracy_summary([tuned[k]["correct"] for k in keys], n_boot=n_boot, seed=seed)
        d = paired_comparison([np.mean(base[k]["correct"]) for k in keys], [np.mean(tuned[k]["correct"]) for k in keys],
                              n_boot=n_boot, seed=seed)  # fmt: skip
        out.append({"run": run.name, "breakdown": name, "bucket": bucket, "metric": f"{task}_accuracy", "n_items": len(keys),
                    "base_accuracy": a["accuracy"], "base_ci_low": a["ci_low"], "base_ci_high": a["ci_high"],
                    "tuned_accuracy": b["accuracy"], "tuned_ci_low": b["ci_low"], "tuned_ci_high": b["ci_high"],
                    "delta": d["diff"], "delta_ci_low": d["ci_low"], "delta_ci_high": d["ci_high"],
                    "mcnemar_p": d["mcnemar_p"]})  # fmt: skip
    return out


def _pooled_breakdowns(per_run: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """``run = "all runs"``: mean over runs of each bucket's accuracies and delta, bootstrap over runs."""
    rows = []
    for (name, metric, bucket), g in per_run.groupby(["breakdown", "metric", "bucket"], sort=False):
        row = {"run": "all runs", "breakdown": name, "bucket": bucket, "metric": metric, "n_items": int(g["n_items"].median()),
               "n_runs": len(g)}  # fmt: skip
        # one base model per study: the same numbers in every run of it (averaged across studies)
        row |= {c: g[c].mean() for c in ("base_accuracy", "base_ci_low", "base_ci_high")}
        for col, prefix in (("tuned_accuracy", "tuned"), ("delta", "delta")):
            y = g[col].to_numpy(float)
            row[col] = float(y.mean())
            if len(g) == 1:  # one run: its own interval (over items) is the only one there is
                row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = g[f"{prefix}_ci_low"].iloc[0], g[f"{prefix}_ci_high"].iloc[0]
            else:
                row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = effects.bootstrap_ci(effects._mean, [y], n_boot, seed)
        rows.append(row)
    return pd.DataFrame(rows)


def _common_name(runs: list[Run]) -> str:
    studies = {r.trial.get("study") for r in runs} - {None}
    return studies.pop() if len(studies) == 1 else "runs"


def _jsonable(obj):
    """analysis.json is strict JSON: nan → null, numpy scalars → Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_summary(result: dict, out: Path) -> None:
    info, table = result["info"], result["top_transfer_configs"]
    t = Table(title=f"top configurations by test transfer_score ({info['n_runs']} complete runs; "
                    f"not analysed: {len(info['skipped'])})")  # fmt: skip
    for col in ("rank", "run", "transfer_score", "Δ position [95% CI]", "Δ count [95% CI]"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for _, r in table.head(5).iterrows():
        t.add_row(str(r["rank"]), r["run"], f"{r['transfer_score']:.3f}",
                  *[f"{r[f'{k}_accuracy_delta']:+.3f} [{r[f'{k}_accuracy_delta_ci_low']:+.3f}, "
                    f"{r[f'{k}_accuracy_delta_ci_high']:+.3f}]" for k in TASKS])  # fmt: skip
    console.print(t)
    if sel := info.get("selected_by_validation"):
        console.print(f"selected by {sel['objective']} (the unbiased pick): {sel['run']}, test transfer_score "
                      f"{sel['transfer_score']:.3f}, rank {sel['test_rank']} of {info['n_runs']} on the test set")
    console.print(f"wrote {', '.join(f'{n}.csv' for n in TABLES)}, figures/ and analysis.json to {out}")
