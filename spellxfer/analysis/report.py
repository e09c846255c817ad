"""``python -m spellxfer report``: one self-contained HTML file from an ``analyze`` output directory.

Lifecycle: read ``analysis.json`` and the CSV tables (every column through the metric whitelist,
``columns.check_columns``) → write the plain-language summary (``summary_lines``: what
transferred and what did not, with the numbers) → embed each figure as a ``data:image/png``
URI, so the file opens anywhere with no network and no side files → write the HTML and a copy
of the figures atomically → optionally log tables, figures and the page to W&B (offline unless
credentials are configured: ``spellxfer.core.doctor.wandb_mode``).

Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from spellxfer.analysis.columns import check_columns
from spellxfer.analysis.effects import MIN_RUNS_FOR_INTERVALS
from spellxfer.core.doctor import wandb_mode
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file, atomic_output_dir, check_output_dir, read_json, snippet
from spellxfer.tasks.names import TASKS

console = Console()
LABELS = {
    "position_accuracy": "position accuracy",
    "count_accuracy": "count accuracy",
    "transfer_score": "transfer_score",
}
TABLES = (
    "top_transfer_configs",
    "per_run_deltas",
    "config_effects",
    "metric_correlations",
    "hyperparameter_effects",
    "breakdowns",
    "runs",
    "arm_contrasts",
)


def report(
    analysis: str = "results/transfer_analysis",
    out: str = "results/deployment/reports",
    figures_out: str = "results/deployment/figures",
    wandb: bool = False,
    wandb_project: str = "spellxfer",
) -> int:
    """Build one self-contained HTML transfer report from an `analyze` output directory.

    Figures embedded, tables, and a plain-language summary of what transferred to position and
    count and what did not (trained on spelling, evaluated on position and count only). Writes
    OUT/transfer_report_NAME.html and copies the figures to FIGURES_OUT/NAME/.

    Args:
        analysis: An `analyze` output directory (analysis.json, the CSV tables, figures/).
        out: Directory the HTML report is written into.
        figures_out: Directory the figures are copied into (one subdirectory per analysis).
        wandb: Also log the tables, figures and page to W&B (offline unless credentials are set).
        wandb_project: W&B project name.
    """
    src = Path(analysis)
    info, tables = load_analysis(src)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(info.get("name") or "runs"))
    path = Path(out) / f"transfer_report_{name}.html"
    check_output_dir(out, overwrite=True)  # a directory of reports: others in it are kept
    check_output_dir(Path(figures_out) / name, overwrite=True)
    if path.is_dir():
        raise SpellxferError(f"--out {out}: {path.name} there is a directory, not a report")
    page = render(info, tables, src)
    # Figures first, the page last: a failure at either step leaves neither behind.
    with atomic_output_dir(Path(figures_out) / name, overwrite=True) as tmp:
        tmp.chmod(0o755)
        for fig in info["figures"]:
            shutil.copy2(src / fig["file"], tmp / Path(fig["file"]).name)
        with atomic_file(path) as f:
            f.write(page)
        path.chmod(0o644)  # a page to share or serve: readable like any web file (the temp file was 0600)
    console.print(
        f"wrote {path} ({len(page) / 1e6:.1f} MB, {len(info['figures'])} figures embedded) "
        f"and {Path(figures_out) / name}/"
    )
    for line in summary_lines(info, tables):
        console.print(f"• {line}", highlight=False)
    if wandb:
        log_to_wandb(info, tables, src, path, wandb_project, name)
    return 0


# Columns the summary and the page read from each table (analyze writes them all), and which of
# them must be numeric; checked on load so a hand-edited or foreign CSV is one error line.
REQUIRED_COLUMNS = {
    "top_transfer_configs": ("run", "transfer_score", "transfer_score_ci_low", "transfer_score_ci_high"),
    "per_run_deltas": (
        "run",
        "metric",
        "delta",
        "delta_ci_low",
        "delta_ci_high",
        "base_accuracy",
        "tuned_accuracy",
        "p_adj",
        "significant",
    ),
    "metric_correlations": ("quantity", "method", "estimate", "ci_low", "ci_high", "n_runs"),
    "hyperparameter_effects": (
        "kind",
        "metric",
        "hyperparameter",
        "rank",
        "scale",
        "slope",
        "slope_ci_low",
        "slope_ci_high",
        "n_runs",
    ),
    "breakdowns": (
        "run",
        "breakdown",
        "bucket",
        "metric",
        "n_items",
        "delta",
        "delta_ci_low",
        "delta_ci_high",
    ),
    "config_effects": (
        "scoring",
        "config_id",
        "metric",
        "endpoint",
        "n_seeds",
        "delta",
        "delta_ci_low",
        "delta_ci_high",
        "p_adj",
        "significant",
    ),
    "runs": ("run",),
    "arm_contrasts": (
        "contrast",
        "arm",
        "reference",
        "scoring",
        "metric",
        "delta",
        "delta_ci_low",
        "delta_ci_high",
        "delta_adj_ci_low",
        "delta_adj_ci_high",
        "p_adj",
    ),
}
OPTIONAL_TABLES = ("config_effects", "arm_contrasts")
TEXT_COLUMNS = (
    "run",
    "metric",
    "quantity",
    "method",
    "kind",
    "hyperparameter",
    "scale",
    "breakdown",
    "bucket",
    "scoring",
    "endpoint",
    "family",
    "test",
    "contrast",
    "arm",
    "reference",
)
INFO_KEYS = {
    "n_runs": int,
    "status_counts": dict,
    "decoding": str,
    "figures": list,
    "methods": dict,
    "skipped": list,
    "n_boot": int,
    "seed": int,
}


def load_analysis(src: Path) -> tuple[dict, dict[str, pd.DataFrame]]:
    """``analysis.json`` and the tables of an ``analyze`` directory, checked for what the report
    reads; a missing or malformed piece is a one-line error naming the file."""
    if not (src / "analysis.json").is_file():
        raise SpellxferError(
            f"--analysis {src}: no analysis.json (run `python -m spellxfer analyze --out {src}` first)"
        )
    info = read_json(src / "analysis.json")
    where = src / "analysis.json"
    if not isinstance(info, dict):
        raise SpellxferError(f"{where}: expected an object (as `analyze` writes)")
    for key, kind in INFO_KEYS.items():
        if key not in info:
            raise SpellxferError(f"{where}: no {key!r} key (as `analyze` writes)")
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise SpellxferError(f"{where}: {key} {snippet(info[key])} is not {_KIND_NAMES[kind]}")
    # config_effects.csv is newer than the other tables: an analysis written before it still reports
    tables = {
        name: _read_table(src / f"{name}.csv", name, src)
        for name in TABLES
        if name not in OPTIONAL_TABLES or (src / f"{name}.csv").is_file()
    }
    for name in OPTIONAL_TABLES:
        tables.setdefault(name, pd.DataFrame(columns=list(REQUIRED_COLUMNS[name])))
    if tables["top_transfer_configs"].empty:
        raise SpellxferError(f"{src / 'top_transfer_configs.csv'}: no rows (a report needs at least one run)")
    root = src.resolve()
    for i, fig in enumerate(info["figures"]):
        if not isinstance(fig, dict) or not all(
            isinstance(fig.get(k), str) for k in ("file", "title", "caption")
        ):
            raise SpellxferError(f"{where}: figures[{i}] is not an object with text file, title and caption")
        file = Path(fig["file"])
        # The page embeds these bytes and the report copies them: only PNGs inside the analysis.
        if (
            file.is_absolute()
            or ".." in file.parts
            or file.suffix.lower() != ".png"
            or not (src / file).resolve().is_relative_to(root)
        ):
            raise SpellxferError(f"{where}: figures[{i}].file {fig['file']!r} is not a .png inside {src}")
        if not (src / file).is_file():
            raise SpellxferError(f"--analysis {src}: missing figure {fig['file']}")
    return info, tables


_KIND_NAMES = {int: "an integer", dict: "an object", str: "text", list: "a list"}


def _read_table(f: Path, name: str, src: Path) -> pd.DataFrame:
    if not f.is_file():
        raise SpellxferError(f"--analysis {src}: missing {f.name}")
    try:
        table = pd.read_csv(f)
    except pd.errors.EmptyDataError:
        raise SpellxferError(f"{f}: empty (no header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise SpellxferError(f"{f}: not a readable CSV table ({' '.join(str(e).split())[:200]})") from None
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in table.columns]
    if missing:
        raise SpellxferError(f"{f}: no column {missing[0]!r} (as `analyze` writes it)")
    for col in REQUIRED_COLUMNS[name]:
        values = table[col].dropna()
        if values.empty:
            continue
        if col == "significant":
            ok = values.map(lambda v: isinstance(v, bool | np.bool_)).all()
        elif col in TEXT_COLUMNS:
            ok = True
        else:
            ok = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if not ok:
            raise SpellxferError(
                f"{f}: column {col!r} holds a value that is not "
                f"{'true/false' if col == 'significant' else 'a number'}"
            )
    return check_columns(table, f"{f}")


def _ci(lo, hi, sign: str = "+") -> str:
    return f"[{lo:{sign}.3f}, {hi:{sign}.3f}]"


def _one_seed(info: dict) -> bool:
    return info.get("seeds_per_config", [1]) in ([1], [])


def _unit(info: dict) -> str:
    return "runs" if _one_seed(info) else "configurations"


def summary_lines(info: dict, tables: dict[str, pd.DataFrame]) -> list[str]:
    """What transferred and what did not, in sentences with the numbers (the report's first section)."""
    n = info["n_runs"]
    others = {k: v for k, v in info["status_counts"].items() if k != "complete"}
    seeds = info.get("seeds_per_config") or [1]
    design = (
        ""
        if _one_seed(info)
        else (f"; {info.get('n_configs')} configurations × {'/'.join(map(str, seeds))} seeds")
    )
    lines = [
        f"{n} complete run(s) analysed ({info['decoding']} decoding{design})"
        + (f"; not analysed: {', '.join(f'{v} {k}' for k, v in sorted(others.items()))}." if others else ".")
    ]
    lines += _endpoint_lines(info)
    lines += _trivial_lines(info, tables)
    eff = tables["config_effects"]
    gen = eff[eff["scoring"] == "generation"] if len(eff) else eff
    units = info.get("n_configs") or n
    if len(gen) and not _one_seed(info):
        primary = gen[gen["endpoint"] == "primary"].rename(columns={"run": "run"})
        lines += verdict_lines(primary, units, unit="configurations", best_word="configuration")
        lines += verdict_lines(
            gen[gen["endpoint"] == "secondary"], units, unit="configurations", best_word="configuration"
        )
    else:
        deltas = tables["per_run_deltas"]
        deltas = deltas[deltas["scoring"] == "generation"] if "scoring" in deltas else deltas
        if "endpoint" in deltas:
            lines += verdict_lines(deltas[deltas["endpoint"] == "primary"], n)
            lines += verdict_lines(deltas[deltas["endpoint"] == "secondary"], n)
        else:
            lines += verdict_lines(deltas[~deltas["metric"].str.contains("/")], n)
    lines += _probe_lines(info, tables)
    lines.append(_correlation_line(tables["metric_correlations"], _unit(info)))
    lines += _hyperparameter_lines(tables["hyperparameter_effects"])
    if sel := info.get("selected_by_validation"):
        lines.append(_selected_line(sel))
    if decided := info.get("decisions"):
        lines.append(
            "Pre-registered decision per subtask (validation-selected configuration): "
            + "; ".join(f"{d['subtask']}: {d['decision']}" for d in decided)
            + "."
        )
    top = tables["top_transfer_configs"].iloc[0]
    params = ", ".join(
        f"{c.removeprefix('params.')}={top[c]:g}"
        if isinstance(top[c], float)
        else f"{c.removeprefix('params.')}={top[c]}"
        for c in tables["top_transfer_configs"].columns
        if c.startswith("params.")
    )
    lines.append(
        f"Top run by test transfer_score: {top['run']} ({params}) with transfer_score "
        f"{top['transfer_score']:.3f} {_ci(top['transfer_score_ci_low'], top['transfer_score_ci_high'], '')} "
        "(chosen on the test set, so optimistic; the validation-selected one above is the honest pick)."
    )
    lines += _change_lines(tables["breakdowns"])
    return lines


def _endpoint_lines(info: dict) -> list[str]:
    ep = info.get("endpoints")
    if not ep:
        return []
    families = info.get("families") or []
    names = ", ".join(f"{f['name']} ({f['n_tests']} tests)" for f in families)
    return [
        f"Pre-specified endpoints: primary {', '.join(e.removesuffix('_accuracy') for e in ep['primary'])}; "
        f"secondary {', '.join(e.removesuffix('_accuracy') for e in ep['secondary'])}; transfer_score is "
        f"reported, not tested. Holm families: {names}."
    ]


def _trivial_lines(info: dict, tables: dict[str, pd.DataFrame]) -> list[str]:
    """The base model against each subtask's best trivial baseline, and constant-answer runs."""
    base = info.get("base") or {}
    parts = [
        f"{k.removesuffix('_accuracy').split('/')[-1]} {v['accuracy']:.3f} vs {v['best_trivial']['name']} "
        f"{v['best_trivial']['accuracy']:.3f}"
        for k, v in base.items()
        if "/" in k and "(" not in k and isinstance(v.get("best_trivial"), dict)
    ]
    lines = []
    if parts:
        lines.append(
            "Base model against the best trivial baseline of each subtask (a constant answer, or the word's "
            "first letter): " + "; ".join(parts) + "."
        )
    runs = tables["runs"]
    runs = runs[runs["scoring"] == "generation"] if "scoring" in runs else runs
    flags = [c for c in runs.columns if c.endswith("_accuracy_constant_answer")]
    const = [
        f"{c.removesuffix('_accuracy_constant_answer').split('/')[-1]} in "
        f"{int(runs[c].fillna(False).astype(bool).sum())} of {len(runs)} runs"
        for c in flags
        if runs[c].fillna(False).astype(bool).any()
    ]
    if const:
        lines.append(
            "Constant answer (one reply in more than half of a subtask's replies): "
            + "; ".join(const)
            + ". Those accuracies measure the constant, not transfer."
        )
    beats = [c for c in runs.columns if c.endswith("_accuracy_beats_trivial")]
    if beats:
        lines.append(
            "Runs whose accuracy interval lies above the best trivial baseline: "
            + "; ".join(
                f"{c.removesuffix('_accuracy_beats_trivial').split('/')[-1]} "
                f"{int(runs[c].fillna(False).astype(bool).sum())} of {len(runs)}"
                for c in beats
            )
            + "."
        )
    return lines


def _probe_lines(info: dict, tables: dict[str, pd.DataFrame]) -> list[str]:
    if "likelihood" not in info.get("scorings", []):
        return []
    runs = tables["runs"]
    like = runs[runs["scoring"] == "likelihood"]
    base = info.get("base") or {}
    parts = []
    for task in TASKS:
        b = base.get(f"{task}_accuracy (likelihood)")
        if b and f"{task}_accuracy" in like:
            parts.append(
                f"{task} base {b['accuracy']:.3f}, runs {like[f'{task}_accuracy'].mean():.3f} on average"
            )
    return (
        [
            "Likelihood probe (candidate answers ranked in a fixed answer frame, beside generation): "
            + "; ".join(parts)
            + ". Its tests are their own Holm families."
        ]
        if parts
        else []
    )


def verdict_lines(deltas: pd.DataFrame, n: int, unit: str = "runs", best_word: str = "run") -> list[str]:
    """Per endpoint, how many runs (or configurations) rose (significantly, after Holm) and fell, then
    the verdict. An endpoint transferred when some unit is significantly better and no more units are
    significantly worse; significant rises in a few units among more significant losses are "mostly
    hurt", not transfer."""
    lines, verdict = [], {}
    for metric in dict.fromkeys(deltas["metric"]):
        name = metric.removesuffix("_accuracy")
        d = deltas[(deltas["metric"] == metric) & deltas["delta"].notna()]
        if d.empty:  # runs evaluated on one task only
            lines.append(f"{name.capitalize()} accuracy: no {name} items in these {unit}.")
            continue
        up, sig_up = int((d["delta"] > 0).sum()), int((d["significant"] & (d["delta"] > 0)).sum())
        sig_down = int((d["significant"] & (d["delta"] < 0)).sum())
        b = d.loc[d["delta"].idxmax()]
        verdict[name] = (sig_up, sig_down)
        lines.append(
            f"{name.capitalize()} accuracy rose in {up} of {n} {unit} ({sig_up} significantly after Holm "
            f"adjustment, {sig_down} fell significantly); the best {best_word} ({b['run']}) changed it by "
            f"{b['delta']:+.3f} {_ci(b['delta_ci_low'], b['delta_ci_high'])} ({b['base_accuracy']:.3f} → "
            f"{b['tuned_accuracy']:.3f}, p_adj={b['p_adj']:.2g})."
        )
    if not verdict:
        return lines
    moved = [t for t in verdict if 0 < verdict[t][0] and verdict[t][1] <= verdict[t][0]]
    mixed = [t for t in verdict if 0 < verdict[t][0] < verdict[t][1]]
    still = [t for t in verdict if verdict[t][0] == 0]
    parts = ["Transferred: " + " and ".join(moved) + "."] if moved else []
    parts += [
        f"Mostly hurt: {t} ({verdict[t][0]} of {n} {unit} significantly better, {verdict[t][1]} "
        "significantly worse)."
        for t in mixed
    ]
    if still:
        parts.append(
            f"Did not transfer (no {best_word} significantly better than base): " + " and ".join(still) + "."
        )
    if not moved and not mixed:
        parts.insert(0, "Nothing transferred significantly.")
    return [*lines, " ".join(parts)]


def _selected_line(sel: dict) -> str:
    """The configuration the sweep's own objective picks: its test numbers are the unbiased ones."""
    ties = f", tied with {sel['tied_runs'] - 1} other(s), lowest id wins" if sel["tied_runs"] > 1 else ""
    seeds = f" (mean of {sel['n_seeds']} seeds)" if sel.get("n_seeds", 1) > 1 else ""
    ends = [e for e in sel.get("endpoints", []) if e["scoring"] == "generation"]
    if ends:
        parts = [
            f"{e['metric'].removesuffix('_accuracy')} {e['tuned_accuracy']:.3f} (Δ {e['delta']:+.3f} "
            f"{_ci(e['delta_ci_low'], e['delta_ci_high'])}, p_adj={e['p_adj']:.2g})"
            for e in ends
        ]
    else:
        parts = [
            f"{t} {sel[f'{t}_accuracy']:.3f} (Δ {sel[f'{t}_accuracy_delta']:+.3f} "
            f"{_ci(sel[f'{t}_accuracy_delta_ci_low'], sel[f'{t}_accuracy_delta_ci_high'])})"
            for t in TASKS
            if f"{t}_accuracy_delta" in sel
        ]
    family = "its own Holm family: " if ends else "test "
    return (
        f"Selected by validation ({sel['objective']} {sel['objective_value']:.3f}{ties}{_rule(sel)}): "
        f"{sel['run']}{seeds}, "
        f"rank {sel['test_rank']} on the test set; {family}" + ", ".join(parts) + "."
    )


def _rule(sel: dict) -> str:
    """How the configuration was chosen, and what the other rule would have chosen where they differ."""
    if "selection" not in sel:
        return ""
    rule = {"first_seed": "; on its first seed", "seed_mean": "; mean over seeds"}[sel["selection"]]
    other = sel.get("other_selection") or {}
    if other.get("config_id") is not None and other["config_id"] != sel["config_id"]:
        name = {"first_seed": "first seed", "seed_mean": "mean over seeds"}[other["selection"]]
        rule += f"; by {name} it would be config-{other['config_id']:04d}"
    return rule


def _correlation_line(corr: pd.DataFrame, unit: str = "runs") -> str:
    if "scoring" in corr:
        corr = corr[corr["scoring"] == "generation"]
    acc = corr[corr["quantity"] == "accuracy"].set_index("method")
    p, s = acc.loc["pearson"], acc.loc["spearman"]
    n = int(p["n_configs"]) if "n_configs" in p and pd.notna(p.get("n_configs")) else int(p["n_runs"])
    if pd.isna(p["ci_low"]):
        return f"Position–count correlation across {unit}: not estimable with {n} run(s)."
    how = (
        "move together"
        if p["ci_low"] > 0
        else "move in opposite directions"
        if p["ci_high"] < 0
        else "show no clear relation (the interval includes 0)"
    )
    return (
        f"Across {unit}, position and count accuracy {how}: Pearson r = {p['estimate']:.2f} "
        f"{_ci(p['ci_low'], p['ci_high'], '')}, Spearman ρ = {s['estimate']:.2f} "
        f"{_ci(s['ci_low'], s['ci_high'], '')} (bootstrap over {n} {unit})."
    )


def _hyperparameter_lines(hp: pd.DataFrame) -> list[str]:
    imp = hp[hp["kind"] == "importance"]
    if "scoring" in imp:
        imp = imp[imp["scoring"] == "generation"]
    lines = []
    for metric in ("position_accuracy", "count_accuracy", "transfer_score"):
        r = imp[(imp["metric"] == metric) & (imp["rank"] == 1)]
        if r.empty:
            continue
        r = r.iloc[0]
        unit = "per doubling" if r["scale"] == "log2" else "per unit"
        if pd.isna(r["slope_ci_low"]):
            lines.append(
                f"{LABELS[metric]}: {int(r['n_runs'])} runs are too few to rank hyperparameters "
                f"(intervals need at least {MIN_RUNS_FOR_INTERVALS})."
            )
            continue
        clear = r["slope_ci_low"] > 0 or r["slope_ci_high"] < 0
        p_adj = r.get("p_adj")
        held = pd.notna(p_adj) and p_adj <= 0.05
        kind = "HC3 interval" if "HC3" in str(r.get("method", "")) else "interval"
        verdict = (
            f"its {kind} excludes 0"
            + (
                f" and it holds after Holm (p_adj={p_adj:.2g})"
                if held
                else f", but not after Holm across the slopes (p_adj={p_adj:.2g})"
                if pd.notna(p_adj)
                else ""
            )
            if clear
            else "but its interval includes 0, so no clear effect"
        )
        lines.append(
            f"{LABELS[metric]}: the most important hyperparameter is {r['hyperparameter']} "
            f"({r['slope']:+.3f} {unit} {_ci(r['slope_ci_low'], r['slope_ci_high'])}; {verdict})."
        )
    return lines


MIN_ITEMS_PER_BUCKET = 20
"""Buckets with fewer items per run are left out of the summary's "largest rise / fall" sentence:
picking the extreme of many tiny buckets would report noise (the tables keep them)."""


def _signed(name: str, row) -> str:
    interval = _ci(row["delta_ci_low"], row["delta_ci_high"])
    return f"{row['breakdown']} = {row['bucket']} ({row['delta']:+.3f} {interval})"


def _change_lines(bd: pd.DataFrame) -> list[str]:
    """Where accuracy changed most, by bucket: a rise is called a rise, a fall a fall — a negative
    number is never a gain."""
    pooled = bd[bd["run"] == "all runs"]
    lines = []
    for task in TASKS:
        g = pooled[(pooled["metric"] == f"{task}_accuracy") & (pooled["n_items"] >= MIN_ITEMS_PER_BUCKET)]
        if g.empty:
            lines.append(
                f"Where {task} accuracy changed: no bucket has {MIN_ITEMS_PER_BUCKET} or more items per run; "
                "see the breakdown table."
            )
            continue
        hi, lo = g.loc[g["delta"].idxmax()], g.loc[g["delta"].idxmin()]
        parts = []
        if hi["delta"] > 0:
            parts.append(f"largest rise for {_signed(task, hi)}")
        if lo["delta"] < 0:
            parts.append(f"largest fall for {_signed(task, lo)}")
        if not parts:
            parts.append("no bucket changed")
        lines.append(
            f"Where {task} accuracy changed (mean over runs, descriptive): " + "; ".join(parts) + "."
        )
    return lines


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;\
margin:0;color:#1b1f24;background:#fff}
main{max-width:1100px;margin:auto;padding:1.5rem}
h1{font-size:1.6rem} h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2rem}
.lede{color:#57606a} figure{margin:1.5rem 0} \
figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.9rem;color:#424a53;max-width:900px}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0 1.5rem} \
th,td{border:1px solid #d0d7de;padding:.2rem .4rem}
th{background:#f6f8fa;position:sticky;top:0} td{text-align:right;white-space:nowrap}
.scroll{overflow:auto;max-height:30rem} dt{font-weight:600} dd{margin:0 0 .6rem 1rem}
tr.selected td{background:#fff1f0;font-weight:600} .note{font-size:.85rem;color:#57606a}
"""


INTEGER_COLUMNS = {
    "rank",
    "trial",
    "config_id",
    "replicate",
    "seed",
    "n",
    "n_items",
    "n_runs",
    "n_configs",
    "n_seeds",
    "steps_trained",
}
NAMES = {
    "mcnemar_p": "McNemar p",
    "p_adj": "p (Holm)",
    "p_value": "p",
    "n_items": "items",
    "n_runs": "runs",
    "n_configs": "configurations",
    "n_seeds": "seeds",
    "config_id": "configuration",
    "steps_trained": "steps trained",
    "base_accuracy": "base",
    "tuned_accuracy": "fine-tuned",
    "delta": "Δ",
    "delta_seed_sd": "Δ seed SD",
    "tuned_seed_sd": "seed SD",
    "transfer_score": "transfer score",
    "run_dir": "directory",
}


def readable(col: str) -> str:
    """A column name a reader can parse: ``position/nth_letter_accuracy_delta`` → ``nth_letter Δ``."""
    if col in NAMES:
        return NAMES[col]
    name = col.removeprefix("params.")
    for suffix, words in (
        ("_delta", " Δ"),
        ("_p_adj", " p (Holm)"),
        ("_mcnemar_p", " McNemar p"),
        ("_base", " base"),
        ("_best_trivial", " best trivial"),
        ("_beats_trivial", " beats trivial"),
        ("_constant_answer", " constant answer"),
        ("_no_answer_rate", " no-answer rate"),
        ("_seed_sd", " seed SD"),
        ("_n", " n"),
    ):
        if name.endswith(suffix) and name != suffix.strip("_"):
            return readable(name.removesuffix(suffix)) + words
    name = name.removesuffix("_accuracy")
    name = name.split("/", 1)[1] if name.startswith(("position/", "count/")) else name
    return name.replace("_", " ")


def _cell(col: str, v) -> str:
    """Fixed decimals: accuracies and changes 3, p-values 2 significant digits, counts as integers."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if col in INTEGER_COLUMNS or col.endswith("_n"):
        return f"{int(v):,}"
    if col.startswith("params."):
        return f"{v:g}"
    if col.endswith(("_p", "p_adj", "p_value")):
        return f"{v:.2g}"
    signed = "delta" in col or col.startswith("slope") or col == "estimate"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _joined(df: pd.DataFrame) -> pd.DataFrame:
    """Each ``X`` beside ``X_ci_low`` / ``X_ci_high`` as one cell ``x [low, high]``.

    The interval columns are dropped.
    """
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        if col.endswith(("_ci_low", "_ci_high")) and (
            col.rsplit("_ci_", 1)[0] in df or col.rsplit("_ci_", 1)[0] == ""
        ):
            continue
        if col in ("ci_low", "ci_high") and "estimate" in df:
            continue
        lo_col, hi_col = ("ci_low", "ci_high") if col == "estimate" else (f"{col}_ci_low", f"{col}_ci_high")
        if col == "delta":
            lo_col, hi_col = "delta_ci_low", "delta_ci_high"
        if lo_col in df and hi_col in df:
            out[col] = [
                f"{_cell(col, v)} [{_cell(col, lo)}, {_cell(col, hi)}]"
                if _cell(col, v) and _cell(col, lo)
                else _cell(col, v)
                for v, lo, hi in zip(df[col], df[lo_col], df[hi_col])
            ]
        else:
            out[col] = [_cell(col, v) for v in df[col]]
    return out


def _table(df: pd.DataFrame, caption: str, highlight: set | None = None, note: str = "") -> str:
    """A formatted HTML table: readable headers, fixed decimals, intervals in brackets, the
    validation-selected run's rows highlighted."""
    esc = html.escape
    cells = _joined(df.reset_index(drop=True))
    head = "".join(f"<th>{esc(readable(str(c)))}</th>" for c in cells.columns)
    rows = []
    for i, r in cells.iterrows():
        chosen = highlight and str(df.iloc[i].get("run", "")) in highlight
        tr = '<tr class="selected">' if chosen else "<tr>"
        rows.append(tr + "".join(f"<td>{esc(str(v))}</td>" for v in r) + "</tr>")
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return (
        f'<h3>{esc(caption)}</h3>{note_html}<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}">'


def render(info: dict, tables: dict[str, pd.DataFrame], src: Path) -> str:
    """The report as one HTML string: no scripts, no external resources."""
    name = html.escape(str(info.get("name")))
    esc = html.escape
    summary = "".join(f"<li>{esc(line)}</li>" for line in summary_lines(info, tables))
    figs = "".join(
        f"<figure>{_img(src / f['file'], f['title'])}<figcaption><b>{esc(f['title'])}.</b> "
        f"{esc(f['caption'])}</figcaption></figure>"
        for f in info["figures"]
    )
    deltas, hp, bd = tables["per_run_deltas"], tables["hyperparameter_effects"], tables["breakdowns"]
    eff, runs = tables["config_effects"], tables["runs"]
    sel = info.get("selected_by_validation") or {}
    chosen = (
        set(sel.get("runs") or [])
        | {str(sel.get("run"))}
        | ({f"config-{sel['config_id']:04d}"} if sel.get("config_id") is not None else set())
    )
    gen_runs = runs[runs["scoring"] == "generation"] if "scoring" in runs else runs
    subtask_cols = [
        c
        for c in gen_runs.columns
        if "/" in c
        and c.endswith(
            (
                "_accuracy",
                "_accuracy_ci_low",
                "_accuracy_ci_high",
                "_accuracy_best_trivial",
                "_accuracy_beats_trivial",
                "_accuracy_constant_answer",
                "_accuracy_no_answer_rate",
            )
        )
        and not c.startswith("val/")
    ]
    per_run_cols = [
        c for c in ("run", "config_id", "replicate", "steps_trained") if c in gen_runs
    ] + subtask_cols
    tested = eff[eff["endpoint"].isin(["primary", "secondary"])] if len(eff) else eff
    keep = [
        c
        for c in (
            "scoring",
            "run",
            "metric",
            "n_seeds",
            "base_accuracy",
            "tuned_accuracy",
            "tuned_seed_sd",
            "delta",
            "delta_ci_low",
            "delta_ci_high",
            "delta_seed_sd",
            "test",
            "p_adj",
            "family",
        )
        if c in tested
    ]
    decided = pd.DataFrame(
        [{"subtask": d["subtask"], "decision": d["decision"]} for d in info.get("decisions") or []]
    )
    contrasts = tables["arm_contrasts"]
    contrast_cols = [
        c
        for c in (
            "contrast",
            "scoring",
            "metric",
            "n_seeds",
            "tuned_accuracy",
            "tuned_ci_low",
            "tuned_ci_high",
            "reference_accuracy",
            "best_trivial",
            "delta",
            "delta_ci_low",
            "delta_ci_high",
            "seeds_same_direction",
            "test",
            "p_adj",
        )
        if c in contrasts
    ]
    adjusted = [
        f"[{lo:+.3f}, {hi:+.3f}]" if pd.notna(lo) else ""
        for lo, hi in zip(contrasts["delta_adj_ci_low"], contrasts["delta_adj_ci_high"])
    ]
    contrast_view = contrasts[contrast_cols].assign(**{"family interval": adjusted})
    imp = hp[hp["kind"] == "importance"]
    patterns = imp[
        imp["hyperparameter"].astype(str).str.contains("=") | (imp["hyperparameter"] == "distinct_words")
    ]
    pattern_cols = [
        c
        for c in (
            "scoring",
            "metric",
            "hyperparameter",
            "reference",
            "scale",
            "slope",
            "slope_ci_low",
            "slope_ci_high",
            "p_adj",
            "n_configs",
        )
        if c in patterns
    ]
    patterns = (
        patterns[pattern_cols].assign(
            reference=["" if pd.isna(r) else f"vs {r}" for r in patterns["reference"]]
        )
        if "reference" in patterns
        else patterns[pattern_cols]
    )
    tabs = "".join(
        [
            (
                _table(
                    decided,
                    "Decision per subtask (pre-registered rule)",
                    note=(
                        "transfer: above the base and the control (family intervals above 0), above the "
                        "best trivial baseline, every seed above the base; format interference: generation "
                        "below the base while the probe is not, or replies spelled out; else no effect; "
                        "undetermined names what is missing."
                    ),
                )
                if len(decided)
                else ""
            ),
            (
                _table(
                    contrast_view,
                    "Validation-selected configuration against the base and the control",
                    note=(
                        "Mean over seeds per question, paired over the same questions; family interval: "
                        "simultaneous over the Holm family (what the decision reads). control − base: does "
                        "any fine-tuning move answer habits?"
                    ),
                )
                if len(contrasts)
                else ""
            ),
            (
                _table(
                    patterns,
                    (
                        "Training-pattern effects (OLS on configuration means, HC3; Holm per endpoint "
                        "and scoring)"
                    ),
                    note=(
                        "variants and separator as dummies against their reference level; distinct_words "
                        "per doubling (null: every training word)."
                    ),
                )
                if len(patterns)
                else ""
            ),
            _table(
                tables["top_transfer_configs"],
                "Top runs by test transfer_score (chosen on the test set: optimistic)",
                chosen,
                "The validation-selected run is highlighted; it need not rank first here.",
            ),
            _table(
                gen_runs[per_run_cols],
                "Per run and subtask: accuracy, best trivial baseline, answer diagnostics",
                chosen,
                "constant answer: one reply in more than half of the subtask's replies; beats trivial: the "
                "accuracy's interval lies above the best trivial baseline (from evaluate's metrics.json).",
            ),
            _table(
                tested[keep],
                "Configurations against the base model (Holm within each family)",
                chosen,
                "With several seeds the test is a one-sample t-test across seeds; with one, the run's "
                "exact McNemar test.",
            ),
            _table(
                deltas[deltas["metric"].isin(["position_accuracy", "count_accuracy"])].drop(
                    columns=["config_id"], errors="ignore"
                ),
                "Per run: fine-tuned − base (task totals; p (Holm) within scoring × endpoint)",
                chosen,
            ),
            _table(tables["metric_correlations"], "Position vs count across configurations"),
            _table(
                hp[hp["kind"] == "importance"].dropna(axis=1, how="all"),
                "Hyperparameter importance (OLS, HC3 intervals, Holm across slopes)",
            ),
            _table(
                hp[hp["kind"] == "marginal_mean"].dropna(axis=1, how="all"),
                "Marginal means per hyperparameter value",
            ),
            _table(
                bd[bd["run"] == "all runs"].dropna(axis=1, how="all"),
                "Where accuracy changed (mean over runs, descriptive)",
            ),
        ]
    )
    methods = "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in info["methods"].items())
    skipped = pd.DataFrame(info["skipped"], columns=["trial", "status", "reason"])
    prov = info.get("provenance", {})
    seeds = "/".join(map(str, info["seeds_per_config"])) if not _one_seed(info) else ""
    design = "" if _one_seed(info) else f" ({info.get('n_configs')} configurations × {seeds} seeds)"
    packages = ", ".join(f"{k} {v}" for k, v in prov.get("packages", {}).items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">\
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>spellxfer transfer report: {name}</title><style>{STYLE}</style></head>
<body><main>
<h1>Transfer report: {name}</h1>
<p class="lede">Trained on spelling, evaluated on position and count only. \
{info["n_runs"]} complete runs{design},
{esc(info["decoding"])} decoding, {info["n_boot"]} bootstrap resamples (seed {info["seed"]}). \
Every accuracy carries a 95% interval.</p>
<section id="summary"><h2>Summary</h2><ul>{summary}</ul></section>
<section id="figures"><h2>Figures</h2>{figs}</section>
<section id="tables"><h2>Tables</h2>{tabs}\
<p>Full tables (per subtask, per run and bucket): the CSV files beside analysis.json.</p></section>
<section id="method"><h2>Method</h2><dl>{methods}</dl>
{_table(skipped, "Trials not analysed") if len(skipped) else "<p>Every trial was complete and analysed.</p>"}
<p>Non-whitelisted metric entries dropped while reading training logs: \
{info.get("omitted_metric_entries", 0)}.
spellxfer commit {esc(str(prov.get("git_commit")))}; {esc(packages)}.</p>
</section></main></body></html>
"""


def log_to_wandb(
    info: dict, tables: dict[str, pd.DataFrame], src: Path, page: Path, project: str, name: str
) -> None:
    """Tables (whitelisted columns only), figures and the page as one W&B run.

    The run is offline unless W&B credentials exist.
    """
    import wandb as wb  # seconds to import, and only `report --wandb` logs

    run = wb.init(
        project=project,
        name=f"transfer-report-{name}",
        job_type="transfer-report",
        mode=wandb_mode(),
        config={"decoding": info["decoding"], "n_runs": info["n_runs"], "n_boot": info["n_boot"]},
    )
    try:
        run.log(
            {f"tables/{k}": wb.Table(dataframe=v) for k, v in tables.items()}
            | {
                f"figures/{Path(f['file']).stem}": wb.Image(str(src / f["file"]), caption=f["title"])
                for f in info["figures"]
            }
            | {"report": wb.Html(page.read_text(encoding="utf-8"))}
        )
    finally:
        run.finish()
    console.print(f"logged the report to W&B project {project} ({wandb_mode()})")
