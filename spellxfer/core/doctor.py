"""``spellxfer doctor``: what to check before renting a GPU.

One table: interpreter, torch and its CUDA view (devices, bf16), the core libraries, the optional
GPU packages, W&B logging mode, the cache and the embedded assets. Everything is read, nothing is
downloaded or changed. ``unsloth`` is only located, never imported: importing it without a GPU
raises.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import netrc
import os
import platform
import sys
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console
from rich.table import Table
from rich.text import Text

from spellxfer.core.assets import asset_status, cache_dir
from spellxfer.core.tables import print_table

console = Console()

# A run cannot start without these; `doctor` exits 1 when one fails to import.
REQUIRED = ("torch", "transformers", "peft", "lightning", "torchmetrics")
# GPU-only extras (`pip install 'spellxfer[gpu]'`); absent on CPU boxes by design.
OPTIONAL_GPU = ("unsloth", "bitsandbytes")

STATUS_STYLE = {"ok": "green", "warn": "yellow", "missing": "red"}


def collect() -> list[tuple[str, str, str]]:
    """The doctor's findings as ``(check, value, status)`` rows; status is ok, warn or missing."""
    rows = [("python", f"{platform.python_version()} ({sys.executable})", "ok")]
    for name in REQUIRED:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # a broken install raises more than ImportError (e.g. an ABI mismatch)
            rows.append((name, f"import failed: {type(e).__name__}: {e}", "missing"))
            continue
        rows.append((name, getattr(mod, "__version__", None) or importlib.metadata.version(name), "ok"))
        if name == "torch":
            rows += _cuda_rows(mod)
    for name in OPTIONAL_GPU:
        rows.append(_optional_row(name))
    rows.append(_wandb_row())
    rows.append(_cache_row())
    rows += _asset_rows()
    return rows


def doctor() -> int:
    """Show the environment a run would use, before you pay for a GPU.

    Python, torch and CUDA (GPUs, bf16), core libraries, optional GPU packages (unsloth,
    bitsandbytes), W&B mode, the cache directory and the embedded assets, as one table.

    Returns:
        0, or 1 when a required core package (torch, transformers, peft, lightning, torchmetrics)
        cannot be imported.
    """
    rows = collect()
    table = Table(title="spellxfer doctor", title_justify="left")
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("status", no_wrap=True)
    for check, value, status in rows:
        # Text, not markup: values hold brackets ("spellxfer[gpu]") that rich would parse as tags.
        table.add_row(check, Text(value), Text(status, style=STATUS_STYLE[status]))
    print_table(table, console)
    broken = [check for check, _, status in rows if check in REQUIRED and status == "missing"]
    if broken:
        console.print(f"[bold red]required package(s) failed to import:[/] {', '.join(broken)}")
        return 1
    return 0


def _cuda_rows(torch) -> list[tuple[str, str, str]]:
    built = torch.version.cuda  # None for a CPU wheel
    if not torch.cuda.is_available():
        why = (
            f"torch built for CUDA {built}, but no GPU or driver is visible"
            if built
            else f"CPU-only torch build {torch.__version__}"
        )
        return [
            ("cuda", f"not available ({why})", "warn"),
            ("gpu", "none: only the tiny embedded models are practical", "warn"),
            ("bf16", "n/a without CUDA", "warn"),
        ]
    n = torch.cuda.device_count()
    rows = [("cuda", f"available, CUDA {built}, {n} device(s)", "ok")]
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        rows.append((f"gpu {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}", "ok"))
    if torch.cuda.is_bf16_supported():
        rows.append(("bf16", "supported", "ok"))
    else:
        # Pre-Ampere cards: fp16 needs loss scaling and overflows more easily in a 4B model.
        rows.append(("bf16", "not supported (needs Ampere or newer); fp16 with loss scaling instead", "warn"))
    return rows


def _optional_row(name: str) -> tuple[str, str, str]:
    try:
        # find_spec locates the package without executing it (unsloth raises on import without a GPU).
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return (name, "not installed (optional, GPU only: pip install 'spellxfer[gpu]')", "missing")
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "installed (version unknown)"
    return (name, version, "ok")


def wandb_mode_and_reason() -> tuple[str, str]:
    """("online" | "offline" | WANDB_MODE's value, why). Shared by doctor and the W&B logger."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode, "WANDB_MODE"
    if os.environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY"
    # `wandb login` stores the key in ~/.netrc under the API host.
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        has_key = path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        has_key = False  # wandb cannot read it either
    if has_key:
        return "online", f"{path} has {host}"
    return "offline", "no credentials; `wandb sync` later"


def wandb_mode() -> str:
    return wandb_mode_and_reason()[0]


def _wandb_row() -> tuple[str, str, str]:
    mode, why = wandb_mode_and_reason()
    return ("wandb", f"{mode} ({why})", "warn" if mode == "offline" and "credentials" in why else "ok")


def _cache_row() -> tuple[str, str, str]:
    d = cache_dir()
    if d.is_dir():
        return ("cache dir", str(d), "ok" if os.access(d, os.W_OK) else "warn")
    # Created on first use; it only has to be creatable.
    parent = next((p for p in d.parents if p.exists()), None)
    if parent is not None and os.access(parent, os.W_OK):
        return ("cache dir", f"{d} (created on first use)", "ok")
    return ("cache dir", f"{d} (cannot be created: {parent} is not writable; set SPELLXFER_CACHE)", "warn")


def _asset_rows() -> list[tuple[str, str, str]]:
    rows = []
    for a in asset_status():
        check = f"asset {a['name']}"
        if a["verified"]:
            rows.append((check, f"{a['path']} (sha256 ok)", "ok"))
        elif a["cached"]:
            rows.append(
                (check, f"{a['path']} (sha256 mismatch; `python -m spellxfer assets fetch --force`)", "warn")
            )
        else:
            rows.append(
                (check, f"not cached: `python -m spellxfer assets fetch` puts it at {a['path']} "
                        f"(from {a['requirement']})", "missing")
            )  # fmt: skip
    return rows
