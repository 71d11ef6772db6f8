"""Tests of ablation.metrics / collect / stats / figures / report on synthetic and real run directories."""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats
from wandb_records import read_run

from ablation import collect as C
from ablation import figures as F
from ablation import metrics as M
from ablation import regularizers
from ablation import report as R
from ablation import stats as S
from ablation import verdicts as V
from ablation.synthetic import make_imagefolder

REGULARIZERS = regularizers.names()

REPO = Path(__file__).resolve().parent.parent
D = 3 * 32 * 32
NONE = dict.fromkeys(REGULARIZERS, False)
ALL = dict.fromkeys(REGULARIZERS, True)
EPOCHS, STEPS_PER_EPOCH, LOG_EVERY = 4, 10, 5


# ---------------------------------------------------------------------------------------- synthetic runs


def final_metrics(test_recon: float, test_kl: float = 10.0, **extra) -> dict:
    """Consistent final metrics for a run with the given test recon (D = 3·32·32)."""
    mse01 = test_recon / (4 * D)
    neg_elbo = test_recon + 0.5 * D * math.log(math.pi) + test_kl
    return {"test_recon": test_recon, "test_kl": test_kl, "test_loss": test_recon + test_kl,
            "trainsub_recon": test_recon - 5, "trainsub_kl": test_kl, "trainsub_loss": test_recon - 5 + test_kl,
            "gen_gap": 5.0, "max_gen_gap": 6.0, "best_epoch": EPOCHS, "mse01": mse01,
            "psnr": 10 * math.log10(1 / mse01), "neg_elbo": neg_elbo,
            "bits_per_dim": (neg_elbo + D * math.log(127.5)) / (D * math.log(2)), "active_units": 20,
            "probe_acc": 0.5, "kl_spectrum": [2.0 / (i + 1) for i in range(20)], "epochs_completed": EPOCHS,
            "steps": EPOCHS * STEPS_PER_EPOCH, "images_per_s": 1000.0,
            "train_time_s": 1.0, "wall_time_s": 2.0} | extra


def run_name(flags: dict, seed: int) -> str:
    return f"{regularizers.combo_name(flags)}_seed{seed}"


def history_frame(train_kl: list[float], step_loss: list[float]) -> pd.DataFrame:
    """EPOCHS epoch rows with the given train KL; a step row every LOG_EVERY steps with the given loss."""
    epochs = [{"kind": "epoch", "epoch": e, "step": e * STEPS_PER_EPOCH, "train_loss": 200.0 - e,
               "train_recon": 190.0 - e, "train_kl": kl, "images_per_s": 1000.0, "epoch_time_s": 1.0,
               "test_recon": 150.0 - e, "test_kl": kl, "test_loss": 160.0 - e, "trainsub_recon": 145.0 - e,
               "trainsub_kl": kl, "trainsub_loss": 155.0 - e, "gen_gap": 5.0 + 0.1 * e}
              for e, kl in zip(range(1, EPOCHS + 1), train_kl)]
    steps = [{"kind": "step", "epoch": (s - 1) // STEPS_PER_EPOCH + 1, "step": s, "train_loss": loss,
              "train_recon": loss - 10, "train_kl": 10.0, "grad_norm": 1.0}
             for s, loss in zip(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY), step_loss)]
    return pd.DataFrame(epochs + steps).sort_values(["step", "kind"], kind="stable")


def config_yaml(flags: dict, seed: int, epochs: int = EPOCHS) -> str:
    regs = "\n".join(f"{r}:\n  enabled: {str(on).lower()}" for r, on in flags.items())
    return (f"study: s\nseed: {seed}\nbudget:\n  name: cpu\n  epochs: {epochs}\n  width: 32\n"
            f"  train_size: 10000\n  test_size: 2000\nmodel:\n  width: 32\n  latent_dim: 128\n"
            f"data:\n  train_size: 10000\n  test_size: 2000\ntrainer:\n  epochs: {epochs}\n  batch_size: 128\n{regs}\n")


def write_png(path: Path, color: tuple[int, int, int], size=(66, 34)) -> None:
    Image.new("RGB", size, color).save(path)


def write_run(study: Path, flags: dict, seed: int, metrics: dict | None = None, status: str = "completed",
              settings_hash: str = "aaaa1111bbbb2222", train_kl=None, step_loss=None) -> Path:
    """A run directory like ablation.train writes it, with known values."""
    run_dir = study / run_name(flags, seed)
    run_dir.mkdir(parents=True)
    record = {"status": status, "study": f"{study.parent.name}/{study.name}", "run_name": run_dir.name, "seed": seed,
              "config_hash": f"c{seed}", "settings_hash": settings_hash, "budget": "cpu", "device": "cpu",
              "threads": 2, **{f"reg_{r}": on for r, on in flags.items()}}
    if status == "completed":
        record |= final_metrics(**(metrics or {"test_recon": 100.0}))
    else:
        record |= metrics or {}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    history = history_frame(train_kl or [10.0, 11.0, 12.0, 12.5], step_loss or list(np.linspace(300, 200, 8)))
    history.to_csv(run_dir / "history.csv", index=False)
    (run_dir / "config.yaml").write_text(config_yaml(flags, seed))
    write_png(run_dir / "recon_final.png", (40 * seed % 255, 100, 150))
    write_png(run_dir / "samples.png", (200, 40 * seed % 255, 50), size=(66, 66))
    return run_dir


def zigzag(amplitude: float, n: int = 8, start: float = 300.0) -> list[float]:
    """Step losses whose log alternates by ±amplitude around a slow decay."""
    return [start * math.exp(-0.01 * i + (amplitude if i % 2 else -amplitude)) for i in range(n)]


def expected_volatility(loss: list[float]) -> float:
    second = [v for s, v in zip(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY), loss)
              if s > EPOCHS * STEPS_PER_EPOCH / 2]
    return float(np.std(np.diff(np.log(second)), ddof=1))


def expected_cv(kl: list[float]) -> float:
    second = np.array(kl[EPOCHS // 2:])
    return float(second.std(ddof=1) / second.mean())


# ---------------------------------------------------------------------------------------- the comparison

NONE_RECON, ALL_RECON = [100.0, 102.0, 104.5], [90.0, 91.5, 95.0]
NONE_GAP, ALL_GAP = [5.0, 6.0, 5.5], [9.0, 10.5, 9.2]
NONE_PROBE, ALL_PROBE = [0.5, 0.6, 0.4], [0.55, 0.45, 0.5]
NONE_KL = [[10, 14, 9, 15], [10, 13, 8, 14], [11, 15, 10, 16.5]]
ALL_KL = [[5, 6, 6.0, 6.1], [5, 6, 6.1, 6.15], [5, 6, 6.05, 6.1]]
NONE_AMP, ALL_AMP = [0.10, 0.12, 0.11], [0.02, 0.025, 0.03]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Three seeds of none and of all with known values, plus one diverged none run."""
    study = tmp_path_factory.mktemp("res") / "main"
    for seed in range(3):
        write_run(study, NONE, seed, {"test_recon": NONE_RECON[seed], "gen_gap": NONE_GAP[seed],
                                      "probe_acc": NONE_PROBE[seed]},
                  train_kl=NONE_KL[seed], step_loss=zigzag(NONE_AMP[seed]))
        write_run(study, ALL, seed, {"test_recon": ALL_RECON[seed], "gen_gap": ALL_GAP[seed],
                                     "probe_acc": ALL_PROBE[seed]},
                  train_kl=ALL_KL[seed], step_loss=zigzag(ALL_AMP[seed]))
    write_run(study, NONE, 3, {"diverged_epoch": 2, "diverged_step": 13, "error": "non-finite loss"},
              status="diverged")
    return study


@pytest.fixture(scope="module")
def table(study) -> pd.DataFrame:
    runs, _ = C.collect_study(study)
    return V.secondary_table(runs).set_index("metric")


def check_cell(row: pd.Series, none: list[float], all_: list[float]) -> None:
    """Means and CIs of each arm, and the paired test of the seeds both arms hold (0, 1, 2)."""
    for side, values in (("none", none), ("all", all_)):
        x = np.asarray(values, float)
        half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
        assert row[f"{side}_mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert row[f"{side}_ci"] == pytest.approx(half, rel=1e-12)
        assert row[f"{side}_n"] == len(x)
    assert row["test"] == f"paired t ({len(none)} seeds)"
    assert row["p_value"] == pytest.approx(stats.ttest_rel(all_, none).pvalue, rel=1e-9)
    d = np.asarray(all_) - np.asarray(none)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-9)


def test_comparison_means_cis_and_pvalues_match_scipy(table):
    check_cell(table.loc["test_recon"], NONE_RECON, ALL_RECON)
    check_cell(table.loc["gen_gap"], NONE_GAP, ALL_GAP)
    check_cell(table.loc["kl_cv"], [expected_cv(k) for k in NONE_KL], [expected_cv(k) for k in ALL_KL])
    check_cell(table.loc["loss_volatility"], [expected_volatility(zigzag(a)) for a in NONE_AMP],
               [expected_volatility(zigzag(a)) for a in ALL_AMP])
    psnr = lambda r: 10 * math.log10(4 * D / r)  # noqa: E731
    check_cell(table.loc["psnr"], [psnr(r) for r in NONE_RECON], [psnr(r) for r in ALL_RECON])


def test_claims_and_secondary_rows_of_the_collected_runs(study, table):
    runs, _ = C.collect_study(study)
    claims = V.claims_table(runs).set_index("claim")
    probe = claims.loc["latent"]
    assert probe["estimate"] == pytest.approx(np.mean(ALL_PROBE) - np.mean(NONE_PROBE))
    assert probe["p_value"] == pytest.approx(stats.ttest_rel(ALL_PROBE, NONE_PROBE).pvalue)
    assert probe["verdict"] == V.INCONCLUSIVE and probe["test"] == "paired t (3 seeds)"
    assert claims.loc["reconstruction", "note"] == V.NOT_MEASURED  # recon_mean is not in these runs
    assert table.loc["test_recon", "change"] == "lower in all"
    assert table.loc["gen_gap", "change"] == "higher in all"
    assert table.loc["active_units", "change"] == "no seed-to-seed variance: no test"
    assert table["q_value"].dropna().to_numpy() == pytest.approx(
        S.benjamini_hochberg(table["p_value"].dropna().to_numpy()))
    assert "test_loss" not in table.index  # totals of β=4 and β=1 runs are never compared


def test_diverged_row(table):
    row = table.loc["diverged"]
    assert (row["none_mean"], row["none_n"], row["all_mean"], row["all_n"]) == (1, 4, 0, 3)
    assert row["p_value"] == pytest.approx(stats.fisher_exact([[1, 3], [0, 3]]).pvalue)
    assert row["change"] == "no clear difference" and row["claim"] == "stability"


def test_single_seed_gives_no_test(tmp_path):
    study = tmp_path / "one"
    write_run(study, NONE, 0, {"test_recon": 100.0})
    write_run(study, NONE, 1, {"test_recon": 104.0})
    write_run(study, ALL, 0, {"test_recon": 80.0})
    runs, _ = C.collect_study(study)
    table = V.secondary_table(runs).set_index("metric")
    assert table.loc["test_recon", "change"] == "a single run in an arm: no test"
    assert math.isnan(table.loc["test_recon", "p_value"])
    assert (table.loc["test_recon", "all_mean"], table.loc["test_recon", "all_n"]) == (80.0, 1)
    assert math.isnan(table.loc["test_recon", "all_ci"])
    assert table.loc["test_recon", "test"] == "Welch t (n = 2, 1)", "seeds 0, 1 against seed 0: not paired"
    markdown = R.render_secondary_markdown(V.secondary_table(runs))
    assert "80.00 (n=1)" in markdown and "a single run in an arm: no test" in markdown


def test_comparison_refuses_to_pool_setting_groups(study, tmp_path):
    runs, _ = C.collect_study(study)
    other = runs.assign(settings_hash=["other0000hash0000"] * 2 + list(runs["settings_hash"][2:]))
    with pytest.raises(ValueError, match="must not be pooled"):
        V.claims_table(other)


# ---------------------------------------------------------------------------------------- factorial effects

EFFECTS = {"weight_decay": 1.5, "dropout": 3.0, "batchnorm": -4.0, "beta": 7.25, "augmentation": 0.5}
SEED_OFFSET = {0: 0.3, 1: -0.3}


@pytest.fixture(scope="module")
def factorial(tmp_path_factory) -> Path:
    """The full 2^5 factorial, 2 seeds: test_recon additive in the factors; gen_gap random."""
    study = tmp_path_factory.mktemp("fact") / "factorial"
    rng = np.random.default_rng(0)
    for bits in itertools.product((False, True), repeat=5):
        flags = dict(zip(REGULARIZERS, bits))
        for seed in (0, 1):
            recon = 100.0 + sum(EFFECTS[r] for r in REGULARIZERS if flags[r]) + SEED_OFFSET[seed]
            write_run(study, flags, seed, {"test_recon": recon, "gen_gap": float(rng.normal(5, 1))})
    return study


def test_main_effects_recover_additive_effects(factorial):
    runs, _ = C.collect_study(factorial)
    effects = S.main_effects(runs).set_index(["metric", "term"])
    for r, effect in EFFECTS.items():
        row = effects.loc[("test_recon", r)]
        assert row["estimate"] == pytest.approx(effect, abs=1e-6)
        assert row["ci_low"] < effect < row["ci_high"]
        assert (row["n"], row["df_resid"]) == (64, 58)
    done = S.normalize(runs)
    for r in REGULARIZERS:  # balanced design: the OLS effect is mean(on) - mean(off)
        means = done.groupby(r)["gen_gap"].mean()
        assert effects.loc[("gen_gap", r), "estimate"] == pytest.approx(means[True] - means[False], abs=1e-9)


def test_interactions_of_an_additive_factorial_are_zero(factorial):
    runs, _ = C.collect_study(factorial)
    assert S.is_full_factorial(runs)
    inter = S.interaction_effects(runs)
    recon = inter[inter["metric"] == "test_recon"].set_index("term")
    pairs = [f"{a}:{b}" for a, b in itertools.combinations(REGULARIZERS, 2)]
    assert set(pairs) <= set(recon.index)
    assert np.allclose(recon.loc[pairs, "estimate"], 0, atol=1e-6)
    assert set(inter["df_resid"]) == {64 - 16}


def test_effects_with_an_interaction_are_averaged_main_effects_and_a_difference_of_differences(tmp_path):
    """test_recon = 100 + 10 bn - 20 bn*beta: batch norm helps (+10) with beta off and hurts (-10)
    with it on. Averaged over the others, batch norm's effect is 0 and beta's -10, in both tables;
    batchnorm:beta is how much batch norm's effect changes when beta is on: -20."""
    study = tmp_path / "inter"
    for bits in itertools.product((False, True), repeat=5):
        flags = dict(zip(REGULARIZERS, bits))
        for seed in (0, 1):
            recon = 100.0 + 10 * flags["batchnorm"] - 20 * flags["batchnorm"] * flags["beta"] + SEED_OFFSET[seed]
            write_run(study, flags, seed, {"test_recon": recon})
    runs, history = C.collect_study(study)
    assert S.is_balanced_factorial(runs)
    main = S.main_effects(runs).query("metric == 'test_recon'").set_index("term")["estimate"]
    inter = S.interaction_effects(runs).query("metric == 'test_recon'").set_index("term")["estimate"]
    expected = {"weight_decay": 0.0, "dropout": 0.0, "batchnorm": 0.0, "beta": -10.0, "augmentation": 0.0}
    for r, effect in expected.items():
        assert main[r] == pytest.approx(effect, abs=1e-9), r
        assert inter[r] == pytest.approx(effect, abs=1e-9), f"{r}: the interaction table's main effect"
    assert inter["batchnorm:beta"] == pytest.approx(-20.0, abs=1e-9)
    others = inter.drop([*REGULARIZERS, "batchnorm:beta"])
    assert np.allclose(others, 0, atol=1e-9)
    R.write_report(study, runs, history)
    text = (study / "report.md").read_text()
    assert "(on − off, averaged over the other factors)" in text
    assert "how much A's effect changes when B is switched on" in text


def test_effects_of_an_unbalanced_design_are_called_additive(tmp_path):
    study = tmp_path / "loo"
    write_run(study, dict.fromkeys(REGULARIZERS, True), 0, {"test_recon": 100.0})
    for i, r in enumerate(REGULARIZERS):  # all, and all but one: the without_<x> presets
        write_run(study, dict.fromkeys(REGULARIZERS, True) | {r: False}, 0, {"test_recon": 90.0 + i})
    write_run(study, NONE, 0, {"test_recon": 80.0})
    runs, history = C.collect_study(study)
    assert not S.is_balanced_factorial(runs)
    assert "additive model" in S.effects_meaning(runs)
    S.main_effects(runs)  # estimable: 7 runs, 6 parameters
    R.write_report(study, runs, history)
    text = (study / "report.md").read_text()
    assert "additive model" in text and "averaged over the other factors)" not in text


def test_zero_residual_df_is_reported_not_crashed(tmp_path):
    study = tmp_path / "oat"
    write_run(study, NONE, 0, {"test_recon": 100.0})
    for r in REGULARIZERS:  # one at a time: 6 runs, 6 parameters
        write_run(study, NONE | {r: True}, 0, {"test_recon": 100.0 + EFFECTS[r]})
    runs, history = C.collect_study(study)
    effects = S.main_effects(runs)
    recon = effects[effects["metric"] == "test_recon"].set_index("term")
    assert np.allclose(recon.loc[list(REGULARIZERS), "estimate"], list(EFFECTS.values()), atol=1e-6)
    assert (effects["df_resid"] == 0).all() and effects["ci_low"].isna().all()
    with pytest.raises(S.NotEstimable, match="confound the two-way interactions"):
        S.interaction_effects(runs)  # one factor at a time: no pair is ever on together
    R.write_report(study, runs, history)
    text = (study / "report.md").read_text()
    assert "Residual df is 0" in text and "(no CI)" in text


def test_none_vs_all_alone_confounds_the_factors(study):
    runs, _ = C.collect_study(study)
    with pytest.raises(S.NotEstimable, match="confound"):
        S.main_effects(runs)


@dataclass
class ToyConfig:
    enabled: bool = False


TOY = regularizers.Regularizer("toy", "toy", "toy", "model", ToyConfig, {})


def test_a_registered_sixth_regularizer_is_a_factor(tmp_path, monkeypatch):
    """A regularizer registered at run time gets a runs.csv column, a cell flag, a place in the
    all-on cell and a main effect; its interactions need all 2^6 combinations."""
    monkeypatch.setitem(regularizers.REGISTRY, "toy", TOY)
    names = regularizers.names()
    effects = EFFECTS | {"toy": 2.0}
    study = tmp_path / "six"
    for bits in itertools.product((False, True), repeat=6):
        flags = dict(zip(names, bits))
        write_run(study, flags, 0, {"test_recon": 100.0 + sum(effects[r] for r in names if flags[r])})
    runs, history = C.collect_study(study)
    assert runs["included"].all() and "toy" in runs.columns and "toy" in history.columns
    assert S.is_balanced_factorial(runs)
    recon = S.main_effects(runs).query("metric == 'test_recon'").set_index("term")["estimate"]
    assert list(recon.index) == list(names)
    assert np.allclose(recon[list(names)], [effects[r] for r in names], atol=1e-6)
    inter = S.interaction_effects(runs).query("metric == 'test_recon'").set_index("term")["estimate"]
    assert np.allclose(inter[[f"{r}:toy" for r in REGULARIZERS]], 0, atol=1e-6)
    cells = S.cell_summary(runs)
    assert cells["combo"].iloc[-1] == "wd-do-bn-beta-aug-toy" and cells["toy"].iloc[-1]
    table = V.secondary_table(runs).set_index("metric")
    assert table.loc["test_recon", "all_mean"] == pytest.approx(100.0 + sum(effects.values()))
    R.write_report(study, runs, history)
    text = (study / "report.md").read_text()
    assert "`all` = `wd-do-bn-beta-aug-toy` (all six on)" in text and "| toy |" in text


def test_a_sixth_regularizer_that_never_varies_is_left_out_of_the_effects(factorial, monkeypatch):
    monkeypatch.setitem(regularizers.REGISTRY, "toy", TOY)
    study = factorial.parent / "factorial-with-toy"  # the factorial's runs, their configs with the toy off
    for run_dir in sorted(p for p in factorial.iterdir() if (p / "metrics.json").is_file()):
        target = study / run_dir.name
        target.mkdir(parents=True)
        for f in run_dir.iterdir():
            text = f.read_bytes()
            if f.name == "config.yaml":
                text += b"toy:\n  enabled: false\n"
            target.joinpath(f.name).write_bytes(text)
    runs, _ = C.collect_study(study)
    assert runs["included"].all() and not runs["toy"].any()
    effects = S.main_effects(runs).set_index(["metric", "term"])
    assert "toy" not in effects.index.get_level_values("term")
    for r, effect in EFFECTS.items():
        assert effects.loc[("test_recon", r), "estimate"] == pytest.approx(effect, abs=1e-6)
    assert not S.is_full_factorial(runs) and "additive model" in S.effects_meaning(runs)
    inter = S.interaction_effects(runs)  # the five that vary form a full factorial; the toy is left out
    assert not inter["term"].str.contains("toy").any()
    recon = inter[inter["metric"] == "test_recon"].set_index("term")["estimate"]
    assert np.allclose(recon[[t for t in recon.index if ":" in t]], 0, atol=1e-6), "test_recon is additive"
    assert not S.cell_mask(S.normalize(runs), True).any(), "all on means the toy regularizer on too"


# ---------------------------------------------------------------------------------------- robustness


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """Good none/all runs beside every kind of partial, crashed or corrupt run."""
    study = tmp_path_factory.mktemp("messy") / "main"
    for seed in (0, 1):
        write_run(study, NONE, seed, {"test_recon": 100.0 + seed})
        write_run(study, ALL, seed, {"test_recon": 90.0 + seed})
    truncated = write_run(study, NONE, 2)
    text = (truncated / "metrics.json").read_text()
    (truncated / "metrics.json").write_text(text[: len(text) // 2])
    garbage = write_run(study, ALL, 2)
    (garbage / "history.csv").write_bytes(b"\x00\xff\xfe garbage\x81,\x90\n\x00\x01")
    textual = write_run(study, ALL, 5)
    (textual / "history.csv").write_text("hello world\nthis is, not a history\n")
    cut = write_run(study, NONE, 5)
    text = (cut / "history.csv").read_text()
    (cut / "history.csv").write_text(text[: text.rindex("epoch,4,") + 20])
    no_config = write_run(study, NONE, 6)
    (no_config / "config.yaml").unlink()
    no_history = write_run(study, ALL, 6)
    (no_history / "history.csv").unlink()
    short = write_run(study, NONE, 7)  # cut at a line boundary: the last epoch row is gone
    history = pd.read_csv(short / "history.csv")
    history[~((history["kind"] == "epoch") & (history["epoch"] == EPOCHS))].to_csv(short / "history.csv", index=False)
    only_ckpt = study / "none_seed3"
    only_ckpt.mkdir()
    (only_ckpt / "checkpoint.pt").write_bytes(b"")
    write_run(study, NONE, 4, status="running")
    write_run(study, ALL, 3, {"error": "RuntimeError: boom"}, status="failed")
    write_run(study, ALL, 4, {"diverged_epoch": 1, "diverged_step": 3, "error": "non-finite loss"},
              status="diverged")
    return study


EXPECTED_EXCLUSIONS = {
    "none_seed2": ("invalid", "metrics.json unreadable"),
    "wd-do-bn-beta-aug_seed2": ("completed", "history.csv unreadable"),
    "wd-do-bn-beta-aug_seed5": ("completed", "history.csv lacks columns"),
    "none_seed5": ("completed", "history.csv has missing or non-numeric values in its epoch rows"),
    "none_seed6": ("completed", "config.yaml missing"),
    "wd-do-bn-beta-aug_seed6": ("completed", "history.csv missing"),
    "none_seed7": ("completed", "history.csv has 3 epoch rows but metrics.json says 4 epochs"),
    "none_seed3": ("running", "no metrics.json yet"),
    "none_seed4": ("running", "still running"),
    "wd-do-bn-beta-aug_seed3": ("failed", "failed: RuntimeError: boom"),
    "wd-do-bn-beta-aug_seed4": ("diverged", "diverged at epoch 1, step 3"),
}


def test_partial_and_corrupt_runs_are_excluded_with_reasons(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="ablation.collect"):
        runs, _ = C.collect_study(messy)
    runs = runs.set_index("run_name")
    assert sorted(runs.index[runs["included"]]) == ["none_seed0", "none_seed1", "wd-do-bn-beta-aug_seed0",
                                                    "wd-do-bn-beta-aug_seed1"]
    for name, (status, reason) in EXPECTED_EXCLUSIONS.items():
        assert runs.loc[name, "status"] == status
        assert not runs.loc[name, "included"]
        assert reason in runs.loc[name, "excluded_reason"]
    logged = caplog.text
    for name, file in (("none_seed2", "metrics.json"), ("wd-do-bn-beta-aug_seed2", "history.csv"),
                       ("none_seed5", "history.csv"), ("none_seed6", "config.yaml"),
                       ("wd-do-bn-beta-aug_seed6", "history.csv")):
        assert str(messy / name / file) in logged
    table = V.secondary_table(runs.reset_index()).set_index("metric")
    assert (table.loc["test_recon", "none_n"], table.loc["test_recon", "all_n"]) == (2, 2)
    assert table.loc["test_recon", "none_mean"] == pytest.approx(100.5)
    assert (table.loc["diverged", "all_mean"], table.loc["diverged", "all_n"]) == (1, 3)


def test_report_of_a_messy_study_lists_excluded_runs(messy):
    assert R.main(["--no-wandb", str(messy)]) == 0
    text = (messy / "report.md").read_text()
    excluded = text[text.index("## Excluded runs"):text.index("## Appendix")]
    for name, (status, reason) in EXPECTED_EXCLUSIONS.items():
        line = next(line for line in excluded.splitlines() if f"`{name}`" in line)
        assert status in line and reason in line
    runs = C.read_runs_csv(messy / "runs.csv")
    assert len(runs) == 4 + len(EXPECTED_EXCLUSIONS) and runs["included"].sum() == 4


def test_setting_groups_are_reported_separately(tmp_path):
    study = tmp_path / "mixed"
    for seed in (0, 1):
        write_run(study, NONE, seed, {"test_recon": 100.0 + seed}, settings_hash="1111aaaa1111aaaa")
        write_run(study, ALL, seed, {"test_recon": 90.0 + seed}, settings_hash="1111aaaa1111aaaa")
    for seed in (2, 3):
        write_run(study, NONE, seed, {"test_recon": 500.0 + seed}, settings_hash="2222bbbb2222bbbb")
    runs, history = C.collect_study(study)
    groups = dict(S.setting_groups(runs))
    assert set(groups) == {"1111aaaa1111aaaa", "2222bbbb2222bbbb"}
    R.write_report(study, runs, history)
    text = (study / "report.md").read_text()
    assert "2 setting groups" in text and "never pooled" in text
    assert "## Setting group `1111aaaa`" in text and "## Setting group `2222bbbb`" in text
    first = V.secondary_table(groups["1111aaaa1111aaaa"]).set_index("metric")
    assert first.loc["test_recon", "none_mean"] == pytest.approx(100.5)  # the 500s are not pooled in
    assert (study / "figures" / "1111aaaa_curves.png").is_file()


def test_no_results_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert R.main(["--no-wandb", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no training runs found in") and str(empty) in err
    assert "Traceback" not in err


def test_study_discovery_from_a_parent(study):
    parent = study.parent
    assert R.main(["--no-wandb", str(parent)]) == 0  # writes runs.csv and history.csv into the study
    assert C.find_studies([parent]) == [study]
    assert C.find_studies([study]) == [study]
    assert not C.is_run_dir(study)


# ---------------------------------------------------------------------------------------- report rendering


def image_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.(?:png|jpg))\)", markdown)


def check_report(study: Path) -> str:
    """Every image report.md links exists and opens; report.html embeds them; returns report.md."""
    text = (study / "report.md").read_text()
    links = image_links(text)
    assert links
    for link in links:
        assert not Path(link).is_absolute()
        with Image.open(study / link) as image:
            image.verify()
    html = (study / "report.html").read_text()
    pngs = sum(link.endswith(".png") for link in links)
    assert html.count("data:image/png;base64,") == pngs and html.count("data:image/jpeg;base64,") == len(links) - pngs
    assert 'src="figures/' not in html and "<table>" in html
    return text


def test_report_files_figures_and_verbatim_table(factorial):
    assert R.main(["--no-wandb", str(factorial)]) == 0
    text = check_report(factorial)
    names = {Path(link).name for link in image_links(text)}
    assert names == {"claims.png", "curves.png", "gen_gap.png", "rate_distortion.png", "kl_spectrum.png", "main_effects.png",
                     "heatmap_test_recon.png", "recon_grids.jpg", "samples.jpg"}
    with Image.open(factorial / "figures" / "curves.png") as plot:
        assert plot.mode == "P", "plots are palette PNGs"
    with Image.open(factorial / "figures" / "samples.jpg") as samples, \
            Image.open(factorial / "none_seed0" / "samples.png") as one:
        assert samples.format == "JPEG" and samples.size == (2 * one.width + F.PANEL_GAP, one.height), \
            "none and all side by side, each at its own resolution"
    assert "left to right: none (seed 0), all (seed 0)" in text
    runs = C.read_runs_csv(factorial / "runs.csv")
    assert len(runs) == 64 and runs["included"].all()
    for _, group in S.setting_groups(runs):
        assert R.render_claims_markdown(V.claims_table(group)) in text
        assert R.render_secondary_markdown(V.secondary_table(group)) in text
    assert "| cpu | 4 | 32 | 128 | 128 | 10000 | 2000 | 64 |" in text  # settings from config.yaml
    assert "Two-way interactions" in text and "weight decay:dropout" in text
    history = pd.read_csv(factorial / "history.csv")
    assert len(history) == 64 * EPOCHS
    assert np.allclose(history["test_recon"], 150.0 - history["epoch"])  # the epoch rows, as written
    assert {"run_name", "seed", "settings_hash", *REGULARIZERS, "epoch", "test_recon"} <= set(history.columns)
    for key in M.METRICS:
        assert f"`{key}`" in text  # every metric defined in the appendix


def test_wandb_report_run_offline(study, tmp_path):
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wbc"), "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg"),
                        "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-m", "ablation.report", str(study)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    runs = list((study / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    rec = read_run(runs[0])
    trained_under = json.loads(next(study.glob("*/metrics.json")).read_text())["study"]  # e.g. res0/main
    assert trained_under.endswith("/main"), "the fixture's runs were trained under a nested study name"
    assert set(C.read_runs_csv(study / "runs.csv")["study"]) == {trained_under}
    assert rec.job_type == "report" and rec.group == trained_under and rec.exit_code == 0, \
        "the report run sits in its training runs' W&B group"
    logged = {k: v for row in rec.history for k, v in row.items() if isinstance(v, dict)}
    assert any(v.get("_type") == "table-file" for v in logged.values()), "the tables are wandb.Table"
    assert any(k.startswith("claims") for k in logged), sorted(logged)
    assert rec.has_image, "the figures are logged as images"


# ---------------------------------------------------------------------------------------- end to end


def test_end_to_end_from_real_training_runs(tmp_path):
    data = make_imagefolder(tmp_path / "data", 256, 128)
    env = os.environ | {"ABLATION_RESULTS": str(tmp_path / "results"), "ABLATION_CACHE": str(tmp_path / "cache"),
                        "WANDB_MODE": "disabled"}
    train = [sys.executable, "-m", "ablation.train", "-m", "regularizer=none,all", "seed=0,1", "budget=smoke",
             f"data.root={data}", "logger=none", "budget.epochs=3", "trainer.log_interval=1"]
    done = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    study = tmp_path / "results" / "main"
    done = subprocess.run([sys.executable, "-m", "ablation.report", str(study), "--no-wandb"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    runs = C.read_runs_csv(study / "runs.csv")
    assert len(runs) == 4 and runs["included"].all() and set(runs["status"]) == {"completed"}
    assert runs[["kl_cv", "kl_max_jump", "loss_volatility"]].notna().all().all()
    text = check_report(study)
    assert R.render_claims_markdown(V.claims_table(runs)) in text
    table = V.secondary_table(runs).set_index("metric")
    measured = table[V.measured(table)].drop("diverged")
    assert (measured["none_n"] == 2).all() and (measured["all_n"] == 2).all()
    assert "| smoke | 3 | 8 | 128 | 128 | 256 | 128 | 4 |" in text


def test_study_with_no_finished_run_still_gets_a_report(tmp_path):
    study = tmp_path / "early"
    write_run(study, NONE, 0, status="running")
    (study / "none_seed1").mkdir()
    (study / "none_seed1" / "checkpoint.pt").write_bytes(b"")
    assert R.main(["--no-wandb", str(study)]) == 0
    text = (study / "report.md").read_text()
    assert "No run has finished yet" in text and "`none_seed0`" in text and "`none_seed1`" in text
    assert "<h2" in (study / "report.html").read_text()


def test_loss_volatility_leaves_out_rows_over_fewer_steps():
    """Step rows at every 10th step, epochs of 25 steps. history.csv's window_steps says how many
    steps each row averages; without it (older versions restarted the window at each epoch) it
    is inferred from the epoch ends, and rows over fewer steps than the rest are left out."""
    steps = pd.DataFrame({"kind": "step", "step": range(10, 101, 10),
                          "train_loss": [100.0 * math.exp(-0.01 * i + (0.05 if i % 2 else 0.0)) for i in range(10)]})
    ends = pd.Series([25.0, 50.0, 75.0, 100.0])
    assert M.window_steps(steps, ends).tolist() == [10, 10, 5, 10, 10, 10, 10, 5, 10, 10]
    assert M.window_steps(steps.assign(window_steps=10), ends).tolist() == [10] * 10, "a recorded window wins"
    full = steps[M.window_steps(steps, ends).to_numpy() == 10]
    second = full[full["step"] > 50]["train_loss"].to_numpy()
    expected = float(np.std(np.diff(np.log(second)), ddof=1))
    assert M.loss_volatility(steps, 100.0, ends) == pytest.approx(expected, rel=1e-12)
    assert M.loss_volatility(steps.assign(window_steps=10), 100.0, ends) != pytest.approx(expected, rel=1e-6)


def test_welch_makes_no_test_when_neither_side_varies():
    def cells(none: list[float], all_: list[float], all_seeds=(3, 4, 5)) -> tuple[pd.DataFrame, pd.DataFrame]:
        return (pd.DataFrame({"seed": range(len(none)), "m": none}),
                pd.DataFrame({"seed": list(all_seeds)[:len(all_)], "m": all_}))

    diff = S.difference(*cells([20.0] * 3, [19.0] * 3), "m")
    assert not diff.paired and not diff.testable and math.isnan(diff.p_value()), \
        "a t-test would call any difference of two constants significant"
    assert "no seed-to-seed variance" in diff.note
    diff = S.difference(*cells([20.0, 20.5, 19.5], [10.0, 10.5, 9.5]), "m")
    assert diff.estimate == pytest.approx(-10.0)
    assert diff.p_value() == pytest.approx(stats.ttest_ind([10, 10.5, 9.5], [20, 20.5, 19.5], equal_var=False).pvalue)


def test_p_values_never_round_across_the_threshold():
    assert R.pvalue(0.0496) == "0.0496" and R.pvalue(0.0504) == "0.050", "0.050 only for p >= 0.05"
    assert R.pvalue(0.123) == "0.123" and R.pvalue(0.05) == "0.050" and R.pvalue(0.0004) == "4.0e-04"
    assert R.pvalue(float("nan")) == "—"


def test_a_mean_is_shown_as_finely_as_its_ci():
    assert R._cell(1871.234, 0.33, 3, "mean") == "1871.23 ± 0.33 (n=3)", "not 1871 ± 0.33"
    assert R._cell(7.873123, 0.00015, 3, "mean") == "7.87312 ± 0.00015 (n=3)"
    assert R._cell(80.3712, 1.5, 3, "mean") == "80.37 ± 1.5 (n=3)", "4 significant digits at least"
    assert R._cell(128.0, 0.0, 3, "mean") == "128.0 ± 0 (n=3)"


# ---------------------------------------------------------------------------------------- figures and HTML


def test_html_keeps_numbers_whole_and_lets_wide_tables_scroll(tmp_path):
    text = ("| Metric | p | Note |\n|---|---|---|\n| test recon | 3.9e-05 | "
            "none does not overfit in any of its 3 runs: gap growth at most 1.1, well under the SESOI |\n")
    page = R.markdown_to_html(text, tmp_path, "t")
    assert '<div class="scroll"><table>' in page and "</table></div>" in page
    assert '<td class="num">3.9e-05</td>' in page, "a p-value never breaks at its minus sign"
    assert "<td>none does not overfit" in page, "prose may wrap"
    assert "td.num { white-space: nowrap; }" in page and "div.scroll { overflow-x: auto;" in page


def empty_sections(text: str) -> list[str]:
    """Headings followed directly by another heading of the same or a higher level (an empty section)."""
    lines = [line for line in text.splitlines() if line.strip()]
    empty = []
    for here, after in zip(lines, lines[1:]):
        if here.startswith("#") and after.startswith("#") and len(after.split()[0]) <= len(here.split()[0]):
            empty.append(here)
    return empty


def test_a_none_vs_all_report_has_no_empty_or_not_estimable_section(study):
    assert R.main(["--no-wandb", str(study)]) == 0
    text = (study / "report.md").read_text()
    assert "### Factorial effects" not in text and "not estimable" not in text
    assert empty_sections(text) == []
    assert "## Verdict rules" in text and "| Reduced overfitting | “reduced overfitting” | `gap_growth` |" in text


def test_captions_state_the_runs_per_arm_and_claim_no_band_for_one_seed(study, factorial):
    assert R.main(["--no-wandb", str(study)]) == 0
    text = (study / "report.md").read_text()
    assert "3 runs per arm (seeds 0, 1, 2); line: mean, band: ±1 sd over seeds" in text
    runs, history = C.collect_study(factorial)
    one = history[history["seed"] == 0]
    assert F.arm_sizes(one) == "1 run per arm (seed 0); one run, no band"
    assert "±1 sd" not in F.arm_sizes(one)
    assert F.arm_sizes(history) == "2 runs per arm (seeds 0, 1); line: mean, band: ±1 sd over seeds"


def test_curves_use_eval_mode_columns_only(factorial, tmp_path):
    _, history = C.collect_study(factorial)
    eval_only = history.drop(columns=["train_recon", "train_kl", "train_loss"])
    assert F.curves_figure(eval_only, tmp_path / "curves.png") is not None, "train-mode columns are not needed"


def test_a_swept_strength_gets_a_dose_response_figure(tmp_path):
    rows = []
    for value, seed in itertools.product((2.0, 4.0, 8.0), (0, 1)):
        flags = NONE | {"beta": True}
        rows.append({"run_name": f"beta{value}_seed{seed}", "combo": "beta", "seed": seed, "settings_hash": "h",
                     **flags, "status": "completed", "included": True, "beta_value": value,
                     "test_recon": 80 + 5 * value + seed, "test_kl": 30 / value})
    for seed in (0, 1):
        rows.append({"run_name": f"none_seed{seed}", "combo": "none", "seed": seed, "settings_hash": "h", **NONE,
                     "status": "completed", "included": True, "beta_value": 4.0, "test_recon": 80.0 + seed,
                     "test_kl": 30.0})
    runs = pd.DataFrame(rows)
    assert F.swept_strengths(runs) == [("beta", "value")]
    assert F.swept_strengths(runs[runs["beta_value"] == 4.0]) == [], "on/off alone is not a sweep"
    path = F.dose_response_figure(runs, "beta", "value", tmp_path / "dose.png")
    with Image.open(path) as image:
        image.verify()
    figures = F.group_figures(tmp_path, runs, pd.DataFrame(), None)
    assert any(p.name == "dose_beta_value.png" and "Dose–response of β value" in c for c, p in figures)
    table = F.dose_response(runs, "beta", "value").set_index(["dose", "metric"])
    assert table.loc[(1.0, "test_recon"), "mean"] == 80.5, "none sits at β's off value, 1"
    assert table.loc[(4.0, "test_recon"), "mean"] == 100.5 and table.loc[(4.0, "test_recon"), "n"] == 2
    assert table.loc[(8.0, "test_kl"), "std"] == 0.0
    def run(name, beta, **flags_and_strengths):
        return {"run_name": name, "combo": name, "seed": 0, "settings_hash": "h", **NONE, "status": "completed",
                "included": True, "beta": beta is not None, "beta_value": beta or 4.0, "test_recon": 95.0,
                "test_kl": 20.0, **flags_and_strengths}
    more = pd.DataFrame([run("do_seed0", None, dropout=True, dropout_p=0.1),  # do at p = 0.1, beta off: 1
                         run("do-beta_seed0", 2.0, dropout=True, dropout_p=0.1),
                         run("bn_seed0", None, batchnorm=True)])  # a lone strength: no line
    others = F.dose_response(pd.concat([runs, more]), "beta", "value")
    assert set(others["others"]) == {"none", "do (dropout.p=0.1)"}, "the other regularizers' strengths tell lines apart"
    beta_one = pd.DataFrame([run("beta_seed0", 1.0), run("do_seed0", None, dropout=True, dropout_p=0.3),
                             run("do_seed1", None, dropout=True, dropout_p=0.5)])
    by_p = F.dose_response(beta_one, "dropout", "p")
    assert set(by_p["others"]) == {"none"} and sorted(by_p["dose"].unique()) == [0.0, 0.3, 0.5], \
        "beta on at 1 computes what beta off does: it is the p = 0 point of none's line"
    markdown = R.render_dose_markdown(F.dose_response(runs, "beta", "value"), "beta", "value")
    assert "| Others on | β value | test recon (SSE/image) | test KL (nats/image) | Runs |" in markdown
    assert "| none | 2 | 90.50 ± 0.7071 | 15.00 ± 0 | 2 |" in markdown


def test_a_study_re_rendered_from_its_tables_keeps_its_image_figures(factorial, tmp_path):
    assert R.main(["--no-wandb", str(factorial)]) == 0
    copy = tmp_path / "cifar" / "factorial"
    copy.mkdir(parents=True)
    for name in ("runs.csv", "history.csv"):
        (copy / name).write_bytes((factorial / name).read_bytes())
    (copy / "figures").mkdir()
    for image in ("recon_grids.jpg", "samples.png", "stale.png"):  # samples.png: as earlier reports drew it
        (copy / "figures" / image).write_bytes((factorial / "figures" / "curves.png").read_bytes())
    runs = C.read_runs_csv(copy / "runs.csv")
    assert R.main(["--no-wandb", "--from-tables", str(tmp_path)]) == 0
    text = check_report(copy)
    names = {Path(link).name for link in image_links(text)}
    assert {"recon_grids.jpg", "samples.png", "curves.png"} <= names and "kl_spectrum.png" not in names
    assert "drawn by an earlier report of these runs" in text
    assert not (copy / "figures" / "stale.png").exists()
    rerun = C.read_runs_csv(copy / "runs.csv").set_index("run_name")
    history = pd.read_csv(copy / "history.csv")
    for name, rows in history.groupby("run_name"):
        assert rerun.loc[name, "gap_growth"] == pytest.approx(M.gap_growth(rows))
    assert len(rerun) == len(runs)


def test_runs_whose_config_says_auto_are_grouped_by_the_precision_they_recorded(tmp_path):
    """Runs made while precision=auto was hashed as written share a settings_hash on a CPU (fp32) and a
    GPU (bf16): the precision each recorded keeps them apart."""
    study = tmp_path / "results" / "mixed"
    for seed, precision in ((0, "fp32"), (1, "bf16"), (2, "fp32")):
        run_dir = write_run(study, NONE, seed)
        cfg = run_dir / "config.yaml"
        cfg.write_text(cfg.read_text().replace("trainer:\n", "trainer:\n  precision: auto\n"))
        record = json.loads((run_dir / "metrics.json").read_text()) | {"precision": precision}
        (run_dir / "metrics.json").write_text(json.dumps(record))
    runs, _ = C.collect_study(study)
    hashes = runs.set_index("seed")["settings_hash"]
    assert hashes[0] == hashes[2] == "aaaa1111bbbb2222-fp32" and hashes[1] == "aaaa1111bbbb2222-bf16"
    assert len(S.setting_groups(runs)) == 2


def test_a_resolution_five_half_fraction_estimates_main_effects_and_interactions():
    """The 16 cells of +sweep=half_factorial (augmentation = the product of the other four), 2 seeds, with
    planted additive effects and one dropout x batchnorm interaction: both tables recover them."""
    rng = np.random.default_rng(0)
    effects = {"weight_decay": 0.0, "dropout": 30.0, "batchnorm": -25.0, "beta": 40.0, "augmentation": 25.0}
    rows = []
    for four in itertools.product([0, 1], repeat=4):
        flags = dict(zip(REGULARIZERS, (*four, int(np.prod([2 * f - 1 for f in four]) == 1))))
        for seed in (0, 1):
            y = (100 + sum(e * (flags[r] - 0.5) for r, e in effects.items())
                 + 4 * (2 * flags["dropout"] - 1) * (2 * flags["batchnorm"] - 1) + rng.normal(0, 0.5))
            rows.append({**{r: bool(v) for r, v in flags.items()}, "seed": seed, "test_recon": y,
                         "status": "completed", "included": True, "settings_hash": "h",
                         "combo": regularizers.combo_name(flags)})
    runs = pd.DataFrame(rows)
    main = S.main_effects(runs, metrics=("test_recon",)).set_index("term")["estimate"]
    for r, e in effects.items():
        assert main[r] == pytest.approx(e, abs=1.0), r
    inter = S.interaction_effects(runs, metrics=("test_recon",)).set_index("term")
    assert inter.loc["dropout:batchnorm", "ci_low"] < 16 < inter.loc["dropout:batchnorm", "ci_high"]
    others = inter.loc[[t for t in inter.index if ":" in t and t != "dropout:batchnorm"]]
    assert (others["estimate"].abs() < 1.5).all()
    with pytest.raises(S.NotEstimable, match="half_factorial"):
        S.interaction_effects(runs[runs["augmentation"] == runs["dropout"]], metrics=("test_recon",))


def test_claims_figure_has_a_panel_per_measured_claim_titled_with_its_verdict(tmp_path):
    """The claims figure draws one panel per claim whose primary metric both arms measure, titled with the
    verdict of claims_table; a claim measured in one arm only gets no panel."""
    rows = []
    for on, base in ((False, 100.0), (True, 90.0)):
        flags = dict.fromkeys(regularizers.names(), on)
        for seed in (0, 1, 2):
            rows.append({"run_name": regularizers.run_name(flags, seed), "combo": regularizers.combo_name(flags),
                         "seed": seed, "settings_hash": "h" * 16, **flags, "status": "completed", "included": True,
                         "recon_mean": base + seed, "probe_acc": 0.4 + 0.01 * seed if on else None})
    runs = pd.DataFrame(rows)
    claims = V.claims_table(runs)
    fig_path = F.claims_figure(runs, claims, tmp_path / "claims.png")
    with Image.open(fig_path) as im:
        im.verify()
    assert list(F.claim_panels(claims)["claim"]) == ["reconstruction"]
    assert F.claims_figure(runs.assign(recon_mean=np.nan), V.claims_table(runs.assign(recon_mean=np.nan)),
                           tmp_path / "none.png") is None
