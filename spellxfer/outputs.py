"""All-or-nothing outputs: write into a hidden sibling, rename into place at the end.

A crash, a Ctrl-C or a bad input halfway through leaves the target exactly as it was — never a
file or directory that looks finished but is not. Also the provenance every run records
(package versions, git commit).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spellxfer.errors import SpellxferError


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Validate ``out`` before any expensive work starts; returns it as a Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpellxferError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SpellxferError(f"output directory {out} is not empty; pass --overwrite true to replace it")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SpellxferError(f"output directory {out} is not writable (no write permission on {probe})")
    return out


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block finishes without error."""
    out = check_output_dir(out, overwrite)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise SpellxferError(f"cannot create output directory {out}: {e.strerror}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """Open a hidden temp file beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on (absent ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("spellxfer", "torch", "transformers", "peft", "lightning", "torchmetrics", "unsloth", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """``$SPELLXFER_GIT_COMMIT`` when set (a tree copied to a GPU box, perhaps inside another
    checkout whose HEAD is not the code that runs), else the checkout's HEAD, else None."""
    if os.environ.get("SPELLXFER_GIT_COMMIT"):
        return os.environ["SPELLXFER_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for each non-blank line of a JSONL file; a line that is not
    JSON is a one-line user error naming ``file:line``. Callers check the values' shape."""
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as e:
                raise SpellxferError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})") from None


def write_jsonl(path: Path, rows) -> int:
    """Write one JSON object per line; returns the row count. Same rows → same bytes."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
