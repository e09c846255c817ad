"""Sweeps end to end on tiny-qwen3 (``python -m spellxfer sweep --space configs/sweeps/tiny.yaml``).

What a sweep promises: a sweep whose whole process group is SIGKILLed mid-trial, again and again,
finishes when the same command runs again, with every trial complete exactly once and each killed
trial resumed from its own ``last.ckpt``; a trial that raises is recorded as failed with its error
and the sweep goes on; two sweep processes sharing a real PostgreSQL server split the trials
without running any twice; a wrong space file is one ``error:`` line naming the file and the key,
before anything runs. Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, read_jsonl
from optuna.trial import TrialState

from spellxfer.cli import main
from spellxfer.sweep.space import load_space, make_sampler

TINY_GRID = {(4, 1.0e-3), (4, 3.0e-3), (8, 1.0e-3), (8, 3.0e-3)}  # configs/sweeps/tiny.yaml


def quiet_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", **extra}


def tiny_space(tmp_path: Path, data: Path, fixed: dict | None = None, **changes) -> Path:
    """configs/sweeps/tiny.yaml on the test's data directory, with some keys changed."""
    raw = yaml.safe_load((REPO / "configs/sweeps/tiny.yaml").read_text())
    raw["fixed"] |= {"data.data_dir": str(data), **(fixed or {})}
    raw |= changes
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_argv(space: Path, study: str, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spellxfer", "sweep", "--space", str(space), "--study", study,
            "--results_dir", str(results), "--heartbeat_s", "1", *extra]


def run_sweep(*argv: str, env=None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, env=env or quiet_env(), timeout=timeout
    )


def load(results: Path, study: str, url: str | None = None) -> optuna.Study:
    return optuna.load_study(
        study_name=study, storage=url or f"sqlite:///{results / 'sweeps' / f'{study}.db'}"
    )


def csv_rows(results: Path, study: str) -> list[dict]:
    with open(results / "metrics" / f"{study}.csv", newline="") as f:
        return list(csv.DictReader(f))


def grid_point(params: dict) -> tuple:
    return (int(params["lora_r"]), float(params["learning_rate"]))


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory, demo_data) -> Path:
    """The base model's evaluation for a tiny sweep, made once by the sweep's own code and copied
    into each test's study (as a study reuses it across runs), so the tests pay for it once."""
    from rich.console import Console

    from spellxfer.sweep.run import base_settings, prepare_data_and_base

    out = tmp_path_factory.mktemp("base")
    space = load_space(tiny_space(out, demo_data))
    model, data = base_settings(space)
    prepare_data_and_base(space, model, data, out / "study", Console(quiet=True))
    assert (out / "study" / "base" / "sampled" / "metrics.json").is_file()
    return out / "study" / "base"


def with_base(results: Path, study: str, base_eval: Path) -> None:
    shutil.copytree(base_eval, results / "sweeps" / study / "base")


# ---- preemption: kill, run again, resume ----------------------------------------------------------
def wait_for_checkpoint(
    proc: subprocess.Popen, sweep_dir: Path, since: float, log: Path, timeout: float = 180
) -> Path:
    """The newest running trial's directory, once this sweep process wrote its ``last.ckpt``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the sweep exited ({proc.returncode}) before a checkpoint:\n{log.read_text()}")
        for run in sorted(sweep_dir.glob("trial-*"), reverse=True):
            if (run / "trial.json").is_file() and json.loads((run / "trial.json").read_text())[
                "status"
            ] == "running":
                last = run / "checkpoints" / "last.ckpt"
                if last.is_file() and last.stat().st_mtime > since:
                    return run
                break  # older "running" trials are the ones killed before
        time.sleep(0.1)
    pytest.fail(f"no checkpoint after {timeout} s:\n{log.read_text()}")


@pytest.mark.slow
def test_a_sweep_killed_three_times_mid_trial_finishes_every_trial_exactly_once(
    tmp_path, demo_data, base_eval
):
    space, results = tiny_space(tmp_path, demo_data), tmp_path / "results"
    sweep_dir = results / "sweeps" / "kill"
    with_base(results, "kill", base_eval)
    argv = sweep_argv(space, "kill", results)
    killed_at = []
    for i in range(3):
        log = tmp_path / f"killed-{i}.log"
        since = time.time()
        with open(log, "w") as out:
            # its own session, so killing the group is what a preempted machine does to the sweep
            proc = subprocess.Popen(argv, cwd=REPO, env=quiet_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            run = wait_for_checkpoint(proc, sweep_dir, since, log)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        killed_at.append(run.name)

    # the same command again runs the study to its end: four trials of fit + four validations + evaluate
    p = run_sweep(*argv, timeout=900)  # a hang guard, not a timing: a loaded 2-core box needs minutes
    assert p.returncode == 0, p.stdout + p.stderr

    trials = load(results, "kill").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(grid_point(t.params) for t in complete) == sorted(TINY_GRID)  # each point once
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 3 and not [
        t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.FAIL)
    ]
    retried = {t.system_attrs["retry_history"][-1]: t for t in trials if t.system_attrs.get("retry_history")}
    assert sorted(retried) == sorted(t.number for t in failed)  # every killed trial was retried once

    for t in failed:  # ... from the killed trial's own last checkpoint, not from scratch
        retry = retried[t.number]
        record = json.loads((sweep_dir / f"trial-{retry.number:04d}" / "trial.json").read_text())
        assert record["retry_of"] == t.number and record["resumed_from"], record
        assert grid_point(retry.params) == grid_point(t.params)
        fit_log = (sweep_dir / f"trial-{retry.number:04d}" / "fit.log").read_text()
        assert "Restoring states from the checkpoint path" in fit_log
        rows = read_jsonl(sweep_dir / f"trial-{retry.number:04d}" / "metrics.jsonl")
        val_steps = [r["global_step"] for r in rows if "val/transfer_score" in r]
        # the base model's validation at step 0, then the killed trial's at step 10
        assert val_steps[:2] == [0, 10], "the retry's metrics log starts with the killed trial's validations"
        assert f"trial-{t.number:04d}" in killed_at
        assert (
            json.loads((sweep_dir / f"trial-{t.number:04d}" / "trial.json").read_text())["status"] == "failed"
        )

    rows = csv_rows(results, "kill")
    assert sorted(r["status"] for r in rows) == ["complete"] * 4 + ["failed"] * 3
    for r in rows:
        if r["status"] == "failed":
            assert r["retried_as"] and "no heartbeat" in r["error"]
        else:
            assert Path(r["checkpoint"]).is_file()
            for key in ("position", "count"):
                assert (
                    0
                    <= float(r[f"sampled_{key}_ci_low"])
                    <= float(r[f"sampled_{key}_accuracy"])
                    <= float(r[f"sampled_{key}_ci_high"])
                )
                assert r[f"sampled_{key}_delta"] != "" and r[f"sampled_base_{key}_accuracy"] != ""


# ---- a failing trial ----------------------------------------------------------------------------
def test_a_trial_that_raises_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path, demo_data, base_eval):
    space = tiny_space(tmp_path, demo_data, fixed={"trainer.max_steps": 10},
                       parameters={"lora_r": [4], "learning_rate": [-1.0, 1.0e-3]})
    results = tmp_path / "results"
    with_base(results, "fails", base_eval)
    # W&B on (offline: no credentials in this HOME) to see each trial's run grouped by study
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "NETRC")}
    env["HOME"] = str(tmp_path / "home")
    p = run_sweep(*sweep_argv(space, "fails", results), env=env)
    assert p.returncode == 0, p.stdout + p.stderr

    rows = {float(r["learning_rate"]): r for r in csv_rows(results, "fails")}
    bad, good = rows[-1.0], rows[1.0e-3]
    assert bad["status"] == "failed"
    assert bad["error"] == "model.learning_rate: must be > 0, got -1.0 (set by --model.learning_rate)"
    assert bad["sampled_position_accuracy"] == "" and bad["checkpoint"] == ""
    record = json.loads((Path(bad["run_dir"]) / "trial.json").read_text())
    assert (record["status"], record["error"]) == ("failed", bad["error"])
    assert good["status"] == "complete" and good["sampled_position_accuracy"] != ""
    assert (Path(good["run_dir"]) / "adapter" / "adapter_config.json").is_file()
    assert (Path(good["run_dir"]) / "eval" / "sampled" / "compare.json").is_file()
    assert (Path(good["run_dir"]) / "fit.yaml").is_file()

    # the study itself says what ran and how it ended (Optuna's dashboard / trials_dataframe)
    study = load(results, "fails")
    assert study.metric_names == ["val/transfer_score"]
    attrs = study.user_attrs
    # budget: the 2-point grid caps the 4 trials of configs/sweeps/tiny.yaml
    assert (attrs["sampler"], attrs["pruner"], attrs["budget_trials"], attrs["space_file"]) == (
        "grid",
        "none",
        2,
        str(space),
    )
    assert attrs["space"]["parameters"] == {"lora_r": [4], "learning_rate": [-1.0, 1.0e-3]}
    t_good = next(t for t in study.get_trials() if t.number == int(good["number"]))
    assert t_good.user_attrs["run_dir"] == f"trial-{t_good.number:04d}"  # relative to the study directory
    assert (results / "sweeps" / "fails" / t_good.user_attrs["checkpoint"]).is_file()
    assert t_good.user_attrs["steps_trained"] == 10
    metrics = json.loads((Path(good["run_dir"]) / "eval" / "sampled" / "metrics.json").read_text())
    assert t_good.user_attrs["test_sampled"] == {
        k: metrics[k] for k in ("position_accuracy", "count_accuracy", "transfer_score")
    }
    t_bad = next(t for t in study.get_trials() if t.number == int(bad["number"]))
    assert "test_sampled" not in t_bad.user_attrs and "steps_trained" not in t_bad.user_attrs

    from test_training import wandb_records

    (run_dir,) = (Path(good["run_dir"]) / "wandb").glob("offline-run-*")
    (run,) = [
        r.run
        for r in wandb_records(next(run_dir.glob("run-*.wandb")))
        if r.WhichOneof("record_type") == "run"
    ]
    assert (run.run_group, run.display_name) == ("fails", f"fails-trial-{int(good['number']):04d}")


# ---- many workers on one PostgreSQL study -------------------------------------------------------
@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server from .ci/postgres.sh (installed with apt-get if missing)."""
    pg_dir = tempfile.mkdtemp(prefix="spellxfer-pg-")
    p = subprocess.run(
        [str(REPO / ".ci" / "postgres.sh"), pg_dir], capture_output=True, text=True, timeout=600
    )
    if p.returncode != 0:
        pytest.skip(
            f"PostgreSQL could not be installed or started (.ci/postgres.sh): {p.stderr.strip()[-300:]}"
        )
    yield p.stdout.strip().splitlines()[-1]
    subprocess.run([str(REPO / ".ci" / "postgres.sh"), "stop", pg_dir], capture_output=True, timeout=120)
    shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql_split_the_trials_without_running_any_twice(
    tmp_path, demo_data, base_eval, postgres_url
):
    space = tiny_space(tmp_path, demo_data, fixed={"trainer.max_steps": 10})
    results = tmp_path / "results"
    with_base(results, "pg", base_eval)
    argv = sweep_argv(space, "pg", results, "--storage", postgres_url)
    # two processes at once, as on two machines: the same command, the same storage
    procs = [
        subprocess.Popen(
            argv, cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(outputs)

    trials = [
        t for t in load(results, "pg", postgres_url).get_trials() if not t.user_attrs.get("over_budget")
    ]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert sorted(grid_point(t.params) for t in trials) == sorted(TINY_GRID)
    sweep_dir = results / "sweeps" / "pg"  # run_dir is stored relative to it
    workers = {
        json.loads((sweep_dir / t.user_attrs["run_dir"] / "trial.json").read_text())["worker"] for t in trials
    }
    assert len({w.split("/")[0] for w in workers}) == 2, f"one process ran every trial: {workers}"
    assert sorted(r["status"] for r in csv_rows(results, "pg")) == ["complete"] * 4


# ---- the space file -----------------------------------------------------------------------------
BAD_SPACES = {
    "unknown-hyperparameter": (
        {"parameters": {"lora_rank": [4, 8]}},
        "parameters.lora_rank",
        "unknown hyperparameter",
    ),
    "empty-values": ({"parameters": {"lora_r": []}}, "parameters.lora_r", "empty list"),
    "inverted-range": (
        {"parameters": {"learning_rate": {"low": 1.0e-3, "high": 1.0e-4}}},
        "parameters.learning_rate",
        "inverted",
    ),
    "not-a-position-count-metric": ({"objective": "val/loss"}, "objective", "not a position / count metric"),
    "spelling-objective": (
        {"objective": "val/spelling_accuracy"},  # spellxfer-check: allow
        "objective",
        "not a position / count metric",
    ),
    "zero-validate-every": ({"validate_every_steps": 0}, "validate_every_steps", "integer ≥ 1"),
    "validate-every-and-interval": (
        {"validate_every_steps": 5, "fixed": {"trainer.val_check_interval": 5}},
        "fixed.trainer.val_check_interval",
        "keep one",
    ),
    "zero-pack": ({"pack": 0}, "pack", "integer ≥ 1"),
}


@pytest.mark.parametrize("case", BAD_SPACES, ids=list(BAD_SPACES))
def test_an_invalid_space_file_is_one_error_line_naming_file_and_key(case, tmp_path, capsys):
    change, key, words = BAD_SPACES[case]
    raw = yaml.safe_load((REPO / "configs/sweeps/tiny.yaml").read_text()) | change
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = main(["sweep", "--space", str(path), "--study", "bad", "--results_dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert (
        lines[0].startswith("error:")
        and str(path) in lines[0]
        and f"{key}:" in lines[0]
        and words in lines[0]
    )
    assert not (tmp_path / "results").exists()  # nothing written


def test_the_shipped_space_files_load_and_the_seed_grid_is_the_seeds_exact_space(monkeypatch):
    monkeypatch.chdir(REPO)  # base configs are relative to the working directory, as for `fit`
    for path in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        load_space(path.relative_to(REPO))
        text = path.read_text()
        assert "trained on spelling, evaluated on position and count only" in text.lower(), path
        for line in text.splitlines():  # every key carries a comment
            if re.match(r"\s*[a-z_.]+:", line):
                assert "#" in line, f"{path.name}: no comment on {line.strip()!r}"
    seed = yaml.safe_load((REPO / "configs/sweeps/seed_grid.yaml").read_text())["parameters"]
    assert seed == {"lora_r": [4, 8, 16, 32], "lora_alpha": [8, 16, 32, 64],
                    "learning_rate": [1e-4, 2e-4, 5e-4, 1e-3], "batch_size": [4, 8, 16, 32],
                    "accumulate_grad_batches": [1, 2, 4, 8], "max_steps": [500, 1000, 2000, 5000]}


def test_the_grid_sampler_draws_trials_one_at_a_time_from_the_4096_point_seed_grid(monkeypatch):
    monkeypatch.chdir(REPO)
    space = load_space("configs/sweeps/seed_grid.yaml")
    assert space.grid_size() == 4096
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space, "grid"))
    study.optimize(lambda t: len(space.suggest(t)), n_trials=5)
    assert len(study.trials) == 5  # nothing queued beyond the trials asked for
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 5


def test_validate_every_steps_validates_each_trial_at_the_same_optimizer_steps_whatever_its_accumulation(
    monkeypatch, tmp_path
):
    """Lightning counts val_check_interval in micro-batches: without the scaling, a trial with 8×
    accumulation would validate 8× as often per optimizer step, and early-stop 8× sooner."""
    from spellxfer.sweep.trial import SweepContext, fit_argv

    monkeypatch.chdir(REPO)
    space = load_space("configs/sweeps/smollm2_h100.yaml")
    assert space.validate_every_steps == 25
    ctx = SweepContext(space=space, study="s", sweep_dir=tmp_path, model="smollm2-135m", test_files=[],
                       wandb=False, over_budget=lambda t: False, progress=lambda *a, **k: None)
    for accumulate, interval in ((1, 25), (2, 50), (8, 200)):
        params = {p.name: p.values[0] for p in space.parameters} | {"accumulate_grad_batches": accumulate}
        argv = fit_argv(ctx, tmp_path / "trial-0000", params, None, 0)
        assert argv[argv.index("--trainer.val_check_interval") + 1] == str(interval)
        assert argv[argv.index("--trainer.accumulate_grad_batches") + 1] == str(accumulate)
    # without accumulation among the parameters, the base config's value scales it
    space = replace(
        space, parameters=tuple(p for p in space.parameters if p.name != "accumulate_grad_batches")
    )
    assert space.val_check_interval({}) == 25  # configs/smollm2_h100.yaml: accumulate_grad_batches 1
    assert (
        replace(space, validate_every_steps=None).val_check_interval({"accumulate_grad_batches": 4}) is None
    )


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_draws_depend_only_on_the_study_seed_and_trial_number(sampler, monkeypatch):
    monkeypatch.chdir(REPO)
    space = load_space("configs/sweeps/demo.yaml")

    def draws(seed: int) -> list[dict]:
        study = optuna.create_study(
            direction="maximize", sampler=make_sampler(replace(space, seed=seed), sampler)
        )
        study.optimize(lambda t: sum(float(v) for v in space.suggest(t).values()), n_trials=4)
        return [t.params for t in study.trials]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    assert len({tuple(sorted(p.items())) for p in draws(0)}) > 1  # consecutive trials differ


@pytest.mark.parametrize("study", ["../outside", "a/b", "..", ""])
def test_a_study_name_that_could_leave_its_folder_is_refused(study, tmp_path, capsys):
    rc = main(["sweep", "--space", str(REPO / "configs/sweeps/tiny.yaml"), "--study", study,
               "--results_dir", str(tmp_path / "results")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --study") and repr(study) in lines[0]
    assert not (tmp_path / "results").exists()


def test_the_metrics_reader_follows_a_rewritten_log_from_its_start(tmp_path):
    """A resumed fit rewrites metrics.jsonl without the rows past its resume point (a new file
    renamed into place); the sweep's reader must start that file again, not seek into its middle."""
    from spellxfer.core.outputs import atomic_file
    from spellxfer.sweep.trial import read_rows

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": float(s)} for s in (5, 10, 15, 20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2')  # a line still being written
    offset, got = read_rows(path, None)
    assert got == rows
    with atomic_file(path) as f:  # what WhitelistedCSVLogger.discard_from(10) does
        f.writelines(json.dumps(r) + "\n" for r in rows[:2])
    with open(path, "a") as f:
        f.write(json.dumps({"step": 15, "train/loss": 1.5}) + "\n")
    offset, got = read_rows(path, offset)
    assert got == [*rows[:2], {"step": 15, "train/loss": 1.5}]
    assert read_rows(path, offset)[1] == []
