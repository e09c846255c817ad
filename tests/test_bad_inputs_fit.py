"""Bad input to ``fit``, ``validate``, ``export`` and ``evaluate --adapter``, given as a hostile user would.

What each promises: exit code 2, exactly one ``error:`` line on stderr naming the file or key
and what is wrong (no traceback, and never the advice to load with ``weights_only=False``), no
file left behind — and no checkpoint or adapter ever runs code: every pickle here carries a
payload that would create a marker file, and the marker never appears.

Checkpoints and adapters are damaged copies of a real 10-step tiny-qwen3 run. (The adapter
loader is ``spellxfer.evaluation.evaluate``'s; its cases sit here beside the checkpoint ones
because a damaged adapter and a damaged checkpoint are the same attack.)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file

TINY = str(REPO / "configs" / "tiny.yaml")

# The first case's setup runs every selected case (46 `spellxfer fit` processes, three at a time):
# its time limit covers the whole batch, not one command, so it is wider than the suite's 900 s.
pytestmark = pytest.mark.timeout(3000)


class Payload:
    """Unpickling this runs ``os.system``: the proof that a file was loaded as code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def spellxfer(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spellxfer", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def run10(tmp_path_factory, demo_data) -> Path:
    """A real run: 10 steps of configs/tiny.yaml (last.ckpt, best-step10.ckpt, best_adapter/)."""
    root = tmp_path_factory.mktemp("fit") / "run"
    p = spellxfer(["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--data.data_dir",
                   str(demo_data), "--trainer.max_steps", "10"], REPO)
    assert p.returncode == 0, p.stderr
    return root


@dataclass
class Bad:
    files: dict[str, str]  # name → path of each bad input (str.format fields for the cases)
    marker: Path  # created by any payload that runs


@pytest.fixture(scope="module")
def bad(run10, demo_data, tmp_path_factory) -> Bad:
    d = tmp_path_factory.mktemp("bad")
    marker = d / "PAYLOAD-RAN"
    f: dict[str, Path] = {}
    ckpt = torch.load(run10 / "last.ckpt", weights_only=True)

    f["pickle"] = d / "pickle.ckpt"  # a torch.save archive holding an object besides the tensors
    torch.save({**ckpt, "extra": Payload(marker)}, f["pickle"])
    f["raw_pickle"] = d / "raw_pickle.ckpt"  # a bare pickle, as torch.save wrote before torch 1.6
    f["raw_pickle"].write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    f["empty"] = d / "empty.ckpt"
    f["empty"].write_bytes(b"")
    f["text"] = d / "text.ckpt"
    f["text"].write_text("not a checkpoint")
    f["truncated"] = d / "truncated.ckpt"
    data = (run10 / "last.ckpt").read_bytes()
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["state_dict"] = d / "plain_state_dict.pt"  # a plain state dict, not a Lightning checkpoint
    torch.save({k.removeprefix("lm."): v for k, v in ckpt["state_dict"].items()}, f["state_dict"])
    f["partial"] = d / "partial.ckpt"  # 1 of the 28 LoRA tensors
    torch.save({**ckpt, "state_dict": dict(list(ckpt["state_dict"].items())[:1])}, f["partial"])
    f["other_rank"] = d / "other_rank.ckpt"  # rank-8 tensors under rank-4 hyper-parameters
    torch.save(
        {
            **ckpt,
            "state_dict": {
                k: torch.zeros(8, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 8)
                for k, v in ckpt["state_dict"].items()
            },
        },
        f["other_rank"],
    )
    f["no_hparams"] = d / "no_hparams.ckpt"
    torch.save({k: v for k, v in ckpt.items() if k != "hyper_parameters"}, f["no_hparams"])

    def adapter(name: str, damage) -> None:
        f[name] = d / name
        shutil.copytree(run10 / "best_adapter", f[name])
        damage(f[name])

    def rank8(a: Path) -> None:
        config = json.loads((a / "adapter_config.json").read_text())
        (a / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))

    def bin_only(a: Path) -> None:
        (a / "adapter_model.safetensors").unlink()
        torch.save({"x": Payload(marker)}, a / "adapter_model.bin")

    def one_tensor(a: Path) -> None:
        tensors = load_file(a / "adapter_model.safetensors")
        save_file(dict(list(tensors.items())[:1]), a / "adapter_model.safetensors")

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    adapter("adapter_no_config", lambda a: (a / "adapter_config.json").unlink())
    adapter("adapter_bad_json", lambda a: (a / "adapter_config.json").write_text('{"r": 4,'))
    adapter("adapter_config_list", lambda a: (a / "adapter_config.json").write_text("[4]"))
    adapter("adapter_no_weights", lambda a: (a / "adapter_model.safetensors").unlink())
    adapter("adapter_bad_weights", lambda a: (a / "adapter_model.safetensors").write_bytes(b"\0" * 64))
    adapter("adapter_truncated", lambda a: truncate(a / "adapter_model.safetensors"))
    adapter("adapter_other_rank", rank8)
    adapter("adapter_bin_pickle", bin_only)
    adapter("adapter_one_tensor", one_tensor)
    f["adapter_file"] = d / "adapter_file"
    f["adapter_file"].write_text("not a directory")

    # run dirs to resume: a copy whose last.ckpt is a pickle; run10 itself, with its best
    # checkpoint (what best_adapter/ is exported from) replaced by one — in place, since the
    # resume point names its best checkpoint by absolute path
    f["run_last_pickle"] = d / "run_last_pickle"
    shutil.copytree(run10, f["run_last_pickle"])
    shutil.copy(f["pickle"], f["run_last_pickle"] / "last.ckpt")
    f["run_copy"] = d / "run_copy"
    shutil.copytree(run10, f["run_copy"])
    # the run's tracked best (step 0's base model can be it: every validation of the random tiny
    # model ties), read from its resume point the way the resumed fit will
    state = torch.load(run10 / "last.ckpt", map_location="cpu", weights_only=True)
    best = next(Path(v["best_model_path"]) for k, v in state["callbacks"].items()
                if "ModelCheckpoint" in k and v.get("best_model_path"))
    shutil.copy(f["pickle"], best)
    f["run10_best"] = str(best)
    f["run10"] = run10

    for name, text in {
        "yaml_unknown_key": "model:\n  lora_rank: 8\n",
        "yaml_wrong_type": "model:\n  lora_r: eight\n",
        "yaml_syntax": "model: [4\n",
        "yaml_list": "- 1\n",
        "yaml_max_steps": "trainer:\n  max_steps: -5\n",
        "yaml_experiment": "experiment: ../../outside\n",
        "yaml_deep": "model:\n  lora_r: " + "[" * 5000 + "]" * 5000 + "\n",
        "yaml_long_int": "model:\n  lora_r: " + "9" * 5000 + "\n",
    }.items():
        f[name] = d / f"{name}.yaml"
        f[name].write_text(text)
    f["data"] = demo_data
    return Bad({k: str(v) for k, v in f.items()}, marker)


def fit(*args: str, command: str = "fit", root: bool = True) -> list[str]:
    """A tiny fit into the case's own directory ({case}/run); {name} fields are bad inputs."""
    where = ["--trainer.default_root_dir", "{case}/run"] if root else []
    return [command, "--config", TINY, *where, "--data.data_dir", "{data}", *args]


def evaluate(adapter: str) -> list[str]:
    return ["evaluate", "--model", "tiny-qwen3", "--adapter", f"{{{adapter}}}", "--questions",
            "{data}/position_val.jsonl", "--limit", "2", "--out", "{case}/out"]


CKPT_PROBLEMS = {
    "pickle": "pickled Python object",
    "raw_pickle": "not a torch.save archive",
    "empty": "empty file",
    "text": "not a torch.save archive",
    "truncated": "not a torch.save archive",
    "state_dict": "not a `fit` checkpoint",
    "partial": "incomplete LoRA weights",
    "other_rank": "not rank 4",
    "no_hparams": "no hyper_parameters",
}
# case → (argv with {fields}, words the error line must contain)
CASES: dict[str, tuple[list[str], list[str]]] = {}
for name, problem in CKPT_PROBLEMS.items():
    CASES[f"fit-ckpt-{name}"] = (fit("--ckpt_path", f"{{{name}}}"), [f"{{{name}}}", problem])
    CASES[f"validate-ckpt-{name}"] = (
        fit("--ckpt_path", f"{{{name}}}", command="validate"),
        [f"{{{name}}}", problem],
    )
    CASES[f"export-ckpt-{name}"] = (
        ["export", "--ckpt", f"{{{name}}}", "--out", "{case}/out"],
        [f"{{{name}}}", problem],
    )
CASES.update(
    {
        "fit-ckpt-pickle-weights-only-false": (
            fit("--ckpt_path", "{pickle}", "--weights_only", "false"),
            ["{pickle}", "pickled"],
        ),
        "resume-last-ckpt-is-a-pickle": (
            fit("--ckpt_path", "last", "--trainer.default_root_dir", "{run_last_pickle}", root=False),
            ["{run_last_pickle}/last.ckpt", "pickled"],
        ),
        "resume-best-ckpt-is-a-pickle": (
            fit("--ckpt_path", "last", "--trainer.default_root_dir", "{run10}", root=False),
            ["{run10_best}", "pickled"],
        ),
        "resume-with-another-lora-rank": (
            fit(
                "--ckpt_path",
                "last",
                "--trainer.default_root_dir",
                "{run_copy}",
                "--model.lora_r",
                "8",
                root=False,
            ),
            ["model.lora_r", "--model.lora_r", "{run_copy}/last.ckpt"],
        ),
        "adapter-no-config": (
            evaluate("adapter_no_config"),
            ["{adapter_no_config}", "no adapter_config.json"],
        ),
        "adapter-bad-json": (
            evaluate("adapter_bad_json"),
            ["{adapter_bad_json}/adapter_config.json", "invalid JSON"],
        ),
        "adapter-config-not-an-object": (
            evaluate("adapter_config_list"),
            ["{adapter_config_list}/adapter_config.json", "expected a PEFT LoRA config"],
        ),
        "adapter-no-weights": (
            evaluate("adapter_no_weights"),
            ["{adapter_no_weights}", "no adapter_model.safetensors"],
        ),
        "adapter-corrupt-weights": (
            evaluate("adapter_bad_weights"),
            ["{adapter_bad_weights}", "SafetensorError"],
        ),
        "adapter-truncated-weights": (
            evaluate("adapter_truncated"),
            ["{adapter_truncated}", "SafetensorError"],
        ),
        "adapter-other-rank": (evaluate("adapter_other_rank"), ["{adapter_other_rank}", "size mismatch"]),
        "adapter-pickle-bin-only": (
            evaluate("adapter_bin_pickle"),
            ["{adapter_bin_pickle}", "adapter_model.bin (a pickle, not read)"],
        ),
        "adapter-one-of-28-tensors": (
            evaluate("adapter_one_tensor"),
            ["{adapter_one_tensor}", "holds 1 of the 28"],
        ),
        "adapter-is-a-file": (evaluate("adapter_file"), ["{adapter_file}", "adapter_config.json"]),
        "accelerator-gpu-without-one": (
            fit("--trainer.accelerator", "gpu"),
            ["trainer.accelerator", "no CUDA GPU", "--trainer.accelerator"],
        ),
        "max-steps-negative": (fit("--trainer.max_steps=-5"), ["trainer.max_steps", "-5"]),
        "max-steps-zero": (fit("--trainer.max_steps", "0"), ["trainer.max_steps"]),
        "max-epochs-negative": (fit("--trainer.max_epochs=-5"), ["trainer.max_epochs"]),
        "val-check-interval-zero": (fit("--trainer.val_check_interval", "0"), ["trainer.val_check_interval"]),
        "check-val-every-n-epoch-zero": (
            fit("--trainer.check_val_every_n_epoch", "0"),
            ["trainer.check_val_every_n_epoch"],
        ),
        "accumulate-grad-batches-zero": (
            fit("--trainer.accumulate_grad_batches", "0"),
            ["trainer.accumulate_grad_batches"],
        ),
        "log-every-n-steps-zero": (fit("--trainer.log_every_n_steps", "0"), ["trainer.log_every_n_steps"]),
        "devices-negative": (fit("--trainer.devices=-5"), ["devices"]),
        "save-top-k-below-minus-one": (fit("--checkpoint.save_top_k=-5"), ["save_top_k"]),
        "checkpoint-every-negative": (
            fit("--checkpoint.every_n_train_steps=-1"),
            ["checkpoint.every_n_train_steps"],
        ),
        "limit-train-batches-negative": (
            fit("--trainer.limit_train_batches=-1"),
            ["trainer.limit_train_batches"],
        ),
        "gradient-clip-negative": (fit("--trainer.gradient_clip_val=-1"), ["trainer.gradient_clip_val"]),
        "sanity-val-steps-below-minus-one": (
            fit("--trainer.num_sanity_val_steps=-5"),
            ["trainer.num_sanity_val_steps"],
        ),
        "early-stopping-patience-negative": (
            fit("--early_stopping.patience=-1"),
            ["early_stopping.patience"],
        ),
        "lora-rank-40-digits": (fit("--model.lora_r", "9" * 40), ["model.lora_r", "--model.lora_r"]),
        "val-max-new-tokens-zero": (fit("--model.val_max_new_tokens", "0"), ["model.val_max_new_tokens"]),
        "checkpoint-monitor-not-a-metric": (
            fit("--checkpoint.monitor", "val/nope"),
            ["checkpoint.monitor", "val/nope"],
        ),
        "early-stopping-monitor-not-a-metric": (
            fit("--early_stopping.monitor", "loss_typo"),
            ["early_stopping.monitor"],
        ),
        "experiment-parent-traversal": (
            fit("--experiment", "../../outside", root=False),
            ["experiment", "../../outside"],
        ),
        "experiment-with-a-slash": (fit("--experiment", "a/b", root=False), ["experiment", "a/b"]),
        "experiment-dot-dot": (fit("--experiment", "..", root=False), ["experiment", "'..'"]),
        "experiment-empty": (fit("--experiment", "", root=False), ["experiment", "''"]),
        "experiment-absolute": (fit("--experiment", "/tmp/x", root=False), ["experiment", "/tmp/x"]),
        "yaml-unknown-key": (
            fit("--config", "{yaml_unknown_key}"),
            ["model.lora_rank", "{yaml_unknown_key}"],
        ),
        "yaml-wrong-type": (
            fit("--config", "{yaml_wrong_type}"),
            ["model.lora_r", "eight", "{yaml_wrong_type}"],
        ),
        "yaml-syntax-error": (fit("--config", "{yaml_syntax}"), ["{yaml_syntax}:", "invalid YAML"]),
        "yaml-not-a-mapping": (fit("--config", "{yaml_list}"), ["{yaml_list}", "mapping"]),
        "yaml-max-steps-negative": (
            fit("--config", "{yaml_max_steps}"),
            ["trainer.max_steps", "{yaml_max_steps}"],
        ),
        "yaml-nested-5000-deep": (fit("--config", "{yaml_deep}"), ["{yaml_deep}", "nested too deeply"]),
        "yaml-5000-digit-integer": (
            fit("--config", "{yaml_long_int}"),
            ["{yaml_long_int}", "integer of more than"],
        ),
        "yaml-experiment-traversal": (
            fit("--config", "{yaml_experiment}", root=False),
            ["experiment", "{yaml_experiment}"],
        ),
    }
)


def snapshot(path: Path) -> set[Path]:
    return set(path.rglob("*")) if path.exists() else set()


@pytest.fixture(scope="module")
def outcomes(
    bad, tmp_path_factory, request
) -> dict[str, tuple[subprocess.CompletedProcess, set[Path], Path]]:
    """Every selected case run once (three at a time: each is mostly interpreter start-up), in its
    own working directory three levels deep, so that anything written even two levels above it
    shows. Returns (process, paths created anywhere under the case's directory or beside the
    inputs, case dir)."""
    # only the cases this session runs (pytest -k …): each one costs a process
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module.__name__ == __name__
        and "case" in getattr(getattr(item, "callspec", None), "params", {})
    ]
    base = tmp_path_factory.mktemp("cases")
    inputs = Path(bad.files["pickle"]).parent

    def run(case: str):
        d = base / case
        cwd = d / "a" / "b"
        cwd.mkdir(parents=True)
        argv = [a.format(case=d, **bad.files) for a in CASES[case][0]]
        before = snapshot(d) | snapshot(inputs) | snapshot(Path(bad.files["run10"]))
        p = spellxfer(argv, cwd)
        after = snapshot(d) | snapshot(inputs) | snapshot(Path(bad.files["run10"]))
        return case, (p, after - before, d)

    # the runs that resume run10 (in place) and the rest do not share any file
    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(run, selected))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_error_line_exit_2_and_leaves_nothing_behind(case, outcomes, bad):
    p, created, d = outcomes[case]
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    # torch's own message for a refused pickle advises loading with weights_only=False: never shown
    assert "Traceback" not in p.stderr and "weights_only" not in p.stderr
    for word in CASES[case][1]:
        assert word.format(case=d, **bad.files) in lines[0], lines[0]
    assert not created, f"left behind: {sorted(map(str, created))}"
    assert not bad.marker.exists(), "a payload ran"

