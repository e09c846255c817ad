"""The configs spellxfer ships (the top-level ``configs/`` folder, installed as the package data
``spellxfer.configs``), found through ``importlib.resources`` rather than relative to a checkout.

A path a user gives (``--config configs/tiny.yaml``, a space file's ``base:``) is read as given
when it exists; a relative ``configs/…`` path that does not exist from the working directory is
the shipped file of that name, so the same command works from a clone and from an installed
wheel in any directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PREFIX = "configs/"


def shipped(relative: str) -> Path:
    """The shipped file ``configs/<relative>`` (it may not exist). Installed (wheel or editable),
    it is package data; a source tree used without installing (``PYTHONPATH=checkout``) has no
    ``spellxfer.configs`` module, and its own ``configs/`` folder is the shipped one."""
    try:
        root = Path(str(resources.files("spellxfer.configs")))
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2] / "configs"
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
