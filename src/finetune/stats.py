"""Mean ± sample standard deviation over runs, the gap between two means ± its standard error, and a t confidence
interval of a mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1) of ``n`` values; ``std`` is ``None`` below two values."""

    mean: float | None
    std: float | None
    n: int


def summarize(values: Sequence[float]) -> Stat:
    """Mean and sample standard deviation; the std needs at least two values."""
    n = len(values)
    if n == 0:
        return Stat(None, None, 0)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n)


def gap(a: Stat, b: Stat) -> Stat:
    """Difference of means ``a - b`` with its standard error, sqrt(s_a^2/n_a + s_b^2/n_b) (independent runs)."""
    if a.mean is None or b.mean is None:
        return Stat(None, None, 0)
    se = math.sqrt(a.std**2 / a.n + b.std**2 / b.n) if a.std is not None and b.std is not None else None
    return Stat(a.mean - b.mean, se, min(a.n, b.n))


# Student's t quantile t_{0.975, df} for df = 1..30 (two-sided 95%); beyond 30 the normal's 1.96 is within 2.3%.
T_975 = (
    *(12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131),
    *(2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
)


def t_half_width(stat: Stat) -> float | None:
    """Half the width of the 95% t-interval of ``stat``'s mean, ``t * s / sqrt(n)``; ``None`` below two values."""
    if stat.std is None or stat.n < 2:
        return None
    df = stat.n - 1
    return (T_975[df - 1] if df <= len(T_975) else 1.96) * stat.std / math.sqrt(stat.n)
