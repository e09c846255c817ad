"""`analyze` on a synthetic sweep with several seeds per configuration and probe fields.

tests/synthetic_sweep.make_replicate_sweep: 8 configurations × 3 seeds; every subtask's true
accuracy is the base's plus a planted configuration effect (+0.04 per doubling of lora_r), each
seed adds training noise, and every word has one question of each subtask. The analysis must
aggregate over seeds, test each configuration across its seeds and recover the planted effects
inside their intervals, declare its multiple-comparison families, and read the probe contract's
fields (likelihood verdicts, trivial baselines, constant-answer flags) when metrics.json has them.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from synthetic_sweep import make_replicate_sweep

from spellxfer.cli import main


@pytest.fixture(scope="module")
def rep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rep")
    study = root / "sweeps" / "rep"
    planted = make_replicate_sweep(study, probe=True, constant_config=0)
    out = root / "analysis"
    assert (
        main(["analyze", "--runs", str(study), "--decoding", "greedy", "--out", str(out), "--n_boot", "500"])
        == 0
    )
    return {"planted": planted, "out": out, "study": study, "root": root}


def _csv(rep, name) -> pd.DataFrame:
    return pd.read_csv(rep["out"] / f"{name}.csv")


def test_seeds_of_a_configuration_are_aggregated_and_tested_across_seeds(rep):
    eff = _csv(rep, "config_effects")
    gen = eff[eff["scoring"] == "generation"]
    assert set(gen["n_seeds"]) == {3} and gen["config_id"].nunique() == 8
    runs = _csv(rep, "runs").query("scoring == 'generation'")
    for cfg in rep["planted"]["configs"]:
        mine = runs[runs["config_id"] == cfg["config_id"]]
        assert sorted(mine["replicate"]) == [0, 1, 2]
        row = gen[
            (gen["config_id"] == cfg["config_id"]) & (gen["metric"] == "position/nth_letter_accuracy")
        ].iloc[0]
        assert row["delta"] == pytest.approx(mine["position/nth_letter_accuracy_delta"].mean(), abs=1e-6)
        assert row["delta_seed_sd"] == pytest.approx(
            mine["position/nth_letter_accuracy_delta"].std(ddof=1), abs=1e-6
        )
        assert row["test"] == "one-sample t-test across 3 seeds"


def test_the_planted_configuration_effects_lie_inside_their_intervals(rep):
    eff = _csv(rep, "config_effects").query("scoring == 'generation'")
    covered = total = 0
    for cfg in rep["planted"]["configs"]:
        for metric, truth in cfg["truth"].items():
            row = eff[(eff["config_id"] == cfg["config_id"]) & (eff["metric"] == f"{metric}_accuracy")].iloc[
                0
            ]
            # true accuracy − the base's observed one on the same items
            planted = truth - row["base_accuracy"]
            covered += row["delta_ci_low"] <= planted <= row["delta_ci_high"]
            total += 1
    assert covered >= 0.85 * total, f"{covered} of {total} intervals cover the planted effect"
    # the strongest configurations (lora_r 32, +0.12) move clearly; the lora_r 4 ones (no effect) do not
    strong = eff[
        eff["config_id"].isin(
            [c["config_id"] for c in rep["planted"]["configs"] if c["params"]["lora_r"] == 32]
        )
    ]
    assert (strong.query("endpoint == 'secondary'")["delta_ci_low"] > 0).all()
    null = eff[
        eff["config_id"].isin(
            [c["config_id"] for c in rep["planted"]["configs"] if c["params"]["lora_r"] == 4]
        )
    ]
    null = null[null["metric"] != "position/letter_index_accuracy"]  # config 0 answers "1" there
    assert ((null["delta_ci_low"] <= 0) & (0 <= null["delta_ci_high"])).mean() >= 0.8


def test_the_lora_r_slope_across_configurations_is_recovered_with_hc3_and_holm(rep):
    hp = _csv(rep, "hyperparameter_effects")
    imp = hp[(hp["kind"] == "importance") & (hp["scoring"] == "generation")].set_index("metric")
    row = imp[imp["hyperparameter"] == "lora_r"].loc["count/word_length_accuracy"]
    assert row["slope_ci_low"] <= 0.04 <= row["slope_ci_high"] and row["slope_ci_low"] > 0
    assert row["n_configs"] == 8 and row["n_runs"] == 24 and "HC3" in row["method"]
    tested = hp[(hp["kind"] == "importance") & hp["p_adj"].notna()]
    assert (tested["p_adj"] >= tested["p_value"] - 1e-12).all()
    # one Holm family per endpoint and scoring (the pre-registered family), not one per scoring
    assert set(tested["family"]) == {f"{s}/slopes/{m}" for s in ("generation", "likelihood")
                                     for m in set(tested["metric"])}
    for _, g in tested.groupby("family"):
        from spellxfer.evaluation.stats import holm

        assert g["p_adj"].to_numpy() == pytest.approx(holm(g["p_value"].tolist()), abs=1e-5)


def test_families_and_endpoints_are_declared_in_analysis_json(rep):
    info = json.loads((rep["out"] / "analysis.json").read_text())
    assert info["endpoints"]["primary"] == ["count/letter_count_accuracy", "count/word_length_accuracy",
                                            "position/letter_index_accuracy", "position/nth_letter_accuracy"]
    assert info["endpoints"]["secondary"] == ["position_accuracy", "count_accuracy"]
    names = {f["name"]: f for f in info["families"]}
    for scoring in ("generation", "likelihood"):
        assert names[f"greedy/{scoring}/primary"]["n_tests"] == 8 * 4
        assert names[f"greedy/{scoring}/secondary"]["n_tests"] == 8 * 2
        assert names[f"greedy/{scoring}/primary/validation-selected"]["n_tests"] == 4
    assert (
        info["n_configs"] == 8
        and info["seeds_per_config"] == [3]
        and info["scorings"] == ["generation", "likelihood"]
    )
    eff = _csv(rep, "config_effects")
    for name, g in eff.groupby("family"):
        from spellxfer.evaluation.stats import holm

        # CSV: 6 digits
        assert g["p_adj"].to_numpy() == pytest.approx(holm(g["p_value"].tolist()), abs=1e-5), name


def test_the_validation_selected_configuration_is_the_best_mean_validation_objective(rep):
    info = json.loads((rep["out"] / "analysis.json").read_text())
    sel = info["selected_by_validation"]
    runs = _csv(rep, "runs").query("scoring == 'generation'")
    means = runs.groupby("config_id")["val/transfer_score"].mean()
    assert sel["config_id"] == int(means.idxmax()) and sel["n_seeds"] == 3
    assert sel["objective_value"] == pytest.approx(means.max())
    primary = [e for e in sel["endpoints"] if e["endpoint"] == "primary" and e["scoring"] == "generation"]
    assert len(primary) == 4 and all(
        e["family"] == "greedy/generation/primary/validation-selected" for e in primary
    )


def test_probe_scoring_baselines_and_constant_answers_come_from_the_new_fields(rep):
    runs = _csv(rep, "runs")
    assert set(runs["scoring"]) == {"generation", "likelihood"}
    like = runs[runs["scoring"] == "likelihood"]
    gen = runs[runs["scoring"] == "generation"]
    # the synthetic probe is planted 0.1 above generation: its accuracy says so, paired per run
    assert (like["position_accuracy"].to_numpy() > gen["position_accuracy"].to_numpy()).mean() > 0.8
    const = gen[gen["config_id"] == 0]
    assert const["position/letter_index_accuracy_constant_answer"].all()
    assert not const["position/letter_index_accuracy_beats_trivial"].any()
    assert not gen[gen["config_id"] != 0]["position/letter_index_accuracy_constant_answer"].any()
    assert gen["count/letter_count_accuracy_best_trivial"].notna().all()
    assert gen["count/word_length_accuracy_no_answer_rate"].between(0, 1).all()
    info = json.loads((rep["out"] / "analysis.json").read_text())
    assert info["base"]["position/letter_index_accuracy"]["best_trivial"]["name"] in (
        "always_1",
        "majority",
        "best_constant",
    )


def test_word_clusters_make_the_task_interval_no_narrower_than_items_alone(rep):
    """Every word has a question of each subtask: resampling words is the honest bootstrap."""
    from spellxfer.evaluation.compare import read_predictions
    from spellxfer.evaluation.stats import accuracy_summary

    rows = [
        r for r in read_predictions(rep["study"] / "trial-0005" / "eval" / "greedy") if r["task"] == "count"
    ]
    words = [r["word"] for r in rows]
    clustered = accuracy_summary([[r["correct"]] for r in rows], n_boot=500, clusters=words)
    run = _csv(rep, "runs").query("scoring == 'generation' and trial == 5").iloc[0]
    assert (run["count_accuracy_ci_low"], run["count_accuracy_ci_high"]) == pytest.approx(
        (clustered["ci_low"], clustered["ci_high"]), abs=1e-6)
    assert clustered["ci_method"] == "cluster_bootstrap"


def test_the_report_shows_baselines_flags_configurations_and_never_calls_a_loss_a_gain(rep):
    reports = rep["root"] / "reports"
    assert main(["report", "--analysis", str(rep["out"]), "--out", str(reports), "--figures_out",
                 str(rep["root"] / "figures")]) == 0
    page = (reports / "transfer_report_rep.html").read_text(encoding="utf-8")
    text = " ".join(__import__("re").sub(r"<[^>]+>", " ", page).split())
    assert "best trivial baseline" in text.lower()
    assert "constant answer" in text.lower()
    assert "8 configurations × 3 seeds" in text
    assert "Selected by validation" in text
    for sentence in text.split(". "):
        if "gain" in sentence.lower():
            assert not any(f"{tok}" in sentence for tok in ("gain of -", "gain of −", "gains of -")), sentence
    assert "Likelihood probe" in text
    eff = _csv(rep, "config_effects")
    assert np.isfinite(eff["delta_ci_low"]).all()


def test_token_counts_use_the_evaluated_models_tokenizer(demo_data):
    """Recounted with the Qwen3 tokenizer the counts are the data build's; with SmolLM2's BPE
    some words split differently, and analysis.json says which tokenizer counted."""
    from conftest import read_jsonl

    from spellxfer.analysis.tokens import recount

    rows = read_jsonl(demo_data / "position_test.jsonl") + read_jsonl(demo_data / "count_test.jsonl")
    rows = [
        dict(
            r,
            file=str(demo_data / ("position_test.jsonl" if r["task"] == "position" else "count_test.jsonl")),
        )
        for r in rows
    ]
    qwen, info = recount("tiny-qwen3", rows)
    assert info["agreement_with_file"] == 1.0 and len(qwen) == len(rows)
    assert all(qwen[(r["file"].rsplit("/", 1)[1], r["id"])] == r["n_tokens"] for r in rows)
    smol, info = recount("smollm2-135m", rows)
    assert (
        info["source"] == "recounted with the smollm2-135m tokenizer" and 0 < info["agreement_with_file"] < 1
    )
    assert any(smol[k] != qwen[k] for k in qwen)
    none, info = recount(None, rows)
    assert none == {} and "Qwen3" in info["source"]


def test_an_analysis_written_before_configurations_and_scorings_still_reports(tmp_path):
    """The committed 32-trial study's analysis (no config_effects.csv, no scoring column) is
    still a report: the page can be rebuilt from a clone."""
    from conftest import REPO

    src = REPO / "results" / "smollm2-h100" / "analysis" / "greedy"
    assert not (src / "config_effects.csv").exists()
    assert (
        main(
            [
                "report",
                "--analysis",
                str(src),
                "--out",
                str(tmp_path / "r"),
                "--figures_out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    text = (tmp_path / "r" / "transfer_report_smollm2-h100.html").read_text(encoding="utf-8")
    assert "32 complete run(s) analysed (greedy decoding)." in text and "its own Holm family" not in text


def test_tables_have_readable_headers_and_fixed_decimals():
    from spellxfer.analysis.report import _joined, readable

    assert readable("position/nth_letter_accuracy_delta") == "nth letter Δ"
    assert readable("count_accuracy_p_adj") == "count p (Holm)"
    assert readable("position/letter_index_accuracy_constant_answer") == "letter index constant answer"
    assert (
        readable("params.learning_rate") == "learning rate" and readable("steps_trained") == "steps trained"
    )
    df = pd.DataFrame(
        {
            "run": ["trial-0001"],
            "position_accuracy": [0.123456],
            "position_accuracy_ci_low": [0.1],
            "position_accuracy_ci_high": [0.15],
            "position_accuracy_delta": [-0.0412],
            "position_accuracy_p_adj": [0.000123],
            "steps_trained": [25.0],
            "params.learning_rate": [0.0005],
            "position/letter_index_accuracy_constant_answer": [True],
        }
    )
    row = _joined(df).iloc[0].to_dict()
    assert row == {
        "run": "trial-0001",
        "position_accuracy": "0.123 [0.100, 0.150]",
        "position_accuracy_delta": "-0.041",
        "position_accuracy_p_adj": "0.00012",
        "steps_trained": "25",
        "params.learning_rate": "0.0005",
        "position/letter_index_accuracy_constant_answer": "yes",
    }


def test_a_dominant_bucket_does_not_squash_the_breakdown_figure():
    """One bucket with most items, one tiny bucket with a huge interval: the axis follows the
    estimates, so the others stay readable (the tiny one's bar runs past the edge)."""
    import matplotlib.pyplot as plt

    from spellxfer.analysis.figures import _readable_ylim

    fig, ax = plt.subplots()
    estimates = np.array([0.02, 0.03, 0.05])  # the tiny bucket's interval would be [-0.9, 0.95]
    ax.errorbar([0, 1, 2], estimates, yerr=[[0.01, 0.01, 0.95], [0.01, 0.01, 0.9]])
    _readable_ylim(ax, estimates)
    low, high = ax.get_ylim()
    plt.close(fig)
    assert low <= 0.02 and high >= 0.05 and high - low < 0.3


def test_scoring_both_without_probe_verdicts_is_one_error_line(synthetic_sweep, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["analyze", "--runs", str(synthetic_sweep["study_dir"] / "trial-0001"), "--scoring", "both",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --scoring both: some prediction rows have no likelihood_correct")
        and not out.exists()
    )


def _two_phase_study(root):
    """Four configurations (ids 0, 3, 6, 9) of which only 0 and 3 keep their seeds 1 and 2, as a
    two-phase study leaves them. First seeds: 0 and 3 tie at 0.30 (the lower id wins), 6 at 0.25,
    9 at 0.20; config 3's later seeds score 0.40, config 0's 0.10, so by the mean over seeds
    config 3 (0.367) beats config 0 (0.167) and the single-seed ones."""
    import shutil

    study = root / "sweeps" / "two-phase"
    make_replicate_sweep(study, n_configs=4, seeds=3, n_words=60)
    for number in (7, 8, 10, 11):  # replicates 1, 2 of configurations 6 and 9
        shutil.rmtree(study / f"trial-{number:04d}")
    objectives = {0: 0.30, 1: 0.10, 2: 0.10, 3: 0.30, 4: 0.40, 5: 0.40, 6: 0.25, 9: 0.20}
    for number, value in objectives.items():
        path = study / f"trial-{number:04d}" / "trial.json"
        trial = json.loads(path.read_text())
        path.write_text(json.dumps(trial | {"objective": value}))
    return study


@pytest.mark.parametrize(
    ("flag", "rule", "config_id", "value"),
    [
        (None, "first_seed", 0, 0.30),  # auto: unequal seed counts, so the first seed decides
        ("first_seed", "first_seed", 0, 0.30),
        ("seed_mean", "seed_mean", 3, 0.40 * 2 / 3 + 0.10),
    ],
)
def test_a_two_phase_study_selects_on_the_first_seed_unless_told_to_average_seeds(
    tmp_path, flag, rule, config_id, value
):
    study = _two_phase_study(tmp_path)
    out = tmp_path / "analysis"
    args = ["analyze", "--runs", str(study), "--decoding", "greedy", "--out", str(out), "--n_boot", "200"]
    assert main(args + (["--selection", flag] if flag else [])) == 0
    sel = json.loads((out / "analysis.json").read_text())["selected_by_validation"]
    assert (sel["selection"], sel["config_id"], sel["n_seeds"]) == (rule, config_id, 3)
    assert sel["objective_value"] == pytest.approx(value)
    assert sel["tied_runs"] == (2 if rule == "first_seed" else 1)
    other = {"first_seed": 3, "seed_mean": 0}[rule]  # what the other rule would have chosen
    assert sel["other_selection"]["config_id"] == other
    # the selected configuration's contrasts are its own family, over its three seeds
    tested = [e for e in sel["endpoints"] if e["scoring"] == "generation" and e["endpoint"] == "primary"]
    assert {e["n_seeds"] for e in tested} == {3}


def test_an_unknown_selection_rule_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    study = _two_phase_study(tmp_path)
    out = tmp_path / "analysis"
    code = main(["analyze", "--runs", str(study), "--decoding", "greedy", "--out", str(out),
                 "--selection", "best_test"])
    assert code == 2 and not out.exists()
    assert "selection" in capsys.readouterr().err
