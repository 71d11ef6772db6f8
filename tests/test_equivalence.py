"""Tests of ablation.equivalence: the rule that decides whether two studies' runs (bf16 vs fp32) agree.

The TOST p of each row is checked against statsmodels' paired TOST; the verdict follows the rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.weightstats import ttost_paired

from ablation import equivalence as E
from ablation import regularizers
from ablation.collect import run_columns

NAMES = regularizers.names()
SEEDS = (0, 1, 2)
ALL = regularizers.combo_name(dict.fromkeys(NAMES, True))
RECON = {False: [100.0, 102.0, 98.0], True: [90.0, 91.0, 93.0]}  # none, all: reference recon_mean


def study(shift: dict[bool, list[float]] | None = None, seeds=SEEDS) -> pd.DataFrame:
    """none and all runs whose recon_mean is RECON plus `shift` per seed; no other primary is measured."""
    rows = []
    for on in (False, True):
        flags = dict.fromkeys(NAMES, on)
        for i, seed in enumerate(seeds):
            recon = RECON[on][i] + (shift[on][i] if shift else 0.0)
            rows.append({"run_name": regularizers.run_name(flags, seed), "combo": regularizers.combo_name(flags),
                         "seed": seed, "settings_hash": "h" * 16, **flags, "status": "completed", "included": True,
                         "recon_mean": recon})
    return pd.DataFrame(rows, columns=[c for c in run_columns() if c in rows[0] or c == "recon_mean"])


def test_small_paired_differences_agree_and_match_statsmodels():
    shift = {False: [0.3, -0.2, 0.1], True: [0.0, 0.4, -0.3]}
    table = E.equivalence_table(study(), study(shift))
    assert list(table["cell"]) == ["none", ALL] and set(table["metric"]) == {"recon_mean"}
    sesoi = 100.0 * (1 - 10 ** (-0.05))  # 0.5 dB at none's mean recon_mean (100)
    assert table["sesoi"].tolist() == pytest.approx([sesoi, sesoi])
    for _, row in table.iterrows():
        on = row["cell"] == ALL
        ref = np.array(RECON[on])
        p, _, _ = ttost_paired(ref + np.array(shift[on]), ref, -sesoi, sesoi)
        assert row["p_tost"] == pytest.approx(p)
        assert row["answer"] == E.AGREE
    assert E.equivalent(table)


def test_a_shift_beyond_the_sesoi_is_not_shown_equivalent():
    table = E.equivalence_table(study(), study({False: [12.0, 14.0, 13.0], True: [0.1, -0.1, 0.0]}))
    answers = dict(zip(table["cell"], table["answer"]))
    assert answers == {"none": E.DIFFER, ALL: E.AGREE}
    assert not E.equivalent(table)


def test_identical_runs_agree_and_a_single_pair_is_no_test():
    assert E.equivalent(E.equivalence_table(study(), study()))
    single = E.equivalence_table(study(seeds=(0,)), study(seeds=(0,), shift={False: [1.0], True: [1.0]}))
    assert set(single["answer"]) == {E.NO_TEST} and not E.equivalent(single)


def test_only_seeds_in_both_studies_are_paired():
    candidate = study(seeds=(1, 2, 5))
    table = E.equivalence_table(study(), candidate)
    assert table["pairs"].tolist() == [2, 2]


def test_the_cli_writes_equivalence_md_and_exits_2_on_a_missing_study(tmp_path, capsys):
    assert E.main([str(tmp_path / "nothing"), str(tmp_path / "nothing-either")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_markdown_states_the_verdict_and_every_row(tmp_path):
    table = E.equivalence_table(study(), study({False: [12.0, 14.0, 13.0], True: [0.1, -0.1, 0.0]}))
    text = E.render_markdown(tmp_path / "fp32", tmp_path / "bf16", table)
    assert "**Verdict: not shown to be equivalent** (1 of 2 rows agree)" in text
    assert text.count("| Lower reconstruction loss |") == 2
    assert "No primary metric" in E.render_markdown(tmp_path / "a", tmp_path / "b", E.equivalence_table(
        study().assign(recon_mean=np.nan), study()))
