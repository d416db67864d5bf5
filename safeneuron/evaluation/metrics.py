"""Rates with confidence intervals, and the robustness-curve area (pure functions).

Every rate safeneuron reports is ``k / n`` with its count ``n`` and a 95 % Wilson
score interval, which stays inside [0, 1] and is sensible at ``k = 0`` or ``k = n``
(unlike the normal approximation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Rate", "wilson_interval", "rate_of", "curve_area", "mcnemar_exact", "detectable_difference", "ci_list"]

#: Two-sided 95 % normal quantile.
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion ``k / n``; None when ``n == 0``.

    ``center = (k + z^2/2) / (n + z^2)``, ``half = z sqrt(k(n-k)/n + z^2/4) / (n + z^2)``.
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    z2 = z * z
    center = (k + z2 / 2) / (n + z2)
    half = z * math.sqrt(k * (n - k) / n + z2 / 4) / (n + z2)
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its 95 % Wilson interval; ``value`` is None when ``n == 0``."""

    k: int
    n: int

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def ci95(self) -> tuple[float, float] | None:
        return wilson_interval(self.k, self.n)

    def as_dict(self) -> dict:
        ci = self.ci95
        return {"rate": self.value, "k": self.k, "n": self.n, "ci95": list(ci) if ci else None}

    def __str__(self) -> str:
        if not self.n:
            return "n/a"
        lo, hi = self.ci95
        return f"{self.value:.1%} [{lo:.0%}, {hi:.0%}] (n={self.n})"


def ci_list(rate: Rate) -> list[float] | None:
    """``rate``'s 95 % Wilson interval as ``[lo, hi]`` rounded to 6 digits (results.json's form), None when n = 0."""
    ci = rate.ci95
    return [round(ci[0], 6), round(ci[1], 6)] if ci else None


def rate_of(flags: Sequence[bool]) -> Rate:
    """The share of True in ``flags``."""
    return Rate(int(sum(bool(f) for f in flags)), len(flags))


def curve_area(curve: Sequence[Sequence[float]]) -> float | None:
    """Normalised area under an ASR-vs-fraction curve: the trapezoid integral over the
    fraction divided by the fraction range, i.e. the mean ASR across the sweep, in [0, 1].

    ``curve`` is ``[[fraction, asr], ...]`` (sorted here); points with a None ASR are
    dropped. One point gives its ASR; no point gives None.
    """
    points = sorted((float(f), float(a)) for f, a in curve if a is not None)
    if not points:
        return None
    if len(points) == 1 or points[-1][0] == points[0][0]:
        return sum(a for _, a in points) / len(points)
    area = sum((f1 - f0) * (a0 + a1) / 2 for (f0, a0), (f1, a1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired outcomes on the same prompts (e.g. two models' success flags).

    Only the discordant pairs count: ``n01`` prompts where only ``b`` is True, ``n10`` where only ``a``
    is; under the null each discordant pair goes either way with probability 1/2, so
    ``p = P(Binomial(n01 + n10, 1/2) as or more extreme than min(n01, n10))`` (1.0 when no pair differs).
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same prompts: {len(a)} vs {len(b)}")
    n10 = sum(bool(x) and not bool(y) for x, y in zip(a, b))
    n01 = sum(bool(y) and not bool(x) for x, y in zip(a, b))
    if n10 + n01 == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(min(n10, n01), n10 + n01, 0.5).pvalue)


def detectable_difference(n: int, alpha: float = 0.05, power: float = 0.8, p: float = 0.5) -> float:
    """The smallest difference between two rates on ``n`` prompts each that a two-sided test at ``alpha``
    detects with ``power`` (normal approximation, both rates near ``p``: the worst case at 0.5). Paired
    tests on shared prompts do better when the models agree on most prompts; this is the conservative bound
    a report quotes."""
    if n <= 0:
        return float("inf")
    from scipy.stats import norm

    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return float(z * math.sqrt(2 * p * (1 - p) / n))
