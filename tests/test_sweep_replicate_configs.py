"""More seeds of chosen configurations (``sweep --replicate_configs SPEC --replicates N``): phase 2
of the transfer study, and the control arm training the spelling study's configurations
(``--from_study``). Planning is tested on real Optuna studies (SQLite) holding finished trials;
one end-to-end run trains tiny-qwen3. Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from spellxfer.cli import main
from spellxfer.core.errors import SpellxferError
from spellxfer.sweep.replicate import plan_replicates
from spellxfer.sweep.space import load_space
from spellxfer.sweep.trial import SweepContext, fit_argv

NAMES = ["lora_r", "learning_rate"]  # configs/sweeps/tiny.yaml
DISTS = {
    "lora_r": CategoricalDistribution([4, 8]),
    "learning_rate": CategoricalDistribution([1.0e-3, 3.0e-3]),
}
POINTS = [(4, 1.0e-3), (4, 3.0e-3), (8, 1.0e-3), (8, 3.0e-3)]


def tiny_space(tmp_path: Path, data: Path, fixed: dict | None = None, **changes) -> Path:
    raw = yaml.safe_load((REPO / "configs/sweeps/tiny.yaml").read_text())
    raw["fixed"] |= {"data.data_dir": str(data), **(fixed or {})}
    raw |= changes
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def new_study(tmp_path: Path, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'sweeps' / f'{name}.db'}"
    (tmp_path / "sweeps").mkdir(exist_ok=True)
    return optuna.create_study(study_name=name, storage=url, direction="maximize")


def finished(study, values: list[float | None]) -> None:
    """Phase 1: one trial per configuration (replicate 0, config_id = its number); None: failed."""
    for i, value in enumerate(values):
        r, lr = POINTS[i % 4]
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        study.add_trial(
            create_trial(
                params={"lora_r": r, "learning_rate": lr},
                distributions=DISTS,
                value=value,
                state=state,
                user_attrs={"config_id": i, "replicate": 0},
            )
        )


def queued(study) -> list[tuple[int, int]]:
    return sorted((t.user_attrs["config_id"], t.user_attrs["replicate"])
                  for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING)


def test_auto_picks_the_validation_best_then_others_spread_over_the_objective(tmp_path):
    study = new_study(tmp_path, "p1")
    values = [0.30, 0.10, None, 0.55, 0.20, 0.40, 0.05, 0.25]  # config 2 failed: not selectable
    finished(study, values)
    plan = plan_replicates(study, study, "auto:3", 2, NAMES, None)
    roles = [(c["config_id"], c["role"], c["objective"]) for c in plan["configurations"]]
    # best 0.55 (config 3); the others by objective: 0.05 (6) … 0.40 (5): quantiles 0 and 1
    assert roles == [(3, "best", 0.55), (6, "spread", 0.05), (5, "spread", 0.40)]
    assert queued(study) == [(3, 1), (5, 1), (6, 1)]  # replicate 0 of each is there already
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:  # the configuration's exact hyperparameters
            assert t.system_attrs["fixed_params"] == study.trials[t.user_attrs["config_id"]].params
    # auto:2 adds the median of the others (0.05 0.10 0.20 0.25 0.30 0.40 → index ⌊2.5 + ½⌋ = 3: 0.25)
    other = new_study(tmp_path, "p2")
    finished(other, values)
    plan = plan_replicates(other, other, "auto:2", 1, NAMES, None)
    assert [c["config_id"] for c in plan["configurations"]] == [3, 7]
    assert queued(other) == []  # one seed each, and each has it


def test_explicit_ids_queue_only_the_missing_replicates_and_a_second_run_adds_nothing(tmp_path):
    study = new_study(tmp_path, "ids")
    finished(study, [0.3, 0.2, 0.1])
    # configuration 1: replicate 1 is already running, replicate 2 failed (no retry): run it again
    running = study.ask(DISTS)
    running.set_user_attr("config_id", 1)
    running.set_user_attr("replicate", 1)
    study.add_trial(create_trial(params={"lora_r": 4, "learning_rate": 3.0e-3}, distributions=DISTS,
                                 state=TrialState.FAIL, user_attrs={"config_id": 1, "replicate": 2}))
    plan = plan_replicates(study, study, "1, 2", 3, NAMES, None)
    assert [c["enqueued"] for c in plan["configurations"]] == [[2], [1, 2]]
    assert queued(study) == [(1, 2), (2, 1), (2, 2)]
    again = plan_replicates(study, study, "1,2", 3, NAMES, None)  # the same command after an interruption
    assert [c["enqueued"] for c in again["configurations"]] == [[], []]
    assert queued(study) == [(1, 2), (2, 1), (2, 2)]


def test_from_study_copies_the_configurations_into_another_study(tmp_path):
    source, control = new_study(tmp_path, "spelling"), new_study(tmp_path, "control")
    finished(source, [0.3, 0.5, 0.1, 0.2])
    plan = plan_replicates(control, source, "auto:2", 2, NAMES, "spelling")
    assert [c["config_id"] for c in plan["configurations"]] == [1, 3]
    waiting = [t for t in control.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert sorted((t.user_attrs["config_id"], t.user_attrs["replicate"]) for t in waiting) == [(1, 0), (1, 1),
                                                                                              (3, 0), (3, 1)]
    assert {t.user_attrs["source_study"] for t in waiting} == {"spelling"}
    assert all(
        t.system_attrs["fixed_params"] == source.trials[t.user_attrs["config_id"]].params for t in waiting
    )
    assert all(t.user_attrs["replicates_queued"] for t in waiting)  # a replicate 0 queues no seeds of its own
    assert (
        plan_replicates(control, source, "auto:2", 2, NAMES, "spelling")["configurations"][0]["enqueued"]
        == []
    )
    with pytest.raises(
        SpellxferError,
        match=r"^--from_study spelling: parameters differ \(missing in spelling: "
        r"lora_alpha; not in this space: learning_rate\)$",
    ):
        plan_replicates(control, source, "1", 3, ["lora_r", "lora_alpha"], "spelling")
    assert len(queued(control)) == 4  # the refused command queued nothing


@pytest.mark.parametrize(
    ("spec", "n", "values", "message"),
    [
        (
            "7",
            2,
            [0.1, 0.2],
            r"^--replicate_configs: no configuration 7 in the study \(configuration ids: 0, 1\)$",
        ),
        ("auto", 2, [0.1], r"^--replicate_configs: expected auto:K or a comma list"),
        ("1,,2", 2, [0.1], r"^--replicate_configs: expected auto:K"),
        ("auto:0", 2, [0.1], r"^--replicate_configs auto:K needs K ≥ 1"),
        (
            "auto:2",
            2,
            [None, None],
            r"^--replicate_configs auto: the study has no complete trial to select on$",
        ),
        ("0", 0, [0.1], r"^--replicates must be ≥ 1"),
    ],
)
def test_a_bad_choice_is_one_error_line_naming_the_option_and_queues_nothing(
    tmp_path, spec, n, values, message
):
    study = new_study(tmp_path, "bad")
    finished(study, values)
    with pytest.raises(SpellxferError, match=message):
        plan_replicates(study, study, spec, n, NAMES, None)
    assert queued(study) == []


def test_the_command_refuses_a_bad_spec_with_exit_2_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    study = new_study(tmp_path, "cli")
    finished(study, [0.1, 0.2])
    space = tiny_space(tmp_path, tmp_path / "data")
    common = ["sweep", "--space", str(space), "--study", "cli", "--results_dir", str(tmp_path)]
    assert main([*common, "--replicate_configs", "0,9", "--replicates", "2"]) == 2
    assert "no configuration 9" in capsys.readouterr().err
    assert main([*common, "--replicate_configs", "auto:1"]) == 2
    assert "--replicate_configs needs --replicates" in capsys.readouterr().err
    assert main([*common, "--replicate_configs", "auto:1", "--replicates", "2", "--from_study", "nope"]) == 2
    assert "--from_study nope: no study database" in capsys.readouterr().err
    assert main([*common, "--hours", "0"]) == 2
    assert queued(study) == [] and not (tmp_path / "data").exists()  # nothing queued, no data built


def test_replicate_k_trains_with_its_own_seed_and_replicate_0_with_the_base_config_s(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    space = load_space(tiny_space(tmp_path, tmp_path / "data"))  # replicates: 1, tiny.yaml seed 0
    ctx = SweepContext(
        space=space,
        study="s",
        sweep_dir=tmp_path,
        model="tiny-qwen3",
        test_files=[],
        wandb=False,
        over_budget=lambda t: False,
        progress=lambda *a, **k: None,
    )
    params = {"lora_r": 4, "learning_rate": 1.0e-3}
    assert "--seed_everything" not in fit_argv(ctx, tmp_path, params, None, 0, space.replicate_seed(0))
    argv = fit_argv(ctx, tmp_path, params, None, 1, space.replicate_seed(1))
    assert argv[argv.index("--seed_everything") + 1] == "1"


@pytest.mark.slow
def test_phase_2_trains_exactly_the_missing_seed_of_the_selected_configuration(tmp_path, demo_data):
    space = tiny_space(tmp_path, demo_data, fixed={"trainer.max_steps": 10, "data.val_limit": 4},
                       evaluation={"limit": 4, "max_new_tokens": 2})
    results = tmp_path / "results"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    argv = [
        sys.executable,
        "-m",
        "spellxfer",
        "sweep",
        "--space",
        str(space),
        "--study",
        "rep",
        "--results_dir",
        str(results),
        "--heartbeat_s",
        "1",
    ]

    def sweep(*extra: str) -> subprocess.CompletedProcess:
        p = subprocess.run([*argv, *extra], cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p

    sweep("--trials", "2")  # phase 1: two configurations, one seed each
    study = optuna.load_study(study_name="rep", storage=f"sqlite:///{results / 'sweeps' / 'rep.db'}")
    phase1 = study.get_trials()
    assert len(phase1) == 2 and all(t.state == TrialState.COMPLETE for t in phase1)
    best = max(phase1, key=lambda t: (t.value, -t.number))

    p = sweep("--replicate_configs", "auto:1", "--replicates", "2")  # phase 2
    assert (
        f"configuration {best.number} (best, val/transfer_score {best.value:.4f}): replicates queued 1"
        in p.stdout
    )
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    new = trials[2]
    assert (new.user_attrs["config_id"], new.user_attrs["replicate"], new.params) == (
        best.number,
        1,
        best.params,
    )
    record = json.loads((results / "sweeps" / "rep" / f"trial-{new.number:04d}" / "trial.json").read_text())
    seed = load_space(space).replicate_seed(1)
    assert record["seed"] == seed == 1
    fit = yaml.safe_load((results / "sweeps" / "rep" / f"trial-{new.number:04d}" / "fit.yaml").read_text())
    assert fit["seed_everything"] == seed  # the seed the fit really ran with
    plan = json.loads((results / "sweeps" / "rep" / "replicate-plan.json").read_text())
    assert [(c["config_id"], c["role"], c["enqueued"]) for c in plan["configurations"]] == [
        (best.number, "best", [1])
    ]

    sweep("--replicate_configs", "auto:1", "--replicates", "2")  # again: everything is there
    assert len(study.get_trials()) == 3


def trial_dirs(root: Path, records: list[dict]) -> Path:
    """Trial directories as `sweep` leaves them (trial.json, eval/sampled/metrics.json), no database."""
    study_dir = root / "sweeps" / "lost"
    for rec in records:
        d = study_dir / f"trial-{rec['number']:04d}"
        (d / "eval" / "sampled").mkdir(parents=True)
        (d / "trial.json").write_text(json.dumps({"study": "lost", **rec}))
        if rec["status"] == "complete":
            metrics = {"position_accuracy": rec["objective"], "count_accuracy": 0.1, "transfer_score": 0.2}
            (d / "eval" / "sampled" / "metrics.json").write_text(json.dumps(metrics))
    return study_dir


def test_a_lost_study_database_is_rebuilt_from_the_trial_directories_and_plans_the_same_replicates(
    tmp_path, capsys
):
    values = [0.30, 0.10, None, 0.55, 0.20, 0.40, 0.05, 0.25]
    records = [
        {
            "number": i,
            "status": "complete" if v is not None else "failed",
            "params": {"lora_r": POINTS[i % 4][0], "learning_rate": POINTS[i % 4][1]},
            "config_id": i,
            "replicate": 0,
            "seed": 0,
            "objective": v,
            "error": None if v is not None else "out of memory",
        }
        for i, v in enumerate(values)
    ]
    records[3] |= {"duration_s": 12.5, "checkpoint": "/box/sweeps/lost/trial-0003/checkpoints/best.ckpt"}
    records.append({**records[3], "number": 8, "status": "running", "objective": None, "replicate": 1})
    study_dir = trial_dirs(tmp_path, records)
    space = str(REPO / "configs/sweeps/tiny.yaml")
    assert main(["study", "restore", "--study_dir", str(study_dir), "--space", space]) == 0

    restored = optuna.load_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'sweeps' / 'lost.db'}")
    trials = restored.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(9))  # numbers kept: a new trial gets trial-0009
    assert [t.value for t in trials[:8]] == values
    complete, failed = TrialState.COMPLETE, TrialState.FAIL
    assert [t.state for t in trials] == [complete] * 2 + [failed] + [complete] * 5 + [failed]
    assert trials[2].user_attrs["error"] == "out of memory"
    assert "status running" in trials[8].user_attrs["error"]  # was running when the database was lost
    assert (trials[8].user_attrs["config_id"], trials[8].user_attrs["replicate"]) == (3, 1)
    assert trials[3].user_attrs["run_dir"] == "trial-0003"
    assert trials[3].user_attrs["checkpoint"] == "trial-0003/checkpoints/best.ckpt"  # study-relative
    assert trials[3].duration.total_seconds() == 12.5  # the CSV's duration_s
    assert trials[3].user_attrs["test_sampled"]["position_accuracy"] == 0.55
    assert restored.user_attrs["objective"] == "val/transfer_score"

    original = new_study(tmp_path, "p1")
    finished(original, values)
    def choice(study):
        plan = plan_replicates(study, study, "auto:3", 3, NAMES, None)["configurations"]
        return [(c["config_id"], c["role"], c["objective"], c["params"]) for c in plan]

    assert choice(restored) == choice(original) == [
        (3, "best", 0.55, {"lora_r": 8, "learning_rate": 3.0e-3}),
        (6, "spread", 0.05, {"lora_r": 8, "learning_rate": 1.0e-3}),
        (5, "spread", 0.40, {"lora_r": 4, "learning_rate": 3.0e-3}),
    ]

    # into a database that already holds the study: refused, nothing added
    capsys.readouterr()
    before = len(restored.get_trials(deepcopy=False))  # 9 restored + the replicates just queued
    assert main(["study", "restore", "--study_dir", str(study_dir), "--space", space]) == 2
    assert "already has trials" in capsys.readouterr().err
    assert len(restored.get_trials(deepcopy=False)) == before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda recs: recs.pop(1), "without gaps (Optuna numbers trials in order); missing 1"),
        (lambda recs: recs[0]["params"].update(lora_r=64), "lora_r 64 is not a value of the space file"),
        (lambda recs: recs[0].update(objective=None), "status complete without a numeric objective"),
    ],
)
def test_restoring_from_bad_trial_directories_is_one_line_exit_2_and_writes_no_database(
    tmp_path, capsys, change, message
):
    records = [
        {"number": i, "status": "complete", "params": {"lora_r": r, "learning_rate": lr}, "objective": i / 10}
        for i, (r, lr) in enumerate(POINTS)
    ]
    change(records)
    study_dir = trial_dirs(tmp_path, records)
    space = str(REPO / "configs/sweeps/tiny.yaml")
    assert main(["study", "restore", "--study_dir", str(study_dir), "--space", space]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "sweeps" / "lost.db").exists()  # every directory is checked before writing
