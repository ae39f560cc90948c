"""Campaign metrics, computed only from per-sample records (results.jsonl), with exact or score intervals.

Fractions in [0, 1] throughout; reports format them as percentages. Definitions (one row per cell =
attack x eps x compressor x budget x defense x adaptive); :data:`GLOSSARY` holds them with their sources:

* robust accuracy -- share of samples answered correctly on the adversarial image (``attack == "clean"``
  rows: the clean accuracy); 95 % Clopper--Pearson interval;
* score -- on benchmarks from Hugging Face datasets (data source hf), the mean of the benchmark's official
  per-record metric (VQA soft accuracy, GQA exact match, POPE/MME yes/no accuracy); ``correct`` is its
  0/1 reading (score >= 0.5) that the intervals and paired tests use. :mod:`.views` ``benchmark`` gives the
  aggregate figures (POPE F1 and yes-ratio, MME perception / cognition);
* attack success rate -- share of the samples answered correctly on the clean image that the attack flips;
* CSFR (compression-specific failure rate, as CIRA, arXiv 2609.35002, defines it) -- among the samples both
  paths answered correctly before the attack (compressed and full-token, clean image), the share that the
  attack makes wrong under compression while the full-token path stays right (compressed cells only);
* compression-only failure rate -- the same event over *all* samples (what robustvtc called CSFR before);
* worst case -- per sample, correct under every attack run at that ε (adaptive or not) on that cell;
* overestimation gap -- robust accuracy under a full-token baseline minus under a compression-aligned attack
  on the same samples, per compressor x budget; positive means full-token testing overestimates robustness.
  Its interval is Newcombe's paired score interval, its significance the exact McNemar test
  (:mod:`robustvtc.stats`); :func:`verdict` corrects the family with Bonferroni;
* ranking stability -- Spearman / Kendall correlation of clean vs adversarial CLS-attention importance;
* kept-set overlap -- |kept_adv ∩ kept_clean| / K, the share of the clean image's K kept tokens the
  compressor still keeps on the adversarial image (CAGE, arXiv 2601.21531);
* kept-token distortion (``kept_disruption``) -- mean 1 - cos of the kept tokens' features, adversarial vs
  clean: what CAGE's expected feature disruption maximises. Means of continuous values get a t interval.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import stats
from ..errors import UserInputError
from ..registry import is_import_path
from .records import NONE

CELL = ["attack", "eps", "compressor", "budget", "defense", "adaptive"]
N_BOOT = 1000


def load_records(path: str | Path) -> pd.DataFrame:
    """The records of a campaign folder (or of a results.jsonl file) as a DataFrame."""
    from .records import RESULTS, read_records

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
    """Records -> DataFrame with numeric metric columns (None -> NaN) and float correctness.

    Records written before ``clean_full_token_correct`` existed get it from the join with the clean
    full-token records (attack "clean", compressor "none") of the same sample and defense."""
    df = pd.DataFrame.from_records(list(records))
    if "correct" not in df and "kind" in df:  # encoder-only campaigns ask no question: their measures only
        for col in ("kept_overlap", "rank_spearman", "rank_kendall", "kept_disruption", "full_token_disruption",
                    "linf", "l2", "seconds"):
            df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
        df["adaptive"] = df["adaptive"].astype(bool)
        return df
    for col in ("correct", "clean_correct", "full_token_correct"):
        df[col] = df[col].astype(float)
    if "clean_full_token_correct" not in df or df["clean_full_token_correct"].isna().any():
        clean_full = df[(df["attack"] == "clean") & (df["compressor"] == "none")]
        joined = df[["sample", "defense"]].merge(
            clean_full.drop_duplicates(["sample", "defense"])[["sample", "defense", "correct"]],
            on=["sample", "defense"], how="left")["correct"].to_numpy()
        old = df["clean_full_token_correct"] if "clean_full_token_correct" in df else pd.Series(np.nan, df.index)
        df["clean_full_token_correct"] = pd.to_numeric(old, errors="coerce").fillna(pd.Series(joined, df.index))
    df["clean_full_token_correct"] = df["clean_full_token_correct"].astype(float)
    for col in ("kept_overlap", "rank_spearman", "rank_kendall", "kept_disruption", "linf", "l2", "seconds", "score"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["adaptive"] = df["adaptive"].astype(bool)
    return df


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (seeded, so a report is reproducible): for continuous per-image
    values such as rank correlations; accuracies use :func:`robustvtc.stats.clopper_pearson`."""
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


def accuracy_ci(correct: pd.Series, level: float = stats.DEFAULT_LEVEL) -> tuple[float, float]:
    """Clopper--Pearson interval of the share of 1s in a 0/1 series."""
    return stats.clopper_pearson(int((correct > 0.5).sum()), int(correct.notna().sum()), level)


def csfr(g: pd.DataFrame) -> tuple[float, int]:
    """CIRA's CSFR of one compressed cell and its denominator: among the samples both paths answered
    correctly on the clean image, the share wrong under compression and right with all tokens after the attack."""
    eligible = g[(g["clean_correct"] == 1) & (g["clean_full_token_correct"] == 1)]
    if eligible.empty:
        return float("nan"), 0
    return float(((eligible["correct"] == 0) & (eligible["full_token_correct"] == 1)).mean()), len(eligible)


SUMMARY_COLUMNS = [*CELL, "n", "robust_accuracy", "ci_low", "ci_high", "clean_accuracy", "full_token_accuracy",
                   "attack_success_rate", "csfr", "csfr_n", "csfr_low", "csfr_high", "compression_only_failure_rate",
                   "kept_overlap", "kept_disruption", "rank_spearman", "rank_kendall", "linf", "l2", "seconds", "score"]


def benchmark_score(g: pd.DataFrame) -> float:
    """Mean of the benchmark's official per-record ``score`` (hf data: VQA soft accuracy, ...); NaN without."""
    return _mean(g["score"]) if "score" in g else float("nan")


def summary(df: pd.DataFrame, level: float = stats.DEFAULT_LEVEL) -> pd.DataFrame:
    """One row per cell with every per-cell metric and the robust accuracy's Clopper--Pearson interval."""
    rows = []
    for key, g in df.groupby(CELL, sort=True):
        lo, hi = accuracy_ci(g["correct"], level)
        clean_ok = g["clean_correct"] == 1
        compressed = key[2] != "none"
        rate, eligible = csfr(g) if compressed else (float("nan"), 0)
        c_lo, c_hi = (stats.clopper_pearson(int(round(rate * eligible)), eligible, level) if eligible
                      else (float("nan"), float("nan")))
        rows.append({
            **dict(zip(CELL, key)), "n": len(g), "robust_accuracy": g["correct"].mean(), "ci_low": lo, "ci_high": hi,
            "clean_accuracy": g["clean_correct"].mean(), "full_token_accuracy": g["full_token_correct"].mean(),
            "attack_success_rate": float((g.loc[clean_ok, "correct"] == 0).mean()) if clean_ok.any() else float("nan"),
            "csfr": rate, "csfr_n": eligible, "csfr_low": c_lo, "csfr_high": c_hi,
            "compression_only_failure_rate": (float(((g["correct"] == 0) & (g["full_token_correct"] == 1)).mean())
                                              if compressed else float("nan")),
            "kept_overlap": _mean(g["kept_overlap"]), "kept_disruption": _mean(g["kept_disruption"]),
            "rank_spearman": _mean(g["rank_spearman"]), "rank_kendall": _mean(g["rank_kendall"]),
            "linf": _mean(g["linf"]), "l2": _mean(g["l2"]), "seconds": _mean(g["seconds"]),
            "score": benchmark_score(g),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def clean_accuracy(df: pd.DataFrame, level: float = stats.DEFAULT_LEVEL) -> pd.DataFrame:
    """Accuracy on the clean images per compressor x budget x defense, with its Clopper--Pearson interval."""
    clean = df[df["attack"] == "clean"]
    rows = []
    for key, g in clean.groupby(["compressor", "budget", "defense"], sort=True):
        lo, hi = accuracy_ci(g["correct"], level)
        rows.append({"compressor": key[0], "budget": key[1], "defense": key[2], "n": len(g),
                     "accuracy": g["correct"].mean(), "ci_low": lo, "ci_high": hi, "score": benchmark_score(g)})
    return pd.DataFrame(rows, columns=["compressor", "budget", "defense", "n", "accuracy", "ci_low", "ci_high",
                                       "score"])


WORST_CASE_CELL = ["eps", "compressor", "budget", "defense"]


def worst_per_sample(df: pd.DataFrame) -> pd.DataFrame:
    """Per ε x compressor x budget x defense and sample: ``correct`` under every record there (its minimum), the
    worst case :func:`worst_case` and :func:`~robustvtc.campaign.gates.robustness_gate` count."""
    return df.groupby([*WORST_CASE_CELL, "sample"], sort=True)["correct"].min().reset_index()


def worst_case(df: pd.DataFrame, level: float = stats.DEFAULT_LEVEL) -> pd.DataFrame:
    """Per-sample worst case over every attack at each ε: robust accuracy against the whole attack suite."""
    attacked = df[df["attack"] != "clean"]
    cols = [*WORST_CASE_CELL, "attacks", "n", "robust_accuracy", "ci_low", "ci_high"]
    if attacked.empty:
        return pd.DataFrame(columns=cols)
    worst = worst_per_sample(attacked)
    names = attacked.groupby(WORST_CASE_CELL)["attack"].agg(lambda a: ", ".join(sorted(set(a))))
    rows = []
    for key, g in worst.groupby(WORST_CASE_CELL, sort=True):
        lo, hi = accuracy_ci(g["correct"], level)
        rows.append({**dict(zip(cols[:4], key)), "attacks": names[key], "n": len(g),
                     "robust_accuracy": g["correct"].mean(), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=cols)


def _paired(df: pd.DataFrame, baseline: str, aligned: str, keys: list[str], value: str = "correct") -> pd.DataFrame:
    a = df[df["attack"] == baseline][[*keys, "sample", value]]
    b = df[df["attack"] == aligned][[*keys, "sample", value]]
    return a.merge(b, on=[*keys, "sample"], suffixes=("_base", "_aligned"))


def overestimation_gap(df: pd.DataFrame, baseline: str = "fulltoken", aligned: str = "cage",
                       level: float = stats.DEFAULT_LEVEL) -> pd.DataFrame:
    """Robust accuracy under ``baseline`` minus under ``aligned``, paired over samples, per compressor x budget:
    Newcombe's paired interval at ``level`` and the exact McNemar p-value (uncorrected; see :func:`verdict`)."""
    keys = ["eps", "compressor", "budget", "defense", "adaptive"]
    cols = [*keys, "n", f"{baseline}_accuracy", f"{aligned}_accuracy", "gap", "ci_low", "ci_high", "p_value"]
    paired = _paired(df, baseline, aligned, keys)
    rows = []
    for key, g in paired.groupby(keys, sort=True):
        counts = stats.PairedCounts.of(g["correct_base"], g["correct_aligned"])
        lo, hi = stats.paired_difference_ci(counts, level)
        rows.append({**dict(zip(keys, key)), "n": len(g), f"{baseline}_accuracy": g["correct_base"].mean(),
                     f"{aligned}_accuracy": g["correct_aligned"].mean(), "gap": counts.difference, "ci_low": lo,
                     "ci_high": hi, "p_value": stats.mcnemar_exact(counts)})
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------------------------- the verdict
BASELINE, ALIGNED = "baseline", "compression_aligned"


def attack_roles(labels: Sequence[str], manifest: Mapping | None = None) -> dict[str, str]:
    """Attack label -> the role its class declares (``Attack.role``): as the manifest recorded it
    (``manifest["attacks"][label]["role"]``), else looked up by the label's registry name from the manifest
    (``manifest["attacks"][label]["name"]``, else the scenario's attacks), else the label itself."""
    names: dict[str, str] = {}
    manifest = manifest or {}
    for entry in (manifest.get("scenario") or {}).get("attacks") or []:
        if isinstance(entry, Mapping) and "name" in entry:
            names[str(entry.get("label") or entry["name"])] = str(entry["name"])
    for label, info in (manifest.get("attacks") or {}).items():
        if isinstance(info, Mapping) and info.get("name"):
            names[str(label)] = str(info["name"])
    recorded = {str(label): info["role"] for label, info in (manifest.get("attacks") or {}).items()
                if isinstance(info, Mapping) and isinstance(info.get("role"), str)}  # campaigns since the role is kept
    roles = {}
    for label in labels:
        if label == "clean":
            continue
        if label in recorded:
            roles[label] = recorded[label]  # read without importing the attacks (torch)
            continue
        from ..attacks import attack_class

        name = names.get(label, label)
        try:  # a registered name or torchattacks.<Class>; a module:Class named by the folder is not imported
            roles[label] = "other" if is_import_path(name) else attack_class(name).role
        except UserInputError:
            roles[label] = "other"
    return roles


VERDICT_COLUMNS = ["eps", "compressor", "budget", "n", "clean_accuracy", "clean_low", "clean_high", "baseline",
                   "baseline_accuracy", "baseline_low", "baseline_high", "aligned", "aligned_accuracy", "aligned_low",
                   "aligned_high", "gap", "ci_low", "ci_high", "p_value", "significant", "discordant"]


def verdict(df: pd.DataFrame, roles: Mapping[str, str], level: float = stats.DEFAULT_LEVEL) -> dict:
    """Does full-token testing overestimate the robustness of the compressed model here?

    Per ε x compressor x budget (no defense, non-adaptive): clean accuracy, robust accuracy under the
    strongest full-token baseline and under the strongest compression-aligned attack (lowest accuracy at
    that cell, each with its Clopper--Pearson interval), and their paired gap with Newcombe's interval and the
    exact McNemar p-value. The family -- every compressed compressor x budget x aligned attack x ε -- is
    Bonferroni-corrected: gap intervals are at ``stats.family_level(level, cells)`` and a gap is significant
    when its McNemar p-value is below (1 - level) / cells and that interval excludes 0. The uncompressed
    cell (compressor none) is shown for reference, outside the family.

    Returns {"table", "sentence", "missing", "level", "family_level", "cells", "detectable"}."""
    plain = df[(df["defense"] == "none") & ~df["adaptive"].astype(bool)]
    labels = [a for a in plain["attack"].unique() if a != "clean"]
    baselines = sorted(a for a in labels if roles.get(a) == BASELINE)
    aligned = sorted(a for a in labels if roles.get(a) == ALIGNED)
    out = {"table": pd.DataFrame(columns=VERDICT_COLUMNS), "sentence": "", "missing": None, "level": level,
           "family_level": level, "cells": 0, "detectable": float("nan"), "baselines": baselines, "aligned": aligned}
    missing = [what for what, have in (("full-token baseline attack (role 'baseline', e.g. fulltoken)", baselines),
                                       ("compression-aligned attack (role 'compression_aligned', e.g. cage, "
                                        "known_budget)", aligned)) if not have]
    if missing:
        out["missing"] = "No verdict: this campaign has no " + " and no ".join(missing) + " without defense."
        out["sentence"] = out["missing"]
        return out
    clean = plain[plain["attack"] == "clean"].drop_duplicates(["compressor", "budget", "sample"])
    keys = ["eps", "compressor", "budget"]
    acc = plain[plain["attack"] != "clean"].groupby(["attack", *keys])["correct"].mean()
    cells = acc.reset_index()
    compressed = cells[(cells["compressor"] != "none") & cells["attack"].isin(aligned)]
    m = max(1, len(compressed.drop_duplicates(["attack", *keys])))
    fam = stats.family_level(level, m)
    alpha = (1 - level) / m
    rows = []
    for (eps, comp, budget), _ in cells.groupby(keys, sort=True):
        def strongest(names):
            present = [(acc[(a, eps, comp, budget)], a) for a in names if (a, eps, comp, budget) in acc.index]
            return min(present)[1] if present else None
        base, strong = strongest(baselines), strongest(aligned)
        if base is None or strong is None:
            continue
        sub = plain[(plain["eps"] == eps) & (plain["compressor"] == comp) & (plain["budget"] == budget)]
        pair = _paired(sub, base, strong, [])
        counts = stats.PairedCounts.of(pair["correct_base"], pair["correct_aligned"])
        lo, hi = stats.paired_difference_ci(counts, fam)
        p = stats.mcnemar_exact(counts)
        cl = clean[(clean["compressor"] == comp) & (clean["budget"] == budget)]["correct"]
        row = {"eps": eps, "compressor": comp, "budget": budget, "n": counts.n,
               "clean_accuracy": cl.mean() if len(cl) else float("nan"), "baseline": base, "aligned": strong,
               "baseline_accuracy": pair["correct_base"].mean(), "aligned_accuracy": pair["correct_aligned"].mean(),
               "gap": counts.difference, "ci_low": lo, "ci_high": hi, "p_value": p,
               "significant": bool(comp != "none" and p < alpha and (lo > 0 or hi < 0)),
               "discordant": counts.first + counts.second}
        row["clean_low"], row["clean_high"] = accuracy_ci(cl, level) if len(cl) else (float("nan"),) * 2
        row["baseline_low"], row["baseline_high"] = accuracy_ci(pair["correct_base"], level)
        row["aligned_low"], row["aligned_high"] = accuracy_ci(pair["correct_aligned"], level)
        rows.append(row)
    table = pd.DataFrame(rows, columns=VERDICT_COLUMNS)
    out.update(table=table, family_level=fam, cells=m)
    settings = table[table["compressor"] != "none"]
    if settings.empty:
        out["missing"] = ("No verdict: the baseline and the compression-aligned attacks share no compressed "
                          "compressor x budget x ε cell without defense.")
        out["sentence"] = out["missing"]
        return out
    share = float((settings["discordant"] / settings["n"].clip(lower=1)).mean())
    out["detectable"] = stats.smallest_detectable_gap(int(settings["n"].min()), share, fam)
    over = settings[settings["significant"] & (settings["gap"] > 0)]
    under = settings[settings["significant"] & (settings["gap"] < 0)]
    from .formatting import format_eps

    if len(over):
        top = over.loc[over["gap"].idxmax()]
        sentence = (f"Full-token testing overestimates robustness in {len(over)} of {len(settings)} settings "
                    f"(largest +{100 * top['gap']:.1f} points at {top['compressor']}@{top['budget']}, "
                    f"ε={format_eps(top['eps'])}, {top['aligned']} vs {top['baseline']}, "
                    f"{100 * fam:.2f} % CI {100 * top['ci_low']:+.1f} to {100 * top['ci_high']:+.1f}).")
    else:
        sentence = (f"No significant overestimation at this sample size (n = {int(settings['n'].min())}; smallest "
                    f"detectable gap ≈ {100 * out['detectable']:.0f} points at the observed discordance).")
    if len(under):
        sentence += (f" In {len(under)} setting(s) the compression-aligned attack is significantly weaker than the "
                     "full-token baseline.")
    out["sentence"] = sentence
    return out


KEPT_DISTORTION_COLUMNS = ["eps", "compressor", "budget", "attack", "role", "n", "mean", "ci_low", "ci_high",
                           "versus", "wins", "wins_low", "wins_high"]


def kept_distortion(df: pd.DataFrame, roles: Mapping[str, str], level: float = stats.DEFAULT_LEVEL) -> pd.DataFrame:
    """Kept-token distortion (``kept_disruption``, what CAGE maximises) per ε x compressor x budget x attack,
    no defense: the mean with its t interval, and for each aligned attack against the strongest baseline the
    share of samples where it distorts the kept tokens more (paired wins, Clopper--Pearson): the first columns of
    :func:`screening`, wins for the compression-aligned attacks."""
    return screening(df, roles, level, compared=ALIGNED)[KEPT_DISTORTION_COLUMNS]


SCREENING_COLUMNS = ["eps", "compressor", "budget", "attack", "role", "n", "mean", "ci_low", "ci_high", "overlap",
           "overlap_low", "overlap_high", "spearman", "spearman_low", "spearman_high", "full", "full_low",
           "full_high", "versus", "wins", "wins_low", "wins_high", "ties", "p_value"]


def attacked_plain(df: pd.DataFrame) -> pd.DataFrame:
    """The attacked records without defense or adaptive crafting."""
    return df[(df["defense"] == NONE) & ~df["adaptive"].astype(bool) & (df["attack"] != "clean")]


def screening(df: pd.DataFrame, roles: Mapping[str, str], level: float = stats.DEFAULT_LEVEL,
              compared: str | None = None) -> pd.DataFrame:
    """One row per ε x compressor x budget x attack: the kept-token distortion (mean, t interval), the kept-set
    overlap, Spearman rank correlation and full-token distortion (each with its t interval), and for every attack
    that is not a baseline (with ``compared``: every attack of that role) its paired wins over the strongest
    baseline (share, Clopper--Pearson, ties, sign-test p-value). Works on any records carrying ``kept_disruption``
    (full campaigns: ``full_token_disruption`` is NaN)."""
    plain = attacked_plain(df).dropna(subset=["kept_disruption"])
    if "full_token_disruption" not in plain:
        plain = plain.assign(full_token_disruption=np.nan)
    rows = []
    keys = ["eps", "compressor", "budget"]
    for key, g in plain.groupby(keys, sort=True):
        means = g.groupby("attack")["kept_disruption"].mean()
        bases = [a for a in means.index if roles.get(a) == BASELINE]
        versus = max(bases, key=lambda a: means[a]) if bases else None
        for attack, a in g.groupby("attack", sort=True):
            row = {**dict(zip(keys, key)), "attack": attack, "role": roles.get(attack, "other"), "n": len(a)}
            for name, col in (("mean", "kept_disruption"), ("overlap", "kept_overlap"),
                              ("spearman", "rank_spearman"), ("full", "full_token_disruption")):
                values = pd.to_numeric(a[col], errors="coerce")
                row[name] = float(values.mean()) if values.notna().any() else float("nan")
                lo, hi = stats.mean_ci(values, level)
                row[f"{'ci' if name == 'mean' else name}_low"], row[f"{'ci' if name == 'mean' else name}_high"] = lo, hi
            row.update(versus=None, wins=float("nan"), wins_low=float("nan"), wins_high=float("nan"),
                       ties=float("nan"), p_value=float("nan"))
            role = roles.get(attack)
            if versus is not None and attack != versus and (role == compared if compared else role != BASELINE):
                base = g[g["attack"] == versus][["sample", "kept_disruption"]]
                pair = a[["sample", "kept_disruption"]].merge(base, on="sample", suffixes=("", "_base"))
                won = int((pair["kept_disruption"] > pair["kept_disruption_base"]).sum())
                lost = int((pair["kept_disruption"] < pair["kept_disruption_base"]).sum())
                n = len(pair)
                row.update(versus=versus, wins=won / n if n else float("nan"), ties=n - won - lost,
                           p_value=stats.mcnemar_exact(stats.PairedCounts(0, won, lost, n - won - lost)))
                row["wins_low"], row["wins_high"] = stats.clopper_pearson(won, n, level)
            rows.append(row)
    return pd.DataFrame(rows, columns=SCREENING_COLUMNS)


FATA_COLUMNS = ["eps", "compressor", "attack", "role", "k_prac", "sr", "full_accuracy", "clean_full_accuracy", "cer",
                "cer_low", "cer_high", "cbr", "cbr_n", "cbr_low", "cbr_high"]


def practical_budget(df: pd.DataFrame, compressor: str, retention: float = 0.8) -> float:
    """FATA's K_prac (arXiv 2609.39134, eq. 6) for one compressor, no defense: the smallest budget whose clean
    accuracy keeps at least ``retention`` of the full-token clean accuracy; NaN when no budget does."""
    clean = df[(df["attack"] == "clean") & (df["defense"] == "none") & ~df["adaptive"].astype(bool)]
    full = clean[clean["compressor"] == "none"]["correct"].mean()
    acc = clean[clean["compressor"] == compressor].groupby("budget")["correct"].mean()
    ok = [int(k) for k, a in acc.items() if full > 0 and a / full >= retention]
    return float(min(ok)) if ok else float("nan")


def fata_metrics(df: pd.DataFrame, roles: Mapping[str, str] | None = None, level: float = stats.DEFAULT_LEVEL,
                 retention: float = 0.8) -> pd.DataFrame:
    """FATA's stealth-lethality figures (arXiv 2609.39134 §3.3) per attack x ε x compressor, no defense:

    * K_prac -- :func:`practical_budget` (from clean results only, fixed across attacks);
    * SR = Acc_attack@full / Acc_clean@full -- full-token accuracy retention (eq. 5);
    * CER = 1 - Acc_attack@K_prac -- compressed error rate, not net of the clean error (eq. 7), with its
      Clopper--Pearson interval;
    * CBR -- among samples correct clean@full, attack@full and clean@K_prac, the share wrong attack@K_prac
      (eq. 8), with its Clopper--Pearson interval and denominator cbr_n.
    Empty when the campaign has no compressed cell or no attack."""
    roles = roles or {}
    plain = df[(df["defense"] == "none") & ~df["adaptive"].astype(bool)]
    attacked = plain[plain["attack"] != "clean"]
    clean_full = plain[(plain["attack"] == "clean") & (plain["compressor"] == "none")]["correct"].mean()
    rows = []
    for (eps, attack), g in attacked.groupby(["eps", "attack"], sort=True):
        full = g[g["compressor"] == "none"]["correct"]
        if full.empty:
            continue
        sr = full.mean() / clean_full if clean_full > 0 else float("nan")
        for compressor in sorted(c for c in g["compressor"].unique() if c != "none"):
            k = practical_budget(df, compressor, retention)
            row = {"eps": eps, "compressor": compressor, "attack": attack, "role": roles.get(attack, "other"),
                   "k_prac": k, "sr": sr, "full_accuracy": full.mean(), "clean_full_accuracy": clean_full,
                   **{c: float("nan") for c in ("cer", "cer_low", "cer_high", "cbr", "cbr_low", "cbr_high")},
                   "cbr_n": 0}
            at = g[(g["compressor"] == compressor) & (g["budget"] == k)] if np.isfinite(k) else g.iloc[:0]
            if not at.empty:
                wrong = int((at["correct"] == 0).sum())
                row["cer"] = wrong / len(at)
                row["cer_low"], row["cer_high"] = stats.clopper_pearson(wrong, len(at), level)
                eligible = at[(at["clean_full_token_correct"] == 1) & (at["full_token_correct"] == 1)
                              & (at["clean_correct"] == 1)]
                if len(eligible):
                    blind = int((eligible["correct"] == 0).sum())
                    row.update(cbr=blind / len(eligible), cbr_n=len(eligible))
                    row["cbr_low"], row["cbr_high"] = stats.clopper_pearson(blind, len(eligible), level)
            rows.append(row)
    return pd.DataFrame(rows, columns=FATA_COLUMNS)


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
    table = worst_case(df)
    if table.empty:
        table = clean_accuracy(df).rename(columns={"accuracy": "robust_accuracy"})
    row = table.loc[table["robust_accuracy"].idxmin()]
    return float(row["robust_accuracy"]), {k: v for k, v in row.items() if k not in ("ci_low", "ci_high")}


# (metric, definition, source) -- the report's glossary
GLOSSARY = [
    ("robust accuracy", "Share of samples answered correctly on the adversarial image (the clean image for attack "
     "'clean'); 95 % Clopper--Pearson interval.", "Standard; Clopper & Pearson (1934)"),
    ("clean accuracy", "Share of samples answered correctly on the unattacked image, per compressor x budget.",
     "Standard"),
    ("score (benchmark metric)", "On benchmarks read from Hugging Face datasets: the mean of the benchmark's "
     "official per-record metric (VQA soft accuracy over leave-one-out annotator subsets, GQA exact match, POPE / "
     "MME yes-no accuracy); a record counts as correct when its score is at least 0.5. POPE's F1 and yes-ratio "
     "and MME's perception / cognition scores are in the Benchmark section.",
     "VQA (Antol et al., 2015), lmms-eval, POPE (Li et al., 2023), MME (Fu et al., 2023)"),
    ("attack success rate (ASR)", "Among the samples answered correctly on the clean image (same cell), the share "
     "the attack makes wrong.", "Standard"),
    ("overestimation gap", "Robust accuracy under the full-token baseline minus under the compression-aligned "
     "attack, same samples and cell; positive = full-token testing overestimates the compressed model's "
     "robustness. Newcombe's paired score interval, exact McNemar test, Bonferroni over the verdict's family.",
     "CAGE, arXiv 2601.21531 (the comparison); Newcombe (1998), McNemar (1947)"),
    ("CSFR (compression-specific failure rate)", "Among the samples both paths answered correctly before the "
     "attack (compressed and full-token, clean image), the share that are wrong under compression and right with "
     "all tokens after it.", "CIRA, arXiv 2609.35002"),
    ("compression-only failure rate", "The same event as CSFR (wrong compressed, right with all tokens on the "
     "adversarial image) over all samples, whatever their clean answers; what robustvtc called CSFR before.",
     "robustvtc"),
    ("SR / CER / CBR at K_prac", "K_prac: per compressor, the smallest budget whose clean accuracy keeps >= 80 % of "
     "the full-token clean accuracy. SR: the attack's full-token accuracy / the clean full-token accuracy. CER: "
     "1 - the attack's accuracy at K_prac. CBR: among samples correct clean with all tokens, attacked with all "
     "tokens and clean at K_prac, the share wrong attacked at K_prac. Clopper--Pearson intervals.",
     "FATA, arXiv 2609.39134"),
    ("kept-set overlap (kept_overlap)", "|kept_adv ∩ kept_clean| / K: the share of the K tokens the compressor "
     "keeps on the clean image that it still keeps on the adversarial one (1 = the selection did not move).",
     "CAGE, arXiv 2601.21531"),
    ("kept-token distortion (kept_disruption)", "Mean 1 - cos(adversarial, clean) feature of the tokens the "
     "compressor keeps on the adversarial image: the damage that reaches the LLM, what CAGE's expected feature "
     "disruption maximises. Mean with a t interval; paired wins = share of samples where the aligned attack's "
     "value exceeds the baseline's (Clopper--Pearson).", "CAGE, arXiv 2601.21531"),
    ("ranking stability", "Spearman / Kendall correlation of the clean and adversarial CLS-attention importance "
     "of the visual tokens (the ranking top-K compressors keep tokens by); bootstrap interval.",
     "CAGE, arXiv 2601.21531 (rank distortion)"),
    ("worst case", "Per sample, correct under every attack run at that ε on that cell (adaptive ones included).",
     "Croce & Hein (2020), AutoAttack's worst-case accuracy"),
    ("gradient-masking checks", "Robust accuracy does not rise with ε; a very large ε drives it near zero; a "
     "transferred attack is not stronger than the adaptive one.", "Carlini et al. (2019), On Evaluating "
     "Adversarial Robustness"),
]
