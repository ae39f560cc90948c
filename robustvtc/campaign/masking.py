"""Sanity checks against gradient masking, from campaign records, and the defense sections of the report.

An evaluation whose gradients are masked (shattered by a non-differentiable step, made stochastic, or
zeroed) reports robustness it does not have. Carlini et al. (2019) list symptoms that per-sample records
can show, and each check here looks for one:

* ``monotone_in_eps`` -- robust accuracy does not rise as ε grows (the clean accuracy is the ε = 0 point);
* ``large_eps`` -- an attack with a very large L∞ radius drives accuracy near zero (ART's SecurityCurve);
* ``transfer_not_stronger`` -- on a defended target, the image crafted without the defense and transferred
  (non-adaptive) is not more harmful than the one crafted through it (adaptive).

A check is ``violated`` only when the effect exceeds ``tolerance`` *and* is statistically significant at
``z`` (one-sided; two-proportion test, Wilson bound for ``large_eps``), so a handful of samples does not
raise alarms from noise; ``not applicable`` when the records lack what it compares. Any violation marks
the campaign, and the rows it covers, unreliable.

Records are those the campaign runner writes (one per sample x attack x ε x compressor x budget x defense x
adaptive): ``attack == "clean"`` rows hold the unattacked images, ``defense == "none"`` the undefended target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..stats import wilson
from .formatting import Block, Section, format_eps, paragraph, percent, table_block

CLEAN, NONE = "clean", "none"
STATUSES = ("pass", "violated", "not applicable")
GROUP = ["defense", "attack", "compressor", "budget", "adaptive"]  # one robust-accuracy curve over ε


@dataclass(frozen=True)
class Thresholds:
    tolerance: float = 0.05  # accuracy points (as a fraction) a rise may reach before it counts
    z: float = 1.645  # one-sided 95 %
    large_eps: float = 64 / 255  # L∞ radius from which an attack must succeed almost always (records carry no
    # norm: raise it for L2 campaigns)
    near_zero: float = 0.1  # accuracy an attack at large_eps must get below


@dataclass(frozen=True)
class CheckResult:
    """One check on one slice of the records; ``figures`` hold the numbers it decided on."""

    check: str
    scope: dict[str, Any]
    status: str
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):  # plain Python values, so results serialise as JSON
        for name in ("scope", "figures"):
            object.__setattr__(self, name, {k: getattr(v, "item", lambda: v)() for k, v in getattr(self, name).items()})

    @property
    def violated(self) -> bool:
        return self.status == "violated"


# ---------------------------------------------------------------------------------------------- statistics
def _significant_rise(k_low: float, n_low: int, k_high: float, n_high: int, t: Thresholds) -> bool:
    """Whether accuracy k_high/n_high exceeds k_low/n_low by more than the tolerance, significantly."""
    rise = k_high / n_high - k_low / n_low
    pooled = (k_low + k_high) / (n_low + n_high)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_low + 1 / n_high))
    return rise > t.tolerance and se > 0 and rise / se > t.z


# ---------------------------------------------------------------------------------------------- the checks
def _prepare(records: pd.DataFrame) -> pd.DataFrame:
    df = records.copy()
    df["defense"] = df["defense"].fillna(NONE).replace("", NONE)
    df["adaptive"] = df["adaptive"].astype(bool)
    for col in ("correct", "clean_correct", "eps"):
        df[col] = df[col].astype(float)
    return df


def _attacked(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["attack"] != CLEAN) & (df["eps"] > 0)]


def _monotone(scope: dict, g: pd.DataFrame, t: Thresholds) -> CheckResult:
    clean = g.drop_duplicates("sample")["clean_correct"]
    points = [(0.0, clean.sum(), len(clean))]
    points += [(eps, e["correct"].sum(), len(e)) for eps, e in g.groupby("eps", sort=True)]
    worst = max(((lo, hi) for i, lo in enumerate(points) for hi in points[i + 1:]),
                key=lambda pair: pair[1][1] / pair[1][2] - pair[0][1] / pair[0][2])
    (eps_lo, k_lo, n_lo), (eps_hi, k_hi, n_hi) = worst
    figures = {"eps_low": eps_lo, "accuracy_low": k_lo / n_lo, "eps_high": eps_hi, "accuracy_high": k_hi / n_hi,
               "samples": int(n_hi)}
    status = "violated" if _significant_rise(k_lo, n_lo, k_hi, n_hi, t) else "pass"
    return CheckResult("monotone_in_eps", scope, status, figures)


def _largeformat_eps(scope: dict, g: pd.DataFrame, t: Thresholds) -> CheckResult:
    large = g[g["eps"] >= t.large_eps]
    if large.empty:
        return CheckResult("large_eps", scope, "not applicable", {"largest_eps": g["eps"].max()})
    top = large[large["eps"] == large["eps"].max()]
    k, n = top["correct"].sum(), len(top)
    figures = {"eps": top["eps"].iloc[0], "accuracy": k / n, "samples": n, "limit": t.near_zero}
    status = "violated" if k / n > t.near_zero and wilson(k, n, z=t.z)[0] > t.near_zero else "pass"
    return CheckResult("large_eps", scope, status, figures)


def _transfer(scope: dict, g: pd.DataFrame, t: Thresholds) -> CheckResult:
    sides = {a: s["correct"] for a, s in g.groupby("adaptive")}
    if len(sides) < 2:
        return CheckResult("transfer_not_stronger", {**scope, "adaptive": True}, "not applicable", {})
    transfer, adaptive = sides[False], sides[True]
    figures = {"transfer_accuracy": transfer.mean(), "adaptive_accuracy": adaptive.mean(),
               "samples": len(adaptive)}
    violated = _significant_rise(transfer.sum(), len(transfer), adaptive.sum(), len(adaptive), t)
    return CheckResult("transfer_not_stronger", {**scope, "adaptive": True}, "violated" if violated else "pass",
                       figures)


def sanity_checks(records: pd.DataFrame, thresholds: Thresholds = Thresholds()) -> list[CheckResult]:
    """Every check on every slice of ``records`` it applies to."""
    attacked = _attacked(_prepare(records))
    out = []
    for values, g in attacked.groupby(GROUP, sort=True):
        scope = dict(zip(GROUP, values))
        out += [_monotone(scope, g, thresholds), _largeformat_eps(scope, g, thresholds)]
    keys = ["defense", "attack", "compressor", "budget", "eps"]
    defended = attacked[attacked["defense"] != NONE]
    for values, g in defended.groupby(keys, sort=True):
        out.append(_transfer(dict(zip(keys, values)), g, thresholds))
    return out


def unreliable(records: pd.DataFrame, thresholds: Thresholds = Thresholds()) -> bool:
    """True when any sanity check is violated: the campaign's robustness numbers are not to be trusted."""
    return any(c.violated for c in sanity_checks(records, thresholds))


# ---------------------------------------------------------------------------------------------- report sections
def _cell(row) -> str:
    return f"{row['compressor']}@{row['budget']}"


def _clean_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Clean accuracy per defense x cell, one value per sample."""
    per_sample = df.drop_duplicates(["defense", "compressor", "budget", "sample"])
    return per_sample.groupby(["defense", "compressor", "budget"], as_index=False)["clean_correct"].mean()


def _clean_section(df: pd.DataFrame) -> Section:
    acc = _clean_accuracy(df)
    acc["cell"] = acc.apply(_cell, axis=1)
    wide = acc.pivot(index="defense", columns="cell", values="clean_correct")
    rows = [{"defense": d, **{c: percent(v) for c, v in r.items()}} for d, r in wide.iterrows()]
    return Section("Defenses: clean accuracy", [paragraph("Accuracy (%) on the unattacked images, per defense and "
                                                          "compressor@budget."), table_block(rows)])


def _robust_section(df: pd.DataFrame, checks: list[CheckResult]) -> Section:
    flagged = [c.scope for c in checks if c.violated]
    keys = ["attack", "eps", "compressor", "budget", "defense"]
    acc = _attacked(df).groupby([*keys, "adaptive"])["correct"].mean()
    rows = []
    for values, g in acc.groupby(level=list(range(len(keys))), sort=True):
        row = dict(zip(keys, values))
        by = dict(zip(g.index.get_level_values("adaptive"), g.values))
        bad = any(all({**row, "adaptive": a}.get(k) == v for k, v in f.items()) for a in by for f in flagged)
        rows.append({"attack": row["attack"], "ε": format_eps(row["eps"]), "cell": _cell(row), "defense": row["defense"],
                     "non-adaptive": percent(by.get(False)), "adaptive": percent(by.get(True)),
                     "status": "unreliable" if bad else "ok"})
    intro = ("Robust accuracy (%) on the adversarial images. Non-adaptive: crafted on the undefended target and "
             "transferred; adaptive: crafted through the defense (EOT over its randomness, BPDA through its "
             "non-differentiable steps). \"unreliable\": a sanity check covering that row is violated.")
    return Section("Defenses: robust accuracy, non-adaptive vs adaptive", [paragraph(intro), table_block(rows)])


CHECKS = ("monotone_in_eps", "large_eps", "transfer_not_stronger")


def coverage(checks: list[CheckResult], thresholds: Thresholds = Thresholds()) -> dict[str, str]:
    """Per check, in words, where it ran and where it did not apply (the masking verdict must say so)."""
    why = {"large_eps": f"no ε ≥ {format_eps(thresholds.large_eps)}",
           "transfer_not_stronger": "no transferred and adaptive pair to compare",
           "monotone_in_eps": "no attacked rows"}
    out = {}
    for name in CHECKS:
        mine = [c for c in checks if c.check == name]
        na = sum(c.status == "not applicable" for c in mine)
        if not mine:
            out[name] = "not run (no defenses)" if name == "transfer_not_stronger" else "not run (no attacked rows)"
        elif na == len(mine):
            out[name] = f"not applicable on {na} of {len(mine)} rows ({why[name]})"
        elif na:
            out[name] = f"ran on {len(mine) - na} of {len(mine)} rows; not applicable on {na} ({why[name]})"
        else:
            out[name] = f"ran on all {len(mine)} rows"
    return out


def violations(records: pd.DataFrame, thresholds: Thresholds = Thresholds()) -> list[str]:
    """One short description per violated check (``check: attack on compressor@budget, defense``)."""
    return [f"{c.check}: {c.scope['attack']} on {_cell(c.scope)}, defense {c.scope['defense']}"
            + (f", ε={format_eps(c.scope['eps'])}" if "eps" in c.scope else "")
            + (" (adaptive)" if c.scope.get("adaptive") else "")
            for c in sanity_checks(records, thresholds) if c.violated]


def _checks_section(checks: list[CheckResult], thresholds: Thresholds = Thresholds()) -> Section:
    statuses = pd.DataFrame({"check": [c.check for c in checks], "status": [c.status for c in checks]})
    summary = [{"check": name, **{s: int((g["status"] == s).sum()) for s in STATUSES}}
               for name, g in statuses.groupby("check", sort=True)]
    violated = [{"check": c.check, "defense": c.scope["defense"], "attack": c.scope["attack"], "cell": _cell(c.scope),
                 "adaptive": c.scope["adaptive"], "ε": format_eps(c.scope["eps"]) if "eps" in c.scope else "all",
                 "figures": ", ".join(f"{k}={format_eps(v) if k.startswith('eps') else _fmt(v)}"
                                      for k, v in c.figures.items())}
                for c in checks if c.violated]
    ran = coverage(checks, thresholds)
    incomplete = {k: v for k, v in ran.items() if not v.startswith("ran on all")}
    if violated:
        verdict = ("Unreliable: gradient masking is likely where a check is violated; do not trust those robust "
                   "accuracies before a stronger adaptive attack.")
    elif incomplete:
        verdict = ("No violation among the checks that ran; not run everywhere: "
                   + "; ".join(f"`{k}` {v}" for k, v in incomplete.items()) + ".")
    else:
        verdict = "No sign of gradient masking: every check ran on every row it covers, none is violated."
    blocks = [paragraph(verdict, "warn" if violated else "verdict"),
              paragraph("Checks: robust accuracy does not rise with ε (`monotone_in_eps`), a very large ε drives it "
                        "near zero (`large_eps`), a transferred attack is not stronger than the adaptive one "
                        "(`transfer_not_stronger`)."),
              Block("list", items=[f"`{k}`: {v}" for k, v in ran.items()]), table_block(summary)]
    if violated:
        blocks += [paragraph("Violated checks:"), table_block(violated)]
    return Section("Sanity checks against gradient masking", blocks)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _cost_section(df: pd.DataFrame) -> Section:
    acc = _clean_accuracy(df)
    base = acc[acc["defense"] == NONE].set_index(["compressor", "budget"])["clean_correct"]
    attacked = _attacked(df)
    plain = attacked[attacked["defense"] == NONE].groupby(["attack", "eps", "compressor", "budget"])["seconds"].mean()
    rows = []
    for defense, g in acc[acc["defense"] != NONE].groupby("defense", sort=True):
        drop = (base - g.set_index(["compressor", "budget"])["clean_correct"]).mean()
        through = attacked[(attacked["defense"] == defense) & attacked["adaptive"]]
        secs = through.groupby(["attack", "eps", "compressor", "budget"])["seconds"].mean()
        ratio = (secs / plain.reindex(secs.index)).replace([math.inf], math.nan).mean() if len(secs) else math.nan
        rows.append({"defense": defense, "clean accuracy drop (points)": percent(drop),
                     "adaptive crafting s/image": _fmt(secs.mean()) if len(secs) else "–",
                     "× undefended": "–" if pd.isna(ratio) else f"{ratio:.2f}"})
    intro = ("Cost of each defense: the drop in clean accuracy against no defense (mean over compressor@budget), "
             "and the time to craft an image through it (adaptive attacks, EOT draws included) relative to "
             "crafting on the undefended target.")
    return Section("Defenses: cost", [paragraph(intro), table_block(rows)])


def _detectors(df: pd.DataFrame) -> list[str]:
    """Defense labels (``name`` or ``name(options)``) of registered detection defenses."""
    names = {label: label.split("(")[0] for label in df["defense"].unique() if label != NONE}
    if not names:
        return []  # no defense: the registry (torch plugins) is not needed
    from ..defenses.base import DEFENSES

    return sorted(label for label, name in names.items() if name in DEFENSES and DEFENSES.get(name).hook == "detection")


def _detection_section(df: pd.DataFrame, detectors: list[str]) -> Section:
    from ..defenses.base import detection_rates

    rows = []
    for defense, g in df[df["defense"].isin(detectors)].groupby("defense", sort=True):
        clean = g[g["attack"] == CLEAN]["flagged"].astype(bool)
        for (attack, eps, adaptive), a in _attacked(g).groupby(["attack", "eps", "adaptive"], sort=True):
            rates = detection_rates(clean.tolist(), a["flagged"].astype(bool).tolist())
            rows.append({"defense": defense, "attack": attack, "ε": format_eps(eps), "adaptive": adaptive,
                         "TPR": percent(rates.tpr), "FPR": percent(rates.fpr)})
    return Section("Defenses: detection", [paragraph("Detection: true-positive rate (%) on adversarial images and "
                                                     "false-positive rate on clean ones."), table_block(rows)])


def report_sections(records: pd.DataFrame, thresholds: Thresholds = Thresholds()) -> list[Section]:
    """The report's sections on defenses and gradient-masking sanity (defense sections only with defenses)."""
    df = _prepare(records)
    checks = sanity_checks(df, thresholds)
    defended = bool((df["defense"] != NONE).any())  # defense sections only when the campaign has defenses
    sections = []
    if defended:
        sections += [_clean_section(df), _robust_section(df, checks)]
    if checks:
        sections.append(_checks_section(checks, thresholds))
    if defended:
        sections.append(_cost_section(df))
    detectors = _detectors(df) if "flagged" in df else []
    if detectors:
        sections.append(_detection_section(df, detectors))
    return sections
