"""The fault suite: kills at random points, a full disk, and what a rerun makes of them.

    make faults                               # this file and every other test marked `faults`
    .venv/bin/python -m pytest -m faults -q   # the same; the summary says how many cases held

Each case runs the real `python -m ablation.train` in a subprocess, breaks it, and asserts that nothing
wrong was produced (no completed record, no temp file, no traceback) and nothing lost (the rerun's
metrics.json and history.csv equal those of an uninterrupted run).
"""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, train

pytestmark = pytest.mark.faults

ARGS = ("regularizer=all", "trainer.epochs=3", "trainer.threads=1", "trainer.checkpoint_every_s=0")
RUN = "wd-do-bn-beta-aug_seed0"
VARYING = {"images_per_s", "train_time_s", "wall_time_s", "study", "wandb_id", "attempts", "earlier_wall_time_s"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_folder) -> dict:
    """An uninterrupted run, its environment (the data cache it filled is shared) and its duration."""
    tmp = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "ABLATION_DATA": str(image_folder), "ABLATION_RESULTS": str(tmp / "results"),
        "ABLATION_CACHE": str(tmp / "cache"), "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    start = time.monotonic()
    train(*ARGS, "study=reference", env=env)
    return {"env": env, "dir": tmp / "results" / "reference" / RUN, "seconds": time.monotonic() - start}


def study_env(reference: dict, tmp_path: Path) -> dict:
    return reference["env"] | {"ABLATION_RESULTS": str(tmp_path / "results")}


def command() -> list[str]:
    return [sys.executable, "-m", "ablation.train", "budget=smoke", "logger=none", *ARGS, "study=faults"]


def assert_same_as_reference(run_dir: Path, reference: dict) -> None:
    a = json.loads((run_dir / "metrics.json").read_text())
    b = json.loads((reference["dir"] / "metrics.json").read_text())
    assert a["status"] == "completed"
    for key in (set(a) | set(b)) - VARYING:
        assert a.get(key) == b.get(key), key
    ha, hb = (pd.read_csv(d / "history.csv") for d in (run_dir, reference["dir"]))
    cols = [c for c in hb.columns if c not in ("images_per_s", "epoch_time_s")]
    pd.testing.assert_frame_equal(ha[cols], hb[cols])
    assert not list(run_dir.glob(".*.tmp")), "no temp file is left"


@pytest.mark.parametrize("seed", range(3))
def test_a_kill_at_a_random_point_then_a_rerun_gives_the_uninterrupted_result(reference, tmp_path, seed):
    env = study_env(reference, tmp_path)
    run_dir = tmp_path / "results" / "faults" / RUN
    delay = random.Random(seed).uniform(0.3, 1.0) * reference["seconds"]
    proc = subprocess.Popen(command(), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (run_dir / "metrics.json").exists():  # whatever the kill left is whole
        status = json.loads((run_dir / "metrics.json").read_text())["status"]
        assert status in ("running", "completed"), status
    rerun = subprocess.run(command(), env=env, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_as_reference(run_dir, reference)


def _limit_file_size(limit: int):
    def preexec() -> None:  # a full disk as the run sees it: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.parametrize("limit_kib", [1, 32])
def test_a_full_disk_fails_in_one_line_and_the_rerun_loses_nothing(reference, tmp_path, limit_kib):
    """1 KiB: the first file fails (before Hydra writes its own); 32 KiB: the first checkpoint, through
    torch.save."""
    env = study_env(reference, tmp_path)
    run_dir = tmp_path / "results" / "faults" / RUN
    proc = subprocess.run(command(), env=env, cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=_limit_file_size(limit_kib * 1024))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large: could not write " + str(run_dir) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "enforce fail" not in proc.stderr, proc.stderr[-3000:]
    assert not list(run_dir.glob(".*.tmp")), "a failed write leaves no temp file"
    if (run_dir / "metrics.json").exists():
        assert json.loads((run_dir / "metrics.json").read_text())["status"] != "completed"
    rerun = subprocess.run(command(), env=env, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_as_reference(run_dir, reference)
