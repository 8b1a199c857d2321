"""Evaluation: KL measurement (``tether.eval.kl``) and small statistics shared by the recipes' reports."""

from __future__ import annotations

import math


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval (unbiased variance)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, 1.96 * math.sqrt(var / n)
