"""The verdict rules: one primary metric, a direction and a smallest effect size of interest per claim.

The seed report claimed that its five regularizers together give lower reconstruction loss, sharper
reconstructions, a more controlled KL, less overfitting, more stable training, better samples and
a more structured latent space. Each claim is decided here, and only here, by one rule fixed
before any result is looked at:

    CLAIMS            each claim's primary metric, its direction, its SESOI with the reason, its
                      secondary metrics, and when the claim cannot be tested on these runs
    PRECEDENCE        the order in which a claim's verdict is decided
    rules_table       CLAIMS as a frame; every report prints it at the top
    claims_table      one verdict per claim, regularizer=none vs regularizer=all of one setting group
    secondary_table   every secondary (and context) metric, with Benjamini–Hochberg q-values
    stability_by_lr   divergence and spikes per combination and learning rate of an lr sweep
    stress_verdicts   the stability claims under that stress: all, batchnorm alone and dropout
                      alone against none, by failed runs over the sweep (STRESS_RULE)

A verdict compares `all` with `none` on the claim's primary metric (ablation.stats.difference:
paired by seed when the seeds match, Welch otherwise). Holm's correction runs over the claims
tested in the setting group; the equivalence test (TOST) is at 5% per side, i.e. a 90% CI.
Everything here is a pure function of the runs frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from . import regularizers as R
from .stats import (ALPHA, benjamini_hochberg, difference, diverged_counts, fisher_p, holm, holm_levels, mean_ci,
                    metric_label, none_and_all, values)

SUPPORTED, CONTRADICTED, EQUIVALENT = "supported", "contradicted", "equivalent"
INCONCLUSIVE, UNTESTABLE = "inconclusive", "untestable here"
VERDICTS = (SUPPORTED, CONTRADICTED, EQUIVALENT, INCONCLUSIVE, UNTESTABLE)
NOT_MEASURED = "primary metric not measured in these runs"
DB_SESOI = 0.5  # dB of PSNR: the smallest reconstruction change of interest, and the unit of the SSE SESOIs


@dataclass(frozen=True)
class Sesoi:
    """A smallest effect size of interest on a metric's own scale.

    Absolute by default. `db_of` makes it the SSE change that moves PSNR by `value` dB at the
    baseline's mean of that metric: SSE·(1 − 10^(−value/10)), 10.9% of the mean for 0.5 dB (the
    smaller of the two directions). dB is a ratio, so that SSE scales with the baseline's level;
    it never scales with the baseline's spread. `fraction_of` is a plain fraction of the
    baseline's mean, for a metric with no absolute scale.
    """

    value: float
    unit: str
    db_of: str | None = None
    fraction_of: str | None = None

    def resolve(self, baseline: pd.DataFrame) -> float:
        """The SESOI on the metric's scale, given the baseline (regularizer=none) runs; NaN when a relative
        SESOI's reference is not measured."""
        reference = self.db_of or self.fraction_of
        if reference is None:
            return self.value
        level = float(values(baseline, reference).mean()) if len(baseline) else math.nan
        if self.db_of:
            return level * (1 - 10 ** (-self.value / 10))
        return level * self.value

    def describe(self) -> str:
        if self.db_of:
            return (f"{self.value:g} dB of PSNR at none's mean {self.db_of} "
                    f"({100 * (1 - 10 ** (-self.value / 10)):.1f}% of it, {self.unit})")
        if self.fraction_of:
            return f"{100 * self.value:g}% of none's mean {self.fraction_of} ({self.unit})"
        return f"{self.value:g} {self.unit}"


# A baseline check answers "does the baseline (regularizer=none) show the problem the claim says the
# regularizers reduce?": (True, why) when it never does, so the claim is untestable here; (False, "") when
# it does; (None, why) when the runs lack a measure the check needs.
BaselineCheck = Callable[[pd.DataFrame, float], tuple]


@dataclass(frozen=True)
class Claim:
    """One claim of the seed report and the rule that decides it."""

    key: str
    title: str  # the claim, as the report's verdicts name it
    seed_words: str  # what the seed report said
    primary: str  # the metric key that decides the claim
    lower_is_better: bool
    sesoi: Sesoi
    reason: str  # why this SESOI, in one line
    secondary: tuple[str, ...]  # shown with BH q-values; they never decide the claim
    untestable_when: str = ""  # the baseline check in words
    baseline_check: BaselineCheck | None = None

    @property
    def direction(self) -> str:
        return "lower" if self.lower_is_better else "higher"


def _number(x: float) -> str:
    return f"{x:.3g}"


def no_overfitting(baseline: pd.DataFrame, delta: float) -> tuple[bool | None, str]:
    """Whether every included baseline run is free of overfitting: gap_growth < delta, and its test recon
    (validation recon where measured) has not risen from its best by delta. Where the rise is not
    measured, its best epoch (best_epoch_val where measured, else best_epoch) must be its last."""
    runs = baseline[baseline["included"]]
    growth = values(runs, "gap_growth")
    if not len(runs) or growth.isna().any() or not math.isfinite(delta):
        return None, "gap_growth not measured in every baseline run"
    rise = values(runs, "val_recon_rise").fillna(values(runs, "recon_rise"))
    best = values(runs, "best_epoch_val").fillna(values(runs, "best_epoch"))
    last = values(runs, "epochs_completed").fillna(values(runs, "epochs"))
    flat = (rise < delta).where(rise.notna(), (best == last).where(best.notna() & last.notna()))
    if flat.isna().any():
        return None, "neither the recon rise nor the best epoch is measured in every baseline run"
    if (growth >= delta).any() or not flat.astype(bool).all():
        return False, ""
    detail = (f"its test recon ends at most {_number(rise.max())} above its best"
              if rise.notna().all() else "its best epoch is its last")
    runs_text = "its one run" if len(runs) == 1 else f"any of its {len(runs)} runs"
    return True, (f"none does not overfit in {runs_text}: gap growth at most {_number(growth.max())} "
                  f"(< SESOI {_number(delta)}), and {detail}")


def no_instability(baseline: pd.DataFrame, delta: float) -> tuple[bool | None, str]:
    """Whether no baseline run diverged and no included baseline run has a loss spike (loss_spikes = 0)."""
    if (baseline["status"] == "diverged").any():
        return False, ""
    runs = baseline[baseline["included"]]
    spikes = values(runs, "loss_spikes")
    if not len(runs) or spikes.isna().any():
        return None, "loss_spikes not measured in every baseline run"
    if (spikes > 0).any():
        return False, ""
    return True, f"no none run diverged or has a loss spike ({len(runs)} run{'s' if len(runs) != 1 else ''})"


CLAIMS: tuple[Claim, ...] = (
    Claim("reconstruction", "Lower reconstruction loss", "lower reconstruction loss", "recon_mean", True,
          Sesoi(DB_SESOI, "SSE/image", db_of="recon_mean"),
          "a PSNR change under 0.5 dB is not visible side by side; dB is a ratio, so its SSE scales with the "
          "baseline's level",
          ("test_recon", "psnr_mean", "ssim", "psnr")),
    Claim("sharpness", "Sharper reconstructions", "sharper reconstructions", "sharp_hf_ratio", False,
          Sesoi(0.02, "ratio"),
          "2% of the originals' high-frequency energy (1 = as sharp as the data); less is not a visible change "
          "in blur",
          ("sharp_lap_ratio", "sample_hf_ratio")),
    Claim("kl_control", "More controlled KL", "a more controlled KL", "kl_fluct", True,
          Sesoi(0.01, "std/mean (1% of the mean KL)"),
          "a step-level KL wobble that changes by under 1% of the mean KL changes no term of the objective by "
          "more than 1%",
          ("kl_spikes", "kl_cv", "kl_max_jump")),
    Claim("overfitting", "Reduced overfitting", "reduced overfitting", "gap_growth", True,
          Sesoi(DB_SESOI, "SSE/image", db_of="test_recon"),
          "a gap that widens by less than the reconstruction SESOI (0.5 dB of test recon) costs less test recon "
          "than is of interest",
          ("recon_rise", "best_epoch_val", "val_recon_rise", "gen_gap"),
          "every none run has gap growth under the SESOI and a test (validation) recon that has not risen "
          "from its best by the SESOI (where the rise is not measured: its best epoch is its last)",
          no_overfitting),
    Claim("stability", "More stable training", "more stable training; BN and dropout were crucial for stability",
          "loss_spike_rate", True,
          Sesoi(0.01, "fraction of step rows"),
          "one more spike per 100 logged step windows; rarer spikes do not change what a run converges to",
          ("loss_spikes", "diverged", "loss_volatility"),
          "no none run diverged and no none run has a loss spike",
          no_instability),
    Claim("sample_quality", "Better generated images", "better generated images", "fd_suite", True,
          Sesoi(0.05, "FD", fraction_of="fd_suite"),
          "the suite classifier's features have no absolute scale, so 5% of the baseline's FD, about the "
          "smallest FD change reported as an improvement",
          ("kid_suite", "precision_suite", "recall_suite", "sample_hf_ratio")),
    Claim("latent", "More structured latent space", "a more structured latent space", "probe_acc", False,
          Sesoi(0.01, "accuracy (fraction)"),
          "one point of 10-class accuracy, about twice the binomial SE of an accuracy near 0.4 on 10,000 test "
          "images",
          ("knn_probe_acc", "active_units_kl", "iw_bpd")),
)
CLAIM_BY_KEY = {c.key: c for c in CLAIMS}

# Rows of the comparison that no claim rests on, shown (with the secondary rows' BH q) for context.
CONTEXT = ("test_kl", "neg_elbo", "bits_per_dim", "active_units")

# The factorial effects: every claim's primary metric, then the measures of the earlier reports.
EFFECT_METRICS = tuple(dict.fromkeys((*(c.primary for c in CLAIMS), "test_recon", "psnr", "neg_elbo", "test_kl",
                                      "kl_cv", "gen_gap", "loss_volatility")))
INTERACTION_METRICS = tuple(dict.fromkeys((*(c.primary for c in CLAIMS), "test_recon", "neg_elbo", "gen_gap")))

PRECEDENCE = (
    (UNTESTABLE, "the baseline never shows the problem (the claim's `untestable when` rule); decided first, since "
                 "a regularizer cannot reduce a problem the baseline does not have"),
    (INCONCLUSIVE, f"'{NOT_MEASURED}': the primary metric has no value in one arm (older runs lack the newer "
                   "metrics)"),
    (INCONCLUSIVE, "no test: fewer than 2 runs in an arm, or no seed-to-seed variance"),
    (SUPPORTED, "Holm-adjusted p < 0.05 (so the claim's CI at its Holm step level excludes 0) in the claimed "
                "direction, and the estimate exceeds the SESOI"),
    (CONTRADICTED, "the same in the opposite direction"),
    (EQUIVALENT, "TOST p < 0.05: the 90% CI of Δ lies within ±SESOI (unadjusted)"),
    (INCONCLUSIVE, "none of these"),
)

CLAIM_COLUMNS = ("claim", "title", "primary", "label", "direction", "none_mean", "none_ci", "none_n", "all_mean",
                 "all_ci", "all_n", "estimate", "ci_low", "ci_high", "ci_level", "test", "p_value", "p_holm", "sesoi",
                 "p_tost", "verdict", "note")
SECONDARY_COLUMNS = ("claim", "metric", "label", "kind", "none_mean", "none_ci", "none_n", "all_mean", "all_ci",
                     "all_n", "estimate", "ci_low", "ci_high", "test", "p_value", "q_value", "change", "note")


def rules_table() -> pd.DataFrame:
    """CLAIMS as a frame: claim, the seed's words, primary metric, direction, SESOI, reason, secondary metrics and
    the untestable rule."""
    return pd.DataFrame([{"claim": c.title, "seed_words": c.seed_words, "primary": c.primary,
                          "direction": c.direction, "sesoi": c.sesoi.describe(), "reason": c.reason,
                          "secondary": ", ".join(c.secondary), "untestable_when": c.untestable_when or "—"}
                         for c in CLAIMS])


def decide(claim: Claim, diff, delta: float, p_holm: float, baseline: tuple[bool | None, str]) -> tuple[str, str]:
    """(verdict, note) of one claim by PRECEDENCE, from its primary difference (stats.Difference, all − none),
    its SESOI `delta`, its Holm-adjusted p and its baseline check's answer."""
    untestable, why = baseline
    if untestable:
        return UNTESTABLE, why
    if diff.n_none == 0 or diff.n_all == 0:
        return INCONCLUSIVE, NOT_MEASURED if diff.n_none + diff.n_all == 0 else \
            f"primary metric not measured in the {'none' if diff.n_none == 0 else 'all'} runs"
    if not diff.testable:
        return INCONCLUSIVE, diff.note
    if not math.isfinite(delta):
        return INCONCLUSIVE, "SESOI undefined: its reference metric is not measured in the none runs"
    gain = -diff.estimate if claim.lower_is_better else diff.estimate  # > 0: in the claimed direction
    if p_holm < ALPHA and abs(gain) > delta:
        return (SUPPORTED, "") if gain > 0 else (CONTRADICTED, "")
    if diff.tost(-delta, delta) < ALPHA:
        return EQUIVALENT, ""
    if p_holm < ALPHA:
        side = "claimed" if gain > 0 else "opposite"
        return INCONCLUSIVE, f"a difference in the {side} direction, smaller than the SESOI but not shown within it"
    return INCONCLUSIVE, "neither a difference beyond the SESOI nor equivalence within it is shown"


def _arm(runs: pd.DataFrame, metric: str, prefix: str) -> dict:
    mean, ci, n = mean_ci(values(runs, metric))
    return {f"{prefix}_mean": mean, f"{prefix}_ci": ci, f"{prefix}_n": n}


def claims_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One verdict per claim of CLAIMS: regularizer=none vs regularizer=all over the included runs of one
    setting group, decided by `decide` with Holm's correction over the claims tested here."""
    none_runs, all_runs = none_and_all(runs)
    none, all_ = none_runs[none_runs["included"]], all_runs[all_runs["included"]]
    rows, diffs, checks = [], [], []
    for claim in CLAIMS:
        delta = claim.sesoi.resolve(none)
        diff = difference(none, all_, claim.primary)
        check = claim.baseline_check(none_runs, delta) if claim.baseline_check else (False, "")
        diffs.append(diff)
        checks.append(check)
        rows.append({"claim": claim.key, "title": claim.title, "primary": claim.primary,
                     "label": metric_label(claim.primary), "direction": claim.direction,
                     **_arm(none, claim.primary, "none"), **_arm(all_, claim.primary, "all"),
                     "estimate": diff.estimate, "test": diff.test, "sesoi": delta,
                     "p_value": math.nan if check[0] else diff.p_value(),
                     "p_tost": diff.tost(-delta, delta) if math.isfinite(delta) and not check[0] else math.nan})
    p = np.array([r["p_value"] for r in rows], float)
    p_holm, levels = holm(p), holm_levels(p)
    for row, claim, diff, check, ph, level in zip(rows, CLAIMS, diffs, checks, p_holm, levels):
        low, high = diff.ci(level) if math.isfinite(level) else (math.nan, math.nan)
        verdict, note = decide(claim, diff, row["sesoi"], ph, check)
        row |= {"ci_low": low, "ci_high": high, "ci_level": 1 - level, "p_holm": ph, "verdict": verdict,
                "note": note}
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def _change(p_q: float, estimate: float, note: str, count: bool = False) -> str:
    if math.isfinite(p_q) and p_q < ALPHA:
        if count:
            return "more in all" if estimate > 0 else "fewer in all"
        return "higher in all" if estimate > 0 else "lower in all"
    return "no clear difference" if math.isfinite(p_q) else note


def _diverged_row(claim: str, none_runs: pd.DataFrame, all_runs: pd.DataFrame) -> dict:
    (d0, n0), (d1, n1), p = diverged_counts(none_runs, all_runs)
    return {"claim": claim, "metric": "diverged", "label": "diverged runs (of finished runs)", "kind": "count",
            "none_mean": d0, "none_ci": math.nan, "none_n": n0, "all_mean": d1, "all_ci": math.nan, "all_n": n1,
            "estimate": (d1 / n1 - d0 / n0) if min(n0, n1) else math.nan, "ci_low": math.nan, "ci_high": math.nan,
            "test": "Fisher's exact", "p_value": p,
            "note": "" if math.isfinite(p) else ("no runs" if min(n0, n1) == 0 else "a single run in an arm: no test")}


def secondary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every secondary metric of every claim, then the CONTEXT rows: none vs all with a 95% CI (paired or Welch),
    p and the Benjamini–Hochberg q over the rows tested. Rows of metrics these runs lack stay in, as not
    measured (n = 0 on both sides)."""
    none_runs, all_runs = none_and_all(runs)
    none, all_ = none_runs[none_runs["included"]], all_runs[all_runs["included"]]
    specs = [(c.key, m) for c in CLAIMS for m in c.secondary] + [("context", m) for m in CONTEXT]
    specs = list({m: (claim, m) for claim, m in reversed(specs)}.values())[::-1]  # each metric once, first claim
    rows = []
    for claim, metric in specs:
        if metric == "diverged":
            rows.append(_diverged_row(claim, none_runs, all_runs))
            continue
        diff = difference(none, all_, metric)
        low, high = diff.ci(ALPHA)
        rows.append({"claim": claim, "metric": metric, "label": metric_label(metric), "kind": "mean",
                     **_arm(none, metric, "none"), **_arm(all_, metric, "all"), "estimate": diff.estimate,
                     "ci_low": low, "ci_high": high, "test": diff.test, "p_value": diff.p_value(),
                     "note": "not measured" if diff.note == "not measured" else diff.note})
    frame = pd.DataFrame(rows)
    frame["q_value"] = benjamini_hochberg(frame["p_value"])
    frame["change"] = [_change(r.q_value, r.estimate, r.note, r.kind == "count") for r in frame.itertuples()]
    return frame[list(SECONDARY_COLUMNS)]


def measured(table: pd.DataFrame) -> pd.Series:
    """Rows of a secondary_table measured in at least one arm (a diverged-runs row always is)."""
    return (table["none_n"] + table["all_n"]) > 0


def stability_by_lr(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Training stability over a learning-rate sweep; None unless the study's runs hold several `lr`.

    One row per combination and learning rate: finished runs (completed or diverged), diverged
    runs, the divergence rate, the mean loss_spike_rate and mean test_recon of the completed runs
    (descriptive: a run that collapses to a useless model without a spike is not a failure here, and
    its test recon shows it), and `stable`: no run diverged and every completed run's
    loss_spike_rate is at most the stability claim's SESOI (runs without a measured spike rate are
    judged by divergence alone). `largest_stable_lr` is, per
    combination, the largest learning rate of the sweep at which it is stable and stable at every
    smaller one: higher = more stable. Runs of different learning rates have different
    settings_hash, so this table spans setting groups; nothing else is pooled across them.
    """
    if "lr" not in runs.columns:
        return None
    done = runs[runs["status"].isin(["completed", "diverged"]) & runs["lr"].notna() & runs["combo"].notna()]
    if done["lr"].nunique() < 2:
        return None
    limit = CLAIM_BY_KEY["stability"].sesoi.value
    rows = []
    for (combo, lr), cell in done.groupby(["combo", "lr"], sort=True):
        diverged = int((cell["status"] == "diverged").sum())
        spikes = values(cell[cell["status"] == "completed"], "loss_spike_rate")
        rows.append({"combo": combo, "lr": float(lr), "runs": len(cell), "diverged": diverged,
                     "divergence_rate": diverged / len(cell), "spike_rate": spikes.mean(),
                     "test_recon": values(cell[cell["status"] == "completed"], "test_recon").mean(),
                     "stable": diverged == 0 and bool((spikes.isna() | (spikes <= limit)).all())})
    table = pd.DataFrame(rows)
    largest = {}
    for combo, cells in table.groupby("combo", sort=False):
        stable_from_below = cells.sort_values("lr")["stable"].cumprod().astype(bool)
        stable_lrs = cells.sort_values("lr")["lr"][stable_from_below]
        largest[combo] = stable_lrs.max() if len(stable_lrs) else math.nan
    return table.assign(largest_stable_lr=table["combo"].map(largest))


# The comparisons of the stability claims under stress: (the claim's words, the combination's flags).
STRESS_COMPARISONS = (
    ("more stable training", {group: True for group in R.names()}),
    ("batch norm was crucial for stability", {"batchnorm": True}),
    ("dropout was crucial for stability", {"dropout": True}),
)
STRESS_RULE = (
    "A run fails when it diverged or its loss spike rate exceeds the stability claim's SESOI. Over every learning "
    "rate of the sweep at which both combinations have finished runs, each combination's failed runs are set "
    "against none's with Fisher's exact test (two-sided), Holm-adjusted over the comparisons present. "
    "**untestable here** when no none run failed; **supported** when the combination fails less often with Holm "
    "p < 0.05; **contradicted** when it fails more often with Holm p < 0.05; **inconclusive** otherwise.")


def _failed(cell: pd.DataFrame, limit: float) -> int:
    spikes = values(cell, "loss_spike_rate")
    return int(((cell["status"] == "diverged") | ((cell["status"] == "completed") & (spikes > limit))).sum())


def stress_verdicts(runs: pd.DataFrame) -> pd.DataFrame | None:
    """The stability claims judged on a learning-rate sweep by STRESS_RULE, fixed before any sweep of the 5k
    regime ran; None when stability_by_lr has no table, or no combination of STRESS_COMPARISONS shares a
    learning rate with a none run.

    One row per comparison of STRESS_COMPARISONS whose combination was swept: the learning rates
    compared, the failed and finished runs of none and of the combination, each one's largest stable
    learning rate, Fisher's p, its Holm adjustment, the verdict and its reason.
    """
    table = stability_by_lr(runs)
    if table is None or "none" not in set(table["combo"]):
        return None
    limit = CLAIM_BY_KEY["stability"].sesoi.value
    done = runs[runs["status"].isin(["completed", "diverged"]) & runs["lr"].notna()]
    largest = table.groupby("combo")["largest_stable_lr"].first()
    rows = []
    for claim, flags in STRESS_COMPARISONS:
        combo = R.combo_name(flags)
        if combo not in largest.index:
            continue
        lrs = sorted(set(done.loc[done["combo"] == "none", "lr"]) & set(done.loc[done["combo"] == combo, "lr"]))
        if not lrs:
            continue
        base, other = (done[(done["combo"] == c) & done["lr"].isin(lrs)] for c in ("none", combo))
        k0, k1 = _failed(base, limit), _failed(other, limit)
        rows.append({"claim": claim, "combo": combo, "lrs": lrs, "none_failed": k0, "none_n": len(base),
                     "failed": k1, "n": len(other), "none_largest_stable_lr": largest["none"],
                     "largest_stable_lr": largest[combo], "p_value": fisher_p(k0, len(base), k1, len(other))})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    frame["p_holm"] = holm(frame["p_value"])
    verdicts = []
    for row in frame.itertuples():
        lower = row.failed / row.n < row.none_failed / row.none_n
        if row.none_failed == 0:
            where = "its learning rate" if len(row.lrs) == 1 else f"any of the {len(row.lrs)} learning rates"
            verdicts.append((UNTESTABLE, f"no none run failed at {where}"))
        elif not row.p_holm < ALPHA:
            verdicts.append((INCONCLUSIVE, f"Holm p = {row.p_holm:.3g} ≥ {ALPHA}" if row.p_holm == row.p_holm
                             else "too few runs for a test"))
        else:
            verdicts.append((SUPPORTED if lower else CONTRADICTED,
                             f"{'fewer' if lower else 'more'} failed runs than none, Holm p = {row.p_holm:.3g}"))
    return frame.assign(verdict=[v for v, _ in verdicts], reason=[r for _, r in verdicts])
