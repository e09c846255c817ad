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
    from spellxfer.training.qwen3_utils import load_qwen3_tokenizer

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
