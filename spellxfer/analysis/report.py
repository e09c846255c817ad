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
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file, atomic_output_dir, check_output_dir, read_json, snippet
from spellxfer.tasks.names import TASKS

console = Console()
LABELS = {"position_accuracy": "position accuracy", "count_accuracy": "count accuracy", "transfer_score": "transfer_score"}
TABLES = ("top_transfer_configs", "per_run_deltas", "metric_correlations", "hyperparameter_effects", "breakdowns", "runs")


def report(
    analysis: str = "results/transfer_analysis",
    out: str = "results/deployment/reports",
    figures_out: str = "results/deployment/figures",
    wandb: bool = False,
    wandb_project: str = "spellxfer",
) -> int:
    """Build one self-contained HTML transfer report from an `analyze` output directory.

    Figures embedded, tables, and a plain-language summary of what transferred to position and
    count and what did not (trained on spelling, evaluated on position and count only). Writes OUT/transfer_report_NAME.html and copies the figures to FIGURES_OUT/NAME/.

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
    console.print(f"wrote {path} ({len(page) / 1e6:.1f} MB, {len(info['figures'])} figures embedded) "
                  f"and {Path(figures_out) / name}/")  # fmt: skip
    for line in summary_lines(info, tables):
        console.print(f"• {line}", highlight=False)
    if wandb:
        log_to_wandb(info, tables, src, path, wandb_project, name)
    return 0


# Columns the summary and the page read from each table (analyze writes them all), and which of
# them must be numeric; checked on load so a hand-edited or foreign CSV is one error line.
REQUIRED_COLUMNS = {
    "top_transfer_configs": ("run", "transfer_score", "transfer_score_ci_low", "transfer_score_ci_high"),
    "per_run_deltas": ("run", "metric", "delta", "delta_ci_low", "delta_ci_high", "base_accuracy", "tuned_accuracy",
                       "p_adj", "significant"),
    "metric_correlations": ("quantity", "method", "estimate", "ci_low", "ci_high", "n_runs"),
    "hyperparameter_effects": ("kind", "metric", "hyperparameter", "rank", "scale", "slope", "slope_ci_low",
                               "slope_ci_high", "n_runs"),
    "breakdowns": ("run", "breakdown", "bucket", "metric", "n_items", "delta", "delta_ci_low", "delta_ci_high"),
    "runs": ("run",),
}  # fmt: skip
TEXT_COLUMNS = ("run", "metric", "quantity", "method", "kind", "hyperparameter", "scale", "breakdown", "bucket")
INFO_KEYS = {"n_runs": int, "status_counts": dict, "decoding": str, "figures": list, "methods": dict, "skipped": list,
             "n_boot": int, "seed": int}  # fmt: skip


def load_analysis(src: Path) -> tuple[dict, dict[str, pd.DataFrame]]:
    """``analysis.json`` and the tables of an ``analyze`` directory, checked for what the report
    reads; a missing or malformed piece is a one-line error naming the file."""
    if not (src / "analysis.json").is_file():
        raise SpellxferError(f"--analysis {src}: no analysis.json (run `python -m spellxfer analyze --out {src}` first)")
    info = read_json(src / "analysis.json")
    where = src / "analysis.json"
    if not isinstance(info, dict):
        raise SpellxferError(f"{where}: expected an object (as `analyze` writes)")
    for key, kind in INFO_KEYS.items():
        if key not in info:
            raise SpellxferError(f"{where}: no {key!r} key (as `analyze` writes)")
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise SpellxferError(f"{where}: {key} {snippet(info[key])} is not {_KIND_NAMES[kind]}")
    tables = {name: _read_table(src / f"{name}.csv", name, src) for name in TABLES}
    if tables["top_transfer_configs"].empty:
        raise SpellxferError(f"{src / 'top_transfer_configs.csv'}: no rows (a report needs at least one run)")
    root = src.resolve()
    for i, fig in enumerate(info["figures"]):
        if not isinstance(fig, dict) or not all(isinstance(fig.get(k), str) for k in ("file", "title", "caption")):
            raise SpellxferError(f"{where}: figures[{i}] is not an object with text file, title and caption")
        file = Path(fig["file"])
        # The page embeds these bytes and the report copies them: only PNGs inside the analysis.
        if file.is_absolute() or ".." in file.parts or file.suffix.lower() != ".png" or not \
                (src / file).resolve().is_relative_to(root):  # fmt: skip
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
            raise SpellxferError(f"{f}: column {col!r} holds a value that is not "
                                 f"{'true/false' if col == 'significant' else 'a number'}")  # fmt: skip
    return check_columns(table, f"{f}")


def _ci(lo, hi, sign: str = "+") -> str:
    return f"[{lo:{sign}.3f}, {hi:{sign}.3f}]"


def summary_lines(info: dict, tables: dict[str, pd.DataFrame]) -> list[str]:
    """What transferred and what did not, in sentences with the numbers (the report's first section)."""
    n = info["n_runs"]
    others = {k: v for k, v in info["status_counts"].items() if k != "complete"}
    lines = [f"{n} complete run(s) analysed ({info['decoding']} decoding)"
             + (f"; not analysed: {', '.join(f'{v} {k}' for k, v in sorted(others.items()))}." if others else ".")]
    lines += verdict_lines(tables["per_run_deltas"], n)
    lines.append(_correlation_line(tables["metric_correlations"]))
    lines += _hyperparameter_lines(tables["hyperparameter_effects"])
    top = tables["top_transfer_configs"].iloc[0]
    params = ", ".join(f"{c.removeprefix('params.')}={top[c]:g}" if isinstance(top[c], float) else f"{c.removeprefix('params.')}={top[c]}"
                       for c in tables["top_transfer_configs"].columns if c.startswith("params."))  # fmt: skip
    lines.append(f"Top configuration by test transfer_score: {top['run']} ({params}) with transfer_score "
                 f"{top['transfer_score']:.3f} {_ci(top['transfer_score_ci_low'], top['transfer_score_ci_high'], '')} "
                 "(chosen on the test set, so optimistic).")
    if sel := info.get("selected_by_validation"):
        lines.append(_selected_line(sel))
    lines += _gain_lines(tables["breakdowns"])
    return lines


def verdict_lines(deltas: pd.DataFrame, n: int) -> list[str]:
    """Per task, how many runs rose (significantly, after Holm) and fell, then the verdict. A task
    transferred when some run is significantly better and no more runs are significantly worse;
    significant gains in a few runs among more significant losses are "mostly hurt", not transfer."""
    lines, verdict = [], {}
    for task in TASKS:
        d = deltas[(deltas["metric"] == f"{task}_accuracy") & deltas["delta"].notna()]
        if d.empty:  # runs evaluated on one task only
            lines.append(f"{task.capitalize()} accuracy: no {task} items in these runs.")
            continue
        up, sig_up = int((d["delta"] > 0).sum()), int((d["significant"] & (d["delta"] > 0)).sum())
        sig_down = int((d["significant"] & (d["delta"] < 0)).sum())
        b = d.loc[d["delta"].idxmax()]
        verdict[task] = (sig_up, sig_down)
        lines.append(
            f"{task.capitalize()} accuracy rose in {up} of {n} runs ({sig_up} significantly after Holm adjustment, "
            f"{sig_down} fell significantly); the best run ({b['run']}) changed it by {b['delta']:+.3f} "
            f"{_ci(b['delta_ci_low'], b['delta_ci_high'])} ({b['base_accuracy']:.3f} → {b['tuned_accuracy']:.3f}, "
            f"McNemar p_adj={b['p_adj']:.2g}).")  # fmt: skip
    moved = [t for t in verdict if 0 < verdict[t][0] and verdict[t][1] <= verdict[t][0]]
    mixed = [t for t in verdict if 0 < verdict[t][0] < verdict[t][1]]
    still = [t for t in verdict if verdict[t][0] == 0]
    parts = ["Transferred: " + " and ".join(moved) + "."] if moved else []
    parts += [f"Mostly hurt: {t} ({verdict[t][0]} of {n} runs significantly better, {verdict[t][1]} significantly "
              "worse)." for t in mixed]  # fmt: skip
    if still:
        parts.append("Did not transfer (no run significantly better than base): " + " and ".join(still) + ".")
    if not moved and not mixed:
        parts.insert(0, "Nothing transferred significantly.")
    return [*lines, " ".join(parts)]


def _selected_line(sel: dict) -> str:
    """The run the sweep's own objective picks: its test numbers are the unbiased ones."""
    ties = f", tied with {sel['tied_runs'] - 1} other run(s), lowest trial number wins" if sel["tied_runs"] > 1 else ""
    parts = [f"{t} {sel[f'{t}_accuracy']:.3f} (Δ {sel[f'{t}_accuracy_delta']:+.3f} "
             f"{_ci(sel[f'{t}_accuracy_delta_ci_low'], sel[f'{t}_accuracy_delta_ci_high'])})"
             for t in TASKS if f"{t}_accuracy_delta" in sel]  # fmt: skip
    return (f"Selected by validation ({sel['objective']} {sel['objective_value']:.3f}{ties}): {sel['run']}, "
            f"rank {sel['test_rank']} on the test set; test " + ", ".join(parts) + ".")


def _correlation_line(corr: pd.DataFrame) -> str:
    acc = corr[corr["quantity"] == "accuracy"].set_index("method")
    p, s = acc.loc["pearson"], acc.loc["spearman"]
    if pd.isna(p["ci_low"]):
        return f"Position–count correlation across runs: not estimable with {int(p['n_runs'])} run(s)."
    how = ("move together" if p["ci_low"] > 0 else "move in opposite directions" if p["ci_high"] < 0
           else "show no clear relation (the interval includes 0)")  # fmt: skip
    return (f"Across runs, position and count accuracy {how}: Pearson r = {p['estimate']:.2f} "
            f"{_ci(p['ci_low'], p['ci_high'], '')}, Spearman ρ = {s['estimate']:.2f} {_ci(s['ci_low'], s['ci_high'], '')} "
            f"(bootstrap over {int(p['n_runs'])} runs).")  # fmt: skip


def _hyperparameter_lines(hp: pd.DataFrame) -> list[str]:
    imp = hp[hp["kind"] == "importance"]
    lines = []
    for metric in ("position_accuracy", "count_accuracy", "transfer_score"):
        r = imp[(imp["metric"] == metric) & (imp["rank"] == 1)]
        if r.empty:
            continue
        r = r.iloc[0]
        unit = "per doubling" if r["scale"] == "log2" else "per unit"
        if pd.isna(r["slope_ci_low"]):
            lines.append(f"{LABELS[metric]}: {int(r['n_runs'])} runs are too few to rank hyperparameters "
                         f"(intervals need at least {MIN_RUNS_FOR_INTERVALS}).")
            continue
        clear = r["slope_ci_low"] > 0 or r["slope_ci_high"] < 0
        lines.append(f"{LABELS[metric]}: the most important hyperparameter is {r['hyperparameter']} "
                     f"({r['slope']:+.3f} {unit} {_ci(r['slope_ci_low'], r['slope_ci_high'])}; "
                     + ("its interval excludes 0" if clear else "but its interval includes 0, so no clear effect") + ").")
    return lines


MIN_ITEMS_PER_BUCKET = 20
"""Buckets with fewer items per run are left out of the summary's "largest / smallest gain"
sentence: picking the extreme of many tiny buckets would report noise (the tables keep them)."""


def _gain_lines(bd: pd.DataFrame) -> list[str]:
    pooled = bd[bd["run"] == "all runs"]
    lines = []
    for task in TASKS:
        g = pooled[(pooled["metric"] == f"{task}_accuracy") & (pooled["n_items"] >= MIN_ITEMS_PER_BUCKET)]
        if g.empty:
            lines.append(f"Where the {task} gains are: no bucket has {MIN_ITEMS_PER_BUCKET} or more items per run; "
                         "see the breakdown table.")
            continue
        hi, lo = g.loc[g["delta"].idxmax()], g.loc[g["delta"].idxmin()]
        lines.append(f"Where the {task} gains are (mean over runs): largest for {hi['breakdown']} = {hi['bucket']} "
                     f"({hi['delta']:+.3f} {_ci(hi['delta_ci_low'], hi['delta_ci_high'])}), smallest for "
                     f"{lo['breakdown']} = {lo['bucket']} ({lo['delta']:+.3f} {_ci(lo['delta_ci_low'], lo['delta_ci_high'])}).")
    return lines


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;background:#fff}
main{max-width:1100px;margin:auto;padding:1.5rem}
h1{font-size:1.6rem} h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2rem}
.lede{color:#57606a} figure{margin:1.5rem 0} figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.9rem;color:#424a53;max-width:900px}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0 1.5rem} th,td{border:1px solid #d0d7de;padding:.2rem .4rem}
th{background:#f6f8fa;position:sticky;top:0} td{text-align:right;white-space:nowrap}
.scroll{overflow:auto;max-height:30rem} dt{font-weight:600} dd{margin:0 0 .6rem 1rem}
"""


def _table(df: pd.DataFrame, caption: str) -> str:
    body = df.to_html(index=False, escape=True, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
    return f"<h3>{html.escape(caption)}</h3><div class=\"scroll\">{body}</div>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}">'


def render(info: dict, tables: dict[str, pd.DataFrame], src: Path) -> str:
    """The report as one HTML string: no scripts, no external resources."""
    name = html.escape(str(info.get("name")))
    esc = html.escape
    summary = "".join(f"<li>{esc(line)}</li>" for line in summary_lines(info, tables))
    figs = "".join(f"<figure>{_img(src / f['file'], f['title'])}<figcaption><b>{esc(f['title'])}.</b> "
                   f"{esc(f['caption'])}</figcaption></figure>" for f in info["figures"])  # fmt: skip
    deltas, hp, bd = tables["per_run_deltas"], tables["hyperparameter_effects"], tables["breakdowns"]
    tabs = "".join([
        _table(tables["top_transfer_configs"], "Top configurations by transfer_score"),
        _table(deltas[~deltas["metric"].str.contains("/")], "Per run: fine-tuned − base (task level; p_adj is Holm)"),
        _table(tables["metric_correlations"], "Position vs count across runs"),
        _table(hp[hp["kind"] == "importance"].dropna(axis=1, how="all"), "Hyperparameter importance (regression)"),
        _table(hp[hp["kind"] == "marginal_mean"].dropna(axis=1, how="all"), "Marginal means per hyperparameter value"),
        _table(bd[bd["run"] == "all runs"].dropna(axis=1, how="all"), "Where the gains are (mean over runs)"),
    ])  # fmt: skip
    methods = "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in info["methods"].items())
    skipped = pd.DataFrame(info["skipped"], columns=["trial", "status", "reason"])
    prov = info.get("provenance", {})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>spellxfer transfer report: {name}</title><style>{STYLE}</style></head>
<body><main>
<h1>Transfer report: {name}</h1>
<p class="lede">Trained on spelling, evaluated on position and count only. {info['n_runs']} complete runs,
{esc(info['decoding'])} decoding, {info['n_boot']} bootstrap resamples (seed {info['seed']}). Every accuracy carries a 95% interval.</p>
<section id="summary"><h2>Summary</h2><ul>{summary}</ul></section>
<section id="figures"><h2>Figures</h2>{figs}</section>
<section id="tables"><h2>Tables</h2>{tabs}<p>Full tables (per subtask, per run and bucket): the CSV files beside analysis.json.</p></section>
<section id="method"><h2>Method</h2><dl>{methods}</dl>
{_table(skipped, "Trials not analysed") if len(skipped) else "<p>Every trial was complete and analysed.</p>"}
<p>Non-whitelisted metric entries dropped while reading training logs: {info.get('omitted_metric_entries', 0)}.
spellxfer commit {esc(str(prov.get('git_commit')))}; {esc(', '.join(f'{k} {v}' for k, v in prov.get('packages', {}).items()))}.</p>
</section></main></body></html>
"""


def log_to_wandb(info: dict, tables: dict[str, pd.DataFrame], src: Path, page: Path, project: str, name: str) -> None:
    """Tables (whitelisted columns only), figures and the page as one W&B run; offline unless credentials exist."""
    import wandb as wb

    from spellxfer.core.doctor import wandb_mode

    run = wb.init(project=project, name=f"transfer-report-{name}", job_type="transfer-report", mode=wandb_mode(),
                  config={"decoding": info["decoding"], "n_runs": info["n_runs"], "n_boot": info["n_boot"]})  # fmt: skip
    try:
        run.log({f"tables/{k}": wb.Table(dataframe=v) for k, v in tables.items()}
                | {f"figures/{Path(f['file']).stem}": wb.Image(str(src / f["file"]), caption=f["title"]) for f in info["figures"]}
                | {"report": wb.Html(page.read_text(encoding="utf-8"))})  # fmt: skip
    finally:
        run.finish()
    console.print(f"logged the report to W&B project {project} ({wandb_mode()})")
