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


def _metric(df: pd.DataFrame) -> str:
    """The column a view averages: the benchmark's official ``score`` where the records carry one (hf data:
    VQA soft accuracy, ...), else ``correct``."""
    return "score" if "score" in df and df["score"].notna().all() and len(df) else "correct"


def accuracy(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """Clean accuracy (%): rows compressor, columns budget (the uncompressed model at its token count). On a
    benchmark (hf data) the benchmark's own metric: the mean ``score`` (VQA soft accuracy, ...)."""
    clean = _plain(df)[_plain(df)["attack"] == CLEAN]
    return _percent(clean.pivot_table(index="compressor", columns="budget", values=_metric(clean), aggfunc="mean"))


def benchmark(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """The benchmark's official figures (data source hf) per attack x ε x compressor x budget, no defense, from
    :func:`robustvtc.data.hf.aggregate`: TextVQA / VQAv2 / GQA score (%), POPE accuracy, precision, recall, F1 and
    yes-ratio (%), MME perception and cognition (points, sums of per-category acc + acc+). Empty without one."""
    preset = (((manifest or {}).get("scenario") or {}).get("data") or {}).get("preset")
    keys = ["attack", "eps", "compressor", "budget"]
    if not preset or "score" not in df:
        return pd.DataFrame(columns=keys).set_index(keys)
    from ..data.hf import aggregate  # after the check: its presets' scoring imports torch

    rows = []
    for key, g in _plain(df).groupby(keys, sort=True):
        records = [{"prediction": r["prediction"], "answers": [r["answer"]], "score": r["score"],
                    "question_id": r.get("question_id", r["sample"]), "category": r.get("category", preset)}
                   for r in g.to_dict("records")]
        figures = {k: v for k, v in aggregate(preset, records).items() if isinstance(v, (int, float))}
        if preset != "mme":  # fractions -> %; MME's scores are already points
            figures = {k: 100 * v for k, v in figures.items()}
        rows.append({**dict(zip(keys, key)), "n": len(g), **figures})
    table = pd.DataFrame(rows).set_index(keys)
    table[table.columns.drop("n")] = table[table.columns.drop("n")].round(1)
    return table.loc[sorted(table.index, key=lambda k: (k[0] != CLEAN, k))]


def by_type(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """Clean accuracy (%) per question type (POPE / MME: per category; the benchmark's score on hf data): rows
    compressor x budget, columns the types and "all"."""
    clean = _plain(df)[_plain(df)["attack"] == CLEAN]
    if "qtype" not in clean or clean["qtype"].isna().all():
        clean = clean.assign(qtype="all")
    value = _metric(clean)
    table = clean.pivot_table(index=["compressor", "budget"], columns="qtype", values=value, aggfunc="mean")
    table["all"] = clean.groupby(["compressor", "budget"])[value].mean()
    return _percent(table)


def attacks(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """Accuracy (%) under every attack and ε, no defense: rows attack (clean first), columns compressor@budget
    and "all tokens" (on hf data the benchmark's mean score). A stealth attack also gets a "(full tokens)" row: its images on the uncompressed model,
    which a stealthy attack leaves high while its own row drops."""
    roles = metrics.attack_roles(list(df["attack"].unique()), manifest)
    plain = _plain(df)
    rows = []
    for (attack, eps), g in plain.groupby(["attack", "eps"], sort=False):
        label = attack if attack == CLEAN else f"{attack} {format_eps(eps)}"
        rows.append(_row(label, g, _metric(plain)))
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


# ---------------------------------------------------------------------------------------------- protocols
DOWNSAMPLING = "pooling"
"""VTC-Bench's filter compressor. VTC-Bench (arXiv 2510.07143, ``tools/analyze_results.py``) downsamples the image
by an integer factor D (bicubic, ``(w // D, h // D)``) before a dynamic-resolution model's processor, which then
makes 1/D^2 of the tokens. A fixed-resolution model always makes N tokens, so its downsampling at budget K is the
D x D average pooling of its token grid (``pooling`` at K = N / D^2, UniPruneBench's ``Pool_PreLLM``)."""


def _sample_sets(clean: pd.DataFrame, compressor: str, budget: int | None = None) -> set:
    cell = clean[(clean["compressor"] == compressor) & ((clean["budget"] == budget) if budget is not None else True)]
    return set(cell.loc[cell["correct"].astype(bool), "sample"])


def difficulty(df: pd.DataFrame, manifest: Mapping | None = None, filter_compressor: str = DOWNSAMPLING
               ) -> pd.DataFrame:
    """VTC-Bench's difficulty split. Among the samples the uncompressed model answers correctly (clean), a sample
    is "easy" at budget K when the downsampling baseline (``pooling`` at K) also answers it correctly (their
    group B) and "difficult" otherwise (group A); each other compressor's accuracy (%) on each group at the same
    K -- on the clean images as VTC-Bench reports, and on each attack x ε's images (membership stays the clean
    one), no defense -- with the group sizes and 95 % Clopper-Pearson intervals. Empty without ``pooling``
    records. Correctness is the records' ``correct`` (on hf data: the benchmark score >= 0.5, VTC-Bench's rule
    for POPE / OCRBench / MME / MMStar)."""
    from ..stats import clopper_pearson

    keys = ["attack", "compressor", "budget"]
    plain = _plain(df)
    clean = plain[plain["attack"] == CLEAN]
    budgets = sorted(clean.loc[clean["compressor"] == filter_compressor, "budget"].unique())
    if not budgets:
        return pd.DataFrame(columns=keys).set_index(keys)
    solved = _sample_sets(clean, NONE)
    rows = []
    for (attack, eps, compressor, budget), g in plain.groupby(["attack", "eps", "compressor", "budget"], sort=True):
        if compressor in (NONE, filter_compressor) or budget not in budgets:
            continue
        easy = solved & _sample_sets(clean, filter_compressor, budget)
        groups = {"easy": easy, "difficult": solved - easy}
        row = {"attack": attack if attack == CLEAN else f"{attack} {format_eps(eps)}", "compressor": compressor,
               "budget": int(budget)}
        for name, members in groups.items():
            hit = g[g["sample"].isin(members)]["correct"].astype(bool)
            k, n = int(hit.sum()), int(len(hit))
            lo, hi = clopper_pearson(k, n) if n else (float("nan"), float("nan"))
            row.update({f"{name} n": n, f"{name} %": round(100 * k / n, 1) if n else float("nan"),
                        f"{name} 95% CI": f"{100 * lo:.0f}-{100 * hi:.0f}" if n else "-"})
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=keys).set_index(keys)
    table = pd.DataFrame(rows).set_index(keys)
    return table.loc[sorted(table.index, key=lambda k: (k[0] != CLEAN, k[0], k[2], k[1]))]


def uniprunebench(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """UniPruneBench's comparison table (arXiv 2511.02650): accuracy (%) per method at each pruning ratio
    1 - K/N (66.7 / 77.8 / 88.9 % for K = N/3, 2N/9, N/9, their keep ratios 0.333 / 0.222 / 0.111), with the
    unpruned model and each method's mean over the ratios; rows attack (clean first, as the benchmark reports)
    x method, with the method's stage. No defense."""
    from ..compression import COMPRESSORS

    plain = _plain(df)
    full = plain[plain["compressor"] == NONE]
    if full.empty:
        return pd.DataFrame()
    n = int(full["budget"].iloc[0])
    value = _metric(plain)
    rows = []
    for (attack, eps), g in plain.groupby(["attack", "eps"], sort=False):
        label = attack if attack == CLEAN else f"{attack} {format_eps(eps)}"
        unpruned = 100 * g[g["compressor"] == NONE][value].mean()
        for compressor, cells in g[g["compressor"] != NONE].groupby("compressor"):
            try:
                stage = COMPRESSORS.get(compressor).stage
            except Exception:  # noqa: BLE001 -- a plug-in label: its class is in the manifest, not the registry
                stage = ""
            row = {"attack": label, "method": compressor, "stage": stage}
            ratios = []
            for budget, cell in sorted(cells.groupby("budget")):
                column = f"{100 * (1 - budget / n):.1f}% (K={budget})"
                row[column] = round(100 * cell[value].mean(), 1)
                ratios.append(row[column])
            row["mean"] = round(sum(ratios) / len(ratios), 1)
            row["unpruned"] = round(unpruned, 1)
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).set_index(["attack", "method"])
    ratio_columns = sorted([c for c in table.columns if c.endswith(")")], key=lambda c: float(c.split("%")[0]))
    table = table[["stage", *ratio_columns, "mean", "unpruned"]]
    return table.loc[sorted(table.index, key=lambda k: (k[0] != CLEAN, k[0], -table.loc[k, "mean"]))]


def encoder(df: pd.DataFrame, manifest: Mapping | None = None) -> pd.DataFrame:
    """Encoder screening (:mod:`.encoder_report`): kept-token distortion per ε x compressor@budget x attack with
    its t interval, kept-set overlap, rank correlation, full-token distortion and paired wins over the baseline."""
    from .encoder_report import view

    return view(df, manifest)


VIEWS: dict[str, Callable[[pd.DataFrame, Mapping | None], pd.DataFrame]] = {
    "accuracy": accuracy, "by-type": by_type, "attacks": attacks, "verdict": verdict, "benchmark": benchmark,
    "difficulty": difficulty, "uniprunebench": uniprunebench, "encoder": encoder,
}
# the views an encoder-only campaign's records have (no question was asked: the accuracy views do not apply)
ENCODER_VIEWS = ("encoder",)
