"""Are two studies' runs interchangeable? Part A's bf16-vs-fp32 check, for any one setting that differs.

    python -m ablation.equivalence results/cifar10-5k/a-none-vs-all results/cifar10-5k/a-bf16
    make study-5k-a-bf16          # trains the bf16 runs, then runs this

The rule, fixed before the candidate's runs are looked at:
- for each claim's primary metric (ablation.verdicts.CLAIMS) and each regularizer cell that both
  studies hold, the candidate − reference difference is paired by seed over the seeds both hold;
- the two agree on it when the 90% CI of that difference lies within ±SESOI (TOST p < 0.05, each
  side at 5%), with the claim's SESOI resolved at the reference study's `none` runs; paired
  differences that are all exactly zero agree as well;
- the studies are equivalent when every (metric, cell) measured in both agrees. Fewer than two pairs,
  or a SESOI that cannot be resolved, leaves the answer "not shown".

Writes <candidate>/equivalence.md and prints it. Exit code 0: equivalent; 1: not shown; 2: bad input.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from .collect import collect_study, is_study_dir
from .report import md_table, num, pvalue
from .runio import atomic_write_text
from .stats import ALPHA, cell_mask, difference, normalize, values
from .verdicts import CLAIMS

AGREE, DIFFER, NO_TEST = "agree", "not shown", "no test"


def _cells(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Included runs by regularizer cell (their `combo`)."""
    runs = normalize(runs)
    runs = runs[runs["included"]]
    return {str(combo): cell for combo, cell in runs.groupby("combo", sort=True)}


def equivalence_table(reference: pd.DataFrame, candidate: pd.DataFrame) -> pd.DataFrame:
    """One row per (claim primary, cell) measured in both studies: the paired candidate − reference difference,
    its 90% CI, the SESOI, TOST p and whether they agree (see the module docstring)."""
    ref_cells, cand_cells = _cells(reference), _cells(candidate)
    baseline = normalize(reference)
    baseline = baseline[baseline["included"] & cell_mask(baseline, on=False)]
    rows = []
    for claim in CLAIMS:
        delta = claim.sesoi.resolve(baseline)
        for combo in sorted(set(ref_cells) & set(cand_cells)):
            ref, cand = ref_cells[combo], cand_cells[combo]
            seeds = set(ref["seed"]) & set(cand["seed"])
            ref, cand = ref[ref["seed"].isin(seeds)], cand[cand["seed"].isin(seeds)]
            if values(ref, claim.primary).isna().all() or values(cand, claim.primary).isna().all():
                continue
            diff = difference(ref, cand, claim.primary)
            low, high = diff.ci(2 * ALPHA)
            p = diff.tost(-delta, delta) if math.isfinite(delta) else math.nan
            identical = diff.paired and diff.note.startswith("no seed-to-seed") and diff.estimate == 0
            if identical or p < ALPHA:
                answer = AGREE
            elif not diff.testable or not math.isfinite(delta):
                answer = NO_TEST
            else:
                answer = DIFFER
            rows.append({"metric": claim.primary, "claim": claim.title, "cell": combo, "pairs": diff.n_none,
                         "reference_mean": float(values(ref, claim.primary).mean()),
                         "candidate_mean": float(values(cand, claim.primary).mean()),
                         "difference": diff.estimate, "ci90_low": low, "ci90_high": high, "sesoi": delta,
                         "p_tost": p, "answer": answer})
    return pd.DataFrame(rows)


def equivalent(table: pd.DataFrame) -> bool:
    """The studies' verdict: every row agrees (and there is at least one row)."""
    return bool(len(table)) and bool((table["answer"] == AGREE).all())


def render_markdown(reference: Path, candidate: Path, table: pd.DataFrame) -> str:
    if table.empty:
        return f"# Equivalence: {candidate.name} vs {reference.name}\n\nNo primary metric is measured in a cell " \
               f"of both studies.\n"
    shown = table.assign(**{
        "reference": [num(x) for x in table["reference_mean"]], "candidate": [num(x) for x in table["candidate_mean"]],
        "candidate − reference (90% CI)": [f"{num(d, sign=True)} [{num(lo, sign=True)}, {num(hi, sign=True)}]"
                                           for d, lo, hi in zip(table["difference"], table["ci90_low"],
                                                                table["ci90_high"])],
        "±SESOI": [num(x) for x in table["sesoi"]], "TOST p": [pvalue(p) for p in table["p_tost"]]})
    columns = ["claim", "metric", "cell", "pairs", "reference", "candidate", "candidate − reference (90% CI)",
               "±SESOI", "TOST p", "answer"]
    verdict = "equivalent" if equivalent(table) else "not shown to be equivalent"
    return "\n".join([
        f"# Equivalence: {candidate.name} vs {reference.name}", "",
        f"Reference `{reference}`, candidate `{candidate}`. Rule (`ablation/equivalence.py`): each claim's primary "
        "metric, per regularizer cell, paired by seed; the two agree when the 90% CI of candidate − reference lies "
        "within ±SESOI (TOST p < 0.05), the SESOI resolved at the reference's `none` runs. Equivalent when every "
        "row agrees.", "",
        f"**Verdict: {verdict}** ({int((table['answer'] == AGREE).sum())} of {len(table)} "
        "rows agree).", "",
        md_table(shown[columns]), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablation.equivalence", description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path, help="the study the candidate must match (e.g. the fp32 runs)")
    parser.add_argument("candidate", type=Path, help="the study that differs in one setting (e.g. bf16)")
    args = parser.parse_args(argv)
    for study_dir in (args.reference, args.candidate):
        if not is_study_dir(study_dir):
            print(f"error: {study_dir} holds no run directories; pass a study directory such as "
                  f"results/cifar10-5k/a-none-vs-all", file=sys.stderr)
            return 2
    reference, _ = collect_study(args.reference)
    candidate, _ = collect_study(args.candidate)
    table = equivalence_table(reference, candidate)
    text = render_markdown(args.reference, args.candidate, table)
    atomic_write_text(args.candidate / "equivalence.md", text)
    print(text)
    return 0 if equivalent(table) else 1


if __name__ == "__main__":
    sys.exit(main())
