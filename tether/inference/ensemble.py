"""Reward-model ensembles: k members score every completion, one conservative aggregate is optimized.

Coste, Anwar, Kirk, Krueger 2024, "Reward Model Ensembles Help Mitigate Overoptimization" (ICLR, arXiv:2310.02743;
code tlc4418/llm_optimization): mean, worst-case optimization (WCO, the minimum over members) and
uncertainty-weighted optimization (UWO, mean − λ·variance). ``mean_minus_std`` is the same penalty on the standard
deviation, on the reward's own scale (so λ does not change meaning when the rewards are rescaled).

**Variance convention.** The population variance over the k members (divide by k, ``ddof=0``), as the paper's
best-of-N code computes it (numpy's default); its PPO code uses torch's unbiased default (k − 1). Identical members
give variance 0 under both. Members must share a scale (normalize them first): min and variance compare raw numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ENSEMBLE_MODES", "EnsembleReward", "ensemble"]

ENSEMBLE_MODES = ("mean", "min", "mean_minus_std", "uwo")


def ensemble(scores: Tensor, mode: str = "mean", lam: float = 0.5) -> Tensor:
    """Aggregate member scores (B, k) → (B,).

    * ``mean``: (1/k)·Σ_i R_i;
    * ``min``: min_i R_i (WCO);
    * ``mean_minus_std``: mean − λ·std (population std);
    * ``uwo``: mean − λ·Var (population variance; Coste et al.'s UWO, λ = 0.5 their best-of-N default).

    min ≤ mean, and both penalized forms are ≤ mean with equality iff the members agree (or λ = 0). Order of the
    members does not matter."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"ensemble: scores must be (B, k) with k ≥ 1 members, got {tuple(scores.shape)}")
    mean = scores.mean(-1)
    if mode == "mean":
        return mean
    if mode == "min":
        return scores.amin(-1)
    var = ((scores - mean[:, None]) ** 2).mean(-1)  # population variance (ddof=0)
    if mode == "mean_minus_std":
        return mean - lam * var.sqrt()
    if mode == "uwo":
        return mean - lam * var
    raise ValueError(f"ensemble: unknown mode {mode!r}; choose one of {ENSEMBLE_MODES}")


class EnsembleReward:
    """A tether reward ``(prompt, completion, row) -> float | None`` aggregating member rewards with
    :func:`ensemble`. No opinion (None) when any member has none: an aggregate over a subset of members would be a
    different estimator for that row."""

    def __init__(self, members: Mapping[str, Callable[[str, str, Mapping[str, Any]], float | None]] |
                 Sequence[Callable], mode: str = "mean", lam: float = 0.5):
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"EnsembleReward: unknown mode {mode!r}; choose one of {ENSEMBLE_MODES}")
        self.members = dict(members) if isinstance(members, Mapping) else {str(i): m for i, m in enumerate(members)}
        if not self.members:
            raise ValueError("EnsembleReward: no members")
        self.mode, self.lam = mode, lam

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None:
        values = [m(prompt, completion, metadata) for m in self.members.values()]
        if any(v is None for v in values):
            return None
        return float(ensemble(torch.tensor([values], dtype=torch.float64), self.mode, self.lam)[0])
