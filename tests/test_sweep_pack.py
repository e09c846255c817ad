"""Packed sweeps end to end on tiny-qwen3 (``sweep --pack K``), float32 on a CPU.

What packing promises: K trials trained together in one process on one base model end exactly
where each ends trained alone — the same final LoRA weights, step counts, validation rows,
checkpoints and test replies — whatever their ranks, batch sizes and accumulations; a trial that
fails (a non-finite loss, a config value its fit refuses) ends alone and changes nothing for its
pack-mates; a packed sweep SIGKILLed mid-pack and run again resumes each trial from its own last
checkpoint and finishes each exactly once; and the trial directories are the unpacked sweep's.
Trained on spelling, evaluated on position and count only.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import REPO, read_jsonl
from optuna.trial import TrialState
from safetensors.torch import load_file
from test_sweep import TINY_GRID, csv_rows, grid_point, load, quiet_env, run_sweep, sweep_argv, tiny_space

import spellxfer.bench.sweep as bench_sweep_module
from spellxfer.cli import main

GREEDY = {"decodings": ["greedy"]}  # deterministic test replies, comparable reply for reply
# Trials that differ in every dimension a pack must keep apart (rank, alpha, dropout, LR, batch,
# accumulation), one whose loss turns non-finite (a learning rate of 1e30 blows its weights up
# after one step) and one its fit refuses.
MIXED_SPACE = {
    "lora_r": [4, 16],
    "lora_alpha": [8, 32],
    "lora_dropout": [0.0, 0.1],
    "learning_rate": [-1.0, 1.0e-3, 3.0e-3, 1.0e30],
    "batch_size": [4, 8],
    "accumulate_grad_batches": [1, 3],
}
A = {
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "learning_rate": 3.0e-3,
    "batch_size": 8,
    "accumulate_grad_batches": 1,
}
B = {
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "learning_rate": 1.0e-3,
    "batch_size": 4,
    "accumulate_grad_batches": 3,
}
DIVERGES = A | {"learning_rate": 1.0e30}
REFUSED = A | {"learning_rate": -1.0}


@pytest.fixture(scope="module")
def greedy_base(tmp_path_factory, demo_data) -> Path:
    """The base model's greedy test evaluation, made once and copied into each study."""
    from rich.console import Console

    from spellxfer.sweep.run import base_settings, prepare_data_and_base
    from spellxfer.sweep.space import load_space

    out = tmp_path_factory.mktemp("base")
    space = load_space(tiny_space(out, demo_data, **GREEDY))
    model, data = base_settings(space)
    prepare_data_and_base(space, model, data, out / "study", Console(quiet=True))
    return out / "study" / "base"


def packed_sweep(tmp: Path, study: str, space: Path, base: Path, *extra: str, env=None, enqueue=()) -> Path:
    """Run ``sweep`` (with ``extra`` flags) to its end; returns the study directory."""
    results = tmp / "results"
    shutil.copytree(base, results / "sweeps" / study / "base")
    if enqueue:  # exact trials instead of sampled ones, in this order
        st = optuna.create_study(study_name=study, storage=f"sqlite:///{results / 'sweeps' / f'{study}.db'}",
                                 direction="maximize")
        for params in enqueue:
            st.enqueue_trial(params)
    p = run_sweep(*sweep_argv(space, study, results, *extra), env=env, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return results / "sweeps" / study


def trials_by_params(study_dir: Path) -> dict[tuple, Path]:
    out = {}
    for run in sorted(study_dir.glob("trial-*")):
        record = json.loads((run / "trial.json").read_text())
        if record["status"] == "complete":
            out[tuple(sorted(record["params"].items()))] = run
    return out


def val_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if any(k.startswith("val/") for k in r)]


def pack_steps(study_dir: Path) -> int:
    return sum(json.loads(p.read_text())["steps"] for p in (study_dir / "pack-stats").glob("*.json"))


def assert_same_training(run: Path, ref: Path, tol: float = 1e-4) -> None:
    """``run`` ended where ``ref`` ended: weights, steps, validations, checkpoints, test replies."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    want = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == want["global_step"] and ckpt["epoch"] == want["epoch"]
    assert ckpt["state_dict"].keys() == want["state_dict"].keys()
    for k, v in want["state_dict"].items():
        assert torch.allclose(ckpt["state_dict"][k], v, atol=tol, rtol=0), k
    adapter, want_adapter = (
        load_file(run / "adapter" / "adapter_model.safetensors"),
        load_file(ref / "adapter" / "adapter_model.safetensors"),
    )
    assert adapter.keys() == want_adapter.keys()
    assert all(torch.allclose(adapter[k], v, atol=tol, rtol=0) for k, v in want_adapter.items())
    assert val_rows(run) == val_rows(ref) and val_rows(run)  # accuracies: exact fractions
    names = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert names == {p.name for p in (ref / "checkpoints").glob("*.ckpt")}
    record, want_record = (
        json.loads((run / "trial.json").read_text()),
        json.loads((ref / "trial.json").read_text()),
    )
    assert record["objective"] == pytest.approx(want_record["objective"])
    assert Path(record["checkpoint"]).name == Path(want_record["checkpoint"]).name
    outputs = [r["output"] for r in read_jsonl(run / "eval" / "greedy" / "predictions.jsonl")]
    assert outputs == [r["output"] for r in read_jsonl(ref / "eval" / "greedy" / "predictions.jsonl")]


def assert_rows_close(rows: list[dict], ref: list[dict]) -> None:
    """The same metrics.jsonl rows (steps, keys; losses within float32 noise); throughput is the
    wall clock's, not the run's."""
    assert len(rows) == len(ref)
    for row, want in zip(rows, ref):
        assert row.keys() == want.keys()
        for k, v in want.items():
            if k != "train/tokens_per_second":
                assert row[k] == pytest.approx(v, rel=1e-5), (k, row, want)


def test_a_packs_trials_load_one_tokenizer_and_tokenize_their_data_once(tmp_path, demo_data, monkeypatch):
    """Loading Qwen3's tokenizer was most of a packed trial's start: trials of one pack share it."""
    import spellxfer.training.datamodule as datamodule
    from spellxfer.training.packed_trial import PackedTrial

    real, loads = datamodule.load_tokenizer, []

    def counting(name):
        loads.append(name)
        return real(name)

    monkeypatch.setattr(datamodule, "load_tokenizer", counting)

    cache, trials = {}, []
    for i, batch_size in enumerate((4, 8)):
        run = tmp_path / f"t{i}"
        argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--data.data_dir", str(demo_data),
                "--data.batch_size", str(batch_size), "--trainer.default_root_dir", str(run),
                "--trainer.logger", "false"]
        trial = PackedTrial(f"t{i}", argv, run, None, lambda line: None)
        trial.setup_data(cache)
        trials.append(trial)
    a, b = trials
    assert loads == ["tiny-qwen3"]
    assert a.dm.tokenizer is b.dm.tokenizer and a.dm.train_examples is b.dm.train_examples
    # each trial still batches its own way, padded with the shared tokenizer's pad id
    assert a.num_batches > b.num_batches > 0
    batch = next(iter(b.dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    assert (batch["input_ids"][batch["attention_mask"] == 0] == b.dm.tokenizer.pad_token_id).all()


# ---- the tiny grid: four at once against one at a time --------------------------------------------
@pytest.fixture(scope="module")
def grid(tmp_path_factory, demo_data, greedy_base) -> dict[str, Path]:
    runs = {}
    for pack in (4, 1):
        tmp = tmp_path_factory.mktemp(f"pack{pack}")
        space = tiny_space(tmp, demo_data, **GREEDY)
        runs[pack] = packed_sweep(tmp, f"pack{pack}", space, greedy_base, "--pack", str(pack))
    return runs


def test_the_tiny_grid_packed_four_at_once_trains_each_trial_as_it_trains_one_at_a_time(grid):
    four, one = trials_by_params(grid[4]), trials_by_params(grid[1])
    assert sorted(grid_point(dict(k)) for k in four) == sorted(TINY_GRID) and four.keys() == one.keys()
    # four trials of 30 micro-batches: 30 packed steps at once, 120 one at a time
    assert (pack_steps(grid[4]), pack_steps(grid[1])) == (30, 120)
    for params, run in four.items():
        assert_same_training(run, one[params])
        assert json.loads((run / "trial.json").read_text())["pack"]["slots"] == 4
    rows = csv_rows(grid[4].parents[1], "pack4")
    assert sorted(r["status"] for r in rows) == ["complete"] * 4
    assert all(r["greedy_position_delta"] != "" and Path(r["checkpoint"]).is_file() for r in rows)
    for t in load(grid[4].parents[1], "pack4").get_trials():  # what the pack tells the study: as unpacked
        run = grid[4] / t.user_attrs["run_dir"]
        assert t.user_attrs["steps_trained"] == 30 and (grid[4] / t.user_attrs["checkpoint"]).is_file()
        metrics = json.loads((run / "eval" / "greedy" / "metrics.json").read_text())
        assert t.user_attrs["test_greedy"]["position_accuracy"] == metrics["position_accuracy"]


@pytest.mark.slow
def test_a_packed_trial_is_the_unpacked_sweeps_fit_to_the_weight_and_the_logged_row(
    tmp_path, demo_data, greedy_base, grid
):
    """The unpacked sweep runs each trial as its own `fit` process under Lightning's loop; the pack
    reproduces that loop (batches, accumulation, schedule, validation, top-k, early-stopping state)."""
    space = tiny_space(tmp_path, demo_data, **GREEDY)
    unpacked = trials_by_params(packed_sweep(tmp_path, "unpacked", space, greedy_base))
    for params, run in trials_by_params(grid[4]).items():
        ref = unpacked[params]
        assert_same_training(run, ref)
        assert_rows_close(read_jsonl(run / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl"))
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        want = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["lr_schedulers"] == want["lr_schedulers"]
        assert ckpt["loops"]["fit_loop"] == want["loops"]["fit_loop"]
        assert ckpt["SpellingDataModule"] == want["SpellingDataModule"]
        for key, state in want["callbacks"].items():  # same monitors, scores and top-k, other directory
            got = ckpt["callbacks"][key]
            assert {
                k: v for k, v in got.items() if "path" not in k and k not in ("dirpath", "best_k_models")
            } == {k: v for k, v in state.items() if "path" not in k and k not in ("dirpath", "best_k_models")}
            assert sorted(Path(p).name for p in got.get("best_k_models", {})) == sorted(
                Path(p).name for p in state.get("best_k_models", {})
            )
        def config(path: Path) -> str:  # the same fit config, but for the directory and the study's name
            return re.sub(
                r"^experiment: .*$",
                "experiment: S",
                path.read_text().replace(str(path.parent), "RUN"),
                flags=re.M,
            )

        assert config(run / "fit.yaml") == config(ref / "fit.yaml")


# ---- the test evaluation: generation and the likelihood probe, as `evaluate` writes them ---------
def test_a_packed_trials_test_evaluation_has_the_likelihood_probe_of_its_unpacked_evaluate(
    tmp_path, demo_data, greedy_base
):
    """The space's evaluation scores both ways by default (`evaluate --scoring both`). By default
    (`--pack_evaluation exact`) the pack runs `evaluate`'s own code on each finished trial: the
    same predictions and metrics as the unpacked trial's `evaluate` process, to the last digit;
    with `--pack_scorers 2` that `evaluate` process itself scores them while the pack trains on.
    With `--pack_evaluation packed` it probes its finished trials in one pass, each row through
    its own trial's adapter, and writes the probe's answers, metrics and CSV columns the unpacked
    trial's `evaluate` writes (to float rounding)."""
    two = [{"lora_r": 4, "learning_rate": 3.0e-3}, {"lora_r": 8, "learning_rate": 1.0e-3}]

    def space(tmp: Path) -> Path:
        return tiny_space(
            tmp,
            demo_data,
            fixed={"trainer.max_steps": 6},
            sampler="random",
            validate_every_steps=3,
            budget={"trials": 2},
            **GREEDY,
        )

    packed_tmp, unpacked_tmp, exact_tmp = tmp_path / "packed", tmp_path / "unpacked", tmp_path / "exact"
    packed_tmp.mkdir(), unpacked_tmp.mkdir(), exact_tmp.mkdir()
    packed = packed_sweep(
        packed_tmp,
        "probe-packed",
        space(packed_tmp),
        greedy_base,
        "--pack",
        "2",
        "--pack_evaluation",
        "packed",
        enqueue=two,
    )
    unpacked = packed_sweep(unpacked_tmp, "probe-unpacked", space(unpacked_tmp), greedy_base, enqueue=two)
    exact = packed_sweep(exact_tmp, "probe-exact", space(exact_tmp), greedy_base, "--pack", "2", enqueue=two)
    scorers_tmp = tmp_path / "scorers"
    scorers_tmp.mkdir()
    scorers = packed_sweep(
        scorers_tmp, "probe-scorers", space(scorers_tmp), greedy_base, "--pack", "2", "--pack_scorers", "2",
        enqueue=two,
    )
    [stats] = [json.loads(p.read_text()) for p in (scorers / "pack-stats").glob("*.json")]
    assert stats["scorers"] == 2 and stats["scored_in_background"] == 2
    in_pack = [json.loads(p.read_text()) for p in (exact / "pack-stats").glob("*.json")]
    assert [st["scored_in_background"] for st in in_pack] == [0]
    exact_runs, scorer_runs = trials_by_params(exact), trials_by_params(scorers)
    assert len(scorer_runs) == 2
    unpacked_pairs = trials_by_params(unpacked).items()
    pairs = [(ref, runs[params]) for runs in (exact_runs, scorer_runs) for params, ref in unpacked_pairs]
    for ref, run in pairs:
        got = json.loads((run / "eval" / "greedy" / "metrics.json").read_text())
        want = json.loads((ref / "eval" / "greedy" / "metrics.json").read_text())
        assert {k: v for k, v in got.items() if k != "run"} == {k: v for k, v in want.items() if k != "run"}
        assert got["run"]["adapter"] == str(run / "adapter")
        assert got["run"]["batch_size"] == want["run"]["batch_size"]
        assert read_jsonl(run / "eval" / "greedy" / "predictions.jsonl") == read_jsonl(
            ref / "eval" / "greedy" / "predictions.jsonl"
        )
        compare = json.loads((run / "eval" / "greedy" / "compare.json").read_text())
        want_compare = json.loads((ref / "eval" / "greedy" / "compare.json").read_text())
        for key in ("n_common_items", "method", "groups", "likelihood_groups"):
            assert compare[key] == want_compare[key], key
    base = json.loads((greedy_base / "greedy" / "metrics.json").read_text())
    # the base model's, shared by both
    assert base["scoring"] == "both" and "position_likelihood_accuracy" in base
    packed_runs, unpacked_runs = trials_by_params(packed), trials_by_params(unpacked)
    assert packed_runs.keys() == unpacked_runs.keys() and len(packed_runs) == 2
    csv_packed = {grid_point(r): r for r in csv_rows(packed.parents[1], "probe-packed")}
    csv_unpacked = {grid_point(r): r for r in csv_rows(unpacked.parents[1], "probe-unpacked")}
    for params, run in packed_runs.items():
        ref = unpacked_runs[params]
        got = json.loads((run / "eval" / "greedy" / "metrics.json").read_text())
        want = json.loads((ref / "eval" / "greedy" / "metrics.json").read_text())
        assert got.keys() == want.keys() and got["scoring"] == want["scoring"] == "both"
        assert got["run"].keys() - {"packed_trials"} == want["run"].keys()
        assert got["run"]["likelihood"]["path"] == want["run"]["likelihood"]["path"]
        for key in [k for k in want if "likelihood" in k]:
            assert got[key] == pytest.approx(want[key], abs=1e-4), key
        for sub, v in want["subtasks"].items():
            assert got["subtasks"][sub]["likelihood"]["accuracy"] == pytest.approx(
                v["likelihood"]["accuracy"], abs=1e-4
            )
            assert got["subtasks"][sub]["likelihood"]["gold_mean_logprob"] == pytest.approx(
                v["likelihood"]["gold_mean_logprob"], abs=1e-4)
        rows = read_jsonl(run / "eval" / "greedy" / "predictions.jsonl")
        want_rows = read_jsonl(ref / "eval" / "greedy" / "predictions.jsonl")
        assert len(rows) == len(want_rows) == 16
        for row, w in zip(rows, want_rows):
            assert row.keys() == w.keys()
            assert (row["likelihood_answer"], row["likelihood_correct"], row["gold_rank"]) == \
                   (w["likelihood_answer"], w["likelihood_correct"], w["gold_rank"])
            assert row["gold_logprob"] == pytest.approx(w["gold_logprob"], abs=1e-4)
            assert (row["prompt"], row["likelihood_prompt"], row["output"]) == (
                w["prompt"],
                w["likelihood_prompt"],
                w["output"],
            )
        row, w = csv_packed[grid_point(dict(params))], csv_unpacked[grid_point(dict(params))]
        assert row["greedy_position_likelihood_accuracy"] != "" and row.keys() == w.keys()
        for col in [c for c in w if "likelihood" in c and w[c] != ""]:
            assert float(row[col]) == pytest.approx(float(w[col]), abs=1e-4), col


# ---- mixed trials and failures in one pack -------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(tmp_path_factory, demo_data, greedy_base) -> dict[str, Path]:
    """A and B one at a time, and A, DIVERGES, B, REFUSED in packs of three (REFUSED refills the slot
    that DIVERGES leaves)."""
    def space(tmp: Path, trials: int) -> Path:
        return tiny_space(
            tmp,
            demo_data,
            fixed={"trainer.max_steps": 12},
            parameters=MIXED_SPACE,
            sampler="random",
            validate_every_steps=4,
            budget={"trials": trials},
            **GREEDY,
        )

    alone_tmp, pack_tmp, window_tmp, oom_tmp = (
        tmp_path_factory.mktemp(n) for n in ("alone", "mixed", "window", "oom")
    )
    return {
        "alone": packed_sweep(
            alone_tmp, "alone", space(alone_tmp, 2), greedy_base, "--pack", "1", enqueue=[A, B]
        ),
        "packed": packed_sweep(
            pack_tmp,
            "mixed",
            space(pack_tmp, 4),
            greedy_base,
            "--pack",
            "3",
            enqueue=[A, DIVERGES, B, REFUSED],
        ),
        "window": packed_sweep(
            window_tmp,
            "window",
            space(window_tmp, 2),
            greedy_base,
            "--pack",
            "2",
            "--pack_window",
            "true",
            enqueue=[A, B],
        ),
        # the same windows on a "card" where a pass of more than 2 micro-batches runs out of memory
        "window_oom": packed_sweep(
            oom_tmp,
            "window-oom",
            space(oom_tmp, 2),
            greedy_base,
            "--pack",
            "2",
            "--pack_window",
            "true",
            env=quiet_env(SPELLXFER_TEST_OOM_ABOVE="2"),
            enqueue=[A, B],
        ),
    }


def test_trials_of_other_rank_batch_size_and_accumulation_train_in_one_pack_as_they_train_alone(mixed):
    packed, alone = trials_by_params(mixed["packed"]), trials_by_params(mixed["alone"])
    assert packed.keys() == alone.keys() == {tuple(sorted(A.items())), tuple(sorted(B.items()))}
    for params, run in packed.items():
        assert_same_training(run, alone[params])
    b = torch.load(packed[tuple(sorted(B.items()))] / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        b["global_step"] == 12
        and b["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 36
    )
    # B's 36 micro-batches (12 steps × 3) set the pack's length: A's 12 and the others rode along
    assert (pack_steps(mixed["packed"]), pack_steps(mixed["alone"])) == (36, 12 + 36)


def test_a_pack_training_whole_accumulation_windows_per_step_ends_where_one_micro_batch_per_step_ends(mixed):
    """With --pack_window each step holds every trial's next optimizer step (B's 3 micro-batches
    beside A's one), so the pack takes 12 steps, not 36: the same batches, losses and updates."""
    window, alone = trials_by_params(mixed["window"]), trials_by_params(mixed["alone"])
    assert window.keys() == alone.keys()
    for params, run in window.items():
        assert_same_training(run, alone[params])
        assert_rows_close(read_jsonl(run / "metrics.jsonl"), read_jsonl(alone[params] / "metrics.jsonl"))
    assert pack_steps(mixed["window"]) == 12


def test_a_packed_pass_that_runs_out_of_memory_is_redone_in_parts_and_trains_as_one_pass_does(mixed):
    """Each window step holds A's micro-batch and B's three, one pass of four; the simulated card
    holds two. The pass is redone in parts (B's dropout seeds and accumulation kept), nothing fails,
    and both trials end where they end alone."""
    oom, alone = trials_by_params(mixed["window_oom"]), trials_by_params(mixed["alone"])
    assert oom.keys() == alone.keys()
    for params, run in oom.items():
        assert_same_training(run, alone[params])
        assert_rows_close(read_jsonl(run / "metrics.jsonl"), read_jsonl(alone[params] / "metrics.jsonl"))
        assert "ran out of memory; passes now hold up to" in (run / "fit.log").read_text()
    (stats,) = [json.loads(p.read_text()) for p in (mixed["window_oom"] / "pack-stats").glob("*.json")]
    assert stats["steps"] == 12 and stats["split_passes"] >= 1 and stats["pass_tokens"] > 0


def test_a_validation_pass_that_runs_out_of_memory_is_retried_in_small_batches_then_fails_its_trials_alone(
    tmp_path, demo_data, greedy_base
):
    """A validation pass that runs out of memory (simulated: the card holds a validation of one
    trial) is retried once in batches of 64 prompts; when that fails too, the pass's trials fail
    with the reason and the sweep goes on to its end instead of stopping (it used to stop)."""
    two = [{"lora_r": 4, "learning_rate": 3.0e-3}, {"lora_r": 8, "learning_rate": 1.0e-3}]
    space = tiny_space(
        tmp_path, demo_data, fixed={"trainer.max_steps": 6}, sampler="random", validate_every_steps=3,
        budget={"trials": 2}, **GREEDY,
    )
    study = packed_sweep(
        tmp_path, "val-oom", space, greedy_base, "--pack", "2",
        env=quiet_env(SPELLXFER_TEST_VALIDATION_OOM_ABOVE="1"), enqueue=two,
    )
    runs = sorted(study.glob("trial-*"))
    assert len(runs) == 2
    for run in runs:
        record = json.loads((run / "trial.json").read_text())
        assert record["status"] == "failed"
        assert record["error"].startswith("out of memory in validation beside 0 pack-mates (")
        log = (run / "fit.log").read_text()
        assert "a validation of 2 trials ran out of memory (batches: auto)" in log
        assert "a validation of 2 trials ran out of memory (batches: 64)" in log
        assert not (run / "adapter").exists()
    assert {t.state for t in load(tmp_path / "results", "val-oom").get_trials()} == {TrialState.FAIL}


def test_a_failing_trial_ends_alone_with_its_error_and_its_pack_mates_finish(mixed):
    rows = {
        (float(r["learning_rate"]), int(r["batch_size"])): r
        for r in csv_rows(mixed["packed"].parents[1], "mixed")
    }
    diverged, refused = rows[(1.0e30, 8)], rows[(-1.0, 8)]
    assert diverged["status"] == "failed" and re.fullmatch(
        r"loss is (nan|inf|-inf) at step \d+", diverged["error"]
    )
    assert refused["status"] == "failed"
    assert refused["error"] == "model.learning_rate: must be > 0, got -1.0 (set by --model.learning_rate)"
    assert [r["status"] for r in rows.values()].count("complete") == 2
    for r in (diverged, refused):
        record = json.loads((Path(r["run_dir"]) / "trial.json").read_text())
        assert (record["status"], record["error"]) == ("failed", r["error"])
        assert not (Path(r["run_dir"]) / "adapter").exists() and r["greedy_position_accuracy"] == ""
        assert f"error: {r['error']}" in (Path(r["run_dir"]) / "fit.log").read_text()


# ---- killed mid-pack, run again -------------------------------------------------------------------
def test_a_packed_sweep_killed_mid_pack_resumes_each_trial_from_its_own_checkpoint_and_finishes_each_once(
    tmp_path, demo_data, greedy_base, grid
):
    space, results = tiny_space(tmp_path, demo_data, **GREEDY), tmp_path / "results"
    shutil.copytree(greedy_base, results / "sweeps" / "kill" / "base")
    argv = sweep_argv(space, "kill", results, "--pack", "2")
    # dies right after the first trial of the pack writes its step-20 last.ckpt: its pack-mate's
    # newest checkpoint is still step 10's
    p = subprocess.run(argv, cwd=REPO, env=quiet_env(SPELLXFER_TEST_KILL_AT="saved:last.ckpt@20"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stdout[-2000:] + p.stderr[-2000:]
    killed = [r for r in sorted((results / "sweeps" / "kill").glob("trial-*"))
              if json.loads((r / "trial.json").read_text())["status"] == "running"]
    assert len(killed) == 2

    p = run_sweep(*argv, timeout=1800)  # the same command again
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    trials = load(results, "kill").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(grid_point(t.params) for t in complete) == sorted(TINY_GRID)  # each point once
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == sorted(int(r.name.split("-")[1]) for r in killed)
    retried = {t.system_attrs["retry_history"][-1]: t for t in trials if t.system_attrs.get("retry_history")}
    resumed_at = []
    for t in failed:
        run = results / "sweeps" / "kill" / f"trial-{retried[t.number].number:04d}"
        record = json.loads((run / "trial.json").read_text())
        assert record["retry_of"] == t.number and record["resumed_from"]
        resumed_at += [
            int(s)
            for s in re.findall(
                r"Restoring states from the checkpoint path .* \(step (\d+)\)", (run / "fit.log").read_text()
            )
        ]
        # each validation logged once (step 0: the base model)
        assert [r["step"] for r in val_rows(run)] == [0, 10, 20, 30]
    assert sorted(resumed_at) == [10, 20]
    uninterrupted = trials_by_params(grid[4])
    for params, run in trials_by_params(results / "sweeps" / "kill").items():
        assert_same_training(run, uninterrupted[params])


def test_a_packed_sweep_interrupted_while_scorers_run_queues_their_trials_and_the_rerun_finishes_each_once(
    tmp_path, demo_data, greedy_base
):
    """With `--pack_scorers`, finished trials are scored by `evaluate` processes beside the pack.
    Ctrl-C while one runs stops it (no process is left, no eval directory half-written), records
    its trial as interrupted and queues it; the same command again scores each trial exactly once."""
    space = tiny_space(
        tmp_path, demo_data, fixed={"trainer.max_steps": 6}, sampler="random", validate_every_steps=3,
        budget={"trials": 2}, **GREEDY,
    )
    results = tmp_path / "results"
    study_dir = results / "sweeps" / "scorers"
    shutil.copytree(greedy_base, study_dir / "base")
    argv = sweep_argv(space, "scorers", results, "--pack", "2", "--pack_scorers", "2")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=quiet_env(), stdout=log, stderr=subprocess.STDOUT,
            # Ctrl-C at a terminal: a test run started in the background (`cmd &` without job
            # control) ignores SIGINT, the sweep would inherit that, and Python keeps it ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            while proc.poll() is None and not any(
                "spellxfer evaluate" in p.read_text() for p in study_dir.glob("trial-*/eval.log")
            ):
                time.sleep(0.05)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=300)
        finally:
            proc.kill()
    records = [json.loads(p.read_text()) for p in sorted(study_dir.glob("trial-*/trial.json"))]
    assert rc == 130, (rc, [(r["status"], r.get("error")) for r in records],
                       (tmp_path / "first.log").read_text()[-3000:])
    scored = [r for r in sorted(study_dir.glob("trial-*")) if (r / "eval.log").exists()]
    interrupted = [r for r in scored if json.loads((r / "trial.json").read_text())["status"] == "failed"]
    assert interrupted
    for run in interrupted:
        record = json.loads((run / "trial.json").read_text())
        assert record["error"] == "interrupted (Ctrl-C or SIGTERM); retried on the next run"
        assert not (run / "eval" / "greedy" / "metrics.json").exists()
    assert subprocess.run(["pgrep", "-f", str(study_dir)], capture_output=True).returncode == 1

    p = run_sweep(*argv, timeout=1800)  # the same command again
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    trials = load(results, "scorers").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and len({tuple(sorted(t.params.items())) for t in complete}) == 2
    retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    assert {int(r.name.split("-")[1]) for r in interrupted} <= retried
    for t in complete:
        run = study_dir / f"trial-{t.number:04d}"
        assert json.loads((run / "eval" / "greedy" / "metrics.json").read_text())["scoring"] == "both"


# ---- what a pack refuses ---------------------------------------------------------------------------
def test_a_trainer_setting_the_pack_cannot_reproduce_fails_the_trial_with_the_reason(
    tmp_path, demo_data, greedy_base
):
    space = tiny_space(
        tmp_path, demo_data, fixed={"trainer.limit_train_batches": 0.5}, budget={"trials": 1}, **GREEDY
    )
    study = packed_sweep(tmp_path, "refused", space, greedy_base, "--pack", "2")
    (row,) = csv_rows(study.parents[1], "refused")
    assert row["status"] == "failed"
    assert row["error"] == ("--pack: not supported in packed trials: trainer.limit_train_batches 0.5; "
                            "run this sweep without --pack")


def test_a_pack_on_a_base_config_that_picks_unsloth_is_one_error_line_before_anything_runs(tmp_path, capsys):
    space = tiny_space(tmp_path, tmp_path / "data", fixed={"model.backend": "unsloth"})
    rc = main(
        [
            "sweep",
            "--space",
            str(space),
            "--study",
            "u",
            "--results_dir",
            str(tmp_path / "results"),
            "--pack",
            "4",
        ]
    )
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert (
        lines[0].startswith("error: --pack:") and "model.backend: hf" in lines[0] and str(space) in lines[0]
    )
    assert not (tmp_path / "results").exists()


def test_a_pack_with_validation_scoring_both_is_one_error_line_naming_the_option(tmp_path, capsys):
    space = tiny_space(tmp_path, tmp_path / "data", fixed={"model.scoring": "both"})
    rc = main(
        [
            "sweep",
            "--space",
            str(space),
            "--study",
            "s",
            "--results_dir",
            str(tmp_path / "results"),
            "--pack",
            "2",
        ]
    )
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --pack: model.scoring both") and str(space) in lines[0]
    assert not (tmp_path / "results").exists()


# ---- bench sweep -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_sweep_runs_the_same_trials_one_at_a_time_and_packed_and_records_how_long(
    tmp_path, demo_data, monkeypatch
):
    out = tmp_path / "sweep.json"
    args = [
        "bench",
        "sweep",
        "--model",
        "tiny-qwen3",
        "--trials",
        "2",
        "--max_steps",
        "4",
        "--validate_every_steps",
        "2",
        "--val_limit",
        "4",
        "--eval_limit",
        "4",
        "--data_dir",
        str(demo_data),
        "--out",
        str(out),
    ]
    assert (
        main(
            [*args, "--modes", "serial", "pack:2", "--kernel_steps", "1", "--work_dir", str(tmp_path / "w1")]
        )
        == 0
    )
    report = json.loads(out.read_text())
    modes = {m["spec"]: m for m in report["modes"]}
    assert modes.keys() == {"serial", "pack:2"}
    assert [m["complete"] for m in modes.values()] == [2, 2] and all(
        m["exit_code"] == 0 for m in modes.values()
    )
    assert all(m["makespan_s"] > 0 and m["trials_per_gpu_hour"] > 0 for m in modes.values())
    (stats,) = modes["pack:2"]["pack_stats"]
    assert stats["slots"] == 2 and stats["steps"] > 0 and stats["seconds"]["train"] > 0
    # where the test evaluations' time went, from each trial's evaluate record (one decoding each)
    for m in modes.values():
        ev = m["evaluation_seconds"]
        assert ev["evaluations"] == 2 and ev["load_s"] > 0 and ev["generate_s"] > 0
        assert ev["load_s"] + ev["generate_s"] + ev["probe_s"] <= ev["wall_s"] + 0.1
    # a pack's in-process scoring builds the base model once: its second trial finds it kept
    assert modes["serial"]["evaluation_seconds"]["kept_base_model"] == 0
    assert modes["pack:2"]["evaluation_seconds"]["kept_base_model"] == 1
    assert (
        len(report["trials"]) == 2
        and {"lora_r", "batch_size", "accumulate_grad_batches"} <= report["trials"][0]["params"].keys()
    )
    assert report["command"].startswith("python -m spellxfer bench sweep") and report["versions"]["torch"]
    assert "pack_vs_serial" in report["summary"]
    kernels = {k["kernel"]: k for k in report["kernels"]}
    assert kernels.keys() == {"loop", "concat", "grouped"}
    assert all(k["ms_per_step"] > 0 and k["max_loss_diff_vs_loop"] < 1e-4 for k in kernels.values())
    assert "pending_modes" not in report  # the JSON written after the first mode was replaced
    # another invocation appends its modes to the same JSON, written after each mode: one cut short
    # (a command time limit) before its last mode keeps the modes it finished and names the rest
    real_run_mode = bench_sweep_module.run_mode

    def cut_before_serial(mode, *a, **kw):
        if mode["spec"] == "serial@1":
            raise KeyboardInterrupt
        return real_run_mode(mode, *a, **kw)

    monkeypatch.setattr(bench_sweep_module, "run_mode", cut_before_serial)
    more = ["--modes", "pack:2:concat:window", "serial@1", "--kernel_steps", "0", "--append", "true"]
    more += ["--pack_scorers", "1"]
    assert main([*args, *more, "--work_dir", str(tmp_path / "w2")]) == 130  # "interrupted"
    report = json.loads(out.read_text())
    assert [m["spec"] for m in report["modes"]] == ["serial", "pack:2", "pack:2:concat:window"]
    assert report["pending_modes"] == ["serial@1"] and len(report["commands"]) == 2
    assert report["modes"][2]["complete"] == 2 and report["kernels"] == list(kernels.values())
    # its pack scored its finished trials in an evaluate process beside it
    (scored,) = report["modes"][2]["pack_stats"]
    assert report["modes"][2]["pack_scorers"] == 1 and scored["scored_in_background"] == 2
    assert "--pack_scorers 1" in report["commands"][1]


@pytest.mark.slow
def test_a_packed_trials_checkpoint_resumes_in_an_unpacked_fit(tmp_path, demo_data, greedy_base, grid):
    """Packed checkpoints are a fit's (state dict names, optimizer, schedule, loop counters, data
    position, callback states): a packed sweep killed mid-pack, run again *without* --pack, resumes
    each killed trial with `fit --ckpt_path` and ends where the uninterrupted pack ended."""
    space, results = tiny_space(tmp_path, demo_data, **GREEDY), tmp_path / "results"
    shutil.copytree(greedy_base, results / "sweeps" / "mixed-modes" / "base")
    argv = sweep_argv(space, "mixed-modes", results)
    p = subprocess.run(
        [*argv, "--pack", "2"],
        cwd=REPO,
        env=quiet_env(SPELLXFER_TEST_KILL_AT="saved:last.ckpt@20"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == -9, p.stdout[-2000:] + p.stderr[-2000:]
    p = run_sweep(*argv, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    retries = [r for r in sorted((results / "sweeps" / "mixed-modes").glob("trial-*"))
               if json.loads((r / "trial.json").read_text())["retry_of"] is not None]
    assert len(retries) == 2
    for run in retries:
        assert "Restoring states from the checkpoint path" in (run / "fit.log").read_text()
    uninterrupted = trials_by_params(grid[4])
    for params, run in trials_by_params(results / "sweeps" / "mixed-modes").items():
        assert_same_training(run, uninterrupted[params])


def test_scorers_beside_a_pack_get_a_share_of_the_card_sized_by_the_model():
    """Each `--pack_scorers` process is left a share of the card from the model's size (at least a
    tenth), the pack keeps the rest, and no more scorers run than leave the pack half the card: on
    2026-12-06 two scorers of a 4B-shaped model, sized from the card's free memory, ran an 80 GB
    H100 out of memory beside the pack."""
    from spellxfer.sweep.pack import PACK_MIN_FRACTION, SCORER_MEMORY_FRACTION, scorer_plan

    card = 79 * 2**30
    # SmolLM2-135M (0.27 GB of bf16 weights): a tenth each, all four run, the pack keeps 60%
    scorers, share, pack = scorer_plan(4, 270_000_000, card)
    assert (scorers, share) == (4, SCORER_MEMORY_FRACTION) and pack == pytest.approx(0.6)
    # Qwen3-4B (8.05 GB): each scorer needs its weights and room to generate, so only two fit
    scorers, share, pack = scorer_plan(4, 8_050_000_000, card)
    assert scorers == 2 and 8_050_000_000 < share * card < 16 * 2**30
    assert pack == pytest.approx(1 - 2 * share) and pack >= PACK_MIN_FRACTION
    # a model whose scorer needs more than half the card: none beside the pack
    none_fit = scorer_plan(2, 40 * 2**30, card)
    assert none_fit[0] == 0 and none_fit[2] == 1  # the pack scores in its own process, on the whole card
    # fewer requested than fit: as requested
    assert scorer_plan(1, 8_050_000_000, card)[0] == 1
