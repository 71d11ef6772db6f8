"""Statistics over runs: none vs all differences, the runs per cell and the factorial effects, per setting group.

Every function here is a pure function of the runs frame (runs.csv, as ablation.collect builds
or reads it): no file is read and nothing is rendered. Runs are pooled only within a *setting
group*, the runs with one settings_hash (the hash of every non-regularizer setting).

    difference          all − none of one metric: paired by seed when the seeds match, else Welch; CI, p, TOST
    holm, benjamini_hochberg   multiplicity adjustments (Holm for the claims, BH for everything else)
    cell_summary        runs per regularizer combination, by status, with test recon mean and seed std
    main_effects        each regularizer's main effect (OLS), with 95% CIs and BH q-values
    interaction_effects the two-way interactions of the full factorial
    conditional_effects A's effect with B off and on, where an interaction outgrows A's main effect

Which metric decides which claim, and how, is ablation.verdicts; this module only measures.
The regularizer factors are those registered in ablation.regularizers when a function runs.
Every statistic is defined in statistics(); the report's appendix prints the definitions.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from statsmodels.stats.multitest import multipletests
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
        "mean ± CI": "Mean over the runs of a cell ± the half-width of its 95% confidence interval, "
                     "t(0.975, n-1)·s/√n with the sample std s; n = runs with a defined value.",
        "Δ (all − none)": "Mean difference of `all` minus `none`. Paired by seed when both cells hold the same "
                          "seeds (each once): the mean of the per-seed differences, with a t-interval on n-1 df. "
                          "Otherwise (Welch) the difference of the means, with Welch's standard error and "
                          "Welch–Satterthwaite df. The table's test column says which.",
        "p": "Two-sided t-test of Δ = 0 (paired or Welch, as Δ).",
        "Holm p": "Holm's step-down adjustment of the primary claims' p-values (family: the claims tested in this "
                  "setting group); a claim's CI is shown at its Holm step level 1 − 0.05/(m − r + 1), r its rank.",
        "TOST p": "Two one-sided t-tests of Δ against ±SESOI (paired or Welch, as Δ): the larger of the two "
                  "one-sided p-values; below 0.05 exactly when the 90% CI of Δ lies within ±SESOI.",
        "q (BH)": "Benjamini–Hochberg q-value: the FDR-adjusted p over one table's family (the secondary rows of the "
                  "comparison, or every cell of one effects table).",
        "seed std": "Seed-to-seed sample std of the final test recon within one cell (one regularizer combination).",
        "diverged runs": "Runs stopped by a non-finite loss or gradient norm, of the finished runs (those in the "
                         "statistics plus the diverged ones); compared with Fisher's exact test.",
        "main effect": "Mean of a metric with a regularizer on minus with it off, averaged over the other factors: "
                       f"the coefficient of that factor in an OLS fit of the metric on the {number_word(n)} "
                       "factors (statsmodels, coded −1/+1 and scaled to on − off), with its 95% CI. Equal to the "
                       "difference of means in a balanced factorial. Bold: BH q < 0.05 over the table.",
        "interaction": "How much A's effect changes when B is switched on: the coefficient of the product of two "
                       f"factors in an OLS fit with every main effect and every pairwise interaction (full 2^{n} "
                       "factorial only), scaled to a difference of differences.",
        "conditional effect": "The effect of A with B off and with B on (the other factors averaged): A's main "
                              "effect ∓ half the A:B interaction, from the interaction model with its 95% CI. "
                              "Given for every interaction with q < 0.05 that is larger than A's main effect.",
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


def metric_label(key: str) -> str:
    """'label (unit)' of a registered metric; the key itself for one metrics.py does not (yet) register."""
    m = METRICS.get(key)
    return f"{m.label} ({m.unit})" if m else key


def values(frame: pd.DataFrame, metric: str) -> pd.Series:
    """The numeric values of `metric` in `frame` (all missing when the column is absent)."""
    if metric not in frame:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[metric], errors="coerce")


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


@dataclass(frozen=True)
class Difference:
    """`all` minus `none` of one metric: the mean difference, its standard error and degrees of freedom.

    Paired by seed (a one-sample t on the per-seed differences) when both arms hold the same seeds,
    each once; Welch's unequal-variance t otherwise. `note` says why there is no test (se NaN).
    """

    estimate: float
    se: float
    df: float
    paired: bool
    n_none: int
    n_all: int
    note: str = ""

    @property
    def testable(self) -> bool:
        return math.isfinite(self.se) and self.se > 0 and math.isfinite(self.df)

    @property
    def test(self) -> str:
        """Which test: 'paired t (3 seeds)' or 'Welch t (n = 3, 4)'; '—' when an arm has no value."""
        if min(self.n_none, self.n_all) == 0:
            return "—"
        if self.paired:
            return f"paired t ({self.n_none} seed{'s' if self.n_none != 1 else ''})"
        return f"Welch t (n = {self.n_none}, {self.n_all})"

    def p_value(self) -> float:
        """Two-sided p of H0: mean difference 0."""
        if not self.testable:
            return math.nan
        return float(2 * stats.t.sf(abs(self.estimate) / self.se, self.df))

    def ci(self, alpha: float = ALPHA) -> tuple[float, float]:
        """Two-sided (1 - alpha) t-interval of the mean difference."""
        if not self.testable:
            return math.nan, math.nan
        half = float(stats.t.ppf(1 - alpha / 2, self.df)) * self.se
        return self.estimate - half, self.estimate + half

    def tost(self, low: float, high: float) -> float:
        """p of the two one-sided t-tests of H0: difference <= low or >= high (equivalence when p < alpha)."""
        if not self.testable or not low < high:
            return math.nan
        p_low = stats.t.sf((self.estimate - low) / self.se, self.df)
        p_high = stats.t.cdf((self.estimate - high) / self.se, self.df)
        return float(max(p_low, p_high))


def _by_seed(frame: pd.DataFrame, metric: str) -> pd.Series:
    """The metric's defined values indexed by seed."""
    x = values(frame, metric)
    return pd.Series(x.to_numpy(), index=pd.to_numeric(frame["seed"], errors="coerce").to_numpy()).dropna()


def paired_by_seed(none: pd.DataFrame, all_: pd.DataFrame, metric: str) -> pd.Series:
    """all − none of `metric` for each seed both cells hold once, indexed by seed (empty when a cell repeats one)."""
    a, b = _by_seed(none, metric), _by_seed(all_, metric)
    if not (a.index.is_unique and b.index.is_unique):
        return pd.Series(dtype=float)
    seeds = sorted(set(a.index) & set(b.index))
    return b[seeds] - a[seeds]


def difference(none: pd.DataFrame, all_: pd.DataFrame, metric: str) -> Difference:
    """all − none of `metric` over the runs of the two cells, paired by seed when the seeds match."""
    a, b = _by_seed(none, metric), _by_seed(all_, metric)
    n0, n1 = len(a), len(b)
    if min(n0, n1) == 0:
        return Difference(math.nan, math.nan, math.nan, False, n0, n1, "not measured" if n0 + n1 == 0 else "no data")
    paired = (a.index.is_unique and b.index.is_unique and set(a.index) == set(b.index)
              and not a.index.isna().any())
    if paired:
        d = (b - a.reindex(b.index)).to_numpy(float)
        estimate = float(d.mean())
        if len(d) < 2:
            return Difference(estimate, math.nan, math.nan, True, n0, n1, "one run per arm: no test")
        se, df = float(d.std(ddof=1) / math.sqrt(len(d))), float(len(d) - 1)
    else:
        x0, x1 = a.to_numpy(float), b.to_numpy(float)
        estimate = float(x1.mean() - x0.mean())
        if min(n0, n1) < 2:
            return Difference(estimate, math.nan, math.nan, False, n0, n1, "a single run in an arm: no test")
        v0, v1 = x0.var(ddof=1) / n0, x1.var(ddof=1) / n1
        se = math.sqrt(v0 + v1)
        df = (v0 + v1) ** 2 / (v0 ** 2 / (n0 - 1) + v1 ** 2 / (n1 - 1)) if se > 0 else math.nan
    if not se > 0:  # constant differences: a t-test would call any difference of two constants significant
        return Difference(estimate, math.nan, math.nan, paired, n0, n1, "no seed-to-seed variance: no test")
    return Difference(estimate, se, df, paired, n0, n1)


def _adjust(p_values, method: str) -> np.ndarray:
    """statsmodels' multipletests over the finite entries; NaN entries stay NaN and are not counted."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = multipletests(p[finite], alpha=ALPHA, method=method)[1]
    return out


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values; NaN entries stay NaN and are not counted among the tests."""
    return _adjust(p_values, "holm")


def holm_levels(p_values, alpha: float = ALPHA) -> np.ndarray:
    """Each test's Holm step level alpha / (m - r + 1), r its rank among the m finite p-values; NaN elsewhere."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    out[order] = alpha / (len(order) - np.arange(len(order)))
    return out


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini–Hochberg q-values (step-up FDR-adjusted p); NaN entries stay NaN and are not counted."""
    return _adjust(p_values, "fdr_bh")


def diverged_counts(none: pd.DataFrame, all_: pd.DataFrame) -> tuple[tuple[int, int], tuple[int, int], float]:
    """((diverged, finished) of none, of all, Fisher's exact p); finished = included or diverged runs."""
    counts = []
    for cell in (none, all_):
        finished = cell[cell["included"] | (cell["status"] == "diverged")]
        counts.append((int((finished["status"] == "diverged").sum()), len(finished)))
    (d0, n0), (d1, n1) = counts
    return counts[0], counts[1], fisher_p(d0, n0, d1, n1)


def fisher_p(k0: int, n0: int, k1: int, n1: int) -> float:
    """Fisher's exact test (two-sided) of k0 events in n0 runs against k1 in n1; NaN below 2 runs in an arm."""
    return float(stats.fisher_exact([[k0, n0 - k0], [k1, n1 - k1]]).pvalue) if min(n0, n1) >= 2 else math.nan


def _seed_std(values: pd.Series) -> float:
    x = pd.to_numeric(values, errors="coerce").dropna()
    return float(x.std(ddof=1)) if len(x) >= 2 else math.nan


def none_and_all(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs of regularizer=none and of regularizer=all in one setting group (normalized, every status)."""
    runs = _single_group(runs)
    return runs[cell_mask(runs, False)], runs[cell_mask(runs, True)]


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
EFFECT_COLUMNS = ("metric", "term", "estimate", "ci_low", "ci_high", "p_value", "q_value", "n", "df_resid")


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


def _fit(design: pd.DataFrame, metric: str, factors: list[str], formula_rhs: str):
    """The statsmodels OLS fit of `metric` on the formula, factors coded -1/+1; None when the runs with a
    value of the metric do not identify it (no data, a constant metric, or confounded terms)."""
    if metric not in design:
        return None
    data = design[[*factors, metric]].apply(pd.to_numeric, errors="coerce").dropna()
    data[factors] = 2 * data[factors] - 1
    if data[metric].nunique() < 2:
        return None  # no data, or a constant metric: every effect is 0
    model = smf.ols(f"{metric} ~ {formula_rhs}", data=data)
    if np.linalg.matrix_rank(model.exog) < model.exog.shape[1]:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # residual df 0: statsmodels divides by zero
        return model.fit()


def _fit_effects(design: pd.DataFrame, metric: str, factors: list[str], formula_rhs: str) -> list[dict]:
    """OLS of `metric` on the formula; one row per non-intercept term (CIs NaN when residual df is 0).

    The factors are coded -1/+1 and each term's coefficient (and CI) is scaled by 2^k for its k
    factors, so the rows are effects: a factor's row is its on - off difference at the average
    of the other terms (averaged over the other factors in a balanced factorial, also in a model
    with interactions), and an A:B row is how much A's effect changes when B is switched on.
    """
    fit = _fit(design, metric, factors, formula_rhs)
    if fit is None:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
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


def _effects_frame(rows: list[dict]) -> pd.DataFrame:
    """The effect rows as a frame, with each row's Benjamini–Hochberg q over the whole table."""
    frame = pd.DataFrame(rows, columns=[c for c in EFFECT_COLUMNS if c != "q_value"])
    return frame.assign(q_value=benjamini_hochberg(frame["p_value"]))[list(EFFECT_COLUMNS)]


def main_effects(runs: pd.DataFrame, metrics: tuple[str, ...] = EFFECT_METRICS) -> pd.DataFrame:
    """Main effect of each regularizer on each metric: OLS of the metric on the regularizer factors (additive).

    In a balanced factorial an effect is the on - off difference averaged over the other
    factors; in another design (e.g. the leave-one-out presets) it is the additive model's
    on - off difference, which equals that average only if the effects add up. q_value is the
    Benjamini–Hochberg q over every effect of the table; metrics without values are left out.

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
    return _effects_frame([row for m in metrics for row in _fit_effects(design, m, factors, " + ".join(factors))])


def _interaction_rhs(factors: list[str]) -> str:
    return f"({' + '.join(factors)})**2"


def _interaction_factors(design: pd.DataFrame) -> list[str]:
    """The regularizers that vary over the design, when every main effect and every two-way interaction of them
    can be estimated (a full factorial, or a fraction of resolution V or higher); NotEstimable otherwise."""
    factors = [r for r in R.names() if design[r].nunique() > 1]
    coded = 2 * design[factors].to_numpy(float) - 1
    columns = [np.ones(len(design)), *coded.T, *(coded[:, i] * coded[:, j]
                                                   for i, j in itertools.combinations(range(len(factors)), 2))]
    if len(factors) < 2 or np.linalg.matrix_rank(np.column_stack(columns)) < len(columns):
        raise NotEstimable(f"the regularizer combinations present confound the two-way interactions of "
                           f"{', '.join(factors) or 'no varying regularizer'}; they need a full factorial "
                           f"(+sweep=factorial) or a resolution-V fraction (+sweep=half_factorial)")
    return factors


def interaction_effects(runs: pd.DataFrame, metrics: tuple[str, ...] = INTERACTION_METRICS) -> pd.DataFrame:
    """Two-way interactions (with all main effects) of the regularizers that vary: OLS with all pairwise terms,
    q_value the Benjamini–Hochberg q over the table.

    Raises NotEstimable unless the design estimates them all: the full 2^k factorial, or a fraction of
    resolution V (+sweep=half_factorial, where each is aliased only with three-factor and higher
    interactions, taken as 0). Rows with df_resid 0 have no CI.
    """
    design = _design(runs)
    factors = _interaction_factors(design)
    return _effects_frame([row for m in metrics for row in _fit_effects(design, m, factors, _interaction_rhs(factors))])


def qualifying_interactions(interactions: pd.DataFrame, alpha: float = ALPHA) -> list[tuple[str, str, str]]:
    """(metric, A, B) for each interaction A:B with q < alpha that is larger than A's main effect in the same
    model; A:B and B:A are both checked, so (metric, B, A) appears when it outgrows B's main effect."""
    out = []
    for metric, rows in interactions.groupby("metric", sort=False):
        est = rows.set_index("term")["estimate"]
        for row in rows[rows["term"].str.contains(":") & (rows["q_value"] < alpha)].itertuples():
            a, b = row.term.split(":")
            out += [(metric, x, y) for x, y in ((a, b), (b, a)) if abs(row.estimate) > abs(est.get(x, math.nan))]
    return out


CONDITIONAL_COLUMNS = ("metric", "factor", "given", "given_on", "estimate", "ci_low", "ci_high", "interaction")


def conditional_effects(runs: pd.DataFrame, interactions: pd.DataFrame) -> pd.DataFrame:
    """The effect of A with B off and with B on (the others averaged), with 95% CIs from the interaction model,
    for every qualifying_interactions (metric, A, B): A's main effect ∓ half the A:B interaction."""
    design = _design(runs)
    factors = _interaction_factors(design)
    rows = []
    for metric, a, b in qualifying_interactions(interactions):
        fit = _fit(design, metric, factors, _interaction_rhs(factors))
        term = f"{a}:{b}" if f"{a}:{b}" in fit.params.index else f"{b}:{a}"
        for on in (False, True):
            contrast = pd.Series(0.0, index=fit.params.index)
            contrast[a], contrast[term] = 2.0, 2.0 if on else -2.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                test = fit.t_test(contrast.to_numpy()[None, :])
                low, high = test.conf_int(alpha=ALPHA)[0] if fit.df_resid >= 1 else (math.nan, math.nan)
            rows.append({"metric": metric, "factor": a, "given": b, "given_on": on,
                         "estimate": float(np.squeeze(test.effect)), "ci_low": float(low), "ci_high": float(high),
                         "interaction": term})
    return pd.DataFrame(rows, columns=list(CONDITIONAL_COLUMNS))
