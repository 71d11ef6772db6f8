"""Packaging: the wheel ships conf/, and an installed (not editable) ablation-train runs from anywhere.

The wheel is built offline (`pip wheel --no-build-isolation`, setuptools from the dev extras) from a
copy of the sources, and installed with pip into a fresh venv outside the checkout. A full install
of its dependencies (torch with its CUDA libraries) took 12 minutes here, so the fresh venv
reads this venv's site-packages through a .pth file instead, and `pip check` proves that those
versions satisfy the wheel's declared requirements.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ablation.config import CONF_DIR
from conftest import ROOT

# What the build reads; everything else in the checkout stays out of the copy.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ablation", "conf")


def _run(*cmd, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of this checkout's sources."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(path, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src)
    (built,) = (tmp / "dist").glob("vae_ablation-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh venv with the wheel installed by pip; its dependencies are this venv's site-packages."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    # Plain path lines: the directories join sys.path after the venv's own site-packages, and their
    # own .pth files (this checkout's editable install) are not read.
    (purelib / "project-deps.pth").write_text("".join(f"{p}\n" for p in ours))
    # --ignore-installed: the editable install of the same version, visible through the .pth, is not this wheel
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--ignore-installed", wheel)
    return venv


@pytest.fixture
def outside(tmp_path, image_folder) -> tuple[Path, dict]:
    """A working directory outside the checkout, and an environment without this checkout on its path."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ABLATION_")) and k != "PYTHONPATH"}
    env.update(ABLATION_DATA=str(image_folder), ABLATION_RESULTS=str(tmp_path / "results"),
               ABLATION_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return cwd, env


def test_wheel_ships_every_config_file(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    configs = {f"ablation/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert configs and configs <= names, f"missing from the wheel: {sorted(configs - names)[:5]}"
    assert "ablation/train.py" in names and "ablation/bench/cli.py" in names
    assert not any(n.startswith(("tests/", "results/", "conf/")) for n in names)


def test_declared_requirements_are_satisfied(venv):
    proc = _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "check", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_installed_package_is_the_wheel(venv, outside):
    cwd, env = outside
    proc = _run(venv / "bin" / "python", "-c", "import ablation.config as c; print(c.__file__); print(c.CONF_DIR)",
                cwd=cwd, env=env)
    module, conf = map(Path, proc.stdout.split())
    assert module.is_relative_to(venv) and conf == module.parent / "conf" and (conf / "config.yaml").is_file()


def test_installed_cli_prints_the_composed_config(venv, outside, compose_cfg):
    cwd, env = outside
    proc = _run(venv / "bin" / "ablation-train", "--cfg", "job", "regularizer=all", cwd=cwd, env=env)
    assert proc.stdout == OmegaConf.to_yaml(compose_cfg("regularizer=all")), "the same config as the checkout's"


def test_installed_cli_completes_a_smoke_run_from_another_directory(venv, wheel, outside):
    cwd, env = outside
    _run(venv / "bin" / "ablation-train", "budget=smoke", "logger=none", "trainer.threads=1", cwd=cwd, env=env)
    run = Path(env["ABLATION_RESULTS"]) / "main" / "none_seed0"
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["epochs_completed"] == 2
    assert (run / "model.pt").is_file() and (run / "recon_final.png").is_file()
    assert m["provenance"]["git_commit"] is None and m["provenance"]["git_dirty"] is None, "no checkout: null"
    assert m["provenance"]["versions"]["vae-ablation"] == wheel.name.split("-")[1]
    assert not list(cwd.iterdir()), "the run writes under results_dir, not the working directory"
