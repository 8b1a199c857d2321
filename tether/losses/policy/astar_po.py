"""A*-PO stage 2: least-squares regression of the policy's log-ratio onto the optimal advantage.

Notation, aggregation and the departures shared by every objective: see ``tether.losses.policy``. Stage 1 (the
optimal values V*(x) from reference samples) is :func:`tether.losses.policy.astar_po_values`; the online recipe runs
it once before training (``tether.rollout.reference_values``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.losses.policy.surrogates import PolicyLossOutput

__all__ = ["astar_po"]


def astar_po(
    logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    beta: float = 1e-3,
) -> PolicyLossOutput:
    """A*-PO: regress β₂·log π_θ(y|x)/π_ref(y|x) onto the optimal advantage R − V*(x), one sample per prompt.

    Equation (Brantley et al. 2025, "Accelerating RL for LLM Reasoning with Optimal Advantage Regression",
    arXiv:2505.20686, stage 2; code ``ZhaolinGao/A-PO`` ``verl/trainer/apo/core_algos.py::compute_policy_loss``)::

        u_i = β₂ · Σ_t m_{i,t} (log π_θ − log π_ref)(y_{i,t})        sequence log-ratio
        L   = mean_i ( u_i − (R_i − V*(x_i)) )²                        over the rows with a loss token

    With the exact V*(x) = β₂·log E_{π_ref}[exp(R/β₂)] the loss is zero exactly at π* = π_ref·exp(R/β₂)/Z(x), the
    optimum of E[R] − β₂·KL(π‖π_ref) (``tests/losses/test_astar_po.py`` descends its exact expected gradient on a
    bandit to π*). The official code estimates V* with β₁ = 0.5 from 8 reference samples and regresses with
    β₂ = 1e-3 (``scripts/apo_math.sh``): V* is then the soft value at β₁, not β₂, and the target is a proxy.

    Shapes: ``logps`` (differentiable), ``ref_logps``, ``mask`` (B, T); ``rewards``, ``values`` (B,) — each row's
    reward and its prompt's V*. Rows without a loss token (no-opinion rewards) leave the mean.

    KL handling: implicit — the regression target is the KL-regularized optimum; no KL term of its own.
    Stop-gradient: ``ref_logps``, ``rewards``, ``values``. Samples are on-policy; the gradient is that of the squared
    residual with the samples held fixed (the paper's update; it does not differentiate the sampling distribution).
    Departures: the official loss averages over every row of the batch; here rows out of the loss are left out of the
    mean (the same when every reward has an opinion). Padding is inert (0 at masked positions before any arithmetic).
    """
    m = mask.to(torch.bool)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    log_ratio = torch.where(m, logps, zero) - torch.where(m, ref_logps.detach().to(logps.dtype), zero)
    u = beta * log_ratio.sum(-1)
    target = (rewards.detach() - values.detach()).to(u.dtype)
    rows = m.any(-1)
    residual = torch.where(rows, u - target, zero)
    n_rows = rows.sum().clamp_min(1)
    loss = residual.square().sum() / n_rows
    with torch.no_grad():
        metrics = {"residual_abs": (residual.abs().sum() / n_rows).item(),
                   "implicit_advantage": (torch.where(rows, u, zero).sum() / n_rows).item(),
                   "target_advantage": (torch.where(rows, target, zero).sum() / n_rows).item()}
    return PolicyLossOutput(loss, metrics)
