"""Several devices: a DDP fit, and validating its checkpoint on 1 and on 2 devices, on the CPU.

Two gloo processes stand in for two GPUs (``--trainer.accelerator cpu --trainer.devices 2
--trainer.strategy ddp``; Lightning relaunches the command once for rank 1). What a multi-GPU run
promises: validation items are sharded ``items[rank::world_size]`` and the metric is summed over
ranks, so every item is generated once and a checkpoint scores the same on 1 device and on 2; the
fit's rows start at step 0, count optimizer steps up to ``max_steps``, and appear once (rank 0
writes them); ``bench train --devices 1 2`` measures both counts in one run.

tiny-qwen3 has random weights: its generated replies score 0 everywhere, so the validations run
with ``scoring: both``, whose likelihood probe ranks candidates near chance — non-zero accuracies
that would move if an item were dropped, duplicated or left unsynced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, read_jsonl

from spellxfer.cli import main
from spellxfer.training.datamodule import SpellingDataModule

STEPS = 4
VAL_LIMIT = 5  # odd: rank 0 validates 3 items per task, rank 1 two
DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp")


def spellxfer(command: str, root: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m spellxfer <command>`` on configs/tiny.yaml, shortened to a few steps."""
    argv = [sys.executable, "-m", "spellxfer", command, "--config", "configs/tiny.yaml",
            "--trainer.default_root_dir", str(root), "--data.data_dir", str(data),
            "--data.val_limit", str(VAL_LIMIT), "--model.scoring", "both", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def val_metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("val/")}


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory, demo_data) -> Path:
    """A 4-step fit on two gloo processes, validating at steps 0, 2 and 4."""
    root = tmp_path_factory.mktemp("ddp") / "fit"
    p = spellxfer("fit", root, demo_data, *DDP, "--trainer.max_steps", str(STEPS),
                  "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.mark.slow
def test_a_ddp_fit_logs_each_row_once_from_step_0_to_max_steps(ddp_fit):
    """Rank 1 used to append its own copy of every row to metrics.jsonl (the JSONL writer lacked
    Lightning's rank-zero guard)."""
    assert torch.load(ddp_fit / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == STEPS
    rows = read_jsonl(ddp_fit / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/position_accuracy" in r] == [0, 2, 4]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert max(r["step"] for r in rows) == STEPS


@pytest.mark.slow
def test_a_ddp_checkpoint_validates_the_same_on_one_device_and_on_two(ddp_fit, demo_data, tmp_path):
    rows = {}
    for n in (1, 2):
        extra = DDP if n == 2 else ()
        p = spellxfer("validate", tmp_path / str(n), demo_data, "--ckpt_path", str(ddp_fit / "last.ckpt"),
                      *extra)
        assert p.returncode == 0, p.stderr[-3000:]
        (rows[n],) = read_jsonl(tmp_path / str(n) / "validate_metrics.jsonl")  # one row, from rank 0
    one, two = val_metrics(rows[1]), val_metrics(rows[2])
    assert {"val/position_accuracy", "val/count_accuracy", "val/transfer_score"} <= one.keys()
    assert one == two
    # the probe scores 5 items per task: accuracies in fifths, and not all 0 (else nothing is pinned)
    probe = [v for k, v in one.items() if k in ("val/position_likelihood_accuracy",
                                                  "val/count_likelihood_accuracy")]
    assert len(probe) == 2 and any(probe)
    assert all(abs(v * VAL_LIMIT - round(v * VAL_LIMIT)) < 1e-6 for v in probe)
    # and the fit's own validation after its last step (greedy, same weights)
    last = [r for r in read_jsonl(ddp_fit / "metrics.jsonl") if "val/position_accuracy" in r][-1]
    assert val_metrics(last) == one


def test_validation_items_are_shared_out_across_ranks_each_exactly_once(demo_data):
    data = SpellingDataModule(str(demo_data), "tiny-qwen3", build_profile=None, val_limit=VAL_LIMIT)
    data.setup("validate")
    seen: dict[str, list] = {"position": [], "count": []}
    for rank in (0, 1):
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        for task, loader in zip(("position", "count"), data.val_dataloader()):
            seen[task] += [item.id for batch in loader for item in batch]
    for task, items in data.eval_items["val"].items():
        assert len(items) == VAL_LIMIT
        assert sorted(seen[task]) == sorted(item.id for item in items)  # every item, none twice


@pytest.mark.slow
def test_bench_train_measures_one_device_and_two_in_one_run(demo_data, tmp_path):
    out = tmp_path / "train.json"
    rc = main(["bench", "train", "--model", "tiny-qwen3", "--data_dir", str(demo_data), "--variants",
               "spellxfer", "--batch_size", "4", "--steps", "2", "--warmup", "1", "--devices", "1", "2",
               "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    one, two = report["results"]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert (one["batch_size"], two["batch_size"]) == (4, 4)  # per device
    assert (one["global_batch_size"], two["global_batch_size"]) == (4, 8)
    for r in (one, two):
        assert r["variant"] == "spellxfer" and "failed" not in r
        assert r["real_tokens"] > 0 and r["tokens_per_second"] > 0
    assert report["command"].endswith(f"--devices 1 2 --out {out}")
