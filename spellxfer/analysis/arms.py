"""The validation-selected configuration against the base model and the control arm, and the
pre-registered decision per subtask (docs/results.md, "Pre-registration: the transfer study").

- ``arm_contrasts``: for the selected spelling configuration (chosen on validation only, among
  spelling runs; control runs never compete) and each scoring, per endpoint: fine-tuned − base and
  fine-tuned − control, where "fine-tuned" is the mean over the configuration's seeds per test
  question and "control" the mean over the seeds of the control runs trained with the SAME
  configuration (matched by their configuration parameters, ``train_set`` aside; by configuration
  id when runs carry no parameters); and control − base (does any fine-tuning move answer
  habits?). Each difference is paired over the same questions (``paired_comparison``: percentile
  bootstrap resampling words). Its p-value: with one seed on each side the exact McNemar test;
  with several, a one-sample t-test of the per-word mean differences (a majority vote across seeds
  would throw the seeds' fractions away).
  Holm families, per scoring: the primary endpoints × the two contrasts of the selected
  configuration; the secondary endpoints × the same two; control − base per endpoint kind.
  ``delta_adj_ci_*`` is the family's simultaneous interval (Bonferroni, confidence 1 − 0.05 / m
  for m tests), which holds wherever Holm's decisions do; the decision rule reads it.
- ``decisions``: per subtask, transfer / format interference / no effect by the rule fixed in
  advance, or ``undetermined: <what is missing>``.

Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
from scipy import stats

from spellxfer.analysis.runs import SCORINGS, Run, item_scores, word_of
from spellxfer.evaluation.stats import accuracy_summary, holm, paired_comparison

ALPHA = 0.05
CONTRASTS = (("fine-tuned − base", "spelling", "base"), ("fine-tuned − control", "spelling", "control"),
             ("control − base", "control", "base"))
"""(contrast, the arm of the model compared, its reference)."""
COLUMNS = [
    "contrast",
    "arm",
    "reference",
    "scoring",
    "metric",
    "endpoint",
    "config_id",
    "n_seeds",
    "control_runs",
    "tuned_accuracy",
    "tuned_ci_low",
    "tuned_ci_high",
    "reference_accuracy",
    "best_trivial",
    "delta",
    "delta_ci_low",
    "delta_ci_high",
    "delta_adj_ci_low",
    "delta_adj_ci_high",
    "seeds_same_direction",
    "p_value",
    "test",
    "p_adj",
    "family",
    "n_items",
]
SUBTASK_GROUPS = ("position/nth_letter", "position/letter_index", "count/word_length", "count/letter_count")
TOTALS = ("position", "count")


def config_key(run: Run) -> tuple:
    """What makes two runs the same configuration across arms: their parameters, ``train_set`` aside."""
    return tuple(sorted((k, str(v)) for k, v in run.params.items() if k != "train_set"))


def matched_control(selected: list[Run], control: list[Run]) -> tuple[list[Run], str]:
    """The control runs trained with the selected configuration, and how they were matched."""
    key = config_key(selected[0])
    if key:
        return [r for r in control if config_key(r) == key], "configuration parameters"
    return [r for r in control if r.config_id == selected[0].config_id], "configuration id"


def _group_of(row: dict) -> list[str]:
    return [row["task"]] + ([f"{row['task']}/{row['subtask']}"] if row.get("subtask") else [])


def _pooled(arms: list[dict], keys: list) -> np.ndarray:
    """Per question: the mean over seeds of each seed's per-question accuracy."""
    return np.array([np.mean([np.mean(a[k]["correct"]) for a in arms]) for k in keys])


def _seeds_same_direction(seeds: list[dict], reference: np.ndarray, keys: list, delta: float) -> bool:
    """Every seed differs from the reference in the direction of the mean difference (and none equals it)."""
    if not delta or not math.isfinite(delta):
        return False
    diffs = [float(np.mean([np.mean(s[k]["correct"]) for k in keys]) - reference.mean()) for s in seeds]
    return all(np.sign(d) == np.sign(delta) for d in diffs)


def _p_value(d: dict, ref: np.ndarray, b: np.ndarray, words: list[str], single: bool) -> tuple[float, str]:
    """The test of one contrast (see the module docstring).

    McNemar for two single runs, else a t-test over words.
    """
    if single:
        return float(d["mcnemar_p"]), "exact McNemar"
    diffs = pd.Series(b - ref).groupby(np.asarray(words)).mean().to_numpy()
    if len(diffs) < 2 or np.ptp(diffs) == 0:
        return (1.0 if not diffs.any() else 0.0), "paired t-test over words (no spread)"
    return float(stats.ttest_1samp(diffs, 0.0).pvalue), "paired t-test over words"


def _best_trivial(run: Run, group: str) -> float:
    entry = ((run.base_metrics or {}).get("subtasks") or {}).get(group)
    trivial = entry.get("best_trivial") if isinstance(entry, dict) else None
    value = trivial.get("accuracy") if isinstance(trivial, dict) else None
    return float(value) if isinstance(value, int | float) else math.nan


def arm_contrasts(
    selected_id,
    spelling: list[Run],
    control: list[Run],
    scorings: dict[str, list[str]],
    decoding: str,
    n_boot: int,
    seed: int,
) -> tuple[pd.DataFrame, dict]:
    """The table of contrasts (``COLUMNS``) and what was compared (``info["control"]``).

    ``scorings``: arm → the scorings its rows carry (``{"spelling": [...], "control": [...]}``).
    """
    chosen = [r for r in spelling if r.config_id == selected_id]
    matched, how = matched_control(chosen, control) if chosen and control else ([], "none")
    info = {
        "n_runs": len(control),
        "n_configs": len({config_key(r) for r in control}),
        "matched_by": how,
        "matched_runs": [r.name for r in matched],
    }
    rows, pairs = [], []
    if not chosen:
        return pd.DataFrame(columns=COLUMNS), info
    base_run = chosen[0]
    for scoring in scorings["spelling"]:
        field = SCORINGS[scoring]
        base = item_scores(base_run.base_predictions, field)
        tuned = [item_scores(r.predictions, field) for r in chosen]
        ctl = (
            [item_scores(r.predictions, field) for r in matched]
            if scoring in scorings.get("control", [])
            else []
        )
        groups: dict[str, list] = {}
        for key, item in base.items():
            for g in _group_of(item["row"]):
                groups.setdefault(g, []).append(key)
        for group in (*SUBTASK_GROUPS, *TOTALS):
            metric = f"{group}_accuracy"
            endpoint = "primary" if "/" in group else "secondary"
            for contrast, arm, reference in CONTRASTS:
                seeds = tuned if arm == "spelling" else ctl
                if not seeds or (reference == "control" and not ctl):
                    continue
                keys = sorted(k for k in groups.get(group, []) if all(k in s for s in (*seeds, *ctl)))
                if not keys:
                    continue
                ref = _pooled([base], keys) if reference == "base" else _pooled(ctl, keys)
                b = _pooled(seeds, keys)
                words = [word_of(base[k], k) for k in keys]
                d = paired_comparison(ref, b, n_boot=n_boot, seed=seed, clusters=words)
                p_value, test = _p_value(
                    d, ref, b, words, single=len(seeds) == 1 and (reference == "base" or len(ctl) == 1)
                )
                acc = accuracy_summary(
                    [[v for s in seeds for v in s[k]["correct"]] for k in keys],
                    n_boot=n_boot,
                    seed=seed,
                    clusters=words,
                )
                family = (
                    f"{decoding}/{scoring}/{endpoint}/control vs base"
                    if arm == "control"
                    else f"{decoding}/{scoring}/{endpoint}/validation-selected vs base and control"
                )
                rows.append(
                    {
                        "contrast": contrast,
                        "arm": arm,
                        "reference": reference,
                        "scoring": scoring,
                        "metric": metric,
                        "endpoint": endpoint,
                        "config_id": selected_id,
                        "n_seeds": len(seeds),
                        "control_runs": " ".join(r.name for r in matched) or None,
                        "tuned_accuracy": acc["accuracy"],
                        "tuned_ci_low": acc["ci_low"],
                        "tuned_ci_high": acc["ci_high"],
                        "reference_accuracy": d["acc_a"],
                        "best_trivial": _best_trivial(base_run, group),
                        "delta": d["diff"],
                        "delta_ci_low": d["ci_low"],
                        "delta_ci_high": d["ci_high"],
                        "seeds_same_direction": _seeds_same_direction(seeds, ref, keys, d["diff"]),
                        "p_value": p_value,
                        "test": test,
                        "family": family,
                        "n_items": d["n"],
                    }
                )
                pairs.append((ref, b, words))
    out = pd.DataFrame(rows, columns=COLUMNS)
    for _, g in out.groupby("family", sort=False):
        out.loc[g.index, "p_adj"] = holm(g["p_value"].tolist())
        level = 1 - ALPHA / len(g)  # simultaneous over the family: Bonferroni, valid for Holm's decisions
        for i in g.index:
            ref, b, words = pairs[i]
            d = paired_comparison(ref, b, confidence=level, n_boot=n_boot, seed=seed, clusters=words)
            out.loc[i, ["delta_adj_ci_low", "delta_adj_ci_high"]] = (d["ci_low"], d["ci_high"])
    return out, info


def _spelled_shift(runs: list[Run], group: str) -> bool | None:
    """Whether the replies turned into spelled-out words: ``spelled`` is the most common reply format
    of the fine-tuned runs (summed over seeds) and not of the base model; None without formats."""

    def formats(metrics: dict | None) -> Counter | None:
        entry = ((metrics or {}).get("subtasks") or {}).get(group)
        f = ((entry or {}).get("diagnostics") or {}).get("formats") if isinstance(entry, dict) else None
        return (
            Counter({k: v for k, v in f.items() if isinstance(v, int | float)})
            if isinstance(f, dict)
            else None
        )

    base = formats(runs[0].base_metrics)
    tuned = [formats(r.metrics) for r in runs]
    if base is None or any(t is None for t in tuned) or not sum(base.values()):
        return None
    total = sum(tuned, Counter())
    return bool(total) and total.most_common(1)[0][0] == "spelled" and base.most_common(1)[0][0] != "spelled"


def _above(row: pd.Series | None) -> bool | None:
    return None if row is None or pd.isna(row["delta_adj_ci_low"]) else bool(row["delta_adj_ci_low"] > 0)


def _below(row: pd.Series | None) -> bool | None:
    return None if row is None or pd.isna(row["delta_adj_ci_high"]) else bool(row["delta_adj_ci_high"] < 0)


def _all(values: list[bool | None]) -> bool | None:
    """Three-valued AND: False if any is False, None if any is unknown, else True."""
    return False if False in values else None if None in values else True


def _any(values: list[bool | None]) -> bool | None:
    """Three-valued OR: True if any is True, None if any is unknown, else False."""
    return True if True in values else None if None in values else False


def decisions(
    table: pd.DataFrame, selected_id, spelling: list[Run], control: list[Run], scorings: list[str]
) -> list[dict]:
    """Per subtask, the pre-registered decision with the evidence it read (docs/results.md)."""
    chosen = [r for r in spelling if r.config_id == selected_id]
    matched = matched_control(chosen, control)[0] if chosen and control else []
    out = []
    for group in SUBTASK_GROUPS:
        metric = f"{group}_accuracy"
        missing: list[str] = []
        if not chosen:
            out.append(
                {
                    "subtask": group.split("/")[1],
                    "metric": metric,
                    "decision": "undetermined: no validation objective to select a configuration",
                    "evidence": {},
                }
            )
            continue
        if not control:
            missing.append("no control runs (--control_runs)")
        elif not matched:
            missing.append("no control run trained with the selected configuration")
        if "likelihood" not in scorings:
            missing.append("no likelihood probe verdicts")

        def row(contrast: str, scoring: str, metric: str = metric) -> pd.Series | None:
            g = table[
                (table["contrast"] == contrast) & (table["scoring"] == scoring) & (table["metric"] == metric)
            ]
            return g.iloc[0] if len(g) else None

        evidence, per_scoring = {}, []
        for scoring in ("generation", "likelihood"):
            vs_base, vs_control = row("fine-tuned − base", scoring), row("fine-tuned − control", scoring)
            trivial = (
                None
                if vs_base is None or pd.isna(vs_base["best_trivial"])
                else bool(vs_base["tuned_ci_low"] > vs_base["best_trivial"])
            )
            seeds = (
                None if vs_base is None else bool(vs_base["seeds_same_direction"]) and vs_base["delta"] > 0
            )
            conds = {
                "above_base": _above(vs_base),
                "above_control": _above(vs_control),
                "above_best_trivial": trivial,
                "every_seed_above_base": seeds,
            }
            evidence[scoring] = conds | {
                "delta_vs_base": None if vs_base is None else float(vs_base["delta"]),
                "delta_vs_control": None if vs_control is None else float(vs_control["delta"]),
            }
            per_scoring.append(_all(list(conds.values())))
        if (
            row("fine-tuned − base", "generation") is not None
            and evidence["generation"]["above_best_trivial"] is None
        ):
            missing.append("no best trivial baseline (the base model's metrics.json)")
        transfer = _any(per_scoring)
        gen_below = _below(row("fine-tuned − base", "generation"))
        probe = row("fine-tuned − base", "likelihood")
        probe_not_below = (
            None
            if probe is None or pd.isna(probe["delta_adj_ci_high"])
            else bool(probe["delta_adj_ci_high"] >= 0)
        )
        spelled = _spelled_shift(chosen, group)
        interference = _any([_all([gen_below, probe_not_below]), spelled])
        evidence["format"] = {
            "generation_below_base": gen_below,
            "probe_not_below_base": probe_not_below,
            "replies_turned_spelled": spelled,
        }
        if spelled is None:
            missing.append("no reply-format diagnostics (metrics.json formats)")
        if transfer:
            decision = "transfer"
        elif transfer is None:
            decision = "undetermined: " + "; ".join(missing or ["an unknown condition"])
        elif interference:
            decision = "format interference"
        elif interference is None:
            decision = "undetermined: " + "; ".join(missing or ["an unknown condition"])
        else:
            decision = "no effect"
        out.append(
            {
                "subtask": group.split("/")[1],
                "metric": metric,
                "decision": decision,
                "evidence": evidence,
                "missing": missing,
            }
        )
    return out
