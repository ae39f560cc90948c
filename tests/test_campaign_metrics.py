"""Campaign metrics on hand-made records whose answers are known: gap, CSFR, ASR, worst case, CIs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustvtc.campaign import metrics as M

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
    full = cell(gap, compressor="none")
    assert full["gap"] == 0 and full["ci_low"] == full["ci_high"] == 0  # identical outcomes: no uncertainty
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
    table = M.compare(df, worse)
    assert cell(table, attack="cage", compressor="visionzip")["change"] == pytest.approx(-0.25)
    assert cell(table, attack="fulltoken", compressor="none")["change"] == 0
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
