"""The statistics behind every verdict: a one-sided Welch t-test for "A beats B" and a two one-sided
tests (TOST) equivalence check for "A and B are alike", with the margin stated up front.

Both work on per-seed values (one number per independently trained model). With n seeds per group
the tests have few degrees of freedom, so a small real difference or a tight equivalence can come
out "inconclusive": that is the honest answer, and more seeds are the remedy.

    beats([0.91, 0.92, 0.90], [0.85, 0.86, 0.84])   -> Comparison(verdict="reproduced", p=...)
    alike([0.90, 0.91, 0.89], [0.90, 0.90, 0.91])   -> Comparison(verdict=..., ci=(lo, hi))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ALPHA = 0.05          # one-sided level of every test
EQUIVALENCE_MARGIN = 0.01  # "alike" = |difference| <= 1 percentage point (accuracies as fractions)
MIN_SEEDS = 3


@dataclass
class Comparison:
    verdict: str            # "reproduced" | "not reproduced" | "inconclusive" | "too few seeds"
    diff: float             # mean(a) - mean(b)
    p: float | None         # one-sided p-value of the test that decided (None: not computed)
    ci: tuple[float, float] | None  # 90% Welch interval of the difference (equivalence)
    n: tuple[int, int]

    def text(self, scale: float = 100.0, unit: str = "pp") -> str:
        parts = [f"Δ = {scale * self.diff:+.2f} {unit}"]
        if self.ci is not None:
            parts.append(f"90% CI [{scale * self.ci[0]:+.2f}, {scale * self.ci[1]:+.2f}] {unit}")
        if self.p is not None:
            parts.append(f"p = {self.p:.3g}")
        parts.append(f"n = {self.n[0]}/{self.n[1]}")
        return ", ".join(parts)


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(difference of means, its standard error, Welch-Satterthwaite degrees of freedom)."""
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return float(a.mean() - b.mean()), 0.0, float(a.size + b.size - 2)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return float(a.mean() - b.mean()), se, float(df)


def _arrays(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray([x for x in a if x is not None and not math.isnan(x)], dtype=float)
    b = np.asarray([x for x in b if x is not None and not math.isnan(x)], dtype=float)
    return a, b


def beats(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> Comparison:
    """Is A's mean above B's? One-sided Welch t-test of H0: mean(a) <= mean(b).

    reproduced: p < alpha; not reproduced: the reverse one-sided test is significant (B above A);
    inconclusive: neither."""
    from scipy import stats

    a, b = _arrays(a, b)
    if a.size < MIN_SEEDS or b.size < MIN_SEEDS:
        return Comparison("too few seeds", float(a.mean() - b.mean()) if a.size and b.size else math.nan,
                          None, None, (a.size, b.size))
    diff, se, df = _welch(a, b)
    if se == 0:
        p = 0.0 if diff > 0 else 1.0
        p_rev = 0.0 if diff < 0 else 1.0
    else:
        p = float(stats.t.sf(diff / se, df))
        p_rev = float(stats.t.sf(-diff / se, df))
    verdict = "reproduced" if p < alpha else ("not reproduced" if p_rev < alpha else "inconclusive")
    return Comparison(verdict, diff, p if verdict != "not reproduced" else p_rev, None, (a.size, b.size))


def alike(a: Sequence[float], b: Sequence[float], margin: float = EQUIVALENCE_MARGIN,
          alpha: float = ALPHA) -> Comparison:
    """Are A and B equivalent within ``margin``? TOST: the (1 - 2 alpha) Welch interval of the
    difference lies inside [-margin, margin] -> reproduced; it lies wholly outside -> not reproduced
    (a real difference larger than the margin); otherwise inconclusive. Noise widens the interval,
    so noisier runs can only make "alike" harder to reach, never easier."""
    from scipy import stats

    a, b = _arrays(a, b)
    if a.size < MIN_SEEDS or b.size < MIN_SEEDS:
        return Comparison("too few seeds", float(a.mean() - b.mean()) if a.size and b.size else math.nan,
                          None, None, (a.size, b.size))
    diff, se, df = _welch(a, b)
    half = float(stats.t.ppf(1 - alpha, df)) * se
    lo, hi = diff - half, diff + half
    if -margin <= lo and hi <= margin:
        verdict = "reproduced"
    elif lo > margin or hi < -margin:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    p = None
    if se > 0:  # TOST p-value: the larger of the two one-sided p-values
        p = float(max(stats.t.sf((diff + margin) / se, df), stats.t.sf((margin - diff) / se, df)))
    return Comparison(verdict, diff, p, (lo, hi), (a.size, b.size))


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons: reproduced only if all are; not reproduced
    if any is; otherwise inconclusive (or too few seeds)."""
    verdicts = list(verdicts)
    if not verdicts:
        return "not run"
    if "too few seeds" in verdicts:
        return "too few seeds"
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if any(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    return "inconclusive"
