"""Intervals against published values, and gates that decide PASS / FAIL / INCONCLUSIVE on confidence bounds."""
import json

import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.stats import binomtest

from robustvtc import stats
from robustvtc.campaign.gates import comparison_gate, robustness_gate
from robustvtc.cli import main


# ---------------------------------------------------------------------------------------------- intervals
@pytest.mark.parametrize("k,n", [(0, 8), (3, 10), (8, 8), (13, 32), (95, 100)])
def test_clopper_pearson_and_wilson_match_scipy(k, n):
    exact = binomtest(k, n).proportion_ci(method="exact")
    score = binomtest(k, n).proportion_ci(method="wilson")
    assert stats.clopper_pearson(k, n) == pytest.approx((exact.low, exact.high), abs=1e-9)
    assert stats.wilson(k, n) == pytest.approx((score.low, score.high), abs=1e-9)


def test_newcombe_intervals_match_published_examples():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017): Cavo et al. (2012)
    # paired table [[59, 6], [16, 80]] -> -0.0621 (95 % CI -0.1186 to -0.0046), Newcombe square-and-add;
    # Perondi et al. (2004) independent table [[7, 27], [1, 33]] -> 0.1765 (0.0189 to 0.3404), hybrid score
    low, high = stats.paired_difference_ci(stats.PairedCounts(59, 6, 16, 80))
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    low, high = stats.independent_difference_ci(7, 34, 1, 34)
    assert (round(low, 4), round(high, 4)) == (0.0189, 0.3404)


def test_paired_interval_does_not_collapse_when_every_pair_agrees():
    # a bootstrap of eight tied pairs says [0, 0]; eight samples cannot rule out a 30-point difference
    low, high = stats.paired_difference_ci(stats.PairedCounts.of([1] * 8, [1] * 8))
    assert low == pytest.approx(-high) and 0.3 < high < 0.35
    assert stats.mcnemar_exact(stats.PairedCounts(5, 0, 0, 3)) == 1.0
    assert stats.mcnemar_exact(stats.PairedCounts(0, 6, 0, 0)) == pytest.approx(2 * 0.5 ** 6)


def test_decisions_and_sample_size_projection():
    assert stats.decide(0.61, 0.9, 0.6, "at_least") == stats.PASS
    assert stats.decide(0.2, 0.59, 0.6, "at_least") == stats.FAIL
    assert stats.decide(0.5, 0.7, 0.6, "at_least") == stats.INCONCLUSIVE
    assert stats.decide(-0.1, 0.04, 0.05, "at_most") == stats.PASS
    assert stats.decide(0.06, 0.2, 0.05, "at_most") == stats.FAIL
    assert stats.combine([stats.PASS, stats.INCONCLUSIVE]) == stats.INCONCLUSIVE
    assert stats.combine([stats.PASS, stats.FAIL, stats.INCONCLUSIVE]) == stats.FAIL
    # 6 / 8 against a 60 % bar is undecided; the projection is the first n whose interval clears the bar
    n = stats.samples_to_decide_accuracy(6, 8, 0.6, "at_least")
    assert stats.decide(*stats.clopper_pearson(round(0.75 * n), n), 0.6, "at_least") == stats.PASS
    assert stats.decide(*stats.clopper_pearson(round(0.75 * (n - 1)), n - 1), 0.6, "at_least") != stats.PASS
    assert stats.samples_to_decide_accuracy(6, 10, 0.6, "at_least") is None  # exactly at the bar: never
    assert stats.family_level(0.95, 10) == pytest.approx(0.995)


# ---------------------------------------------------------------------------------------------- gates on records
def records(cells: dict, n: int, attacks=("fulltoken", "cage")) -> pd.DataFrame:
    """Records with, per (compressor, budget), the first ``k`` samples correct under every attack."""
    rows = []
    for (compressor, budget), k in cells.items():
        for attack in ("clean", *attacks):
            for s in range(n):
                correct = float(attack == "clean" or s < k)
                rows.append({"sample": f"s{s}", "qtype": "color", "attack": attack,
                             "eps": 0.0 if attack == "clean" else 4 / 255, "steps": 0 if attack == "clean" else 10,
                             "compressor": compressor, "budget": budget, "defense": "none", "adaptive": False,
                             "correct": correct, "clean_correct": 1.0, "full_token_correct": correct,
                             "clean_full_token_correct": 1.0, "flagged": None, "kept_overlap": None,
                             "rank_spearman": None, "rank_kendall": None, "kept_disruption": None,
                             "linf": 0.0, "l2": 0.0, "seconds": 0.0})
    return pd.DataFrame(rows)


def test_robustness_gate_three_outcomes_and_family_correction():
    wide = robustness_gate(records({("none", 144): 30, ("visionzip", 16): 29}, 32), 0.5)
    assert wide.outcome == stats.PASS and "Bonferroni over 2 cells" in wide.message
    assert wide.cell_level == pytest.approx(0.975)
    low = robustness_gate(records({("none", 144): 30, ("visionzip", 16): 3}, 32), 0.5)
    assert low.outcome == stats.FAIL and "visionzip" in low.message
    close = robustness_gate(records({("none", 144): 30, ("visionzip", 16): 18}, 32), 0.5)
    assert close.outcome == stats.INCONCLUSIVE and "samples would likely decide it" in close.message
    # the same observed 75 % passes a 60 % bar at 32 samples only with enough of them
    assert robustness_gate(records({("none", 144): 24}, 32), 0.6).outcome == stats.INCONCLUSIVE
    assert robustness_gate(records({("none", 144): 300}, 400), 0.6).outcome == stats.PASS


def test_worst_case_counts_a_sample_wrong_under_any_attack():
    df = records({("visionzip", 16): 8}, 8)
    df.loc[(df["attack"] == "cage") & (df["sample"].isin(["s0", "s1", "s2", "s3", "s4", "s5"])), "correct"] = 0.0
    result = robustness_gate(df, 0.1)
    assert result.cells.iloc[0]["correct"] == 2 and result.cells.iloc[0]["n"] == 8


def test_comparison_gate_pairs_samples_and_decides_on_the_interval():
    base = records({("visionzip", 16): 20}, 24)
    same = comparison_gate(base, base, 0.05)
    assert same.outcome == stats.INCONCLUSIVE and same.cells["paired"].all()  # 24 ties cannot prove <= 5 points
    assert comparison_gate(base, base, 0.25).outcome == stats.PASS
    worse = records({("visionzip", 16): 2}, 24)
    assert comparison_gate(base, worse, 0.05).outcome == stats.FAIL
    other = records({("visionzip", 16): 2}, 24).assign(sample=lambda d: "t" + d["sample"])
    unpaired = comparison_gate(base, other, 0.05)
    assert not unpaired.cells["paired"].any() and unpaired.outcome == stats.FAIL


# ---------------------------------------------------------------------------------------------- the CLI's exit codes
@pytest.fixture
def campaign(tmp_path):
    def write(name, cells, n):
        folder = tmp_path / name
        folder.mkdir()
        rows = records(cells, n).to_dict(orient="records")
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(folder)
    return write


@pytest.mark.parametrize("bar,code,word", [("10", 0, "gate PASS"), ("95", 1, "gate FAIL"), ("60", 4, "gate INCONCLUSIVE")])
def test_report_gate_exit_codes(campaign, tmp_path, bar, code, word):
    folder = campaign("c", {("none", 144): 24, ("visionzip", 16): 20}, 32)
    res = CliRunner().invoke(main, ["report", folder, "-o", str(tmp_path / "r"), "--fail-under", bar])
    assert res.exit_code == code and word in res.output, res.output


def test_inconclusive_can_be_accepted_and_confidence_changes_the_decision(campaign, tmp_path):
    folder = campaign("c", {("none", 144): 24}, 32)
    args = ["report", folder, "-o", str(tmp_path / "r"), "--fail-under", "60"]
    assert CliRunner().invoke(main, args).exit_code == 4
    assert CliRunner().invoke(main, [*args, "--inconclusive", "pass"]).exit_code == 0
    assert CliRunner().invoke(main, [*args, "--confidence", "0.6"]).exit_code == 0  # 24/32: 66–82 % at 60 %, 57–89 % at 95 %


def test_compare_gate_exit_codes(campaign):
    good = campaign("good", {("visionzip", 16): 30}, 32)
    bad = campaign("bad", {("visionzip", 16): 2}, 32)
    assert CliRunner().invoke(main, ["compare", bad, good, "--fail-drop", "20"]).exit_code == 0  # B improved
    assert CliRunner().invoke(main, ["compare", bad, good, "--fail-drop", "0"]).exit_code == 4  # ties: CI ±11
    drop = CliRunner().invoke(main, ["compare", good, bad, "--fail-drop", "5"])
    assert drop.exit_code == 1 and "gate FAIL (fail-drop)" in drop.output and "paired CI" in drop.output
    same = CliRunner().invoke(main, ["compare", good, good, "--fail-drop", "5"])
    assert same.exit_code == 4 and "straddles 5 points" in same.output
