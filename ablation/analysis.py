"""Collect the runs of a study, compute metrics and statistics, and write the report.

    python -m ablation.analysis                      # every study under ${ABLATION_RESULTS:-results}
    python -m ablation.analysis results/main         # one study
    python -m ablation.analysis results/ --no-wandb  # every study under results/, no W&B run

For each study directory results/<study>/ this writes, atomically:
    runs.csv      one row per run: the five regularizer flags, seed, status, settings_hash,
                  every final metric of metrics.json and the per-run metrics derived from history
    history.csv   the epoch rows of every run's history.csv, with the run's identifiers
    figures/      PNG figures (see ablation.figures)
    report.md     tables and figures, readable on GitHub
    report.html   the same, self-contained (images embedded)
and, unless --no-wandb, logs the tables and figures to a W&B run with job_type="report".

Runs are pooled only within a *setting group*: runs with the same settings_hash (the hash of
every non-regularizer setting). A run that is not completed, or whose metrics.json,
history.csv or config.yaml is missing or unreadable, is excluded from the statistics with a
warning naming the file, and is listed in the report with the reason.

Every metric is defined in METRICS below; the report's appendix prints the same definitions.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy import stats

from .config import REGULARIZERS, SHORT
from .runio import atomic_write_text

log = logging.getLogger("ablation.analysis")

ALPHA = 0.05  # two-sided significance level of every test and 1 - coverage of every CI


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

# Statistics over runs, defined here for the report's appendix.
STATISTICS = {
    "mean ± CI": "Mean over the seeds of a cell ± the half-width of its 95% confidence interval, "
                 "t(0.975, n-1)·s/√n with the sample std s; n = runs with a defined value.",
    "Welch p": "Two-sided Welch t-test (unequal variances) of `all` against `none`; significant when p < 0.05.",
    "seed std": "Seed-to-seed sample std of the final test recon within one cell (one regularizer combination).",
    "diverged runs": "Runs stopped by a non-finite loss or gradient norm, of the finished runs (those in the "
                     "statistics plus the diverged ones); compared with Fisher's exact test.",
    "main effect": "Mean of a metric with a regularizer on minus with it off, averaged over the other factors: "
                   "the coefficient of that 0/1 factor in an OLS fit of the metric on the five factors "
                   "(statsmodels), with its 95% CI. Equal to the difference of means in a balanced factorial.",
    "interaction": "Coefficient of the product of two 0/1 factors in an OLS fit with every main effect and "
                   "every pairwise interaction (full 2^5 factorial only).",
}

# Final metrics every completed metrics.json holds.
FINAL_METRICS = ("test_recon", "test_kl", "test_loss", "trainsub_recon", "trainsub_kl", "trainsub_loss",
                 "gen_gap", "max_gen_gap", "best_epoch", "mse01", "psnr", "neg_elbo", "bits_per_dim",
                 "active_units", "probe_acc", "epochs_completed", "steps", "images_per_s", "train_time_s",
                 "wall_time_s")
DERIVED_METRICS = ("kl_cv", "kl_max_jump", "loss_volatility")
SETTINGS = ("budget", "epochs", "width", "latent_dim", "batch_size", "train_size", "test_size")
RUN_COLUMNS = ("study", "run_name", "combo", "seed", "settings_hash", *REGULARIZERS, "status", "included",
               "excluded_reason", *SETTINGS, *FINAL_METRICS, *DERIVED_METRICS, "diverged_epoch",
               "diverged_step", "error")
EPOCH_COLUMNS = ("epoch", "step", "train_loss", "train_recon", "train_kl", "test_recon", "test_kl",
                 "trainsub_recon", "gen_gap")
STEP_COLUMNS = ("epoch", "step", "train_loss")
RUN_MARKERS = ("metrics.json", "checkpoint.pt", "history.csv")

ALL_ON = "-".join(SHORT[r] for r in REGULARIZERS)


class RunFileError(Exception):
    """A run file that is missing, truncated or corrupt; the message names the file."""


class NoResultsError(Exception):
    """No run directory under the directories searched."""


class NotEstimable(Exception):
    """The runs do not identify the factorial effects asked for; the message says why."""


# ---------------------------------------------------------------------------------------- discovery


def _has_marker(path: Path) -> bool:
    return any((path / m).is_file() for m in RUN_MARKERS)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def is_run_dir(path: Path) -> bool:
    """A directory a training run wrote: metrics.json, checkpoint.pt or history.csv, and no runs inside."""
    return _has_marker(path) and not any(_has_marker(d) for d in _subdirs(path))


def is_study_dir(path: Path) -> bool:
    """A directory holding at least one run directory."""
    return any(is_run_dir(d) for d in _subdirs(path))


def _studies_below(d: Path, depth: int = 3) -> list[Path]:
    """`d` if it is a study, else the studies in its subdirectories, down to `depth` levels
    (so `results/` finds nested studies such as results/cifar10-cpu/factorial)."""
    if is_study_dir(d):
        return [d]
    if depth == 0 or is_run_dir(d):
        return []
    return [s for sub in _subdirs(d) if sub.name not in ("wandb", "figures", ".submitit")
            for s in _studies_below(sub, depth - 1)]


def find_studies(dirs: list[Path]) -> list[Path]:
    """Study directories among `dirs`: each is a study, or a parent whose study subdirectories are taken."""
    studies: list[Path] = []
    for d in dirs:
        found = _studies_below(d)
        studies += [s for s in found if s.resolve() not in {x.resolve() for x in studies}]
    if not studies:
        searched = ", ".join(f"{d.resolve()}{'' if d.is_dir() else ' (does not exist)'}" for d in dirs)
        raise NoResultsError(f"no training runs found in {searched}: no run directory (with metrics.json, "
                             f"history.csv or checkpoint.pt) there or up to 3 levels below. Train first, e.g. "
                             f"`python -m ablation.train -m regularizer=none,all`, or pass the study directory.")
    return studies


# ---------------------------------------------------------------------------------------- run files


def read_metrics(path: Path) -> dict:
    """metrics.json as a dict; RunFileError when missing, truncated or not an object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path.name} missing") from None
    except (OSError, ValueError) as exc:
        raise RunFileError(f"{path.name} unreadable (truncated or corrupt): {exc}") from None
    if not isinstance(data, dict) or "status" not in data:
        raise RunFileError(f"{path.name} holds no run record (no 'status' key)")
    return data


def read_history(path: Path) -> pd.DataFrame:
    """history.csv with numeric columns checked; RunFileError when missing, corrupt or truncated."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise RunFileError(f"{path.name} missing") from None
    except (OSError, ValueError) as exc:
        raise RunFileError(f"{path.name} unreadable: {exc}") from None
    missing = [c for c in ("kind", *EPOCH_COLUMNS) if c not in frame.columns]
    if missing:
        raise RunFileError(f"{path.name} lacks columns {', '.join(missing)} (corrupt?)")
    unknown = set(frame["kind"].astype(str)) - {"epoch", "step", "diverged"}
    if unknown:
        raise RunFileError(f"{path.name} has rows of unknown kind {sorted(unknown)[:3]} (corrupt?)")
    numeric = frame.drop(columns="kind").apply(pd.to_numeric, errors="coerce")
    frame = pd.concat([frame[["kind"]].astype(str), numeric], axis=1)
    for kind, columns in (("epoch", EPOCH_COLUMNS), ("step", STEP_COLUMNS)):
        if frame.loc[frame["kind"] == kind, list(columns)].isna().any().any():
            raise RunFileError(f"{path.name} has missing or non-numeric values in its {kind} rows (truncated?)")
    return frame


def read_settings(path: Path) -> dict:
    """Settings, flags and seed from a run's resolved config.yaml; RunFileError when missing or corrupt."""
    if not path.is_file():
        raise RunFileError(f"{path.name} missing")
    try:
        cfg = OmegaConf.load(path)
        return {"budget": cfg.budget.name, "epochs": cfg.trainer.epochs, "width": cfg.model.width,
                "latent_dim": cfg.model.latent_dim, "batch_size": cfg.trainer.batch_size,
                "train_size": cfg.data.train_size, "test_size": cfg.data.test_size, "seed": cfg.seed,
                **{r: bool(cfg[r].enabled) for r in REGULARIZERS}}
    except Exception as exc:  # YAML errors and missing keys alike: the file is not a run config
        raise RunFileError(f"{path.name} unreadable: {type(exc).__name__}: {exc}") from None


def flags_from_name(run_name: str) -> dict:
    """The flags and seed encoded in a run directory name like `wd-bn_seed2`; empty if it is not one."""
    stem, sep, seed = run_name.rpartition("_seed")
    codes = set(stem.split("-")) if stem != "none" else set()
    if not sep or not seed.isdigit() or not codes <= set(SHORT.values()):
        return {}
    return {"seed": int(seed), **{r: SHORT[r] in codes for r in REGULARIZERS}}


def combo_name(flags: dict) -> str:
    """`none`, or the short codes of the regularizers that are on, joined by '-' (as in run names)."""
    return "-".join(SHORT[r] for r in REGULARIZERS if flags[r]) or "none"


# ---------------------------------------------------------------------------------------- derived metrics


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

    history.csv records it (`window_steps`). Older versions did not, and started a new window at
    every epoch, so a row's window there began after the previous step row or the previous
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


# ---------------------------------------------------------------------------------------- collection


def _status_reason(metrics: dict) -> str:
    """Why a run that is not completed is excluded."""
    status = metrics.get("status")
    if status == "diverged":
        return f"diverged at epoch {metrics.get('diverged_epoch')}, step {metrics.get('diverged_step')}"
    if status == "failed":
        return f"failed: {metrics.get('error', 'unknown error')}"
    if status == "running":
        return "still running (metrics.json says running: in progress or killed)"
    return f"unknown status {status!r} in metrics.json"


def _completed_problems(metrics: dict, history: pd.DataFrame | None) -> list[str]:
    """Inconsistencies that keep a completed run out of the statistics."""
    problems = [f"metrics.json lacks {k}" for k in ("settings_hash", *FINAL_METRICS) if k not in metrics]
    if history is not None:
        n_epochs = int((history["kind"] == "epoch").sum())
        if n_epochs == 0 or ("epochs_completed" in metrics and n_epochs != metrics["epochs_completed"]):
            problems.append(f"history.csv has {n_epochs} epoch rows but metrics.json says "
                            f"{metrics.get('epochs_completed')} epochs (truncated?)")
    return problems


def _try(read, path: Path, problems: list[str]):
    """read(path), or None with a warning naming the file and the problem appended."""
    try:
        return read(path)
    except RunFileError as exc:
        log.warning("%s: %s", path, exc)
        problems.append(str(exc))
        return None


def _read_run_files(run_dir: Path, problems: list[str]) -> tuple[dict, pd.DataFrame | None, dict]:
    """(metrics, history, settings) of a run directory; unreadable files are noted in `problems`.

    metrics is {} when metrics.json is absent and {"status": "invalid"} when it is unreadable.
    history.csv and config.yaml are required of a completed run; otherwise read when present.
    """
    path = run_dir / "metrics.json"
    metrics = (_try(read_metrics, path, problems) or {"status": "invalid"}) if path.exists() else {}
    required = metrics.get("status") == "completed"
    history = settings = None
    if required or (run_dir / "history.csv").exists():
        history = _try(read_history, run_dir / "history.csv", problems)
    if required or (run_dir / "config.yaml").exists():
        settings = _try(read_settings, run_dir / "config.yaml", problems)
    return metrics, history, settings or {}


def _exclusion_reason(metrics: dict, history: pd.DataFrame | None, identity: dict, problems: list[str]) -> str:
    """Why a run is left out of the statistics; '' for a completed, readable, consistent run."""
    if not metrics:
        return "no metrics.json yet (checkpoint.pt or history.csv present): still running or killed"
    if metrics["status"] == "invalid":
        return problems[0]
    if metrics["status"] != "completed":
        return _status_reason(metrics)
    problems = problems + _completed_problems(metrics, history)
    if not all(r in identity for r in REGULARIZERS):
        problems.append("regularizer flags unknown (no reg_* keys, config.yaml or run name)")
    return "; ".join(problems)


def collect_run(run_dir: Path, study: str) -> tuple[dict, pd.DataFrame | None]:
    """One runs.csv row for `run_dir`, and its history frame (None when absent or unreadable)."""
    problems: list[str] = []
    metrics, history, settings = _read_run_files(run_dir, problems)
    identity = {**flags_from_name(run_dir.name), **settings,
                **{r: metrics[f"reg_{r}"] for r in REGULARIZERS if f"reg_{r}" in metrics},
                **({"seed": metrics["seed"]} if "seed" in metrics else {})}
    reason = _exclusion_reason(metrics, history, identity, problems)
    status = metrics.get("status", "running")
    if reason:
        log.warning("%s: excluded from the statistics (%s)", run_dir, reason)
    known_flags = all(r in identity for r in REGULARIZERS)
    row = dict.fromkeys(RUN_COLUMNS) | {k: metrics[k] for k in RUN_COLUMNS if k in metrics}
    row |= {k: identity.get(k) for k in ("seed", *SETTINGS, *REGULARIZERS)}
    row |= {"study": metrics.get("study") or study, "run_name": run_dir.name, "status": status, "included": not reason,
            "excluded_reason": reason or None, "combo": combo_name(identity) if known_flags else None}
    if not reason:
        row |= derived_metrics(history)
    return row, history


def collect_study(study_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) of every run directory in `study_dir`; see the module docstring."""
    rows, histories = [], []
    for run_dir in (d for d in _subdirs(study_dir) if is_run_dir(d)):
        row, history = collect_run(run_dir, study_dir.name)
        rows.append(row)
        if history is not None:
            epochs = history[history["kind"] == "epoch"].drop(columns=["kind", "grad_norm"], errors="ignore")
            ids = {k: row[k] for k in ("study", "run_name", "combo", "seed", "settings_hash", *REGULARIZERS,
                                       "status", "included")}
            histories.append(epochs.assign(**ids)[[*ids, *epochs.columns]])
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return runs, history


def write_tables(study_dir: Path, runs: pd.DataFrame, history: pd.DataFrame) -> None:
    """runs.csv and history.csv of the study, written atomically."""
    atomic_write_text(study_dir / "runs.csv", runs.to_csv(index=False))
    atomic_write_text(study_dir / "history.csv", history.to_csv(index=False))


TEXT_COLUMNS = ("study", "run_name", "combo", "settings_hash", "status", "excluded_reason", "budget", "error")


def read_runs_csv(path: Path) -> pd.DataFrame:
    """runs.csv as write_tables wrote it, identifiers kept as text (a settings_hash may look numeric)."""
    return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})


# ---------------------------------------------------------------------------------------- grouping


def _as_bool(series: pd.Series) -> pd.Series:
    """True/False from booleans or their CSV spellings; anything else is False."""
    return series.map(lambda v: v is True or v == 1 or str(v).lower() == "true").astype(bool)


def normalize(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with the flag and `included` columns as booleans (as after reading runs.csv back)."""
    return runs.assign(**{c: _as_bool(runs[c]) for c in (*REGULARIZERS, "included")})


def setting_groups(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(settings_hash, runs) per setting group, largest first; runs without a hash belong to none."""
    runs = runs[runs["settings_hash"].notna()]
    groups = [(str(h), g) for h, g in runs.groupby("settings_hash", sort=True)]
    return sorted(groups, key=lambda hg: -len(hg[1]))


def _single_group(runs: pd.DataFrame) -> pd.DataFrame:
    """Normalized runs of one setting group; ValueError when runs of several would be pooled."""
    hashes = runs.loc[_as_bool(runs["included"]) | (runs["status"] == "diverged"), "settings_hash"].dropna().unique()
    if len(hashes) > 1:
        raise ValueError(f"runs of {len(hashes)} setting groups ({', '.join(map(str, hashes))}) must not be "
                         f"pooled; pass the runs of one settings_hash")
    return normalize(runs)


def cell_mask(runs: pd.DataFrame, on: bool) -> pd.Series:
    """Runs with all five regularizers off (`on`=False, regularizer=none) or all on (regularizer=all)."""
    flags = runs[list(REGULARIZERS)]
    return flags.all(axis=1) if on else ~flags.any(axis=1)


# ---------------------------------------------------------------------------------------- none vs all


@dataclass(frozen=True)
class Row:
    """A row of the comparison table: the seed report's aspect, the metric and its verdict words."""

    aspect: str
    metric: str
    words: tuple[str, str] = ("Lower", "Higher")  # verdict when `all` is significantly lower / higher
    seed_claim: str | None = None  # the seed report's word, when it made a claim on this row


COMPARISON_ROWS = (
    Row("Reconstruction loss", "test_recon", ("Lower", "Higher"), "Lower"),
    Row("Reconstruction loss", "psnr"),
    Row("Reconstruction loss", "mse01"),
    Row("KL", "kl_cv", ("More controlled", "Less controlled"), "More controlled"),
    Row("KL", "kl_max_jump"),
    Row("KL", "test_kl"),
    Row("Overfitting risk", "gen_gap", ("Reduced", "Increased"), "Reduced"),
    Row("Overfitting risk", "max_gen_gap"),
    Row("Overfitting risk", "best_epoch"),
    Row("Training stability", "loss_volatility", ("More stable", "Less stable"), "More stable"),
    Row("β-independent fit", "neg_elbo"),
    Row("β-independent fit", "bits_per_dim"),
    Row("Latent", "active_units"),
    Row("Latent", "probe_acc"),
)
COMPARISON_COLUMNS = ("aspect", "metric", "label", "kind", "seed_claim", "none_mean", "none_ci", "none_n",
                      "all_mean", "all_ci", "all_n", "p_value", "verdict", "note")


def mean_ci(values: pd.Series) -> tuple[float, float, int]:
    """(mean, 95% CI half-width t(0.975, n-1)·s/√n, n) of the non-missing values; NaN where undefined."""
    x = pd.to_numeric(values, errors="coerce").dropna().to_numpy(float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(half), n


def welch_verdict(none: pd.Series, all_: pd.Series, words: tuple[str, str]) -> tuple[float, str]:
    """(p, verdict) of a two-sided Welch t-test of `all` against `none`; words[0] when `all` is lower."""
    a = pd.to_numeric(none, errors="coerce").dropna().to_numpy(float)
    b = pd.to_numeric(all_, errors="coerce").dropna().to_numpy(float)
    if min(len(a), len(b)) == 0:
        return math.nan, "no data"
    if min(len(a), len(b)) == 1:
        return math.nan, "single seed, no test"
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # constant on both sides: a t-test gives p = 0 for any difference
        return math.nan, "no test (no seed-to-seed variance)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical values: scipy warns of precision loss
        p = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    if math.isnan(p):
        return p, "no test (no seed-to-seed variance)"
    if p >= ALPHA:
        return p, "no significant difference"
    return p, words[0] if b.mean() < a.mean() else words[1]


def _metric_label(key: str) -> str:
    m = METRICS[key]
    return f"{m.label} ({m.unit})"


def _seed_std(values: pd.Series) -> float:
    x = pd.to_numeric(values, errors="coerce").dropna()
    return float(x.std(ddof=1)) if len(x) >= 2 else math.nan


def _diverged_row(none: pd.DataFrame, all_: pd.DataFrame) -> dict:
    """Diverged runs of the finished runs (included or diverged), compared by Fisher's exact test."""
    counts = []
    for cell in (none, all_):
        finished = cell[cell["included"] | (cell["status"] == "diverged")]
        counts.append((int((finished["status"] == "diverged").sum()), len(finished)))
    (d0, n0), (d1, n1) = counts
    if min(n0, n1) == 0:
        p, verdict = math.nan, "no runs"
    elif min(n0, n1) == 1:
        p, verdict = math.nan, "single seed, no test"
    else:
        p = float(stats.fisher_exact([[d0, n0 - d0], [d1, n1 - d1]]).pvalue)
        verdict = "no significant difference" if p >= ALPHA else ("Fewer" if d1 / n1 < d0 / n0 else "More")
    return {"aspect": "Training stability", "metric": "diverged", "label": "diverged runs (of finished runs)",
            "kind": "count", "seed_claim": None, "none_mean": d0, "none_ci": math.nan, "none_n": n0,
            "all_mean": d1, "all_ci": math.nan, "all_n": n1, "p_value": p, "verdict": verdict,
            "note": "Fisher's exact test"}


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """regularizer=none vs regularizer=all over the seeds of one setting group (a pure function of runs.csv).

    One row per COMPARISON_ROWS entry: mean ± 95% CI and n of each side over the included runs, the
    two-sided Welch t-test p-value and the verdict for `all` relative to `none`; then a row of
    diverged-run counts. Total losses (test_loss) are never compared: they weigh the KL by each
    run's own β.
    """
    runs = _single_group(runs)
    done = runs[runs["included"]]
    none, all_ = done[cell_mask(done, False)], done[cell_mask(done, True)]
    rows = []
    for spec in COMPARISON_ROWS:
        m0, h0, n0 = mean_ci(none[spec.metric])
        m1, h1, n1 = mean_ci(all_[spec.metric])
        p, verdict = welch_verdict(none[spec.metric], all_[spec.metric], spec.words)
        note = ""
        if spec.metric == "loss_volatility":
            note = (f"seed-to-seed std of test recon: none {_seed_std(none['test_recon']):.4g}, "
                    f"all {_seed_std(all_['test_recon']):.4g}")
        rows.append({"aspect": spec.aspect, "metric": spec.metric, "label": _metric_label(spec.metric),
                     "kind": "mean", "seed_claim": spec.seed_claim, "none_mean": m0, "none_ci": h0, "none_n": n0,
                     "all_mean": m1, "all_ci": h1, "all_n": n1, "p_value": p, "verdict": verdict, "note": note})
    rows.append(_diverged_row(runs[cell_mask(runs, False)], runs[cell_mask(runs, True)]))
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def has_comparison(runs: pd.DataFrame) -> bool:
    """Whether the group holds any finished regularizer=none or regularizer=all run."""
    runs = normalize(runs)
    finished = runs[runs["included"] | (runs["status"] == "diverged")]
    return bool((cell_mask(finished, False) | cell_mask(finished, True)).any())


# ---------------------------------------------------------------------------------------- cells


def cell_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs per regularizer combination of one setting group, by status, with test recon mean and seed std."""
    runs = normalize(runs[runs["combo"].notna()])
    rows = []
    for combo, cell in runs.groupby("combo", sort=False):
        done = cell[cell["included"]]
        rows.append({"combo": combo, **{r: bool(cell[r].iloc[0]) for r in REGULARIZERS},
                     "included": len(done), "diverged": int((cell["status"] == "diverged").sum()),
                     "failed": int((cell["status"] == "failed").sum()),
                     "running": int((cell["status"] == "running").sum()),
                     "other_excluded": int((~cell["included"] & ~cell["status"].isin(
                         ["diverged", "failed", "running"])).sum()),
                     "test_recon_mean": float(pd.to_numeric(done["test_recon"]).mean()) if len(done) else math.nan,
                     "test_recon_seed_std": _seed_std(done["test_recon"])})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = frame[list(REGULARIZERS)].sum(axis=1)
    return frame.assign(_n=order).sort_values(["_n", "combo"]).drop(columns="_n").reset_index(drop=True)


# ---------------------------------------------------------------------------------------- factorial effects

EFFECT_METRICS = ("test_recon", "neg_elbo", "psnr", "test_kl", "kl_cv", "gen_gap", "loss_volatility",
                  "active_units", "probe_acc")
INTERACTION_METRICS = ("test_recon", "neg_elbo", "gen_gap")
EFFECT_COLUMNS = ("metric", "term", "estimate", "ci_low", "ci_high", "p_value", "n", "df_resid")


def _design(runs: pd.DataFrame) -> pd.DataFrame:
    """Included runs of one setting group with the five factors as 0/1 integers."""
    done = _single_group(runs)
    done = done[done["included"]]
    return done.assign(**{r: done[r].astype(int) for r in REGULARIZERS})


def is_full_factorial(runs: pd.DataFrame) -> bool:
    """Whether the included runs cover all 2^5 regularizer combinations."""
    design = _design(runs)
    return len(design.drop_duplicates(list(REGULARIZERS))) == 2 ** len(REGULARIZERS)


def effects_meaning(runs: pd.DataFrame) -> str:
    """What a main effect of these runs is, for table and figure captions."""
    if is_balanced_factorial(runs):
        return "on − off, averaged over the other factors"
    return ("on − off in an additive model; the runs are not a balanced factorial, so this is an average over "
            "the other factors only if the effects add up")


def is_balanced_factorial(runs: pd.DataFrame) -> bool:
    """A full factorial with the same number of included runs in every combination."""
    return is_full_factorial(runs) and _design(runs).groupby(list(REGULARIZERS)).size().nunique() == 1


def _fit_effects(design: pd.DataFrame, metric: str, factors: list[str], formula_rhs: str) -> list[dict]:
    """OLS of `metric` on the formula; one row per non-intercept term (CIs NaN when residual df is 0).

    The factors are coded -1/+1 and each term's coefficient (and CI) is scaled by 2^k for its k
    factors, so the rows are effects: a factor's row is its on - off difference at the average
    of the other terms (averaged over the other factors in a balanced factorial, also in a model
    with interactions), and an A:B row is how much A's effect changes when B is switched on.
    """
    import statsmodels.formula.api as smf

    data = design[[*factors, metric]].apply(pd.to_numeric, errors="coerce").dropna()
    data[factors] = 2 * data[factors] - 1
    if data[metric].nunique() < 2:
        return []  # no data, or a constant metric: every effect is 0
    model = smf.ols(f"{metric} ~ {formula_rhs}", data=data)
    if np.linalg.matrix_rank(model.exog) < model.exog.shape[1]:
        return []  # the runs with a value of this metric confound its terms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # residual df 0: statsmodels divides by zero
        fit = model.fit()
        ci = fit.conf_int(ALPHA)
    rows = []
    for term in fit.params.index.drop("Intercept"):
        has_df = fit.df_resid >= 1
        scale = 2.0 ** (term.count(":") + 1)
        rows.append({"metric": metric, "term": term, "estimate": scale * float(fit.params[term]),
                     "ci_low": scale * float(ci.loc[term, 0]) if has_df else math.nan,
                     "ci_high": scale * float(ci.loc[term, 1]) if has_df else math.nan,
                     "p_value": float(fit.pvalues[term]) if has_df else math.nan,
                     "n": int(fit.nobs), "df_resid": int(round(fit.df_resid))})
    return rows


def main_effects(runs: pd.DataFrame, metrics: tuple[str, ...] = EFFECT_METRICS) -> pd.DataFrame:
    """Main effect of each regularizer on each metric: OLS of the metric on the five factors (additive).

    In a balanced factorial an effect is the on - off difference averaged over the other
    factors; in another design (e.g. the leave-one-out presets) it is the additive model's
    on - off difference, which equals that average only if the effects add up.

    Raises NotEstimable when the combinations present confound the factors (e.g. only none and
    all, which differ in all five at once). Factors constant over the runs are left out.
    """
    design = _design(runs)
    if design.empty:
        raise NotEstimable("no runs in the statistics")
    factors = [r for r in REGULARIZERS if design[r].nunique() > 1]
    combos = len(design.drop_duplicates(list(REGULARIZERS)))
    if not factors:
        raise NotEstimable(f"all included runs share one regularizer combination ({combos} present)")
    X = np.column_stack([np.ones(len(design)), design[factors].to_numpy(float)])
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise NotEstimable(f"the {combos} regularizer combinations present confound the factors "
                           f"({', '.join(factors)} do not vary independently); main effects need runs "
                           f"that switch regularizers separately, e.g. `+sweep=factorial`")
    rows = [row for m in metrics for row in _fit_effects(design, m, factors, " + ".join(factors))]
    return pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))


def interaction_effects(runs: pd.DataFrame, metrics: tuple[str, ...] = INTERACTION_METRICS) -> pd.DataFrame:
    """Two-way interactions (with all main effects) of the full 2^5 factorial: OLS with all pairwise terms.

    Raises NotEstimable unless all 32 combinations are present. Rows with df_resid 0 have no CI.
    """
    if not is_full_factorial(runs):
        raise NotEstimable("two-way interactions need all 32 regularizer combinations")
    design = _design(runs)
    factors = list(REGULARIZERS)
    rows = [row for m in metrics for row in _fit_effects(design, m, factors, f"({' + '.join(factors)})**2")]
    return pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))


# ---------------------------------------------------------------------------------------- W&B


def study_name(study_dir: Path, runs: pd.DataFrame) -> str:
    """The `study` the runs were trained under (their W&B group), e.g. cifar10-cpu/none-vs-all."""
    names = runs["study"].dropna().astype(str) if "study" in runs else pd.Series(dtype=str)
    return names.mode().iloc[0] if len(names) else study_dir.name


def log_to_wandb(study_dir: Path, study: str, tables: dict[str, pd.DataFrame], figures: list[Path]) -> None:
    """Log the report's tables and figures to a W&B run (job_type=report, group=<study>) in study_dir/wandb/."""
    from . import wandb_logger

    cfg = OmegaConf.create({"backend": "wandb", "project": "vae-ablation", "entity": None, "mode": "auto",
                            "tags": [], "init_timeout": 60})
    logger = wandb_logger.start(cfg, run_dir=study_dir, name=f"report-{study.replace('/', '-')}", group=study,
                                job_type="report", tags=["report"], config={"study": study, "tables": sorted(tables)})
    exit_code = 1
    try:
        for key, frame in tables.items():
            logger.log_table(key, frame)
        logger.log_images({f"figures/{p.stem}": p for p in figures})
        exit_code = 0
    finally:
        logger.finish(exit_code=exit_code)


# ---------------------------------------------------------------------------------------- entry point


def analyze_study(study_dir: Path, use_wandb: bool = True) -> Path:
    """Collect, write runs.csv/history.csv, render the report (and log it to W&B); returns report.md."""
    from . import report

    runs, history = collect_study(study_dir)
    write_tables(study_dir, runs, history)
    result = report.write_report(study_dir, runs, history)
    if use_wandb:
        log_to_wandb(study_dir, study_name(study_dir, runs), result.tables, result.figures)
    n_in = int(runs["included"].sum())
    log.info("%s: %d runs (%d in the statistics) -> %s", study_dir, len(runs), n_in, result.markdown)
    return result.markdown


def main(argv: list[str] | None = None) -> int:
    """`python -m ablation.analysis [RESULTS_DIRS...] [--no-wandb]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ablation.analysis", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, metavar="RESULTS_DIRS",
                        help="study directories (results/main) or parents of studies (results/); "
                             "default: every study under ${ABLATION_RESULTS:-results}")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    dirs = args.dirs or [Path(os.environ.get("ABLATION_RESULTS", "results"))]
    try:
        studies = find_studies(dirs)
    except NoResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for study_dir in studies:
        print(analyze_study(study_dir, use_wandb=not args.no_wandb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
