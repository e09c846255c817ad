"""`analyze` on the pre-registered study in miniature: training-pattern slopes, the control arm,
and the decision per subtask (docs/results.md, "Pre-registration: the transfer study").

tests/synthetic_sweep.make_study_sweep: 20 spelling configurations × 3 seeds over lora_r,
learning_rate and the three training patterns, and a control arm of 3 of them. Planted:
variants=all raises nth_letter, each doubling of distinct_words (null: every word) raises
letter_count, nothing else moves; the validation-selected configuration transfers on nth_letter,
spells its word_length replies out, and its control rises on letter_count as much as it does.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from synthetic_sweep import ALL_WORDS, VARIANTS_ALL_EFFECT, WORDS_SLOPE, make_study_sweep

from spellxfer.cli import main


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    planted = make_study_sweep(root)
    out = root / "analysis"
    assert (
        main(
            [
                "analyze",
                "--runs",
                str(planted["study"]),
                "--control_runs",
                str(planted["control"]),
                "--decoding",
                "greedy",
                "--out",
                str(out),
                "--n_boot",
                "500",
            ]
        )
        == 0
    )
    return planted | {"out": out, "root": root, "info": json.loads((out / "analysis.json").read_text())}


def _slopes(study, metric: str) -> pd.DataFrame:
    hp = pd.read_csv(study["out"] / "hyperparameter_effects.csv")
    imp = hp[(hp["kind"] == "importance") & (hp["scoring"] == "generation") & (hp["metric"] == metric)]
    return imp.set_index("hyperparameter")


def test_a_planted_pattern_effect_is_recovered_and_null_dummies_cover_zero(study):
    slopes = _slopes(study, "position/nth_letter_accuracy")
    # treatment-coded against spell and any: one row per non-reference level, named with its reference
    assert {"variants=all", "variants=spell+reversed", "variants=spell+numbered", "variants=spell+inverse",
            "separator=spaces", "separator=commas", "separator=dashes", "distinct_words"} <= set(slopes.index)
    assert "variants=spell" not in slopes.index and "separator=any" not in slopes.index
    assert slopes.loc["variants=all", "reference"] == "variants=spell"
    assert slopes.loc["separator=dashes", "reference"] == "separator=any"
    hit = slopes.loc["variants=all"]
    assert hit["scale"] == "indicator" and hit["slope_ci_low"] <= VARIANTS_ALL_EFFECT <= hit["slope_ci_high"]
    assert hit["slope_ci_low"] > 0 and hit["p_adj"] <= 0.05
    for null in ("variants=spell+reversed", "separator=spaces", "separator=commas"):
        assert slopes.loc[null, "slope_ci_low"] <= 0 <= slopes.loc[null, "slope_ci_high"], null


def test_distinct_words_is_a_log2_slope_with_null_meaning_every_word(study):
    row = _slopes(study, "count/letter_count_accuracy").loc["distinct_words"]
    assert row["scale"] == "log2" and row["slope_ci_low"] <= WORDS_SLOPE <= row["slope_ci_high"]
    from spellxfer.analysis.effects import ALL_WORDS as DEFAULT

    assert DEFAULT == ALL_WORDS
    marginal = pd.read_csv(study["out"] / "hyperparameter_effects.csv").query(
        "kind == 'marginal_mean' and hyperparameter == 'distinct_words'")
    assert str(ALL_WORDS) in set(marginal["value"].astype(str))  # null is counted, as every word


def test_holm_runs_over_the_slopes_of_one_endpoint_and_scoring(study):
    from spellxfer.evaluation.stats import holm

    hp = pd.read_csv(study["out"] / "hyperparameter_effects.csv")
    tested = hp[(hp["kind"] == "importance") & hp["p_adj"].notna()]
    for (scoring, metric), g in tested.groupby(["scoring", "metric"]):
        assert set(g["family"]) == {f"{scoring}/slopes/{metric}"}
        assert g["p_adj"].to_numpy() == pytest.approx(holm(g["p_value"].tolist()), abs=1e-5)
    families = {f["name"]: f for f in study["info"]["families"]}
    assert families["greedy/generation/slopes/position/nth_letter_accuracy"]["n_tests"] == 10


def test_control_runs_are_labelled_and_never_selected(study):
    runs = pd.read_csv(study["out"] / "runs.csv")
    control = runs[runs["arm"] == "control"]
    assert len(control) == 9 * 2 and control["run"].str.startswith("control/").all()  # 9 runs × 2 scorings
    per_run = pd.read_csv(study["out"] / "per_run_deltas.csv")
    assert set(per_run["arm"]) == {"spelling", "control"}
    sel = study["info"]["selected_by_validation"]
    assert sel["config_id"] == study["selected"]["config_id"] and all(
        not r.startswith("control/") for r in sel["runs"]
    )
    for table in ("top_transfer_configs", "config_effects"):
        assert (
            not pd.read_csv(study["out"] / f"{table}.csv")["run"].astype(str).str.startswith("control").any()
        )
    assert (
        study["info"]["control"]["n_runs"] == 9
        and study["info"]["control"]["matched_by"] == "configuration parameters"
    )


def test_the_selected_configuration_is_compared_with_base_and_its_matched_control(study):
    c = pd.read_csv(study["out"] / "arm_contrasts.csv")
    assert set(c["contrast"]) == {"fine-tuned − base", "fine-tuned − control", "control − base"}
    matched = study["info"]["control"]["matched_runs"]
    assert len(matched) == 3 and set(c["control_runs"].dropna()) == {" ".join(matched)}
    gen = c[c["scoring"] == "generation"].set_index(["contrast", "metric"])
    # the matched control stays at the base on nth_letter (the other control configurations rise there)
    nth = gen.loc[("fine-tuned − control", "position/nth_letter_accuracy")]
    assert nth["delta_adj_ci_low"] > 0 and nth["delta_ci_low"] <= VARIANTS_ALL_EFFECT <= nth["delta_ci_high"]
    # the control rises on letter_count like the selected configuration: fine-tuning, not spelling
    rise = gen.loc[("control − base", "count/letter_count_accuracy")]
    assert rise["delta"] > 0 and rise["arm"] == "control" and rise["reference"] == "base"
    # adjusted (simultaneous) intervals contain the 95% ones; Holm within each family
    assert (
        (c["delta_adj_ci_low"] <= c["delta_ci_low"] + 1e-9)
        & (c["delta_adj_ci_high"] >= c["delta_ci_high"] - 1e-9)
    ).all()
    families = {f["name"]: f for f in study["info"]["families"]}
    assert families["greedy/generation/primary/validation-selected vs base and control"]["n_tests"] == 8
    assert families["greedy/likelihood/primary/control vs base"]["n_tests"] == 4


def test_the_pre_registered_decision_per_subtask(study):
    decided = {d["subtask"]: d for d in study["info"]["decisions"]}
    assert decided["nth_letter"]["decision"] == "transfer"
    assert decided["word_length"]["decision"] == "format interference"
    assert decided["word_length"]["evidence"]["format"]["replies_turned_spelled"] is True
    assert decided["letter_count"]["decision"] == "no effect"  # above the base maybe, never above its control
    assert decided["letter_count"]["evidence"]["generation"]["above_control"] is False
    assert decided["letter_index"]["decision"] == "no effect"


def test_missing_control_or_probe_leaves_the_decision_undetermined(study):
    from spellxfer.analysis import arms
    from spellxfer.analysis.runs import discover

    found = discover([str(study["study"])], None, None, "results", "greedy")
    sel = study["selected"]["config_id"]
    table, _ = arms.arm_contrasts(
        sel, found.runs, [], {"spelling": ["generation"], "control": []}, "greedy", 200, 0
    )
    assert set(table["contrast"]) == {"fine-tuned − base"}
    decided = {
        d["subtask"]: d["decision"] for d in arms.decisions(table, sel, found.runs, [], ["generation"])
    }
    assert (
        decided["nth_letter"]
        == "undetermined: no control runs (--control_runs); no likelihood probe verdicts"
    )
    # spelled-out replies alone do not settle it: without the probe, transfer (checked first) is still open
    assert all(d.startswith("undetermined: ") for d in decided.values())


def test_a_control_run_among_the_spelling_runs_is_found_by_its_fit_config(study):
    from spellxfer.analysis.runs import discover

    found = discover([str(study["study"]), str(study["control"])], None, None, "results", "greedy")
    assert len(found.control) == 9 and all(
        r.arm == "control" and r.name.startswith("control/") for r in found.control
    )
    assert len(found.runs) == 60 and all(r.arm == "spelling" for r in found.runs)


def test_the_report_shows_pattern_slopes_and_the_decision_table(study):
    reports = study["root"] / "reports"
    assert main(["report", "--analysis", str(study["out"]), "--out", str(reports), "--figures_out",
                 str(study["root"] / "figures")]) == 0
    page = next(reports.glob("transfer_report_*.html")).read_text(encoding="utf-8")
    text = " ".join(__import__("re").sub(r"<[^>]+>", " ", page).split())
    assert "Decision per subtask (pre-registered rule)" in text
    assert "nth letter transfer" in text.replace("nth_letter", "nth letter")
    assert "Training-pattern effects" in text and "variants=all" in text and "vs variants=spell" in text
    assert "fine-tuned − control" in text
