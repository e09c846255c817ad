"""The analysis figures (matplotlib, Agg backend: no display needed). Every accuracy has its 95% interval.

Each ``draw_*`` function writes one PNG and returns its caption; ``draw_all`` draws them all and
returns ``[{"file", "title", "caption"}]`` for ``analysis.json`` and the report. Axis labels name
only position accuracy, count accuracy and transfer_score (trained on spelling, evaluated on
position and count only).
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spellxfer.tasks.buckets import LENGTH_BUCKETS  # noqa: E402

COLORS = {"position_accuracy": "tab:blue", "count_accuracy": "tab:orange", "transfer_score": "tab:green"}
LABELS = {"position_accuracy": "position accuracy", "count_accuracy": "count accuracy", "transfer_score": "transfer_score"}
DPI = 110


def draw_all(result: dict, runs: list, out: Path) -> list[dict]:
    """Every figure of the analysis into ``out``; returns their file names, titles and captions."""
    out.mkdir(parents=True, exist_ok=True)
    table, hp = result["runs"], result["hyperparameter_effects"]
    figs = [
        ("position_vs_count.png", "Position vs count accuracy per run", position_vs_count(table, result, out / "position_vs_count.png")),
        ("run_deltas.png", "Base → fine-tuned change per run", run_deltas(table, out / "run_deltas.png")),
    ]  # fmt: skip
    if len(hp):
        for name in hp.loc[hp["kind"] == "marginal_mean", "hyperparameter"].unique():
            f = f"effect_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
            figs.append((f, f"Effect of {name}", effect_plot(hp, name, out / f)))
    if any(r.curve for r in runs):
        figs.append(("learning_curves.png", "Validation learning curves", learning_curves(runs, table, out / "learning_curves.png")))
    bd = result["breakdowns"]
    if len(bd) and (bd["breakdown"] == "n_tokens").any():
        best = table.sort_values("transfer_score", ascending=False).iloc[0]["run"]
        figs.append(("accuracy_by_token_count.png", "Accuracy by Qwen3 token count, before and after fine-tuning",
                     accuracy_by_token_count(bd, best, out / "accuracy_by_token_count.png")))  # fmt: skip
    if len(bd):
        figs.append(("gains_by_breakdown.png", "Where the gains are", gains_by_breakdown(bd, out / "gains_by_breakdown.png")))
    return [{"file": f"figures/{f}", "title": t, "caption": c} for f, t, c in figs]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _err(est, low, high) -> np.ndarray:
    """matplotlib's asymmetric error bars from an interval (nan interval → no bar)."""
    est, low, high = (np.asarray(v, dtype=float) for v in (est, low, high))
    return np.nan_to_num(np.vstack([est - low, high - est]), nan=0.0).clip(min=0)


def position_vs_count(table: pd.DataFrame, result: dict, path: Path) -> str:
    base = result["info"]["base"]
    corr = result["metric_correlations"]
    pearson = corr[(corr["quantity"] == "accuracy") & (corr["method"] == "pearson")].iloc[0]
    fig, ax = plt.subplots(figsize=(6, 5))
    p, c = table["position_accuracy"], table["count_accuracy"]
    ax.errorbar(p, c, xerr=_err(p, table["position_accuracy_ci_low"], table["position_accuracy_ci_high"]),
                yerr=_err(c, table["count_accuracy_ci_low"], table["count_accuracy_ci_high"]),
                fmt="o", color="tab:blue", ecolor="lightsteelblue", capsize=2, label="fine-tuned runs")  # fmt: skip
    bp, bc = base["position_accuracy"], base["count_accuracy"]
    ax.errorbar([bp["accuracy"]], [bc["accuracy"]], xerr=_err([bp["accuracy"]], [bp["ci_low"]], [bp["ci_high"]]),
                yerr=_err([bc["accuracy"]], [bc["ci_low"]], [bc["ci_high"]]), fmt="*", markersize=14,
                color="black", capsize=3, label="base model")  # fmt: skip
    ax.set_xlabel("position accuracy (95% CI)")
    ax.set_ylabel("count accuracy (95% CI)")
    if np.isnan(pearson["ci_low"]):
        ax.set_title(f"n = {len(table)} run(s): too few for a correlation", fontsize=10)
    else:
        ax.set_title(f"Pearson r = {pearson['estimate']:.2f} [{pearson['ci_low']:.2f}, {pearson['ci_high']:.2f}], "
                     f"n = {len(table)} runs", fontsize=10)  # fmt: skip
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return ("One point per fine-tuned run, error bars are 95% intervals of each accuracy; the star is the "
            "base model. Points up and to the right of the star improved on both tasks; a cloud that rises "
            "to the right means runs that transfer to position also transfer to count (the title gives the "
            "Pearson correlation with its bootstrap interval over runs).")  # fmt: skip


def run_deltas(table: pd.DataFrame, path: Path) -> str:
    t = table.sort_values("transfer_score", kind="stable").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(t) + 1.2)))
    y = np.arange(len(t))
    for off, task in ((-0.15, "position_accuracy"), (0.15, "count_accuracy")):
        d = t[f"{task}_delta"]
        ax.errorbar(d, y + off, xerr=_err(d, t[f"{task}_delta_ci_low"], t[f"{task}_delta_ci_high"]), fmt="o",
                    markersize=4, capsize=2, color=COLORS[task], label=f"Δ {LABELS[task]}")  # fmt: skip
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, t["run"], fontsize=7)
    ax.set_xlabel("fine-tuned − base (paired bootstrap 95% CI)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return ("Per run (best transfer_score at the top), the change in position and count accuracy from the base "
            "model on the same items, with paired bootstrap 95% intervals. An interval entirely right of 0 is a "
            "gain; the tables give Holm-adjusted McNemar p-values.")  # fmt: skip


def effect_plot(hp: pd.DataFrame, name: str, path: Path) -> str:
    m = hp[(hp["kind"] == "marginal_mean") & (hp["hyperparameter"] == name)]
    levels = list(dict.fromkeys(m["value"]))
    x = np.arange(len(levels))
    fig, ax = plt.subplots(figsize=(6, 4))
    for off, metric in ((-0.15, "position_accuracy"), (0.0, "count_accuracy"), (0.15, "transfer_score")):
        g = m[m["metric"] == metric].set_index("value").loc[levels]
        ax.errorbar(x + off, g["estimate"], yerr=_err(g["estimate"], g["ci_low"], g["ci_high"]), fmt="o-",
                    capsize=3, color=COLORS[metric], label=LABELS[metric])  # fmt: skip
    n = m[m["metric"] == "transfer_score"].set_index("value").loc[levels, "n_runs"]
    ax.set_xticks(x, [f"{lv}\n(n={k})" for lv, k in zip(levels, n)], fontsize=8)
    ax.set_xlabel(name)
    ax.set_ylabel("mean over runs (95% CI)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return (f"Mean accuracy of the runs at each value of {name} (n = runs at that value), with a bootstrap 95% "
            "interval over those runs. A slope across values that the intervals do not cover is an effect; "
            "other hyperparameters vary too, so read it next to the regression ranking.")  # fmt: skip


def learning_curves(runs: list, table: pd.DataFrame, path: Path) -> str:
    best = table.sort_values("transfer_score", ascending=False).iloc[0]["run"]
    metrics = [m for m in ("val/position_accuracy", "val/count_accuracy", "val/transfer_score")
               if any(m in row for r in runs for row in r.curve)]  # fmt: skip
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for r in runs:
            pts = [(row["step"], row[metric]) for row in r.curve if metric in row]
            if pts:
                s, v = zip(*sorted(pts))
                is_best = r.name == best
                ax.plot(s, v, color="tab:red" if is_best else "grey", alpha=1 if is_best else 0.35,
                        lw=2 if is_best else 1, label=f"best: {best}" if is_best else None)  # fmt: skip
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)
    return ("Validation position and count accuracy (from each trial's metrics.jsonl) against training step; "
            "grey lines are all runs, red the run with the best test transfer_score. Curves that rise and then "
            "fall show over-training on spelling; validation points are on small sets, so see the test "
            "intervals for uncertainty.")  # fmt: skip


# Natural order of each breakdown's buckets (the buckets `evaluate` reports); others sort by name.
BUCKET_ORDER = {
    "word_length": [name for name, _, _ in LENGTH_BUCKETS],
    "n_tokens": ["1", "2", "3", "4+"],
    "letter_position": ["0", "1", "2", "3", "4-6", "7+", "3rd-to-last", "2nd-to-last", "last"],
}


def bucket_sort_key(breakdown: str):
    order = BUCKET_ORDER.get(breakdown, [])
    return lambda b: (order.index(b), "") if b in order else (len(order), str(b))


def accuracy_by_token_count(bd: pd.DataFrame, best: str, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    tok = bd[bd["breakdown"] == "n_tokens"]
    for ax, metric in zip(axes, ("position_accuracy", "count_accuracy")):
        g = tok[(tok["metric"] == metric) & (tok["run"] == best)]
        g = g.sort_values("bucket", key=lambda s: s.map(bucket_sort_key("n_tokens")))
        x = np.arange(len(g))
        ax.errorbar(x - 0.1, g["base_accuracy"], yerr=_err(g["base_accuracy"], g["base_ci_low"], g["base_ci_high"]),
                    fmt="s", capsize=3, color="black", label="base")  # fmt: skip
        ax.errorbar(x + 0.1, g["tuned_accuracy"], yerr=_err(g["tuned_accuracy"], g["tuned_ci_low"], g["tuned_ci_high"]),
                    fmt="o", capsize=3, color=COLORS[metric], label=f"fine-tuned ({best})")  # fmt: skip
        ax.set_xticks(x, [f"{b}\n(n={n})" for b, n in zip(g["bucket"], g["n_items"])], fontsize=8)
        ax.set_xlabel("Qwen3 tokens in the word")
        ax.set_title(LABELS[metric], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy (95% CI)")
    _save(fig, path)
    return (f"Accuracy of the base model and of the best run ({best}) by how many Qwen3 tokens the word has "
            "(n = items). Words split into more tokens are where character-level knowledge is hardest to "
            "reach; a larger gain there is transfer where it matters most.")  # fmt: skip


def gains_by_breakdown(bd: pd.DataFrame, path: Path) -> str:
    pooled = bd[bd["run"] == "all runs"]
    names = list(dict.fromkeys(pooled["breakdown"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        g = pooled[pooled["breakdown"] == name]
        buckets = sorted(g["bucket"].unique(), key=bucket_sort_key(name))
        x = np.arange(len(buckets))
        for off, metric in ((-0.12, "position_accuracy"), (0.12, "count_accuracy")):
            h = g[g["metric"] == metric].set_index("bucket").reindex(buckets)
            ax.errorbar(x + off, h["delta"], yerr=_err(h["delta"], h["delta_ci_low"], h["delta_ci_high"]), fmt="o",
                        capsize=3, color=COLORS[metric], label=f"Δ {LABELS[metric]}")  # fmt: skip
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, buckets, fontsize=8, rotation=30)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean Δ over runs (95% CI)")
    axes[0][0].legend(fontsize=8)
    _save(fig, path)
    return ("Mean change in accuracy over all runs in each bucket of word length, Qwen3 token count, word kind "
            "(English or nonce) and letter position, with a bootstrap 95% interval over runs. Buckets above 0 "
            "are where fine-tuning on spelling helped.")  # fmt: skip
