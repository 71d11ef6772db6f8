"""The committed study results agree with themselves: report.md is regenerated from runs.csv.

A stale or hand-edited table in a committed report.md fails here, and so does a README verdict
that is not the committed report's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ablation import regularizers as R
from ablation import verdicts as V
from ablation.collect import read_runs_csv
from ablation.figures import dose_response, swept_strengths
from ablation.report import (claims_display, num, render_dose_markdown, render_claims_markdown, render_conditional_markdown,
                             render_effects_markdown, render_rules_markdown, render_secondary_markdown,
                             render_stress_markdown)
from ablation.stats import (NotEstimable, conditional_effects, has_comparison, interaction_effects, main_effects,
                            setting_groups)

RESULTS = Path(__file__).resolve().parent.parent / "results"
COMMITTED = sorted(p.parent for p in RESULTS.rglob("runs.csv") if (p.parent / "report.md").exists())


def test_the_cpu_study_is_committed():
    assert (RESULTS / "cifar10-cpu").is_dir(), "results/cifar10-cpu/ holds the committed CPU study"
    assert any(p.is_relative_to(RESULTS / "cifar10-cpu") for p in COMMITTED)


@pytest.mark.parametrize("study", COMMITTED, ids=[str(p.relative_to(RESULTS)) for p in COMMITTED])
def test_report_tables_regenerate_from_runs_csv(study):
    runs = read_runs_csv(study / "runs.csv")
    report = (study / "report.md").read_text()
    assert len(runs) > 0
    assert render_rules_markdown() in report, "the report states the verdict rules of ablation/verdicts.py"
    for _, group in setting_groups(runs):
        if has_comparison(group):
            assert render_claims_markdown(V.claims_table(group)) in report
            assert render_secondary_markdown(V.secondary_table(group)) in report
        for strength in swept_strengths(group):
            assert render_dose_markdown(dose_response(group, *strength), *strength) in report, strength
        try:
            effects = main_effects(group, V.EFFECT_METRICS)
        except NotEstimable:
            assert "### Factorial effects" not in report, "no empty effects section"
            continue
        assert render_effects_markdown(effects) in report
        try:
            interactions = interaction_effects(group, V.INTERACTION_METRICS)
        except NotEstimable:
            continue
        assert render_effects_markdown(interactions) in report
        conditional = conditional_effects(group, interactions)
        if len(conditional):
            assert render_conditional_markdown(conditional) in report
    stress = V.stress_verdicts(runs)
    if stress is not None and len(stress):
        assert render_stress_markdown(stress) in report, "the stability claims under an lr sweep's stress"


@pytest.mark.parametrize("study", COMMITTED, ids=[str(p.relative_to(RESULTS)) for p in COMMITTED])
def test_every_committed_claim_has_one_of_the_verdicts(study):
    for _, group in setting_groups(read_runs_csv(study / "runs.csv")):
        table = V.claims_table(group)
        assert list(table["claim"]) == [c.key for c in V.CLAIMS]
        assert set(table["verdict"]) <= set(V.VERDICTS)


@pytest.mark.parametrize("study", COMMITTED, ids=[str(p.relative_to(RESULTS)) for p in COMMITTED])
def test_report_figures_are_committed(study):
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+\.(?:png|jpg))\)", (study / "report.md").read_text()):
        with Image.open(study / link) as im:
            im.verify()


README_STUDIES = ("none-vs-all", "factorial", "bf16-check")  # the columns of the README's verdict table


def test_readme_results_match_the_committed_reports():
    """The README's per-claim verdicts are the committed reports' verdicts, and docs/results.md's main-effects
    table is the factorial report's, both regenerated from runs.csv."""
    readme = (RESULTS.parent / "README.md").read_text()
    results_section = readme.split("### A second regime", 1)[1].split("\n## ", 1)[0]
    verdicts = {}
    for study in README_STUDIES:
        (_, group), = setting_groups(read_runs_csv(RESULTS / "cifar10-cpu" / study / "runs.csv"))
        verdicts[study] = V.claims_table(group).set_index("claim")["verdict"]
    rows = [line for line in results_section.splitlines() if line.startswith("| ")]
    for claim in V.CLAIMS:
        row = f"| {claim.title} | `{claim.primary}` | " + " | ".join(verdicts[s][claim.key] for s in README_STUDIES)
        assert row + " |" in rows, f"README verdict row for {claim.title!r} is not the reports'"
    for line in results_section.splitlines():  # every verdict the prose names is the none-vs-all report's
        for claim in V.CLAIMS:
            if line.startswith(f"- **{claim.title}: "):
                said = line.split(": ", 1)[1].split("**", 1)[0].rstrip(".")
                assert said == verdicts["none-vs-all"][claim.key], (claim.title, said)
    factorial = RESULTS / "cifar10-cpu" / "factorial" / "runs.csv"
    (_, group), = setting_groups(read_runs_csv(factorial))
    docs = (RESULTS.parent / "docs" / "results.md").read_text()
    assert render_effects_markdown(main_effects(group, V.EFFECT_METRICS)) in docs, "docs/results.md's effects table"


HEADLINE = RESULTS / "cifar10-5k" / "a-none-vs-all"  # part A: the README's headline verdicts


def test_readme_headline_verdicts_are_part_a_reports():
    """Each claim's row of the README's headline table (verdict, Δ with its CI, SESOI, n) is part A's report,
    regenerated from its runs.csv, and names a committed figure; the prose names the same verdicts."""
    readme = (RESULTS.parent / "README.md").read_text()
    headline = readme.split("### The headline", 1)[1].split("\n### ", 1)[0]
    (_, group), = setting_groups(read_runs_csv(HEADLINE / "runs.csv"))
    table = V.claims_table(group)
    shown = claims_display(table)
    rows = [line for line in headline.splitlines() if line.startswith("| ")]
    for (_, claim), (_, cells) in zip(table.iterrows(), shown.iterrows()):
        prefix = (f"| {claim['title']} | `{claim['primary']}` | {claim['verdict']} | {cells['Δ (all − none) [CI]']} | "
                  f"{cells['SESOI']} | {int(claim['none_n'])}, {int(claim['all_n'])} | ")
        row = next((r for r in rows if r.startswith(prefix)), None)
        assert row is not None, f"README headline row for {claim['title']!r} is not part A's report: {prefix}"
        link = re.search(r"\]\(([^)]+\.(?:png|jpg))\)", row)
        assert link and (RESULTS.parent / link.group(1)).is_file(), f"{claim['title']}: no committed figure"
    for line in headline.splitlines():
        for claim in V.CLAIMS:
            if line.startswith(f"- **{claim.title}: "):
                said = line.split(": ", 1)[1].split("**", 1)[0].rstrip(".")
                assert said == table.set_index("claim").loc[claim.key, "verdict"], (claim.title, said)


STRESS = RESULTS / "cifar10-5k" / "c-lr-stability"  # part C: the README's stability-under-stress verdicts


def test_readme_stress_verdicts_are_part_c_reports():
    """Each row of the README's part C table is the stress verdict regenerated from part C's runs.csv."""
    readme = (RESULTS.parent / "README.md").read_text()
    section = readme.split("### Stability under stress", 1)[1].split("\n### ", 1)[0]
    table = V.stress_verdicts(read_runs_csv(STRESS / "runs.csv"))
    assert table is not None and len(table) == len(V.STRESS_COMPARISONS)
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    for row in table.itertuples():
        expected = (f"| {row.claim} | `{row.combo}` | {row.none_failed}/{row.none_n} → {row.failed}/{row.n} | "
                    f"{row.none_largest_stable_lr:g} → {row.largest_stable_lr:g} | {num(row.p_holm)} | {row.verdict} |")
        assert expected in rows, f"README part C row is not the report's: {expected}"


def test_readme_benchmark_tables_are_the_committed_bench():
    """The README's benchmark tables are results/bench/bench.md's, row for row."""
    bench_md = (RESULTS / "bench" / "bench.md").read_text()
    readme = (RESULTS.parent / "docs" / "benchmark.md").read_text()
    rows = [line for line in bench_md.splitlines() if line.startswith("|")]
    assert len(rows) > 10
    for row in rows:
        assert row in readme, row


def test_readme_bf16_checks_are_the_committed_bf16_bench():
    """The README's bf16 check table is results/bench/bf16/bench.md's, and that run was in bf16."""
    bench = json.loads((RESULTS / "bench" / "bf16" / "bench.json").read_text())
    assert bench["settings"]["precision"] == "bf16"
    bench_md = (RESULTS / "bench" / "bf16" / "bench.md").read_text()
    readme = (RESULTS.parent / "docs" / "benchmark.md").read_text()
    checks = bench_md.split("| check |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in checks.splitlines()[2:] if line.startswith("|")]
    assert len(rows) >= 8
    for row in rows:
        assert row in readme, row


DOSE = RESULTS / "cifar10-5k" / "d-dose"  # part D: dose-response from none


# What two runs of the same computation may differ in: their names, hashes and switches, and where and how fast.
RUN_IDENTITY = {"study", "run_name", "config_hash", "settings_hash", "reg_beta", "wandb_id", "provenance", "attempts"}
TIMINGS = {"wall_time_s", "train_time_s", "images_per_s"}


def test_part_d_beta_one_is_part_a_none_to_the_last_digit_on_the_same_cpu():
    """β on at 1 is none's objective, so a part D β = 1 run retraces part A's none run of the same seed,
    epoch by epoch, when both ran on the same CPU model: training is deterministic on a CPU, across
    processes and sessions. Another CPU model takes other kernels, and the numbers differ (docs/results.md)."""
    same_cpu = 0
    for dose in sorted(DOSE.glob("beta_seed*_beta1.0")):
        none = HEADLINE / f"none_seed{dose.name.split('_seed')[1].split('_')[0]}"
        a, b = (json.loads((p / "metrics.json").read_text()) for p in (dose, none))
        assert a["status"] == b["status"] == "completed"
        if a["provenance"]["cpu"] != b["provenance"]["cpu"]:
            continue
        same_cpu += 1
        differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        assert differ <= RUN_IDENTITY | TIMINGS, (dose.name, sorted(differ - RUN_IDENTITY - TIMINGS))
        assert "test_recon" in a and "probe_acc" in a and "fd_suite" in a
        untimed = [pd.read_csv(p / "history.csv").drop(columns=["images_per_s", "epoch_time_s"]) for p in (dose, none)]
        pd.testing.assert_frame_equal(*untimed, check_exact=True, obj=dose.name)
    assert same_cpu >= 1, "part D has a beta = 1 run made on the CPU model of part A's none run"


README_DOSE_METRICS = ("recon_mean", "test_kl", "gap_growth", "fd_suite", "probe_acc")


def test_readme_dose_rows_are_part_d_reports():
    """The README's part D table is `none`'s line of each dose-response table of part D's report."""
    readme = (RESULTS.parent / "README.md").read_text()
    section = readme.split("### Dose–response from", 1)[1].split("\n### ", 1)[0]
    (_, group), = setting_groups(read_runs_csv(DOSE / "runs.csv"))
    expected = []
    for name, field in (("beta", "value"), ("dropout", "p")):
        table = dose_response(group, name, field)
        for dose, points in table[table["others"] == "none"].groupby("dose", sort=True):
            points = points.set_index("metric")
            n = points.loc[list(README_DOSE_METRICS), "n"]
            assert n.min() == n.max(), (name, dose, "every metric measured in every run")
            expected.append(f"| {R.REGISTRY[name].label} {field} | {dose:g} | "
                            + " | ".join(num(points.loc[m, "mean"]) for m in README_DOSE_METRICS) + f" | {int(n.max())} |")
    assert len(expected) == 8, "beta at 1, 2, 4, 8 and dropout at 0, 0.1, 0.3, 0.5"
    assert "| Strength | | `recon_mean` | test KL | `gap_growth` | `fd_suite` | `probe_acc` | n |" in section
    assert README_DOSE_METRICS[1] == "test_kl", "the header names the others by their keys"
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Strength")]
    assert rows == expected
