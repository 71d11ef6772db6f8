"""The measures computed from a run's history (ablation.metrics), the validation split and the recon grid."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ablation import metrics as M
from ablation.collect import collect_run, read_history
from ablation.data import ImageData, split_validation
from ablation.model import build_model
from ablation.trainer import GRID_CLASSES, RunSettings, Trainer, first_of_each_class
from ablation.wandb_logger import NullLogger
from conftest import train

RESULTS = Path(__file__).resolve().parent.parent / "results"
STEPS_PER_EPOCH, EVERY = 100, 10  # step rows of the constructed histories: every 10th step, 10 rows an epoch


def history(epochs: int, loss=None, kl=None, windows=None, **epoch_columns) -> pd.DataFrame:
    """A history.csv frame: `epochs` epoch rows with the given per-epoch columns, and a step row every EVERY
    steps whose train_loss, train_kl and window_steps are the given sequences (one per row)."""
    n = epochs * STEPS_PER_EPOCH // EVERY
    steps = np.arange(1, n + 1) * EVERY
    loss = np.full(n, 100.0) if loss is None else np.asarray(loss, float)
    kl = np.full(n, 10.0) if kl is None else np.asarray(kl, float)
    windows = np.full(n, EVERY) if windows is None else np.asarray(windows)
    epoch_rows = pd.DataFrame({"kind": "epoch", "epoch": np.arange(1, epochs + 1),
                               "step": np.arange(1, epochs + 1) * STEPS_PER_EPOCH, "train_loss": 100.0,
                               "train_kl": 10.0, "test_recon": 100.0, "trainsub_recon": 99.0, "gen_gap": 1.0}
                              | epoch_columns)
    step_rows = pd.DataFrame({"kind": "step", "epoch": (steps - 1) // STEPS_PER_EPOCH + 1, "step": steps,
                              "train_loss": loss, "train_recon": loss - kl, "train_kl": kl, "grad_norm": 1.0,
                              "window_steps": windows})
    return pd.concat([epoch_rows, step_rows]).sort_values(["step", "kind"], kind="stable", ignore_index=True)


# ---------------------------------------------------------------------------------------- the spike detector


def decaying(n: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A loss curve decaying from 300 towards 100, with Gaussian noise of std `noise`."""
    return 100 + 200 * np.exp(-np.arange(n) / 400) + np.random.default_rng(seed).normal(0, noise, n)


def test_spike_detector_finds_planted_spikes_at_their_positions():
    x = decaying(600, noise=1.0)
    planted = [12, 50, 200, 201, 420, 587]  # the first and last rows with a full centred window, two in a row
    x[planted] += 10.0  # 10σ; at row 50 the decay falls by 0.44σ a row, 11σ over the window
    assert np.flatnonzero(M.spikes(x, 5.0, 25)).tolist() == planted
    edges = decaying(600, noise=1.0)
    edges[[5, 590]] += 10.0
    assert not M.spikes(edges, 5.0, 25).any(), "rows without a full centred window are not examined"


def test_spike_detector_finds_none_in_a_smooth_or_stationary_curve():
    assert not M.spikes(decaying(600), 5.0, 25).any(), "a smooth decay"
    assert not M.spikes(decaying(600, noise=1.0), 5.0, 25).any(), "a smooth decay with noise"
    assert not M.spikes(np.random.default_rng(1).normal(50, 3, 1000), 5.0, 25).any(), "stationary noise"
    flat = np.full(100, 7.0)
    flat[30] = 7.5
    assert np.flatnonzero(M.spikes(flat, 5.0, 25)).tolist() == [30], "a MAD of 0: any rise above the median"


def test_detrended_series_and_its_noise_scale():
    x = np.arange(10.0) ** 2  # monotone: each element is the median of its centred window
    assert M.detrended(x, 5).tolist() == [0.0] * 6
    steps = 30.0 + np.tile([-2.0, -1.0, 0.0, 1.0, 2.0], 3)  # a slope of 30 a row; any 5 differences: 28..32
    x = np.concatenate([[0.0], np.cumsum(steps)])
    assert M.noise_scale(x, 5).tolist() == pytest.approx([1.4826 / math.sqrt(2)] * 12), \
        "differences 28..32 about their median 30: MAD 1, whatever the slope"
    assert M.noise_scale(3.0 * np.arange(12), 5).tolist() == [0.0] * 8


def test_a_steep_descent_neither_hides_nor_fakes_spikes():
    x = 1000 - 2.0 * np.arange(300) + np.random.default_rng(5).normal(0, 0.5, 300)  # 4σ a row
    assert not M.spikes(x, 5.0, 25).any()
    x[[100, 230]] += 6.0  # 12σ: the spike lifts its window's median by one rank (2), leaving it 8σ above
    assert np.flatnonzero(M.spikes(x, 5.0, 25)).tolist() == [100, 230]


def test_loss_spikes_from_history_after_the_warmup_with_full_windows():
    epochs, window = 6, 15
    loss = decaying(epochs * 10, noise=0.5)
    loss[[3, 25, 41]] += 30.0  # row 3 is in the first epoch (the warm-up)
    found = M.derived_metrics(history(epochs, loss=loss), spike_k=5.0, spike_window=window)
    examined = (epochs - 1) * 10 - window + 1  # the rows after epoch 1 with a full centred window
    assert found["loss_spikes"] == 2 and found["loss_spike_rate"] == pytest.approx(2 / examined)
    short = M.derived_metrics(history(epochs, loss=loss), spike_window=26)  # 50 rows < 2·26 − 1
    assert math.isnan(short["loss_spikes"]) and math.isnan(short["loss_spike_rate"]), \
        "too few rows for the window: undefined"


def test_a_row_over_fewer_steps_is_not_a_spike():
    """A row averaging a short window (a resume) is noisier by construction; it is left out, not flagged."""
    loss = decaying(60, noise=0.5)
    loss[30] += 30.0
    windows = np.full(60, EVERY)
    windows[30] = 2
    short = M.derived_metrics(history(6, loss=loss, windows=windows), spike_k=5.0, spike_window=15)
    assert short["loss_spikes"] == 0 and short["loss_spike_rate"] == 0.0
    full = M.derived_metrics(history(6, loss=loss), spike_k=5.0, spike_window=15)
    assert full["loss_spikes"] == 1 and full["loss_spike_rate"] == pytest.approx(1 / (50 - 14))


def test_row_straddling_the_end_of_the_first_epoch_is_warmup():
    """Step rows every 15 steps, epochs of 100 steps: the row at step 105 averages steps 91-105."""
    frame = history(6)
    steps = frame[frame["kind"] == "step"]
    every15 = steps.assign(step=steps["step"] * 1.5, window_steps=15)
    assert M.after_warmup(every15, frame[frame["kind"] == "epoch"])["step"].min() == 120


def test_kl_spikes_counts_spikes_of_the_step_kl():
    kl = 20 + 0.01 * np.arange(80) + np.random.default_rng(2).normal(0, 0.1, 80)
    kl[[33, 60]] += 5.0
    found = M.derived_metrics(history(8, kl=kl), spike_k=5.0, spike_window=25)
    assert found["kl_spikes"] == 2 and found["loss_spikes"] == 0


# ---------------------------------------------------------------------------------------- KL fluctuation


def test_kl_fluct_is_zero_for_a_smooth_trend_and_sigma_over_mean_with_noise():
    i = np.arange(2000)
    trend = 30 + 0.004 * i + 1e-6 * i ** 2  # a steady, slightly accelerating drift, as the unregularized KL's
    assert M.kl_fluct(trend, 25) == pytest.approx(0.0, abs=1e-12)
    assert M.kl_fluct(30 + 10 * (1 - np.exp(-i / 500)), 25) == pytest.approx(0.0, abs=1e-6), "a smooth rise"
    sigma = 0.4
    noisy = trend + np.random.default_rng(3).normal(0, sigma, i.size)
    assert M.kl_fluct(noisy, 25) == pytest.approx(sigma / noisy[12:-12].mean(), rel=0.04)
    steep = 30 + 0.5 * i + np.random.default_rng(3).normal(0, sigma, i.size)  # a trend of 1.25σ a row
    assert M.kl_fluct(steep, 25) == pytest.approx(sigma / steep[12:-12].mean(), rel=0.04)
    assert math.isnan(M.kl_fluct(noisy[:48], 25)) and not math.isnan(M.kl_fluct(noisy[:49], 25)), \
        "fewer than 2·25 − 1 rows: undefined"


def test_kl_fluct_from_history_leaves_out_the_warmup():
    n = 200
    kl = 15 + 0.02 * np.arange(n)
    kl[:STEPS_PER_EPOCH // EVERY] += np.linspace(10, 0, STEPS_PER_EPOCH // EVERY)  # the first epoch's transient
    kl[10:] += np.random.default_rng(4).normal(0, 0.3, n - 10)
    found = M.derived_metrics(history(20, kl=kl))
    assert found["kl_fluct"] == pytest.approx(M.kl_fluct(kl[10:], 25), rel=1e-12)
    assert found["kl_fluct"] == pytest.approx(0.3 / kl[10 + 12:n - 12].mean(), rel=0.15)


# ---------------------------------------------------------------------------------------- overfitting


def test_gap_growth_against_the_first_epoch_after_ten_percent():
    assert [M.early_epoch(e) for e in (1, 2, 9, 10, 19, 20, 50)] == [1, 1, 1, 2, 2, 3, 6]
    e = np.arange(1, 21)
    assert M.gap_growth(history(20, gen_gap=np.full(20, 0.5))) == pytest.approx(0.0), "a flat gap"
    assert M.gap_growth(history(20, gen_gap=0.1 * e)) == pytest.approx(0.1 * (20 - 3)), "from epoch 3 of 20"
    settling = np.where(e <= 2, 4.0, 1.5)  # a gap that settles in the first 10% of training
    assert M.gap_growth(history(20, gen_gap=settling)) == pytest.approx(0.0), "the early transient is skipped"
    assert math.isnan(M.gap_growth(history(1))), "one epoch: no growth to measure"


def test_recon_rise_and_the_validation_minimum():
    e = np.arange(1, 21)
    curve = 80 + (e - 7.0) ** 2  # lowest at epoch 7, rising after
    found = M.derived_metrics(history(20, test_recon=curve, val_recon=curve + 2, val_kl=10.0))
    assert found["recon_rise"] == pytest.approx(13.0 ** 2)
    assert found["best_epoch_val"] == 7 and found["best_epoch_interior"] is True
    assert found["val_recon_rise"] == pytest.approx(13.0 ** 2)
    falling = M.derived_metrics(history(20, test_recon=200 - e, val_recon=210.0 - e))
    assert falling["recon_rise"] == 0.0 and falling["val_recon_rise"] == 0.0
    assert falling["best_epoch_val"] == 20 and falling["best_epoch_interior"] is False
    none = M.derived_metrics(history(20, test_recon=curve))  # data.val_size=null: no val_recon column
    assert math.isnan(none["best_epoch_val"]) and math.isnan(none["val_recon_rise"])
    assert none["best_epoch_interior"] is None


def test_every_derived_metric_is_defined_in_metrics():
    found = M.derived_metrics(history(4))
    assert set(found) == set(M.DERIVED_METRICS) and set(M.DERIVED_METRICS) <= set(M.METRICS)


@pytest.mark.parametrize("study", ["none-vs-all", "factorial"])
def test_committed_epoch_only_histories(study):
    """A study's history.csv keeps the epoch rows only (no `kind` column): the epoch measures come out, the
    step-row measures are nan."""
    frame = pd.read_csv(RESULTS / "cifar10-cpu" / study / "history.csv")
    assert "kind" not in frame
    for run, rows in frame.groupby("run_name"):
        found = M.derived_metrics(rows)
        assert np.isfinite(found["gap_growth"]) and found["recon_rise"] >= 0, run
        last = rows["epoch"].max()
        gap = rows.set_index("epoch")["gen_gap"]
        assert found["gap_growth"] == pytest.approx(gap[last] - gap[M.early_epoch(last)]), run
        for key in ("kl_fluct", "kl_spikes", "loss_spikes", "loss_spike_rate", "best_epoch_val", "loss_volatility"):
            assert math.isnan(found[key]), (run, key)
        assert found["best_epoch_interior"] is None


# ---------------------------------------------------------------------------------------- the validation split


def labelled(n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images whose every pixel is their index (an id to find them by), with labels cycling over classes."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return x, torch.arange(n) % classes


def ids(x: torch.Tensor) -> set[int]:
    return set(x[:, 0, 0, 0].tolist())


def test_split_validation_is_stratified_disjoint_and_fixed_by_its_seed():
    x, y = labelled(100, 4)
    data = ImageData(x, y, x[:8], y[:8], list("abcd"))
    rest, val_x, val_y = split_validation(data, 20, seed=3)
    assert torch.bincount(val_y).tolist() == [5, 5, 5, 5]
    assert ids(val_x).isdisjoint(ids(rest.train_x)) and ids(val_x) | ids(rest.train_x) == set(range(100))
    assert (rest.train_y == rest.train_x[:, 0, 0, 0].long() % 4).all() and (val_y == val_x[:, 0, 0, 0].long() % 4).all()
    assert ids(split_validation(data, 20, seed=3)[1]) == ids(val_x)
    assert ids(split_validation(data, 20, seed=4)[1]) != ids(val_x)
    unsplit, no_x, no_y = split_validation(data, None, seed=3)
    assert unsplit is data and no_x is None and no_y is None


def trainer_for(compose_cfg, tmp_path, *overrides: str) -> Trainer:
    cfg = compose_cfg("budget=smoke", "regularizer=none", "model.width=4", "logger=none", *overrides)
    x, y = labelled(120, 4)
    test_x, test_y = labelled(16, 4)
    order = torch.argsort(test_y, stable=True)  # class-sorted, as CIFAR-10's test set
    data = ImageData(x, y, test_x[order], test_y[order], list("abcd"))
    return Trainer(build_model(cfg, 32), data, RunSettings.from_cfg(cfg), tmp_path, NullLogger())


def test_trainer_holds_validation_images_out_of_training_and_trainsub(compose_cfg, tmp_path):
    trainer = trainer_for(compose_cfg, tmp_path, "data.val_size=20")
    val = ids(trainer.val_x)
    assert len(val) == 20 and torch.bincount(trainer.val_y).tolist() == [5, 5, 5, 5]
    assert val.isdisjoint(ids(trainer.data.train_x)) and len(trainer.data.train_x) == 100
    assert trainer.batches.images is trainer.data.train_x, "the batches come from the remaining images"
    assert val.isdisjoint(ids(trainer.trainsub_x)) and len(trainer.trainsub_x) == 16
    assert ids(trainer_for(compose_cfg, tmp_path, "data.val_size=20", "seed=5").val_x) == val, \
        "the same for every run"
    assert ids(trainer_for(compose_cfg, tmp_path, "data.val_size=20", "data.subset_seed=1").val_x) != val
    unsplit = trainer_for(compose_cfg, tmp_path)
    assert unsplit.val_x is None and len(unsplit.data.train_x) == 120


def test_validation_split_run(env, tmp_path):
    """A smoke run with a validation split writes val_recon per epoch; collecting it gives best_epoch_val."""
    train("data.val_size=64", env=env)
    run_dir = tmp_path / "results" / "main" / "none_seed0"
    frame = read_history(run_dir / "history.csv")
    epochs = frame[frame["kind"] == "epoch"]
    assert epochs["epoch"].tolist() == [1, 2]
    assert epochs[["val_recon", "val_kl"]].notna().all().all() and (epochs["val_recon"] > 0).all()
    row, _ = collect_run(run_dir, "main")
    assert row["included"] and row["best_epoch_val"] in (1, 2)
    assert row["best_epoch_interior"] is (row["best_epoch_val"] == 1)
    assert row["val_recon_rise"] == pytest.approx(epochs["val_recon"].iloc[-1] - epochs["val_recon"].min())
    with Image.open(run_dir / "recon_final.png") as grid:  # 4 classes: 4 columns of 32 px, 2 px padding
        assert grid.size == (4 * 34 + 2, 2 * 34 + 2)


# ---------------------------------------------------------------------------------------- the recon grid


def test_recon_grid_holds_the_first_test_image_of_each_class(compose_cfg, tmp_path):
    trainer = trainer_for(compose_cfg, tmp_path)
    labels = trainer.data.test_y
    assert labels.tolist() == sorted(labels.tolist()), "the test set is class-sorted"
    first = [int(torch.nonzero(labels == c)[0, 0]) for c in range(4)]
    assert torch.equal(trainer.grid_x, trainer.data.test_x[first])
    path = trainer.save_recon_grid(tmp_path / "grid.png")
    with Image.open(path) as grid:
        assert grid.size == (4 * 34 + 2, 2 * 34 + 2)
    twelve = torch.arange(36) % 12
    assert first_of_each_class(twelve, GRID_CLASSES).tolist() == list(range(10)), "at most 10 classes"
