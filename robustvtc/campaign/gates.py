"""CI gates on campaign records: PASS, FAIL or INCONCLUSIVE, decided on confidence bounds.

Each gate is a family of requirements, one per cell; a cell's requirement holds when its whole interval
meets it (:func:`robustvtc.stats.decide`) and the family's intervals are Bonferroni-adjusted, so the
chance that any cell is misjudged stays below 1 - level. The gate fails when any cell fails, passes when
every cell passes, and is otherwise inconclusive -- with the number of samples that would likely decide
the cell that blocks it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .. import stats
from .formatting import format_eps
from .metrics import CELL, WORST_CASE_CELL, worst_per_sample


@dataclass
class GateResult:
    """A gate's outcome, the per-cell table it decided on and the one line that explains it."""

    gate: str
    outcome: str
    message: str
    level: float
    cell_level: float
    correction: str
    cells: pd.DataFrame = field(repr=False)

    def as_dict(self) -> dict:
        return {"gate": self.gate, "outcome": self.outcome, "message": self.message, "level": self.level,
                "cell_level": self.cell_level, "correction": self.correction,
                "cells": self.cells.to_dict(orient="records")}


def _where(row: pd.Series, keys) -> str:
    return ", ".join(f"{k}={format_eps(row[k]) if k == 'eps' else row[k]}" for k in keys)


def _needed(n: int | None) -> str:
    return ("no realistic sample size decides it at the observed value" if n is None
            else f"about {n} samples would likely decide it if the observed value held")


def robustness_gate(df: pd.DataFrame, min_accuracy: float, level: float = stats.DEFAULT_LEVEL) -> GateResult:
    """Every cell's worst-case robust accuracy (per sample: correct under every attack at that ε) must be
    >= ``min_accuracy`` (a fraction). Without attack records the clean accuracy is gated."""
    attacked = df[df["attack"] != "clean"]
    source = attacked if not attacked.empty else df
    what = "worst-case robust accuracy" if not attacked.empty else "clean accuracy"
    per_sample = worst_per_sample(source)
    rows = [{**dict(zip(WORST_CASE_CELL, key)), "n": len(g), "correct": int(g["correct"].sum())}
            for key, g in per_sample.groupby(WORST_CASE_CELL, sort=True)]
    cells = pd.DataFrame(rows)
    cell_level = stats.family_level(level, len(cells))
    bounds = [stats.clopper_pearson(r.correct, r.n, cell_level) for r in cells.itertuples()]
    cells["accuracy"] = cells["correct"] / cells["n"]
    cells["ci_low"], cells["ci_high"] = [b[0] for b in bounds], [b[1] for b in bounds]
    cells["outcome"] = [stats.decide(lo, hi, min_accuracy, "at_least") for lo, hi in bounds]
    outcome = stats.combine(list(cells["outcome"]))
    bar = f"{100 * min_accuracy:g} %"
    family = (f"{100 * level:g} % confidence, {stats.CORRECTION} over {len(cells)} cells (each at "
              f"{100 * cell_level:.3g} %)")

    def shown(row) -> str:
        return (f"{100 * row['accuracy']:.1f} % (CI {100 * row['ci_low']:.1f}–{100 * row['ci_high']:.1f} %) at "
                f"{_where(row, WORST_CASE_CELL)}")
    if outcome == stats.FAIL:
        row = cells[cells["outcome"] == stats.FAIL].sort_values("ci_high").iloc[0]
        message = f"{what} {shown(row)} is below {bar} with {family}"
    elif outcome == stats.PASS:
        row = cells.sort_values("ci_low").iloc[0]
        message = f"{what} >= {bar} in every cell; lowest {shown(row)}, {family}"
    else:
        row = cells[cells["outcome"] == stats.INCONCLUSIVE].sort_values("accuracy").iloc[0]
        n = stats.samples_to_decide_accuracy(int(row["correct"]), int(row["n"]), min_accuracy, "at_least",
                                             cell_level)
        message = f"{what} {shown(row)} straddles {bar} with {family}; {_needed(n)}"
    return GateResult("fail-under", outcome, message, level, cell_level, stats.CORRECTION, cells)


def comparison_gate(a: pd.DataFrame, b: pd.DataFrame, max_drop: float,
                    level: float = stats.DEFAULT_LEVEL) -> GateResult:
    """In every cell both campaigns share, robust accuracy of ``b`` may be at most ``max_drop`` (a fraction)
    below ``a``. Samples with the same id in both are paired (Newcombe's paired interval); a cell whose
    samples differ is compared as two independent samples."""
    rows = []
    b_cells = b.groupby(CELL, sort=True)
    for key, ga in a.groupby(CELL, sort=True):
        try:
            gb = b_cells.get_group(key)
        except KeyError:
            continue
        sa, sb = ga.groupby("sample")["correct"].min(), gb.groupby("sample")["correct"].min()
        common = sa.index.intersection(sb.index)
        paired = len(common) == len(sa) == len(sb)
        if paired:
            counts = stats.PairedCounts.of(sa[common], sb[common])
        rows.append({**dict(zip(CELL, key)), "n_a": len(sa), "n_b": len(sb), "paired": paired,
                     "accuracy_a": float(sa.mean()), "accuracy_b": float(sb.mean()),
                     "drop": float(sa.mean() - sb.mean()), "_counts": counts if paired else None,
                     "_k": (int(sa.sum()), len(sa), int(sb.sum()), len(sb))})
    cells = pd.DataFrame(rows)
    if cells.empty:
        return GateResult("fail-drop", stats.INCONCLUSIVE, "the campaigns share no cell", level, level,
                          stats.CORRECTION, cells)
    cell_level = stats.family_level(level, len(cells))
    bounds = [stats.paired_difference_ci(r["_counts"], cell_level) if r["paired"]
              else stats.independent_difference_ci(*r["_k"], level=cell_level) for _, r in cells.iterrows()]
    cells["ci_low"], cells["ci_high"] = [x[0] for x in bounds], [x[1] for x in bounds]
    cells["outcome"] = [stats.decide(lo, hi, max_drop, "at_most") for lo, hi in bounds]
    outcome = stats.combine(list(cells["outcome"]))
    family = (f"{100 * level:g} % confidence, {stats.CORRECTION} over {len(cells)} cells (each at "
              f"{100 * cell_level:.3g} %)")
    limit = f"{100 * max_drop:g} points"

    def shown(row) -> str:
        kind = "paired" if row["paired"] else "unpaired"
        return (f"{row['attack']} on {row['compressor']}@{row['budget']} (ε {format_eps(row['eps'])}, defense "
                f"{row['defense']}) dropped {100 * row['drop']:+.1f} points ({kind} CI {100 * row['ci_low']:+.1f} to "
                f"{100 * row['ci_high']:+.1f})")
    if outcome == stats.FAIL:
        row = cells[cells["outcome"] == stats.FAIL].sort_values("ci_low", ascending=False).iloc[0]
        message = f"{shown(row)}: more than {limit} with {family}"
    elif outcome == stats.PASS:
        row = cells.sort_values("ci_high", ascending=False).iloc[0]
        message = f"no cell dropped more than {limit}; largest {shown(row)}, {family}"
    else:
        row = cells[cells["outcome"] == stats.INCONCLUSIVE].sort_values("drop", ascending=False).iloc[0]
        n = (stats.samples_to_decide_paired(row["_counts"], max_drop, "at_most", cell_level) if row["paired"]
             else None)
        message = f"{shown(row)} straddles {limit} with {family}; " + (
            _needed(n) if row["paired"] else "more samples in both campaigns would decide it")
    cells = cells.drop(columns=["_counts", "_k"])
    return GateResult("fail-drop", outcome, message, level, cell_level, stats.CORRECTION, cells)
