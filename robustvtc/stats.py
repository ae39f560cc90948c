"""Confidence intervals and three-outcome gates for accuracies and paired differences.

A gate never decides on a point estimate: it asks whether the whole confidence interval meets the
requirement (PASS), the whole interval violates it (FAIL), or the interval straddles the bound
(INCONCLUSIVE -- more samples are needed, and :func:`samples_to_decide` says about how many).

* one accuracy k / n: the exact Clopper--Pearson interval (Clopper & Pearson 1934);
* a difference of two accuracies on the same samples (two attacks, or the compressed and the full-token
  path): Newcombe's score interval for paired proportions (Newcombe 1998, *Stat. Med.* 17:2635, method 10),
  which, unlike a bootstrap, does not collapse to a point when all pairs agree; its significance against
  zero is the exact McNemar test (two-sided binomial test on the discordant pairs);
* a difference of two accuracies on different samples: Newcombe's hybrid score interval for independent
  proportions (method 10 of Newcombe 1998, *Stat. Med.* 17:873);
* a gate over m cells (the worst case over compressor x budget x attack): every interval at level
  1 - (1 - level) / m -- Bonferroni's simultaneous intervals, so the family-wise error stays below 1 - level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# numpy and scipy are imported where used: the pytest plugin calls check_level at every pytest start
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
DEFAULT_LEVEL = 0.95
CORRECTION = "Bonferroni"
MAX_SAMPLES = 1_000_000  # beyond this, "no realistic sample size decides it"


def check_level(level: float) -> float:
    from .errors import UserInputError

    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.5 <= level < 1:
        raise UserInputError(f"confidence level {level!r} out of range; accepted: a fraction in [0.5, 1), e.g. 0.95")
    return float(level)


# ---------------------------------------------------------------------------------------------- intervals
def clopper_pearson(k: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Exact two-sided interval of a binomial proportion k / n."""
    from scipy import stats as _scipy

    if n <= 0:
        return float("nan"), float("nan")
    alpha = 1 - level
    low = 0.0 if k <= 0 else float(_scipy.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(_scipy.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def wilson(k: float, n: float, level: float = DEFAULT_LEVEL, *, z: float | None = None) -> tuple[float, float]:
    """Wilson score interval of k / n (the building block of Newcombe's difference intervals); ``z``: the
    normal quantile to use instead of the two-sided one of ``level``."""
    if n <= 0:
        return float("nan"), float("nan")
    if z is None:
        from scipy import stats as _scipy

        z = float(_scipy.norm.ppf(1 - (1 - level) / 2))
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


@dataclass(frozen=True)
class PairedCounts:
    """Two binary outcomes on the same n samples: ``both`` right, only ``first``, only ``second``, ``neither``."""

    both: int
    first: int
    second: int
    neither: int

    @classmethod
    def of(cls, x: Sequence[float], y: Sequence[float]) -> "PairedCounts":
        import numpy as np

        x, y = np.asarray(x, dtype=float) > 0.5, np.asarray(y, dtype=float) > 0.5
        return cls(int((x & y).sum()), int((x & ~y).sum()), int((~x & y).sum()), int((~x & ~y).sum()))

    @property
    def n(self) -> int:
        return self.both + self.first + self.second + self.neither

    @property
    def difference(self) -> float:
        """Accuracy of the first minus accuracy of the second."""
        return (self.first - self.second) / self.n if self.n else float("nan")

    def scaled(self, n: int) -> "PairedCounts":
        """The same cell proportions at ``n`` samples (for sample-size projections)."""
        f = n / self.n
        return PairedCounts(*(int(round(v * f)) for v in (self.both, self.first, self.second, self.neither)))


def paired_difference_ci(counts: PairedCounts, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Newcombe's method-10 interval of p_first - p_second from paired binary outcomes."""
    a, b, c, d, n = counts.both, counts.first, counts.second, counts.neither, counts.n
    if n == 0:
        return float("nan"), float("nan")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, level)
    l2, u2 = wilson(a + c, n, level)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    excess = a * d - b * c  # Newcombe's correlation estimate, corrected for continuity when positive
    excess = excess - n / 2 if excess > n / 2 else min(excess, 0)
    phi = excess / math.sqrt(denominator) if denominator > 0 else 0.0
    theta = p1 - p2
    lower = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return max(-1.0, theta - lower), min(1.0, theta + upper)


def independent_difference_ci(k1: int, n1: int, k2: int, n2: int,
                              level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Newcombe's hybrid score interval of k1/n1 - k2/n2 for independent samples."""
    if n1 <= 0 or n2 <= 0:
        return float("nan"), float("nan")
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, level)
    l2, u2 = wilson(k2, n2, level)
    theta = p1 - p2
    return (max(-1.0, theta - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)),
            min(1.0, theta + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)))


def mcnemar_exact(counts: PairedCounts) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs against a fair coin."""
    discordant = counts.first + counts.second
    if discordant == 0:
        return 1.0
    from scipy import stats as _scipy

    return float(_scipy.binomtest(counts.first, discordant, 0.5).pvalue)


def family_level(level: float, cells: int) -> float:
    """Bonferroni: the per-cell level that keeps the family-wise coverage at ``level`` over ``cells``."""
    return 1 - (1 - level) / max(1, cells)


# ---------------------------------------------------------------------------------------------- decisions
def decide(low: float, high: float, bound: float, direction: str) -> str:
    """PASS / FAIL / INCONCLUSIVE for the requirement ``value >= bound`` (direction "at_least") or
    ``value <= bound`` ("at_most"), from the interval [low, high]."""
    if direction == "at_least":
        return PASS if low >= bound else FAIL if high < bound else INCONCLUSIVE
    if direction == "at_most":
        return PASS if high <= bound else FAIL if low > bound else INCONCLUSIVE
    raise ValueError(f"direction must be at_least or at_most, got {direction!r}")


def combine(outcomes: Sequence[str]) -> str:
    """A family of requirements that must all hold: FAIL if any fails, PASS if all pass, else INCONCLUSIVE."""
    if FAIL in outcomes:
        return FAIL
    return PASS if outcomes and all(o == PASS for o in outcomes) else INCONCLUSIVE


def _search(decided, start: int) -> int | None:
    """Smallest n >= start with ``decided(n)``, assuming it stays decided beyond (doubling, then bisection)."""
    if decided(start):
        return start
    low, high = start, start * 2
    while not decided(high):
        low, high = high, high * 2
        if high > MAX_SAMPLES:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if decided(mid) else (mid, high)
    return high


def samples_to_decide_accuracy(k: int, n: int, bound: float, direction: str, level: float = DEFAULT_LEVEL) -> int | None:
    """About how many samples would decide the requirement if the observed accuracy k/n held (None: none)."""
    if n <= 0:
        return None
    p = k / n
    return _search(lambda m: decide(*clopper_pearson(round(p * m), m, level), bound, direction) != INCONCLUSIVE,
                   max(n, 1))


def samples_to_decide_paired(counts: PairedCounts, bound: float, direction: str,
                             level: float = DEFAULT_LEVEL) -> int | None:
    """As :func:`samples_to_decide_accuracy` for a paired difference with the observed cell proportions."""
    if counts.n <= 0:
        return None
    return _search(lambda m: decide(*paired_difference_ci(counts.scaled(m), level), bound, direction)
                   != INCONCLUSIVE, counts.n)


def smallest_detectable_gap(n: int, discordant_share: float, level: float = DEFAULT_LEVEL) -> float:
    """Roughly the smallest paired difference whose interval excludes zero at ``n`` samples, when a share
    ``discordant_share`` of pairs disagree (the McNemar normal approximation: z * sqrt(share / n))."""
    if n <= 0:
        return float("nan")
    from scipy import stats as _scipy

    z = float(_scipy.norm.ppf(1 - (1 - level) / 2))
    share = max(discordant_share, 1 / n)
    return z * math.sqrt(share / n)


def mean_ci(values: Sequence[float], level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean of continuous per-sample values (NaN dropped; one value: a point)."""
    import numpy as np
    from scipy import stats as _scipy

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) == 1:
        return mean, mean
    half = float(_scipy.t.ppf(1 - (1 - level) / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean - half, mean + half
