"""Figures of a study's report, written atomically under results/<study>/figures/.

Plots are 256-colour PNGs: lines and flat fills need no more, and a plot shrinks to a third. The
two image panels are the runs' own grids at their own resolution, side by side, as JPEG at
quality 95 with full chroma: a grid of photos is three times larger as PNG, and these figures
are committed and embedded in report.html for every setting group of a study.

    curves          eval-mode test and train-subset recon (log scale, and the last half zoomed) and KL per
                    epoch, regularizer=none vs all, mean over seeds with a ±1 sd band when an arm has several
    gen_gap         generalization gap (test minus train-subset recon) over epochs, none vs all
    rate_distortion test KL against recon (recon_mean where measured, else test_recon), one point per run
    claims          each claim's primary metric: all − none per seed, the estimate with its CI and the ±SESOI band,
                    titled with the claim's verdict (one panel per claim measured in both arms)
    kl_spectrum     each run's per-dimension KL (metrics.json `kl_spectrum`), when the run directories are there
    dose_<group>_<field>  a metric against a regularizer's strength, when a strength was swept
    main_effects    each regularizer's main effect on the key metrics, with 95% CIs (when estimable)
    heatmap         mean test recon of every regularizer combination present (three or more)
    recon_grids     recon_final.png of seed 0 (or the lowest seed) of none and of all, side by side (.jpg)
    samples         samples.png (prior samples) of the same runs, side by side (.jpg)

Every caption states how many runs each line, band or point stands for. The train-mode running
mean `train_recon` is never plotted: dropout and augmentation inflate it, so it is not comparable
across regularizers; the train subset is evaluated in eval mode like the test set.
"""
from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from . import regularizers as R  # noqa: E402
from .collect import strength_columns, strength_note  # noqa: E402
from .runio import atomic_write, read_json  # noqa: E402
from .stats import (cell_mask, effects_meaning, has_comparison, metric_label, none_and_all, normalize,  # noqa: E402
                    paired_by_seed, values)
from .verdicts import CLAIM_BY_KEY, CLAIMS, claims_table  # noqa: E402

log = logging.getLogger(__name__)

PALETTE = {"none": "#4C72B0", "all": "#DD8452"}
CELL_NAMES = {False: "none", True: "all"}


PANEL_GAP = 8  # white pixels between the image panels
JPEG_OPTIONS = {"format": "JPEG", "quality": 95, "subsampling": 0}


def save(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` as a 256-colour PNG to `path` atomically and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    atomic_write(path, lambda f: palette.save(f, format="PNG", optimize=True))
    return path


def none_vs_all(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of regularizer=none and regularizer=all runs, with a `regularizers` column 'none' or 'all'."""
    frame = normalize(frame)
    parts = [frame[cell_mask(frame, on)].assign(regularizers=CELL_NAMES[on]) for on in (False, True)]
    return pd.concat(parts, ignore_index=True)


def _runs_text(n: int, seeds: list[int]) -> str:
    return f"{n} run{'s' if n != 1 else ''} (seed{'s' if n != 1 else ''} {', '.join(map(str, seeds))})"


def arm_sizes(frame: pd.DataFrame) -> str:
    """How many runs each of none and all holds in `frame` (runs or history rows), with their seeds, and what a
    line and a band are: e.g. '3 runs per arm (seeds 0, 1, 2); line: mean, band: ±1 sd over seeds'."""
    data = none_vs_all(frame)
    seeds = {arm: sorted(pd.to_numeric(rows["seed"], errors="coerce").dropna().astype(int).unique())
             for arm, rows in data.groupby("regularizers", sort=False)}
    if not seeds:
        return "no runs"
    distinct = {tuple(s) for s in seeds.values()}
    if len(seeds) == 2 and len(distinct) == 1:
        (same,) = distinct
        text = _runs_text(len(same), list(same)).replace(" (", " per arm (", 1)
    else:
        text = "; ".join(f"{arm}: {_runs_text(len(s), s)}" for arm, s in seeds.items())
    most = max(len(s) for s in seeds.values())
    return text + ("; line: mean, band: ±1 sd over seeds" if most > 1 else "; one run, no band")


def _mean_band(ax, data: pd.DataFrame, column: str, dashes: bool = False, offsets: dict | None = None,
               label: str = "") -> None:
    """Mean over seeds of `column` per epoch and arm, with a ±1 sd band where an arm has several runs; `offsets`
    (per arm) is subtracted first."""
    for arm, rows in data.groupby("regularizers", sort=False):
        stats = rows.groupby("epoch")[column].agg(["mean", "std", "count"])
        mean = stats["mean"] - (offsets or {}).get(arm, 0.0)
        ax.plot(stats.index, mean, color=PALETTE[arm], ls="--" if dashes else "-", marker="o", ms=3,
                label=f"{arm} {label}".strip())
        band = stats["count"] > 1
        if band.any():
            ax.fill_between(stats.index[band], (mean - stats["std"])[band], (mean + stats["std"])[band],
                            color=PALETTE[arm], alpha=0.2, lw=0)


def _plain_log_axis(ax) -> None:
    """A log y-axis labelled with plain numbers (80, 100, 200), not powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(subs=(1.5, 3.0, 4.0, 6.0, 8.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def curves_figure(history: pd.DataFrame, path: Path) -> Path | None:
    """2×2 panels, none vs all, both in eval mode. Left: test and train-subset recon, and KL, over all epochs on a
    log scale. Right: the last half of training, each arm shifted by its own final test value, so that the late
    trend and the train/test gap of both arms are readable on one axis."""
    data = none_vs_all(history) if len(history) else history
    if data.empty or "trainsub_recon" not in data:
        return None
    last = data["epoch"].max()
    late = data[data["epoch"] > last / 2]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for row, (what, unit, test, sub) in enumerate((("recon", "SSE/image", "test_recon", "trainsub_recon"),
                                                   ("KL", "nats/image", "test_kl", "trainsub_kl"))):
        final = {arm: float(rows.loc[rows["epoch"] == last, test].mean())
                 for arm, rows in data.groupby("regularizers", sort=False)}
        for ax, rows, offsets in ((axes[row, 0], data, None), (axes[row, 1], late, final)):
            _mean_band(ax, rows, test, offsets=offsets, label=f"test {what}")
            if sub in rows:
                _mean_band(ax, rows, sub, dashes=True, offsets=offsets, label=f"train-subset {what}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _plain_log_axis(axes[row, 0])
        axes[row, 0].set(xlabel="epoch", ylabel=f"{what} ({unit})", title=f"{what} in eval mode, log scale")
        axes[row, 1].axhline(0, color="grey", lw=0.8)
        axes[row, 1].set(xlabel="epoch", ylabel=f"{what} − the arm's final test {what} ({unit})",
                         title=f"last half (epochs {int(late['epoch'].min())}–{int(last)}), relative to the end")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"regularizer=none vs all, eval mode: {arm_sizes(history)}", wrap=True)
    fig.tight_layout()
    return save(fig, path)


def gen_gap_figure(history: pd.DataFrame, path: Path) -> Path | None:
    """Generalization gap per epoch, none vs all, mean with a ±1 sd band over seeds where an arm has several."""
    data = none_vs_all(history) if len(history) else history
    if data.empty or "gen_gap" not in data:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    _mean_band(ax, data, "gen_gap")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="epoch", ylabel="test − train-subset recon (SSE/image)", title="generalization gap")
    ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(arm_sizes(history), fontsize=9, wrap=True)
    fig.tight_layout()
    return save(fig, path)


def recon_metric(runs: pd.DataFrame) -> str:
    """recon_mean (from the posterior mean) where the included runs measure it, else test_recon."""
    done = normalize(runs)
    return "recon_mean" if values(done[done["included"]], "recon_mean").notna().any() else "test_recon"


def _combo_colors(combos: list[str]) -> dict[str, tuple]:
    order = sorted(combos, key=lambda c: (0 if c == "none" else len(c.split("-")), c))
    return dict(zip(order, sns.color_palette("husl", len(order))))


def _nearby_labels(x: pd.Series, y: pd.Series, names: pd.Series, distance: float = 0.025) -> list:
    """((x, y), names) per group of points closer than `distance` of the axes' ranges to the group's first point,
    so that points that nearly coincide get one label instead of overprinted ones."""
    span_x, span_y = (float(np.ptp(v)) or 1.0 for v in (x, y))
    groups: list = []
    for px, py, name in sorted(zip(x, y, names), key=lambda t: (t[1], t[0])):
        for (gx, gy), members in groups:
            if abs(px - gx) / span_x < distance and abs(py - gy) / span_y < distance:
                members.append(name)
                break
        else:
            groups.append(((px, py), [name]))
    return groups


def rate_distortion_figure(runs: pd.DataFrame, path: Path) -> Path | None:
    """Test KL (rate) against recon (distortion) of every included run, coloured by its combination."""
    done = normalize(runs)
    done = done[done["included"]]
    metric = recon_metric(runs)
    data = done.assign(rate=values(done, "test_kl"), distortion=values(done, metric)).dropna(
        subset=["rate", "distortion"])
    if data.empty:
        return None
    colors = _combo_colors(list(data["combo"].astype(str).unique()))
    many = len(colors) > 8  # too many colours to tell apart: each point is also labelled with its combination
    fig, ax = plt.subplots(figsize=(9.5, 6.5) if many else (7, 5))
    for combo, rows in data.groupby(data["combo"].astype(str), sort=False):
        ax.scatter(rows["rate"], rows["distortion"], color=colors[combo], label=f"{combo} ({len(rows)})", s=30,
                   edgecolor="black", lw=0.3)
    if many:
        for (x, y), names in _nearby_labels(data["rate"], data["distortion"], data["combo"].astype(str)):
            ax.annotate(" · ".join(names), (x, y), xytext=(4, 2), textcoords="offset points", fontsize=6,
                        color="#333333")
    ax.set(xlabel=metric_label("test_kl"), ylabel=metric_label(metric), title="rate–distortion, one point per run")
    if not many:
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left", title="combination (runs)",
                  title_fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def kl_spectrum_figure(study_dir: Path, runs: pd.DataFrame, path: Path) -> Path | None:
    """Each included run's per-dimension KL, in descending order (metrics.json `kl_spectrum`), coloured by its
    combination; None when no run directory holds one."""
    done = normalize(runs)
    spectra = []
    for run in done[done["included"]].itertuples():
        record = read_json(study_dir / str(run.run_name) / "metrics.json") or {}
        spectrum = record.get("kl_spectrum")
        if isinstance(spectrum, list) and spectrum:
            spectra.append((str(run.combo), np.asarray(spectrum, float)))
    if not spectra:
        return None
    colors = _combo_colors(list(dict.fromkeys(c for c, _ in spectra)))
    fig, ax = plt.subplots(figsize=(8.5 if len(colors) > 8 else 7, 4.5))
    labelled = set()
    for combo, spectrum in spectra:
        ax.plot(np.arange(1, len(spectrum) + 1), np.clip(spectrum, 1e-6, None), color=colors[combo], lw=1,
                label=None if combo in labelled else f"{combo} ({sum(c == combo for c, _ in spectra)})")
        labelled.add(combo)
    ax.set_yscale("log")
    ax.set(xlabel="latent dimension, by descending KL", ylabel="KL per dimension (nats/image)",
           title="per-dimension KL, one line per run")
    ax.legend(fontsize=7, ncol=1 if len(colors) <= 16 else 2, bbox_to_anchor=(1.02, 1), loc="upper left",
              title="combination (runs)", title_fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def strength_column(group: str, field: str) -> str:
    """The runs-frame column of one strength setting of a regularizer: `beta_value`, `dropout_p`."""
    return f"{group}_{field}"


def swept_strengths(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(group, field) of every numeric regularizer setting that takes two or more values over the included runs
    with that regularizer on (a strength sweep); needs the runs frame's strength columns."""
    done = normalize(runs)
    done = done[done["included"]]
    swept = []
    for reg in R.REGISTRY.values():
        for field in dataclasses.fields(reg.schema):
            column = strength_column(reg.group, field.name)
            if field.name == "enabled" or column not in done:
                continue
            on = values(done[done[reg.group]], column)
            if on.nunique() >= 2:
                swept.append((reg.group, field.name))
    return swept


def dose_metrics(runs: pd.DataFrame) -> list[str]:
    """The metrics of a dose-response figure: recon, test KL, and every other claim's primary metric measured."""
    done = normalize(runs)
    done = done[done["included"]]
    keys = dict.fromkeys([recon_metric(runs), "test_kl", *(c.primary for c in CLAIMS if c.primary != "recon_mean")])
    return [k for k in keys if values(done, k).notna().any()]


DOSE_COLUMNS = ["others", "dose", "metric", "mean", "std", "n"]


def _at_off_values(run: pd.Series, reg: R.Regularizer) -> bool:
    """Whether the run has `reg` on at the values that make it a no-op (β at 1, dropout at p = 0), which
    computes what `reg` off does."""
    return bool(reg.off) and all(run.get(f"{reg.group}_{k}") == v for k, v in reg.off.items())


def _others_label(run: pd.Series, others: list[str]) -> str:
    """The other regularizers a run has on, with their strengths where not the seed's: `do (dropout.p=0.1)`.
    One on at its no-op values counts as off, so a β = 1 run is `none` in a dropout dose-response."""
    flags = {g: bool(run[g]) and not _at_off_values(run, R.REGISTRY[g]) for g in others}
    strengths = {c: run[c] for c in strength_columns() if c.split("_", 1)[0] in others and c in run}
    return R.combo_name(flags) + strength_note(flags | strengths)


def dose_response(runs: pd.DataFrame, group: str, field: str) -> pd.DataFrame:
    """Every dose metric at each strength of `group`.`field`, per setting of the other regularizers (`others`)
    that was run at two or more strengths: mean, sd and number of the included runs (columns DOSE_COLUMNS).
    Runs with the regularizer off sit at its `off` value, when the registry gives one. Empty unless some
    setting has two strengths and a metric is measured."""
    done = normalize(runs)
    done = done[done["included"]]
    reg = R.REGISTRY[group]
    dose = values(done, strength_column(group, field)).where(done[group], reg.off.get(field, np.nan))
    others = [g for g in R.names() if g != group]
    data = done.assign(dose=dose, others=[_others_label(row, others) for _, row in done.iterrows()])
    data = data.dropna(subset=["dose"])
    metrics = dose_metrics(runs)
    if data["dose"].nunique() < 2 or not metrics:
        return pd.DataFrame(columns=DOSE_COLUMNS)
    parts = [data.assign(y=values(data, metric)).groupby(["others", "dose"], sort=False)["y"]
             .agg(mean="mean", std="std", n="count").dropna(subset=["mean"]).reset_index().assign(metric=metric)
             for metric in metrics]
    table = pd.concat(parts, ignore_index=True)
    # A setting (or a metric) at one strength only shows no response: it gets no line.
    table = table[table.groupby(["others", "metric"])["dose"].transform("nunique") >= 2]
    return table[DOSE_COLUMNS].sort_values(["others", "dose"], kind="stable")


def dose_response_figure(runs: pd.DataFrame, group: str, field: str, path: Path) -> Path | None:
    """Each dose metric against the strength `group`.`field` (dose_response), one line per combination of the
    other regularizers, mean ± 1 sd over the seeds at each strength."""
    table = dose_response(runs, group, field)
    if table.empty:
        return None
    reg = R.REGISTRY[group]
    metrics = list(dict.fromkeys(table["metric"]))
    cols = min(3, len(metrics))
    fig, axes = plt.subplots(-(-len(metrics) // cols), cols, figsize=(4.3 * cols, 3.3 * -(-len(metrics) // cols)),
                             squeeze=False)
    colors = _combo_colors(list(table["others"].unique()))
    for ax, metric in zip(axes.flat, metrics):
        for combo, points in table[table["metric"] == metric].groupby("others", sort=False):
            ax.errorbar(points["dose"], points["mean"], yerr=points["std"].where(points["n"] > 1), marker="o", ms=4,
                        capsize=3, color=colors[combo], label=f"others on: {combo}")
        ax.set(xlabel=f"{reg.label} {field}", title=metric_label(metric))  # the title names the y axis
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7)
    per_dose = table[table["metric"] == metrics[0]]["n"]
    counts = str(per_dose.min()) if per_dose.min() == per_dose.max() else f"{per_dose.min()}–{per_dose.max()}"
    fig.suptitle(f"dose–response of {reg.label} {field}: {counts} runs per point, mean ± 1 sd over seeds where a "
                 "point has several; one line per setting of the other regularizers", wrap=True)
    fig.tight_layout()
    return save(fig, path)


def claim_panels(claims: pd.DataFrame) -> pd.DataFrame:
    """The rows of verdicts.claims_table that the claims figure draws: primary metric measured in both arms."""
    return claims[claims["none_n"].fillna(0).astype(int).gt(0) & claims["all_n"].fillna(0).astype(int).gt(0)]


def claims_figure(runs: pd.DataFrame, claims: pd.DataFrame, path: Path) -> Path | None:
    """One panel per claim whose primary metric is measured in both arms: the per-seed all − none differences
    (dots), the estimate with its CI at the claim's level (bar), the ±SESOI band (shaded) and 0; the title
    gives the claim, its verdict and which direction the claim calls better. `claims` is
    verdicts.claims_table(runs)."""
    shown = claim_panels(claims)
    if shown.empty:
        return None
    none, all_ = (arm[arm["included"]] for arm in none_and_all(runs))
    fig, axes = plt.subplots(len(shown), 1, figsize=(6.4, 1.25 * len(shown) + 0.6), squeeze=False)
    for ax, (_, row) in zip(axes[:, 0], shown.iterrows()):
        claim = CLAIM_BY_KEY[row["claim"]]
        if np.isfinite(row["sesoi"]):
            ax.axvspan(-row["sesoi"], row["sesoi"], color="0.88", lw=0, label="±SESOI")
        ax.axvline(0, color="grey", lw=0.8)
        per_seed = paired_by_seed(none, all_, claim.primary)
        ax.plot(per_seed.to_numpy(float), np.zeros(len(per_seed)), "o", ms=4, color=PALETTE["none"], alpha=0.7)
        if np.isfinite(row["ci_low"]):
            ax.errorbar([row["estimate"]], [0.35], xerr=[[row["estimate"] - row["ci_low"]],
                                                        [row["ci_high"] - row["estimate"]]],
                        fmt="D", color=PALETTE["all"], capsize=3)
        elif np.isfinite(row["estimate"]):
            ax.plot([row["estimate"]], [0.35], "D", color=PALETTE["all"])
        ax.set_ylim(-0.5, 0.85)
        ax.set_yticks([])
        better = "← better" if claim.lower_is_better else "better →"
        ax.set_title(f"{claim.title}: {row['verdict']}   ({claim.primary}, {better})", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("all − none (dots: per seed; diamond: estimate with its CI; grey: ±SESOI)")
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
        ax.set(xlabel=f"effect on {metric_label(metric)}", title=metric_label(metric).split(" (")[0])
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    n = sorted(set(effects["n"].astype(int)))
    fig.suptitle(f"main effects ({meaning}), 95% CI; OLS on n = {', '.join(map(str, n))} runs", wrap=True)
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
    sns.heatmap(grid, annot=True, fmt=".4g", cmap="viridis_r", ax=ax, cbar_kws={"label": metric_label(metric)})
    ax.set(xlabel=_labels(col_keys), ylabel=_labels(row_keys),
           title=f"mean {metric_label(metric)} per regularizer combination")
    fig.tight_layout()
    return save(fig, path)


def _first_seed_run(runs: pd.DataFrame, on: bool) -> pd.Series | None:
    """The included none (on=False) or all (on=True) run with the lowest seed."""
    runs = normalize(runs)
    cell = runs[runs["included"] & cell_mask(runs, on)]
    return cell.sort_values("seed").iloc[0] if len(cell) else None


def images_figure(study_dir: Path, runs: pd.DataFrame, filename: str, path: Path) -> tuple[Path | None, str]:
    """`filename` of the lowest-seed none and all runs side by side at their own resolution, as JPEG; panels
    whose PNG is missing are left out. (path, 'left to right: ...') or (None, '')."""
    panels, names = [], []
    for on in (False, True):
        run = _first_seed_run(runs, on)
        if run is None:
            continue
        png = study_dir / run["run_name"] / filename
        try:
            with Image.open(png) as image:
                panels.append(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            log.warning("%s: not shown in the report (%s)", png, exc)
            continue
        names.append(f"{CELL_NAMES[on]} (seed {int(run['seed'])})")
    if not panels:
        return None, ""
    width = sum(p.width for p in panels) + PANEL_GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + PANEL_GAP
    atomic_write(path, lambda f: canvas.save(f, **JPEG_OPTIONS))
    return path, ("left to right: " if len(names) > 1 else "") + ", ".join(names)


def _run_dirs_present(study_dir: Path, runs: pd.DataFrame) -> bool:
    return any((study_dir / str(name)).is_dir() for name in runs["run_name"])


def image_panels(study_dir: Path, runs: pd.DataFrame, filename: str, path: Path) -> tuple[Path | None, str]:
    """images_figure, or, when none of the runs' directories is present (a study re-rendered from its tables),
    the figure an earlier report drew from them (as .jpg, or as the .png earlier reports drew), kept as it is;
    (path, what it shows) or (None, '')."""
    made, shows = images_figure(study_dir, runs, filename, path)
    if made is None and not _run_dirs_present(study_dir, runs):
        earlier = next((p for p in (path, path.with_suffix(".png")) if p.is_file()), None)
        if earlier is not None:
            return earlier, "drawn by an earlier report of these runs; their run directories are not present now"
    return made, shows


def group_figures(study_dir: Path, runs: pd.DataFrame, history: pd.DataFrame, effects: pd.DataFrame | None,
                  prefix: str = "") -> list[tuple[str, Path]]:
    """Every figure of one setting group that its data allows, as (caption, path) under study_dir/figures/;
    each caption says how many runs stand behind it."""
    sns.set_theme(style="whitegrid", context="notebook")
    out = study_dir / "figures"
    done = normalize(runs)
    done = done[done["included"]]
    included = history[normalize(history)["included"]] if not history.empty else history
    arms = arm_sizes(included) if not included.empty else ""
    combos, n_runs = done["combo"].nunique(), len(done)
    recon = recon_metric(runs)
    recon_grid, recon_shows = image_panels(study_dir, runs, "recon_final.png", out / f"{prefix}recon_grids.jpg")
    samples, samples_shows = image_panels(study_dir, runs, "samples.png", out / f"{prefix}samples.jpg")
    claims = claims_table(runs) if has_comparison(runs) else None
    made = [
        (f"Each claim's primary metric, all − none per seed, with the estimate, its CI and the ±SESOI band "
         f"({arms or 'none vs all'})", claims_figure(runs, claims, out / f"{prefix}claims.png")
         if claims is not None else None),
        (f"Eval-mode reconstruction and KL per epoch, none vs all ({arms}); the right panels zoom into the last "
         "half of training", curves_figure(included, out / f"{prefix}curves.png")),
        (f"Generalization gap over epochs, none vs all ({arms})",
         gen_gap_figure(included, out / f"{prefix}gen_gap.png")),
        (f"Rate–distortion: test KL against {recon}, one point per run ({n_runs} runs, {combos} combinations)",
         rate_distortion_figure(runs, out / f"{prefix}rate_distortion.png")),
        (f"Per-dimension KL spectrum, one line per run ({n_runs} runs)",
         kl_spectrum_figure(study_dir, runs, out / f"{prefix}kl_spectrum.png")),
        *[(f"Dose–response of {R.REGISTRY[g].label} {f} ({n_runs} runs; each point the mean over its seeds)",
           dose_response_figure(runs, g, f, out / f"{prefix}dose_{g}_{f}.png")) for g, f in swept_strengths(runs)],
        (f"Main effects with 95% CIs ({n_runs} runs, {combos} combinations)",
         effects_figure(effects, out / f"{prefix}main_effects.png", effects_meaning(runs))),
        (f"Mean test recon per regularizer combination ({n_runs} runs, {combos} combinations)",
         heatmap_figure(runs, out / f"{prefix}heatmap_test_recon.png")),
        (f"Final reconstructions, one run per arm ({recon_shows}; in each, top row: test images, bottom row: "
         "reconstructions)", recon_grid),
        (f"Samples from the prior, one run per arm ({samples_shows})", samples),
    ]
    return [(caption, path) for caption, path in made if path is not None]
