"""Embedded assets: fetched from a real package index, verified by sha256, cached, never half-written.

Only ``qwen-tiktoken`` (2.6 MB, in the ``dashscope`` wheel) is downloaded here, into a temporary
``$SPELLXFER_CACHE``. The 93 MB SmolLM2 GGUF is never fetched into one: where a test needs it
present, it links the verified copy from the shared default cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import spellxfer.core.assets as assets
from spellxfer.cli import main
from spellxfer.core.assets import (
    ASSETS,
    asset_path,
    asset_status,
    cache_dir,
    ensure_asset,
    fetch_asset,
    sha256_file,
)
from spellxfer.core.errors import SpellxferError

QWEN = ASSETS["qwen-tiktoken"]
GGUF = ASSETS["smollm2-gguf"]


@pytest.fixture(scope="module")
def shared() -> dict[str, Path]:
    """The verified assets in the default cache (fetched there once if this machine lacks them)."""
    return {name: ensure_asset(name) for name in ASSETS}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache of spellxfer's own, for this test and any CLI it starts."""
    monkeypatch.setenv("SPELLXFER_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def filled(shared, cache) -> Path:
    """A cache holding both verified assets: the GGUF linked from the shared cache, the ranks copied."""
    (cache / "assets").mkdir()
    asset_path(GGUF.name).symlink_to(shared[GGUF.name])
    asset_path(QWEN.name).write_bytes(shared[QWEN.name].read_bytes())
    return cache


def refuse_subprocesses(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", refuse)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m spellxfer …`` in a child process, with ``env`` added to this one's environment."""
    return subprocess.run(
        [sys.executable, "-m", "spellxfer", *args],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "300", **env}, timeout=300,
    )


def status_row(stdout: str, name: str) -> list[str]:
    """The cells of one asset's row in the ``assets status`` table, printed as a table or, when
    the paths are too long for the width, as plain ``column: value · …`` rows."""
    if "│" in stdout:
        line = next(line for line in stdout.splitlines() if f" {name} " in line)
        return [cell.strip() for cell in line.strip("│ ").split("│")]
    text = " ".join(" ".join(stdout.split("\n")).split())  # plain rows wrap between words
    row = text.split(f"asset: {name} · ", 1)[1].split(" asset: ", 1)[0]
    return [name, *(part.split(": ", 1)[1].strip() for part in row.split(" · "))]


def leftovers(cache: Path) -> list[str]:
    """Files anywhere under the cache, and hidden entries (the fetch's temporary directories)."""
    return sorted(
        str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() or p.name.startswith(".")
    )


# --- where the cache is ------------------------------------------------------------------------


def test_cache_dir_is_spellxfer_cache_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPELLXFER_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    assert asset_path(QWEN.name) == tmp_path / "mine" / "assets" / "qwen.tiktoken"
    monkeypatch.delenv("SPELLXFER_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "spellxfer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "spellxfer"
    monkeypatch.setenv("SPELLXFER_CACHE", "~/elsewhere")
    assert cache_dir() == tmp_path / "home" / "elsewhere"


# --- fetching ----------------------------------------------------------------------------------


def test_fetch_downloads_the_wheel_and_caches_the_verified_file(cache, monkeypatch):
    assert not asset_path(QWEN.name).exists()
    path = fetch_asset(QWEN.name)  # a real `pip download dashscope==2.0.2` from the package index
    assert path == cache / "assets" / "qwen.tiktoken"
    assert sha256_file(path) == QWEN.sha256
    assert path.stat().st_size > 2_000_000 and path.read_bytes().count(b"\n") == 151_643
    assert leftovers(cache) == ["assets/qwen.tiktoken"]  # no wheel, no temporary directory
    rows = {r["name"]: r for r in asset_status()}
    assert rows[QWEN.name] | {"path": ""} == {"name": QWEN.name, "requirement": "dashscope==2.0.2",
                                              "path": "", "cached": True, "verified": True}
    assert rows[GGUF.name]["cached"] is False and rows[GGUF.name]["verified"] is False

    # Once cached, the file is served from disk: any download attempt would fail the test.
    refuse_subprocesses(monkeypatch)
    mtime = path.stat().st_mtime_ns
    assert ensure_asset(QWEN.name) == path
    assert fetch_asset(QWEN.name) == path  # without force, fetch is ensure
    assert path.stat().st_mtime_ns == mtime


def test_a_corrupted_cached_file_is_reported_not_replaced(filled, monkeypatch):
    path = asset_path(QWEN.name)
    path.write_bytes(b"overwritten by something else\n")
    refuse_subprocesses(monkeypatch)
    with pytest.raises(SpellxferError) as e:
        ensure_asset(QWEN.name)
    assert str(path) in str(e.value) and "assets fetch --force" in str(e.value)
    assert path.read_bytes() == b"overwritten by something else\n"
    assert ensure_asset(GGUF.name) == asset_path(GGUF.name)  # the other asset is unaffected


def test_assets_status_flags_the_corrupted_file_and_fetch_force_replaces_it(filled, monkeypatch, capsys):
    ranks, gguf = asset_path(QWEN.name), asset_path(GGUF.name)
    ranks.write_bytes(b"junk")

    before = cli("assets", "status")
    assert before.returncode == 1, before
    assert status_row(before.stdout, QWEN.name)[2:4] == ["yes", "no"]  # cached, sha256 not ok
    assert status_row(before.stdout, GGUF.name)[2:4] == ["yes", "yes"]

    # `assets fetch --force` re-downloads every asset. It runs in-process with the registry
    # narrowed to the ranks file, so the 93 MB GGUF is not downloaded again; parsing, pip, the
    # index, the replacement and the status table that follows are all real.
    with monkeypatch.context() as m:
        m.setattr(assets, "ASSETS", {QWEN.name: QWEN})
        assert main(["assets", "fetch", "--force", "true"]) == 0
    assert sha256_file(ranks) == QWEN.sha256
    assert gguf.is_symlink()  # untouched
    assert not [p for p in leftovers(filled) if Path(p).name.startswith(".")]

    capsys.readouterr()
    assert main(["assets", "status"]) == 0  # both assets, as the subprocess above saw them
    after = capsys.readouterr().out
    assert status_row(after, QWEN.name)[2:4] == status_row(after, GGUF.name)[2:4] == ["yes", "yes"]


def test_offline_and_uncached_is_one_error_line_and_leaves_nothing(cache):
    # Offline: no index, and neither pip's configured wheel folder nor extra indexes to fall back on.
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL")}
    env |= {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "SPELLXFER_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "spellxfer", "assets", "fetch"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    # The first asset in the registry fails first; its message says what and where.
    assert GGUF.requirement in lines[0] and str(cache / "assets" / GGUF.filename) in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert leftovers(cache) == []


def test_a_wheel_with_the_wrong_file_is_refused(cache, tmp_path_factory, monkeypatch):
    # A local "index" serving dashscope 2.0.2 whose ranks file is not the real one.
    wheels = tmp_path_factory.mktemp("wheels")
    with zipfile.ZipFile(wheels / "dashscope-2.0.2-py3-none-any.whl", "w") as whl:
        whl.writestr(QWEN.member, b"aGk= 0\n")
        whl.writestr(
            "dashscope-2.0.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: dashscope\nVersion: 2.0.2\n"
        )
        whl.writestr(
            "dashscope-2.0.2.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr("dashscope-2.0.2.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    with pytest.raises(SpellxferError, match="refusing to use it") as e:
        fetch_asset(QWEN.name)
    assert QWEN.requirement in str(e.value) and QWEN.sha256 in str(e.value)
    assert leftovers(cache) == []


def test_unknown_asset_names_are_refused_with_the_known_ones(cache):
    for call in (asset_path, ensure_asset, fetch_asset):
        with pytest.raises(
            SpellxferError, match="unknown asset 'qwen3-tiktoken'; known: smollm2-gguf, qwen-tiktoken"
        ):
            call("qwen3-tiktoken")
    assert leftovers(cache) == []
