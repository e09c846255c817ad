"""`report`: one self-contained HTML page from an analysis, opened in real headless Chromium.

Chromium comes from Debian's `chromium` package, installed by .ci/chromium.sh when missing (never a
browser a tool downloads itself). Every page is also checked without a browser: it parses, every
figure is an embedded PNG that decodes, and nothing is loaded from outside the file.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

from spellxfer.cli import main

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Appended to a copy of the report (the report itself has no script): after load, record every
# image's decoded size on <body>, where --dump-dom shows it.
PROBE = (
    "<script>window.addEventListener('load', () => document.body.setAttribute('data-images', JSON.stringify("
    "[...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, "
    "complete: i.complete})))));"
    "</script>"
)


@pytest.fixture(scope="module")
def report_page(transfer_analysis, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("deployment")
    rc = main(["report", "--analysis", str(transfer_analysis), "--out", str(root / "reports"),
               "--figures_out", str(root / "figures")])
    assert rc == 0
    return {"html": root / "reports" / "transfer_report_syn.html", "figures": root / "figures" / "syn",
            "info": json.loads((transfer_analysis / "analysis.json").read_text())}


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Headless Chromium, installed by .ci/chromium.sh if missing (needs root and Debian's archive)."""
    run = subprocess.run(
        ["bash", str(REPO / ".ci" / "chromium.sh")], capture_output=True, text=True, timeout=900
    )
    if run.returncode != 0 or not CHROMIUM.exists():
        pytest.skip(
            f"Chromium unavailable (.ci/chromium.sh: {run.stderr.strip()[-300:]}); the HTML and images are "
            "still validated by test_report_is_self_contained_and_every_image_decodes"
        )
    return CHROMIUM


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external, self.scripts, self.tags = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(a)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith(("data:", "#")):
                self.external.append(a[key])


def test_report_is_self_contained_and_every_image_decodes(report_page):
    from PIL import Image

    page = _Page()
    page.feed(report_page["html"].read_text(encoding="utf-8"))
    assert page.external == [] and page.scripts == 0
    figures = report_page["info"]["figures"]
    assert [img["alt"] for img in page.images] == [f["title"] for f in figures] and len(figures) == 13
    for img, fig in zip(page.images, figures):
        head, _, data = img["src"].partition(",")
        assert head == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
        with Image.open(io.BytesIO(png)) as im:
            assert im.width > 100 and im.height > 100
        # the copy under figures/ is the same image
        assert (report_page["figures"] / Path(fig["file"]).name).read_bytes() == png
    assert os.stat(report_page["html"]).st_mode & 0o044 == 0o044  # readable when served


def test_every_figure_renders_in_headless_chromium(report_page, chromium, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(
        report_page["html"].read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
        encoding="utf-8",
    )
    run = subprocess.run(
        [
            str(chromium),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r'data-images="([^"]*)"', run.stdout)
    assert m, f"no probe result in Chromium's DOM dump (rc {run.returncode}): {run.stderr[-500:]}"
    images = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert [i["alt"] for i in images] == [f["title"] for f in report_page["info"]["figures"]]
    for i in images:
        assert i["complete"] and i["w"] > 100 and i["h"] > 100, i
    # and the page renders to a real screenshot
    shot = tmp_path / "page.png"
    subprocess.run(
        [
            str(chromium),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            report_page["html"].as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_states_what_transferred_with_the_numbers(report_page, transfer_analysis):
    text = re.sub(r"<[^>]+>", " ", report_page["html"].read_text(encoding="utf-8"))
    text = " ".join(text.split())
    d = pd.read_csv(transfer_analysis / "per_run_deltas.csv")
    for task in ("position", "count"):
        t = d[d["metric"] == f"{task}_accuracy"]
        best = t.loc[t["delta"].idxmax()]
        sig = int((t["significant"] & (t["delta"] > 0)).sum())
        assert (f"{task.capitalize()} accuracy rose in {int((t['delta'] > 0).sum())} of 24 runs "
                f"({sig} significantly after Holm adjustment") in text
        assert (
            f"the best run ({best['run']}) changed it by {best['delta']:+.3f} [{best['delta_ci_low']:+.3f}, "
            in text
        )
    assert "Transferred: position" in text  # the planted gain: significant ups, no more significant downs
    assert "position accuracy: the most important hyperparameter is lora_r" in text
    assert "Across runs, position and count accuracy move together: Pearson r = " in text
    assert "not analysed: 1 failed, 1 pruned" in text
    assert "Trained on spelling, evaluated on position and count only." in text


@pytest.mark.parametrize(
    "outcomes, verdict",
    [
        (
            [(+0.02, True), (-0.03, True), (-0.04, True), (+0.001, False)],
            "Mostly hurt: position (1 of 4 runs significantly better, 2 significantly worse). "
            "Did not transfer (no run significantly better than base): count.",
        ),
        (
            [(+0.02, True), (-0.03, True), (+0.01, False), (+0.001, False)],
            "Transferred: position. Did not transfer (no run significantly better than base): count.",
        ),
        (
            [(-0.02, True), (-0.03, False), (+0.01, False), (+0.001, False)],
            "Nothing transferred significantly. "
            "Did not transfer (no run significantly better than base): position and count.",
        ),
    ],
    ids=["mostly-hurt", "transferred", "nothing"],
)
def test_significant_gains_in_a_few_runs_among_more_significant_losses_are_not_called_transfer(
    outcomes, verdict
):
    from spellxfer.analysis.report import verdict_lines

    rows = []
    for i, (delta, significant) in enumerate(outcomes):
        for task, d, sig in (("position", delta, significant), ("count", -abs(delta), False)):
            rows.append(
                {
                    "run": f"trial-{i:04d}",
                    "metric": f"{task}_accuracy",
                    "delta": d,
                    "delta_ci_low": d - 0.01,
                    "delta_ci_high": d + 0.01,
                    "base_accuracy": 0.1,
                    "tuned_accuracy": 0.1 + d,
                    "p_adj": 0.01 if sig else 0.9,
                    "significant": sig,
                }
            )
    lines = verdict_lines(pd.DataFrame(rows), len(outcomes))
    assert len(lines) == 3 and lines[-1] == verdict
    assert lines[0].startswith(f"Position accuracy rose in {sum(d > 0 for d, _ in outcomes)} of 4 runs")


def test_missing_analysis_is_one_error_line(tmp_path, capsys):
    assert main(["report", "--analysis", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "no analysis.json" in capsys.readouterr().err


def test_wandb_logging_is_offline_by_default(report_page, transfer_analysis, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no credentials → offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["report", "--analysis", str(transfer_analysis), "--out", str(tmp_path / "r"),
                 "--figures_out", str(tmp_path / "f"), "--wandb", "true"]) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    media = runs[0] / "files" / "media"
    assert len(list((media / "images").rglob("*.png"))) == len(report_page["info"]["figures"])
    assert len(list((media / "table").rglob("*.json"))) == 8  # the eight CSV tables, whitelisted columns only
