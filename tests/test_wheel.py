"""An installed wheel (not the editable checkout) runs the shipped configs from any directory:
``configs/`` is package data (``spellxfer.configs``), found through importlib.resources, so
``fit --config configs/tiny.yaml`` resolves the same config as in the clone and trains."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = (root / "dist").glob("spellxfer-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    return root / "site"


def run(args, cwd, site=None):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if site is not None:
        env["PYTHONPATH"] = str(site)  # ahead of the editable install: the wheel's copy is imported
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_the_wheel_carries_every_shipped_config(wheel_site):
    shipped = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    installed = {p.relative_to(wheel_site / "spellxfer" / "configs").as_posix()
                 for p in (wheel_site / "spellxfer" / "configs").rglob("*.yaml")}
    assert shipped and installed == shipped


@pytest.mark.slow
def test_an_installed_wheel_fits_with_a_shipped_config_from_another_directory(
    wheel_site, tmp_path, demo_data
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(["-c", "import spellxfer; print(spellxfer.__file__)"], elsewhere, wheel_site)
    assert where.stdout.strip().startswith(str(wheel_site)), where.stdout + where.stderr
    resolved = run(
        ["-m", "spellxfer", "fit", "--config", "configs/tiny.yaml", "--print_config"], elsewhere, wheel_site
    )
    clone = run(["-m", "spellxfer", "fit", "--config", "configs/tiny.yaml", "--print_config"], REPO)
    assert resolved.returncode == 0 and clone.returncode == 0, resolved.stderr + clone.stderr
    assert resolved.stdout == clone.stdout  # the same resolved config, defaults included
    fit = run(["-m", "spellxfer", "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "2",
               "--trainer.val_check_interval", "2", "--data.data_dir", str(demo_data),
               "--trainer.default_root_dir", str(tmp_path / "run")], elsewhere, wheel_site)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (tmp_path / "run" / "best_adapter" / "adapter_model.safetensors").is_file()
