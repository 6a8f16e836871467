"""Mean ± sample standard deviation over runs, and the gap between two means ± its standard error."""

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
