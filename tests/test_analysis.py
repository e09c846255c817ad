"""`analyze` on a synthetic sweep with planted effects: it must recover them inside its intervals.

The sweep (tests/synthetic_sweep.py) is real files in the sweep's layout; position accuracy rises
by SLOPE per doubling of lora_r, and position and count share a latent per-run skill.
"""

from __future__ import annotations

import json
import lzma
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from synthetic_sweep import FORBIDDEN_KEY, SLOPE

from spellxfer.analysis.columns import check_columns
from spellxfer.analysis.runs import read_curve
from spellxfer.cli import main
from spellxfer.core.errors import SpellxferError
from spellxfer.evaluation.stats import holm

TABLES = ("runs", "per_run_deltas", "config_effects", "metric_correlations", "top_transfer_configs",
          "hyperparameter_effects", "breakdowns")


def _csv(out, name) -> pd.DataFrame:
    return pd.read_csv(out / f"{name}.csv")


def test_writes_every_table_and_figure(transfer_analysis):
    for name in TABLES:
        assert len(_csv(transfer_analysis, name)) > 0, name
    info = json.loads((transfer_analysis / "analysis.json").read_text())
    files = {f["file"] for f in info["figures"]}
    hps = {"lora_r", "lora_alpha", "learning_rate", "batch_size", "accumulate_grad_batches", "max_steps"}
    assert files == {
        "figures/subtask_accuracy.png",
        "figures/position_vs_count.png",
        "figures/run_deltas.png",
        "figures/learning_curves.png",
        "figures/steps_trained.png",
        "figures/accuracy_by_token_count.png",
        "figures/change_by_breakdown.png",
        *{f"figures/effect_{h}.png" for h in hps},
    }
    for f in files:
        assert (transfer_analysis / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Holm" in info["methods"]["multiple_comparisons"] and "regression" in info["methods"]["importance"]


def test_only_complete_trials_are_analysed_and_the_rest_are_reported(transfer_analysis, synthetic_sweep):
    info = json.loads((transfer_analysis / "analysis.json").read_text())
    assert info["n_runs"] == len(synthetic_sweep["trials"]) == 24
    assert info["status_counts"] == {"complete": 24, "failed": 1, "pruned": 1}
    assert {(s["trial"], s["status"]) for s in info["skipped"]} == {
        ("trial-0024", "failed"),
        ("trial-0025", "pruned"),
    }
    assert next(s for s in info["skipped"] if s["status"] == "failed")["reason"] == "CUDA out of memory"
    assert set(_csv(transfer_analysis, "runs")["trial"]) == set(range(24))


def test_planted_lora_r_effect_is_recovered_inside_its_intervals(transfer_analysis, synthetic_sweep):
    hp = _csv(transfer_analysis, "hyperparameter_effects")
    means = hp[
        (hp["kind"] == "marginal_mean")
        & (hp["hyperparameter"] == "lora_r")
        & (hp["metric"] == "position_accuracy")
    ]
    assert list(means["value"].astype(int)) == [4, 8, 16, 32]
    assert means["estimate"].is_monotonic_increasing
    for _, row in means.iterrows():
        # the planted accuracy of the runs at this value (their mean true accuracy)
        planted = np.mean(
            [
                t["truth"]["position"]
                for t in synthetic_sweep["trials"]
                if t["params"]["lora_r"] == int(row["value"])
            ]
        )
        assert row["ci_low"] <= planted <= row["ci_high"], row.to_dict()
        assert row["n_runs"] == 6
    imp = hp[(hp["kind"] == "importance") & (hp["metric"] == "position_accuracy")].set_index("hyperparameter")
    assert imp["rank"].idxmin() == "lora_r" and imp.loc["lora_r", "scale"] == "log2"
    r = imp.loc["lora_r"]
    # per doubling of lora_r
    assert r["slope_ci_low"] <= SLOPE <= r["slope_ci_high"] and r["slope_ci_low"] > 0
    # count ignores lora_r: its interval there covers 0
    cnt = hp[
        (hp["kind"] == "importance") & (hp["metric"] == "count_accuracy") & (hp["hyperparameter"] == "lora_r")
    ].iloc[0]
    assert cnt["slope_ci_low"] <= 0 <= cnt["slope_ci_high"]


def test_planted_position_count_correlation_is_recovered(transfer_analysis, synthetic_sweep):
    p = np.array([t["truth"]["position"] for t in synthetic_sweep["trials"]])
    c = np.array([t["truth"]["count"] for t in synthetic_sweep["trials"]])
    planted = float(np.corrcoef(p, c)[0, 1])
    corr = _csv(transfer_analysis, "metric_correlations").set_index(["quantity", "method"])
    assert set(corr.index) == {
        ("accuracy", "pearson"),
        ("accuracy", "spearman"),
        ("delta", "pearson"),
        ("delta", "spearman"),
    }
    for quantity in ("accuracy", "delta"):
        r = corr.loc[(quantity, "pearson")]
        assert r["ci_low"] <= planted <= r["ci_high"] and r["ci_low"] > 0, (planted, r.to_dict())
        assert r["ci_low"] <= r["estimate"] <= r["ci_high"] and r["n_runs"] == 24
    runs = _csv(transfer_analysis, "runs")
    assert corr.loc[("accuracy", "pearson"), "estimate"] == pytest.approx(
        np.corrcoef(runs["position_accuracy"], runs["count_accuracy"])[0, 1], abs=1e-5)


def test_per_run_deltas_cover_the_planted_change_and_are_holm_adjusted(transfer_analysis, synthetic_sweep):
    d = _csv(transfer_analysis, "per_run_deltas")
    runs = _csv(transfer_analysis, "runs").set_index("trial")
    covered = 0
    for t in synthetic_sweep["trials"]:
        row = runs.loc[t["number"]]
        # the planted change: true fine-tuned accuracy − the base's observed accuracy on the same items
        covered += (
            row["position_accuracy_delta_ci_low"]
            <= t["truth"]["position"] - row["position_accuracy_base"]
            <= row["position_accuracy_delta_ci_high"]
        )
        assert row["position_accuracy_delta"] == pytest.approx(
            row["position_accuracy"] - row["position_accuracy_base"], abs=1e-5
        )
    assert covered >= 20  # 95% intervals: ~1 of 24 may miss
    task = d[d["metric"].isin(["position_accuracy", "count_accuracy"])]
    assert len(task) == 48
    assert task["p_adj"].to_numpy() == pytest.approx(holm(task["mcnemar_p"].tolist()), rel=1e-4)
    assert (task["p_adj"] >= task["mcnemar_p"] - 1e-12).all()
    assert set(d["metric"]) >= {"position/nth_letter_accuracy", "count/letter_count_accuracy"}


def test_top_configs_are_ranked_by_transfer_score_with_intervals(transfer_analysis):
    top = _csv(transfer_analysis, "top_transfer_configs")
    runs = _csv(transfer_analysis, "runs")
    assert len(top) == 10 and list(top["rank"]) == list(range(1, 11))
    assert list(top["transfer_score"]) == sorted(runs["transfer_score"], reverse=True)[:10]
    assert (top["transfer_score_ci_low"] <= top["transfer_score"]).all() and (
        top["transfer_score"] <= top["transfer_score_ci_high"]
    ).all()
    assert top["transfer_score"].to_numpy() == pytest.approx(
        ((top["position_accuracy"] + top["count_accuracy"]) / 2).to_numpy(), abs=1e-5
    )
    assert {"params.lora_r", "val/transfer_score"} <= set(top.columns)


def test_the_run_selected_by_validation_is_the_best_val_objective_with_its_test_numbers(transfer_analysis):
    """The top of top_transfer_configs is picked on the test set; the validation pick is the honest one."""
    info = json.loads((transfer_analysis / "analysis.json").read_text())
    sel, runs = info["selected_by_validation"], _csv(transfer_analysis, "runs")
    best = runs.sort_values(["val/transfer_score", "trial"], ascending=[False, True]).iloc[0]
    assert sel["run"] == best["run"] and sel["objective"] == "val/transfer_score"
    assert sel["objective_value"] == pytest.approx(best["val/transfer_score"])
    assert sel["transfer_score"] == pytest.approx(best["transfer_score"])
    assert sel["count_accuracy_delta"] == pytest.approx(best["count_accuracy_delta"])
    assert sel["test_rank"] == 1 + int((runs["transfer_score"] > best["transfer_score"]).sum())
    assert sel["tied_runs"] == int((runs["val/transfer_score"] == best["val/transfer_score"]).sum())


def test_breakdowns_cover_the_four_dimensions_and_pool_over_runs(transfer_analysis, synthetic_sweep):
    bd = _csv(transfer_analysis, "breakdowns")
    assert set(bd["breakdown"]) == {"word_length", "n_tokens", "word_kind", "letter_position"}
    assert set(bd["run"]) == {f"trial-{i:04d}" for i in range(24)} | {"all runs"}
    one = bd[
        (bd["run"] == "trial-0000") & (bd["breakdown"] == "word_kind") & (bd["metric"] == "position_accuracy")
    ]
    # the buckets partition the items of the task
    assert one["n_items"].sum() == sum(1 for it in synthetic_sweep["items"] if it["task"] == "position")
    pooled = bd[
        (bd["run"] == "all runs") & (bd["breakdown"] == "n_tokens") & (bd["metric"] == "position_accuracy")
    ]
    per_run = bd[
        (bd["run"] != "all runs") & (bd["breakdown"] == "n_tokens") & (bd["metric"] == "position_accuracy")
    ]
    for _, row in pooled.iterrows():
        assert row["delta"] == pytest.approx(
            per_run[per_run["bucket"] == row["bucket"]]["delta"].mean(), abs=1e-5
        )
        assert row["delta_ci_low"] <= row["delta"] <= row["delta_ci_high"] and row["n_runs"] == 24


def test_forbidden_metric_in_a_log_is_dropped_and_never_reported(transfer_analysis, synthetic_sweep):
    log = synthetic_sweep["study_dir"] / "trial-0000" / "metrics.jsonl"
    assert FORBIDDEN_KEY in log.read_text()  # planted: trial 0 logged it at each of its 4 validations
    curve, omitted = read_curve(log)
    assert omitted == 4 and len(curve) == 4
    assert all(
        set(row) == {"step", "val/position_accuracy", "val/count_accuracy", "val/transfer_score"}
        for row in curve
    )
    info = json.loads((transfer_analysis / "analysis.json").read_text())
    assert info["omitted_metric_entries"] == 4
    name = FORBIDDEN_KEY.split("/")[1]
    for f in transfer_analysis.rglob("*"):
        if f.suffix in (".csv", ".json"):
            assert name not in f.read_text(), f


def test_a_table_column_outside_the_whitelist_is_refused():
    good = pd.DataFrame(
        {
            "run": ["a"],
            "position_accuracy_delta_ci_low": [0.1],
            "params.lora_r": [8],
            "metric": ["count_accuracy"],
        }
    )
    assert check_columns(good, "t") is good
    with pytest.raises(SpellxferError, match="not allowed"):
        check_columns(pd.DataFrame({"run": ["a"], "spelling_accuracy": [0.9]}), "t")  # spellxfer-check: allow
    with pytest.raises(SpellxferError, match="metric value"):
        check_columns(
            pd.DataFrame({"metric": ["spelling_accuracy"], "estimate": [0.9]}), "t"  # spellxfer-check: allow
        )
    with pytest.raises(SpellxferError, match="not allowed"):
        check_columns(pd.DataFrame({"position_accuracy": [0.1], "bleu": [0.9]}), "t")


def test_study_from_optuna_storage_gives_the_same_runs(synthetic_sweep, transfer_analysis, tmp_path):
    optuna = pytest.importorskip("optuna")
    results = synthetic_sweep["results_dir"]
    storage = f"sqlite:///{tmp_path / 'syn.db'}"
    study = optuna.create_study(study_name="syn", storage=storage, direction="maximize")
    dists = {"lora_r": optuna.distributions.CategoricalDistribution([4, 8, 16, 32]),
             "lora_alpha": optuna.distributions.CategoricalDistribution([16, 32, 64]),
             "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True),
             "batch_size": optuna.distributions.CategoricalDistribution([4, 8]),
             "accumulate_grad_batches": optuna.distributions.CategoricalDistribution([1, 2]),
             "max_steps": optuna.distributions.CategoricalDistribution([100, 200])}
    for t in synthetic_sweep["trials"]:
        # odd trials record their directory; even ones rely on <results-dir>/sweeps/<study>/trial-NNNN
        attrs = {"run_dir": str(t["dir"])} if t["number"] % 2 else {}
        study.add_trial(
            optuna.trial.create_trial(
                params=t["params"], distributions=dists, value=t["objective"], user_attrs=attrs
            )
        )
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            params=synthetic_sweep["trials"][0]["params"],
            distributions=dists,
        )
    )
    out = tmp_path / "from_study"
    assert (
        main(
            [
                "analyze",
                "--study",
                "syn",
                "--storage",
                storage,
                "--results_dir",
                str(results),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    info = json.loads((out / "analysis.json").read_text())
    assert info["status_counts"] == {"complete": 24, "failed": 1} and info["name"] == "syn"
    a, b = _csv(out, "top_transfer_configs"), _csv(transfer_analysis, "top_transfer_configs")
    assert list(a["run"]) == list(b["run"]) and a["transfer_score"].to_numpy() == pytest.approx(
        b["transfer_score"].to_numpy()
    )


def test_a_study_whose_trial_directories_are_elsewhere_says_which_files_analyze_needs(
    synthetic_sweep, tmp_path, capsys
):
    """A study database on its own (as results/smollm2-h100/ commits it) is one error line naming
    what to copy where; with the directories under --results_dir, study-relative run_dirs resolve."""
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'alone.db'}"
    study = optuna.create_study(study_name="syn", storage=storage, direction="maximize")
    dist = {"lora_r": optuna.distributions.CategoricalDistribution([4, 8, 16, 32])}
    for t in synthetic_sweep["trials"][:3]:
        study.add_trial(
            optuna.trial.create_trial(
                params={"lora_r": t["params"]["lora_r"]},
                distributions=dist,
                value=t["objective"],
                user_attrs={"run_dir": t["dir"].name},
            )
        )
    elsewhere = tmp_path / "elsewhere"
    rc = main(
        [
            "analyze",
            "--study",
            "syn",
            "--storage",
            storage,
            "--results_dir",
            str(elsewhere),
            "--out",
            str(tmp_path / "a"),
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: --study syn: 3 complete trial(s) have no directory here")
    assert str(elsewhere / "sweeps" / "syn" / "trial-0000") in err[0]
    assert "trial.json, metrics.jsonl and eval/<decoding>/predictions.jsonl" in err[0]
    assert not (tmp_path / "a").exists()
    # the same database beside the study's directories: the relative run_dirs resolve
    results = synthetic_sweep["results_dir"]
    assert (
        main(
            [
                "analyze",
                "--study",
                "syn",
                "--storage",
                storage,
                "--results_dir",
                str(results),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "b" / "analysis.json").read_text())["status_counts"] == {"complete": 3}


def test_single_trial_directories_are_accepted(synthetic_sweep, tmp_path):
    dirs = [str(synthetic_sweep["study_dir"] / f"trial-{i:04d}") for i in (0, 1, 2, 25)]
    out = tmp_path / "three"
    assert main(["analyze", "--runs", *dirs, "--out", str(out), "--n_boot", "200"]) == 0
    info = json.loads((out / "analysis.json").read_text())
    assert info["n_runs"] == 3 and info["status_counts"] == {"complete": 3, "pruned": 1}
    corr = _csv(out, "metric_correlations")
    assert corr["n_runs"].eq(3).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "{study}", "--study", "syn", "--storage", "sqlite:///x.db"], "exactly one of them"),
        (["--study", "syn"], "needs --storage"),
        (["--runs", "{study}/base"], "neither a trial directory"),
        (["--runs", "{study}", "--decoding", "greedy"], "no complete trial with an eval/greedy"),
        (["--study", "nope", "--storage", "sqlite:///{tmp}/empty.db"], "no such study"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(synthetic_sweep, tmp_path, capsys, args, message):
    args = [a.format(study=synthetic_sweep["study_dir"], tmp=tmp_path) for a in args]
    out = tmp_path / "out"
    assert main(["analyze", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and err.strip().startswith("error:")
    assert not out.exists()


def test_missing_base_evaluation_is_named(synthetic_sweep, tmp_path, capsys):
    study = tmp_path / "s"
    shutil.copytree(synthetic_sweep["study_dir"] / "trial-0000", study / "trial-0000")
    assert main(["analyze", "--runs", str(study), "--out", str(tmp_path / "out")]) == 2
    assert "no base-model evaluation" in " ".join(capsys.readouterr().err.split())


def test_same_inputs_and_seed_give_the_same_numbers(synthetic_sweep, tmp_path):
    dirs = [str(synthetic_sweep["study_dir"] / f"trial-{i:04d}") for i in range(6)]
    for out in ("a", "b"):
        assert (
            main(["analyze", "--runs", *dirs, "--out", str(tmp_path / out), "--n_boot", "300", "--seed", "3"])
            == 0
        )
    for name in TABLES:
        assert (tmp_path / "a" / f"{name}.csv").read_text() == (tmp_path / "b" / f"{name}.csv").read_text(), (
            name
        )
    assert not math.isnan(_csv(tmp_path / "a", "metric_correlations")["ci_low"].iloc[0])


def test_one_run_still_gives_an_analysis_and_a_report(synthetic_sweep, tmp_path):
    out = tmp_path / "one"
    assert (
        main(
            [
                "analyze",
                "--runs",
                str(synthetic_sweep["study_dir"] / "trial-0003"),
                "--out",
                str(out),
                "--n_boot",
                "200",
            ]
        )
        == 0
    )
    assert _csv(out, "metric_correlations")["estimate"].isna().all()  # nothing to correlate
    assert _csv(out, "hyperparameter_effects").empty  # nothing varies
    pooled = _csv(out, "breakdowns").query("run == 'all runs'")
    assert pooled["delta_ci_low"].notna().all()  # one run: its own interval over items
    assert (
        main(
            [
                "report",
                "--analysis",
                str(out),
                "--out",
                str(tmp_path / "r"),
                "--figures_out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    page = (tmp_path / "r" / "transfer_report_syn.html").read_text()
    assert "not estimable with 1 run(s)" in page and "1 complete run(s) analysed" in page


def test_several_samples_per_item_weigh_items_equally_and_bootstrap_items(tmp_path):
    from synthetic_sweep import make_sweep

    from spellxfer.evaluation.compare import read_predictions
    from spellxfer.evaluation.stats import accuracy_summary

    study = tmp_path / "sweeps" / "k3"
    make_sweep(study, n_trials=4, n_items=60, samples=3, decoding="greedy")
    out = tmp_path / "a"
    assert (
        main(["analyze", "--runs", str(study), "--decoding", "greedy", "--out", str(out), "--n_boot", "300"])
        == 0
    )
    row = _csv(out, "runs").set_index("trial").loc[2]
    rows = [r for r in read_predictions(study / "trial-0002" / "eval" / "greedy") if r["task"] == "count"]
    by_item: dict = {}
    for r in rows:
        by_item.setdefault(r["id"], []).append(r["correct"])
    assert {len(v) for v in by_item.values()} == {3} and row["count_accuracy_n"] == 60
    expected = accuracy_summary(list(by_item.values()), n_boot=300, seed=0)
    assert expected["ci_method"] == "item_bootstrap"
    assert (
        row["count_accuracy"],
        row["count_accuracy_ci_low"],
        row["count_accuracy_ci_high"],
    ) == pytest.approx((expected["accuracy"], expected["ci_low"], expected["ci_high"]), abs=1e-5)


def test_a_study_committed_with_compressed_compacted_predictions_analyses_to_the_same_numbers(
    tmp_path, capsys
):
    import gzip

    from compact_predictions import DROPPED, compact
    from synthetic_sweep import make_sweep

    plain = tmp_path / "plain" / "sweeps" / "z"
    make_sweep(plain, n_trials=4, n_items=60, decoding="greedy")
    for f in plain.rglob("predictions.jsonl"):  # rows as evaluate writes them, with the rendered prompts
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        extra = {"prompt": "<|im_start|>user\n…", "likelihood_prompt": "…", "gold_logprob": -1.5}
        f.write_text("".join(json.dumps(r | extra) + "\n" for r in rows))
    packed, compacted = (tmp_path / d / "sweeps" / "z" for d in ("packed", "compacted"))
    shutil.copytree(plain, packed)
    shutil.copytree(plain, compacted)
    files = sorted(packed.rglob("predictions.jsonl"))
    assert len(files) == 5  # the base model's and each of the 4 trials'
    for f in files:  # gzip as it came off the GPU box
        f.with_suffix(".jsonl.gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    for f in sorted(compacted.rglob("predictions.jsonl")):  # as committed: xz, without DROPPED
        out = compact(f)
        assert out.suffix == ".xz" and not f.exists()
        assert not set(DROPPED) & set(json.loads(lzma.open(out).readline()))
    args = ["analyze", "--decoding", "greedy", "--n_boot", "200"]
    for d, study in (("a", plain), ("b", packed), ("c", compacted)):
        assert main([*args, "--runs", str(study), "--out", str(tmp_path / d)]) == 0
    a, b, c = (_csv(tmp_path / d, "runs").drop(columns="run_dir") for d in "abc")
    assert len(a) == 4 and a["position_accuracy"].notna().all()
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)

    damaged = compacted / "trial-0001" / "eval" / "greedy" / "predictions.jsonl.xz"
    damaged.write_bytes(damaged.read_bytes()[:200])  # cut off mid-stream
    capsys.readouterr()
    assert main([*args, "--runs", str(compacted), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{damaged}: not a readable xz file" in err.replace("\n", "") and not (tmp_path / "d").exists()
