"""Replicates: ``replicates: N`` in a space file trains every sampled configuration with N seeds,
the trials linked by a configuration id (Optuna user attributes, trial.json and the sweep CSV);
and the sweep CSV reads the probe, trivial-baseline and diagnostic fields of ``metrics.json`` when
``evaluate`` wrote them (and leaves them empty for an older file). Trained on spelling, evaluated
on position and count only.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import optuna
import pytest
import yaml
from conftest import REPO
from optuna.trial import TrialState

from spellxfer.sweep.results import _eval_columns
from spellxfer.sweep.run import counts_toward_budget, plan
from spellxfer.sweep.space import load_space
from spellxfer.sweep.trial import link_replicates
from spellxfer.training.loggers import steps_trained


def space_file(tmp_path, data, **changes) -> str:
    raw = yaml.safe_load((REPO / "configs/sweeps/tiny.yaml").read_text())
    raw["fixed"] |= {"data.data_dir": str(data)}
    raw |= changes
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_sampled_configuration_queues_its_other_seeds_with_the_same_hyperparameters(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    space = load_space(space_file(tmp_path, tmp_path / "data", replicates=3, sampler="random"))
    # tiny.yaml: seed 0
    assert space.replicates == 3 and [space.replicate_seed(k) for k in range(3)] == [0, 1, 2]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    leader = study.ask()
    params = space.suggest(leader)
    assert link_replicates(leader, space, params) == (leader.number, 0, 0)
    queued = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert [t.user_attrs["replicate"] for t in queued] == [1, 2]
    assert all(t.user_attrs["config_id"] == leader.number for t in queued)
    assert plan(study, n_trials=1) == "run"  # the queued seeds run before the budget is looked at
    # a queued seed draws nothing new: the same hyperparameters, its own seed, nothing queued again
    second = study.ask()
    assert space.suggest(second) == params
    assert link_replicates(second, space, params) == (leader.number, 1, 1)
    assert len([t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]) == 1
    # the budget counts configurations: only the leader does
    study.tell(leader, 0.5)
    study.tell(second, 0.4)
    assert [counts_toward_budget(t) for t in study.get_trials(deepcopy=False)] == [True, False, False]


@pytest.mark.parametrize(
    ("value", "message"), [(0, "from 1 to 100"), (2.5, "from 1 to 100"), (True, "from 1 to 100")]
)
def test_a_bad_replicates_value_is_one_error_line_naming_the_key(value, message, tmp_path, monkeypatch):
    from spellxfer.core.errors import SpellxferError

    monkeypatch.chdir(REPO)
    with pytest.raises(SpellxferError, match=rf"space.yaml: replicates: expected an integer {message}"):
        load_space(space_file(tmp_path, tmp_path / "data", replicates=value))


@pytest.mark.slow
def test_replicates_3_makes_3_linked_trials_per_configuration(tmp_path, demo_data):
    space = space_file(tmp_path, demo_data, replicates=3, budget={"trials": 1},
                       evaluation={"limit": 4, "max_new_tokens": 2})
    raw = yaml.safe_load(open(space))
    raw["fixed"] |= {"trainer.max_steps": 10, "data.val_limit": 4}
    open(space, "w").write(yaml.safe_dump(raw))
    results = tmp_path / "results"
    p = subprocess.run([sys.executable, "-m", "spellxfer", "sweep", "--space", space, "--study", "rep",
                        "--results_dir", str(results), "--heartbeat_s", "1"], cwd=REPO, capture_output=True,
                       text=True, env={**__import__("os").environ, "WANDB_MODE": "disabled"}, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    study = optuna.load_study(study_name="rep", storage=f"sqlite:///{results / 'sweeps' / 'rep.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["config_id"] for t in trials} == {0}
    assert sorted(t.user_attrs["replicate"] for t in trials) == [0, 1, 2]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 1  # one configuration
    with open(results / "metrics" / "rep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["config_id"], r["replicate"], r["seed"]) for r in rows) == [
        ("0", "0", "0"),
        ("0", "1", "1"),
        ("0", "2", "2"),
    ]
    assert {r["steps_trained"] for r in rows} == {"10"}
    fits = []
    for t in trials:
        d = results / "sweeps" / "rep" / f"trial-{t.number:04d}"
        record = json.loads((d / "trial.json").read_text())
        assert (record["config_id"], record["replicate"], record["seed"]) == (0, t.user_attrs["replicate"],
                                                                              t.user_attrs["replicate"])
        fits.append(yaml.safe_load((d / "fit.yaml").read_text())["seed_everything"])
    assert sorted(fits) == [0, 1, 2]  # the seed each fit really ran with


# ---- the sweep CSV and metrics.json (the fields fixed in the probe contract) -----------------------
def schema_metrics(letter_index_acc: float = 0.175) -> dict:
    """A metrics.json as `evaluate --scoring both` writes it (fields of the probe contract)."""
    def entry(acc, best, name, constant, no_answer):
        return {
            "accuracy": acc,
            "ci_low": acc - 0.02,
            "ci_high": acc + 0.02,
            "n": 400,
            "majority_answer": "1",
            "majority_baseline": best,
            "trivial_baselines": {"majority": best, "best_constant": best},
            "best_trivial": {"name": name, "accuracy": best},
            "beats_trivial": acc - 0.02 > best,
            "likelihood": {
                "accuracy": acc + 0.1,
                "ci_low": acc + 0.08,
                "ci_high": acc + 0.12,
                "n": 400,
                "gold_mean_rank": 3.2,
                "gold_mean_logprob": -2.1,
                "beats_trivial": True,
            },
            "diagnostics": {
                "no_answer_rate": no_answer,
                "top_answers": [["1", 0.9]],
                "constant_answer": constant,
                "formats": {"bare": 300, "sentence": 80, "spelled": 10, "echoed": 5, "other": 5},
            },
        }

    return {
        "scoring": "both",
        "position_accuracy": 0.16,
        "position_accuracy_ci_low": 0.15,
        "position_accuracy_ci_high": 0.17,
        "position_accuracy_n": 800,
        "position_likelihood_accuracy": 0.3,
        "count_accuracy": 0.2,
        "count_accuracy_ci_low": 0.19,
        "count_accuracy_ci_high": 0.21,
        "count_accuracy_n": 800,
        "count_likelihood_accuracy": 0.25,
        "transfer_score": 0.18,
        "subtasks": {
            "position/letter_index": entry(letter_index_acc, 0.175, "always_1", True, 0.01),
            "position/nth_letter": entry(0.16, 0.161, "first_letter", False, 0.2),
            "count/letter_count": entry(0.25, 0.301, "always_1", False, 0.05),
            "count/word_length": entry(0.05, 0.12, "majority", False, 0.3),
        },
    }


def test_the_sweep_csv_carries_probe_baseline_and_diagnostic_columns_when_metrics_json_has_them():
    m = schema_metrics()
    cols = _eval_columns("greedy", m, m, None)
    assert (
        cols["greedy_position_likelihood_accuracy"] == 0.3
        and cols["greedy_base_count_likelihood_accuracy"] == 0.25
    )
    assert cols["greedy_position/letter_index_best_trivial"] == 0.175
    assert cols["greedy_position/letter_index_best_trivial_name"] == "always_1"
    assert cols["greedy_position/letter_index_constant_answer"] is True
    assert cols["greedy_position/letter_index_beats_trivial"] is False  # a constant answer does not beat it
    assert cols["greedy_count/word_length_no_answer_rate"] == 0.3
    assert cols["greedy_position/nth_letter_likelihood_accuracy"] == pytest.approx(0.26)


def test_the_sweep_csv_works_with_an_old_metrics_json_and_leaves_the_new_columns_empty():
    old = {"position_accuracy": 0.16, "position_accuracy_ci_low": 0.15, "position_accuracy_ci_high": 0.17,
           "position_accuracy_n": 800, "count_accuracy": 0.2, "transfer_score": 0.18,
           "subtasks": {"position/nth_letter": {"accuracy": 0.16, "ci_low": 0.1, "ci_high": 0.2, "n": 400,
                                                "majority_answer": "e", "majority_baseline": 0.12}}}
    cols = _eval_columns("sampled", old, old, None)
    assert cols["sampled_position_accuracy"] == 0.16 and cols["sampled_position_likelihood_accuracy"] is None
    assert cols["sampled_position/nth_letter_accuracy"] == 0.16
    assert (
        cols["sampled_position/nth_letter_best_trivial"] is None
        and cols["sampled_position/nth_letter_constant_answer"] is None
    )
    # a trial not evaluated yet
    assert _eval_columns("sampled", None, None, None)["sampled_position_accuracy"] is None


def test_steps_trained_is_the_last_optimizer_step_logged(tmp_path):
    log = tmp_path / "metrics.jsonl"  # a fit's rows, each numbered with the optimizer steps done
    rows = [
        {"step": 0, "val/position_accuracy": 0.1, "global_step": 0},
        {"step": 5, "train/loss": 2.0, "global_step": 5},
        {"step": 25, "val/position_accuracy": 0.2, "global_step": 25},
        {"step": 30, "train/loss": 1.0, "global_step": 30},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3')  # a line still being written
    assert steps_trained(log) == 30
    assert steps_trained(tmp_path / "missing.jsonl") is None
    # written before rows were renumbered: global_step in validation rows only, the others one lower
    old = tmp_path / "old.jsonl"
    rows = [{"step": 0, "val/position_accuracy": 0.1, "global_step": 0}, {"step": 4, "train/loss": 2.0},
            {"step": 24, "val/position_accuracy": 0.2, "global_step": 25}, {"step": 29, "train/loss": 1.0}]
    old.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert steps_trained(old) == 30


def test_a_learning_curve_reads_the_optimizer_steps_of_new_and_old_logs(tmp_path):
    from spellxfer.analysis.runs import read_curve

    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    new.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"step": 0, "global_step": 0, "val/transfer_score": 0.1},
                {"step": 10, "global_step": 10, "train/loss": 1.0},
                {"step": 10, "global_step": 10, "val/transfer_score": 0.2},
            ]
        )
    )
    old.write_text("".join(json.dumps(r) + "\n" for r in [  # before step-0 validations and global_step
        {"step": 9, "train/loss": 1.0}, {"step": 9, "val/transfer_score": 0.2}]))
    assert read_curve(new)[0] == [
        {"step": 0, "val/transfer_score": 0.1},
        {"step": 10, "val/transfer_score": 0.2},
    ]
    assert read_curve(old)[0] == [{"step": 10, "val/transfer_score": 0.2}]
