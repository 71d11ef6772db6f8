"""Collect a study's runs: find the run directories, read their files, build the runs and history frames.

A study directory results/<study>/ holds one directory per training run. collect_study reads
each run's metrics.json, history.csv and config.yaml into two frames, written as the study's
    runs.csv      one row per run: the regularizer flags, seed, status, settings_hash, the settings,
                  every final metric of metrics.json and the metrics derived from history
    history.csv   the epoch rows of every run's history.csv, with the run's identifiers
A run that is not completed, or whose metrics.json, history.csv or config.yaml is missing,
unreadable or holds a metric that is not a number, is kept with `included` False and the reason in
`excluded_reason`, and a warning naming the file is logged. A run's settings_hash is today's hash of
its config.yaml (ablation/config.py), so runs recorded under an earlier hash function pool as before.
write_tables and read_runs_csv write and read the two CSV files.

The regularizer columns are those registered in ablation.regularizers when a function runs.
"""
from __future__ import annotations

import dataclasses

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from . import regularizers as R
from .config import EvalConfig, current_settings_hash
from .data import DIGEST_FIELD
from .metrics import CORE_METRICS, DERIVED_METRICS, FINAL_METRICS, derived_metrics
from .runio import atomic_write_text

log = logging.getLogger(__name__)

SETTINGS = ("budget", "epochs", "width", "latent_dim", "batch_size", "train_size", "test_size", "lr")
EPOCH_COLUMNS = ("epoch", "step", "train_loss", "train_recon", "train_kl", "test_recon", "test_kl",
                 "trainsub_recon", "gen_gap")
STEP_COLUMNS = ("epoch", "step", "train_loss")
RUN_MARKERS = ("metrics.json", "checkpoint.pt", "history.csv")
TEXT_COLUMNS = ("study", "run_name", "combo", "settings_hash", "status", "excluded_reason", "budget", "error")


def strength_columns() -> tuple[str, ...]:
    """`<group>_<field>` for each registered regularizer's settings besides its switch, at their effective
    values (beta_value, dropout_p, augmentation_pad_mode ...): the dose-response figure's x axes, and what
    tells the cells of a dose sweep apart."""
    return tuple(f"{r.group}_{f.name}" for r in R.REGISTRY.values() for f in dataclasses.fields(r.schema)
                 if f.name != "enabled")


def strength_note(identity: dict) -> str:
    """` (beta.value=2.0)` when a regularizer that is on runs at a strength other than the seed's, else ''; so
    that runs of a dose sweep form cells of their own."""
    changed = [f"{r.group}.{f.name}={identity[f'{r.group}_{f.name}']}" for r in R.REGISTRY.values()
               if R.as_bool(identity.get(r.group)) for f in dataclasses.fields(r.schema)
               if f.name != "enabled" and identity.get(f"{r.group}_{f.name}") not in (None, f.default)]
    return f" ({', '.join(changed)})" if changed else ""


def run_columns() -> tuple[str, ...]:
    """The columns of runs.csv, with one flag column per registered regularizer."""
    return ("study", "run_name", "combo", "seed", "settings_hash", *R.names(), "status", "included",
            "excluded_reason", *SETTINGS, *strength_columns(), *FINAL_METRICS, *DERIVED_METRICS, "diverged_epoch",
            "diverged_step", "error")


class RunFileError(Exception):
    """A run file that is missing, truncated or corrupt; the message names the file."""


class NoResultsError(Exception):
    """No run directory under the directories searched."""


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
    """Settings, flags and seed from a run's resolved config.yaml, and the spike detector's eval.spike_k and
    eval.spike_window for derived_metrics (EvalConfig's defaults for a config without them); RunFileError when
    missing or corrupt."""
    if not path.is_file():
        raise RunFileError(f"{path.name} missing")
    try:
        cfg = OmegaConf.load(path)
        return {"budget": cfg.budget.name, "epochs": cfg.trainer.epochs, "width": cfg.model.width,
                "latent_dim": cfg.model.latent_dim, "batch_size": cfg.trainer.batch_size,
                "train_size": cfg.data.train_size, "test_size": cfg.data.test_size,
                "lr": OmegaConf.select(cfg, "optim.lr"), "precision": OmegaConf.select(cfg, "trainer.precision"),
                "seed": cfg.seed,
                "spike_k": OmegaConf.select(cfg, "eval.spike_k", default=EvalConfig.spike_k),
                "spike_window": OmegaConf.select(cfg, "eval.spike_window", default=EvalConfig.spike_window),
                **R.flags(cfg), **{f"{g}_{k}": v for g, d in R.effective_dict(cfg).items() for k, v in d.items()
                                   if f"{g}_{k}" in strength_columns()}}
    except Exception as exc:  # YAML errors and missing keys alike: the file is not a run config
        raise RunFileError(f"{path.name} unreadable: {type(exc).__name__}: {exc}") from None


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


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _completed_problems(metrics: dict, history: pd.DataFrame | None) -> list[str]:
    """Inconsistencies that keep a completed run out of the statistics."""
    problems = [f"metrics.json lacks {k}" for k in ("settings_hash", *CORE_METRICS) if k not in metrics]
    problems += [f"metrics.json has {k}={metrics[k]!r}, not a number (corrupt?)" for k in FINAL_METRICS
                 if k in metrics and not _is_number(metrics[k])]
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
    if not all(r in identity for r in R.names()):
        problems.append("regularizer flags unknown (no reg_* keys, config.yaml or run name)")
    return "; ".join(problems)


def collect_run(run_dir: Path, study: str) -> tuple[dict, pd.DataFrame | None]:
    """One runs.csv row for `run_dir`, and its history frame (None when absent or unreadable)."""
    problems: list[str] = []
    metrics, history, settings = _read_run_files(run_dir, problems)
    regularizers = R.names()
    identity = {**R.parse_run_name(run_dir.name), **settings,
                **{r: metrics[f"reg_{r}"] for r in regularizers if f"reg_{r}" in metrics},
                **({"seed": metrics["seed"]} if "seed" in metrics else {})}
    reason = _exclusion_reason(metrics, history, identity, problems)
    status = metrics.get("status", "running")
    if reason:
        log.warning("%s: excluded from the statistics (%s)", run_dir, reason)
    known_flags = all(r in identity for r in regularizers)
    columns = run_columns()
    row = dict.fromkeys(columns) | {k: metrics[k] for k in columns if k in metrics
                                    if k not in FINAL_METRICS or _is_number(metrics[k])}
    row["settings_hash"] = current_settings_hash(run_dir / "config.yaml", row["settings_hash"])
    row |= {k: identity.get(k) for k in ("seed", *SETTINGS, *strength_columns(), *regularizers)}
    row |= {"study": metrics.get("study") or study, "run_name": run_dir.name, "status": status, "included": not reason,
            "excluded_reason": reason or None,
            "combo": R.combo_name(identity) + strength_note(identity) if known_flags else None}
    if settings.get("precision") == "auto" and metrics.get("precision") and row["settings_hash"]:
        # a run made while auto was hashed as written: the precision it recorded decides its group
        row["settings_hash"] = f"{row['settings_hash']}-{metrics['precision']}"
    if metrics.get(DIGEST_FIELD) and row["settings_hash"]:
        # runs on different data never pool; runs that recorded no data identity keep their group
        keyed = f"{row['settings_hash']}|{metrics[DIGEST_FIELD]}"
        row["settings_hash"] = hashlib.sha256(keyed.encode()).hexdigest()[:16]
    if not reason:
        row |= derived_metrics(history, settings["spike_k"], settings["spike_window"])
    return row, history


def collect_study(study_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) of every run directory in `study_dir`; see the module docstring."""
    rows, histories = [], []
    for run_dir in (d for d in _subdirs(study_dir) if is_run_dir(d)):
        row, history = collect_run(run_dir, study_dir.name)
        rows.append(row)
        if history is not None:
            epochs = history[history["kind"] == "epoch"].drop(columns=["kind", "grad_norm"], errors="ignore")
            ids = {k: row[k] for k in ("study", "run_name", "combo", "seed", "settings_hash", *R.names(),
                                       "status", "included")}
            histories.append(epochs.assign(**ids)[[*ids, *epochs.columns]])
    runs = pd.DataFrame(rows, columns=list(run_columns()))
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return runs, history


def write_tables(study_dir: Path, runs: pd.DataFrame, history: pd.DataFrame) -> None:
    """runs.csv and history.csv of the study, written atomically."""
    atomic_write_text(study_dir / "runs.csv", runs.to_csv(index=False))
    atomic_write_text(study_dir / "history.csv", history.to_csv(index=False))


def read_runs_csv(path: Path) -> pd.DataFrame:
    """runs.csv as write_tables wrote it, identifiers kept as text (a settings_hash may look numeric)."""
    return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})

