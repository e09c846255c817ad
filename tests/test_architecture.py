"""docs/architecture.md against the code: the command map names real modules and every command,
and the import-linter layers contract names every subpackage in the documented order."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

from spellxfer.cli import LIGHTNING_SUBCOMMANDS, _commands

tomllib = pytest.importorskip("tomllib")

DOC = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
PACKAGE = REPO / "spellxfer"


def contract_layers() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return layers


def test_every_module_the_command_map_names_exists():
    table = DOC.split("## Where each command lives", 1)[1].split("## Layers", 1)[0]
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)*\.py)`", table))
    assert named, "the command map names no module"
    missing = sorted(p for p in named if not (PACKAGE / p).is_file() and not (REPO / p).is_file())
    assert missing == []


def test_the_command_map_lists_every_command():
    table = DOC.split("## Where each command lives", 1)[1].split("## Layers", 1)[0]
    listed = {
        cell
        for row in re.findall(r"^\| (.+?) \|", table, re.MULTILINE)
        for cell in re.findall(r"`([^`]+)`", row)
    }
    commands = []
    for name, value in _commands().items():
        subs = [k for k in value if not k.startswith("_")] if isinstance(value, dict) else [None]
        commands += [f"{name} {s}" if s else name for s in subs]
    commands += list(LIGHTNING_SUBCOMMANDS)
    assert sorted(c for c in commands if c not in listed) == []


def test_the_layers_contract_names_every_subpackage():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages - set(contract_layers()) == set()


def test_the_documented_layer_order_is_the_contracts():
    diagram = DOC.split("```", 2)[1]
    # Each line starts with its layer names ("__main__, cli"), then two or more spaces.
    heads = [re.split(r"\s{2,}", line.strip())[0] for line in diagram.strip().splitlines()]
    assert [name for head in heads for name in head.split(", ")] == contract_layers()


def test_the_packaged_subpackages_are_every_subpackage_plus_the_shipped_configs():
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    subpackages = {f"spellxfer.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert set(config["packages"]) == {"spellxfer", "spellxfer.configs"} | subpackages
    assert config["package-dir"] == {"spellxfer.configs": "configs"}


def test_shipped_configs_come_from_the_package_never_from_beside_the_source(monkeypatch, tmp_path):
    from spellxfer.core import configs

    installed = configs.shipped("tiny.yaml")
    assert installed.is_file() and installed.read_text() == (REPO / "configs" / "tiny.yaml").read_text()

    def not_installed(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(configs.resources, "files", not_installed)
    monkeypatch.chdir(tmp_path)  # a working directory with no configs/ folder
    assert configs.shipped("tiny.yaml") == configs.Path("configs/tiny.yaml")
    assert configs.config_path("configs/tiny.yaml") == configs.Path("configs/tiny.yaml")
    assert not configs.config_path("configs/tiny.yaml").exists()  # not found next to spellxfer/


def test_training_sweeps_evaluation_and_benches_load_without_the_data_builders_and_servers_packages():
    """A GPU machine that is given built data runs fit, sweep, evaluate and bench without wordfreq
    (the word lists, read only by `data build`) or the serving stack (FastAPI, LitServe): those are
    imported where they are used, not by the modules these commands load."""
    code = (
        "import sys\n"
        "for m in ('wordfreq', 'fastapi', 'litserve', 'starlette', 'uvicorn'): sys.modules[m] = None\n"
        "import spellxfer.training.cli, spellxfer.sweep.run, spellxfer.sweep.pack\n"
        "import spellxfer.evaluation.evaluate, spellxfer.bench.sweep, spellxfer.bench.train\n"
        "import spellxfer.data.words as w\n"
        "try:\n"
        "    w.english_words()\n"
        "except ImportError:\n"
        "    print('word lists need wordfreq')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "word lists need wordfreq"
