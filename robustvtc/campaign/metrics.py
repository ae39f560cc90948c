"""Campaign metrics, computed only from per-sample records (results.jsonl), with seeded bootstrap CIs.

Fractions in [0, 1] throughout; reports format them as percentages. Definitions (one row per cell =
attack x eps x compressor x budget x defense x adaptive):

* robust accuracy -- share of samples answered correctly on the adversarial image (``attack == "clean"``
  rows: the clean accuracy);
* attack success rate -- share of the samples answered correctly on the clean image that the attack flips;
* compression-specific failure rate (CSFR) -- share of samples wrong under compression but right with all
  tokens on the same adversarial image (compressed cells only);
* worst case -- per sample, correct under every attack run at that ε (adaptive or not) on that cell;
* overestimation gap -- robust accuracy under the full-token baseline (``fulltoken``) minus under the
  compression-aligned attack (``cage``) on the same samples, per compressor x budget; positive means
  full-token testing overestimates robustness. Its CI is a paired bootstrap over samples;
* ranking stability -- Spearman / Kendall correlation of clean vs adversarial CLS-attention importance;
* kept-token disruption -- mean 1 - cos of the kept tokens' features, adversarial vs clean.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import UserInputError

CELL = ["attack", "eps", "compressor", "budget", "defense", "adaptive"]
N_BOOT = 1000


def load_records(path: str | Path) -> pd.DataFrame:
    """The records of a campaign folder (or of a results.jsonl file) as a DataFrame."""
    from .runner import RESULTS, read_records

    path = Path(path)
    file = path / RESULTS if path.is_dir() else path
    if not file.is_file():
        raise UserInputError(f"no campaign results at {path}; accepted: a folder written by `robustvtc run` "
                             f"(holding {RESULTS}) or the file itself")
    records = read_records(file)
    if not records:
        raise UserInputError(f"{file} holds no records yet")
    return frame(records)


def frame(records: Sequence[dict]) -> pd.DataFrame:
    """Records -> DataFrame with numeric metric columns (None -> NaN) and float correctness."""
    df = pd.DataFrame.from_records(list(records))
    for col in ("correct", "clean_correct", "full_token_correct"):
        df[col] = df[col].astype(float)
    for col in ("kept_overlap", "rank_spearman", "rank_kendall", "kept_disruption", "linf", "l2", "seconds"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["adaptive"] = df["adaptive"].astype(bool)
    return df


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (seeded, so a report is reproducible)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _mean(series: pd.Series) -> float:
    return float(series.mean()) if series.notna().any() else float("nan")


def summary(df: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per cell with every per-cell metric and the robust accuracy's 95 % CI."""
    rows = []
    for key, g in df.groupby(CELL, sort=True):
        lo, hi = bootstrap_ci(g["correct"], n_boot, seed)
        clean_ok = g["clean_correct"] == 1
        compression_only = (g["correct"] == 0) & (g["full_token_correct"] == 1)
        rows.append({
            **dict(zip(CELL, key)), "n": len(g), "robust_accuracy": g["correct"].mean(), "ci_low": lo, "ci_high": hi,
            "clean_accuracy": g["clean_correct"].mean(), "full_token_accuracy": g["full_token_correct"].mean(),
            "attack_success_rate": float((g.loc[clean_ok, "correct"] == 0).mean()) if clean_ok.any() else float("nan"),
            "csfr": float(compression_only.mean()) if key[2] != "none" else float("nan"),
            "kept_overlap": _mean(g["kept_overlap"]), "kept_disruption": _mean(g["kept_disruption"]),
            "rank_spearman": _mean(g["rank_spearman"]), "rank_kendall": _mean(g["rank_kendall"]),
            "linf": _mean(g["linf"]), "l2": _mean(g["l2"]), "seconds": _mean(g["seconds"]),
        })
    return pd.DataFrame(rows, columns=[*CELL, "n", "robust_accuracy", "ci_low", "ci_high", "clean_accuracy",
                                       "full_token_accuracy", "attack_success_rate", "csfr", "kept_overlap",
                                       "kept_disruption", "rank_spearman", "rank_kendall", "linf", "l2", "seconds"])


def clean_accuracy(df: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Accuracy on the clean images per compressor x budget x defense, with its CI."""
    clean = df[df["attack"] == "clean"]
    rows = []
    for key, g in clean.groupby(["compressor", "budget", "defense"], sort=True):
        lo, hi = bootstrap_ci(g["correct"], n_boot, seed)
        rows.append({"compressor": key[0], "budget": key[1], "defense": key[2], "n": len(g),
                     "accuracy": g["correct"].mean(), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["compressor", "budget", "defense", "n", "accuracy", "ci_low", "ci_high"])


def worst_case(df: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per-sample worst case over every attack at each ε: robust accuracy against the whole attack suite."""
    attacked = df[df["attack"] != "clean"]
    cols = ["eps", "compressor", "budget", "defense", "attacks", "n", "robust_accuracy", "ci_low", "ci_high"]
    if attacked.empty:
        return pd.DataFrame(columns=cols)
    per_sample = attacked.groupby(["eps", "compressor", "budget", "defense", "sample"], sort=True)
    worst = per_sample["correct"].min().rename("correct").reset_index()
    names = attacked.groupby(["eps", "compressor", "budget", "defense"])["attack"].agg(
        lambda a: ", ".join(sorted(set(a))))
    rows = []
    for key, g in worst.groupby(["eps", "compressor", "budget", "defense"], sort=True):
        lo, hi = bootstrap_ci(g["correct"], n_boot, seed)
        rows.append({**dict(zip(cols[:4], key)), "attacks": names[key], "n": len(g),
                     "robust_accuracy": g["correct"].mean(), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=cols)


def overestimation_gap(df: pd.DataFrame, baseline: str = "fulltoken", aligned: str = "cage",
                       n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Robust accuracy under ``baseline`` minus under ``aligned``, paired over samples, per compressor x budget."""
    keys = ["eps", "compressor", "budget", "defense", "adaptive"]
    cols = [*keys, "n", f"{baseline}_accuracy", f"{aligned}_accuracy", "gap", "ci_low", "ci_high"]
    a = df[df["attack"] == baseline][[*keys, "sample", "correct"]]
    b = df[df["attack"] == aligned][[*keys, "sample", "correct"]]
    paired = a.merge(b, on=[*keys, "sample"], suffixes=("_base", "_aligned"))
    rows = []
    for key, g in paired.groupby(keys, sort=True):
        diff = g["correct_base"] - g["correct_aligned"]
        lo, hi = bootstrap_ci(diff, n_boot, seed)
        rows.append({**dict(zip(keys, key)), "n": len(g), f"{baseline}_accuracy": g["correct_base"].mean(),
                     f"{aligned}_accuracy": g["correct_aligned"].mean(), "gap": diff.mean(), "ci_low": lo,
                     "ci_high": hi})
    return pd.DataFrame(rows, columns=cols)


def ranking_stability(df: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Mean clean-vs-adversarial importance rank correlation per attack x ε x defense, one value per image."""
    keys = ["attack", "eps", "defense", "adaptive"]
    cols = [*keys, "images", "spearman", "spearman_low", "spearman_high", "kendall"]
    ranked = df[df["attack"] != "clean"].dropna(subset=["rank_spearman"])
    # an image evaluated on many cells carries one ranking: count it once
    images = ranked.drop_duplicates(subset=[*keys, "sample", "rank_spearman", "rank_kendall"])
    rows = []
    for key, g in images.groupby(keys, sort=True):
        lo, hi = bootstrap_ci(g["rank_spearman"], n_boot, seed)
        rows.append({**dict(zip(keys, key)), "images": len(g), "spearman": g["rank_spearman"].mean(),
                     "spearman_low": lo, "spearman_high": hi, "kendall": g["rank_kendall"].mean()})
    return pd.DataFrame(rows, columns=cols)


def perturbation(df: pd.DataFrame) -> pd.DataFrame:
    """Perturbation norms and crafting time per attack x ε (seconds: per sample, per image crafted)."""
    attacked = df[df["attack"] != "clean"]
    images = attacked.drop_duplicates(subset=["attack", "eps", "defense", "adaptive", "sample", "linf", "l2"])
    out = images.groupby(["attack", "eps"], sort=True).agg(
        images=("sample", "size"), linf_mean=("linf", "mean"), linf_max=("linf", "max"), l2_mean=("l2", "mean"),
        seconds_per_sample=("seconds", "mean"))
    return out.reset_index()


def min_robust_accuracy(df: pd.DataFrame) -> tuple[float, dict]:
    """The lowest worst-case robust accuracy over every compressor x budget x defense x ε, and where it is
    (what ``--fail-under`` gates on). Without attacks: the lowest clean accuracy."""
    table = worst_case(df, n_boot=1)
    if table.empty:
        table = clean_accuracy(df, n_boot=1).rename(columns={"accuracy": "robust_accuracy"})
    row = table.loc[table["robust_accuracy"].idxmin()]
    return float(row["robust_accuracy"]), {k: v for k, v in row.items() if k not in ("ci_low", "ci_high")}


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Robust accuracy per cell in two campaigns and the change (b - a), cells present in both."""
    sa, sb = summary(a, n_boot=1), summary(b, n_boot=1)
    merged = sa[[*CELL, "robust_accuracy"]].merge(sb[[*CELL, "robust_accuracy"]], on=CELL, suffixes=("_a", "_b"))
    merged["change"] = merged["robust_accuracy_b"] - merged["robust_accuracy_a"]
    return merged
