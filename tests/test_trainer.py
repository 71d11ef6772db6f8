"""The training loop's step rows: windows of log_interval steps, across epoch boundaries."""
from __future__ import annotations

import torch

from ablation.data import ImageData
from ablation.model import build_model
from ablation.trainer import RunSettings, Trainer
from ablation.wandb_logger import NullLogger


def fit(compose_cfg, tmp_path, log_interval: int) -> Trainer:
    """3 epochs of 5 steps (4 of 8 images and a last one of 4) on fixed random images."""
    cfg = compose_cfg("budget=smoke", "regularizer=none", "model.width=4", "trainer.epochs=3", "trainer.batch_size=8",
                      f"trainer.log_interval={log_interval}", "logger=none")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (36, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(36) % 4
    torch.manual_seed(0)
    trainer = Trainer(build_model(cfg, 32), ImageData(x, y, x[:8], y[:8], list("abcd")), RunSettings.from_cfg(cfg),
                      tmp_path / f"every{log_interval}", NullLogger())
    trainer.fit()
    return trainer


def test_step_rows_average_log_interval_steps_across_epochs(compose_cfg, tmp_path):
    every = fit(compose_cfg, tmp_path, 1).step_rows  # one row per step: the per-step losses
    assert [r["step"] for r in every] == list(range(1, 16)) and all(r["window_steps"] == 1 for r in every)
    rows = fit(compose_cfg, tmp_path, 4).step_rows
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["window_steps"] == 4 for r in rows), "windows run on over epoch ends (5 steps an epoch)"
    images = [4 if r["step"] % 5 == 0 else 8 for r in every]  # the last batch of each epoch is partial
    for row in rows:
        window = range(row["step"] - 4, row["step"])
        for key in ("train_loss", "train_recon", "train_kl"):
            mean = sum(every[i][key] * images[i] for i in window) / sum(images[i] for i in window)
            assert abs(row[key] - mean) <= 1e-9 * abs(mean), (row["step"], key)
