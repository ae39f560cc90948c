"""Text views of a campaign's records: the tables ``robustvtc report DIR --view NAME`` prints.

Every table the toolkit shows is computed here or in :mod:`.metrics` from a campaign's records -- the
clean accuracy grid, the accuracy per question type, the attack table, the verdict -- so a new attack,
compressor or data set appears in all of them without new code.
"""
from __future__ import annotations

from typing import Callable, Mapping

import pandas as pd

from . import metrics
from .formatting import format_eps
from .records import CLEAN, NONE

ALL_TOKENS = "all tokens"


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Undefended, non-adaptive records: what a deployment without defenses sees."""
    return df[(df["defense"] == NONE) & ~df["adaptive"].astype(bool)]


def _percent(table: pd.DataFrame) -> pd.DataFrame:
    return (100 * table).round(1)


def accuracy(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """Clean accuracy (%): rows compressor, columns budget (the uncompressed model at its token count)."""
    clean = _plain(df)[_plain(df)["attack"] == CLEAN]
    return _percent(clean.pivot_table(index="compressor", columns="budget", values="correct", aggfunc="mean"))


def by_type(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """Clean accuracy (%) per question type: rows compressor x budget, columns the types and "all"."""
    clean = _plain(df)[_plain(df)["attack"] == CLEAN]
    if "qtype" not in clean or clean["qtype"].isna().all():
        clean = clean.assign(qtype="all")
    table = clean.pivot_table(index=["compressor", "budget"], columns="qtype", values="correct", aggfunc="mean")
    table["all"] = clean.groupby(["compressor", "budget"])["correct"].mean()
    return _percent(table)


def attacks(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """Accuracy (%) under every attack and ε, no defense: rows attack (clean first), columns compressor@budget
    and "all tokens". A stealth attack also gets a "(full tokens)" row: its images on the uncompressed model,
    which a stealthy attack leaves high while its own row drops."""
    roles = metrics.attack_roles(list(df["attack"].unique()), manifest)
    plain = _plain(df)
    rows = []
    for (attack, eps), g in plain.groupby(["attack", "eps"], sort=False):
        label = attack if attack == CLEAN else f"{attack} {format_eps(eps)}"
        rows.append(_row(label, g, "correct"))
        if roles.get(attack) == "stealth":
            compressed = g[g["compressor"] != NONE]
            rows.append(_row(f"{label} (full tokens)", compressed, "full_token_correct", full_column=False))
    table = pd.DataFrame(rows).set_index("attack")
    order = [c for c in _columns(plain) if c in table.columns]
    table = table[order]
    return table.loc[sorted(table.index, key=lambda r: (r != CLEAN, r))]


def _columns(df: pd.DataFrame) -> list[str]:
    cells = df[df["compressor"] != NONE][["compressor", "budget"]].drop_duplicates().sort_values(["compressor",
                                                                                                   "budget"])
    return [f"{c}@{b}" for c, b in cells.itertuples(index=False)] + [ALL_TOKENS]


def _row(label: str, g: pd.DataFrame, value: str, full_column: bool = True) -> dict:
    row = {"attack": label}
    for (compressor, budget), cell in g.groupby(["compressor", "budget"]):
        if compressor == NONE and not full_column:
            continue
        row[ALL_TOKENS if compressor == NONE else f"{compressor}@{budget}"] = round(100 * cell[value].mean(), 1)
    return row


def verdict(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """The verdict table (per ε x compressor x budget: clean, baseline, aligned accuracy and the paired gap)."""
    roles = metrics.attack_roles(list(df["attack"].unique()), manifest)
    return metrics.verdict(df, roles)["table"]


VIEWS: dict[str, Callable[[pd.DataFrame, Mapping | None], pd.DataFrame]] = {
    "accuracy": accuracy, "by-type": by_type, "attacks": attacks, "verdict": verdict,
}
