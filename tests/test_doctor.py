"""``spellxfer doctor``: the rows it reports and its exit code, against the real environment."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from spellxfer.core.assets import ASSETS, asset_path
from spellxfer.core.doctor import collect, doctor, torch_build_cuda


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache and a home without W&B credentials, whatever the developer's machine has."""
    monkeypatch.setenv("SPELLXFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def rows_by_check(import_check: bool = False) -> dict[str, tuple[str, str]]:
    return {check: (value, status) for check, value, status in collect(import_check)}


def test_rows_report_torch_cuda_and_optional_gpu_packages(isolated):
    rows = rows_by_check()
    assert rows["torch"] == (torch.__version__, "ok")
    for name in ("transformers", "peft", "lightning", "torchmetrics"):
        assert rows[name][1] == "ok"
    cuda_value, cuda_status = rows["cuda"]
    if torch.cuda.is_available():
        assert cuda_status == "ok" and rows["bf16"][1] in ("ok", "warn") and "gpu 0" in rows
    else:  # this CPU box
        assert cuda_value.startswith("not available") and cuda_status == "warn"
        assert rows["bf16"] == ("n/a without CUDA", "warn")
    for name in ("unsloth", "bitsandbytes"):
        installed = importlib.util.find_spec(name) is not None
        assert rows[name][1] == ("ok" if installed else "missing")
    # unsloth is located, never imported (importing it without a GPU raises).
    assert "unsloth" not in sys.modules


def test_asset_rows_follow_the_cache(isolated):
    rows = rows_by_check()
    for name in ASSETS:
        value, status = rows[f"asset {name}"]
        assert status == "missing" and "python -m spellxfer assets fetch" in value
    assert rows["cache dir"] == (f"{isolated / 'cache'} (created on first use)", "ok")

    corrupt = asset_path("qwen-tiktoken")
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not the real ranks")
    value, status = rows_by_check()["asset qwen-tiktoken"]
    assert status == "warn" and "sha256 mismatch" in value and str(corrupt) in value


def test_wandb_mode_comes_from_env_then_credentials(isolated, monkeypatch):
    assert rows_by_check()["wandb"] == ("offline (no credentials; `wandb sync` later)", "warn")

    netrc = isolated / "home" / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    value, status = rows_by_check()["wandb"]
    assert value.startswith("online") and status == "ok"

    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit choice wins over credentials
    assert rows_by_check()["wandb"] == ("disabled (WANDB_MODE)", "ok")


def test_doctor_prints_the_table_and_returns_0(isolated, capsys):
    assert doctor() == 0
    out = capsys.readouterr().out
    assert "spellxfer doctor" in out and "torchmetrics" in out and "asset smollm2-gguf" in out


def test_doctor_returns_1_when_a_required_package_cannot_be_imported(isolated, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    assert rows_by_check()["peft"][1] == "missing"
    assert doctor() == 1
    assert "failed to import: peft" in capsys.readouterr().out


def test_import_check_reports_what_the_default_reads_without_importing(isolated):
    """The default locates packages and reads versions from metadata, the CUDA build from the text
    of torch/version.py and the GPUs from the driver; importing everything gives the same table."""
    assert torch_build_cuda() == torch.version.cuda
    assert rows_by_check(import_check=True) == rows_by_check()


def test_import_check_catches_a_package_that_is_found_but_breaks_on_import(isolated, monkeypatch, capsys):
    broken = isolated / "site" / "peft"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("undefined symbol: _ZN3c10")\n')
    monkeypatch.syspath_prepend(str(broken.parent))
    monkeypatch.delitem(sys.modules, "peft", raising=False)

    assert rows_by_check()["peft"][1] == "ok"  # located and versioned, not imported: looks fine
    value, status = rows_by_check(import_check=True)["peft"]
    assert status == "missing" and value.startswith("import failed: ImportError: undefined symbol")
    assert doctor(import_check=True) == 1
    assert "failed to import: peft" in capsys.readouterr().out
