"""Shared fixtures: composed configs, a generated ImageFolder, and a subprocess runner."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ablation.config import CONF_DIR
from ablation.synthetic import make_imagefolder

ROOT = Path(__file__).resolve().parent.parent

# In-process runs cache decoded data and the suite classifier here, not in the user's ~/.cache.
os.environ.setdefault("ABLATION_CACHE", tempfile.mkdtemp(prefix="ablation-test-cache-"))


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the composed primary config (GlobalHydra cleared afterwards)."""
    GlobalHydra.instance().clear()
    ctx = initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
    ctx.__enter__()

    def _compose(*overrides: str, hydra_cfg: bool = False):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)

    yield _compose
    ctx.__exit__(None, None, None)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A small generated ImageFolder: 4 classes, 256 train and 128 test 32x32 images."""
    return make_imagefolder(tmp_path_factory.mktemp("data") / "fake", n_train=256, n_test=128)


@pytest.fixture
def env(tmp_path, image_folder) -> dict:
    """Environment for training subprocesses: data, results and caches in tmp, W&B off, no key."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    e.update(ABLATION_DATA=str(image_folder), ABLATION_RESULTS=str(tmp_path / "results"),
             ABLATION_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled", HYDRA_FULL_ERROR="0",
             NETRC=str(tmp_path / "no-netrc"), WANDB_DIR=str(tmp_path / "wandb-dir"),
             WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    return e


def run_module(module: str, *args: str, env: dict, check: bool = True, timeout: float = 300,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python -m module args` as a real subprocess; on unexpected failure show its output."""
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def train(*args: str, env: dict, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """`python -m ablation.train [flags] budget=smoke logger=none <overrides>` as a subprocess."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return run_module("ablation.train", *flags, "budget=smoke", "logger=none", *overrides, env=env,
                      check=check, **kw)


def pytest_terminal_summary(terminalreporter) -> None:
    """How many cases of the fault suite (tests marked `faults`) ran, and how many held (passed)."""
    outcomes: dict[str, bool] = {}
    for key in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(key, []):
            if "faults" in getattr(report, "keywords", {}):
                outcomes[report.nodeid] = outcomes.get(report.nodeid, True) and report.passed
    if outcomes:
        terminalreporter.write_line(f"fault suite: {len(outcomes)} cases tried, {sum(outcomes.values())} held")
