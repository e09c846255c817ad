"""All-or-nothing outputs: write into a hidden sibling, rename into place at the end.

A crash, a Ctrl-C or a bad input halfway through leaves the target exactly as it was — never a
file or directory that looks finished but is not. Also the provenance every run records
(package versions, git commit), and the readers for the JSON / YAML files a user hands us,
which turn every way such a file can be bad into one ``error:`` line.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from spellxfer.core.errors import SpellxferError

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_run_name(name: str, flag: str) -> str:
    """Refuse a run / study name that could leave its folder: it names directories and files
    (``checkpoints/NAME/``, ``results/metrics/NAME.jsonl``), so letters, digits, ``_ . -`` only,
    starting with a letter or digit, no ``..``, at most 100 characters."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        shown = repr(name[:120]) + ("…" if len(name) > 120 else "") if isinstance(name, str) else repr(name)
        raise SpellxferError(
            f"{flag} {shown}: use 1-100 letters, digits, '_', '.' and '-', starting with a letter or digit "
            "and without '..' (it names folders and files)"
        )
    return name


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
    if not probe.is_dir():
        raise SpellxferError(f"output directory {out} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SpellxferError(f"output directory {out} is not writable (no write permission on {probe})")
    return out


def check_output_file(path: Path) -> None:
    """``--out FILE`` must be writable as a file: not a directory, not under a file."""
    if path.is_dir():
        raise SpellxferError(f"--out {path}: is a directory, expected a file name")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SpellxferError(f"--out {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpellxferError(f"--out {path}: no write permission on {parent}")


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
    out = {}
    for pkg in ("spellxfer", "torch", "transformers", "peft", "lightning", "torchmetrics", "unsloth",
                "bitsandbytes"):
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
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---- reading files a user hands us -------------------------------------------------------------
# Every reader below turns what a hostile or broken file can do to Python's json / yaml modules
# (a 5000-digit integer, 20,000-deep nesting, NaN, a lone surrogate, bytes that are not UTF-8) into
# one SpellxferError line naming the file and line, instead of a traceback.

MAX_JSONL_LINE_BYTES = 16 * 2**20
"""Longest JSON line read (16 MiB): far above any row spellxfer writes (a predictions row with a
long reply is ~100 KB), low enough that a corrupt single-line file is refused, not slurped."""


class _NotFinite(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NotFinite(f"{name} is not valid JSON (use null or a finite number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"number {text} is out of range")
    return value


def parse_json(text: str, where: str, allow_nan: bool = False):
    """``json.loads(text)``, where every way the text can be bad is one ``SpellxferError`` line.

    Args:
        text: the JSON document (one line of a JSONL file, or a whole JSON file).
        where: ``file:line`` (or ``file``) that starts the message.
        allow_nan: accept the ``NaN`` / ``Infinity`` literals Python's own ``json.dumps`` writes
            (our training logs hold them when a loss diverges); otherwise they are refused, as
            the JSON standard does.

    Raises:
        SpellxferError: invalid JSON, a number with more digits than Python converts
            (``sys.get_int_max_str_digits()``), nesting deeper than the parser's recursion limit,
            a non-finite number when ``allow_nan`` is false, or a string holding a lone UTF-16
            surrogate (``"\\ud800"``: not text, and unwritable as UTF-8).
    """
    hooks = {} if allow_nan else {"parse_constant": _refuse_constant, "parse_float": _finite_float}
    try:
        value = json.loads(text, **hooks)
    except json.JSONDecodeError as e:
        raise SpellxferError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except _NotFinite as e:
        raise SpellxferError(f"{where}: {e}") from None
    except RecursionError:
        raise SpellxferError(f"{where}: JSON nested too deeply (spellxfer's rows are flat objects)") from None
    except ValueError:  # int() refusing a huge literal; JSONDecodeError is caught above
        raise SpellxferError(
            f"{where}: a number with more than {sys.get_int_max_str_digits()} digits"
        ) from None
    # Lone surrogates can only come from \u escapes: the UTF-8 decoder refuses encoded ones.
    if "\\u" in text and _has_lone_surrogate(value):
        raise SpellxferError(
            f"{where}: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
        )
    return value


def snippet(value, limit: int = 60) -> str:
    """A parsed JSON value as JSON text for an error line, cut to ``limit`` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_lone_surrogate(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def iter_jsonl(path: Path, allow_nan: bool = False) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for each non-blank line of a JSONL file (UTF-8, a leading
    byte order mark allowed; gzip- or xz-compressed when its name ends in ``.gz`` or ``.xz``, as
    committed predictions are). Callers check the values' shape.

    Raises:
        SpellxferError: one line naming the file, and the line where there is one: missing,
            a directory, unreadable, not UTF-8, a line over :data:`MAX_JSONL_LINE_BYTES`, or a line
            :func:`parse_json` refuses (``allow_nan`` is passed on).
    """
    path = Path(path)
    _regular_file(path)
    try:
        f = OPENERS.get(path.suffix, open)(path, "rb")
    except FileNotFoundError:
        raise SpellxferError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpellxferError(f"{path}: is a directory, expected a JSON lines file") from None
    except OSError as e:
        raise SpellxferError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        line = 0
        while raw := _readline(f, path, line):
            line += 1
            if len(raw) > MAX_JSONL_LINE_BYTES:
                raise SpellxferError(f"{path}:{line}: line longer than {MAX_JSONL_LINE_BYTES // 2**20} MiB")
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise SpellxferError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                     f"{e.start + 1}); save the file as UTF-8") from None
            if text.strip():
                yield line, parse_json(text, f"{path}:{line}", allow_nan=allow_nan)


OPENERS = {".gz": gzip.open, ".xz": lzma.open}
"""Compressed JSONL by file suffix (committed predictions); anything else is read as it is."""


def _readline(f, path: Path, line: int) -> bytes:
    """The next line (at most one byte over the limit); a damaged compressed stream is one line
    naming the file and the last good line."""
    try:
        return f.readline(MAX_JSONL_LINE_BYTES + 1)
    except (gzip.BadGzipFile, lzma.LZMAError, EOFError, zlib.error) as e:
        kind = path.suffix.lstrip(".")
        raise SpellxferError(f"{path}: not a readable {kind} file after line {line} ({e})") from None


def read_json(path: Path, allow_nan: bool = False):
    """A whole JSON file (UTF-8), parsed by :func:`parse_json`; a missing or unreadable file, or
    bad JSON, is one ``SpellxferError`` line naming it."""
    return parse_json(read_text(path, "JSON file"), str(path), allow_nan=allow_nan)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's contents; missing, a directory, unreadable or not UTF-8 is one
    ``SpellxferError`` line naming the file (and the line of the first bad byte)."""
    path = Path(path)
    _regular_file(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpellxferError(f"{path}: no such file (expected a {what})") from None
    except IsADirectoryError:
        raise SpellxferError(f"{path}: is a directory, expected a {what}") from None
    except OSError as e:
        raise SpellxferError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpellxferError(
            f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8"
        ) from None


def _regular_file(path: Path) -> None:
    # A FIFO or a device (a link to /dev/zero, say) would be read forever.
    if path.exists() and not path.is_file() and not path.is_dir():
        raise SpellxferError(f"{path}: is not a regular file")


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases: an alias can make a value refer to itself
    or expand exponentially when we later serialise it (a trial's flags), and no config needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not supported; write the value out",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)


def read_yaml(path: Path, what: str = "YAML file"):
    """A YAML file parsed by :func:`parse_yaml`; missing, a directory or not UTF-8 is one
    ``SpellxferError`` line naming the file."""
    return parse_yaml(read_text(path, what), str(path))


def parse_yaml(text: str, where: str):
    """YAML text parsed safely (no tags that run code, no aliases); invalid YAML, a huge integer
    or deep nesting is one ``SpellxferError`` line that starts with ``where`` (plus the line where
    the parser knows it)."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{where}:{mark.line + 1}" if mark is not None else where
        raise SpellxferError(f"{at}: not valid YAML ({' '.join(str(e.problem or e).split())})") from None
    except yaml.YAMLError as e:
        raise SpellxferError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise SpellxferError(f"{where}: YAML nested too deeply") from None
    except ValueError:  # int() refusing a huge literal
        raise SpellxferError(
            f"{where}: a number with more than {sys.get_int_max_str_digits()} digits"
        ) from None


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
