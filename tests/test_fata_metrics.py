"""FATA's SR, CER, CBR and K_prac (arXiv 2609.39134 eq. 5-8) computed from hand-built records."""
import pytest

from robustvtc.campaign.metrics import fata_metrics, frame, practical_budget


def _rec(sample, attack, comp, budget, correct, clean, full, clean_full):
    return {"sample": sample, "attack": attack, "eps": 0.0 if attack == "clean" else 0.01, "compressor": comp,
            "budget": budget, "defense": "none", "adaptive": False, "correct": correct, "clean_correct": clean,
            "full_token_correct": full, "clean_full_token_correct": clean_full, "kept_overlap": None,
            "rank_spearman": None, "rank_kendall": None, "kept_disruption": None, "linf": 0.0, "l2": 0.0,
            "seconds": 0.0}


def test_sr_cer_cbr_and_k_prac_by_hand():
    rows = []
    # clean: full 4/4; budget 8: 2/4 (50 % < 80 %), budget 16: 4/4 (100 %) -> K_prac = 16
    for i in range(4):
        rows.append(_rec(i, "clean", "none", 32, 1, 1, 1, 1))
        rows.append(_rec(i, "clean", "c", 8, int(i < 2), int(i < 2), 1, 1))
        rows.append(_rec(i, "clean", "c", 16, 1, 1, 1, 1))
    # attack: full-token correct on samples 0, 1, 2 (SR = 3/4); at K=16 correct only on sample 0
    full_ok = [1, 1, 1, 0]
    for i in range(4):
        rows.append(_rec(i, "fata", "none", 32, full_ok[i], 1, full_ok[i], 1))
        rows.append(_rec(i, "fata", "c", 16, int(i == 0), 1, full_ok[i], 1))
        rows.append(_rec(i, "fata", "c", 8, 0, int(i < 2), full_ok[i], 1))
    df = frame(rows)
    assert practical_budget(df, "c") == 16
    table = fata_metrics(df, {"fata": "stealth"})
    row = table.iloc[0]
    assert (row["k_prac"], row["sr"], row["cer"]) == (16, 0.75, 0.75)
    # CBR: eligible = clean@full & fata@full & clean@16 -> samples 0, 1, 2; wrong at 16: 1, 2 -> 2/3
    assert row["cbr_n"] == 3 and row["cbr"] == pytest.approx(2 / 3)
    assert row["cbr_low"] < row["cbr"] < row["cbr_high"] and row["role"] == "stealth"
