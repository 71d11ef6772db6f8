"""The per-run metrics: each defined once in METRICS, and those computed from a run's history.

A metric is one value per run, a column of runs.csv. Most are final metrics that training
writes to metrics.json (FINAL_METRICS); the others (DERIVED_METRICS) are computed here from the
rows of the run's history.csv, by pure functions of its frame. METRICS holds every metric's
label, unit and definition; the report's appendix prints them.

history.csv holds two kinds of rows. An epoch row is written after each epoch: its `test_*`,
`trainsub_*` and (with data.val_size) `val_*` columns come from an evaluation pass in eval mode
(dropout off, batch norm on its running statistics, no augmentation), while its `train_*`
columns are the running mean of the training steps' losses in train mode. Curves that compare
the fit on training and test images use `trainsub_recon`, never `train_recon`. A step row
holds the train-mode losses averaged over the `window_steps` steps since the previous step row.

The step-row measures (kl_fluct, kl_spikes, loss_spikes, loss_spike_rate) look at the step rows
after the warm-up (first) epoch that average a full window (a row over fewer steps is noisier by
construction, not a spike), each against a trend over the `window` rows centred on it
(eval.spike_window): a rolling median for the spike detector, a Savitzky–Golay fit for kl_fluct.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import savgol_coeffs

from .config import EvalConfig


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
    Metric("kl_fluct", "train KL fluctuation", "noise std/mean",
           "KL control without the trend: std(r) / √(1 − c₀) / mean(KL). KL is `train_kl` of the step rows "
           "examined (those of loss_spikes); r = KL − its trend, a quadratic Savitzky–Golay fit over the w = "
           "eval.spike_window rows centred on each row (w + 1 when w is even), at the rows with a full centred "
           "window; mean(KL) is over those rows; c₀ is the filter's centre weight (0.090 at w = 25), since white "
           "noise of std σ leaves residuals of std σ·√(1 − c₀). A steady drift or any trend quadratic over w rows "
           "gives 0; noise of std σ gives σ/mean. Undefined with fewer than 2w − 1 rows. Lower = more controlled."),
    Metric("kl_spikes", "train KL spikes", "step rows",
           "KL control: the number of examined step rows whose `train_kl` is a spike, by the detector of "
           "loss_spikes. Undefined with fewer than 2w − 1 rows. Lower = more controlled."),
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
    Metric("gap_growth", "gen. gap growth", "SSE/image",
           "Overfitting: gap(E) − gap(e₀), the per-epoch gen. gap (`gen_gap` of the epoch rows: test recon minus "
           "train-subset recon, both in eval mode) at the last epoch E minus that at e₀ = ⌊E/10⌋ + 1, the first "
           "epoch after 10% of training (E = 20: epoch 3; E = 10: epoch 2; E = 50: epoch 6). Subtracting gap(e₀) "
           "removes the offset between the two image sets that is there before the model could memorize "
           "anything; e₀ is a fixed fraction of training, so runs of different lengths compare alike, and it "
           "skips the first epochs, where the recon (and any offset proportional to it) falls fastest. Undefined "
           "for E < 2. Lower = less overfitting; > 0 means the gap widened."),
    Metric("best_epoch", "best epoch", "epoch", "The epoch with the lowest test recon."),
    Metric("recon_rise", "test recon rise", "SSE/image",
           "Overfitting: test recon at the last epoch minus its minimum over the epochs (eval mode, per epoch); "
           "≥ 0, and 0 when the test recon is lowest at the end. How far the test recon rose after its minimum. "
           "Lower = less overfitting."),
    Metric("best_epoch_val", "best val epoch", "epoch",
           "Overfitting: the epoch of the lowest validation recon (`val_recon` of the epoch rows, eval mode), on "
           "data.val_size class-stratified images carved from the training set by data.subset_seed and never "
           "trained on, so the test set is used once. Undefined (null) when data.val_size is null (no split). "
           "Earlier than the last epoch = the run overfits (or stops improving) before the end."),
    Metric("val_recon_rise", "val recon rise", "SSE/image",
           "Overfitting: validation recon at the last epoch minus its minimum over the epochs; ≥ 0. Undefined "
           "when data.val_size is null. Lower = less overfitting."),
    Metric("best_epoch_interior", "val minimum before the end", "true/false",
           "Overfitting: whether best_epoch_val is before the last epoch (true: the validation recon rose, or "
           "stopped falling, before training ended). Undefined when data.val_size is null."),
    Metric("loss_volatility", "loss volatility", "std of Δ log loss",
           "Training stability: sample std of the first differences of log(train_loss) over the step rows of "
           "history.csv (each a mean over log_interval steps; rows over fewer steps are left out) in the second half "
           "of training, steps s > S/2 of S. Scale-free; undefined with fewer than 3 such rows. Lower = more "
           "stable."),
    Metric("loss_spikes", "loss spikes", "step rows",
           "Training stability: the number of examined step rows whose `train_loss` x is a spike: x − m > k·σ̂, "
           "with m the rolling median of x over the w = eval.spike_window rows centred on the row, k = "
           "eval.spike_k, and σ̂ = 1.4826 · MAD(Δx) / √2, the noise std from the median absolute deviation of the "
           "w first differences of x around the row (about their median, which removes a local linear trend; "
           "1.4826 scales a MAD to a Gaussian std, √2 undoes the differencing). So k counts noise standard "
           "deviations, and neither a steep descent nor the spike itself widens σ̂; a w-row MAD is itself noisy, "
           "so at k = 5, w = 25 about 2 rows in 10⁴ of stationary Gaussian noise are flagged. Examined: the step "
           "rows whose window of steps lies wholly after the first epoch (the warm-up) and that average a full "
           "window (the most steps any row averages; a shorter window, at a resume, is noisier by construction, "
           "not a spike), and of those the rows with a full centred window (all but the first ⌊w/2⌋ and the last "
           "⌈w/2⌉ − 1). Undefined with fewer than 2w − 1 rows. Lower = more stable."),
    Metric("loss_spike_rate", "loss spike rate", "fraction of step rows",
           "Training stability: loss_spikes divided by the number of step rows it examines. Lower = more stable."),
    Metric("active_units", "active units", "latents",
           "Latent dimensions whose posterior-mean variance over the test set exceeds 0.01."),
    Metric("probe_acc", "probe accuracy", "fraction",
           "Test accuracy of a standardized logistic regression fit on the posterior means of the train subset."),
    Metric("recon_mean", "test recon (posterior mean)", "SSE/image",
           "Test reconstruction loss of the deterministic reconstructions decode(mu): squared error summed over the "
           "C·H·W pixel values on the [-1, 1] scale, mean over test images. Unlike test_recon (z drawn with "
           "noise_scale), a wider posterior does not raise it. Lower = better."),
    Metric("psnr_mean", "PSNR (posterior mean)", "dB",
           "10·log10(1 / MSE) with MSE = recon_mean / (4·D), the test-set mean per-pixel squared error of decode(mu)"
           " on the [0, 1] scale. Higher = better."),
    Metric("ssim", "SSIM (posterior mean)", "≤ 1",
           "Mean over test images of the SSIM of decode(mu) against the original, both on [0, 1] (pytorch-msssim "
           "ssim: data_range 1, 11×11 Gaussian window, σ 1.5, K = (0.01, 0.03), map averaged over valid positions "
           "and channels). 1 = identical. Higher = better."),
    Metric("sharp_hf_ratio", "recon HF energy ratio", "recon / original",
           "High-frequency energy of decode(mu) over that of the original test images. HF energy of an image: per "
           "channel, |FFT2|²/(H·W) of the mean-removed [0, 1] image, averaged over rings round(radius·32) (width "
           "1/32 cycles/pixel) and summed over channels, then summed over rings of radius > 0.25 cycles/pixel; mean "
           "over images. Below 1 = blurrier than the data. Closer to 1 = better."),
    Metric("sharp_lap_ratio", "recon Laplacian ratio", "recon / original",
           "Variance over pixels of the 3×3 Laplacian [[0,1,0],[1,-4,1],[0,1,0]] of the grey level (0.299R + 0.587G "
           "+ 0.114B, [0, 1] scale, valid positions), mean over test images, for decode(mu) over the same for the "
           "originals. Below 1 = blurrier. Closer to 1 = better."),
    Metric("sample_hf_ratio", "sample HF energy ratio", "samples / real",
           "The HF energy of sharp_hf_ratio for eval.sample_images prior samples (decode(z), z ~ N(0, I) from a "
           "generator seeded by the run's seed, rounded to uint8) over that of as many class-stratified real test "
           "images (the same images for every run; with fewer test images, all of them and as many samples). Closer "
           "to 1 = better."),
    Metric("sample_lap_ratio", "sample Laplacian ratio", "samples / real",
           "The Laplacian variance of sharp_lap_ratio for the same prior samples over the same real test images. "
           "Closer to 1 = better."),
    Metric("kl_spectrum", "KL spectrum", "nats per latent (list)",
           "Mean over test images of each latent's KL(q(z_j|x) ‖ N(0, 1)) = ½(μ_j² + σ_j² − log σ_j² − 1), sorted in"
           " descending order; sums to test_kl. A list in metrics.json, not a column of runs.csv; no direction."),
    Metric("active_units_kl", "active units (KL)", "latents",
           "Number of latents whose mean test KL (kl_spectrum) exceeds 0.01 nats. Higher = more latents carry "
           "information about x."),
    Metric("knn_probe_acc", "k-NN probe accuracy", "fraction",
           "Test accuracy of a 10-nearest-neighbour classifier (scikit-learn, Euclidean, uniform votes) on "
           "standardized posterior means (scaler fit on the train subset), fit on the train-subset means and scored "
           "on the test means. Chance = 1/classes. Higher = better."),
    Metric("iw_nll", "IW bound", "nats/image",
           "Importance-weighted upper bound on −log p(x): −log (1/k) Σ_i p(x|z_i) p(z_i) / q(z_i|x), k = "
           "eval.iw_samples, z_i ~ q(z|x) = N(μ, (noise_scale·σ)²) (z exactly as in training), prior N(0, I), "
           "Gaussian decoder with σ² = ½ on the [-1, 1] scale (−log p(x|z) = SSE + (D/2)·log π). Mean over "
           "eval.iw_images class-stratified test images (the same for every run), fixed-seed draws, log-sum-exp in "
           "float64. Valid at any noise_scale and independent of β; at k = 1 and noise_scale = 1 its expectation is "
           "the negative ELBO. Lower = better."),
    Metric("iw_bpd", "IW bits/dim", "bits per dimension, 0..255 scale",
           "iw_nll moved to the 0..255 scale (adds D·log 127.5 nats) and divided by D·log 2, as bits_per_dim; a "
           "continuous density without dequantization. Lower = better."),
    Metric("fd_suite", "FD (suite classifier)", "squared feature units",
           "Fréchet distance between Gaussians fitted to the suite classifier's 192-d penultimate features of "
           "eval.sample_images prior samples and as many real test images: ‖μg−μr‖² + Tr(Σg+Σr−2(ΣgΣr)^½). Not FID: "
           "the feature net is the suite's own CIFAR classifier, so values compare only within this suite and at "
           "equal sample counts (FD is biased in N). Lower = closer to real images."),
    Metric("kid_suite", "kernel distance (suite classifier)", "MMD²",
           "KID-style kernel distance in the same features: unbiased MMD² with k(x,y)=(xᵀy/d+1)³, mean over 100 "
           "random subset pairs of min(1000, N) images (seed 0). ≈0 when samples match the data (can be slightly "
           "negative); unbiased in N. Lower = closer."),
    Metric("precision_suite", "precision (suite classifier)", "fraction",
           "k-NN precision (Kynkäänniemi et al. 2019, k=3) in the suite classifier's features: fraction of prior "
           "samples inside the union of the real test images' 3-NN balls. Fidelity; higher = better; read together "
           "with recall (a collapsed sampler can score 1)."),
    Metric("recall_suite", "recall (suite classifier)", "fraction",
           "k-NN recall, k=3: fraction of real test images inside the union of the prior samples' 3-NN balls. "
           "Coverage/diversity; higher = better."),
    Metric("classifier_acc", "suite classifier accuracy", "fraction",
           "Test accuracy of the suite classifier whose features the *_suite measures use (trained once per dataset "
           "for eval.classifier_epochs epochs, cached under data.cache_dir). The same for every run on one dataset."),
    Metric("fid_inception", "FID (Inception-v3)", "squared feature units",
           "Fréchet Inception Distance in torch-fidelity's Inception-v3 2048-d pool features (images quantized to "
           "uint8, resized to 299×299 by torch-fidelity), from the local file eval.inception_weights; null when that"
           " is null (metrics.json's measures_skipped says so). Prior samples vs as many test images, so not "
           "comparable to published FID-50k figures. Lower = better."),
    Metric("kid_inception", "KID (Inception-v3)", "MMD²",
           "Kernel Inception Distance (torch-fidelity, cubic polynomial kernel, 100 subsets of min(1000, N), seed 0)"
           " in the same Inception features; null when eval.inception_weights is null. Lower = better."),
]}

# Final metrics every completed metrics.json holds: a run without one of them is incomplete.
CORE_METRICS = ("test_recon", "test_kl", "test_loss", "trainsub_recon", "trainsub_kl", "trainsub_loss",
                "gen_gap", "max_gen_gap", "best_epoch", "mse01", "psnr", "neg_elbo", "bits_per_dim",
                "active_units", "probe_acc", "epochs_completed", "steps", "images_per_s", "train_time_s",
                "wall_time_s")
# The end-of-run measures of ablation/measures.py and sample_quality.py: every new run holds them
# (a number, or null with its reason in measures_skipped); in runs made before them they are missing,
# so they count as not measured there rather than making the run incomplete.
MEASURES = ("recon_mean", "psnr_mean", "ssim", "sharp_hf_ratio", "sharp_lap_ratio", "sample_hf_ratio",
            "sample_lap_ratio", "active_units_kl", "knn_probe_acc", "iw_nll", "iw_bpd", "fd_suite", "kid_suite",
            "precision_suite", "recall_suite", "classifier_acc", "fid_inception", "kid_inception")
FINAL_METRICS = CORE_METRICS + MEASURES
DERIVED_METRICS = ("kl_cv", "kl_max_jump", "loss_volatility", "gap_growth", "recon_rise", "best_epoch_val",
                   "val_recon_rise", "best_epoch_interior", "kl_fluct", "kl_spikes", "loss_spikes",
                   "loss_spike_rate")

MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): the MAD of Gaussian noise times this is its standard deviation


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


# ----------------------------------------------------------------------------- overfitting (epoch rows)


def early_epoch(last_epoch: int) -> int:
    """e₀ of gap_growth: the first epoch after 10% of `last_epoch` epochs, ⌊E/10⌋ + 1."""
    return last_epoch // 10 + 1


def _epoch_values(epochs: pd.DataFrame, column: str) -> pd.Series:
    """`column` of the epoch rows indexed by epoch, rows without a value left out; empty when absent."""
    if column not in epochs:
        return pd.Series(dtype=float)
    return epochs.set_index("epoch")[column].dropna().sort_index()


def gap_growth(epochs: pd.DataFrame) -> float:
    """gen_gap at the last epoch minus gen_gap at early_epoch(last epoch)."""
    gap = _epoch_values(epochs, "gen_gap")
    if len(gap) < 2:
        return math.nan
    last = int(gap.index[-1])
    start = early_epoch(last)
    return float(gap.iloc[-1] - gap.loc[start]) if start in gap.index and start < last else math.nan


def recon_rise(epochs: pd.DataFrame, column: str = "test_recon") -> float:
    """`column` at the last epoch minus its minimum over the epochs (>= 0)."""
    values = _epoch_values(epochs, column)
    return float(values.iloc[-1] - values.min()) if len(values) else math.nan


def best_epoch_val(epochs: pd.DataFrame) -> int | float:
    """The epoch of the lowest val_recon (the first such, on ties); nan without a validation split."""
    val = _epoch_values(epochs, "val_recon")
    return int(val.idxmin()) if len(val) else math.nan


def best_epoch_interior(epochs: pd.DataFrame) -> bool | None:
    """Whether the lowest val_recon comes before the last epoch; None without a validation split."""
    val = _epoch_values(epochs, "val_recon")
    return bool(val.idxmin() < val.index[-1]) if len(val) else None


# ----------------------------------------------------------------------------- step rows


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


def after_warmup(steps: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """The step rows the spike and fluctuation measures examine, sorted by step: those that average a full
    window (the most steps any row averages) and whose window lies wholly after the first epoch."""
    if steps.empty:
        return steps
    windows = window_steps(steps, epochs["step"] if "step" in epochs else pd.Series(dtype=float))
    first_end = epochs.loc[epochs["epoch"] == 1, "step"]
    if len(first_end):
        after = steps["step"] - windows >= float(first_end.iloc[0])
    else:  # no epoch row to say where epoch 1 ended: the rows written during a later epoch
        after = steps["epoch"] > 1
    return steps[(windows == windows.max()) & after].sort_values("step")


def enough_rows(n: int, window: int) -> bool:
    """Whether `n` step rows give the step-row measures at least `window` rows with a full centred window."""
    return n >= 2 * window - 1


def centred(x: np.ndarray, window: int) -> np.ndarray:
    """The elements of `x` with a full centred window of `window` elements: all but the first window//2
    and the last (window-1)//2."""
    return x[window // 2: len(x) - (window - 1) // 2]


def detrended(x: np.ndarray, window: int) -> np.ndarray:
    """centred(x) minus its centred rolling median: x[i + h] - median(x[i : i + window]), h = window // 2."""
    x = np.asarray(x, float)
    return centred(x, window) - np.median(sliding_window_view(x, window), axis=1)


def noise_scale(x: np.ndarray, window: int) -> np.ndarray:
    """Per element of centred(x): the std of the noise around the trend, estimated robustly from the `window`
    first differences of x centred on it (shifted inward at the last element) as 1.4826 · MAD / √2. Centring
    the differences on their median removes a local linear trend, so a steep descent does not widen it; the
    median leaves a spike out."""
    d = sliding_window_view(np.diff(np.asarray(x, float)), window)
    mad = np.median(np.abs(d - np.median(d, axis=1)[:, None]), axis=1)
    at = np.minimum(np.arange(len(x) - window + 1), len(d) - 1)  # differences i .. i+window-1 span row i + h
    return MAD_TO_SIGMA / math.sqrt(2) * mad[at]


def spikes(x: np.ndarray, k: float, window: int) -> np.ndarray:
    """Boolean mask over `x`: the elements above their centred rolling median by more than k · noise_scale.
    Elements without a full centred window are never spikes. Needs enough_rows(len(x), window)."""
    mask = np.zeros(len(x), dtype=bool)
    mask[window // 2: len(x) - (window - 1) // 2] = detrended(x, window) > k * noise_scale(x, window)
    return mask


def spike_count(x: np.ndarray, k: float, window: int) -> tuple[int | float, int]:
    """(the number of spikes in `x`, the number of elements examined); (nan, 0) with too few elements."""
    if not enough_rows(len(x), window):
        return math.nan, 0
    return int(spikes(x, k, window).sum()), len(x) - window + 1


def kl_fluct(kl: np.ndarray, window: int) -> float:
    """The std of KL around a quadratic Savitzky–Golay trend over `window` rows (made odd), corrected to the
    noise std, divided by the mean KL, at the rows with a full centred window; nan with too few rows."""
    kl = np.asarray(kl, float)
    if not enough_rows(len(kl), window):
        return math.nan
    odd = window | 1
    coeffs = savgol_coeffs(odd, 2)  # symmetric: the trend at a row is coeffs · (the rows centred on it)
    residual = centred(kl, odd) - np.convolve(kl, coeffs, mode="valid")
    mean = centred(kl, odd).mean()
    # white noise of std σ leaves residuals of std σ·√(1 - c₀), c₀ the filter's centre weight
    return float(np.std(residual, ddof=1) / math.sqrt(1 - coeffs[odd // 2]) / mean) if mean > 0 else math.nan


def derived_metrics(history: pd.DataFrame, spike_k: float = EvalConfig.spike_k,
                    spike_window: int = EvalConfig.spike_window) -> dict:
    """The per-run metrics computed from history.csv (see METRICS); spike_k and spike_window are the
    run's eval.spike_k and eval.spike_window.

    A frame without a `kind` column (a study's history.csv, which keeps the epoch rows only) is
    taken as epoch rows: the step-row measures are then nan.
    """
    kind = history["kind"] if "kind" in history else pd.Series("epoch", index=history.index)
    epochs = history[kind == "epoch"]
    steps = history[kind == "step"]
    examined = after_warmup(steps, epochs)
    kl = examined["train_kl"].to_numpy(float) if "train_kl" in examined else np.array([])
    loss = examined["train_loss"].to_numpy(float) if "train_loss" in examined else np.array([])
    loss_spikes, examined_rows = spike_count(loss, spike_k, spike_window)
    return {"kl_cv": kl_cv(epochs), "kl_max_jump": kl_max_jump(epochs),
            "loss_volatility": loss_volatility(steps, epochs["step"].max(), epochs["step"]),
            "gap_growth": gap_growth(epochs), "recon_rise": recon_rise(epochs, "test_recon"),
            "best_epoch_val": best_epoch_val(epochs), "val_recon_rise": recon_rise(epochs, "val_recon"),
            "best_epoch_interior": best_epoch_interior(epochs),
            "kl_fluct": kl_fluct(kl, spike_window), "kl_spikes": spike_count(kl, spike_k, spike_window)[0],
            "loss_spikes": loss_spikes, "loss_spike_rate": loss_spikes / examined_rows if examined_rows else math.nan}
