"""The per-run metrics: each defined once in METRICS, and those computed from a run's history.

A metric is one value per run, a column of runs.csv. Most are final metrics that training
writes to metrics.json (FINAL_METRICS); the others (DERIVED_METRICS) are computed here from the
rows of the run's history.csv, by pure functions of its frame. METRICS holds every metric's
label, unit and definition; the report's appendix prints them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Metric:
    """A per-run metric: its column in runs.csv, a table label, its unit and its definition."""

    key: str
    label: str
    unit: str
    definition: str


METRICS: dict[str, Metric] = {m.key: m for m in [
    Metric("test_recon", "test recon", "SSE/image",
           "Test reconstruction loss: squared error summed over the C·H·W pixel values on the [-1, 1] "
           "scale, mean over test images (the objective's reconstruction term). From metrics.json."),
    Metric("mse01", "MSE", "per pixel, [0,1] scale",
           "Per-pixel mean squared error of the test set on the [0, 1] scale: test_recon / (4·D), D = C·H·W."),
    Metric("psnr", "PSNR", "dB", "Peak signal-to-noise ratio, 10·log10(1 / mse01), from the test-set mean MSE."),
    Metric("test_kl", "test KL", "nats/image",
           "Final test KL(q(z|x) ‖ N(0, I)), summed over latents, mean over test images."),
    Metric("kl_cv", "train KL CV", "std/mean",
           "KL control: coefficient of variation (sample std / mean) of the per-epoch train KL (`train_kl` of "
           "the epoch rows of history.csv) over the second half of training, the epochs e > E/2 of E; "
           "undefined with fewer than 2 such epochs. Lower = more controlled."),
    Metric("kl_max_jump", "train KL max jump", "nats/image",
           "KL control: the largest absolute change of the per-epoch train KL between consecutive epochs; "
           "undefined with fewer than 2 epochs."),
    Metric("neg_elbo", "neg. ELBO", "nats/image",
           "β-independent test negative ELBO (β = 1): -log p(x|z) + KL for a Gaussian decoder with σ² = 1/2 on "
           "the [-1, 1] scale, so -log p(x|z) = SSE + (D/2)·log π; z is drawn as in training (noise_scale), so "
           "it is a true ELBO only at noise_scale = 1. Comparable across β, unlike the training loss."),
    Metric("bits_per_dim", "bits/dim", "bits per dimension, 0..255 scale",
           "neg_elbo moved to the 0..255 pixel scale by the change of variables x = v/127.5 - 1 (adds D·log 127.5 "
           "nats), divided by D·log 2. A continuous density without dequantization, so not comparable to the "
           "discrete likelihoods of the literature."),
    Metric("gen_gap", "gen. gap", "SSE/image",
           "Generalization gap at the end of training: test recon minus the recon of a fixed, class-stratified "
           "train subset of the test set's size (both in eval mode, without augmentation)."),
    Metric("max_gen_gap", "max gen. gap", "SSE/image", "The largest per-epoch generalization gap over training."),
    Metric("best_epoch", "best epoch", "epoch", "The epoch with the lowest test recon."),
    Metric("loss_volatility", "loss volatility", "std of Δ log loss",
           "Training stability: sample std of the first differences of log(train_loss) over the step rows of "
           "history.csv (each a mean over log_interval steps; rows over fewer steps are left out) in the second half "
           "of training, steps s > S/2 of S. Scale-free; undefined with fewer than 3 such rows. Lower = more "
           "stable."),
    Metric("active_units", "active units", "latents",
           "Latent dimensions whose posterior-mean variance over the test set exceeds 0.01."),
    Metric("probe_acc", "probe accuracy", "fraction",
           "Test accuracy of a standardized logistic regression fit on the posterior means of the train subset."),
]}

# Final metrics every completed metrics.json holds.
FINAL_METRICS = ("test_recon", "test_kl", "test_loss", "trainsub_recon", "trainsub_kl", "trainsub_loss",
                 "gen_gap", "max_gen_gap", "best_epoch", "mse01", "psnr", "neg_elbo", "bits_per_dim",
                 "active_units", "probe_acc", "epochs_completed", "steps", "images_per_s", "train_time_s",
                 "wall_time_s")
DERIVED_METRICS = ("kl_cv", "kl_max_jump", "loss_volatility")


def second_half(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows whose `column` (epoch or step) exceeds half its largest value: the second half of training."""
    return rows[rows[column] > rows[column].max() / 2].sort_values(column)


def kl_cv(epochs: pd.DataFrame) -> float:
    """Coefficient of variation (sample std / mean) of train_kl over the second-half epoch rows."""
    kl = second_half(epochs, "epoch")["train_kl"]
    return float(kl.std(ddof=1) / kl.mean()) if len(kl) >= 2 else math.nan


def kl_max_jump(epochs: pd.DataFrame) -> float:
    """Largest absolute change of train_kl between consecutive epochs."""
    jumps = epochs.sort_values("epoch")["train_kl"].diff().abs().dropna()
    return float(jumps.max()) if len(jumps) else math.nan


def window_steps(steps: pd.DataFrame, epoch_ends: pd.Series) -> pd.Series:
    """How many training steps each step row averages.

    history.csv records it (`window_steps`). A history.csv without that column restarted the window
    at every epoch, so a row's window there began after the previous step row or the previous
    epoch's last step, whichever came later.
    """
    steps = steps.sort_values("step")
    recorded = steps["window_steps"] if "window_steps" in steps else pd.Series(np.nan, index=steps.index)
    ends = np.concatenate([[0.0], np.sort(epoch_ends.dropna().to_numpy(float))])
    at = steps["step"].to_numpy(float)
    previous_row = np.concatenate([[0.0], at[:-1]])
    previous_end = ends[np.searchsorted(ends, at, side="left") - 1]  # the last epoch end before each row
    inferred = pd.Series(at - np.maximum(previous_row, previous_end), index=steps.index)
    return recorded.fillna(inferred)


def loss_volatility(steps: pd.DataFrame, total_steps: float, epoch_ends: pd.Series | None = None) -> float:
    """Sample std of the first differences of log(train_loss) over the step rows with step > total_steps/2
    that average a full window (the most steps any row averages); shorter windows are noisier."""
    if len(steps):
        windows = window_steps(steps, epoch_ends if epoch_ends is not None else pd.Series(dtype=float))
        steps = steps.loc[windows.index[windows == windows.max()]]
    loss = steps[steps["step"] > total_steps / 2].sort_values("step")["train_loss"].to_numpy(float)
    if len(loss) < 3 or (loss <= 0).any():
        return math.nan
    return float(np.diff(np.log(loss)).std(ddof=1))


def derived_metrics(history: pd.DataFrame) -> dict:
    """The per-run metrics computed from history.csv (see METRICS)."""
    epochs = history[history["kind"] == "epoch"]
    steps = history[history["kind"] == "step"]
    return {"kl_cv": kl_cv(epochs), "kl_max_jump": kl_max_jump(epochs),
            "loss_volatility": loss_volatility(steps, epochs["step"].max(), epochs["step"])}

