"""Evaluation: KL measurement (``tether.eval.kl``); ``mean_ci95`` (from ``tether.stats``) for the reports."""

from tether.stats import mean_ci95

__all__ = ["mean_ci95"]
