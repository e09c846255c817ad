"""The command line as a newcomer meets it: --help, the README's commands, the error contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

import spellxfer.cli as cli
from spellxfer.cli import fold_multi_value_flags, main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spellxfer", *args], capture_output=True, text=True, cwd=REPO
    )


def test_help_lists_every_command_with_a_description():
    p = _cli("--help")
    assert p.returncode == 0
    for cmd in ("data", "evaluate", "compare", "analyze", "report", "doctor", "assets"):
        line = next((ln for ln in p.stdout.splitlines() if re.match(rf"\s+{cmd}\s+\S", ln)), None)
        assert line is not None, f"{cmd} has no one-line description in --help:\n{p.stdout}"


def readme_commands() -> list[list[str]]:
    """Every `python -m spellxfer …` command the README shows, as its subcommand path."""
    text = (REPO / "README.md").read_text()
    cmds = []
    for m in re.finditer(r"python -m spellxfer ((?:[a-z]+(?:\|[a-z]+)*)(?: [a-z]+(?:\|[a-z]+)*)?)", text):
        words = m.group(1).split()
        # "assets fetch|status" → both; keep only words that are subcommands, not flag values
        heads = words[0].split("|")
        tails = words[1].split("|") if len(words) > 1 else [None]
        for h in heads:
            for t in tails:
                cmds.append([h] + ([t] if t else []))
    return cmds


@pytest.mark.parametrize("cmd", readme_commands(), ids=lambda c: " ".join(c))
def test_readme_commands_exist(cmd):
    p = _cli(*cmd, "--help")
    if p.returncode != 0 and len(cmd) == 2:  # second word was a flag value, not a subcommand
        p = _cli(cmd[0], "--help")
    assert p.returncode == 0, p.stderr


def test_makefile_targets_named_in_readme_exist():
    makefile = (REPO / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", (REPO / "README.md").read_text(), re.M):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_multi_value_flags_fold_into_one_list():
    assert fold_multi_value_flags(["evaluate", "--questions", "a.jsonl", "b.csv", "--limit", "3"]) == [
        "evaluate", '--questions=["a.jsonl", "b.csv"]', "--limit", "3"]
    assert fold_multi_value_flags(["--questions", "[a, b]"]) == ["--questions", "[a, b]"]
    assert fold_multi_value_flags(["--question-field=a-b", "--batch-size", "4"]) == [
        "--question_field=a-b", "--batch_size", "4"]


def test_unknown_command_and_bad_flag_are_one_line_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert main(["data", "build", "--out", "/tmp/x", "--seed", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)
    assert "seed" in err[1]


def test_commands_whose_extras_are_missing_are_listed_not_fatal(monkeypatch, capsys):
    """A GPU box with only the training stack (no litserve): training, evaluation and bench still
    work, and --help says which commands are unavailable and what to install."""
    import sys

    import spellxfer.cli as cli

    for name in [m for m in sys.modules if m.startswith("spellxfer.serving")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "litserve", None)  # `import litserve` → ModuleNotFoundError
    monkeypatch.setattr(cli, "UNAVAILABLE", {})
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "not available here: export, serve, bench serve: needs litserve" in out
    assert "spellxfer[serve]" in out
    commands = cli._commands()
    assert "serve" not in commands and "export" not in commands and "serve" not in commands["bench"]
    assert "studio" in commands  # its own extra (lightning-sdk), installed here
    assert {"evaluate", "sweep", "analyze", "bench"} <= set(commands) and "train" in commands["bench"]


HEAVY = (
    "torch",
    "transformers",
    "peft",
    "lightning",
    "torchmetrics",
    "pandas",
    "scipy",
    "litserve",
    "optuna",
    "datasets",
)


def _heavy_modules_after(argv: list[str]) -> list[str]:
    """Run ``python -m spellxfer ARGV`` (through runpy, in a fresh interpreter) and return the
    HEAVY packages in ``sys.modules`` when it is done."""
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = ['spellxfer', *{argv!r}]\n"
        "try:\n    runpy.run_module('spellxfer', run_name='__main__', alter_sys=True)\n"
        "except SystemExit:\n    pass\n"
        f"print('LOADED', json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1].removeprefix("LOADED "))


@pytest.mark.parametrize(
    "argv", [["--help"], ["bench", "--help"], ["data", "check", "--help"], ["sweep", "--help"]]
)
def test_help_imports_none_of_the_heavy_stack(argv):
    """Start-up: only the command being run is imported, so --help and light commands never load
    torch, transformers, lightning, pandas … (what made every command take 7–15 s)."""
    assert _heavy_modules_after(argv) == []


def test_doctor_and_data_check_import_none_of_the_heavy_stack(demo_data):
    """doctor reads versions from metadata and the GPUs from the driver, and data check reads
    JSONL: both start faster than `import torch` (docs/architecture.md#start-up)."""
    assert _heavy_modules_after(["doctor"]) == []
    assert _heavy_modules_after(["data", "check", "--data", str(demo_data)]) == []
    # the opt-in import check really imports what it reports (and still never unsloth)
    loaded = _heavy_modules_after(["doctor", "--import-check"])
    assert {"torch", "transformers", "peft", "lightning", "torchmetrics"} <= set(loaded)


def test_the_command_being_run_is_the_real_function_and_the_others_placeholders():
    from spellxfer.bench.sweep import bench_sweep

    commands = cli._commands(("bench", "sweep"))
    assert commands["bench"]["sweep"] is bench_sweep
    assert commands["evaluate"].__doc__.startswith("Score a model on position / count questions")
    assert cli._selected(["--config", "x.yaml", "bench", "sweep", "--model", "evaluate"]) == (
        "bench",
        "sweep",
    )


def test_studio_without_its_extra_is_listed_with_the_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightning_sdk", None)
    monkeypatch.setattr(cli, "UNAVAILABLE", {})
    with pytest.raises(SystemExit):
        main(["--help"])
    assert (
        "not available here: studio: needs lightning_sdk (pip install 'spellxfer[studio]')"
        in capsys.readouterr().out
    )
