"""Small statistics shared by every report: a mean with its 95% confidence interval."""

from __future__ import annotations

import math

__all__ = ["mean_ci95"]


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval (unbiased variance)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, 1.96 * math.sqrt(var / n)
