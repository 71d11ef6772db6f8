"""What a run was computed with beyond its config: package versions, the code's commit, the machine.

    python -m ablation.provenance        # this machine's record (CPU device) as JSON

`collect(device)` is what ablation/train.py records under "provenance" in metrics.json and in the
W&B config (docs/outputs.md). It never enters config_hash or settings_hash: the same config on
another machine or commit is the same run. It reads package metadata and /proc, and runs git up to
three times; it imports nothing of the project and does no torch work beyond naming the GPU.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("vae-ablation", "torch", "torchvision", "hydra-core", "omegaconf", "wandb", "numpy")
# The files that decide what a run computes: a change to these (committed or not) makes the checkout
# dirty; results, docs and tests do not.
CODE_PATHS = ("ablation", "conf", "pyproject.toml")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_CHECKOUT = Path(__file__).resolve().parent.parent  # the checkout's root when the code runs from one


def versions() -> dict:
    """The installed version of each of PACKAGES and of Python; None for a package that is absent."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found | {"python": platform.python_version()}


def _git(*args: str) -> str | None:
    """git's stdout in the checkout, or None when git is missing or fails. GIT_OPTIONAL_LOCKS=0: `git status`
    leaves the index alone, so it never holds index.lock while the user runs git in the checkout."""
    try:
        proc = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True, timeout=30,
                              env=os.environ | {"GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the code runs from; (None, None) for an installed package
    (also one installed into a venv inside some repository) and where git is missing."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _CHECKOUT:
        return None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", *CODE_PATHS)
    return commit, None if commit is None or status is None else bool(status)


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo, else what the platform says, else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def collect(device: torch.device) -> dict:
    """The provenance of a run on `device`, taken after its thread count is set (runtime.activate)."""
    commit, dirty = git_state()
    return {"versions": versions(), "git_commit": commit, "git_dirty": dirty,
            "cpu": cpu_model(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "thread_env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
            "platform": platform.platform()}


if __name__ == "__main__":
    print(json.dumps(collect(torch.device("cpu")), indent=2))
