"""The analysis figures (matplotlib, Agg backend: no display needed). Every accuracy has its 95% interval.

Each ``draw_*`` function writes one PNG and returns its caption; ``draw_all`` draws them all and
returns ``[{"file", "title", "caption"}]`` for ``analysis.json`` and the report. What every figure
keeps to: the generation score (the primary one); the base model drawn on every accuracy plot and
learning curve; the best trivial baseline (answering a constant, or the word's first letter) drawn
wherever a subtask's accuracy is, when ``evaluate`` reported it; the validation-selected run
highlighted, never the run that ranks best on the test set; a change is "Δ" or "change", never a
"gain". Axis labels name only position and count metrics and transfer_score (trained on spelling,
evaluated on position and count only).
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

COLORS = {"position_accuracy": "tab:blue", "count_accuracy": "tab:orange", "transfer_score": "tab:green",
          "position/nth_letter_accuracy": "tab:blue", "position/letter_index_accuracy": "tab:cyan",
          "count/word_length_accuracy": "tab:orange", "count/letter_count_accuracy": "tab:brown"}
SELECTED = "tab:red"
DPI = 110
MIN_BUCKET_ITEMS = 20  # a bucket with fewer items per run is drawn hollow: its interval is mostly noise


def label(metric: str) -> str:
    """A metric's short label.

    ``position/nth_letter_accuracy`` → ``nth_letter``; ``position_accuracy`` → ``position accuracy``.
    """
    if "/" in metric:
        return metric.split("/", 1)[1].removesuffix("_accuracy")
    return metric.replace("_", " ")


def _color(metric: str) -> str:
    return COLORS.get(metric, "tab:purple")


def draw_all(result: dict, runs: list, out: Path) -> list[dict]:
    """Every figure of the analysis into ``out``; returns their file names, titles and captions."""
    out.mkdir(parents=True, exist_ok=True)
    table = result["runs"][result["runs"]["scoring"] == "generation"]
    units = result["configs"][result["configs"]["scoring"] == "generation"]
    hp = result["hyperparameter_effects"]
    hp = hp[hp["scoring"] == "generation"] if len(hp) else hp
    sel = result["info"].get("selected_by_validation") or {}
    figs = [
        (
            "subtask_accuracy.png",
            "Accuracy per subtask: base, every configuration, best trivial baseline",
            subtask_accuracy(units, result, out / "subtask_accuracy.png"),
        ),
        (
            "position_vs_count.png",
            "Position vs count accuracy per configuration",
            position_vs_count(units, result, out / "position_vs_count.png"),
        ),
        (
            "run_deltas.png",
            "Base → fine-tuned change per run",
            run_deltas(table, sel, out / "run_deltas.png"),
        ),
    ]
    if len(hp):
        for name in hp.loc[hp["kind"] == "marginal_mean", "hyperparameter"].unique():
            f = f"effect_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
            figs.append((f, f"Effect of {name}", effect_plot(hp, name, result, out / f)))
    if any(r.curve for r in runs):
        figs.append(
            (
                "learning_curves.png",
                "Validation learning curves from step 0",
                learning_curves(runs, result, out / "learning_curves.png"),
            )
        )
    if table["steps_trained"].notna().any() and "params.max_steps" in table:
        figs.append(
            ("steps_trained.png", "Steps actually trained", steps_trained(table, out / "steps_trained.png"))
        )
    bd = result["breakdowns"]
    tokenizer = (result["info"].get("token_counts") or {}).get("source", "question file")
    shown = sel.get("run") or table.iloc[0]["run"]
    if len(bd) and (bd["breakdown"] == "n_tokens").any():
        figs.append(
            (
                "accuracy_by_token_count.png",
                "Accuracy by token count, before and after fine-tuning",
                accuracy_by_token_count(bd, shown, tokenizer, out / "accuracy_by_token_count.png"),
            )
        )
    if len(bd):
        figs.append(
            (
                "change_by_breakdown.png",
                "Where accuracy changed",
                change_by_breakdown(bd, out / "change_by_breakdown.png"),
            )
        )
    return [{"file": f"figures/{f}", "title": t, "caption": c} for f, t, c in figs]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _err(est, low, high) -> np.ndarray:
    """matplotlib's asymmetric error bars from an interval (nan interval → no bar)."""
    est, low, high = (np.asarray(v, dtype=float) for v in (est, low, high))
    return np.nan_to_num(np.vstack([est - low, high - est]), nan=0.0).clip(min=0)


def _base(result: dict, metric: str) -> dict | None:
    return (result["info"].get("base") or {}).get(metric)


def _trivial(result: dict, metric: str) -> dict | None:
    entry = _base(result, metric) or {}
    return entry.get("best_trivial") if isinstance(entry.get("best_trivial"), dict) else None


def subtask_accuracy(units: pd.DataFrame, result: dict, path: Path) -> str:
    metrics = [m for m in result["info"]["endpoints"]["primary"]]
    sel = result["info"].get("selected_by_validation") or {}
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics) + 1.5), 4))
    x = np.arange(len(metrics))
    probe = "likelihood" in result["info"].get("scorings", [])
    like_units = result["configs"][result["configs"]["scoring"] == "likelihood"] if probe else None
    for i, m in enumerate(metrics):
        vals = units[m].to_numpy(float)
        jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(1)
        ax.scatter(
            i + jitter, vals, s=12, color="grey", alpha=0.6, label="configurations" if i == 0 else None
        )
        if sel.get("config_id") is not None:
            v = units.loc[units["config_id"] == sel["config_id"], m]
            if len(v):
                ax.scatter(
                    [i],
                    v,
                    s=70,
                    facecolor="none",
                    edgecolor=SELECTED,
                    lw=2,
                    label="validation-selected" if i == 0 else None,
                )
        b = _base(result, m)
        if b:
            ax.errorbar(
                [i - 0.3],
                [b["accuracy"]],
                yerr=_err([b["accuracy"]], [b["ci_low"]], [b["ci_high"]]),
                fmt="s",
                color="black",
                capsize=3,
                label="base model" if i == 0 else None,
            )
        t = _trivial(result, m)
        if t:
            ax.hlines(
                t["accuracy"],
                i - 0.4,
                i + 0.4,
                colors="tab:purple",
                linestyles="--",
                label="best trivial baseline" if i == 0 else None,
            )
            ax.annotate(
                t["name"], (i + 0.4, t["accuracy"]), fontsize=7, color="tab:purple", va="bottom", ha="right"
            )
        if like_units is not None and m in like_units:
            ax.scatter(
                [i + 0.3],
                [like_units[m].mean()],
                marker="D",
                s=25,
                color="tab:green",
                label="likelihood probe (mean)" if i == 0 else None,
            )
    ax.set_xticks(x, [label(m) for m in metrics], fontsize=9)
    ax.set_ylabel("test accuracy (95% CI for the base)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return (
        "Test accuracy per subtask (the primary endpoints): grey dots are the configurations (mean over "
        "their seeds), the red ring the one validation selects, the black square the base model with its "
        "95% interval, and the dashed purple line the best trivial baseline (a constant answer, or the "
        "word's first letter). An accuracy at or below that line measures an answer habit, not transfer."
    )


def position_vs_count(units: pd.DataFrame, result: dict, path: Path) -> str:
    base = result["info"]["base"]
    corr = result["metric_correlations"]
    corr = corr[corr["scoring"] == "generation"] if "scoring" in corr else corr
    pearson = corr[(corr["quantity"] == "accuracy") & (corr["method"] == "pearson")].iloc[0]
    sel = result["info"].get("selected_by_validation") or {}
    runs = result["runs"][result["runs"]["scoring"] == "generation"]
    one_seed = (units["n_seeds"] == 1).all()
    fig, ax = plt.subplots(figsize=(6, 5))
    p, c = units["position_accuracy"], units["count_accuracy"]
    if one_seed:
        r = runs.set_index("config_id").loc[units["config_id"]]
        xerr = _err(p, r["position_accuracy_ci_low"], r["position_accuracy_ci_high"])
        yerr = _err(c, r["count_accuracy_ci_low"], r["count_accuracy_ci_high"])
    else:  # between-seed spread of each configuration's mean
        xerr = np.nan_to_num(units["position_accuracy_seed_sd"].to_numpy(float))
        yerr = np.nan_to_num(units["count_accuracy_seed_sd"].to_numpy(float))
    ax.errorbar(
        p,
        c,
        xerr=xerr,
        yerr=yerr,
        fmt="o",
        color="tab:blue",
        ecolor="lightsteelblue",
        capsize=2,
        label="fine-tuned configurations",
    )
    if sel.get("config_id") is not None:
        s = units[units["config_id"] == sel["config_id"]]
        ax.scatter(
            s["position_accuracy"],
            s["count_accuracy"],
            s=120,
            facecolor="none",
            edgecolor=SELECTED,
            lw=2,
            label="validation-selected",
            zorder=3,
        )
    bp, bc = base["position_accuracy"], base["count_accuracy"]
    ax.errorbar(
        [bp["accuracy"]],
        [bc["accuracy"]],
        xerr=_err([bp["accuracy"]], [bp["ci_low"]], [bp["ci_high"]]),
        yerr=_err([bc["accuracy"]], [bc["ci_low"]], [bc["ci_high"]]),
        fmt="*",
        markersize=14,
        color="black",
        capsize=3,
        label="base model",
    )
    ax.axvline(bp["accuracy"], color="black", lw=0.6, ls=":")
    ax.axhline(bc["accuracy"], color="black", lw=0.6, ls=":")
    ax.set_xlabel("position accuracy")
    ax.set_ylabel("count accuracy")
    if np.isnan(pearson["ci_low"]):
        ax.set_title(f"n = {len(units)} configuration(s): too few for a correlation", fontsize=10)
    else:
        ax.set_title(
            f"Pearson r = {pearson['estimate']:.2f} [{pearson['ci_low']:.2f}, {pearson['ci_high']:.2f}], "
            f"n = {len(units)} configurations",
            fontsize=10,
        )
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    bars = "95% intervals of each accuracy" if one_seed else "the between-seed standard deviation"
    return (
        f"One point per configuration (mean over its seeds), error bars are {bars}; the star and the dotted "
        "lines are the base model, the red ring the configuration validation selects. Points up and to the "
        "right of the star improved on both tasks; a cloud that rises to the right means configurations that "
        "move position also move count (the title gives the Pearson correlation with its bootstrap interval "
        "over configurations)."
    )


def run_deltas(table: pd.DataFrame, sel: dict, path: Path) -> str:
    t = table.sort_values("transfer_score", kind="stable").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(t) + 1.2)))
    y = np.arange(len(t))
    for off, task in ((-0.15, "position_accuracy"), (0.15, "count_accuracy")):
        d = t[f"{task}_delta"]
        ax.errorbar(
            d,
            y + off,
            xerr=_err(d, t[f"{task}_delta_ci_low"], t[f"{task}_delta_ci_high"]),
            fmt="o",
            markersize=4,
            capsize=2,
            color=_color(task),
            label=f"Δ {label(task)}",
        )
    ax.axvline(0, color="black", lw=0.8, label="base model (Δ = 0)")
    chosen = set(sel.get("runs") or [sel.get("run")])
    ax.set_yticks(y, [f"{r}  ◀ selected" if r in chosen else r for r in t["run"]], fontsize=7)
    for tick, r in zip(ax.get_yticklabels(), t["run"]):
        if r in chosen:
            tick.set_color(SELECTED)
            tick.set_fontweight("bold")
    ax.set_xlabel("fine-tuned − base (paired bootstrap over words, 95% CI)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return (
        "Per run (higher test transfer_score further up), the change in position and count accuracy from "
        "the base model (the line at 0) on the same items, with paired bootstrap 95% intervals that "
        "resample words. The run(s) validation selects are marked in red. An interval entirely right of 0 "
        "is an improvement, entirely left a loss; the tables give the Holm-adjusted tests."
    )


def effect_plot(hp: pd.DataFrame, name: str, result: dict, path: Path) -> str:
    m = hp[(hp["kind"] == "marginal_mean") & (hp["hyperparameter"] == name)]
    levels = list(dict.fromkeys(m["value"]))
    x = np.arange(len(levels))
    panels = [
        ("primary (subtasks)", [k for k in dict.fromkeys(m["metric"]) if "/" in k]),
        (
            "secondary (task totals)",
            [k for k in ("position_accuracy", "count_accuracy", "transfer_score") if k in set(m["metric"])],
        ),
    ]
    panels = [(t, ms) for t, ms in panels if ms]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, metrics) in zip(axes[0], panels):
        width = 0.3 / max(1, len(metrics) - 1)
        for i, metric in enumerate(metrics):
            off = (i - (len(metrics) - 1) / 2) * width
            g = m[m["metric"] == metric].set_index("value").reindex(levels)
            ax.errorbar(
                x + off,
                g["estimate"],
                yerr=_err(g["estimate"], g["ci_low"], g["ci_high"]),
                fmt="o-",
                capsize=3,
                color=_color(metric),
                label=label(metric),
            )
            b = _base(result, metric)
            if b:
                ax.axhline(b["accuracy"], color=_color(metric), ls="--", lw=1, alpha=0.8)
            t = _trivial(result, metric)
            if t:
                ax.axhline(t["accuracy"], color=_color(metric), ls=":", lw=1, alpha=0.8)
        n = m[m["metric"] == metrics[0]].set_index("value").reindex(levels)["n_configs"]
        ax.set_xticks(x, [f"{lv}\n(n={int(k)})" for lv, k in zip(levels, n)], fontsize=8)
        ax.set_xlabel(name)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("mean over configurations (95% CI)")
        ax.plot([], [], color="grey", ls="--", label="base model")
        ax.plot([], [], color="grey", ls=":", label="best trivial baseline")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, path)
    return (
        f"Mean test accuracy of the configurations at each value of {name} (n = configurations at that "
        "value), with a bootstrap 95% interval over those configurations; dashed lines are the base model, "
        "dotted lines the best trivial baseline of each subtask (same colour). Other hyperparameters vary "
        "too, so read it next to the regression table (HC3 intervals, Holm-adjusted)."
    )


def learning_curves(runs: list, result: dict, path: Path) -> str:
    sel = result["info"].get("selected_by_validation") or {}
    chosen = set(sel.get("runs") or [sel.get("run")])
    metrics = [
        m
        for m in ("val/position_accuracy", "val/count_accuracy", "val/transfer_score")
        if any(m in row for r in runs for row in r.curve)
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        base = [row[metric] for r in runs for row in r.curve if row["step"] == 0 and metric in row]
        labelled = False
        for r in runs:
            pts = sorted((row["step"], row[metric]) for row in r.curve if metric in row)
            if pts:
                s, v = zip(*pts)
                is_sel = r.name in chosen
                name = sel.get("run") if len(chosen) > 1 else r.name  # several seeds: one legend entry
                ax.plot(
                    s,
                    v,
                    color=SELECTED if is_sel else "grey",
                    alpha=1 if is_sel else 0.35,
                    lw=2 if is_sel else 1,
                    label=f"validation-selected: {name}" if is_sel and not labelled else None,
                )
                labelled |= is_sel
                ax.plot(s[-1], v[-1], "|", color=SELECTED if is_sel else "grey", markersize=8)
        if base:
            ax.axhline(float(np.mean(base)), color="black", ls="--", lw=1, label="base model (step 0)")
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)
    return (
        "Validation position and count accuracy (each trial's metrics.jsonl) against optimizer steps, from "
        "the base model's validation at step 0 (dashed line; absent for logs written before fits validated "
        "at step 0); each curve ends (tick) where its run stopped, early or at max_steps. Grey lines are "
        "all runs, red the validation-selected one. A curve that stays below the dashed line only lost "
        "accuracy; validation sets are small, so see the test intervals for uncertainty."
    )


def steps_trained(table: pd.DataFrame, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5, 4))
    t = table.dropna(subset=["steps_trained"])
    ms = pd.to_numeric(t["params.max_steps"], errors="coerce")
    rng = np.random.default_rng(0)  # jitter only: points of one max_steps would sit on top of each other
    ax.scatter(ms * (1 + rng.uniform(-0.04, 0.04, len(t))), t["steps_trained"], s=14, color="tab:blue")
    lim = float(np.nanmax([ms.max(), t["steps_trained"].max()])) * 1.1
    ax.plot([0, lim], [0, lim], color="black", lw=0.8, ls="--", label="trained to max_steps")
    ax.set_xscale("log") if ms.min() > 0 and ms.max() / ms.min() >= 4 else None
    ax.set_xlabel("max_steps (configured)")
    ax.set_ylabel("optimizer steps trained")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    stopped = int((t["steps_trained"] < ms).sum())
    return (
        f"Steps each run actually trained against its configured max_steps: {stopped} of {len(t)} runs "
        "stopped early (below the dashed line). An effect of max_steps is an effect of the steps allowed, "
        "not of the steps trained."
    )


# Natural order of each breakdown's buckets (the buckets `evaluate` reports); others sort by name.
BUCKET_ORDER = {
    "word_length": [name for name, _, _ in LENGTH_BUCKETS],
    "n_tokens": ["1", "2", "3", "4+"],
    "letter_position": ["0", "1", "2", "3", "4-6", "7+", "3rd-to-last", "2nd-to-last", "last"],
}


def bucket_sort_key(breakdown: str):
    order = BUCKET_ORDER.get(breakdown, [])
    return lambda b: (order.index(b), "") if b in order else (len(order), str(b))


def _readable_ylim(ax, estimates: np.ndarray, pad: float = 0.08) -> None:
    """Y limits from the estimates, not the intervals: one tiny bucket's huge interval would otherwise
    squash every other bucket into a line (its bar is cut at the edge; the tables have it)."""
    est = estimates[np.isfinite(estimates)]
    if len(est):
        lo, hi = float(est.min()), float(est.max())
        span = max(hi - lo, 0.05)
        ax.set_ylim(lo - span * 0.6 - pad / 2, hi + span * 0.6 + pad / 2)


def accuracy_by_token_count(bd: pd.DataFrame, shown: str, tokenizer: str, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=False)
    tok = bd[bd["breakdown"] == "n_tokens"]
    for ax, metric in zip(axes, ("position_accuracy", "count_accuracy")):
        g = tok[(tok["metric"] == metric) & (tok["run"] == shown)]
        g = g.sort_values("bucket", key=lambda s: s.map(bucket_sort_key("n_tokens")))
        x = np.arange(len(g))
        small = (g["n_items"] < MIN_BUCKET_ITEMS).to_numpy()
        for data, dx, fmt, color, name in (
            (("base_accuracy", "base_ci_low", "base_ci_high"), -0.1, "s", "black", "base"),
            (
                ("tuned_accuracy", "tuned_ci_low", "tuned_ci_high"),
                0.1,
                "o",
                _color(metric),
                f"fine-tuned ({shown}, validation-selected)",
            ),
        ):
            est, lo, hi = (g[c].to_numpy(float) for c in data)
            ax.errorbar(x + dx, est, yerr=_err(est, lo, hi), fmt="none", capsize=3, ecolor=color)
            ax.scatter(x[~small] + dx, est[~small], marker=fmt, color=color, label=name, zorder=3)
            ax.scatter(x[small] + dx, est[small], marker=fmt, facecolor="white", edgecolor=color, zorder=3)
        _readable_ylim(
            ax, np.concatenate([g["base_accuracy"].to_numpy(float), g["tuned_accuracy"].to_numpy(float)])
        )
        ax.set_xticks(x, [f"{b}\n(n={n})" for b, n in zip(g["bucket"], g["n_items"])], fontsize=8)
        ax.set_xlabel("tokens in the word")
        ax.set_title(label(metric), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy (95% CI)")
    _save(fig, path)
    return (
        f"Accuracy of the base model and of the validation-selected run ({shown}) by how many tokens the "
        f"word has (n = items; token counts: {tokenizer}). Hollow markers are buckets with fewer than "
        f"{MIN_BUCKET_ITEMS} items, whose intervals are wide; the axis follows the estimates, so such an "
        "interval may run past its edge. Words split into more tokens are where character-level knowledge "
        "is hardest to reach."
    )


def change_by_breakdown(bd: pd.DataFrame, path: Path) -> str:
    pooled = bd[bd["run"] == "all runs"]
    names = list(dict.fromkeys(pooled["breakdown"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.8), sharey=False, squeeze=False)
    for ax, name in zip(axes[0], names):
        g = pooled[pooled["breakdown"] == name]
        buckets = sorted(g["bucket"].unique(), key=bucket_sort_key(name))
        x = np.arange(len(buckets))
        shown = []
        for off, metric in ((-0.12, "position_accuracy"), (0.12, "count_accuracy")):
            h = g[g["metric"] == metric].set_index("bucket").reindex(buckets)
            est = h["delta"].to_numpy(float)
            small = (h["n_items"].fillna(0) < MIN_BUCKET_ITEMS).to_numpy()
            ax.errorbar(
                x + off,
                est,
                yerr=_err(est, h["delta_ci_low"], h["delta_ci_high"]),
                fmt="none",
                capsize=3,
                ecolor=_color(metric),
            )
            ax.scatter(
                x[~small] + off, est[~small], color=_color(metric), label=f"Δ {label(metric)}", zorder=3
            )
            ax.scatter(x[small] + off, est[small], facecolor="white", edgecolor=_color(metric), zorder=3)
            shown.append(est)
        ax.axhline(0, color="black", lw=0.8)
        _readable_ylim(ax, np.concatenate(shown + [np.zeros(1)]))
        n = g.groupby("bucket")["n_items"].max().reindex(buckets)
        ax.set_xticks(x, [f"{b}\n(n={int(k)})" for b, k in zip(buckets, n)], fontsize=7, rotation=30)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean Δ over runs (95% CI)")
    axes[0][0].legend(fontsize=8)
    _save(fig, path)
    return (
        "Mean change in accuracy over all runs in each bucket of word length, token count, word kind "
        "(English or nonce) and letter position, with a bootstrap 95% interval over runs (n = items per "
        "run). Each panel has its own scale, set by the estimates; hollow markers are buckets with fewer "
        f"than {MIN_BUCKET_ITEMS} items. Above 0 fine-tuning on spelling raised accuracy there, below 0 it "
        "lowered it; these are descriptive, not tested."
    )
