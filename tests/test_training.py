"""Training end to end on tiny-qwen3 (``python -m spellxfer fit --config configs/tiny.yaml``).

What a run promises: its checkpoints hold only the LoRA weights
(plus optimizer, loop and RNG state) and load with ``weights_only=True``; ``best_adapter/`` is
the best checkpoint as a PEFT directory; a run killed at any moment resumes with
``--ckpt_path last`` to the very weights of an uninterrupted run, and a kill during a save never
leaves a corrupt ``last.ckpt``; config mistakes fail before any model loads with one ``error:``
line; only position / count / transfer and training-loop metrics ever reach disk or W&B.

Trained on spelling, validated on position and count only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, read_jsonl
from safetensors.torch import load_file

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.metric_names import check_metric_name
from spellxfer.training.loggers import WhitelistedCSVLogger
from spellxfer.training.module import ALL_LINEAR, SpellingLoRAModule

STEPS = 30  # configs/tiny.yaml: trainer.max_steps; a checkpoint every 10 steps
FORBIDDEN_METRIC = "val/spelling_accuracy"  # spellxfer-check: allow (the name the whitelist refuses)
# Third-party lines a fit used to print (library deprecations and tips; spellxfer.core.quiet)
KNOWN_NOISE = (
    "LeafSpec",
    "litlogger",
    "litmodels",
    "💡 Tip",
    "anonymous setting",
    "git root",
    "is not empty",
    "past_key_values",
    "is_gradient_checkpointing",
    "not resumable",
    "Seed set to",
)


def quiet_env(**extra: str) -> dict[str, str]:
    """The test process's environment with W&B off (only the W&B test turns it on)."""
    return {**os.environ, "WANDB_MODE": "disabled", **extra}


def fit_argv(root: Path, data: Path, *extra: str, command: str = "fit") -> list[str]:
    return [sys.executable, "-m", "spellxfer", command, "--config", "configs/tiny.yaml",
            "--trainer.default_root_dir", str(root), "--data.data_dir", str(data), *extra]


def run_fit(
    root: Path, data: Path, *extra: str, command: str = "fit", env=None
) -> subprocess.CompletedProcess:
    return subprocess.run(fit_argv(root, data, *extra, command=command), cwd=REPO, capture_output=True,
                          text=True, env=env or quiet_env(), timeout=300)


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_lora(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)


@dataclass
class Run:
    root: Path


@pytest.fixture(scope="module")
def ref(tmp_path_factory, demo_data) -> Run:
    """One uninterrupted `fit` on tiny.yaml: the reference every other run is compared with.
    (How long it takes is a benchmark's business, not a test's: `spellxfer bench train`.)"""
    root = tmp_path_factory.mktemp("training") / "ref"
    p = run_fit(root, demo_data)
    assert p.returncode == 0, p.stderr
    return Run(root)


@pytest.fixture(scope="module")
def base_model():
    from spellxfer.models.registry import load_model

    return load_model("tiny-qwen3")


# ---- a run and its outputs -----------------------------------------------------------------------
def test_fit_on_tiny_writes_checkpoint_manifest_and_metrics(ref, demo_data):
    assert load_ckpt(ref.root / "last.ckpt")["global_step"] == STEPS

    m = json.loads((ref.root / "manifest.json").read_text())
    assert m["hyperparameters"]["model"] == "tiny-qwen3" and m["hyperparameters"]["lora_r"] == 4
    assert m["data_manifest_sha256"] == hashlib.sha256((demo_data / "manifest.json").read_bytes()).hexdigest()
    assert {"torch", "lightning", "peft", "transformers"} <= m["versions"].keys()
    assert "git_commit" in m  # None outside a git checkout, the commit hash inside one

    rows = read_jsonl(ref.root / "metrics.jsonl")
    keys = {k for row in rows for k in row}
    assert {"train/loss", "val/position_accuracy", "val/count_accuracy", "val/transfer_score"} <= keys
    subtasks = {k for k in keys if re.fullmatch(r"val/(position|count)/\w+_accuracy", k)}
    assert {"val/position/nth_letter_accuracy", "val/count/letter_count_accuracy"} <= subtasks
    # four validations (the base model at step 0, then every 10 of 30 batches), each with every
    # position/count metric
    assert sum("val/position_accuracy" in row for row in rows) == 4
    csv_header = (ref.root / "training_logs" / "metrics.csv").read_text().splitlines()[0]
    assert not [k for k in [*keys, *csv_header.split(",")] if "spell" in k.lower()]


def test_checkpoints_hold_only_the_lora_weights_and_load_weights_only(ref, base_model):
    layers = base_model.config.num_hidden_layers  # tiny-qwen3: 2
    n_lora = 2 * layers * len(ALL_LINEAR)  # A and B per adapted linear layer: 2 × 2 × 7 = 28
    ckpts = sorted(ref.root.glob("*.ckpt"))
    # last, two best (save_top_k 2; random tiny-qwen3 scores 0 everywhere, so the ties keep the
    # first two: the base model at step 0, then step 10) and the step checkpoints 10, 20, 30 (keep_last_k 3)
    assert {p.name for p in ckpts} == {"last.ckpt", "best-step0.ckpt", "best-step10.ckpt",
                                       "step10.ckpt", "step20.ckpt", "step30.ckpt"}
    for path in ckpts:
        ckpt = load_ckpt(path)  # weights_only: tensors and plain values, no pickled objects
        state = ckpt["state_dict"]
        assert len(state) == n_lora and all("lora_" in k for k in state), path.name
        assert path.stat().st_size < 1_000_000, f"{path.name}: {path.stat().st_size} bytes"
        assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and "spellxfer_rng" in ckpt


def test_best_adapter_is_the_best_checkpoint_as_a_peft_directory(ref, base_model):
    from peft import PeftModel

    last = load_ckpt(ref.root / "last.ckpt")
    # The checkpoint callback that watches the validation metric records which file is best.
    (best_state,) = [s for name, s in last["callbacks"].items()
                     if name.startswith("ModelCheckpoint{'monitor': 'val/position_accuracy'")]
    best = Path(best_state["best_model_path"])
    assert best.parent == ref.root and best.name.startswith("best-step")

    model = PeftModel.from_pretrained(base_model, ref.root / "best_adapter")
    adapter = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    expected = {k.removeprefix("lm."): v for k, v in load_ckpt(best)["state_dict"].items()}
    assert adapter.keys() == expected.keys()
    for key in expected:
        assert torch.equal(adapter[key], expected[key]), key
    if best.name != f"best-step{STEPS}.ckpt":  # the adapter is the best weights, not the final ones
        final = last["state_dict"]
        assert any(not torch.equal(adapter[k.removeprefix("lm.")], v) for k, v in final.items())


def test_hf_auto_peft_opens_best_adapter_on_the_base_it_was_trained_on(ref, monkeypatch):
    """best_adapter/'s base_model_name_or_path is a directory AutoPeftModelForCausalLM can open
    offline (for tiny-qwen3 its float32 weights from the fit's seed, saved in the cache): the same
    logits as spellxfer's own base + adapter."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    from spellxfer.models.registry import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = json.loads((ref.root / "best_adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    auto = AutoPeftModelForCausalLM.from_pretrained(ref.root / "best_adapter").eval()
    ours = PeftModel.from_pretrained(load_model("tiny-qwen3", seed=0), ref.root / "best_adapter").eval()
    ids = torch.tensor([[151_644, 872, 198, 3838, 374, 279, 220, 18, 6498, 6524, 151_645]])
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


def test_the_learning_rate_is_logged_every_log_every_n_steps(ref):
    """`lr-AdamW` (named as Lightning's LearningRateMonitor names it) in each training row
    (tiny.yaml: every 5 steps): the rate that step used, following the schedule — linear warmup
    from 0 over 5 steps (step N runs at (N − 1) / 5 of the peak), then linear decay to 0 at 30."""
    rows = [r for r in read_jsonl(ref.root / "metrics.jsonl") if "lr-AdamW" in r]
    assert all("train/loss" in r for r in rows) and [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    config = yaml.safe_load((ref.root / "training_logs" / "config.yaml").read_text())
    peak = config["model"]["learning_rate"]
    assert rows[0]["lr-AdamW"] == pytest.approx(peak * 4 / 5, rel=1e-12)  # the 5th warmup step
    assert rows[-1]["lr-AdamW"] == pytest.approx(peak * 1 / 25, rel=1e-12)  # the last of 25 decay steps
    assert all(0 < r["lr-AdamW"] <= peak for r in rows)
    assert "lr-AdamW" in (ref.root / "training_logs" / "metrics.csv").read_text().splitlines()[0]


def test_validation_with_scoring_both_logs_the_likelihood_probe_of_evaluate_beside_generation(
    tmp_path, demo_data
):
    """--model.scoring both: each validation also logs the probe's accuracies (evaluate's names,
    whitelisted as position / count metrics); at step 0 they are `evaluate --scoring likelihood`
    of the base model on the same validation items. Checkpoints still follow generation."""
    from spellxfer.cli import main

    root = tmp_path / "run"
    p = run_fit(
        root,
        demo_data,
        "--model.scoring",
        "both",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    val = [r for r in read_jsonl(root / "metrics.jsonl") if "val/position_accuracy" in r]
    assert [r["step"] for r in val] == [0, 2]
    step0 = val[0]
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "tiny-qwen3",
                "--questions",
                str(demo_data / "position_val.jsonl"),
                str(demo_data / "count_val.jsonl"),
                "--limit",
                "16",
                "--scoring",
                "likelihood",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for task in ("position", "count"):
        assert step0[f"val/{task}_likelihood_accuracy"] == pytest.approx(
            metrics[f"{task}_likelihood_accuracy"], abs=1e-6
        )
    for sub, v in metrics["subtasks"].items():
        assert step0[f"val/{sub}_likelihood_accuracy"] == pytest.approx(v["likelihood"]["accuracy"], abs=1e-6)
    # no probe transfer score
    assert not [k for k in step0 if "likelihood" in k and not k.endswith("_likelihood_accuracy")]
    best = torch.load(root / "best-step0.ckpt", weights_only=True)
    assert next(s for s in best["callbacks"].values() if "monitor" in s)["monitor"] == "val/position_accuracy"


def test_model_scoring_is_generation_or_both(tmp_path, demo_data):
    p = run_fit(tmp_path / "run", demo_data, "--model.scoring", "likelihood")
    assert p.returncode == 2 and "model.scoring" in p.stderr


def test_a_fits_validation_starts_at_step_0_with_the_base_model(ref):
    """The first validation scores the model before any optimizer step (LoRA B = 0: the base
    model) and is logged at step 0; the later ones at the optimizer steps done."""
    val = [row for row in read_jsonl(ref.root / "metrics.jsonl") if "val/position_accuracy" in row]
    assert [row["step"] for row in val] == [row["global_step"] for row in val] == [0, 10, 20, 30]


def test_logged_steps_and_checkpoint_names_count_the_same_optimizer_steps(ref):
    """After N optimizer steps is N everywhere: the training row of step 10 and the validation
    after it are logged at 10 (Lightning alone would say 9), in metrics.jsonl and metrics.csv, and
    the checkpoints of that validation are step10.ckpt / best-step10.ckpt, holding global_step 10."""
    rows = read_jsonl(ref.root / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20, 25, 30]  # log_every_n_steps 5
    assert all(r["step"] == r["global_step"] for r in rows)
    with open(ref.root / "training_logs" / "metrics.csv", newline="") as f:
        csv_val = [int(r["step"]) for r in csv.DictReader(f) if r["val/position_accuracy"]]
    val_steps = [r["step"] for r in rows if "val/position_accuracy" in r]
    assert csv_val == val_steps == [0, 10, 20, 30]
    names = {p.name for p in ref.root.glob("*.ckpt")} - {"last.ckpt"}
    named = sorted(int(re.fullmatch(r"(?:best-)?step(\d+)\.ckpt", n).group(1)) for n in names)
    assert set(named) <= set(val_steps) and named == sorted(
        load_ckpt(ref.root / n)["global_step"] for n in names
    )


def test_the_step_0_checkpoint_is_the_base_model_and_can_be_the_best_adapter(ref):
    """Checkpoint selection includes step 0: with every score tied (random tiny-qwen3 scores 0),
    the first, the base model, stays best, and best_adapter/ then gives the base model's logits."""
    from peft import PeftModel

    from spellxfer.models.registry import load_model

    base_model = load_model("tiny-qwen3")  # a fresh copy: PEFT wraps the model it is given in place
    step0 = load_ckpt(ref.root / "best-step0.ckpt")
    assert step0["global_step"] == 0
    b = {k: v for k, v in step0["state_dict"].items() if "lora_B" in k}
    assert b and all(torch.count_nonzero(v) == 0 for v in b.values())  # LoRA at initialisation
    assert Path(scored_state(ref.root)["best_model_path"]).name == "best-step0.ckpt"
    ids = torch.tensor([[151644, 872, 198, 9707, 151645]])  # <|im_start|>user\nHello<|im_end|>
    with torch.no_grad():
        want = base_model(ids).logits
        tuned = PeftModel.from_pretrained(base_model, ref.root / "best_adapter").eval()
        got = tuned(ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ---- kill and resume -----------------------------------------------------------------------------
def start_fit(root: Path, data: Path, log: Path) -> subprocess.Popen:
    """`fit` in its own process group (so SIGKILL reaches every child), output to files: a pipe
    nobody reads would fill up and stall the run."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(fit_argv(root, data), cwd=REPO, env=quiet_env(), stdout=out, stderr=err,
                                start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for_checkpoint(
    proc: subprocess.Popen, last: Path, step: int, log: Path, timeout: float = 120
) -> int:
    """Poll until ``last`` holds at least ``step`` optimizer steps; returns its global_step.

    No retry around torch.load: the atomic writer promises that any last.ckpt a reader can open
    is complete, and a load error here is exactly the bug that promise excludes."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"fit exited ({proc.returncode}) before step {step}:\n{log.with_suffix('.err').read_text()}"
            )
        if last.is_file() and (mtime := last.stat().st_mtime_ns) != seen:
            seen = mtime
            if (got := load_ckpt(last)["global_step"]) >= step:
                return got
        time.sleep(0.05)
    kill(proc)
    pytest.fail(f"no checkpoint at step {step} after {timeout} s")


def scored_state(root: Path) -> dict:
    """The state of the checkpoint callback that ranks by the validation metric, from last.ckpt."""
    (state,) = [
        s
        for name, s in load_ckpt(root / "last.ckpt")["callbacks"].items()
        if name.startswith("ModelCheckpoint{'monitor': 'val/")
        or name.startswith("ModelCheckpoint{'monitor': 'train/")
    ]
    return state


def logged_rows(root: Path) -> list[dict]:
    """metrics.jsonl without throughput, the one value that depends on the wall clock."""
    return [
        {k: v for k, v in row.items() if k != "train/tokens_per_second"}
        for row in read_jsonl(root / "metrics.jsonl")
    ]


def assert_same_run(run: Path, ref: Path) -> None:
    """A resumed run ends exactly where the uninterrupted one did: the same rows logged (once
    each), the same validations, the same checkpoint files, the same best checkpoint and top-k,
    best_adapter/ tensor for tensor, and the same final weights."""
    rows, ref_rows = logged_rows(run), logged_rows(ref)
    assert rows == ref_rows, "metrics.jsonl differs from the uninterrupted run's"
    assert len({(r["step"], tuple(sorted(r))) for r in rows}) == len(rows), "a row was logged twice"
    assert sorted(p.name for p in run.glob("*.ckpt")) == sorted(p.name for p in ref.glob("*.ckpt"))
    got, want = scored_state(run), scored_state(ref)
    assert Path(got["best_model_path"]).name == Path(want["best_model_path"]).name
    assert sorted(Path(k).name for k in got["best_k_models"]) == sorted(
        Path(k).name for k in want["best_k_models"]
    )
    adapter = load_file(run / "best_adapter" / "adapter_model.safetensors")
    ref_adapter = load_file(ref / "best_adapter" / "adapter_model.safetensors")
    assert adapter.keys() == ref_adapter.keys()
    assert all(torch.equal(adapter[k], ref_adapter[k]) for k in ref_adapter), "best_adapter differs"
    final, ref_final = load_ckpt(run / "last.ckpt"), load_ckpt(ref / "last.ckpt")
    assert final["global_step"] == ref_final["global_step"]
    assert_same_lora(final["state_dict"], ref_final["state_dict"])


def resume_and_compare(root: Path, data: Path, ref: Run) -> None:
    p = run_fit(root, data, "--ckpt_path", "last")
    assert p.returncode == 0, p.stderr
    assert_same_run(root, ref.root)


@pytest.mark.parametrize("kill_after", [10, 20], ids=["after-first-checkpoint", "after-second-checkpoint"])
def test_a_killed_fit_resumes_to_exactly_the_uninterrupted_weights(kill_after, ref, demo_data, tmp_path):
    root = tmp_path / "run"
    proc = start_fit(root, demo_data, tmp_path / "killed")
    wait_for_checkpoint(proc, root / "last.ckpt", kill_after, tmp_path / "killed")
    kill(proc)
    resumed_from = load_ckpt(root / "last.ckpt")["global_step"]
    assert kill_after <= resumed_from < STEPS, "the kill came too late to test a resume"
    resume_and_compare(root, demo_data, ref)


# Where the resume test kills `fit` (SPELLXFER_TEST_KILL_AT, spellxfer.training.checkpointing.
# kill_point), in order, each run resuming the one before, and the resume point each leaves.
KILL_CHAIN = [
    ("validation_start@20", 10),       # step 20 trained, its checkpoint due, its validation not run
    ("saved:best-step20.ckpt@20", 10),  # the scored checkpoint written, the resume point not yet
    ("saved:step20.ckpt@20", 10),       # between the step checkpoint and last.ckpt
    ("saved:last.ckpt@20", 20),         # the resume point written
    ("train_batch@25", 20),             # between checkpoints
    ("validation_batch@30", 20),        # mid-validation (after its first batch)
    ("fit_end@30", 30),                 # all trained and saved, best_adapter/ not yet written
]
# Random tiny-qwen3 scores 0 at every validation, so ranking by it ties; the training loss at the
# three validation steps differs, so each validation's checkpoint decision shows in the top-k and
# best_adapter/ (any distinct scores do: the comparison is with an uninterrupted run).
RANKED = ("--checkpoint.monitor", "train/loss", "--checkpoint.mode", "max")


@pytest.fixture(scope="module")
def ranked_ref(tmp_path_factory, demo_data) -> Path:
    root = tmp_path_factory.mktemp("training") / "ranked"
    p = run_fit(root, demo_data, *RANKED)
    assert p.returncode == 0, p.stderr
    scores = [v.item() for v in scored_state(root)["best_k_models"].values()]
    assert len(set(scores)) == len(scores), "the ranking needs distinct scores to show a lost validation"
    return root


def test_a_fit_killed_at_every_point_of_a_save_and_a_validation_resumes_to_the_uninterrupted_run(
    ranked_ref, demo_data, tmp_path
):
    root = tmp_path / "run"
    for i, (point, resume_point) in enumerate(KILL_CHAIN):
        extra = RANKED if i == 0 else (*RANKED, "--ckpt_path", "last")
        p = run_fit(root, demo_data, *extra, env=quiet_env(SPELLXFER_TEST_KILL_AT=point))
        assert p.returncode == -signal.SIGKILL, f"not killed at {point}: rc {p.returncode}\n{p.stderr}"
        assert load_ckpt(root / "last.ckpt")["global_step"] == resume_point, point
    p = run_fit(root, demo_data, *RANKED, "--ckpt_path", "last")
    assert p.returncode == 0, p.stderr
    assert_same_run(root, ranked_ref)


def test_a_kill_at_a_random_moment_resumes_or_asks_for_a_fresh_run(ref, demo_data, tmp_path):
    root, delay = tmp_path / "run", random.uniform(1.0, 10.0)
    proc = start_fit(root, demo_data, tmp_path / "killed")
    time.sleep(delay)
    kill(proc)
    last = root / "last.ckpt"
    if last.is_file():  # killed after the first checkpoint: resume
        resume_and_compare(root, demo_data, ref)
        return
    p = run_fit(root, demo_data, "--ckpt_path", "last")
    assert p.returncode == 2, f"killed after {delay:.1f} s:\n{p.stderr}"
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(last) in lines[0], p.stderr
    p = run_fit(root, demo_data, "--trainer.max_steps", "10")  # what the error tells you to do
    assert p.returncode == 0, p.stderr
    assert load_ckpt(last)["global_step"] == 10


SAVE_LOOP = """
import sys, torch
from pathlib import Path
from spellxfer.training.checkpointing import AtomicCheckpointIO
io, path, step = AtomicCheckpointIO(), Path(sys.argv[1]), int(sys.argv[2])
while True:
    # 50 MB and 25 MB payloads in turn, each filled with its step: a torn file passes for neither
    n = 12_500_000 if step % 2 == 0 else 6_250_000
    io.save_checkpoint({"step": step, "payload": torch.full((n,), float(step))}, path)
    print(step, flush=True)
    step += 1
"""


def test_a_kill_during_a_checkpoint_save_leaves_the_newest_complete_last_ckpt(tmp_path):
    last, temp_glob = tmp_path / "last.ckpt", ".last.ckpt.*.tmp"
    leftovers: set[Path] = set()
    for attempt in range(4):
        out = tmp_path / f"saved{attempt}.txt"
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(last), str(1000 * attempt)],
                                    stdout=f, start_new_session=True)
        deadline = time.monotonic() + 60
        while not out.read_text().strip():  # one complete save by this writer first
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.3))
        while not set(tmp_path.glob(temp_glob)) - leftovers:  # then kill while a save is under way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        kill(proc)
        leftovers |= set(tmp_path.glob(temp_glob))
        reported = int(out.read_text().split()[-1])

        ckpt = load_ckpt(last)
        step, payload = ckpt["step"], ckpt["payload"]
        # the last save reported done, or the one in flight if it got renamed before the kill
        assert step in (reported, reported + 1)
        assert payload.numel() == (12_500_000 if step % 2 == 0 else 6_250_000)
        assert torch.equal(payload, torch.full_like(payload, float(step)))
    # A writer killed mid-save cannot delete its temp file, and later saves leave it alone (it
    # could be another live writer's). It is hidden and not a *.ckpt: no checkpoint glob and no
    # `--ckpt_path last` lookup ever picks it up.
    assert leftovers, "no kill landed inside a save"
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
    assert all(p.name.startswith(".last.ckpt.") and p.suffix == ".tmp" for p in leftovers)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling runs os.system
        return (os.system, (f"touch {self.marker}",))


def test_lightnings_own_checkpoint_loading_never_unpickles_code_whatever_it_asks_for(tmp_path):
    from spellxfer.training.checkpointing import AtomicCheckpointIO

    marker, path = tmp_path / "payload-ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "extra": Payload(marker)}, path)
    # what Lightning's restore calls (`fit --ckpt_path`, `validate --ckpt_path`); False is what
    # `--weights_only false` or a remote checkpoint would make it ask for
    for weights_only in (None, False):
        with pytest.raises(SpellxferError, match=r"pickled Python object \(posix\.system\)"):
            AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only)
    assert not marker.exists()


# ---- config mistakes -----------------------------------------------------------------------------
BAD_CONFIGS = {
    "unknown-key": (["--model.lora_rank", "8"], ["lora_rank"]),
    "wrong-type": (["--model.lora_r", "eight"], ["lora_r", "eight"]),
    "rank-zero": (["--model.lora_r", "0"], ["lora_r"]),
    "zero-learning-rate": (["--model.learning_rate", "0"], ["learning_rate"]),
    "negative-learning-rate": (["--model.learning_rate=-1e-3"], ["learning_rate"]),
    "missing-data-dir": (["--data.data_dir", "{tmp}/no-data", "--data.build_profile", "null"],
                         ["{tmp}/no-data", "build_profile"]),
    "unknown-model": (["--model.model", "no-such-model"], ["model", "no-such-model"]),
    "no-such-checkpoint": (["--ckpt_path", "{tmp}/nope.ckpt"], ["ckpt_path", "{tmp}/nope.ckpt"]),
    "resume-without-a-checkpoint": (["--ckpt_path", "last"], ["ckpt_path", "last.ckpt"]),
}


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory, demo_data) -> dict[str, tuple[subprocess.CompletedProcess, Path, str]]:
    """All bad-config runs at once (each is mostly interpreter start-up; they overlap well)."""
    tmp = tmp_path_factory.mktemp("bad")
    procs = {}
    for case, (args, _) in BAD_CONFIGS.items():
        root = tmp / case
        argv = fit_argv(root, demo_data, *(a.replace("{tmp}", str(tmp)) for a in args))
        procs[case] = (subprocess.Popen(argv, cwd=REPO, env=quiet_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), root)
    runs = {}
    for case, (proc, root) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), root, str(tmp))
    return runs


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_config_mistake_is_one_error_line_naming_the_key_before_any_output(case, bad_config_runs):
    p, root, tmp = bad_config_runs[case]
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for word in BAD_CONFIGS[case][1]:
        assert word.replace("{tmp}", tmp) in lines[0]
    assert not root.exists(), "a failed config created the run directory"


# ---- the metric whitelist ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["train/loss", "val/position_accuracy", "val/count/letter_count_accuracy",
                                  "val/transfer_score", "lr-AdamW", "epoch",
                                  "val/position_accuracy/dataloader_idx_0"])
def test_training_loop_and_position_count_transfer_metrics_are_allowed(name):
    check_metric_name(name)


@pytest.mark.parametrize(
    "name", ["val/position_likelihood_accuracy", "val/count/word_length_likelihood_accuracy"]
)
def test_the_likelihood_probes_position_and_count_accuracies_are_allowed(name):
    check_metric_name(name)


@pytest.mark.parametrize("name", [FORBIDDEN_METRIC, "val/rouge", "train/perplexity"])
def test_any_other_metric_is_refused(name):
    with pytest.raises(SpellxferError, match=re.escape(repr(name))):
        check_metric_name(name)


def files_mentioning_the_forbidden_metric(root: Path) -> list[Path]:
    name = FORBIDDEN_METRIC.removeprefix("val/")
    return [p for p in root.rglob("*") if p.is_file() and name in p.read_text(errors="replace")]


def test_the_csv_logger_refuses_a_metric_before_writing_anything(tmp_path):
    logger = WhitelistedCSVLogger(
        save_dir=tmp_path, name="", version="", jsonl_path=str(tmp_path / "m.jsonl")
    )
    with pytest.raises(SpellxferError):
        logger.log_metrics({FORBIDDEN_METRIC: 1.0, "train/loss": 2.0}, step=0)
    logger.log_metrics({"train/loss": 2.0}, step=1)
    logger.save()
    assert "train/loss" in (tmp_path / "metrics.csv").read_text()
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1, "train/loss": 2.0}]
    assert files_mentioning_the_forbidden_metric(tmp_path) == []


def test_a_resumed_logger_drops_the_rows_logged_past_the_resume_point(tmp_path):
    jsonl, logs = tmp_path / "m.jsonl", tmp_path / "logs"
    killed = WhitelistedCSVLogger(save_dir=logs, name="", version="", jsonl_path=str(jsonl))
    for step in (5, 10, 15):  # killed after step 15, resumed from its checkpoint after step 10
        killed.log_metrics({"train/loss": float(step)}, step=step)
    killed.save()
    resumed = WhitelistedCSVLogger(save_dir=logs, name="", version="", jsonl_path=str(jsonl))
    resumed.discard_from(10)
    resumed.log_metrics({"train/loss": 15.5}, step=15)
    resumed.save()
    assert read_jsonl(jsonl) == [{"step": 5, "train/loss": 5.0}, {"step": 10, "train/loss": 10.0},
                                 {"step": 15, "train/loss": 15.5}]
    with open(logs / "metrics.csv", newline="") as f:  # Lightning restarts the CSV; the kept rows go back in
        assert [(r["step"], r["train/loss"]) for r in csv.DictReader(f)] == [
            ("5", "5.0"),
            ("10", "10.0"),
            ("15", "15.5"),
        ]


class LeakyModule(SpellingLoRAModule):
    """The real module, plus one forbidden metric in training_step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log(FORBIDDEN_METRIC, 1.0, batch_size=1)
        return loss


def test_fit_fails_when_a_module_logs_a_forbidden_metric(demo_data, tmp_path, monkeypatch):
    import lightning as L

    from spellxfer.training.datamodule import SpellingDataModule

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WhitelistedCSVLogger(
        save_dir=tmp_path, name="", version="", jsonl_path=str(tmp_path / "m.jsonl")
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=logger, log_every_n_steps=1,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    dm = SpellingDataModule(str(demo_data), "tiny-qwen3", build_profile=None, batch_size=2, train_limit=8)
    with pytest.raises(SpellxferError, match=re.escape(FORBIDDEN_METRIC)):
        trainer.fit(LeakyModule(model="tiny-qwen3", backend="hf", lora_r=2), datamodule=dm)
    assert trainer.global_step == 1  # refused at the first logging step, not at the end of the run
    assert files_mentioning_the_forbidden_metric(tmp_path) == []


# ---- validate, and W&B -------------------------------------------------------------------------
def test_validate_on_a_checkpoint_reproduces_the_runs_last_validation(ref, demo_data, tmp_path):
    p = run_fit(tmp_path / "v", demo_data, "--ckpt_path", str(ref.root / "last.ckpt"), command="validate")
    assert p.returncode == 0, p.stderr
    (row,) = read_jsonl(tmp_path / "v" / "validate_metrics.jsonl")
    metrics = [k for k in row if k.startswith("val/")]
    assert len(metrics) == 7  # position, count, transfer and the four subtasks
    # one table, each metric once (Lightning's had a column per dataloader, position and count)
    assert all(p.stdout.count(k) == 1 for k in metrics), p.stdout
    assert "DataLoader" not in p.stdout and "…" not in p.stdout
    last_val = [r for r in read_jsonl(ref.root / "metrics.jsonl") if "val/position_accuracy" in r][-1]
    # greedy generation with the step-30 weights: the fit's validation after its 30th step
    assert {k: v for k, v in row.items() if k.startswith("val/")} == {
        k: v for k, v in last_val.items() if k.startswith("val/")}
    assert (tmp_path / "v" / "training_logs" / "validate" / "metrics.csv").is_file()


def test_a_fit_writing_to_a_file_prints_plain_progress_lines(demo_data, tmp_path):
    """stdout is a pipe here, as in a job's log: plain lines (steps out of the total, rate, ETA,
    loss; each validation's accuracies), no ANSI codes."""
    p = run_fit(tmp_path, demo_data, "--trainer.max_steps", "20", "--data.val_limit", "2",
                env=quiet_env(SPELLXFER_PROGRESS_EVERY="0"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\x1b[" not in p.stdout
    steps = re.findall(r"^fit: (\d+)/20 steps .* loss [0-9.]+$", p.stdout, flags=re.M)
    assert steps and steps[-1] == "20"
    assert re.findall(r"^validation at step (\d+): val/position_accuracy", p.stdout, flags=re.M) == [
        "0",
        "10",
        "20",
    ]


def test_early_stopping_can_be_switched_off(ref, demo_data, tmp_path):
    """--early_stopping.enabled false fits without EarlyStopping. With patience 0 it would stop
    after step 10 (random tiny-qwen3 scores 0 at every validation: no improvement); without it the
    fit runs to max_steps and no checkpoint holds an early-stopping state. On, its state keeps
    Lightning's name, so checkpoints from before `enabled` existed resume with their patience."""
    p = run_fit(tmp_path, demo_data, "--trainer.max_steps", "20", "--data.val_limit", "2",
                "--early_stopping.patience", "0", "--early_stopping.enabled", "false")
    assert p.returncode == 0, p.stderr[-2000:]
    last = load_ckpt(tmp_path / "last.ckpt")
    assert last["global_step"] == 20 and "`max_steps=20` reached" in p.stderr
    assert not [k for k in last["callbacks"] if "EarlyStopping" in k]
    assert (
        "EarlyStopping{'monitor': 'val/position_accuracy', 'mode': 'max'}"
        in load_ckpt(ref.root / "last.ckpt")["callbacks"]
    )


def test_model_and_data_seeds_may_differ_and_the_loggers_get_the_whole_config(demo_data, tmp_path):
    """--model.seed (weights, sampling) and --data.seed (data order) are independent; Lightning
    used to refuse to merge two different `seed` hparams. hparams.yaml (and W&B's run config)
    hold the module's hparams, the data's under `data`, and the full resolved config."""
    import yaml

    p = run_fit(tmp_path, demo_data, "--model.seed", "1", "--data.seed", "0", "--trainer.max_steps", "2",
                "--data.val_limit", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    hparams = yaml.safe_load((tmp_path / "training_logs" / "hparams.yaml").read_text())
    assert (hparams["seed"], hparams["data"]["seed"]) == (1, 0)
    assert hparams["lora_r"] == hparams["config"]["model"]["lora_r"]
    assert hparams["config"]["trainer"]["max_steps"] == 2 and hparams["config"]["data"]["val_limit"] == 2


def test_validate_in_the_fits_own_directory_keeps_the_fits_logs(ref, demo_data, tmp_path):
    """validate (or test) run where the fit ran used to restart its metrics.csv (one CSVLogger
    version for both) and append to its metrics.jsonl; each subcommand now logs beside it."""
    run = tmp_path / "fit"
    shutil.copytree(ref.root, run)
    logs = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "training_logs/metrics.csv")}
    p = run_fit(run, demo_data, "--ckpt_path", str(run / "last.ckpt"), command="validate")
    assert p.returncode == 0, p.stderr
    assert {f: (run / f).read_bytes() for f in logs} == logs
    (row,) = read_jsonl(run / "validate_metrics.jsonl")
    assert "val/position_accuracy" in row
    assert "val/position_accuracy" in (run / "training_logs" / "validate" / "metrics.csv").read_text()


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``run-*.wandb`` file: a 7-byte W&B header, then LevelDB log
    framing (32 KiB blocks; each chunk: crc32c 4 bytes, length 2, type 1 — full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # block trailer too short for a header: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full or last chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_without_credentials_wandb_writes_an_offline_run_grouped_by_experiment(demo_data, tmp_path):
    pytest.importorskip("wandb")
    # No WANDB_* at all: an in-process W&B run earlier in the suite (the report test) leaves
    # WANDB_SERVICE pointing at its service, which a child fit would otherwise join.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc, no wandb settings
    root = tmp_path / "run"
    p = run_fit(root, demo_data, "--trainer.max_steps", "10", "--experiment", "wb-test", env=env)
    assert p.returncode == 0, p.stderr
    # no third-party notice that says nothing about the run (spellxfer.core.quiet, and the W&B
    # logger creating its directory first and passing no `anonymous`)
    for noise in KNOWN_NOISE:
        assert noise not in p.stderr, noise
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, run.display_name) == ("spellxfer", "wb-test", "wb-test")
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    logged = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
    # W&B's step axis is the optimizer steps done, as in metrics.jsonl and the checkpoint names
    axis = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
        for h in history
    ]
    assert [r["trainer/global_step"] for r in axis if "val/position_accuracy" in r] == [0, 10]
    assert [r["trainer/global_step"] for r in axis if "train/loss" in r] == [5, 10]
    assert {"train/loss", "val/position_accuracy", "val/transfer_score"} <= logged
    assert not [k for k in logged if "spell" in k.lower()]
    # the run config: the module's hparams, the data's and the full resolved config
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["lora_r"] == config["config"]["model"]["lora_r"] and config["data"]["data_dir"] == str(
        demo_data
    )


def test_optimizer_and_scheduler_defaults_are_the_modules_signature(capsys):
    import inspect

    from spellxfer.cli import main
    from spellxfer.training.module import SpellingLoRAModule

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    signature = inspect.signature(SpellingLoRAModule).parameters
    # the signature is the one place these defaults live; tiny.yaml sets the rest
    for key in ("optimizer", "weight_decay"):
        assert printed["model"][key] == signature[key].default
    assert (printed["model"]["learning_rate"], printed["model"]["warmup_steps"]) == (1.0e-3, 5)  # tiny.yaml
    assert "optimizer" not in printed  # no second way (LightningCLI's --optimizer) to set it
