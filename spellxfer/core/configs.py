"""The configs spellxfer ships (the top-level ``configs/`` folder, installed as the package data
``spellxfer.configs``), found through ``importlib.resources`` rather than relative to a checkout.

A path a user gives (``--config configs/tiny.yaml``, a space file's ``base:``) is read as given
when it exists; a relative ``configs/…`` path that does not exist from the working directory is
the shipped file of that name, so the same command works from a clone and from an installed
wheel in any directory.

Config files that are not ``fit`` configs (a sweep space, the deployment config) are pydantic
models read by :func:`load_file`: the YAML reader every file shares, then the model, and any
mistake is one ``FILE: key: problem`` line.
"""

from __future__ import annotations

import typing
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from spellxfer.core.errors import SpellxferError
from spellxfer.core.outputs import read_yaml

if TYPE_CHECKING:
    from pydantic import BaseModel

M = TypeVar("M", bound="BaseModel")

PREFIX = "configs/"


def shipped(relative: str) -> Path:
    """The shipped file ``configs/<relative>`` (it may not exist): package data of an installed
    spellxfer (wheel or editable). Never looked up next to the source files: a source tree used
    without installing (``PYTHONPATH=checkout``) has no ``spellxfer.configs`` module, and then
    ``configs/<relative>`` is read from the working directory like any path a user gives (so run
    it from the checkout's root, or install it)."""
    try:
        root = Path(str(resources.files("spellxfer.configs")))
    except ModuleNotFoundError:
        root = Path("configs")
    return root.joinpath(*relative.split("/"))


def config_path(value: str | Path) -> Path:
    """``value`` when it exists from here; else the shipped ``configs/…`` file of that name, if any;
    else ``value`` unchanged (its reader then names it in a one-line error)."""
    path = Path(value)
    if path.exists() or path.is_absolute():
        return path
    text = path.as_posix()
    if text.startswith(PREFIX):
        candidate = shipped(text[len(PREFIX) :])
        if candidate.is_file():
            return candidate
    return path


def load_file(model: type[M], path: str | Path, what: str) -> M:
    """The YAML file ``path`` validated as ``model`` (a pydantic model); its first mistake is one
    :class:`SpellxferError` line ``FILE: key.path: problem`` (what was given, and for an unknown
    key the known ones)."""
    from pydantic import ValidationError  # not at import time: most commands read no such file

    path = Path(path)
    data = read_yaml(path, what)
    if not isinstance(data, dict):
        raise SpellxferError(f"{path}: (top level): expected a mapping with {', '.join(model.model_fields)}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(part) for part in err["loc"] if part != "[key]"]  # "[key]": a mapping key was refused
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            known = f"; known: {', '.join(owner.model_fields)}" if owner else ""
            msg = f"unknown {getattr(owner, 'unknown_key', 'key')}{known}"
        elif err["type"] in ("model_type", "dict_type"):
            owner = _model_at(model, loc)
            fields = " with " + ", ".join(owner.model_fields) if owner else ""
            msg = f"expected a mapping{fields}, got {err['input']!r}"
        elif err["type"] not in ("value_error", "missing"):  # pydantic's own words lack the value
            msg += f" (got {err['input']!r})"
        # a check across keys (a model validator) names its keys in its message
        raise SpellxferError(f"{path}: {'.'.join(loc)}: {msg}" if loc else f"{path}: {msg}") from None


def _model_at(model: type, loc: list[str]) -> type | None:
    """The pydantic model that holds the key at ``loc`` (for the list of known keys), if any."""
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        options = typing.get_args(annotation) or (annotation,)  # X | None: its X
        model = next((t for t in options if hasattr(t, "model_fields")), None)
    return model if hasattr(model, "model_fields") else None
