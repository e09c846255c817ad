"""The project's two hard policies, checked line by line over the repository.

A developer tool, not part of the runtime package: ``python tools/policy_check.py`` (from the
repository root, in the project's environment) checks the whole checkout; ``make test``, ``.ci/run``
and the pre-commit hook run it. At run time the package enforces the same policies itself: the
Qwen3 chat template has no thinking switch, the server rejects thinking requests, and the loggers
refuse metrics outside the whitelist.

1. **Qwen3 stays in non-thinking mode.** No code path may turn thinking on:

   ``thinking-on``
       the ``enable_thinking`` flag assigned, passed, keyed or defaulted to anything but a literal
       ``False``/``false`` (a variable, ``not x``, a string, a bare annotation with no default,
       an enable-thinking command-line flag). Reading it (``kwargs.get(...)`` without a default, as a
       server does to reject such requests) and prose are fine.
   ``thinking-soft-switch``
       Qwen3's slash-think soft switch in text (prompts, templates, configs). The ``/no_think``
       switch, ``<think>``/``</think>`` tags and longer words such as ``/thinking_budget`` are fine.
   ``thinking-template``
       a ``thinking``/``reasoning`` flag set to true (the kwarg some chat templates read), a Jinja
       template whose ``enable_thinking`` logic defaults to on (``| default(true)``,
       ``is not defined or``), or ``chat_template`` set from a template whose name says
       *thinking* (``non_thinking``/``no_think`` names are fine: that is our own template).
   ``thinking-model``
       a Qwen3 ``…-Thinking`` checkpoint (the 2507 Thinking models cannot run without thinking).

2. **Only position, count and transfer metrics are reported.** ``spelling-metric`` flags metric
   names, logged keys and report fields that join *spelling* (or *spell*) with an accuracy word
   (acc, accuracy, em, exact_match, score, f1, cer, wer, error_rate, …) through ``_``, ``/``, ``.``
   or ``-``, in either order, and CamelCase metric classes. Prose with a space between the words,
   a data field ``task: spelling`` and subtask names such as ``spell_reversed`` are fine.

Which files: by default everything git tracks under the root plus untracked files git does not
ignore (``git ls-files --cached --others --exclude-standard``), or, outside a git checkout, a walk
that skips virtualenvs, caches and run outputs. Only code, config and doc files are read (see
``SUFFIXES``; ``.jsonl`` data files are not). A file named explicitly is scanned whatever its suffix.

Escape hatches: a line that must *show* a forbidden example (a doc explaining this policy, a test
of a server that rejects thinking requests) may carry the marker ``spellxfer-check: allow``
anywhere on it, usually in a trailing comment. That line, and only that line, is skipped. A test
file under ``tests/`` whose job is to write forbidden examples (the tests of this tool) may carry
``spellxfer-check: allow-file`` in its first 10 lines instead; the whole file is then skipped.
Only ``tests/`` has the file-wide form: code, configs and docs that ship are always read line by
line. Every use is visible to ``git grep``; use them for examples, never for code that runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.text import Text

from spellxfer.core.errors import SpellxferError
from spellxfer.tasks.chat import SOFT_SWITCH

console = Console()

ALLOW_MARKER = "spellxfer-check: allow"
ALLOW_FILE_MARKER = "spellxfer-check: allow-file"
ALLOW_FILE_DIR = "tests"  # the only top-level folder whose files may opt out wholesale
ALLOW_FILE_LINES = 10  # the file marker must sit at the top, where a reader sees it

SUFFIXES = frozenset(
    {".py", ".yaml", ".yml", ".toml", ".json", ".md", ".rst", ".txt", ".cfg", ".ini", ".jinja", ".j2",
     ".ipynb", ".sh"}
)
# Only used when walking a tree without git; in a checkout, .gitignore decides (a results file
# someone committed on purpose is part of the repo and is checked).
SKIP_DIRS = frozenset(
    {".venv", "venv", ".git", "__pycache__", "node_modules", "build", "dist", "checkpoints", "results",
     "wandb", "lightning_logs", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".tox"}
)

# --- thinking-on -------------------------------------------------------------------------------
# The flag as a kwarg (`=`), a dict/YAML/JSON key (`:`), a subscript (`["…"] =`) or an annotation.
# `==` is a comparison, not a setting, hence `=(?!=)`. The quote may be JSON-escaped (notebooks).
THINKING_ASSIGN = re.compile(
    r"(?<![A-Za-z0-9])enable_thinking(?P<quote>\\?[\"'])?\]?\s*(?P<op>=(?!=)|:)\s*(?P<value>.*)",
    re.IGNORECASE,
)
# A read with a default: `.get("…", True)` turns thinking on whenever the caller says nothing.
THINKING_GET_DEFAULT = re.compile(
    r"\.(?:get|setdefault|pop)\(\s*\\?[\"']enable_thinking\\?[\"']\s*,\s*(?P<value>.*)", re.IGNORECASE
)
THINKING_CLI_FLAG = re.compile(r"--enable[-_]thinking\b(?!(?:=|\s+)false\b)", re.IGNORECASE)
# A literal false that is the whole expression: `False or x`, `False if a else True` and
# `False | x` are not literals, but prose after one ("=False to the template") does not matter.
FALSE_LITERAL = re.compile(r"(?:False|false|FALSE)\b(?!\s*(?:(?:or|and|if|else)\b|[|&^+\-*/.@<>=!(\[]))")
# What may precede a Python annotation `enable_thinking: T`: start of statement, `self.`, or a
# parameter list. Anything else before the colon is a block (`if x.enable_thinking:`), a read.
PY_ANNOTATION_PREFIX = re.compile(r"(?:^\s*(?:self\.)?|[(,]\s*)$")

# --- thinking-soft-switch ----------------------------------------------------------------------
# SOFT_SWITCH comes from spellxfer.tasks.chat: the server rejects the same pattern in requests.

# --- thinking-template -------------------------------------------------------------------------
THINKING_KWARG = re.compile(
    r"(?<![\w./-])[\"']?(?:thinking|reasoning)[\"']?\s*(?:=(?!=)|:)\s*(?:True|true)\b"
)
# Jinja logic under which thinking is on unless a caller switches it off.
TEMPLATE_DEFAULT_ON = re.compile(
    r"enable_thinking\s*\|\s*default\(\s*true\s*\)|enable_thinking\s+is\s+(?:not\s+defined|undefined)\s+or\b",
    re.IGNORECASE,
)
# `chat_template` set to a name, variable or path, bare or inside one call (`Path("…")`,
# `load(…)`): the first operand is what gets installed. An inline template string starts with
# `{`, so its `<think>` tags are never read as a name.
CHAT_TEMPLATE_SET = re.compile(
    r"(?<![A-Za-z0-9])chat_template(?:_name)?"
    r"\\?[\"']?\s*(?:=(?!=)|:)\s*(?:[\w.]+\()?\\?[\"']?(?P<name>[\w./-]+)",
    re.IGNORECASE,
)
NEGATED_THINK = re.compile(r"(?:non|no|without|disabled?|strip(?:ped)?|skip)[_-]?think", re.IGNORECASE)

# --- thinking-model ----------------------------------------------------------------------------
THINKING_MODEL = re.compile(r"(?<![A-Za-z0-9])qwen3[\w.-]*?(?<!non)(?<!no)-thinking(?![a-z])", re.IGNORECASE)

# --- spelling-metric ---------------------------------------------------------------------------
_METRIC_WORD = (
    r"(?:acc(?:uracy)?|em|exact(?:_?match)?|match(?:es)?|score|f1|correct(?:ness)?|cer|wer"
    r"|(?:error|err|pass|success)_rate)"
)
_SPELL = r"spell(?:ing)?"
SPELLING_METRIC = re.compile(
    # Spelling first, then a separator and an accuracy word. Extra `_segments` may sit between
    # (a subtask's accuracy), except ones that make it a transfer metric (`_to`, `_count`, …).
    r"(?<![A-Za-z0-9])" + _SPELL + r"(?:_(?!(?:count|position|pos|transfer|to)(?![A-Za-z0-9]))[A-Za-z0-9]+)*?"
    r"[_/.\-]" + _METRIC_WORD + r"(?![A-Za-z0-9])"
    # The accuracy word first; then the two must make up the whole token.
    r"|(?<![A-Za-z0-9_])" + _METRIC_WORD + r"[_/.\-]" + _SPELL + r"(?![A-Za-z0-9_])"
    # A CamelCase torchmetrics-style class.
    r"|\b" + _SPELL + r"(?:acc(?:uracy)?|exactmatch|em|score|f1|cer|wer)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Violation:
    """One offending line."""

    path: str  # relative to the scanned root, with `/` separators
    line: int  # 1-based
    rule: str
    text: str  # the line, stripped
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


@dataclass(frozen=True)
class Rule:
    """A policy rule: its id, the message a violation prints, and the line test."""

    id: str
    message: str
    hits: Callable[[str, str], bool]  # (line, lower-case file suffix) -> does the line break the rule


def _is_false(value: str) -> bool:
    return FALSE_LITERAL.match(value.strip()) is not None


def _thinking_on(line: str, suffix: str) -> bool:
    if "thinking" not in line.lower():
        return False
    if THINKING_CLI_FLAG.search(line):
        return True
    for m in THINKING_GET_DEFAULT.finditer(line):
        value = m["value"].strip()
        if not (_is_false(value) or value.startswith("None")):
            return True
    for m in THINKING_ASSIGN.finditer(line):
        value = m["value"].strip()
        if m["op"] == "=":
            if not _is_false(value):
                return True
            continue
        if not value or value.startswith("#") or _is_false(value):
            continue  # off, or a YAML mapping opener / Python block colon that sets nothing
        if suffix == ".py" and not m["quote"]:
            # Unquoted `enable_thinking:` in Python is an annotation or a block colon.
            if not PY_ANNOTATION_PREFIX.search(line[: m.start()]):
                continue
            annotation, eq, default = value.partition("=")
            if eq and not default.startswith("="):
                if not _is_false(default):
                    return True
            elif "Literal[False]" not in annotation.replace(" ", ""):
                return True  # a parameter or field with no default: any caller may pass True
            continue
        if not _is_false(value):
            return True
    return False


def _soft_switch(line: str, suffix: str) -> bool:
    return "think" in line and SOFT_SWITCH.search(line) is not None


def _thinking_template(line: str, suffix: str) -> bool:
    lower = line.lower()
    if "think" not in lower and "reasoning" not in lower:
        return False
    if THINKING_KWARG.search(line) or TEMPLATE_DEFAULT_ON.search(line):
        return True
    return any(
        "think" in m["name"].lower() and not NEGATED_THINK.search(m["name"])
        for m in CHAT_TEMPLATE_SET.finditer(line)
    )


def _thinking_model(line: str, suffix: str) -> bool:
    return "thinking" in line.lower() and THINKING_MODEL.search(line) is not None


def _spelling_metric(line: str, suffix: str) -> bool:
    return "spell" in line.lower() and SPELLING_METRIC.search(line) is not None


RULES: tuple[Rule, ...] = (
    Rule("thinking-on", "enable_thinking is set to something other than a literal False; "
         "Qwen3 must stay in non-thinking mode", _thinking_on),
    Rule("thinking-soft-switch", "Qwen3's think soft switch turns thinking on for the turn; "
         "remove it (the no_think form is allowed)", _soft_switch),
    Rule("thinking-template", "selects a thinking chat template or a template that thinks by "
         "default; use spellxfer's non-thinking template", _thinking_template),
    Rule("thinking-model", "a Qwen3 Thinking checkpoint cannot run without thinking; "
         "use the base or Instruct model", _thinking_model),
    Rule("spelling-metric", "spelling accuracy must not be measured or reported; "
         "only position, count and transfer metrics are", _spelling_metric),
)


def scan_text(text: str, path: str = "<text>", suffix: str = ".py") -> list[Violation]:
    """Violations in one file's text; ``suffix`` decides how a colon after the flag is read."""
    out = []
    # split("\n"), not splitlines(): form feeds and U+2028 must not shift line numbers.
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if ALLOW_MARKER in line:
            continue
        for rule in RULES:
            if rule.hits(line, suffix):
                out.append(Violation(path, n, rule.id, line.strip(), rule.message))
    return out


def files_to_scan(root: Path, paths: Sequence[Path] | None = None) -> list[Path]:
    """The files :func:`scan` reads, absolute and sorted.

    Args:
        root: repository root.
        paths: files or directories, relative to ``root`` or absolute; default ``[root]``.
            Directories contribute their code/config/doc files; a named file is always included.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SpellxferError(f"check root {root} is not a directory")
    found: set[Path] = set()
    for p in paths if paths is not None else [root]:
        p = Path(p)
        full = (p if p.is_absolute() else root / p).resolve()
        if full.is_file():
            found.add(full)
        elif full.is_dir():
            found.update(f for f in _list_dir(full) if _wanted(f, root))
        else:
            raise SpellxferError(f"no such file or directory: {p}")
    return sorted(found, key=lambda f: _display(f, root))


def scan(root: Path, paths: Sequence[Path] | None = None) -> list[Violation]:
    """Every policy violation in the repository at ``root`` (or in ``paths`` under it).

    Args:
        root: repository root; violation paths are relative to it.
        paths: files or directories to scan instead of the whole root (see :func:`files_to_scan`).

    Returns:
        Violations ordered by path and line; empty when the files are clean.
    """
    root = Path(root).resolve()
    out: list[Violation] = []
    for f in files_to_scan(root, paths):
        data = f.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary: nothing a policy line could live in
        text = data.decode("utf-8", errors="replace")
        if allowed_file(_display(f, root), text):
            continue
        out += scan_text(text, _display(f, root), f.suffix.lower())
    return out


def allowed_file(path: str, text: str) -> bool:
    """Whether ``path`` (relative to the root, ``/`` separators) opts out of the scan: it is under
    ``tests/`` and carries :data:`ALLOW_FILE_MARKER` in its first :data:`ALLOW_FILE_LINES` lines."""
    if path.split("/", 1)[0] != ALLOW_FILE_DIR:
        return False
    return any(ALLOW_FILE_MARKER in line for line in text.split("\n", ALLOW_FILE_LINES)[:ALLOW_FILE_LINES])


def check(paths: list[str] | None = None, root: str = ".") -> int:
    """Check the repo against the policies: Qwen3 never thinks, no spelling accuracy is reported.

    Prints each violation as ``path:line: [rule] message`` and a one-line summary. A line that
    must show a forbidden example can end with the marker ``spellxfer-check: allow``.

    Args:
        paths: files or directories to check (relative to the current directory); default: all
            files git tracks, or would track, under ``root``.
        root: repository root; reported paths are relative to it.

    Returns:
        0 when clean, 1 when violations were found.
    """
    root_path = Path(root).resolve()
    # On the command line, paths are relative to where the user stands, not to --root.
    targets = None if paths is None else [Path(p).absolute() for p in paths]
    for t, given in zip(targets or [], paths or [], strict=True):
        if not t.exists():
            raise SpellxferError(f"no such file or directory: {given}")
    files = files_to_scan(root_path, targets)
    violations = scan(root_path, files)
    for v in violations:
        console.print(
            Text.assemble((f"{v.path}:{v.line}: ", "bold"), (f"[{v.rule}]", "red"), f" {v.message}"),
            soft_wrap=True,
        )
        console.print(Text(f"    {v.text}", style="dim"), soft_wrap=True)
    if violations:
        n_files = len({v.path for v in violations})
        console.print(
            Text(f"policy check: {len(violations)} violation(s) in {n_files} file(s), "
                 f"{len(files)} file(s) scanned", style="bold red"),
            soft_wrap=True,
        )
        return 1
    console.print(Text(f"policy check: clean, {len(files)} file(s) scanned", style="green"), soft_wrap=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python tools/policy_check.py [PATH ...] [--root DIR]``: 0 clean, 1 violations, 2 a bad path."""
    parser = argparse.ArgumentParser(
        prog="python tools/policy_check.py",
        description="Check the repository against spellxfer's policies: Qwen3 never thinks, no "
        "spelling accuracy is measured or reported.",
    )
    parser.add_argument("paths", nargs="*", help="files or directories to check (default: the whole root)")
    parser.add_argument("--root", default=".", help="repository root; reported paths are relative to it")
    args = parser.parse_args(argv)
    try:
        return check(args.paths or None, args.root)
    except SpellxferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _wanted(f: Path, root: Path) -> bool:
    suffix = f.suffix.lower()
    if suffix in SUFFIXES:
        return True
    # CI scripts under .ci/ are often suffix-less executables.
    parts = f.relative_to(root).parts if f.is_relative_to(root) else f.parts
    return suffix == "" and ".ci" in parts[:-1]


def _list_dir(directory: Path) -> list[Path]:
    """Files under ``directory``: git's view of the checkout if it is one, else a filtered walk."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(directory), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
        )
    except FileNotFoundError:  # no git installed
        proc = None
    if proc is not None and proc.returncode == 0:
        names = proc.stdout.decode("utf-8", errors="surrogateescape").split("\0")
        # Tracked files deleted in the working tree are still listed; they have nothing to scan.
        return [f for f in (directory / n for n in names if n) if f.is_file()]
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(dirpath) / name for name in filenames]
    return out


def _display(f: Path, root: Path) -> str:
    return f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f)


if __name__ == "__main__":
    sys.exit(main())
