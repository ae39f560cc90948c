"""The figures of an encoder-only campaign (``mode: encoder``), from its records alone: the kept-token distortion
per compressor x budget with t intervals, the kept-set overlap, the rank correlation of the importance scores, the
full-token distortion, and per-image paired wins of each attack over the baseline. Torch-free.

Wins: on each image of a cell (ε x compressor x budget), whether the attack distorts the kept tokens more than the
strongest full-token baseline (the baseline with the highest mean there) does on the same image; the share of
images it wins (ties count as not won) with its Clopper--Pearson interval, and the two-sided sign test of wins
against losses (ties dropped), the exact binomial test McNemar's test reduces to.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd

from .. import stats
from . import metrics
from .formatting import Section, format_eps, paragraph, table_block

KIND = "encoder"
MEASURES = ("kept_disruption", "kept_overlap", "rank_spearman", "full_token_disruption")


def is_encoder_campaign(df: pd.DataFrame | None = None, manifest: Mapping | None = None) -> bool:
    """Whether the records (or the manifest's scenario) are an encoder-only campaign's."""
    mode = (((manifest or {}).get("scenario") or {}).get("mode"))
    if mode is not None:
        return mode == KIND
    return df is not None and "kind" in df and bool((df["kind"] == KIND).any())


def full_token(df: pd.DataFrame, level: float = stats.DEFAULT_LEVEL) -> pd.DataFrame:
    """Per ε x attack: the full-token distortion (all N tokens, one value per image: it does not depend on the
    compressor), t interval, with the perturbation norms and seconds to craft one image."""
    plain = metrics.attacked_plain(df)
    rows = []
    for (eps, attack), g in plain.groupby(["eps", "attack"], sort=True):
        per_image = g.drop_duplicates("sample")
        values = pd.to_numeric(per_image["full_token_disruption"], errors="coerce") \
            if "full_token_disruption" in per_image else pd.Series(dtype=float)
        lo, hi = stats.mean_ci(values, level)
        rows.append({"eps": eps, "attack": attack, "n": len(per_image),
                     "full": float(values.mean()) if values.notna().any() else float("nan"), "full_low": lo,
                     "full_high": hi, "linf": float(per_image["linf"].max()), "l2": float(per_image["l2"].mean()),
                     "seconds": float(per_image["seconds"].mean())})
    return pd.DataFrame(rows, columns=["eps", "attack", "n", "full", "full_low", "full_high", "linf", "l2",
                                       "seconds"])


def _interval(value: float, low: float, high: float, scale: float = 1.0, digits: int = 3,
              bounds: tuple[float, float] | None = None) -> str:
    """``value (low–high)``; ``bounds``: the range the measure lives in, the t interval clipped to it."""
    if pd.isna(value):
        return "–"
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    f = f"{{:.{digits}f}}"
    return f"{f.format(scale * value)} ({f.format(scale * low)}–{f.format(scale * high)})"


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The screening table as shown: ε, cell, attack, then each measure with its interval."""
    if table.empty:
        return pd.DataFrame(columns=["ε", "cell", "attack", "n"])
    rows = []
    for r in table.itertuples(index=False):
        rows.append({
            "ε": format_eps(r.eps), "cell": f"{r.compressor}@{r.budget}", "attack": r.attack, "n": int(r.n),
            "kept 1−cos (95% CI)": _interval(r.mean, r.ci_low, r.ci_high, bounds=(0, 2)),
            "overlap": _interval(r.overlap, r.overlap_low, r.overlap_high, digits=2, bounds=(0, 1)),
            "spearman": _interval(r.spearman, r.spearman_low, r.spearman_high, digits=2, bounds=(-1, 1)),
            "full 1−cos": _interval(r.full, r.full_low, r.full_high, bounds=(0, 2)),
            "wins %": ("–" if r.versus is None or pd.isna(r.wins) else
                       f"{100 * r.wins:.0f} ({100 * r.wins_low:.0f}–{100 * r.wins_high:.0f}) vs {r.versus}"),
            "sign p": "–" if pd.isna(r.p_value) else f"{r.p_value:.2g}"})
    return pd.DataFrame(rows)


def view(df: pd.DataFrame, manifest: Mapping | None = None, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """``robustvtc report DIR --view encoder``: the kept-token distortion per ε x compressor@budget x attack with
    its t interval, the overlap, rank correlation, full-token distortion and the paired wins over the baseline
    (``table``: the :func:`screening` of ``df`` when already computed)."""
    if table is None:
        table = metrics.screening(df, metrics.attack_roles(list(df["attack"].unique()), manifest))
    shown = display(table)
    return shown.set_index(["ε", "cell", "attack"]) if not shown.empty else shown


def verdict_sentence(table: pd.DataFrame, level: float = stats.DEFAULT_LEVEL) -> str:
    """What the screening says: per attack, in how many cells it distorts the kept tokens more than the baseline
    on most images, and in how many significantly (sign test, Bonferroni over the compared cells)."""
    compared = table.dropna(subset=["p_value"])
    head = ("Encoder screening: the vision encoder alone, no LLM and no accuracy -- what each attack does to the "
            "tokens each compressor keeps. ")
    if compared.empty:
        return head + ("No attack was compared with a full-token baseline (add fulltoken to the attacks to get "
                       "paired wins).")
    cells = len(compared)
    bar = (1 - level) / cells
    parts = []
    for attack, g in compared.groupby("attack", sort=True):
        more = int((g["wins"] > 0.5).sum())
        significant = int(((g["p_value"] < bar) & (g["wins"] > 0.5)).sum())
        fewer = int(((g["p_value"] < bar) & (g["wins"] < 0.5)).sum())
        parts.append(f"{attack} distorts the kept tokens more than {g['versus'].iloc[0]} on most images in {more} of "
                     f"{len(g)} compressor x budget x ε cells ({significant} significantly), and significantly less "
                     f"in {fewer}")
    return head + "; ".join(parts) + (f". Significance: two-sided sign tests of the per-image wins, Bonferroni over "
                                      f"{cells} comparisons (p < {bar:.2g}).")


def sections(df: pd.DataFrame, manifest: Mapping | None, table: pd.DataFrame, full: pd.DataFrame,
             image: str | None = None) -> list[Section]:
    """The encoder campaign's report sections: the screening verdict, the kept-token distortion table (with
    ``image``, its plot), overlap and rank correlation per cell, the full-token distortion per attack."""
    out = [Section("Verdict: encoder screening", [paragraph(verdict_sentence(table), "verdict"), paragraph(
        "An encoder-only campaign (mode: encoder) crafts each adversarial image with grey-box attacks and plans "
        "every compressor x budget on the clean and adversarial tokens; accuracy sections do not apply. Run the "
        "whole model (mode: full) where the screening flags a compressor.")], anchor="verdict")]
    if table.empty:
        return out
    shown = display(table)
    blocks = [paragraph("Mean 1 − cos between the adversarial and clean features of the tokens the compressor keeps "
                        "on the adversarial image (a merged token counts as its largest-weight source), 95 % t "
                        "interval; overlap = |kept_adv ∩ kept_clean| / K; spearman = clean vs adversarial "
                        "CLS-attention importance; full = 1 − cos over all tokens. Wins: share of images where the "
                        "attack distorts the kept tokens more than the baseline on the same image and cell "
                        "(Clopper–Pearson), sign p = two-sided sign test (ties dropped), uncorrected.")]
    if image:
        from .formatting import image_block

        blocks.append(image_block("kept-token distortion", image))
    blocks.append(table_block(shown, formatted=True))
    out.append(Section("Kept-token distortion and paired wins", blocks, anchor="kept-distortion"))
    wide = table.assign(cell=table["compressor"] + "@" + table["budget"].astype(str),
                        label=table["attack"] + " " + table["eps"].map(format_eps))
    for title, col, note in (("Kept-set overlap", "overlap", "Mean |kept_adv ∩ kept_clean| / K per cell: 1 = the "
                              "attack left the compressor's choice intact."),
                             ("Rank correlation of the importance scores", "spearman", "Mean Spearman correlation "
                              "of the clean and adversarial CLS-attention importance per image (the same for every "
                              "cell of an image; shown per cell for the images it covers).")):
        pivot = wide.pivot_table(index="label", columns="cell", values=col, aggfunc="first", sort=False)
        pivot = pivot.map(lambda v: "–" if pd.isna(v) else f"{v:.3f}").reset_index().rename(
            columns={"label": "attack ε"}).rename_axis(columns=None)
        out.append(Section(title, [paragraph(note), table_block(pivot, formatted=True)]))
    if not full.empty:
        shown = pd.DataFrame({"ε": full["eps"].map(format_eps), "attack": full["attack"], "n": full["n"],
                              "full-token 1−cos (95% CI)": [_interval(*r) for r in
                                                            full[["full", "full_low", "full_high"]].to_numpy()],
                              "max L∞": full["linf"].map(lambda v: f"{255 * v:.2f}/255"),
                              "mean L2": full["l2"].map(lambda v: f"{v:.3f}"),
                              "s / image": full["seconds"].map(lambda v: f"{v:.3f}")})
        out.append(Section("Full-token distortion and cost", [paragraph(
            "Mean 1 − cos over all the encoder's tokens (what a full-token attack maximises), per attack × ε, one "
            "value per image, 95 % t interval; perturbation norms in [0, 1] pixel space; seconds to craft one "
            "image."), table_block(shown, formatted=True)]))
    return out
