"""Paired comparison of two evaluation runs on the same items (base vs fine-tuned).

Per task and subtask: the accuracy difference (other − base) with a paired bootstrap 95%
interval over items, and an exact McNemar p-value on the discordant items, for generation scoring
and, where both runs have it, for the likelihood probe. Beside each accuracy: the best trivial
baseline on the same items (:mod:`~spellxfer.evaluation.baselines`) and whether the accuracy's
95% interval lies above it. Items are matched by (question file name, id); only items present in
both runs are compared, and the count is reported.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.table import Table

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import atomic_file, check_output_file, iter_jsonl, snippet
from spellxfer.core.tables import print_table
from spellxfer.evaluation.baselines import beats, best_trivial, trivial_baselines
from spellxfer.evaluation.stats import accuracy_summary, paired_comparison
from spellxfer.tasks.names import TASKS
from spellxfer.tasks.questions import check_breakdown_fields


def compare_predictions(base: list[dict], other: list[dict], base_name: str = "base",
                        other_name: str = "other") -> dict:
    """Paired differences between two predictions.jsonl row lists: ``groups`` for generation
    scoring, ``likelihood_groups`` for the probe (when both runs ran it). Each group also carries
    ``best_trivial`` and ``a_beats_trivial`` / ``b_beats_trivial`` (the base's and the other run's
    95% interval above it)."""

    def per_item(rows: list[dict]) -> dict[tuple[str, str], dict]:
        acc: dict[tuple[str, str], dict] = {}
        for r in rows:
            key = (Path(r["file"]).name, r["id"])
            e = acc.setdefault(key, {"task": r["task"], "subtask": r.get("subtask"),
                                     "answer": r.get("answer"), "word": r.get("word"),
                                     "scores": [], "probe": None})
            if r["correct"] is not None:
                e["scores"].append(r["correct"])
            if isinstance(r.get("likelihood_correct"), bool):
                e["probe"] = r["likelihood_correct"]
        return acc

    a, b = per_item(base), per_item(other)
    common = sorted(set(a) & set(b))
    if not common:
        raise SpellxferError(
            f"runs {base_name} and {other_name} share no items (matched by file name and id)"
        )
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in common:
        groups[a[key]["task"]].append(key)
        if a[key]["subtask"]:
            groups[f"{a[key]['task']}/{a[key]['subtask']}"].append(key)
    out = {
        "base": base_name,
        "other": other_name,
        "n_common_items": len(common),
        "n_base_only": len(set(a) - set(b)),
        "n_other_only": len(set(b) - set(a)),
        "method": "paired bootstrap 95% CI of (other − base) over items; exact McNemar test",
        "groups": {},
    }
    order = sorted(groups, key=lambda g: (g.split("/")[0] not in TASKS, TASKS.index(g.split("/")[0]), g))

    def compared(keys, verdicts) -> dict:
        """paired_comparison of per-item verdict lists, with the trivial baseline beside each side."""
        va, vb = [verdicts(a[k]) for k in keys], [verdicts(b[k]) for k in keys]
        g = paired_comparison([sum(v) / len(v) for v in va], [sum(v) / len(v) for v in vb])
        # baselines need the gold answers, which older prediction files may lack
        if all(a[k]["answer"] is not None for k in keys):
            best = best_trivial(trivial_baselines(a[k] for k in keys))
            g |= {"best_trivial": best, "a_beats_trivial": beats(accuracy_summary(va)["ci_low"], best),
                  "b_beats_trivial": beats(accuracy_summary(vb)["ci_low"], best)}
        return g

    for name in order:
        keys = [k for k in groups[name] if a[k]["scores"] and b[k]["scores"]]
        if keys:
            out["groups"][name] = compared(keys, lambda e: e["scores"])
    if all(a[k]["probe"] is not None and b[k]["probe"] is not None for k in common):
        out["likelihood_groups"] = {name: compared(groups[name], lambda e: [e["probe"]]) for name in order}
    return out


def comparison_markdown(c: dict) -> str:
    """The comparison as a short Markdown report (what `make demo` leaves beside its numbers)."""
    lines = [
        f"# {c['other']} vs {c['base']}",
        "",
        "Trained on spelling only; evaluated on position and count only. "
        f"{c['n_common_items']} items in both runs; {c['method']}. "
        "Best trivial: the best answer rule that never reads the word's letters, on the same items "
        "(docs/evaluation.md#trivial-baselines); ✗ marks an accuracy whose 95% interval does not "
        "lie above it.",
    ]
    for title, key in (("Generation (parsed replies)", "groups"), ("Likelihood probe", "likelihood_groups")):
        if not c.get(key):
            continue
        lines += ["", f"## {title}", "",
                  "| group | base | other | best trivial | Δ (other − base) | 95% CI of Δ | McNemar p | n |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, g in c[key].items():
            flag = {side: " ✗" if g.get(f"{side}_beats_trivial") is False else "" for side in ("a", "b")}
            trivial = g.get("best_trivial")
            best = f"{trivial['accuracy']:.3f} ({trivial['name']})" if "best_trivial" in g else "–"
            lines.append(f"| {name} | {g['acc_a']:.3f}{flag['a']} | {g['acc_b']:.3f}{flag['b']} | {best} "
                         f"| {g['diff']:+.3f} | [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] "
                         f"| {g['mcnemar_p']:.3g} | {g['n']} |")
    return "\n".join(lines) + "\n"


def print_comparison(c: dict) -> None:
    for title, key in (("generation", "groups"), ("likelihood probe", "likelihood_groups")):
        if not c.get(key):
            continue
        table = Table(title=f"paired comparison ({title}): {c['other']} − {c['base']} "
                            f"({c['n_common_items']} common items)")
        for col in ("group", "base", "other", "best trivial", "Δ", "95% CI of Δ", "McNemar p", "n"):
            table.add_column(col, justify="left" if col == "group" else "right")
        for name, g in c[key].items():
            flag = {side: " [red]✗[/]" if g.get(f"{side}_beats_trivial") is False else ""
                    for side in ("a", "b")}
            best = f"{g['best_trivial']['accuracy']:.3f}" if "best_trivial" in g else ""
            table.add_row(("  " if "/" in name else "[bold]") + name, f"{g['acc_a']:.3f}{flag['a']}",
                          f"{g['acc_b']:.3f}{flag['b']}", best, f"{g['diff']:+.3f}",
                          f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]", f"{g['mcnemar_p']:.3g}", str(g["n"]))
        print_table(table)


def compare(base: str, other: str, out: str | None = None) -> int:
    """Compare two evaluate runs on the same items: accuracy difference with a paired bootstrap
    95% interval and an exact McNemar p-value, per task and subtask.

    Args:
        base: The reference evaluate output directory (e.g. the base model).
        other: The evaluate output directory to compare against it (e.g. the fine-tuned model).
        out: Write the comparison as JSON to this file.
    """
    if out:
        check_output_file(Path(out))
    c = compare_predictions(read_predictions(Path(base)), read_predictions(Path(other)), base, other)
    print_comparison(c)
    if out:
        with atomic_file(Path(out)) as f:
            json.dump(c, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return 0


def predictions_file(d: Path) -> Path:
    """``d/predictions.jsonl``, else a compressed ``predictions.jsonl.xz`` or ``.gz`` beside it (a
    committed study keeps its predictions compressed); the plain name when there is none."""
    plain = d / "predictions.jsonl"
    for f in (plain, d / "predictions.jsonl.xz", d / "predictions.jsonl.gz"):
        if f.is_file():
            return f
    return plain


def read_predictions(d: Path) -> list[dict]:
    """Rows of ``d/predictions.jsonl`` (or compressed: :func:`predictions_file`), checked the
    way :func:`compare_predictions` and ``analyze`` use them; a missing file or a bad line is a
    one-line user error naming ``file:line``.

    Each row is an object with text ``file``, a text or integer ``id``, ``task`` position or count,
    ``subtask`` text or null, ``correct`` true or false (null in a ``--scoring likelihood`` run,
    whose rows carry ``likelihood_correct`` true or false), an optional ``sample`` (integer ≥ 0), and
    the breakdown fields ``evaluate`` copies from the question (``word`` … ``n_tokens``), if any,
    of the types a question file allows. One (file name, id, sample) appears once, and an item
    keeps one task.
    """
    if not d.is_dir():
        raise SpellxferError(f"{d}: no such directory (expected an evaluate output directory)")
    f = predictions_file(d)
    if not f.is_file():
        raise SpellxferError(f"{d}: no predictions.jsonl (expected an evaluate output directory)")
    rows, seen, tasks = [], {}, {}
    for line, row in iter_jsonl(f):
        where = f"{f}:{line}"
        if not isinstance(row, dict):
            raise SpellxferError(f"{where}: expected a JSON object per line (an evaluate prediction row)")
        for key, ok, expected in _PREDICTION_FIELDS:
            if key not in row:
                fields = ", ".join(k for k, _, _ in _PREDICTION_FIELDS)
                raise SpellxferError(f"{where}: no field {key!r} (an evaluate prediction row has {fields})")
            if not ok(row[key]):
                raise SpellxferError(f"{where}: {key} {snippet(row[key])} is not {expected}")
        if "likelihood_correct" in row and not isinstance(row["likelihood_correct"], bool):
            raise SpellxferError(f"{where}: likelihood_correct {snippet(row['likelihood_correct'])} "
                                 "is not true or false")
        if row["correct"] is None and "likelihood_correct" not in row:
            raise SpellxferError(f"{where}: correct null is not true or false "
                                 "(null only beside a likelihood_correct)")
        sample = row.get("sample", 0)
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            raise SpellxferError(f"{where}: sample {snippet(sample)} is not an integer ≥ 0")
        check_breakdown_fields(str(f), line, row)
        item = (Path(row["file"]).name, row["id"])
        if (*item, sample) in seen:
            raise SpellxferError(f"{where}: duplicate prediction for id {row['id']!r} of {item[0]}, "
                                 f"sample {sample} (first on line {seen[(*item, sample)]})")
        seen[(*item, sample)] = line
        if tasks.setdefault(item, row["task"]) != row["task"]:
            raise SpellxferError(f"{where}: id {row['id']!r} of {item[0]} is a {row['task']} item here and a "
                                 f"{tasks[item]} item on an earlier line")
        rows.append(row)
    if not rows:
        raise SpellxferError(f"{f}: empty (no prediction rows)")
    return rows


_PREDICTION_FIELDS = (
    ("file", lambda v: isinstance(v, str) and v != "", "a file name"),
    ("id", lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
     "text or an integer"),
    ("task", lambda v: v in TASKS, f"{' or '.join(TASKS)}"),
    ("subtask", lambda v: v is None or isinstance(v, str), "text or null"),
    ("correct", lambda v: v is None or isinstance(v, bool), "true or false"),
)
