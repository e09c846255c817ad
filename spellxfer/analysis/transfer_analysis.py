"""``python -m spellxfer analyze``: which training patterns transfer to position and count.

Lifecycle: find the complete trials (``runs.discover``) → per run and scoring (generation, plus the
likelihood probe when every prediction row carries its verdict), compare the fine-tuned model with
the base model on the same items (paired bootstrap over words, exact McNemar p) → group the runs
of one configuration (their seeds; ``configs``) and test each configuration across its seeds →
across configurations, correlate position with count and estimate hyperparameter effects
(``effects``: OLS with HC3 intervals) → break the deltas down by word length, token count (with
the evaluated model's tokenizer, ``tokens``), word kind and letter position → write the tables,
figures and ``analysis.json`` atomically into ``--out``. With a control arm (``--control_runs``, or
runs that trained on the control file) the validation-selected configuration is also compared
with the control trained with the same configuration, the control with the base (``arms``), and
each subtask gets the pre-registered decision (transfer / format interference / no effect).

The plan is fixed before any number is seen (docs/transfer_learning.md, "Statistics"): primary
endpoints are the subtasks, secondary the two task totals, transfer_score is reported and never
tested; Holm families per decoding × scoring (primary, secondary), the validation-selected
configuration as its own family, its contrasts with the base and the control as one more, the
slopes of each endpoint as one more each; ``analysis.json`` declares them. Holm needs no
assumption about how the tests depend on each other — they do, since every run answers the same
items.

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
from rich.table import Table

from spellxfer.analysis import arms, configs, effects, figures, tokens
from spellxfer.analysis.columns import check_columns
from spellxfer.analysis.runs import SCORINGS, Discovery, Run, allowed_metric, discover, item_scores, word_of
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import (
    atomic_output_dir,
    check_output_dir,
    git_commit,
    package_versions,
    write_json,
)
from spellxfer.core.progress import tracked
from spellxfer.core.tables import print_table
from spellxfer.evaluation.stats import (
    accuracy_summary,
    bootstrap_sums,
    holm,
    paired_comparison,
    percentile_interval,
)
from spellxfer.tasks.names import TASKS

console = Console()
# Per task: test accuracy with its interval, the paired change from base with its interval, Holm p.
TASK_COLUMNS = [f"{t}_accuracy{s}" for t in TASKS
                for s in ("", "_ci_low", "_ci_high", "_delta", "_delta_ci_low", "_delta_ci_high", "_p_adj")]
TABLES = ("runs", "per_run_deltas", "config_effects", "metric_correlations", "top_transfer_configs",
          "hyperparameter_effects", "breakdowns", "arm_contrasts")


def analyze(
    runs: list[str] | None = None,
    study: str | None = None,
    storage: str | None = None,
    out: str = "results/transfer_analysis",
    decoding: Literal["sampled", "greedy"] = "sampled",
    scoring: Literal["auto", "generation", "both"] = "auto",
    results_dir: str = "results",
    top: int = 10,
    n_boot: int = 2000,
    seed: int = 0,
    overwrite: bool = False,
    control_runs: list[str] | None = None,
    all_words: int = effects.ALL_WORDS,
    selection: Literal["auto", "first_seed", "seed_mean"] = "auto",
) -> int:
    """Analyse a sweep: which training patterns transfer to position and count, with intervals.

    Per-run and per-configuration base → fine-tuned deltas (paired bootstrap over words; McNemar,
    or a t-test across seeds; Holm within pre-specified families), position–count correlation,
    hyperparameter effects (OLS, HC3), top runs and where accuracy changed (trained on spelling,
    evaluated on position and count only). With the control arm, the validation-selected
    configuration against the base and the control trained with the same configuration, and the
    pre-registered decision per subtask. Writes DIR/runs.csv, per_run_deltas.csv,
    config_effects.csv, metric_correlations.csv, top_transfer_configs.csv,
    hyperparameter_effects.csv, breakdowns.csv, arm_contrasts.csv, figures/*.png and analysis.json.

    Args:
        runs: Trial directories (with trial.json) or study directories (with trial-NNNN/ and base/).
        study: Optuna study name (with --storage); each trial's directory is its run_dir user
            attribute, else RESULTS_DIR/sweeps/STUDY/trial-NNNN.
        storage: Optuna storage URL, e.g. sqlite:///results/sweeps/STUDY.db.
        out: Output directory (must be empty or absent unless --overwrite true).
        decoding: Which evaluation to analyse: eval/sampled or eval/greedy.
        scoring: generation (the parsed reply, always the primary score), both (with the likelihood
            probe beside it; every prediction row needs its verdict), or auto (default: both when
            every row has one, else generation).
        results_dir: Where sweeps live, for trials without a run_dir attribute.
        top: How many configurations top_transfer_configs.csv lists.
        n_boot: Bootstrap resamples for every interval computed here.
        seed: Seed of every bootstrap (same inputs and seed, same numbers).
        overwrite: Replace a non-empty output directory.
        control_runs: The control arm's trial or study directories (trained on the non-spelling
            control file); runs under --runs whose params or fit.yaml say train_set control join them.
            Never candidates for selection; labelled control in every table.
        all_words: Training words that distinct_words null (every word) stands for in the slopes
            (22,873: the full build with seed 0).
        selection: How the validation-selected configuration is chosen: seed_mean (the best
            validation objective averaged over its seeds), first_seed (the best of its first seed,
            replicate 0: how a two-phase study chose the configuration it then replicated), or auto
            (first_seed when configurations have unequal numbers of seeds, else seed_mean). Ties go
            to the lower configuration id.
    """
    for flag, value, low in (
        ("top", top, 1),
        ("n_boot", n_boot, 1),
        ("seed", seed, 0),
        ("all_words", all_words, 1),
    ):
        if value < low:
            raise SpellxferError(f"--{flag} must be ≥ {low}, got {value}")
    check_output_dir(out, overwrite)
    found = discover(runs, study, storage, results_dir, decoding, control_runs)
    result = analyse(
        found, n_boot=n_boot, seed=seed, top=top, decoding=decoding, scoring=scoring, all_words=all_words,
        selection=selection,
    )
    result["info"] |= {
        "source": {"runs": runs, "study": study, "storage": storage, "control_runs": control_runs},
        "decoding": decoding,
        "name": study or _common_name(found.runs),
    }
    with atomic_output_dir(out, overwrite) as tmp:
        for name in TABLES:
            check_columns(result[name], name).to_csv(tmp / f"{name}.csv", index=False, float_format="%.6g")
        result["info"]["figures"] = figures.draw_all(result, found.runs, tmp / "figures")
        write_json(tmp / "analysis.json", _jsonable(result["info"]))
    print_summary(result, Path(out))
    return 0


def scorings_of(found: Discovery | list[Run]) -> list[str]:
    """``generation``, plus ``likelihood`` when the base model's and every run's rows have its verdict."""
    runs = found.runs if isinstance(found, Discovery) else found
    rows = [r for run in runs for r in (*run.predictions, *run.base_predictions)]
    return ["generation"] + (
        ["likelihood"] if rows and all(isinstance(r.get("likelihood_correct"), bool) for r in rows) else []
    )


def analyse(
    found: Discovery,
    n_boot: int = 2000,
    seed: int = 0,
    top: int = 10,
    decoding: str = "sampled",
    scoring: str = "auto",
    all_words: int = effects.ALL_WORDS,
    selection: str = "auto",
) -> dict:
    """Every table of the analysis (pandas DataFrames) plus ``info``.

    ``info`` holds the methods, the test families, counts and the base model's accuracy.
    """
    available = scorings_of(found)
    if scoring == "both" and "likelihood" not in available:
        raise SpellxferError(
            f"--scoring {scoring}: some prediction rows have no likelihood_correct (evaluate them "
            "with --scoring both or likelihood), so only generation can be analysed"
        )
    scorings = ["generation"] if scoring == "generation" else available
    model = next((r.trial.get("model") for r in found.runs if r.trial.get("model")), None)
    token_counts, token_info = tokens.recount(
        model, [row for r in found.runs[:1] for row in r.base_predictions]
    )
    run_rows, delta_rows, breakdown_rows = [], [], []
    for run in tracked(found.runs, "comparing runs with the base model", "runs"):
        for scoring in scorings:
            row, deltas = _compare_run(run, scoring, n_boot, seed)
            run_rows.append(row)
            delta_rows += deltas
        breakdown_rows += _breakdowns(run, n_boot, seed, token_counts)
    control_scorings = [s for s in scorings_of(found.control) if s in scorings] if found.control else []
    for run in tracked(found.control, "comparing control runs with the base model", "runs"):
        for scoring in control_scorings:
            row, deltas = _compare_run(run, scoring, n_boot, seed)
            run_rows.append(row)
            delta_rows += deltas
    per_run = pd.DataFrame(delta_rows)
    # per-run tests, Holm within (arm, scoring, endpoint) over the runs; with one seed per
    # configuration these are exactly the pre-specified families of config_effects
    for _, family in per_run.groupby(["arm", "scoring", "endpoint"]):
        per_run.loc[family.index, "p_adj"] = holm(family["mcnemar_p"].tolist())
    per_run["significant"] = per_run["p_adj"] <= configs.ALPHA
    table = pd.DataFrame(run_rows)
    for metric in effects.metrics_of(table):
        if effects.endpoint_of(metric) == "summary":
            continue
        p_adj = per_run[per_run["metric"] == metric].set_index(["run", "scoring"])["p_adj"]
        table[f"{metric}_p_adj"] = [
            p_adj.get((r, s), math.nan) for r, s in zip(table["run"], table["scoring"])
        ]
    # the control arm is labelled in runs.csv and per_run_deltas.csv and compared in arm_contrasts.csv;
    # everything that selects, ranks or fits across configurations sees the spelling arm only
    control_table = table[table["arm"] == "control"]
    table = table[table["arm"] == "spelling"]
    config_rows = configs.config_table(table)
    effect_rows = configs.config_effects(per_run[per_run["arm"] == "spelling"], decoding)
    breakdowns = pd.DataFrame(breakdown_rows)
    breakdowns = pd.concat([breakdowns, _pooled_breakdowns(breakdowns, n_boot, seed)], ignore_index=True)
    hp_parts, corr_parts = [], []
    for scoring in scorings:
        units = config_rows[config_rows["scoring"] == scoring]
        hp_parts += [
            effects.marginal_means(units, n_boot, seed, scoring, all_words),
            effects.importance(units, scoring, all_words),
        ]
        corr_parts.append(effects.correlations(units, n_boot, seed).assign(scoring=scoring))
    hp_parts = [h for h in hp_parts if len(h)]
    hp = pd.concat(hp_parts, ignore_index=True) if hp_parts else pd.DataFrame(columns=effects.COLUMNS)
    importance_method = (
        hp["method"].iloc[-1] if (hp["kind"] == "importance").any() else "no numeric hyperparameter varies"
    )
    generation = table[table["scoring"] == "generation"]
    objective_cols = [c for c in table.columns if c.startswith(("val/", "test/"))]
    top_cols = [
        "run",
        "trial",
        "config_id",
        "replicate",
        "transfer_score",
        "transfer_score_ci_low",
        "transfer_score_ci_high",
        *objective_cols,
        *TASK_COLUMNS,
        *[c for c in table.columns if c.startswith("params.")],
        "steps_trained",
        "run_dir",
    ]
    top_configs = generation.sort_values("transfer_score", ascending=False, kind="stable").head(top)[top_cols]
    top_configs.insert(0, "rank", range(1, len(top_configs) + 1))
    selected = selected_by_validation(
        generation, objective_cols, config_rows, effect_rows, decoding, selection
    )
    selected_id = selected["config_id"] if selected else None
    contrasts, control_info = arms.arm_contrasts(
        selected_id,
        found.runs,
        found.control,
        {"spelling": scorings, "control": control_scorings},
        decoding,
        n_boot,
        seed,
    )
    decided = arms.decisions(contrasts, selected_id, found.runs, found.control, scorings)
    n_seeds = config_rows[config_rows["scoring"] == "generation"]["n_seeds"]
    info = {
        "n_runs": len(found.runs),
        "n_configs": int(len(n_seeds)),
        "seeds_per_config": sorted({int(n) for n in n_seeds}),
        "scorings": scorings,
        "status_counts": found.status_counts,
        "skipped": found.skipped,
        "omitted_metric_entries": found.omitted_metric_entries,
        "base": _base_summary(found.runs[0], scorings),
        "endpoints": {
            "primary": [m for m in effects.metrics_of(table) if effects.endpoint_of(m) == "primary"],
            "secondary": [m for m in effects.SECONDARY if m in table],
            "summary (not tested)": list(effects.SUMMARY),
        },
        "families": _families(effect_rows, hp, selected, decoding, contrasts),
        "control": control_info | {"scorings": control_scorings},
        "decisions": decided,
        "token_counts": token_info,
        "n_boot": n_boot,
        "seed": seed,
        "methods": {
            "accuracy_interval": (
                "Wilson 95% (one sample per item) or item bootstrap (K samples per item); a bootstrap over "
                "words instead when several questions share a word"
            ),
            "delta": (
                "fine-tuned − base on the same items; paired percentile bootstrap 95% interval resampling "
                f"words ({n_boot} resamples, spellxfer.evaluation.stats.bootstrap_sums); exact McNemar test"
            ),
            "configurations": (
                "runs sharing a config_id are the seeds of one configuration: means over seeds, "
                "between-seed SD; with ≥ 2 seeds a configuration's delta is tested with a one-sample "
                "t-test across its seeds (t interval), with one seed by its run's McNemar test"
            ),
            "multiple_comparisons": (
                "Holm step-down (statsmodels multipletests; family-wise error rate 5%) within pre-specified "
                "families: per decoding × scoring, the primary endpoints (the subtasks) of all "
                "configurations form one family and the secondary endpoints (position and count totals) "
                "another; the validation-selected configuration is its own family; its contrasts with the "
                "base and the control (primary endpoints × the two contrasts) are one family per scoring, "
                "the secondary endpoints another, control − base another; the slopes of ONE endpoint and "
                "scoring form one family (the pre-registered one)"
            ),
            "arm_contrasts": (
                "the validation-selected configuration (mean over its seeds per question) − the base "
                "and − the control trained with the same configuration (mean over its seeds), and the "
                "control − the base; paired over the same questions, percentile bootstrap resampling words "
                f"({n_boot} resamples), exact McNemar on each question's majority verdict; delta_adj_ci: "
                "the family's simultaneous (Bonferroni) interval"
            ),
            "decision_rule": (
                "per subtask, docs/results.md 'Pre-registration': transfer when, for generation or the "
                "probe, both adjusted intervals (vs base, vs control) lie above 0, the accuracy interval "
                "lies above the best trivial baseline and every seed is above the base; format interference "
                "when generation falls below the base (adjusted interval below 0) while the probe does not, "
                "or 'spelled' becomes the most common reply format; else no effect; undetermined: <what is "
                "missing> when an input is absent"
            ),
            "transfer_score": (
                "mean of position and count accuracy (reported, not tested); interval by bootstrapping "
                f"words ({n_boot} resamples)"
            ),
            "across_configurations": (
                f"percentile bootstrap over configurations, {n_boot} resamples, seed {seed}"
            ),
            "importance": "regression (not fANOVA): " + importance_method,
            "breakdowns": (
                "per run: paired bootstrap over words of the delta within each bucket; 'all runs': mean "
                "over runs with a percentile bootstrap over runs; descriptive (not adjusted, not tested); "
                f"token counts: {token_info['source']}"
            ),
        },
        "provenance": {"packages": package_versions(), "git_commit": git_commit()},
        "selected_by_validation": selected,
    }
    return {
        "runs": pd.concat([table, control_table], ignore_index=True),
        "per_run_deltas": per_run,
        "config_effects": effect_rows,
        "metric_correlations": pd.concat(corr_parts, ignore_index=True),
        "top_transfer_configs": top_configs,
        "hyperparameter_effects": hp,
        "breakdowns": breakdowns,
        "configs": config_rows,
        "arm_contrasts": contrasts,
        "info": info,
    }


def _families(
    effect_rows: pd.DataFrame,
    hp: pd.DataFrame,
    selected: dict | None,
    decoding: str,
    contrasts: pd.DataFrame | None = None,
) -> list[dict]:
    """The multiple-comparison families, declared in analysis.json: name, endpoints, size, method."""

    def family(name: str, g: pd.DataFrame, unit: str) -> dict:
        return {
            "name": name,
            "scoring": g["scoring"].iloc[0],
            "endpoint": g["endpoint"].iloc[0],
            "metrics": sorted(g["metric"].unique()),
            "n_tests": len(g),
            "method": "Holm",
            "unit": unit,
        }

    out = []
    if len(effect_rows):
        for name, g in effect_rows.groupby("family", sort=False):
            out.append(family(name, g, "configuration"))
    if selected:
        rows = pd.DataFrame(selected["endpoints"])
        for name, g in rows.groupby("family", sort=False) if len(rows) else ():
            if not any(f["name"] == name for f in out):
                out.append(family(name, g, "the validation-selected configuration"))
    if len(hp) and "family" in hp and hp["family"].notna().any():
        for name, g in hp[hp["family"].notna()].groupby("family", sort=False):
            unit = "hyperparameter and training-pattern slopes of one endpoint"
            out.append(family(f"{decoding}/{name}", g, unit))
    if contrasts is not None and len(contrasts):
        for name, g in contrasts.groupby("family", sort=False):
            out.append(family(name, g, " and ".join(sorted(g["contrast"].unique()))))
    return out


SELECTIONS = {
    "seed_mean": "the best validation objective averaged over the configuration's seeds",
    "first_seed": (
        "the best validation objective of the configuration's first seed (replicate 0), the seeds "
        "after it reported as they come out: how a two-phase study chose what it replicated"
    ),
}


def selected_by_validation(
    table: pd.DataFrame,
    objective_cols: list[str],
    config_rows: pd.DataFrame,
    effect_rows: pd.DataFrame,
    decoding: str = "sampled",
    selection: str = "auto",
) -> dict | None:
    """The configuration a sweep would ship: the best validation objective (ties to the lower
    configuration id, as Optuna's ``best_trial``), with its test numbers (the mean over its seeds).
    ``selection`` (``SELECTIONS``): ``seed_mean``, ``first_seed``, or ``auto``: ``first_seed`` when
    configurations have unequal numbers of seeds (a mean of three seeds against single seeds is not
    like for like; a two-phase study picked on the first seed, then replicated), else ``seed_mean``.
    Its test results are an honest estimate, tested as their own Holm family; the top of
    ``top_transfer_configs`` is chosen on the test set itself and so is optimistic."""
    if selection not in ("auto", *SELECTIONS):
        raise SpellxferError(f"--selection must be auto, first_seed or seed_mean, got {selection!r}")
    col = next((c for c in objective_cols if c.startswith("val/")), None)
    cfg = config_rows[config_rows["scoring"] == "generation"]
    if col is None or col not in cfg or cfg[col].isna().all():
        return None

    def scores(rule: str) -> pd.Series:  # the objective each configuration is ranked by
        if rule == "seed_mean":
            return cfg.dropna(subset=[col]).set_index("config_id")[col]
        order = [c for c in ("replicate", "trial") if c in table]
        first = table.dropna(subset=[col]).sort_values(order, kind="stable").groupby("config_id").head(1)
        return first.set_index("config_id")[col]

    def best_of(ranked: pd.Series):
        top = ranked[ranked == ranked.max()]
        return min(top.index)

    unequal = cfg["n_seeds"].nunique() > 1
    rule = selection if selection != "auto" else ("first_seed" if unequal else "seed_mean")
    ranked = scores(rule)
    best_id = best_of(ranked)
    other = "seed_mean" if rule == "first_seed" else "first_seed"
    best_cfg = cfg[cfg["config_id"] == best_id].iloc[0]
    runs = table[table["config_id"] == best_cfg["config_id"]].sort_values("trial", kind="stable")
    best = runs.iloc[0]
    keys = ["transfer_score", "transfer_score_ci_low", "transfer_score_ci_high", *TASK_COLUMNS]
    one_seed = int(best_cfg["n_seeds"]) == 1
    values = (
        {k: float(best[k]) for k in keys if k in best and pd.notna(best[k])}
        if one_seed
        else {k: float(best_cfg[k]) for k in keys if k in best_cfg and pd.notna(best_cfg[k])}
    )
    return {
        "run": str(best["run"]) if one_seed else str(best_cfg["run"]),
        "config_id": int(best_cfg["config_id"]),
        "n_seeds": int(best_cfg["n_seeds"]),
        "runs": str(best_cfg["runs"]).split(),
        "objective": col,
        "selection": rule,
        "selection_rule": SELECTIONS[rule],
        "objective_value": float(ranked[best_id]),
        "objective_seed_mean": float(best_cfg[col]),
        "tied_runs": int((ranked == ranked[best_id]).sum()),
        "other_selection": {"selection": other, "config_id": int(best_of(scores(other)))},
        "test_rank": int((cfg["transfer_score"] > best_cfg["transfer_score"]).sum()) + 1,
        "endpoints": configs.selected_family(effect_rows, int(best_cfg["config_id"]), decoding),
        **values,
    }


def _clusters(items: dict, keys: list) -> list[str] | None:
    """Word labels for ``keys``, or None when every item has its own word (clustering changes nothing)."""
    words = [word_of(items[k], k) for k in keys]
    return words if len(set(words)) < len(words) else None


def _groups(items: dict) -> dict[str, list]:
    """task → items and task/subtask → items, tasks first, subtasks sorted."""
    groups: dict[str, list] = defaultdict(list)
    for key in sorted(items):
        row = items[key]["row"]
        groups[row["task"]].append(key)
        if row.get("subtask"):
            groups[f"{row['task']}/{row['subtask']}"].append(key)
    return dict(
        sorted(groups.items(), key=lambda kv: (kv[0].split("/")[0] != "position", "/" in kv[0], kv[0]))
    )


def _transfer_ci(
    items: dict, pos: list, cnt: list, n_boot: int, seed: int, base: dict | None = None
) -> tuple[float, float]:
    """Percentile interval of (position accuracy + count accuracy) / 2 (or of its delta, with
    ``base``) when words are resampled: a word's position and count questions move together."""
    if not pos or not cnt:
        return (math.nan, math.nan)
    value = (
        (lambda k: np.mean(items[k]["correct"]))
        if base is None
        else (lambda k: np.mean(items[k]["correct"]) - np.mean(base[k]["correct"]))
    )
    words = sorted({word_of(items[k], k) for k in (*pos, *cnt)})
    index = {w: i for i, w in enumerate(words)}
    arrays = np.zeros((4, len(words)))
    for row, keys in ((0, pos), (2, cnt)):
        for k in keys:
            arrays[row, index[word_of(items[k], k)]] += value(k)
            arrays[row + 1, index[word_of(items[k], k)]] += 1
    if len(words) < 2:
        return (math.nan, math.nan)
    ps, pn, cs, cn = bootstrap_sums(arrays.T, n_boot, seed).T
    return percentile_interval((ps / pn + cs / cn) / 2, 0.95)


# Per subtask, what evaluate wrote into metrics.json beside the accuracy (the best trivial baseline,
# whether the scored accuracy beats it and, for generation, the constant-answer and no-answer rates),
# copied into runs.csv when present.
def _baseline_columns(run: Run, scoring: str, group: str) -> dict:
    entry = ((run.metrics or {}).get("subtasks") or {}).get(group)
    if not isinstance(entry, dict):
        return {}
    trivial = entry.get("best_trivial") if isinstance(entry.get("best_trivial"), dict) else {}
    diag = entry.get("diagnostics") if isinstance(entry.get("diagnostics"), dict) else {}
    scored = entry.get("likelihood") if scoring == "likelihood" else entry
    scored = scored if isinstance(scored, dict) else {}
    m = f"{group}_accuracy"
    out = {f"{m}_best_trivial": trivial.get("accuracy"), f"{m}_beats_trivial": scored.get("beats_trivial")}
    if scoring == "generation":
        out |= {
            f"{m}_constant_answer": diag.get("constant_answer"),
            f"{m}_no_answer_rate": diag.get("no_answer_rate"),
        }
    return {k: v for k, v in out.items() if v is not None}


def _compare_run(run: Run, scoring: str, n_boot: int, seed: int) -> tuple[dict, list[dict]]:
    """One row of runs.csv for one scoring (accuracies, deltas, params) and the run's per-group delta rows."""
    field = SCORINGS[scoring]
    base, tuned = item_scores(run.base_predictions, field), item_scores(run.predictions, field)
    row = {
        "run": run.name,
        "arm": run.arm,
        "scoring": scoring,
        "trial": run.trial.get("number"),
        "study": run.trial.get("study"),
        "config_id": run.config_id,
        "replicate": run.trial.get("replicate", 0),
        "seed": run.trial.get("seed"),
        "steps_trained": run.steps_trained,
        "run_dir": str(run.directory),
    }
    deltas = []
    groups = _groups(tuned)
    for group, keys in groups.items():
        m = f"{group}_accuracy"
        s = accuracy_summary(
            [tuned[k]["correct"] for k in keys], n_boot=n_boot, seed=seed, clusters=_clusters(tuned, keys)
        )
        common = [k for k in keys if k in base]
        d = (
            paired_comparison(
                [np.mean(base[k]["correct"]) for k in common],
                [np.mean(tuned[k]["correct"]) for k in common],
                n_boot=n_boot,
                seed=seed,
                clusters=_clusters(tuned, common),
            )
            if common
            else None
        )
        row |= {
            m: s["accuracy"],
            f"{m}_ci_low": s["ci_low"],
            f"{m}_ci_high": s["ci_high"],
            f"{m}_n": s["n"],
            f"{m}_base": d["acc_a"] if d else math.nan,
            f"{m}_delta": d["diff"] if d else math.nan,
            f"{m}_delta_ci_low": d["ci_low"] if d else math.nan,
            f"{m}_delta_ci_high": d["ci_high"] if d else math.nan,
            f"{m}_mcnemar_p": d["mcnemar_p"] if d else math.nan,
        } | _baseline_columns(run, scoring, group)
        if d:
            deltas.append(
                {
                    "run": run.name,
                    "arm": run.arm,
                    "scoring": scoring,
                    "config_id": row["config_id"],
                    "metric": m,
                    "endpoint": effects.endpoint_of(m),
                    "base_accuracy": d["acc_a"],
                    "tuned_accuracy": d["acc_b"],
                    "delta": d["diff"],
                    "delta_ci_low": d["ci_low"],
                    "delta_ci_high": d["ci_high"],
                    "mcnemar_p": d["mcnemar_p"],
                    "n_items": d["n"],
                }
            )
    pos, cnt = groups.get("position", []), groups.get("count", [])
    row["transfer_score"] = (row.get("position_accuracy", math.nan) + row.get("count_accuracy", math.nan)) / 2
    row["transfer_score_ci_low"], row["transfer_score_ci_high"] = _transfer_ci(tuned, pos, cnt, n_boot, seed)
    row["transfer_score_delta"] = (
        row.get("position_accuracy_delta", math.nan) + row.get("count_accuracy_delta", math.nan)
    ) / 2
    row["transfer_score_delta_ci_low"], row["transfer_score_delta_ci_high"] = _transfer_ci(
        tuned, [k for k in pos if k in base], [k for k in cnt if k in base], n_boot, seed, base
    )
    name = run.trial.get("objective_name")
    if name and allowed_metric(name) and run.trial.get("objective") is not None:
        row[name] = run.trial["objective"]
    row |= {f"params.{k}": v for k, v in run.params.items()}
    return row, deltas


def _base_summary(run: Run, scorings: list[str] | None = None) -> dict:
    """The base model's test accuracy per task and subtask (and probe accuracy), with the best trivial
    baseline of each subtask when its metrics.json has one."""
    out: dict = {}
    subtasks = (run.base_metrics or {}).get("subtasks") or {}
    for scoring in scorings or ["generation"]:
        items = item_scores(run.base_predictions, SCORINGS[scoring])
        for group, keys in _groups(items).items():
            s = accuracy_summary([items[k]["correct"] for k in keys])
            key = f"{group}_accuracy" if scoring == "generation" else f"{group}_accuracy ({scoring})"
            out[key] = {k: s[k] for k in ("accuracy", "ci_low", "ci_high", "n")}
            entry = subtasks.get(group)
            if isinstance(entry, dict) and isinstance(entry.get("best_trivial"), dict):
                out[key]["best_trivial"] = entry["best_trivial"]
            if (
                scoring == "generation"
                and isinstance(entry, dict)
                and isinstance(entry.get("diagnostics"), dict)
            ):
                out[key]["constant_answer"] = entry["diagnostics"].get("constant_answer")
                out[key]["no_answer_rate"] = entry["diagnostics"].get("no_answer_rate")
    return out


def _breakdowns(run: Run, n_boot: int, seed: int, token_counts: dict | None = None) -> list[dict]:
    """Base vs fine-tuned accuracy (generation) and the paired delta in every bucket of every breakdown;
    the token-count buckets count with the evaluated model's tokenizer (``token_counts``)."""
    from spellxfer.evaluation.evaluate import BREAKDOWNS  # imports torch (seconds): not for --help

    base, tuned = item_scores(run.base_predictions), item_scores(run.predictions)
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for key in sorted(set(base) & set(tuned)):
        row = base[key]["row"]
        if token_counts and key in token_counts:
            row = {**row, "n_tokens": token_counts[key]}
        for name, bucket_of in BREAKDOWNS.items():
            bucket = bucket_of(row)
            if bucket is not None:
                groups[(name, row["task"], bucket)].append(key)
    out = []
    for (name, task, bucket), keys in sorted(groups.items()):
        a = accuracy_summary([base[k]["correct"] for k in keys], n_boot=n_boot, seed=seed)
        b = accuracy_summary([tuned[k]["correct"] for k in keys], n_boot=n_boot, seed=seed)
        d = paired_comparison(
            [np.mean(base[k]["correct"]) for k in keys],
            [np.mean(tuned[k]["correct"]) for k in keys],
            n_boot=n_boot,
            seed=seed,
            clusters=_clusters(base, keys),
        )
        out.append(
            {
                "run": run.name,
                "breakdown": name,
                "bucket": bucket,
                "metric": f"{task}_accuracy",
                "n_items": len(keys),
                "base_accuracy": a["accuracy"],
                "base_ci_low": a["ci_low"],
                "base_ci_high": a["ci_high"],
                "tuned_accuracy": b["accuracy"],
                "tuned_ci_low": b["ci_low"],
                "tuned_ci_high": b["ci_high"],
                "delta": d["diff"],
                "delta_ci_low": d["ci_low"],
                "delta_ci_high": d["ci_high"],
                "mcnemar_p": d["mcnemar_p"],
            }
        )
    return out


def _pooled_breakdowns(per_run: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """``run = "all runs"``: mean over runs of each bucket's accuracies and delta, bootstrap over runs."""
    rows = []
    for (name, metric, bucket), g in per_run.groupby(["breakdown", "metric", "bucket"], sort=False):
        row = {
            "run": "all runs",
            "breakdown": name,
            "bucket": bucket,
            "metric": metric,
            "n_items": int(g["n_items"].median()),
            "n_runs": len(g),
        }
        # one base model per study: the same numbers in every run of it (averaged across studies)
        row |= {c: g[c].mean() for c in ("base_accuracy", "base_ci_low", "base_ci_high")}
        for col, prefix in (("tuned_accuracy", "tuned"), ("delta", "delta")):
            y = g[col].to_numpy(float)
            row[col] = float(y.mean())
            if len(g) == 1:  # one run: its own interval (over items) is the only one there is
                row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = (
                    g[f"{prefix}_ci_low"].iloc[0],
                    g[f"{prefix}_ci_high"].iloc[0],
                )
            else:
                row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = effects.bootstrap_ci(
                    effects._mean, [y], n_boot, seed
                )
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
    t = Table(
        title=(
            f"top configurations by test transfer_score ({info['n_runs']} complete runs; not analysed: "
            f"{len(info['skipped'])})"
        )
    )
    for col in ("rank", "run", "transfer_score", "Δ position [95% CI]", "Δ count [95% CI]"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for _, r in table.head(5).iterrows():
        t.add_row(
            str(r["rank"]),
            r["run"],
            f"{r['transfer_score']:.3f}",
            *[
                f"{r[f'{k}_accuracy_delta']:+.3f} [{r[f'{k}_accuracy_delta_ci_low']:+.3f}, "
                f"{r[f'{k}_accuracy_delta_ci_high']:+.3f}]"
                for k in TASKS
            ],
        )
    print_table(t, console)
    if sel := info.get("selected_by_validation"):
        console.print(
            f"selected by {sel['objective']} ({sel['selection']}, the unbiased pick): "
            f"{sel['run']}, test transfer_score "
            f"{sel['transfer_score']:.3f}, rank {sel['test_rank']} of {info['n_configs']} configurations "
            "on the test set"
        )
    console.print(f"wrote {', '.join(f'{n}.csv' for n in TABLES)}, figures/ and analysis.json to {out}")
