"""Private pieces shared by the distillation objectives of ``tether.losses.distill`` (``minillm``, ``dpkd``,
``preference_kd``): the record every aggregated objective returns (:class:`DistillLossOutput`, re-exported), the
shape check, the padding rule (every per-position input is replaced by 0 at masked positions, so masked entries
receive exactly zero gradient) and masked token means, as a differentiable loss term or as a detached metric.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tether.losses.policy import aggregate


class DistillLossOutput(NamedTuple):
    """What every aggregated objective here returns.

    Fields:
        loss: the scalar (0-dim) loss to minimize; differentiable w.r.t. the student's inputs only.
        metrics: detached diagnostics as Python floats (token means over valid positions).
    """

    loss: Tensor
    metrics: dict[str, float]


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _check(fn: str, mask: Tensor, **tensors: Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"{fn}: mask must be (B, T), got shape {tuple(mask.shape)}.")
    for name, x in tensors.items():
        if x is None:
            continue
        if x.shape[:2] != mask.shape or x.dim() not in (2, 3):
            raise ValueError(
                f"{fn}: {name} has shape {tuple(x.shape)}; expected (B, T) = {tuple(mask.shape)} "
                "(or (B, T, V) / (B, T, K) for logits and top-k tensors), aligned with mask."
            )


def _inert(mask: Tensor, x: Tensor) -> Tensor:
    """``x`` with 0 at masked positions (over a trailing vocabulary axis if any); exactly zero gradient there."""
    keep = mask.bool() if x.dim() == mask.dim() else mask.bool()[..., None]
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _mean(x: Tensor, mask: Tensor) -> float:
    """Metric: detached token mean of ``x`` over valid positions (0 for an empty mask)."""
    return aggregate(x.detach().to(torch.float64), mask, "token-mean").item()


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Differentiable token mean over valid positions (0 for an empty mask)."""
    return aggregate(_inert(mask, x), mask, "token-mean")
