"""Collect the runs of a study, compute metrics and statistics, and write the report.

    python -m ablation.report                      # every study under ${ABLATION_RESULTS:-results}
    python -m ablation.report results/main         # one study
    python -m ablation.report results/ --no-wandb  # every study under results/, no W&B run
    python -m ablation.report --from-tables results/cifar10-cpu  # re-render from runs.csv/history.csv alone

For each study directory results/<study>/ this writes, atomically:
    runs.csv      one row per run: the regularizer flags, seed, status, settings_hash,
                  every final metric of metrics.json and the per-run metrics derived from history
    history.csv   the epoch rows of every run's history.csv, with the run's identifiers
    figures/      PNG figures (see ablation.figures)
    report.md     tables and figures, readable on GitHub
    report.html   the same, self-contained (images embedded)
and, unless --no-wandb, logs the tables and figures to a W&B run with job_type="report".

This module renders and writes: the runs come from ablation.collect, the statistics from
ablation.stats, the figures from ablation.figures. report.md holds markdown tables and figures
linked relatively (figures/*.png, *.jpg); report.html is the same document with every image embedded
as a base64 data URI. Runs are pooled only within a setting group (one settings_hash); runs
excluded from the statistics are listed with the reason.

Every report opens with the verdict rules of ablation.verdicts. The claims table is a pure
function of runs.csv: for each setting group, `render_claims_markdown(claims_table(group_runs))`
is in report.md verbatim, and so is the secondary table. Every metric and statistic is defined
in ablation.metrics and ablation.stats; the appendix prints them.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import markdown as md_lib
import pandas as pd

from . import regularizers as R
from . import verdicts as V
from . import wandb_logger
from .collect import NoResultsError, collect_study, find_studies, read_runs_csv, run_columns, write_tables
from .figures import dose_response, group_figures, swept_strengths
from .metrics import METRICS, derived_metrics
from .runio import atomic_write_text
from .stats import (ALPHA, NotEstimable, cell_summary, conditional_effects, effects_meaning, has_comparison,
                    interaction_effects, main_effects, metric_label, normalize, number_word, setting_groups,
                    statistics)

log = logging.getLogger("ablation.report")  # by name: run as `python -m ablation.report`, __name__ is __main__

STATUS_NOTES = {
    "running": "no final metrics yet (in progress, or killed before finishing)",
    "failed": "the run raised an error",
    "diverged": "non-finite loss or gradient norm; counted in the diverged-runs row",
    "invalid": "metrics.json unreadable",
    "completed": "completed, but a file is missing or inconsistent",
}


@dataclass
class ReportResult:
    """What write_report produced: the two documents, the figures and the tables (numeric, for W&B)."""

    markdown: Path
    html: Path
    figures: list[Path] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- formatting


def num(x, digits: int = 4, sign: bool = False, min_decimals: int = 0) -> str:
    """`digits` significant digits (at least `min_decimals` decimals), without an exponent for
    0.001 <= |x| < 1e6; 'n/a' when missing."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(x):
        return "n/a"
    plus = "+" if sign else ""
    if x == 0 or not 1e-3 <= abs(x) < 1e6:
        return f"{x:{plus}.{digits}g}"
    decimals = max(0, min_decimals, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:{plus}.{decimals}f}"


def pvalue(p) -> str:
    """A p-value to 3 decimals (4 where 3 would round it across 0.05), in scientific notation below
    0.001; '—' when no test was run."""
    if p is None or not math.isfinite(float(p)):
        return "—"
    if p < 0.001:
        return f"{p:.1e}"
    return f"{p:.4f}" if (p < 0.05) != (round(p, 3) < 0.05) else f"{p:.3f}"


def _text(value) -> str:
    return value if isinstance(value, str) and value else "—"


def md_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of `frame` (cells as strings, '|' escaped)."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _cell(mean, ci, n, kind: str) -> str:
    n = int(n)
    if kind == "count":
        return f"{int(mean)} of {n}" if n else "no runs"
    if n == 0:
        return "n/a (n=0)"
    if n == 1:
        return f"{num(mean)} (n=1)"
    return f"{_mean_to(mean, ci)} ± {num(ci, 2)} (n={n})"


def _mean_to(mean, ci) -> str:
    """The mean to 4 significant digits, or to the last decimal of its CI half-width (2 digits) when
    that is finer: 1871.23 ± 0.33, not 1871 ± 0.33."""
    try:
        ci = float(ci)
    except (TypeError, ValueError):
        return num(mean)
    if not math.isfinite(ci) or ci <= 0:
        return num(mean)
    return num(mean, min_decimals=1 - math.floor(math.log10(ci)))


def _interval(estimate, low, high) -> str:
    """'+81.66 [74.10, 89.22]', the estimate alone without a CI, '—' without an estimate."""
    try:
        if not math.isfinite(float(estimate)):
            return "—"
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(float(low)):
        return num(estimate, sign=True)
    return f"{num(estimate, sign=True)} [{num(low)}, {num(high)}]"


def _level(level) -> str:
    return f"{100 * float(level):.4g}%" if math.isfinite(float(level)) else "—"


def _sesoi(value) -> str:
    return num(value, digits=3)


def _metric_name(key: str, label: str) -> str:
    """The metric's label and its key, e.g. 'probe accuracy (fraction), `probe_acc`'."""
    return f"`{key}`" if label == key else f"{label}, `{key}`"


def claims_display(table: pd.DataFrame) -> pd.DataFrame:
    """The claims table with formatted cells, as shown in the report."""
    return pd.DataFrame({
        "Claim": table["title"], "Primary metric": [_metric_name(r.primary, r.label) for r in table.itertuples()],
        "Better": table["direction"],
        "none": [_cell(r.none_mean, r.none_ci, r.none_n, "mean") for r in table.itertuples()],
        "all": [_cell(r.all_mean, r.all_ci, r.all_n, "mean") for r in table.itertuples()],
        "Δ (all − none) [CI]": [_interval(r.estimate, r.ci_low, r.ci_high) for r in table.itertuples()],
        "CI level": table["ci_level"].map(_level), "Test": table["test"],
        "p": table["p_value"].map(pvalue), "Holm p": table["p_holm"].map(pvalue), "SESOI": table["sesoi"].map(_sesoi),
        "TOST p": table["p_tost"].map(pvalue), "Verdict": table["verdict"].map(lambda v: f"**{v}**"),
        "Note": table["note"].map(lambda v: v if isinstance(v, str) else ""),
    })


def render_claims_markdown(table: pd.DataFrame) -> str:
    """The markdown of a verdicts.claims_table() frame; report.md holds it verbatim."""
    return md_table(claims_display(table))


def _claim_title(key: str) -> str:
    return V.CLAIM_BY_KEY[key].title if key in V.CLAIM_BY_KEY else "context (no claim)"


def secondary_display(table: pd.DataFrame) -> pd.DataFrame:
    """The measured rows of a verdicts.secondary_table() frame, formatted as shown in the report."""
    table = table[V.measured(table)]
    return pd.DataFrame({
        "Claim": table["claim"].map(_claim_title), "Metric": [_metric_name(r.metric, r.label) for r in
                                                              table.itertuples()],
        "none": [_cell(r.none_mean, r.none_ci, r.none_n, r.kind) for r in table.itertuples()],
        "all": [_cell(r.all_mean, r.all_ci, r.all_n, r.kind) for r in table.itertuples()],
        "Δ (all − none) [95% CI]": ["—" if r.kind == "count" else _interval(r.estimate, r.ci_low, r.ci_high)
                                    for r in table.itertuples()],
        "Test": table["test"], "p": table["p_value"].map(pvalue), "q (BH)": table["q_value"].map(pvalue),
        "Change": table["change"],
    })


def render_secondary_markdown(table: pd.DataFrame) -> str:
    """The secondary table's markdown, then the metrics these runs do not measure; report.md holds it verbatim."""
    text = md_table(secondary_display(table))
    missing = table.loc[~V.measured(table), "metric"]
    if len(missing):
        text += "\n\nNot measured in these runs: " + ", ".join(f"`{m}`" for m in missing) + "."
    return text


def _effect_cell(row) -> str:
    if not math.isfinite(row.ci_low):
        return f"{num(row.estimate)} (no CI)"
    text = f"{num(row.estimate)} [{num(row.ci_low)}, {num(row.ci_high)}]"
    return f"**{text}**" if row.q_value < ALPHA else text


def effects_display(effects: pd.DataFrame) -> pd.DataFrame:
    """Effects as a metric × term grid of 'estimate [95% CI]' (bold when its BH q over the table is < 0.05)."""
    cells = effects.assign(cell=[_effect_cell(r) for r in effects.itertuples()],
                           Metric=effects["metric"].map(metric_label))
    grid = cells.pivot(index="Metric", columns="term", values="cell")
    grid = grid.reindex(index=list(dict.fromkeys(cells["Metric"])), columns=list(dict.fromkeys(cells["term"])))
    return grid.fillna("—").reset_index().rename(columns=lambda c: c.replace("_", " "))


def _df_note(effects: pd.DataFrame) -> str:
    df = sorted(set(effects["df_resid"].astype(int)))
    n = sorted(set(effects["n"].astype(int)))
    text = f"OLS on n = {', '.join(map(str, n))} runs, residual df = {', '.join(map(str, df))}."
    if 0 in df:
        text += (" **Residual df is 0** (as many runs as terms): the estimates have no confidence intervals "
                 "or tests; add seeds.")
    return text


def render_effects_markdown(effects: pd.DataFrame) -> str:
    """Main effects (or interactions) table with its OLS note; bold = BH q < 0.05 over the table's effects."""
    tested = int(effects["q_value"].notna().sum())
    note = (f" Bold: Benjamini–Hochberg q < 0.05 over the {tested} effects of this table (the CIs are unadjusted "
            "95%).") if tested else ""
    return _df_note(effects) + note + "\n\n" + md_table(effects_display(effects))


def _regularizer_label(group: str) -> str:
    return R.REGISTRY[group].label if group in R.REGISTRY else group


def conditional_display(conditional: pd.DataFrame) -> pd.DataFrame:
    """One row per (metric, A, B): A's effect with B off and with B on, each with its 95% CI."""
    rows = []
    for (metric, factor, given), pair in conditional.groupby(["metric", "factor", "given"], sort=False):
        off, on = (pair[pair["given_on"] == flag].iloc[0] for flag in (False, True))
        rows.append({"Metric": metric_label(metric), "Effect of A": _regularizer_label(factor),
                     "B": _regularizer_label(given), "A with B off": _interval(off.estimate, off.ci_low, off.ci_high),
                     "A with B on": _interval(on.estimate, on.ci_low, on.ci_high)})
    return pd.DataFrame(rows, columns=["Metric", "Effect of A", "B", "A with B off", "A with B on"])


def render_conditional_markdown(conditional: pd.DataFrame) -> str:
    """The conditional effects' markdown (stats.conditional_effects)."""
    return md_table(conditional_display(conditional))


def render_cells_markdown(cells: pd.DataFrame) -> str:
    """Runs per regularizer combination, by status, with the seed-to-seed std of test recon."""
    display = pd.DataFrame({
        "Combination": cells["combo"],
        **{R.REGISTRY[r].tag: cells[r].map({True: "on", False: "off"}) for r in R.names()},
        "In statistics": cells["included"], "Diverged": cells["diverged"], "Failed": cells["failed"],
        "Running": cells["running"], "Other excluded": cells["other_excluded"],
        "Test recon mean (SSE/image)": cells["test_recon_mean"].map(num),
        "Seed std of test recon": cells["test_recon_seed_std"].map(num),
    })
    return md_table(display)


def _integer(value, missing: str = "n/a") -> str:
    """An integer setting as text; `missing` when absent (a null data size means the whole split)."""
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return missing


def render_settings_markdown(runs: pd.DataFrame, settings_hash: str) -> str:
    """The settings of one group (from config.yaml via runs.csv): budget, epochs, width, data sizes."""
    known = runs[runs["budget"].notna()]
    value = (known.iloc[0] if len(known) else pd.Series(dtype=object)).get
    display = pd.DataFrame([{
        "settings_hash": f"`{settings_hash}`", "budget": value("budget") or "n/a",
        "epochs": _integer(value("epochs")), "width": _integer(value("width")),
        "latent dim": _integer(value("latent_dim")), "batch size": _integer(value("batch_size")),
        "train images": _integer(value("train_size"), "all"), "test images": _integer(value("test_size"), "all"),
        "runs": len(runs),
    }])
    return md_table(display)


def render_excluded_markdown(runs: pd.DataFrame) -> str:
    """Every run left out of the statistics, with its status and the reason."""
    excluded = normalize(runs)
    excluded = excluded[~excluded["included"]]
    if excluded.empty:
        return "None: every run is completed and readable."
    display = pd.DataFrame({
        "Run": excluded["run_name"].map(lambda r: f"`{r}`"), "Status": excluded["status"],
        "Setting group": excluded["settings_hash"].map(lambda h: f"`{h[:8]}`" if isinstance(h, str) else "unknown"),
        "Reason": excluded["excluded_reason"].map(_text),
    })
    return md_table(display)


def render_appendix_markdown() -> str:
    """Definitions of every metric and statistic in the report."""
    lines = ["## Appendix: definitions", "", "### Metrics (one value per run)", ""]
    lines += [f"- **{m.label}** ({m.unit}), `{m.key}`: {m.definition}" for m in METRICS.values()]
    lines += ["", "### Statistics (over runs)", ""]
    lines += [f"- **{name}**: {text}" for name, text in statistics().items()]
    lines += ["", "### Run statuses", ""]
    lines += [f"- **{s}**: {text}" for s, text in STATUS_NOTES.items()]
    return "\n".join(lines)


def render_rules_markdown() -> str:
    """The verdict rules of ablation.verdicts: the claims table and the precedence; every report opens with them."""
    rules = V.rules_table()
    display = pd.DataFrame({
        "Claim": rules["claim"], "Seed report": rules["seed_words"].map(lambda w: f"“{w}”"),
        "Primary metric": rules["primary"].map(lambda k: f"`{k}`"), "Better": rules["direction"],
        "SESOI": rules["sesoi"], "Why this SESOI": rules["reason"],
        "Secondary (never decide)": rules["secondary"].map(lambda t: ", ".join(f"`{k}`" for k in t.split(", "))),
        "Untestable here when": rules["untestable_when"],
    })
    precedence = [f"{i}. **{verdict}**: {text}" for i, (verdict, text) in enumerate(V.PRECEDENCE, 1)]
    return "\n".join([
        "Each claim of the seed report gets one verdict, decided by its primary metric alone: `all` against "
        "`none`, in the claimed direction and beyond the smallest effect size of interest (SESOI). The rules are "
        "declared in `ablation/verdicts.py`, before the runs they judge are made. The SESOIs are absolute, or "
        "tied to the baseline's level where the metric has no absolute scale (dB of PSNR, a fraction of an FD); "
        "none depends on the spread over seeds.", "",
        md_table(display), "",
        "A claim's verdict is the first of these that applies:", "", *precedence, "",
        "Δ (all − none) is paired by seed when both arms hold the same seeds, and Welch's otherwise; the table "
        "names the test. Holm's correction runs over the claims tested in a setting group, so each claim's CI is "
        "shown at its Holm step level. Secondary metrics get Benjamini–Hochberg q-values over the secondary rows, "
        "and factorial effects over each effects table. The seed's “BN and dropout were crucial for stability” "
        "is read from the factorial's main effects of batch norm and dropout on the stability metrics, where a "
        "factorial was run."])


def _count_text(n: int, what: str = "run") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


TOTAL_LOSS_NOTE = ("Total losses (test_loss = recon + β·KL) are not compared: `all` trains with β = 4 and `none` "
                   "with β = 1, so the two totals weigh the KL differently. The β-independent rows (neg. ELBO, "
                   "bits/dim) compare the fit on one scale.")


def _comparison_section(runs: pd.DataFrame, key: str, tables: dict) -> list[str]:
    lines = ["### Claims: regularizer=none vs regularizer=all", ""]
    if not has_comparison(runs):
        return lines + ["No finished run of regularizer=none or regularizer=all in this group.", ""]
    claims, secondary = V.claims_table(runs), V.secondary_table(runs)
    tables[f"claims/{key}"], tables[f"secondary/{key}"] = claims, secondary  # numbers, for W&B to sort and plot
    names = R.names()
    count, all_on = number_word(len(names)), R.combo_name(dict.fromkeys(names, True))
    tested = int(claims["p_holm"].notna().sum())
    family = (f"Holm's correction runs over the {_count_text(tested, 'claim')} tested here" if tested else
              "no claim has a test here, so there is no Holm family")
    return lines + [
        f"`none` = all {count} regularizers off; `all` = `{all_on}` (all {count} on). Cells: mean ± 95% CI "
        f"half-width over the runs (n). Δ is `all` − `none` with its CI at the claim's Holm step level (CI level); "
        f"{family}. The verdict follows the rules above.", "",
        render_claims_markdown(claims), "",
        "#### Secondary and context rows", "",
        "These rows never decide a claim. Δ with its 95% CI (paired or Welch, as named); q is the "
        "Benjamini–Hochberg q over the rows tested; the diverged-runs row uses Fisher's exact test.", "",
        render_secondary_markdown(secondary), "", TOTAL_LOSS_NOTE, ""]


def _effects_section(runs: pd.DataFrame, key: str, tables: dict) -> tuple[list[str], pd.DataFrame | None]:
    """The factorial effects; no section at all when the runs do not identify them (e.g. none and all only)."""
    try:
        effects = main_effects(runs, V.EFFECT_METRICS)
    except NotEstimable:
        return [], None
    tables[f"main_effects/{key}"] = effects
    lines = ["### Factorial effects", "",
             f"Main effect of each regularizer ({effects_meaning(runs)}) with its 95% CI.", "",
             render_effects_markdown(effects), ""]
    try:
        interactions = interaction_effects(runs, V.INTERACTION_METRICS)
    except NotEstimable as exc:
        return lines + [f"Two-way interactions not estimated: {exc}.", ""], effects
    tables[f"interactions/{key}"] = interactions
    lines += ["Two-way interactions: OLS with every main effect and every pairwise product, factors coded −1/+1, "
              "95% CI. A regularizer's column is its main effect in this model (on − off, averaged over the "
              "other factors); a column A:B is how much A's effect changes when B is switched on.", "",
              render_effects_markdown(interactions), ""]
    conditional = conditional_effects(runs, interactions)
    if len(conditional):
        tables[f"conditional_effects/{key}"] = conditional
        lines += ["Where an interaction A:B (q < 0.05) is larger than A's main effect, A's main effect hides "
                  "opposite or unequal effects, so here is A's effect with B off and with B on (the other factors "
                  "averaged; 95% CI from the interaction model):", "",
                  render_conditional_markdown(conditional), ""]
    return lines, effects


def _group_section(study_dir: Path, settings_hash: str, runs: pd.DataFrame, history: pd.DataFrame,
                   prefix: str, result: ReportResult) -> list[str]:
    key = settings_hash[:8]
    cells = cell_summary(runs)
    result.tables[f"cells/{key}"] = cells
    lines = [f"## Setting group `{key}`", "", render_settings_markdown(runs, settings_hash), "",
             "### Runs per cell", "", render_cells_markdown(cells), ""]
    lines += _comparison_section(runs, key, result.tables)
    effect_lines, effects = _effects_section(runs, key, result.tables)
    lines += effect_lines
    lines += _dose_section(runs, key, result.tables)
    group_history = history[history["settings_hash"].astype(str) == settings_hash] if len(history) else history
    figures = group_figures(study_dir, runs, group_history, effects, prefix)
    lines += ["### Figures", ""]
    for caption, path in figures:
        result.figures.append(path)
        lines += [f"**{caption}**", "", f"![{caption}]({path.relative_to(study_dir).as_posix()})", ""]
    if not figures:
        lines += ["No figures: no included runs to plot.", ""]
    return lines


def render_dose_markdown(table: pd.DataFrame, group: str, field: str) -> str:
    """A dose_response table: one row per setting of the other regularizers and strength, one column per metric
    (mean ± sd over the runs, and how many)."""
    rows = []
    for (others, dose), points in table.groupby(["others", "dose"], sort=False):
        row = {"Others on": others, f"{R.REGISTRY[group].label} {field}": f"{dose:g}"}
        for point in points.itertuples():
            spread = f" ± {num(point.std)}" if point.n > 1 else ""
            row[metric_label(point.metric)] = f"{num(point.mean)}{spread}"
        row["Runs"] = int(points["n"].max())
        rows.append(row)
    return md_table(pd.DataFrame(rows).fillna("n/a"))


def _dose_section(runs: pd.DataFrame, key: str, tables: dict) -> list[str]:
    lines = []
    for group, field in swept_strengths(runs):
        table = dose_response(runs, group, field)
        if table.empty:
            continue
        tables[f"dose/{key}/{group}_{field}"] = table
        lines += [f"### Dose–response of {R.REGISTRY[group].label} {field}", "",
                  "Each strength's mean ± sd over its runs (seeds); runs with the regularizer off sit at its off "
                  "value.", "", render_dose_markdown(table, group, field), ""]
    return lines


def _header(study_dir: Path, runs: pd.DataFrame, groups: list) -> list[str]:
    runs = normalize(runs)
    counts = runs["status"].value_counts()
    status_text = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines = [f"# VAE regularizer ablation: study `{study_dir.name}`", "",
             f"Generated by `python -m ablation.report` from {len(runs)} run directories ({status_text}); "
             f"{int(runs['included'].sum())} runs are in the statistics, {int((~runs['included']).sum())} are "
             f"excluded (see [Excluded runs](#excluded-runs)). Per-run values: `runs.csv`; per-epoch values: "
             f"`history.csv`.", "", "## Verdict rules", "", render_rules_markdown(), ""]
    if len(groups) > 1:
        lines += [f"> **{len(groups)} setting groups.** These runs differ in non-regularizer settings "
                  f"(settings_hash); runs of different groups are never pooled, and each group is reported "
                  f"separately below.", ""]
    if not runs["included"].any():
        lines += ["No run has finished yet: there is nothing to compare.", ""]
    return lines


def render_lr_markdown(table: pd.DataFrame) -> str:
    """The learning-rate sweep's stability table (verdicts.stability_by_lr)."""
    display = pd.DataFrame({
        "Combination": table["combo"], "lr": table["lr"].map(num), "Runs": table["runs"],
        "Diverged": table["diverged"], "Divergence rate": table["divergence_rate"].map(num),
        "Mean loss spike rate": table["spike_rate"].map(num), "Mean test recon": table["test_recon"].map(num),
        "Stable": table["stable"].map({True: "yes", False: "no"}),
        "Largest stable lr": table["largest_stable_lr"].map(lambda v: num(v) if v == v else "none"),
    })
    return md_table(display)


def _lr_section(runs: pd.DataFrame) -> list[str]:
    table = V.stability_by_lr(runs)
    if table is None:
        return []
    limit = V.CLAIM_BY_KEY["stability"].sesoi.value
    return ["## Stability across learning rates", "",
            f"Runs of each combination at each learning rate of the sweep (their settings differ, so each lr is a "
            f"setting group of its own above). Stable: no run diverged and every completed run's loss spike rate is "
            f"at most {num(limit)} (the stability claim's SESOI). The largest stable learning rate is the largest at "
            f"which a combination is stable, and stable at every smaller one. The mean test recon of the completed "
            f"runs is descriptive: a run that ends at a collapsed model without a loss spike counts as stable here, "
            f"and only its test recon shows it.", "",
            render_lr_markdown(table), ""] + _stress_section(runs)


def render_stress_markdown(table: pd.DataFrame) -> str:
    """The stability claims under the sweep's stress (verdicts.stress_verdicts)."""
    display = pd.DataFrame({
        "Claim": table["claim"], "Combination vs none": table["combo"],
        "Learning rates": table["lrs"].map(lambda lrs: ", ".join(f"{lr:g}" for lr in lrs)),
        "none failed": [f"{k}/{n}" for k, n in zip(table["none_failed"], table["none_n"])],
        "Combination failed": [f"{k}/{n}" for k, n in zip(table["failed"], table["n"])],
        "Largest stable lr (none → combination)": [
            f"{a:g} → {b:g}".replace("nan", "none")
            for a, b in zip(table["none_largest_stable_lr"], table["largest_stable_lr"])],
        "Fisher p": table["p_value"].map(num), "Holm p": table["p_holm"].map(num),
        "Verdict": table["verdict"].map(lambda v: f"**{v}**"), "Why": table["reason"],
    })
    return md_table(display)


def _stress_section(runs: pd.DataFrame) -> list[str]:
    table = V.stress_verdicts(runs)
    if table is None or table.empty:
        return []
    return ["### Verdicts under stress", "", V.STRESS_RULE, "", render_stress_markdown(table), ""]


def build_markdown(study_dir: Path, runs: pd.DataFrame, history: pd.DataFrame) -> tuple[str, ReportResult]:
    """report.md's text; also writes the figures and collects them and the tables in a ReportResult."""
    result = ReportResult(markdown=study_dir / "report.md", html=study_dir / "report.html")
    groups = setting_groups(runs)
    lines = _header(study_dir, runs, groups)
    for settings_hash, group in groups:
        prefix = f"{settings_hash[:8]}_" if len(groups) > 1 else ""
        lines += _group_section(study_dir, settings_hash, group, history, prefix, result)
    lines += _lr_section(runs)
    lines += ["## Excluded runs", "", render_excluded_markdown(runs), "", render_appendix_markdown(), ""]
    return "\n".join(lines), result


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; line-height: 1.45; color: #1f2328; }}
div.scroll {{ overflow-x: auto; margin: 1em 0; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f6f8fa; }}
td.num {{ white-space: nowrap; }}
img {{ max-width: 100%; }}
code {{ background: #f6f8fa; padding: 0 3px; white-space: nowrap; }}
blockquote {{ border-left: 4px solid #d0d7de; margin-left: 0; padding-left: 1em; color: #59636e; }}
</style></head><body>
{body}
</body></html>
"""

NOWRAP_CHARS = 48  # a table cell with a digit and at most this much text is a number: never broken inside


MIME = {".png": "image/png", ".jpg": "image/jpeg"}


def _embed(match: re.Match, base: Path) -> str:
    src = match.group(1)
    data = base64.b64encode((base / src).read_bytes()).decode("ascii")
    return f'src="data:{MIME[Path(src).suffix]};base64,{data}"'


def _numeric_cell(match: re.Match) -> str:
    """A <td> whose text holds a digit and is short (a value, a CI, a p-value such as 3.9e-05) gets class num,
    which keeps it on one line; longer cells are prose and may wrap."""
    text = html.unescape(re.sub(r"<[^>]+>", "", match.group(2)))
    if re.search(r"\d", text) and len(text) <= NOWRAP_CHARS:
        return f'<td class="num"{match.group(1)}>{match.group(2)}</td>'
    return match.group(0)


def markdown_to_html(text: str, base: Path, title: str) -> str:
    """Self-contained HTML of the markdown: tables rendered and scrollable sideways, numeric cells never broken
    inside, image links under `base` embedded as data URIs."""
    body = md_lib.markdown(text, extensions=["tables", "toc"])
    body = body.replace("<table>", '<div class="scroll"><table>').replace("</table>", "</table></div>")
    body = re.sub(r"<td([^>]*)>(.*?)</td>", _numeric_cell, body, flags=re.S)
    body = re.sub(r'src="([^":]+\.(?:png|jpg))"', lambda m: _embed(m, base), body)
    return HTML_TEMPLATE.format(title=html.escape(title), body=body)


def write_report(study_dir: Path, runs: pd.DataFrame, history: pd.DataFrame) -> ReportResult:
    """Write figures/, report.md and report.html for one study; returns what was written. Figures of an earlier
    report that this one does not show are removed."""
    text, result = build_markdown(study_dir, runs, history)
    shown = {p.resolve() for p in result.figures}
    for old in (*(study_dir / "figures").glob("*.png"), *(study_dir / "figures").glob("*.jpg")):
        if old.resolve() not in shown:
            old.unlink()
    atomic_write_text(result.markdown, text)
    atomic_write_text(result.html, markdown_to_html(text, study_dir, f"VAE ablation: {study_dir.name}"))
    return result


# ---------------------------------------------------------------------------------------- from tables


def with_derived_metrics(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """`runs` with the metrics.derived_metrics of each included run computed from its rows of `history` (the
    study's history.csv) wherever `runs` has no value; values already there win, since history.csv holds epoch
    rows only and runs.csv's step-based measures came from the run's own step rows."""
    runs = runs.copy()
    if history.empty:
        return runs
    for index, run in normalize(runs).iterrows():
        if not run["included"]:
            continue
        for key, value in derived_metrics(history[history["run_name"] == run["run_name"]]).items():
            if key not in runs:
                runs[key] = pd.Series(math.nan, index=runs.index, dtype=float)
            if pd.isna(runs.at[index, key]):
                runs.at[index, key] = value
    known = [c for c in run_columns() if c in runs]
    return runs[known + [c for c in runs.columns if c not in known]]


def read_study_tables(study_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, history) of a study from its runs.csv and history.csv alone, with the derived metrics the runs
    lack computed from history.csv (with_derived_metrics): for studies whose run directories are gone."""
    history_csv = study_dir / "history.csv"
    history = pd.read_csv(history_csv, dtype={"settings_hash": str, "run_name": str}) \
        if history_csv.is_file() and history_csv.stat().st_size else pd.DataFrame()
    return with_derived_metrics(read_runs_csv(study_dir / "runs.csv"), history), history


def find_table_studies(dirs: list[Path]) -> list[Path]:
    """Directories holding a runs.csv among `dirs` and up to 3 levels below them."""
    found = []
    for d in dirs:
        for depth in range(4):
            found += [p.parent for p in sorted(d.glob("/".join(["*"] * depth + ["runs.csv"])))]
    if not found:
        raise NoResultsError(f"no runs.csv in {', '.join(str(d) for d in dirs)} or up to 3 levels below")
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------- W&B


def study_name(study_dir: Path, runs: pd.DataFrame) -> str:
    """The `study` the runs were trained under (their W&B group), e.g. cifar10-cpu/none-vs-all."""
    names = runs["study"].dropna().astype(str) if "study" in runs else pd.Series(dtype=str)
    return names.mode().iloc[0] if len(names) else study_dir.name


def report_run_id(study_dir: Path, study: str) -> str:
    """The report run's W&B id: the same for every `make report` of one study directory, so that each
    report updates its run (resume="allow") rather than adding one."""
    digest = hashlib.sha1(str(Path(study_dir).resolve()).encode()).hexdigest()[:8]
    return f"{wandb_logger.safe_name('report', study)[:55]}-{digest}"


def log_to_wandb(study_dir: Path, study: str, tables: dict[str, pd.DataFrame], figures: list[Path]) -> None:
    """Log the report's tables (numeric: W&B sorts and plots them) and figures to the study's report run
    (job_type=report, group=<study>, in study_dir/wandb/), in the project and entity of its training runs."""
    cfg = wandb_logger.study_logger_config(study_dir)
    logger = wandb_logger.start(cfg, run_dir=study_dir, name=f"report-{study.replace('/', '-')}", group=study,
                                job_type="report", tags=["report"], config={"study": study, "tables": sorted(tables)},
                                run_id=report_run_id(study_dir, study))
    exit_code = 1
    try:
        for key, frame in tables.items():
            logger.log_table(key, frame)
        logger.log_images({f"figures/{p.stem}": p for p in figures})
        exit_code = 0
    finally:
        logger.finish(exit_code=exit_code)


# ---------------------------------------------------------------------------------------- entry point


def analyze_study(study_dir: Path, use_wandb: bool = True, from_tables: bool = False) -> Path:
    """Collect (or, from_tables, read runs.csv/history.csv back), write runs.csv/history.csv, render the report
    (and log it to W&B); returns report.md."""
    runs, history = read_study_tables(study_dir) if from_tables else collect_study(study_dir)
    write_tables(study_dir, runs, history)
    result = write_report(study_dir, runs, history)
    if use_wandb:
        log_to_wandb(study_dir, study_name(study_dir, runs), result.tables, result.figures)
    n_in = int(runs["included"].sum())
    log.info("%s: %d runs (%d in the statistics) -> %s", study_dir, len(runs), n_in, result.markdown)
    return result.markdown


def main(argv: list[str] | None = None) -> int:
    """`python -m ablation.report [RESULTS_DIRS...] [--no-wandb]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ablation.report", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, metavar="RESULTS_DIRS",
                        help="study directories (results/main) or parents of studies (results/); "
                             "default: every study under ${ABLATION_RESULTS:-results}")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    parser.add_argument("--from-tables", action="store_true",
                        help="re-render studies from their runs.csv and history.csv, without run directories")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    dirs = args.dirs or [Path(os.environ.get("ABLATION_RESULTS", "results"))]
    try:
        studies = find_table_studies(dirs) if args.from_tables else find_studies(dirs)
    except NoResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for study_dir in studies:
        print(analyze_study(study_dir, use_wandb=not args.no_wandb, from_tables=args.from_tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
