"""Runs that fit a slot: checkpoints on a timer, a deadline that stops a run between epochs, a rerun
that resumes it, and runs that do not start when their study says they would not finish."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from ablation.data import ImageData
from ablation.model import build_model
from ablation.trainer import DeadlineReached, RunSettings, Trainer
from ablation.wandb_logger import NullLogger
from conftest import train


def trainer(compose_cfg, run_dir: Path, *overrides: str) -> Trainer:
    """3 epochs of 5 steps on fixed random images."""
    cfg = compose_cfg("budget=smoke", "model.width=4", "trainer.epochs=3", "trainer.batch_size=8", "logger=none",
                      *overrides)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (36, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(36) % 4
    torch.manual_seed(0)
    return Trainer(build_model(cfg, 32), ImageData(x, y, x[:8], y[:8], list("abcd")), RunSettings.from_cfg(cfg),
                   run_dir, NullLogger())


@pytest.mark.parametrize("every,written", [(0, True), (3600, False)])
def test_checkpoints_follow_the_timer(compose_cfg, tmp_path, every, written):
    t = trainer(compose_cfg, tmp_path, f"trainer.checkpoint_every_s={every}")
    t.fit()
    assert (tmp_path / "checkpoint.pt").exists() is written, "0 s: after every epoch; an hour: none in 3 epochs"
    if written:
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 2, "the last is not saved"


def test_a_deadline_stops_between_epochs_with_a_checkpoint(compose_cfg, tmp_path):
    t = trainer(compose_cfg, tmp_path, "trainer.checkpoint_every_s=3600", f"trainer.deadline={time.time() - 1}")
    with pytest.raises(DeadlineReached) as info:
        t.fit()
    assert info.value.epoch == t.epoch == 1, "stopped at the first epoch end"
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == t.epoch, "the stop writes a checkpoint whatever the timer says"
    resumed = trainer(compose_cfg, tmp_path)
    resumed.load_state_dict(ckpt)
    resumed.fit()
    straight = trainer(compose_cfg, tmp_path / "straight")
    straight.fit()
    assert resumed.epoch_rows[-1]["test_recon"] == straight.epoch_rows[-1]["test_recon"]


SLOW = ("trainer.epochs=4", "trainer.checkpoint_every_s=3600")


def test_a_run_stopped_at_the_deadline_is_interrupted_and_a_rerun_resumes_it(env):
    run_dir = Path(env["ABLATION_RESULTS"]) / "main" / "none_seed0"
    # a deadline already past: nothing says the run would not finish, so it starts, then stops at epoch 1
    stopped = train(*SLOW, env=env | {"ABLATION_DEADLINE": str(time.time() - 1)})
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["epochs_completed"] == 1, m
    assert (run_dir / "checkpoint.pt").exists()
    assert "rerun the same command to resume" in stopped.stdout + stopped.stderr
    resumed = train(*SLOW, env=env)
    assert f"resumed from checkpoint after epoch {m['epochs_completed']}" in resumed.stdout + resumed.stderr
    done = json.loads((run_dir / "metrics.json").read_text())
    assert done["status"] == "completed" and done["epochs_completed"] == 4


def test_a_run_its_study_says_would_not_finish_does_not_start(env):
    results = Path(env["ABLATION_RESULTS"])
    train("trainer.epochs=2", env=env)  # a finished run: the study's measure of how long a run takes
    took = json.loads((results / "main" / "none_seed0" / "metrics.json").read_text())["wall_time_s"]
    soon = {"ABLATION_DEADLINE": str(time.time() + took / 100)}
    proc = train("trainer.epochs=2", "seed=1", env=env | soon)
    assert "none_seed1: not started" in proc.stdout + proc.stderr
    assert not (results / "main" / "none_seed1" / "metrics.json").exists()
    train("trainer.epochs=2", "seed=1", env=env | {"ABLATION_DEADLINE": str(time.time() + 3600)})
    assert (results / "main" / "none_seed1" / "metrics.json").exists()
