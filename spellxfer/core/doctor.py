"""``spellxfer doctor``: what to check before renting a GPU.

One table: interpreter, torch and its CUDA view (devices, bf16), the core libraries, the optional
GPU packages, W&B logging mode, the cache and the embedded assets. Everything is read, nothing is
downloaded or changed.

By default doctor imports none of the packages it reports, so it answers in well under the time
``import torch`` alone takes: versions come from the installed metadata, the CUDA version torch
was built for from the text of ``torch/version.py``, and the GPUs from the driver
(``libcuda.so.1`` through :mod:`ctypes`, as ``nvidia-smi`` sees them). What this cannot see is an
install that is present but broken (a wheel built against another torch, a missing shared
library): ``--import_check true`` imports each required package and asks torch itself for its CUDA
view. ``unsloth`` is only located, never imported, in either mode: importing it without a GPU
raises.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import netrc
import os
import platform
import re
import sys
from pathlib import Path
from typing import NamedTuple
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


class Gpu(NamedTuple):
    """One CUDA device as doctor reports it."""

    name: str
    total_memory: int  # bytes
    major: int  # compute capability, e.g. 9.0 for an H100
    minor: int


def collect(import_check: bool = False) -> list[tuple[str, str, str]]:
    """The doctor's findings as ``(check, value, status)`` rows; status is ok, warn or missing.

    Args:
        import_check: Import each required package (and read the CUDA view from torch) instead of
            only locating it; see :func:`doctor`.
    """
    rows = [("python", f"{platform.python_version()} ({sys.executable})", "ok")]
    for name in REQUIRED:
        row = _imported_row(name) if import_check else _located_row(name)
        rows.append(row)
        if name == "torch" and row[2] == "ok":
            rows += _torch_cuda_rows() if import_check else _driver_cuda_rows(row[1])
    for name in OPTIONAL_GPU:
        rows.append(_optional_row(name))
    rows.append(_wandb_row())
    rows.append(_cache_row())
    rows += _asset_rows()
    return rows


def doctor(import_check: bool = False) -> int:
    """Show the environment a run would use, before you pay for a GPU.

    Python, torch and CUDA (GPUs, bf16), core libraries, optional GPU packages (unsloth,
    bitsandbytes), W&B mode, the cache directory and the embedded assets, as one table. Nothing is
    imported by default (it starts faster than ``import torch``), so a package that is installed
    but breaks on import still reads ok; ``--import_check true`` catches that.

    Args:
        import_check: Import each required package and ask torch for its CUDA view, to catch a
            broken install (an ABI mismatch, a missing shared library); takes as long as loading
            torch, transformers and lightning.

    Returns:
        0, or 1 when a required core package (torch, transformers, peft, lightning, torchmetrics)
        is missing (or, with ``--import_check true``, fails to import).
    """
    rows = collect(import_check)
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
        console.print(f"[bold red]required package(s) missing or failed to import:[/] {', '.join(broken)}")
        return 1
    return 0


def _located_row(name: str) -> tuple[str, str, str]:
    """A required package found on the path (not imported), with its installed version."""
    if not _found(name):
        return (name, "not installed (a spellxfer dependency: pip install -e .)", "missing")
    return (name, _version(name), "ok")


def _imported_row(name: str) -> tuple[str, str, str]:
    """A required package imported for real (``--import_check``)."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # a broken install raises more than ImportError (e.g. an ABI mismatch)
        return (name, f"import failed: {type(e).__name__}: {e}", "missing")
    return (name, getattr(mod, "__version__", None) or _version(name), "ok")


def _found(name: str) -> bool:
    try:
        # find_spec locates a package without executing it; None when absent (or blocked by
        # sys.modules[name] = None)
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def torch_build_cuda() -> str | None:
    """The CUDA version the installed torch was built for (``torch.version.cuda``: None for a CPU
    wheel), read from the text of ``torch/version.py`` without importing torch."""
    return _torch_version_field("cuda")


def _torch_version_field(name: str) -> str | None:
    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        # generated lines such as `cuda: Optional[str] = '12.8'` (or `= None`)
        match = re.search(rf"^{name}\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        return match.group(1) if match else None
    return None


# Driver API (cuda.h): CUresult 0 is CUDA_SUCCESS; CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
# and _MINOR are the compute capability.
CC_MAJOR, CC_MINOR = 75, 76


def driver_gpus() -> tuple[list[Gpu], int] | str:
    """The GPUs the CUDA driver shows this process (``CUDA_VISIBLE_DEVICES`` applies) and the
    newest CUDA version it supports (e.g. 13000 for 13.0), or why there are none."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"

    def call(fn: str, *args) -> None:
        rc = getattr(cuda, fn)(*args)
        if rc != 0:
            raise RuntimeError(f"{fn} returned CUDA error {rc}")

    try:
        call("cuInit", 0)
        version, count = ctypes.c_int(), ctypes.c_int()
        call("cuDriverGetVersion", ctypes.byref(version))
        call("cuDeviceGetCount", ctypes.byref(count))
        gpus = []
        for i in range(count.value):
            dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
            name, mem = ctypes.create_string_buffer(256), ctypes.c_size_t()
            call("cuDeviceGet", ctypes.byref(dev), i)
            call("cuDeviceGetName", name, len(name), dev)
            call("cuDeviceTotalMem_v2", ctypes.byref(mem), dev)
            call("cuDeviceGetAttribute", ctypes.byref(major), CC_MAJOR, dev)
            call("cuDeviceGetAttribute", ctypes.byref(minor), CC_MINOR, dev)
            gpus.append(Gpu(name.value.decode(errors="replace"), mem.value, major.value, minor.value))
    except (RuntimeError, AttributeError) as e:  # 100: no device; 999 and others: a broken driver
        return f"the NVIDIA driver does not answer: {e}"
    if not gpus:
        return "the driver sees no GPU"
    return gpus, version.value


def _driver_cuda_rows(torch_version: str) -> list[tuple[str, str, str]]:
    built = torch_build_cuda()
    if not built:
        hip = _torch_version_field("hip")  # a ROCm build: its GPUs are not CUDA's to list
        if hip:
            why = f"ROCm torch build {torch_version} (HIP {hip}); doctor --import-check lists its GPUs"
            return [("cuda", why, "warn")]
        return _no_cuda_rows(f"CPU-only torch build {torch_version}")
    found = driver_gpus()
    if isinstance(found, str):
        return _no_cuda_rows(f"torch built for CUDA {built}, but {found}")
    gpus, driver = found
    # A driver runs every toolkit of its own major version and older (CUDA minor-version
    # compatibility); torch built for a newer major one finds no usable GPU.
    if driver // 1000 < int(built.split(".")[0]):
        return _no_cuda_rows(
            f"torch built for CUDA {built}, but the driver supports CUDA "
            f"{driver // 1000}.{driver % 1000 // 10}"
        )
    return _gpu_rows(built, gpus)


def _torch_cuda_rows() -> list[tuple[str, str, str]]:
    # --import_check only: torch's own view, which needs its CUDA runtime to load. The import
    # contract names this one exception to "core is torch-free" (pyproject.toml).
    import torch

    built = torch.version.cuda  # None for a CPU wheel
    if not torch.cuda.is_available():
        why = (
            f"torch built for CUDA {built}, but no GPU or driver is visible"
            if built
            else f"CPU-only torch build {torch.__version__}"
        )
        return _no_cuda_rows(why)
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(p.name, p.total_memory, p.major, p.minor))
    return _gpu_rows(built, gpus)


def _no_cuda_rows(why: str) -> list[tuple[str, str, str]]:
    return [
        ("cuda", f"not available ({why})", "warn"),
        ("gpu", "none: only the tiny embedded models are practical", "warn"),
        ("bf16", "n/a without CUDA", "warn"),
    ]


def _gpu_rows(built: str, gpus: list[Gpu]) -> list[tuple[str, str, str]]:
    rows = [("cuda", f"available, CUDA {built}, {len(gpus)} device(s)", "ok")]
    for i, g in enumerate(gpus):
        rows.append((f"gpu {i}", f"{g.name}, {g.total_memory / 2**30:.1f} GiB, sm_{g.major}{g.minor}", "ok"))
    # torch.cuda.is_bf16_supported(): compute capability 8.0 (Ampere) or newer; every GPU a run
    # may use has to have it.
    if all(g.major >= 8 for g in gpus):
        rows.append(("bf16", "supported", "ok"))
    else:
        # Pre-Ampere cards: fp16 needs loss scaling and overflows more easily in a 4B model.
        rows.append(("bf16", "not supported (needs Ampere or newer); fp16 with loss scaling instead", "warn"))
    return rows


def _optional_row(name: str) -> tuple[str, str, str]:
    # located, never imported: unsloth raises on import without a GPU
    if not _found(name):
        return (name, "not installed (optional, GPU only: pip install 'spellxfer[gpu]')", "missing")
    return (name, _version(name), "ok")


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
            )
    return rows
