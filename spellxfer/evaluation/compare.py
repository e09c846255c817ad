"""Paired comparison of two evaluation runs on the same items (base vs fine-tuned).

Per task and subtask: the accuracy difference (other − base) with a paired bootstrap 95%
interval over items, and an exact McNemar p-value on the discordant items. Items are matched by
(question file name, id); only items present in both runs are compared, and the count is reported.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from spellxfer.errors import SpellxferError
from spellxfer.evaluation.stats import paired_comparison
from spellxfer.outputs import iter_jsonl, write_json

TASKS = ("position", "count")


def compare_predictions(base: list[dict], other: list[dict], base_name: str = "base", other_name: str = "other") -> dict:
    """Paired differences between two predictions.jsonl row lists."""

    def per_item(rows: list[dict]) -> dict[tuple[str, str], dict]:
        acc: dict[tuple[str, str], dict] = {}
        for r in rows:
            key = (Path(r["file"]).name, r["id"])
            e = acc.setdefault(key, {"task": r["task"], "subtask": r.get("subtask"), "scores": []})
            e["scores"].append(1.0 if r["correct"] else 0.0)
        return acc

    a, b = per_item(base), per_item(other)
    common = sorted(set(a) & set(b))
    if not common:
        raise SpellxferError(f"runs {base_name} and {other_name} share no items (matched by file name and id)")
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
    for name in sorted(groups, key=lambda g: (g.split("/")[0] not in TASKS, TASKS.index(g.split("/")[0]), g)):
        keys = groups[name]
        mean = lambda e: sum(e["scores"]) / len(e["scores"])  # noqa: E731
        out["groups"][name] = paired_comparison([mean(a[k]) for k in keys], [mean(b[k]) for k in keys])
    return out


def comparison_markdown(c: dict) -> str:
    """The comparison as a short Markdown report (what `make demo` leaves beside its numbers)."""
    lines = [
        f"# {c['other']} vs {c['base']}",
        "",
        "Trained on spelling only; evaluated on position and count only. "
        f"{c['n_common_items']} items in both runs; {c['method']}.",
        "",
        "| group | base | other | Δ (other − base) | 95% CI of Δ | McNemar p | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in c["groups"].items():
        lines.append(f"| {name} | {g['acc_a']:.3f} | {g['acc_b']:.3f} | {g['diff']:+.3f} | "
                     f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] | {g['mcnemar_p']:.3g} | {g['n']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def print_comparison(c: dict) -> None:
    table = Table(title=f"paired comparison: {c['other']} − {c['base']} ({c['n_common_items']} common items)")
    for col in ("group", "base", "other", "Δ", "95% CI of Δ", "McNemar p", "n"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for name, g in c["groups"].items():
        table.add_row(("  " if "/" in name else "[bold]") + name, f"{g['acc_a']:.3f}", f"{g['acc_b']:.3f}",
                      f"{g['diff']:+.3f}", f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]", f"{g['mcnemar_p']:.3g}",
                      str(g["n"]))  # fmt: skip
    Console().print(table)


def compare(base: str, other: str, out: str | None = None) -> int:
    """Compare two evaluate runs on the same items: accuracy difference with a paired bootstrap
    95% interval and an exact McNemar p-value, per task and subtask.

    Args:
        base: The reference evaluate output directory (e.g. the base model).
        other: The evaluate output directory to compare against it (e.g. the fine-tuned model).
        out: Write the comparison as JSON to this file.
    """
    c = compare_predictions(read_predictions(Path(base)), read_predictions(Path(other)), base, other)
    print_comparison(c)
    if out:
        write_json(Path(out), c)
    return 0


def read_predictions(d: Path) -> list[dict]:
    """Rows of ``d/predictions.jsonl``; a missing file or bad line is a one-line user error."""
    f = d / "predictions.jsonl"
    if not f.is_file():
        raise SpellxferError(f"{d}: no predictions.jsonl (expected an evaluate output directory)")
    return [row for _, row in iter_jsonl(f)]
