"""Provenance: a run records package versions, the code's commit, the machine and its threads.

A real smoke run with W&B offline (metrics.json and the W&B config), and ablation/provenance.py
run as a subprocess from a throwaway git repository to see when a checkout is dirty.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ablation import config as C
from ablation import provenance
from conftest import ROOT, train
from wandb_records import offline_run_dirs, read_run

PACKAGES = ("torch", "torchvision", "hydra-core", "wandb", "numpy")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, image_folder) -> Path:
    """One budget=smoke run from this checkout with W&B offline; its run directory."""
    tmp = tmp_path_factory.mktemp("provenance")
    (tmp / "netrc").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(ABLATION_DATA=str(image_folder), ABLATION_RESULTS=str(tmp / "results"),
               ABLATION_CACHE=str(tmp / "cache"), WANDB_MODE="offline", NETRC=str(tmp / "netrc"),
               WANDB_DIR=str(tmp / "wandb-dir"), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
               WANDB_CONFIG_DIR=str(tmp / "wandb-config"), OMP_NUM_THREADS="1")
    # conftest's train adds logger=none; a later logger= override wins
    train("logger=wandb", "trainer.threads=1", env=env)
    return tmp / "results" / "main" / "none_seed0"


def test_metrics_json_records_versions_commit_machine_and_threads(smoke_run):
    m = json.loads((smoke_run / "metrics.json").read_text())
    assert m["status"] == "completed"
    p = m["provenance"]
    for name in PACKAGES:
        assert p["versions"][name] == metadata.version(name), name
    assert p["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert p["git_commit"] == _git(ROOT, "rev-parse", "HEAD")
    assert isinstance(p["git_dirty"], bool)
    assert p["cpu"] and isinstance(p["cpu"], str)
    assert p["gpu"] is None, "a CPU run names no GPU"
    assert p["threads"] == 1 == m["threads"], "the torch threads the run used (trainer.threads=1)"
    assert p["thread_env"] == {"OMP_NUM_THREADS": "1"}
    assert p["cores"] >= 1 and p["interop_threads"] >= 1


def test_wandb_config_records_the_same_provenance(smoke_run):
    (run_dir,) = offline_run_dirs(smoke_run / "wandb")
    recorded = json.loads((smoke_run / "metrics.json").read_text())["provenance"]
    assert read_run(run_dir).config["provenance"] == recorded


def test_provenance_stays_out_of_the_hashes(smoke_run):
    """The hashes the run recorded are those of its resolved config.yaml, which holds no provenance."""
    m = json.loads((smoke_run / "metrics.json").read_text())
    cfg = OmegaConf.load(smoke_run / "config.yaml")
    assert "provenance" not in cfg
    assert (m["config_hash"], m["settings_hash"]) == (C.config_hash(cfg), C.settings_hash(cfg))


def _state_of(repo: Path) -> list:
    """git_state() of a copy of ablation/provenance.py inside `repo`, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", "import json; from ablation.provenance import git_state; "
                          "print(json.dumps(git_state()))"], cwd=repo.parent,
                         env={"PYTHONPATH": str(repo), "PATH": os.environ["PATH"]}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_dirty_means_the_code_differs_from_the_commit(tmp_path):
    repo = tmp_path / "checkout"
    (repo / "ablation").mkdir(parents=True)
    (repo / "conf").mkdir()
    (repo / "results").mkdir()
    shutil.copy(provenance.__file__, repo / "ablation" / "provenance.py")
    (repo / "ablation" / "__init__.py").write_text("")
    (repo / "conf" / "config.yaml").write_text("seed: 0\n")
    (repo / "results" / "runs.csv").write_text("a\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "c")
    commit = _git(repo, "rev-parse", "HEAD")
    assert _state_of(repo) == [commit, False]
    (repo / "results" / "runs.csv").write_text("a\n1\n")  # results do not make the code dirty
    (repo / "README.md").write_text("notes\n")
    assert _state_of(repo) == [commit, False]
    (repo / "conf" / "config.yaml").write_text("seed: 1\n")
    assert _state_of(repo) == [commit, True]
    _git(repo, "checkout", "-q", "--", "conf")
    (repo / "ablation" / "new.py").write_text("")  # an uncommitted module is a change too
    assert _state_of(repo) == [commit, True]


def test_outside_a_checkout_or_without_git_the_commit_is_null(tmp_path, monkeypatch):
    plain = tmp_path / "site-packages"
    (plain / "ablation").mkdir(parents=True)
    shutil.copy(provenance.__file__, plain / "ablation" / "provenance.py")
    (plain / "ablation" / "__init__.py").write_text("")
    assert _state_of(plain) == [None, None]
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert provenance.git_state() == (None, None)
    assert provenance.collect(torch.device("cpu"))["git_commit"] is None
