"""The statistics behind every verdict, fixed before the run (issue 27): which test each kind of claim gets
(Welch, paired, interaction contrast, TOST), at which level, and the correction across the summary table; the
rules: docs/design.md (stats / verdicts) and docs/cpu-profile-budget.md. With few seeds a small real difference
can come out "inconclusive": that is the honest answer, and more seeds are the remedy.

    beats([0.91, 0.92, 0.90], [0.85, 0.86, 0.84])   -> Comparison(verdict="reproduced", p=...)
    alike([0.90, 0.91, 0.89], [0.90, 0.90, 0.91])   -> Comparison(verdict=..., ci=(lo, hi))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ALPHA = 0.05          # one-sided level of every test (two one-sided tests: the 90 % interval)
EQUIVALENCE_MARGIN = 0.01  # "alike" = |difference| <= 1 percentage point (accuracies as fractions)
MIN_SEEDS = 3
CORRECTION = "Benjamini-Hochberg"  # across the summary table's tested claims


@dataclass
class Comparison:
    verdict: str            # "reproduced" | "not reproduced" | "inconclusive" | "too few seeds"
    diff: float             # mean(a) - mean(b) (the contrast, for an interaction)
    p: float | None         # one-sided p of the test that decided (None: not computed)
    ci: tuple[float, float] | None  # 90 % interval of the difference
    n: tuple[int, ...]
    test: str = "Welch"     # "Welch" | "paired" | "interaction" | "TOST Welch" | "TOST paired"
    p_for: float | None = None      # one-sided p in the claim's direction (beats / alike)
    p_against: float | None = None  # one-sided p against it (reversal / a difference beyond the margin)

    def text(self, scale: float = 100.0, unit: str = "pp") -> str:
        parts = [f"Δ = {scale * self.diff:+.2f} {unit}"]
        if self.ci is not None:
            parts.append(f"90% CI [{scale * self.ci[0]:+.2f}, {scale * self.ci[1]:+.2f}] {unit}")
        if self.p is not None:
            parts.append(f"p = {self.p:.3g}")
        parts.append(f"{self.test}, n = {'/'.join(str(k) for k in self.n)}")
        return ", ".join(parts)


def _clean(x: Sequence[float]) -> np.ndarray:
    x = np.asarray(x, dtype=float)  # None -> nan
    return x[~np.isnan(x)]


def _arrays(a: Sequence[float], b: Sequence[float], paired: bool) -> tuple[np.ndarray, np.ndarray]:
    if not paired:
        return _clean(a), _clean(b)
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs equally many values on each side, got {len(a)} and {len(b)}")
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))  # drop a pair if either side is missing: the pairing is by position (seed)
    return a[keep], b[keep]


def _too_few(groups: Sequence[np.ndarray], diff: float, test: str) -> Comparison | None:
    n = tuple(g.size for g in groups)
    return Comparison("too few seeds", diff, None, None, n, test) if min(n) < MIN_SEEDS else None


def _constant(a: np.ndarray, b: np.ndarray, paired: bool) -> bool:
    """No spread at all: scipy's t statistic is undefined (0/0), the difference is exact."""
    return bool(np.ptp(a - b) == 0) if paired else bool(np.ptp(a) == 0 and np.ptp(b) == 0)


def _ttest(a: np.ndarray, b: np.ndarray, paired: bool, alternative: str):
    from scipy import stats

    if paired:
        return stats.ttest_rel(a, b, alternative=alternative)
    return stats.ttest_ind(a, b, equal_var=False, alternative=alternative)


def _interval(a: np.ndarray, b: np.ndarray, paired: bool, alpha: float) -> tuple[float, float]:
    ci = _ttest(a, b, paired, "two-sided").confidence_interval(confidence_level=1 - 2 * alpha)
    return float(ci.low), float(ci.high)


def decide(p_for: float | None, p_against: float | None, alpha: float = ALPHA) -> str:
    """reproduced: the test in the claim's direction is significant; not reproduced: the one against it is."""
    if p_for is None or p_against is None:
        return "too few seeds"
    return "reproduced" if p_for < alpha else ("not reproduced" if p_against < alpha else "inconclusive")


def _result(diff, p_for, p_against, ci, n, test, alpha) -> Comparison:
    verdict = decide(p_for, p_against, alpha)
    return Comparison(verdict, diff, p_against if verdict == "not reproduced" else p_for, ci, n, test, p_for, p_against)


def beats(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA, paired: bool = False) -> Comparison:
    """Is A's mean above B's? One-sided Welch t-test of H0: mean(a) <= mean(b) (``paired``: a paired
    t-test of the per-seed differences; a[i] and b[i] must come from the same seed's model or parent).

    reproduced: p < alpha; not reproduced: the reverse one-sided test is significant (B above A);
    inconclusive: neither."""
    test = "paired" if paired else "Welch"
    a, b = _arrays(a, b, paired)
    diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if (few := _too_few((a, b), diff, test)) is not None:
        return few
    if _constant(a, b, paired):
        return _result(diff, 0.0 if diff > 0 else 1.0, 0.0 if diff < 0 else 1.0, (diff, diff), (a.size, b.size), test, alpha)
    p_for = float(_ttest(a, b, paired, "greater").pvalue)
    p_against = float(_ttest(a, b, paired, "less").pvalue)
    return _result(diff, p_for, p_against, _interval(a, b, paired, alpha), (a.size, b.size), test, alpha)


def alike(a: Sequence[float], b: Sequence[float], margin: float = EQUIVALENCE_MARGIN,
          alpha: float = ALPHA, paired: bool = False) -> Comparison:
    """Are A and B equivalent within ``margin``? TOST: the (1 - 2 alpha) interval of the difference inside
    [-margin, margin] -> reproduced (alike); wholly outside -> not reproduced (a real difference larger than
    the margin); otherwise inconclusive (noise widens the interval: it never makes a conclusion easier).
    p_for: the TOST p; p_against: the one-sided p that the difference exceeds the margin on its side."""
    test = "TOST paired" if paired else "TOST Welch"
    a, b = _arrays(a, b, paired)
    diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if (few := _too_few((a, b), diff, test)) is not None:
        return few
    if _constant(a, b, paired):
        inside = abs(diff) <= margin
        return _result(diff, 0.0 if inside else 1.0, 1.0 if inside else 0.0, (diff, diff), (a.size, b.size), test, alpha)
    # the difference shifted by the margin: H0 diff <= -margin, and H0 diff >= +margin
    p_for = max(float(_ttest(a + margin, b, paired, "greater").pvalue), float(_ttest(a - margin, b, paired, "less").pvalue))
    p_against = (float(_ttest(a - margin, b, paired, "greater").pvalue) if diff >= 0
                 else float(_ttest(a + margin, b, paired, "less").pvalue))
    return _result(diff, p_for, p_against, _interval(a, b, paired, alpha), (a.size, b.size), test, alpha)


def interaction(a_after: Sequence[float], a_before: Sequence[float], b_after: Sequence[float],
                b_before: Sequence[float], alpha: float = ALPHA) -> Comparison:
    """Does A gain more than B from before -> after? Four independent groups; the contrast
    (mean A_after - mean A_before) - (mean B_after - mean B_before) with standard error
    sqrt(sum var_i / n_i) and Welch-Satterthwaite degrees of freedom
    (sum v_i)^2 / sum(v_i^2 / (n_i - 1)), v_i = var_i / n_i; one-sided t-test of H0: contrast <= 0.
    This is the two-way model's interaction term without assuming equal variances."""
    from scipy import stats

    groups = [_clean(g) for g in (a_after, a_before, b_after, b_before)]
    n = tuple(g.size for g in groups)
    test = "interaction"
    diff = float(sum(c * g.mean() for c, g in zip((1, -1, -1, 1), groups))) if min(n) else math.nan
    if (few := _too_few(groups, diff, test)) is not None:
        return few
    v = np.array([g.var(ddof=1) / g.size for g in groups])
    se = math.sqrt(v.sum())
    if se == 0:
        return _result(diff, 0.0 if diff > 0 else 1.0, 0.0 if diff < 0 else 1.0, (diff, diff), n, test, alpha)
    df = v.sum() ** 2 / sum(vi ** 2 / (g.size - 1) for vi, g in zip(v, groups) if vi > 0)
    half = float(stats.t.ppf(1 - alpha, df)) * se
    p_for, p_against = float(stats.t.sf(diff / se, df)), float(stats.t.cdf(diff / se, df))
    return _result(diff, p_for, p_against, (diff - half, diff + half), n, test, alpha)


def claim_p(comparisons: Sequence[Comparison]) -> tuple[float | None, float | None]:
    """(p_for, p_against) of a claim made of several comparisons: it holds only if every part holds
    (intersection-union test: the largest p_for), it is refuted if any part reverses (Bonferroni over
    the parts: the smallest p_against times their number). None where a part was not tested."""
    comparisons = list(comparisons)
    if not comparisons or any(c.p_for is None or c.p_against is None for c in comparisons):
        return None, None
    return max(c.p_for for c in comparisons), min(1.0, len(comparisons) * min(c.p_against for c in comparisons))


def adjust(p: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (`CORRECTION`) of the summary table's tested claims."""
    from scipy.stats import false_discovery_control

    return false_discovery_control(np.asarray(p, dtype=float), method="bh")
