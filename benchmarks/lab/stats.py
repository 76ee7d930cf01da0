"""The statistics every study reports: intervals of a mean, the paired comparison by seed, Holm's adjustment."""

from __future__ import annotations

import random
import statistics
from typing import Any


def bootstrap(values: list[float], n: int = 5000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of ``values``."""
    rng = random.Random(seed)
    draws = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The Student-t interval of the mean of ``values`` (df = n − 1), the one for a handful of paired seeds."""
    from scipy import stats

    n = len(values)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / n**0.5
    m = statistics.mean(values)
    return m - half, m + half


def paired(d: list[float]) -> dict[str, Any]:
    """Paired differences by seed: mean, Student-t 95% interval, the two-sided one-sample t-test's p (df = n − 1),
    and wins, ties and losses (a tie is a difference of exactly 0: the same test predictions scored right)."""
    from scipy import stats

    p = float(stats.ttest_1samp(d, 0.0).pvalue) if statistics.stdev(d) > 0 else float(statistics.mean(d) == 0)
    return {
        "mean": statistics.mean(d),
        "ci": list(t_interval(d)),
        "n": len(d),
        "wins": sum(x > 0 for x in d),
        "ties": sum(x == 0 for x in d),
        "losses": sum(x < 0 for x in d),
        "p": p,
    }


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values of a family of tests, in the order given: a test is rejected at level α by
    Holm's procedure exactly when its adjusted p is ≤ α."""
    order = sorted(range(len(ps)), key=ps.__getitem__)
    adjusted, running = [1.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values`` times ``scale`` (one value alone; ``–`` for none)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"
