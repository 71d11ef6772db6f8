"""Statistics over runs: none vs all, the runs per cell and the factorial effects, per setting group.

Every function here is a pure function of the runs frame (runs.csv, as ablation.collect builds
or reads it): no file is read and nothing is rendered. Runs are pooled only within a *setting
group*, the runs with one settings_hash (the hash of every non-regularizer setting).

    comparison_table    regularizer=none vs regularizer=all: mean ± 95% CI, Welch t-test, verdict
    cell_summary        runs per regularizer combination, by status, with test recon mean and seed std
    main_effects        each regularizer's main effect (OLS), with 95% CIs
    interaction_effects the two-way interactions of the full factorial

The regularizer factors are those registered in ablation.regularizers when a function runs.
Every statistic is defined in statistics(); the report's appendix prints the definitions.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats

from . import regularizers as R
from .metrics import METRICS

ALPHA = 0.05  # two-sided significance level of every test and 1 - coverage of every CI

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def number_word(n: int) -> str:
    """`n` in words up to ten ("five"), in digits above."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def statistics() -> dict[str, str]:
    """The definition of every statistic over runs, by its name in the report."""
    n = len(R.names())
    return {
        "mean ± CI": "Mean over the seeds of a cell ± the half-width of its 95% confidence interval, "
                     "t(0.975, n-1)·s/√n with the sample std s; n = runs with a defined value.",
        "Welch p": "Two-sided Welch t-test (unequal variances) of `all` against `none`; significant when p < 0.05.",
        "seed std": "Seed-to-seed sample std of the final test recon within one cell (one regularizer combination).",
        "diverged runs": "Runs stopped by a non-finite loss or gradient norm, of the finished runs (those in the "
                         "statistics plus the diverged ones); compared with Fisher's exact test.",
        "main effect": "Mean of a metric with a regularizer on minus with it off, averaged over the other factors: "
                       f"the coefficient of that 0/1 factor in an OLS fit of the metric on the {number_word(n)} "
                       "factors (statsmodels), with its 95% CI. Equal to the difference of means in a balanced "
                       "factorial.",
        "interaction": "Coefficient of the product of two 0/1 factors in an OLS fit with every main effect and "
                       f"every pairwise interaction (full 2^{n} factorial only).",
    }


class NotEstimable(Exception):
    """The runs do not identify the factorial effects asked for; the message says why."""


# ---------------------------------------------------------------------------------------- grouping


def _as_bool(series: pd.Series) -> pd.Series:
    """True/False from booleans or their CSV spellings (regularizers.as_bool); anything else is False."""
    return series.map(R.as_bool).astype(bool)


def normalize(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with the flag and `included` columns as booleans (as after reading runs.csv back)."""
    return runs.assign(**{c: _as_bool(runs[c]) for c in (*R.names(), "included")})


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
    """Runs with every registered regularizer off (`on`=False, regularizer=none) or on (regularizer=all)."""
    flags = runs[list(R.names())]
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
    regularizers = list(R.names())
    rows = []
    for combo, cell in runs.groupby("combo", sort=False):
        done = cell[cell["included"]]
        rows.append({"combo": combo, **{r: bool(cell[r].iloc[0]) for r in regularizers},
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
    order = frame[regularizers].sum(axis=1)
    return frame.assign(_n=order).sort_values(["_n", "combo"]).drop(columns="_n").reset_index(drop=True)


# ---------------------------------------------------------------------------------------- factorial effects

EFFECT_METRICS = ("test_recon", "neg_elbo", "psnr", "test_kl", "kl_cv", "gen_gap", "loss_volatility",
                  "active_units", "probe_acc")
INTERACTION_METRICS = ("test_recon", "neg_elbo", "gen_gap")
EFFECT_COLUMNS = ("metric", "term", "estimate", "ci_low", "ci_high", "p_value", "n", "df_resid")


def _design(runs: pd.DataFrame) -> pd.DataFrame:
    """Included runs of one setting group with the regularizer factors as 0/1 integers."""
    done = _single_group(runs)
    done = done[done["included"]]
    return done.assign(**{r: done[r].astype(int) for r in R.names()})


def is_full_factorial(runs: pd.DataFrame) -> bool:
    """Whether the included runs cover all 2^k combinations of the k registered regularizers."""
    design = _design(runs)
    return len(design.drop_duplicates(list(R.names()))) == 2 ** len(R.names())


def effects_meaning(runs: pd.DataFrame) -> str:
    """What a main effect of these runs is, for table and figure captions."""
    if is_balanced_factorial(runs):
        return "on − off, averaged over the other factors"
    return ("on − off in an additive model; the runs are not a balanced factorial, so this is an average over "
            "the other factors only if the effects add up")


def is_balanced_factorial(runs: pd.DataFrame) -> bool:
    """A full factorial with the same number of included runs in every combination."""
    return is_full_factorial(runs) and _design(runs).groupby(list(R.names())).size().nunique() == 1


def _fit_effects(design: pd.DataFrame, metric: str, factors: list[str], formula_rhs: str) -> list[dict]:
    """OLS of `metric` on the formula; one row per non-intercept term (CIs NaN when residual df is 0).

    The factors are coded -1/+1 and each term's coefficient (and CI) is scaled by 2^k for its k
    factors, so the rows are effects: a factor's row is its on - off difference at the average
    of the other terms (averaged over the other factors in a balanced factorial, also in a model
    with interactions), and an A:B row is how much A's effect changes when B is switched on.
    """
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
    """Main effect of each regularizer on each metric: OLS of the metric on the regularizer factors (additive).

    In a balanced factorial an effect is the on - off difference averaged over the other
    factors; in another design (e.g. the leave-one-out presets) it is the additive model's
    on - off difference, which equals that average only if the effects add up.

    Raises NotEstimable when the combinations present confound the factors (e.g. only none and
    all, which differ in every regularizer at once). Factors constant over the runs are left out.
    """
    design = _design(runs)
    if design.empty:
        raise NotEstimable("no runs in the statistics")
    factors = [r for r in R.names() if design[r].nunique() > 1]
    combos = len(design.drop_duplicates(list(R.names())))
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
    """Two-way interactions (with all main effects) of the full 2^k factorial of the k registered
    regularizers: OLS with all pairwise terms.

    Raises NotEstimable unless all 2^k combinations are present. Rows with df_resid 0 have no CI.
    """
    factors = list(R.names())
    if not is_full_factorial(runs):
        raise NotEstimable(f"two-way interactions need all {2 ** len(factors)} regularizer combinations")
    design = _design(runs)
    rows = [row for m in metrics for row in _fit_effects(design, m, factors, f"({' + '.join(factors)})**2")]
    return pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))


