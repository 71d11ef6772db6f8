"""The committed study results agree with themselves: report.md is regenerated from runs.csv.

A stale or hand-edited table in a committed report.md fails here.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ablation.collect import read_runs_csv
from ablation.report import render_comparison_markdown, render_effects_markdown
from ablation.stats import NotEstimable, comparison_table, has_comparison, main_effects, setting_groups

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
    for _, group in setting_groups(runs):
        if has_comparison(group):
            assert render_comparison_markdown(comparison_table(group)) in report
        try:
            effects = main_effects(group)
        except NotEstimable:
            continue
        assert render_effects_markdown(effects) in report


@pytest.mark.parametrize("study", COMMITTED, ids=[str(p.relative_to(RESULTS)) for p in COMMITTED])
def test_report_figures_are_committed(study):
    import re

    from PIL import Image

    for link in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (study / "report.md").read_text()):
        with Image.open(study / link) as im:
            im.verify()


def test_readme_results_match_the_committed_reports():
    """The README's Results tables are the committed reports' tables, regenerated from runs.csv."""
    readme = (RESULTS.parent / "README.md").read_text()
    results_section = readme.split("## Results", 1)[1].split("\n## ", 1)[0]
    seeds = read_runs_csv(RESULTS / "cifar10-cpu" / "none-vs-all" / "runs.csv")
    (_, group), = setting_groups(seeds)
    assert render_comparison_markdown(comparison_table(group)) in results_section
    factorial = RESULTS / "cifar10-cpu" / "factorial" / "runs.csv"
    if factorial.exists():
        (_, group), = setting_groups(read_runs_csv(factorial))
        assert render_effects_markdown(main_effects(group)) in results_section


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
    import json

    bench = json.loads((RESULTS / "bench" / "bf16" / "bench.json").read_text())
    assert bench["settings"]["precision"] == "bf16"
    bench_md = (RESULTS / "bench" / "bf16" / "bench.md").read_text()
    readme = (RESULTS.parent / "docs" / "benchmark.md").read_text()
    checks = bench_md.split("| check |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in checks.splitlines()[2:] if line.startswith("|")]
    assert len(rows) >= 8
    for row in rows:
        assert row in readme, row
