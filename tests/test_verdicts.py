"""Tests of ablation.verdicts and the statistics under it, on constructed runs frames.

Each frame holds regularizer=none and regularizer=all runs with chosen metric columns; every verdict
category is produced by one of them. The paired and Welch intervals, TOST, Holm and
Benjamini–Hochberg are checked against statsmodels.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW, ttost_ind, ttost_paired

from ablation import regularizers
from ablation import report as Rep
from ablation import stats as S
from ablation import verdicts as V
from ablation.collect import run_columns

NAMES = regularizers.names()
SEEDS = (0, 1, 2)


def runs_frame(none: dict[str, list], all_: dict[str, list], none_seeds=SEEDS, all_seeds=SEEDS,
               none_status=None) -> pd.DataFrame:
    """Included none and all runs of one setting group, with the given metric values per seed."""
    rows = []
    for on, metrics, seeds in ((False, none, none_seeds), (True, all_, all_seeds)):
        for i, seed in enumerate(seeds):
            flags = dict.fromkeys(NAMES, on)
            status = (none_status or {}).get(seed, "completed") if not on else "completed"
            rows.append({"run_name": regularizers.run_name(flags, seed), "combo": regularizers.combo_name(flags),
                         "seed": seed, "settings_hash": "h" * 16, **flags, "status": status,
                         "included": status == "completed", "epochs_completed": 20,
                         **{k: v[i] for k, v in metrics.items()}})
    return pd.DataFrame(rows)


def claim_row(runs: pd.DataFrame, key: str) -> pd.Series:
    return V.claims_table(runs).set_index("claim").loc[key]


PROBE_NONE = [0.40, 0.41, 0.43]


# ---------------------------------------------------------------------------------------- the rules


def test_every_claim_has_one_primary_a_direction_and_an_absolute_or_level_based_sesoi():
    assert [c.key for c in V.CLAIMS] == ["reconstruction", "sharpness", "kl_control", "overfitting", "stability",
                                         "sample_quality", "latent"]
    primaries = {c.key: (c.primary, c.direction) for c in V.CLAIMS}
    assert primaries == {"reconstruction": ("recon_mean", "lower"), "sharpness": ("sharp_hf_ratio", "higher"),
                         "kl_control": ("kl_fluct", "lower"), "overfitting": ("gap_growth", "lower"),
                         "stability": ("loss_spike_rate", "lower"), "sample_quality": ("fd_suite", "lower"),
                         "latent": ("probe_acc", "higher")}
    for claim in V.CLAIMS:
        assert claim.reason and claim.sesoi.value > 0 and claim.primary not in claim.secondary
    rules = V.rules_table()
    assert len(rules) == len(V.CLAIMS) and rules["sesoi"].str.len().gt(0).all()
    # A SESOI never depends on the baseline's spread: same mean, ten times the spread, same SESOI.
    tight = runs_frame({"recon_mean": [99.0, 100.0, 101.0], "test_recon": [99.0, 100.0, 101.0],
                        "fd_suite": [9.9, 10.0, 10.1]}, {})
    wide = runs_frame({"recon_mean": [90.0, 100.0, 110.0], "test_recon": [90.0, 100.0, 110.0],
                       "fd_suite": [9.0, 10.0, 11.0]}, {})
    for claim in V.CLAIMS:
        assert claim.sesoi.resolve(tight) == pytest.approx(claim.sesoi.resolve(wide)), claim.key


def test_the_reconstruction_sesoi_is_half_a_decibel_at_the_baselines_level():
    none = runs_frame({"recon_mean": [80.0, 80.0, 80.0]}, {})
    delta = V.CLAIM_BY_KEY["reconstruction"].sesoi.resolve(none)
    assert delta == pytest.approx(80.0 - 80.0 * 10 ** (-0.05))
    assert 10 * math.log10(80.0 / (80.0 - delta)) == pytest.approx(0.5)  # 0.5 dB of PSNR
    assert V.CLAIM_BY_KEY["overfitting"].sesoi.db_of == "test_recon"


# ---------------------------------------------------------------------------------------- statistics vs statsmodels


NONE_X, ALL_X = np.array([10.0, 12.0, 11.5, 13.0]), np.array([11.0, 12.5, 13.5, 13.2])


def test_paired_difference_ci_p_and_tost_match_statsmodels():
    runs = runs_frame({"m": list(NONE_X)}, {"m": list(ALL_X)}, none_seeds=range(4), all_seeds=range(4))
    none, all_ = S.none_and_all(runs)
    diff = S.difference(none, all_, "m")
    assert diff.paired and diff.test == "paired t (4 seeds)"
    d = DescrStatsW(ALL_X - NONE_X)
    assert diff.estimate == pytest.approx(d.mean)
    for alpha in (0.05, 0.0125):
        assert diff.ci(alpha) == pytest.approx(d.tconfint_mean(alpha))
    assert diff.p_value() == pytest.approx(d.ttest_mean(0)[1])
    for low, high in ((-1.0, 1.0), (-2.5, 2.5), (-0.1, 3.0)):
        assert diff.tost(low, high) == pytest.approx(ttost_paired(ALL_X, NONE_X, low, high)[0])


def test_welch_difference_ci_p_and_tost_match_statsmodels_when_the_seeds_differ():
    runs = runs_frame({"m": list(NONE_X)}, {"m": list(ALL_X[:3])}, none_seeds=range(4), all_seeds=(0, 1, 5))
    none, all_ = S.none_and_all(runs)
    diff = S.difference(none, all_, "m")
    assert not diff.paired and diff.test == "Welch t (n = 4, 3)"
    cm = CompareMeans(DescrStatsW(ALL_X[:3]), DescrStatsW(NONE_X))
    assert diff.ci(0.05) == pytest.approx(cm.tconfint_diff(0.05, usevar="unequal"))
    assert diff.p_value() == pytest.approx(cm.ttest_ind(usevar="unequal")[1])
    for low, high in ((-1.0, 1.0), (-3.0, 3.0)):
        assert diff.tost(low, high) == pytest.approx(ttost_ind(ALL_X[:3], NONE_X, low, high, usevar="unequal")[0])


def test_holm_and_benjamini_hochberg_match_statsmodels_and_skip_missing_p_values():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = rng.uniform(0, 0.2, 9) ** 2
        p[rng.choice(9, 3, replace=False)] = np.nan
        finite = np.isfinite(p)
        for ours, method in ((S.holm, "holm"), (S.benjamini_hochberg, "fdr_bh")):
            adjusted = ours(p)
            assert np.isnan(adjusted[~finite]).all()
            assert adjusted[finite] == pytest.approx(multipletests(p[finite], method=method)[1])
    levels = S.holm_levels([0.04, np.nan, 0.001, 0.02])
    assert levels[[2, 3, 0]] == pytest.approx([0.05 / 3, 0.05 / 2, 0.05]) and np.isnan(levels[1])


def test_a_constant_difference_or_one_run_per_arm_is_not_tested():
    runs = runs_frame({"m": [1.0, 2.0, 3.0]}, {"m": [2.0, 3.0, 4.0]})
    diff = S.difference(*S.none_and_all(runs), "m")
    assert not diff.testable and "no seed-to-seed variance" in diff.note and math.isnan(diff.p_value())
    one = runs_frame({"m": [1.0]}, {"m": [2.0]}, none_seeds=(0,), all_seeds=(0,))
    diff = S.difference(*S.none_and_all(one), "m")
    assert diff.estimate == 1.0 and not diff.testable and "one run per arm" in diff.note


# ---------------------------------------------------------------------------------------- every verdict


def test_supported_when_the_holm_adjusted_test_and_the_sesoi_agree():
    runs = runs_frame({"probe_acc": PROBE_NONE}, {"probe_acc": [0.45, 0.47, 0.48]})
    row = claim_row(runs, "latent")
    assert row["verdict"] == V.SUPPORTED
    assert row["test"] == "paired t (3 seeds)" and row["estimate"] == pytest.approx(np.mean([0.05, 0.06, 0.05]))
    assert row["ci_low"] > 0 and row["estimate"] > row["sesoi"] == 0.01


def test_contradicted_in_the_opposite_direction():
    row = claim_row(runs_frame({"probe_acc": PROBE_NONE}, {"probe_acc": [0.35, 0.36, 0.37]}), "latent")
    assert row["verdict"] == V.CONTRADICTED and row["ci_high"] < 0


def test_equivalent_when_the_90_percent_ci_lies_within_the_sesoi_even_if_p_is_small():
    runs = runs_frame({"probe_acc": PROBE_NONE}, {"probe_acc": [0.401, 0.4111, 0.4312]})
    row = claim_row(runs, "latent")
    assert row["p_holm"] < 0.05, "a real difference, but smaller than the SESOI"
    assert row["verdict"] == V.EQUIVALENT
    assert row["p_tost"] == pytest.approx(ttost_paired(np.array([0.401, 0.4111, 0.4312]), np.array(PROBE_NONE),
                                                       -0.01, 0.01)[0])


def test_inconclusive_when_neither_a_difference_nor_equivalence_is_shown():
    row = claim_row(runs_frame({"probe_acc": PROBE_NONE}, {"probe_acc": [0.46, 0.37, 0.44]}), "latent")
    assert row["verdict"] == V.INCONCLUSIVE and "neither" in row["note"]


def test_inconclusive_when_the_primary_metric_was_not_measured():
    table = V.claims_table(runs_frame({"probe_acc": PROBE_NONE}, {"probe_acc": [0.45, 0.47, 0.48]})).set_index("claim")
    for key in ("reconstruction", "sharpness", "kl_control", "sample_quality"):
        assert table.loc[key, "verdict"] == V.INCONCLUSIVE and table.loc[key, "note"] == V.NOT_MEASURED
    half = runs_frame({"probe_acc": PROBE_NONE}, {"probe_acc": [np.nan] * 3})
    assert claim_row(half, "latent")["note"] == "primary metric not measured in the all runs"


def test_inconclusive_with_one_run_per_arm():
    row = claim_row(runs_frame({"probe_acc": [0.40]}, {"probe_acc": [0.50]}, none_seeds=(0,), all_seeds=(0,)),
                    "latent")
    assert row["verdict"] == V.INCONCLUSIVE and "one run per arm" in row["note"]


def overfitting_runs(none_growth, all_growth, recon_rise=(0.0, 0.4, 0.0), best_epoch=(20, 19, 20)) -> pd.DataFrame:
    return runs_frame({"gap_growth": list(none_growth), "test_recon": [80.0, 81.0, 80.5],
                       "recon_rise": list(recon_rise), "best_epoch": list(best_epoch)},
                      {"gap_growth": list(all_growth), "test_recon": [160.0, 161.0, 162.0],
                       "recon_rise": [0.0] * 3, "best_epoch": [20] * 3})


def test_overfitting_is_untestable_when_the_baseline_never_overfits_whatever_the_difference():
    runs = overfitting_runs([0.9, 1.1, 1.0], [-5.0, -6.0, -5.5])  # all's gap shrinks clearly, beyond the SESOI
    row = claim_row(runs, "overfitting")
    assert row["verdict"] == V.UNTESTABLE and "does not overfit" in row["note"]
    assert math.isnan(row["p_holm"]), "an untestable claim is not in the Holm family"


def test_overfitting_is_testable_when_the_baseline_overfits():
    growing = overfitting_runs([12.0, 13.0, 12.5], [1.0, 1.5, 1.2])
    assert claim_row(growing, "overfitting")["verdict"] == V.SUPPORTED
    rising = overfitting_runs([0.9, 1.1, 1.0], [1.0, 1.2, 0.9], recon_rise=(0.0, 9.5, 0.0))
    assert claim_row(rising, "overfitting")["verdict"] != V.UNTESTABLE, "test recon rose by more than the SESOI"
    early = overfitting_runs([0.9, 1.1, 1.0], [1.0, 1.2, 0.9], recon_rise=(np.nan,) * 3, best_epoch=(20, 12, 20))
    assert claim_row(early, "overfitting")["verdict"] != V.UNTESTABLE, "no rise measured: the best epoch decides"


def test_stability_is_untestable_without_spikes_or_divergence_and_testable_with_either():
    quiet = {"loss_spike_rate": [0.0, 0.0, 0.0], "loss_spikes": [0, 0, 0]}
    spiky = {"loss_spike_rate": [0.05, 0.06, 0.04], "loss_spikes": [5, 6, 4]}
    assert claim_row(runs_frame(quiet, quiet), "stability")["verdict"] == V.UNTESTABLE
    assert claim_row(runs_frame(spiky, quiet), "stability")["verdict"] == V.SUPPORTED
    four = {k: v + [math.nan] for k, v in quiet.items()}
    diverged = runs_frame(four, quiet, none_seeds=(0, 1, 2, 3), none_status={3: "diverged"})
    assert claim_row(diverged, "stability")["verdict"] != V.UNTESTABLE
    unmeasured = runs_frame({"loss_spike_rate": [0.0] * 3}, {"loss_spike_rate": [0.0] * 3})
    assert claim_row(unmeasured, "stability")["verdict"] != V.UNTESTABLE, "spike counts unknown: cannot tell"


def test_holm_runs_over_the_claims_tested():
    runs = runs_frame({"probe_acc": PROBE_NONE, "sharp_hf_ratio": [0.80, 0.82, 0.81], "kl_fluct": [0.05, 0.06, 0.07]},
                      {"probe_acc": [0.45, 0.47, 0.48], "sharp_hf_ratio": [0.90, 0.84, 0.95],
                       "kl_fluct": [0.049, 0.061, 0.072]})
    table = V.claims_table(runs).set_index("claim")
    tested = table["p_value"].notna()
    assert tested.sum() == 3
    assert table.loc[tested, "p_holm"].to_numpy() == pytest.approx(
        multipletests(table.loc[tested, "p_value"], method="holm")[1])
    levels = 1 - table.loc[tested, "ci_level"]
    assert sorted(levels) == pytest.approx([0.05 / 3, 0.05 / 2, 0.05])


def test_secondary_rows_get_benjamini_hochberg_q_and_unmeasured_rows_are_listed():
    runs = runs_frame({"test_recon": [80.0, 81.0, 82.5], "psnr": [21.8, 21.7, 21.6], "kl_cv": [0.1, 0.2, 0.15]},
                      {"test_recon": [160.0, 158.0, 161.0], "psnr": [18.8, 18.9, 18.7], "kl_cv": [0.1, 0.19, 0.16]})
    table = V.secondary_table(runs).set_index("metric")
    tested = table["p_value"].notna()
    assert table.loc[tested, "q_value"].to_numpy() == pytest.approx(
        multipletests(table.loc[tested, "p_value"], method="fdr_bh")[1])
    assert table.loc["test_recon", "change"] == "higher in all"
    assert table.loc["kl_cv", "change"] == "no clear difference"
    assert table.loc["diverged", "test"] == "Fisher's exact"
    text = Rep.render_secondary_markdown(V.secondary_table(runs))
    assert "Not measured in these runs:" in text and "`ssim`" in text and "| `ssim`" not in text


def test_the_report_names_no_held_or_reduced_verdict_for_an_untestable_claim(tmp_path):
    runs = overfitting_runs([0.9, 1.1, 1.0], [-5.0, -6.0, -5.5])
    full = runs.reindex(columns=list(dict.fromkeys([*run_columns(), *runs.columns])))
    text, _ = Rep.build_markdown(tmp_path, full.assign(study="s"), pd.DataFrame())
    claims = Rep.render_claims_markdown(V.claims_table(runs))
    assert claims in text
    verdicts = Rep.claims_display(V.claims_table(runs)).set_index("Claim")["Verdict"]
    assert verdicts["Reduced overfitting"] == "**untestable here**"
    assert not set(verdicts) & {"held", "reduced", "Reduced", "**held**", "**reduced**"}
    assert "## Verdict rules" in text and text.index("## Verdict rules") < text.index("## Setting group")
    assert "### Factorial effects" not in text, "none and all alone: no empty effects section"


# ---------------------------------------------------------------------------------------- factorial


def factorial_runs(recon) -> pd.DataFrame:
    rows = []
    for bits in itertools.product((False, True), repeat=len(NAMES)):
        flags = dict(zip(NAMES, bits))
        for seed in (0, 1):
            rows.append({"run_name": regularizers.run_name(flags, seed), "combo": regularizers.combo_name(flags),
                         "seed": seed, "settings_hash": "f" * 16, **flags, "status": "completed", "included": True,
                         "test_recon": recon(flags) + (0.3 if seed else -0.3) + 0.01 * sum(bits) * seed})
    return pd.DataFrame(rows)


def test_effects_tables_carry_benjamini_hochberg_q_values():
    runs = factorial_runs(lambda f: 100 + 5 * f["dropout"] - 3 * f["batchnorm"])
    for table in (S.main_effects(runs, ("test_recon",)), S.interaction_effects(runs, ("test_recon",))):
        assert table["q_value"].to_numpy() == pytest.approx(multipletests(table["p_value"], method="fdr_bh")[1])
    markdown = Rep.render_effects_markdown(S.main_effects(runs, ("test_recon",)))
    assert "Benjamini–Hochberg q < 0.05" in markdown


def test_an_interaction_larger_than_a_main_effect_gets_conditional_effects():
    """test_recon = 100 + 10 bn − 20 bn·β: batch norm helps (+10) with β off and hurts (−10) with it on, so its
    main effect is 0 and the batchnorm:beta interaction (−20) outgrows it."""
    runs = factorial_runs(lambda f: 100 + 10 * f["batchnorm"] - 20 * f["batchnorm"] * f["beta"])
    inter = S.interaction_effects(runs, ("test_recon",))
    assert ("test_recon", "batchnorm", "beta") in S.qualifying_interactions(inter)
    cond = S.conditional_effects(runs, inter).set_index(["factor", "given", "given_on"])
    assert cond.loc[("batchnorm", "beta", False), "estimate"] == pytest.approx(10.0, abs=0.05)
    assert cond.loc[("batchnorm", "beta", True), "estimate"] == pytest.approx(-10.0, abs=0.05)
    assert cond.loc[("beta", "batchnorm", False), "estimate"] == pytest.approx(0.0, abs=0.05)
    assert cond.loc[("beta", "batchnorm", True), "estimate"] == pytest.approx(-20.0, abs=0.05)
    row = cond.loc[("batchnorm", "beta", True)]
    assert row["ci_low"] < row["estimate"] < row["ci_high"]
    markdown = Rep.render_conditional_markdown(S.conditional_effects(runs, inter))
    assert "| test recon (SSE/image) | batchnorm | β |" in markdown


def test_the_largest_stable_learning_rate_of_a_sweep():
    """Stable: no divergence and a spike rate within the stability SESOI, at that lr and every smaller one."""
    rows = []
    cells = {("none", 1e-3): ("completed", 0.0), ("none", 3e-3): ("completed", 0.005), ("none", 1e-2): ("diverged", None),
             ("all", 1e-3): ("completed", 0.0), ("all", 3e-3): ("completed", 0.05), ("all", 1e-2): ("completed", 0.0)}
    for (combo, lr), (status, spikes) in cells.items():
        for seed in range(2):
            rows.append({"combo": combo, "lr": lr, "seed": seed, "status": status, "included": status == "completed",
                         "loss_spike_rate": spikes})
    table = V.stability_by_lr(pd.DataFrame(rows)).set_index(["combo", "lr"])
    assert table.loc[("none", 1e-2), "divergence_rate"] == 1.0 and not table.loc[("none", 1e-2), "stable"]
    assert table.loc[("none", 3e-3), "stable"] and not table.loc[("all", 3e-3), "stable"]
    largest = table.groupby(level="combo")["largest_stable_lr"].first()
    assert largest["none"] == 3e-3, "diverges at 1e-2"
    assert largest["all"] == 1e-3, "spikes at 3e-3: 1e-2 does not count, the sweep must be stable below it"
    assert V.stability_by_lr(pd.DataFrame(rows).assign(lr=1e-3)) is None, "no sweep, no table"
    recon = V.stability_by_lr(pd.DataFrame(rows).assign(test_recon=[100.0, 300.0] * 6)).set_index(["combo", "lr"])
    assert recon.loc[("none", 1e-3), "test_recon"] == 200.0, "mean over the completed runs"
    assert math.isnan(recon.loc[("none", 1e-2), "test_recon"]), "diverged runs have no test recon"


def _sweep(cells: dict, seeds: int = 3) -> pd.DataFrame:
    """Runs of an lr sweep: {(combo, lr): [(status, loss_spike_rate) per seed]}."""
    rows = [{"combo": combo, "lr": lr, "seed": seed, "status": status, "included": status == "completed",
             "loss_spike_rate": spikes}
            for (combo, lr), runs in cells.items() for seed, (status, spikes) in enumerate(runs[:seeds])]
    return pd.DataFrame(rows)


def test_stress_verdicts_count_failed_runs_over_the_sweep():
    """A failed run diverged or spiked above the SESOI; Fisher over the whole sweep, Holm over the comparisons."""
    ok, spiky, dead = ("completed", 0.0), ("completed", 0.05), ("diverged", None)
    all_combo, bn, do = "wd-do-bn-beta-aug", "bn", "do"
    cells = {}
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        cells[("none", lr)] = [ok] * 3 if lr < 1e-2 else [dead, spiky, dead]  # 6 of 12 fail
        cells[(all_combo, lr)] = [ok] * 3  # 0 of 12
        cells[(bn, lr)] = [ok] * 3 if lr < 3e-2 else [ok, ok, dead]  # 1 of 12
        cells[(do, lr)] = [dead] * 3 if lr > 1e-3 else [ok] * 3  # 9 of 12
    table = V.stress_verdicts(_sweep(cells)).set_index("combo")
    assert list(table["claim"]) == [claim for claim, _ in V.STRESS_COMPARISONS]
    assert (table.loc[all_combo, "none_failed"], table.loc[all_combo, "none_n"]) == (6, 12)
    assert table.loc[all_combo, "failed"] == 0 and table.loc[do, "failed"] == 9
    assert table.loc[all_combo, "p_value"] == pytest.approx(scipy_stats.fisher_exact([[6, 6], [0, 12]]).pvalue)
    assert table.loc[all_combo, "p_holm"] == pytest.approx(min(1.0, 3 * table["p_value"].min()))
    assert table.loc[all_combo, "verdict"] == V.SUPPORTED
    assert table.loc[bn, "verdict"] == V.INCONCLUSIVE, "1/12 vs 6/12: Fisher p 0.069 before Holm"
    assert table.loc[do, "verdict"] == V.INCONCLUSIVE, "9/12 vs 6/12 is no significant difference"
    assert table.loc[all_combo, "none_largest_stable_lr"] == 3e-3 and table.loc[all_combo, "largest_stable_lr"] == 3e-2
    assert table.loc[do, "largest_stable_lr"] == 1e-3

    markdown = Rep.render_stress_markdown(V.stress_verdicts(_sweep(cells)))
    assert "| more stable training | wd-do-bn-beta-aug | 0.001, 0.003, 0.01, 0.03 | 6/12 | 0/12 | 0.003 → 0.03 |" in markdown
    assert "**supported**" in markdown

    worse = dict(cells)
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        worse[(do, lr)] = [dead] * 3
    assert V.stress_verdicts(_sweep(worse)).set_index("combo").loc[do, "verdict"] == V.CONTRADICTED, "12/12 vs 6/12"


def test_stress_verdicts_are_untestable_when_none_never_fails():
    cells = {(combo, lr): [("completed", 0.0)] * 3 for combo in ("none", "bn") for lr in (1e-3, 1e-2)}
    table = V.stress_verdicts(_sweep(cells))
    assert list(table["verdict"]) == [V.UNTESTABLE], "only batchnorm was swept besides none"
    assert V.stress_verdicts(_sweep({k: v for k, v in cells.items() if k[0] != "none"})) is None, "no baseline"
    assert V.stress_verdicts(_sweep({k: v for k, v in cells.items() if k[0] != "bn"})) is None, "nothing to compare"
    apart = {("none", 1e-3): [("completed", 0.0)] * 3, ("none", 1e-2): [("completed", 0.0)] * 3,
             ("bn", 3e-3): [("completed", 0.0)] * 3, ("bn", 3e-2): [("completed", 0.0)] * 3}
    assert V.stress_verdicts(_sweep(apart)) is None, "no learning rate in common"
