"""Campaign metrics on hand-made records whose answers are known: gap, CSFR, ASR, worst case, CIs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustvtc.campaign import metrics as M
from robustvtc.campaign.gates import comparison_gate

EPS = 8 / 255
N = 40


def rec(sample, attack, compressor, budget, correct, clean_correct=True, full_token_correct=True, defense="none",
        adaptive=False, **extra):
    return {"sample": sample, "attack": attack, "eps": 0.0 if attack == "clean" else EPS, "compressor": compressor,
            "budget": budget, "defense": defense, "adaptive": adaptive, "correct": correct,
            "clean_correct": clean_correct, "full_token_correct": full_token_correct, "kept_overlap": None,
            "rank_spearman": extra.get("rank", None), "rank_kendall": extra.get("rank", None),
            "kept_disruption": None, "linf": 0.0 if attack == "clean" else EPS, "l2": 1.0, "seconds": 0.5}


@pytest.fixture(scope="module")
def df():
    """40 samples, all right when clean. On visionzip@16: fulltoken leaves 30 right (75 %), cage 10 (25 %):
    a 50-point gap. On the full-token model both attacks leave 36 right. CSFR of cage on visionzip@16:
    samples 10..35 are wrong compressed but right with all tokens -> 26/40."""
    rows = []
    for s in range(N):
        rows += [rec(s, "clean", "none", 144, True), rec(s, "clean", "visionzip", 16, True)]
        rows += [rec(s, "fulltoken", "visionzip", 16, s < 30, full_token_correct=s < 36, rank=0.9),
                 rec(s, "fulltoken", "none", 144, s < 36, full_token_correct=s < 36, rank=0.9),
                 rec(s, "cage", "visionzip", 16, s < 10, full_token_correct=s < 36, rank=0.5 + (s % 2) * 0.2),
                 rec(s, "cage", "none", 144, s < 36, full_token_correct=s < 36, rank=0.5 + (s % 2) * 0.2)]
    return M.frame(rows)


def cell(table, **where):
    mask = np.ones(len(table), dtype=bool)
    for key, value in where.items():
        mask &= table[key] == value
    assert mask.sum() == 1, where
    return table[mask].iloc[0]


def test_summary_accuracy_asr_csfr(df):
    s = M.summary(df)
    cage = cell(s, attack="cage", compressor="visionzip")
    assert cage["robust_accuracy"] == pytest.approx(0.25) and cage["clean_accuracy"] == 1.0
    assert cage["attack_success_rate"] == pytest.approx(0.75)
    assert cage["csfr"] == pytest.approx(26 / 40)
    full = cell(s, attack="fulltoken", compressor="none")
    assert np.isnan(full["csfr"]) and full["robust_accuracy"] == pytest.approx(0.9)
    for _, row in s.iterrows():  # the CI brackets the mean
        assert row["ci_low"] <= row["robust_accuracy"] <= row["ci_high"]
    assert cage["ci_high"] - cage["ci_low"] > 0.1  # 40 samples: a wide interval, not a point


def test_overestimation_gap_is_paired_and_bracketed(df):
    gap = M.overestimation_gap(df)
    vz = cell(gap, compressor="visionzip", budget=16)
    assert vz["gap"] == pytest.approx(0.5) and vz["fulltoken_accuracy"] == pytest.approx(0.75)
    assert vz["ci_low"] <= 0.5 <= vz["ci_high"] and vz["ci_low"] > 0.3
    assert vz["p_value"] < 1e-5  # 20 discordant pairs, all one way
    full = cell(gap, compressor="none")
    # identical outcomes: a zero gap whose score interval does not collapse to a point
    assert full["gap"] == 0 and full["ci_low"] < 0 < full["ci_high"] and full["p_value"] == 1.0
    assert M.overestimation_gap(df, baseline="fulltoken", aligned="nope").empty


def test_worst_case_and_gate_value(df):
    worst = M.worst_case(df)
    vz = cell(worst, compressor="visionzip")
    assert vz["robust_accuracy"] == pytest.approx(0.25) and vz["attacks"] == "cage, fulltoken"
    value, where = M.min_robust_accuracy(df)
    assert value == pytest.approx(0.25) and where["compressor"] == "visionzip" and where["budget"] == 16
    clean_only = df[df["attack"] == "clean"]
    assert M.min_robust_accuracy(clean_only)[0] == 1.0


def test_ranking_counts_each_image_once(df):
    rank = M.ranking_stability(df)
    cage = cell(rank, attack="cage")
    assert cage["images"] == N and cage["spearman"] == pytest.approx(0.6)
    assert cage["spearman_low"] <= 0.6 <= cage["spearman_high"]
    assert cell(rank, attack="fulltoken")["spearman"] == pytest.approx(0.9)


def test_bootstrap_is_seeded_and_handles_edges():
    x = np.r_[np.ones(30), np.zeros(10)]
    assert M.bootstrap_ci(x, seed=1) == M.bootstrap_ci(x, seed=1)
    lo, hi = M.bootstrap_ci(x)
    assert lo < 0.75 < hi
    assert M.bootstrap_ci([1.0]) == (1.0, 1.0)
    assert all(np.isnan(M.bootstrap_ci([float("nan")])))


def test_compare_and_clean_table(df):
    worse = df.copy()
    worse.loc[(worse["attack"] == "cage") & (worse["compressor"] == "visionzip"), "correct"] = 0.0
    table = comparison_gate(df, worse, 0).cells  # what `robustvtc compare` shows: change = -drop
    assert -cell(table, attack="cage", compressor="visionzip")["drop"] == pytest.approx(-0.25)
    assert -cell(table, attack="fulltoken", compressor="none")["drop"] == 0
    clean = M.clean_accuracy(df)
    assert list(clean["accuracy"]) == [1.0, 1.0]


def test_perturbation_table(df):
    table = M.perturbation(df)
    assert set(table["attack"]) == {"cage", "fulltoken"}
    assert list(table["linf_max"]) == pytest.approx([EPS, EPS]) and list(table["seconds_per_sample"]) == [0.5, 0.5]


def test_load_records_errors(tmp_path):
    from robustvtc.errors import UserInputError

    with pytest.raises(UserInputError, match="no campaign results at"):
        M.load_records(tmp_path)
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(UserInputError, match="holds no records yet"):
        M.load_records(tmp_path)
    assert isinstance(M.frame([rec(0, "clean", "none", 144, True)]), pd.DataFrame)


def test_clopper_pearson_matches_scipy_and_summary_uses_it(df):
    from scipy.stats import binomtest

    from robustvtc import stats

    exact = binomtest(3, 10).proportion_ci(0.95, method="exact")
    assert stats.clopper_pearson(3, 10) == pytest.approx((exact.low, exact.high))
    assert stats.clopper_pearson(3, 10) == pytest.approx((0.06673951, 0.65245285), abs=1e-6)
    cage = cell(M.summary(df), attack="cage", compressor="visionzip")  # 10 / 40
    assert (cage["ci_low"], cage["ci_high"]) == pytest.approx(stats.clopper_pearson(10, 40))


def test_csfr_as_cira_defines_it():
    """4 samples on visionzip@16. Both paths right on the clean image: samples 0, 1, 2 (sample 3: the compressed
    clean answer is wrong). After the attack, wrong compressed and right with all tokens: samples 0 and 3.
    CIRA's CSFR counts only the eligible samples: 1 of 3; the all-samples rate: 2 of 4."""
    rows = []
    for s, (clean_ok, correct, full_ok) in enumerate([(True, False, True), (True, True, True), (True, False, False),
                                                     (False, False, True)]):
        rows += [rec(s, "clean", "none", 144, True), rec(s, "clean", "visionzip", 16, clean_ok)]
        rows.append(rec(s, "cage", "visionzip", 16, correct, clean_correct=clean_ok, full_token_correct=full_ok))
    table = M.summary(M.frame(rows))
    cage = cell(table, attack="cage")
    assert cage["csfr"] == pytest.approx(1 / 3) and cage["csfr_n"] == 3
    assert cage["compression_only_failure_rate"] == pytest.approx(2 / 4)
    assert cage["csfr_low"] <= 1 / 3 <= cage["csfr_high"]
    # the full-token clean answer counts too: sample 0 wrong with all tokens on the clean image -> not eligible
    rows[0]["correct"] = False
    cage = cell(M.summary(M.frame(rows)), attack="cage")
    assert cage["csfr"] == pytest.approx(0 / 2) and cage["csfr_n"] == 2
    # a record field wins over the join; old records without it fall back to the join (above)
    for r in rows:
        r["clean_full_token_correct"] = True
    assert cell(M.summary(M.frame(rows)), attack="cage")["csfr_n"] == 3


def test_verdict_sentence_and_family(df):
    roles = {"fulltoken": "baseline", "cage": "compression_aligned"}
    v = M.verdict(df, roles)
    table = v["table"]
    assert v["cells"] == 1 and v["family_level"] == pytest.approx(0.95) and v["missing"] is None
    vz = cell(table, compressor="visionzip")
    assert vz["significant"] and vz["gap"] == pytest.approx(0.5) and vz["clean_accuracy"] == 1.0
    assert vz["baseline"] == "fulltoken" and vz["aligned"] == "cage" and vz["aligned_accuracy"] == pytest.approx(0.25)
    assert not cell(table, compressor="none")["significant"]  # the reference cell is outside the family
    assert v["sentence"].startswith("Full-token testing overestimates robustness in 1 of 1 settings (largest +50.0 "
                                    "points at visionzip@16, ε=8/255")
    # no effect: the sentence claims none and names the detectable gap
    flat = df.copy()
    flat.loc[flat["attack"] == "cage", "correct"] = flat.loc[flat["attack"] == "fulltoken", "correct"].to_numpy()
    quiet = M.verdict(flat, roles)
    assert quiet["sentence"].startswith("No significant overestimation at this sample size (n = 40; smallest "
                                        "detectable gap ≈")
    assert 0 < quiet["detectable"] < 0.5
    # two compressed cells double the family: Bonferroni
    two = pd.concat([df, df[df["compressor"] == "visionzip"].assign(compressor="fastervlm")])
    assert M.verdict(two, roles)["family_level"] == pytest.approx(0.975)
    missing = M.verdict(df, {"fulltoken": "baseline", "cage": "other"})
    assert missing["table"].empty and missing["missing"] == missing["sentence"]
    assert missing["sentence"].startswith("No verdict: this campaign has no compression-aligned attack")


def test_attack_roles_from_manifest():
    manifest = {"attacks": {"mine": {"name": "cage"}, "base": {"name": "fulltoken"}}}
    assert M.attack_roles(["clean", "mine", "base", "odd"], manifest) == {
        "mine": "compression_aligned", "base": "baseline", "odd": "other"}
    assert M.attack_roles(["known_budget", "whitebox"]) == {"known_budget": "compression_aligned",
                                                              "whitebox": "whitebox"}


def test_kept_distortion_paired_wins():
    rows = []
    for s in range(10):
        rows.append({**rec(s, "fulltoken", "visionzip", 16, True), "kept_disruption": 0.2})
        rows.append({**rec(s, "cage", "visionzip", 16, True), "kept_disruption": 0.3 if s < 7 else 0.1})
    table = M.kept_distortion(M.frame(rows), {"fulltoken": "baseline", "cage": "compression_aligned"})
    cage = cell(table, attack="cage")
    assert cage["versus"] == "fulltoken" and cage["wins"] == pytest.approx(0.7)
    assert cage["mean"] == pytest.approx(0.24) and cage["ci_low"] < 0.24 < cage["ci_high"]
    base = cell(table, attack="fulltoken")
    assert base["ci_low"] == base["ci_high"] == pytest.approx(0.2) and np.isnan(base["wins"])
