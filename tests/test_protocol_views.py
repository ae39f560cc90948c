"""Protocol views on hand-built records: VTC-Bench's difficulty split and UniPruneBench's ratio table; the shipped
protocol scenarios validate."""
from __future__ import annotations

import pandas as pd
import pytest

from robustvtc.campaign import views
from robustvtc.campaign.scenario import load_scenario


def records(rows):
    return pd.DataFrame([{"defense": "none", "adaptive": False, "eps": 0.0 if a == "clean" else 4 / 255,
                          "sample": s, "attack": a, "compressor": c, "budget": b, "correct": ok}
                         for s, a, c, b, ok in rows])


def test_difficulty_follows_vtc_bench_groups():
    rows = []
    # samples 0-3 solved by the full model; 4 not (left out of both groups)
    for s, full, pool, method, adv in [(0, 1, 1, 1, 0), (1, 1, 1, 0, 0), (2, 1, 0, 1, 1), (3, 1, 0, 0, 1),
                                       (4, 0, 1, 1, 1)]:
        rows += [(s, "clean", "none", 144, full), (s, "clean", "pooling", 16, pool),
                 (s, "clean", "fastv", 16, method), (s, "cage", "fastv", 16, adv), (s, "cage", "none", 144, 0),
                 (s, "cage", "pooling", 16, 0)]
    table = views.difficulty(records(rows))
    clean = table.loc[("clean", "fastv", 16)]
    assert (clean["easy n"], clean["easy %"], clean["difficult n"], clean["difficult %"]) == (2, 50.0, 2, 50.0)
    attacked = table.loc[("cage 4/255", "fastv", 16)]  # membership stays the clean images'
    assert (attacked["easy n"], attacked["easy %"], attacked["difficult %"]) == (2, 0.0, 100.0)
    assert ("clean", "pooling", 16) not in table.index and "difficulty" in views.VIEWS
    assert views.difficulty(records([(0, "clean", "none", 144, 1), (0, "clean", "fastv", 16, 1)])).empty


def test_uniprunebench_columns_are_pruning_ratios():
    rows = [(s, "clean", "none", 144, 1) for s in range(3)]
    rows += [(s, "clean", "random", b, int(s < k)) for s in range(3) for b, k in ((48, 3), (32, 2), (16, 1))]
    table = views.uniprunebench(records(rows))
    row = table.loc[("clean", "random")]
    assert list(table.columns) == ["stage", "66.7% (K=48)", "77.8% (K=32)", "88.9% (K=16)", "mean", "unpruned"]
    assert (row["66.7% (K=48)"], row["88.9% (K=16)"], row["mean"], row["unpruned"], row["stage"]) == (
        100.0, 33.3, 66.7, 100.0, "pre_llm")


@pytest.mark.parametrize("name,budgets", [("uniprunebench", (48, 32, 16)), ("vtc_bench", (36, 16, 9))])
def test_protocol_scenarios_are_shipped(name, budgets):
    s = load_scenario(name)
    assert s.budgets == budgets and "pooling" in s.compressors
