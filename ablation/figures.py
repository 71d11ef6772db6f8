"""Figures of a study's report: PNG files written atomically under results/<study>/figures/.

    curves          per-epoch train and test recon and KL, regularizer=none vs all, ±1 sd band over seeds
    gen_gap         generalization gap (test minus train-subset recon) over epochs, none vs all
    main_effects    each regularizer's main effect on the key metrics, with 95% CIs (when estimable)
    heatmap         mean test recon of every regularizer combination present (three or more)
    recon_grids     recon_final.png of seed 0 (or the lowest seed) of none and of all, side by side
    samples         samples.png (prior samples) of the same runs, side by side
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from . import regularizers as R  # noqa: E402
from .metrics import METRICS  # noqa: E402
from .runio import atomic_write  # noqa: E402
from .stats import cell_mask, effects_meaning, normalize  # noqa: E402

log = logging.getLogger(__name__)

PALETTE = {"none": "#4C72B0", "all": "#DD8452"}
CELL_NAMES = {False: "none", True: "all"}


def save(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` as PNG to `path` atomically and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def _axis_label(key: str) -> str:
    m = METRICS.get(key)
    return f"{m.label} ({m.unit})" if m else key.replace("_", " ")


def none_vs_all(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of regularizer=none and regularizer=all runs, with a `regularizers` column 'none' or 'all'."""
    frame = normalize(frame)
    parts = [frame[cell_mask(frame, on)].assign(regularizers=CELL_NAMES[on]) for on in (False, True)]
    return pd.concat(parts, ignore_index=True)


def curves_figure(history: pd.DataFrame, path: Path) -> Path | None:
    """2×2 panels: train/test recon and train/test KL per epoch, none vs all, ±1 sd over seeds."""
    data = none_vs_all(history)
    if data.empty:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = (("train_recon", "train recon", "SSE/image"), ("test_recon", "test recon", "SSE/image"),
              ("train_kl", "train KL", "nats/image"), ("test_kl", "test KL", "nats/image"))
    for ax, (column, name, unit) in zip(axes.flat, panels):
        sns.lineplot(data=data, x="epoch", y=column, hue="regularizers", palette=PALETTE, errorbar="sd",
                     marker="o", ax=ax)
        ax.set(xlabel="epoch", ylabel=f"{name} ({unit})", title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("regularizer=none vs all: mean over seeds, band ±1 sd")
    fig.tight_layout()
    return save(fig, path)


def gen_gap_figure(history: pd.DataFrame, path: Path) -> Path | None:
    """Generalization gap per epoch, none vs all, ±1 sd over seeds."""
    data = none_vs_all(history)
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=data, x="epoch", y="gen_gap", hue="regularizers", palette=PALETTE, errorbar="sd",
                 marker="o", ax=ax)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="epoch", ylabel="test − train-subset recon (SSE/image)",
           title="generalization gap: mean over seeds, band ±1 sd")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return save(fig, path)


def effects_figure(effects: pd.DataFrame, path: Path, meaning: str = "on − off") -> Path | None:
    """One panel per metric: each regularizer's main effect as a bar with its 95% CI; `meaning` says what an
    effect is (stats.effects_meaning)."""
    if effects is None or effects.empty:
        return None
    metrics = list(dict.fromkeys(effects["metric"]))
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        sub = effects[effects["metric"] == metric]
        y = np.arange(len(sub))
        err = np.vstack([sub["estimate"] - sub["ci_low"], sub["ci_high"] - sub["estimate"]])
        ax.barh(y, sub["estimate"], xerr=None if np.isnan(err).all() else err, capsize=3,
                color=sns.color_palette("deep", len(sub)))
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, [t.replace("_", " ") for t in sub["term"]])
        ax.invert_yaxis()
        ax.set(xlabel=f"effect on {_axis_label(metric)}", title=METRICS[metric].label)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"main effects ({meaning}), 95% CI", wrap=True)
    fig.tight_layout()
    return save(fig, path)


def _onoff(flags: tuple[bool, ...], names: tuple[str, ...]) -> str:
    return " · ".join(f"{R.REGISTRY[n].tag} {'on' if f else 'off'}" for n, f in zip(names, flags))


def _labels(names: tuple[str, ...]) -> str:
    return " · ".join(R.REGISTRY[n].label for n in names)


def heatmap_figure(runs: pd.DataFrame, path: Path, metric: str = "test_recon") -> Path | None:
    """Mean `metric` of each regularizer combination: rows the first two registered regularizers (weight
    decay × dropout), columns the others."""
    runs = normalize(runs)
    names = R.names()
    done = runs[runs["included"]].assign(**{metric: lambda f: pd.to_numeric(f[metric], errors="coerce")})
    means = done.groupby(list(names))[metric].mean()
    if len(means) < 3:
        return None
    row_keys, col_keys = names[:2], names[2:]
    table = means.reset_index().assign(
        row=lambda f: [_onoff(tuple(r), row_keys) for r in f[list(row_keys)].itertuples(index=False)],
        col=lambda f: ["\n".join(_onoff(tuple(c), col_keys).split(" · ")) for c in
                       f[list(col_keys)].itertuples(index=False)])
    grid = table.pivot(index="row", columns="col", values=metric)
    fig, ax = plt.subplots(figsize=(1.3 * grid.shape[1] + 3, 0.7 * grid.shape[0] + 2.2))
    sns.heatmap(grid, annot=True, fmt=".4g", cmap="viridis_r", ax=ax, cbar_kws={"label": _axis_label(metric)})
    ax.set(xlabel=_labels(col_keys), ylabel=_labels(row_keys),
           title=f"mean {_axis_label(metric)} per regularizer combination")
    fig.tight_layout()
    return save(fig, path)


def _first_seed_run(runs: pd.DataFrame, on: bool) -> pd.Series | None:
    """The included none (on=False) or all (on=True) run with the lowest seed."""
    runs = normalize(runs)
    cell = runs[runs["included"] & cell_mask(runs, on)]
    return cell.sort_values("seed").iloc[0] if len(cell) else None


def images_figure(study_dir: Path, runs: pd.DataFrame, filename: str, title: str, path: Path) -> Path | None:
    """`filename` of the lowest-seed none and all runs side by side; panels whose PNG is missing are left out."""
    panels = []
    for on in (False, True):
        run = _first_seed_run(runs, on)
        if run is None:
            continue
        png = study_dir / run["run_name"] / filename
        try:
            with Image.open(png) as image:
                panels.append((f"regularizer={CELL_NAMES[on]} (seed {int(run['seed'])})",
                               np.asarray(image.convert("RGB"))))
        except (OSError, ValueError) as exc:
            log.warning("%s: not shown in the report (%s)", png, exc)
    if not panels:
        return None
    height, width = panels[0][1].shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(min(7.0, width / 40) * len(panels), height / 40 + 0.8),
                             squeeze=False)
    for ax, (name, image) in zip(axes.flat, panels):
        ax.imshow(image)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def group_figures(study_dir: Path, runs: pd.DataFrame, history: pd.DataFrame, effects: pd.DataFrame | None,
                  prefix: str = "") -> list[tuple[str, Path]]:
    """Every figure of one setting group that its data allows, as (caption, path) under study_dir/figures/."""
    sns.set_theme(style="whitegrid", context="notebook")
    out = study_dir / "figures"
    included = history[normalize(history)["included"]] if not history.empty else history
    made = [
        ("Per-epoch reconstruction and KL, none vs all", curves_figure(included, out / f"{prefix}curves.png")),
        ("Generalization gap over epochs", gen_gap_figure(included, out / f"{prefix}gen_gap.png")),
        ("Main effects with 95% CIs", effects_figure(effects, out / f"{prefix}main_effects.png",
                                                                  effects_meaning(runs))),
        ("Mean test recon per regularizer combination", heatmap_figure(runs, out / f"{prefix}heatmap_test_recon.png")),
        ("Final reconstructions (top row: test images, bottom row: reconstructions)",
         images_figure(study_dir, runs, "recon_final.png", "final reconstructions", out / f"{prefix}recon_grids.png")),
        ("Samples from the prior", images_figure(study_dir, runs, "samples.png", "prior samples",
                                                 out / f"{prefix}samples.png")),
    ]
    return [(caption, path) for caption, path in made if path is not None]
