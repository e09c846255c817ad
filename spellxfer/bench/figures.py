"""Load-test figures (matplotlib, Agg: no display needed) and a self-contained HTML summary.

- ``plot_run``: one run — latency over time (each request a dot, errors in red), the latency
  distribution with p50 / p95 / p99 marked, and completed requests per second;
- ``plot_summary``: every run in ``bench_summary.csv`` — throughput and p95 latency against
  concurrency, one line per route;
- ``write_html``: the run's table and its figure embedded as base64, one file to attach anywhere.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from spellxfer.core.outputs import atomic_file  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_run(samples, summary: dict, path: Path) -> Path:
    """Three panels for one load-test run."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    ok = [s for s in samples if 200 <= s.status < 400]
    bad = [s for s in samples if not 200 <= s.status < 400]
    a.scatter([s.start_s for s in ok], [s.latency_ms for s in ok], s=4, alpha=0.5, label="2xx")
    if bad:
        a.scatter([s.start_s for s in bad], [s.latency_ms for s in bad], s=8, c="red", label="error")
    a.set(xlabel="request start (s)", ylabel="latency (ms)", title="latency over time")
    a.legend(loc="upper right")
    if ok:
        b.hist([s.latency_ms for s in ok], bins=40)
        for q, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            b.axvline(summary[q], color="k", linestyle=style, label=f"{q[:3]} {summary[q]:.0f} ms")
        b.legend()
    b.set(xlabel="latency (ms)", ylabel="requests", title="latency distribution (2xx)")
    seconds = max(1, int(summary["seconds"]) + 1)
    per_second = [0] * seconds
    for s in ok:
        per_second[min(seconds - 1, int(s.start_s + s.latency_ms / 1e3))] += 1
    c.bar(range(seconds), per_second, width=1.0)
    c.set(
        xlabel="time (s)", ylabel="replies / s", title=f"throughput (mean {summary['throughput_rps']} req/s)"
    )
    fig.suptitle(f"{summary['route']} · concurrency {summary['concurrency']} · {summary['url']}")
    return _save(fig, path)


def plot_summary(rows: list[dict], path: Path) -> Path:
    """Throughput and p95 latency against concurrency over all recorded runs."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for route in sorted({r["route"] for r in rows}):
        pts = sorted(
            (int(r["concurrency"]), float(r["throughput_rps"] or 0), float(r["p95_ms"] or "nan"))
            for r in rows
            if r["route"] == route
        )
        a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=route)
        b.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=route)
    a.set(xlabel="concurrency", ylabel="req/s", title="throughput", xscale="log", xlim=(0.8, None))
    b.set(xlabel="concurrency", ylabel="ms", title="p95 latency", xscale="log", xlim=(0.8, None))
    a.legend()
    b.legend()
    return _save(fig, path)


def write_html(summary: dict, png: Path, path: Path) -> Path:
    """A single HTML file: the summary table and the run's figure, no external references."""
    image = base64.b64encode(png.read_bytes()).decode()
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items()
    )
    title = f"spellxfer load test {html.escape(summary['label'])}"
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>\n'
        f"<style>{style}</style>\n"
        "</head><body><h1>spellxfer load test</h1>\n"
        "<p>Serving metrics only (throughput, latency, errors); model quality is measured offline on "
        "position and count questions.</p>\n"
        f'<table>{rows}</table><p><img alt="load test figure" src="data:image/png;base64,{image}" '
        'style="max-width:100%"></p>\n'
        "</body></html>\n"
    )
    with atomic_file(path) as f:
        f.write(page)
    return path
