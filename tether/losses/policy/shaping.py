"""Reward shaping and prompt filtering that online RL applies around the loss: GRPO-CARE's consistency bonus and
online difficulty filtering. Neither is a loss: the bonus is added to the reward, the filter decides which prompts'
groups reach the update. (The reference strategies that go with them — EMA reference, periodic resets — move
weights, not tensors of a batch, and live in ``tether.reference``.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.losses.policy._common import groups

__all__ = ["difficulty_filter", "grpo_care_bonus"]


def grpo_care_bonus(
    accuracy: Tensor,
    ref_logps: Tensor,
    answer_mask: Tensor,
    *,
    group_size: int,
    bonus_coef: float = 0.5,
    confidence_cap: float | None = 0.95,
    margin: float = 0.01,
) -> Tensor:
    """GRPO-CARE's consistency bonus: reward correct answers that the EMA reference finds likely.

    Equation (code ``src/r1-v/src/open_r1/trainer/grpo_trainer_ref_ema.py``, ``use_care``)::

        conf_i = min( exp( Σ_{t∈answer} log π_ref(y_{i,t}) / (|answer_i| + 1e-6) ), u )
        A      = { i : acc_i > 0.1 and acc_i ≥ mean_G acc }               (relative high-accuracy set)
        τ      = mean_{i∈A} conf_i − margin
        b_i    = λ·acc_i  if i ∈ A and conf_i ≥ τ,  else 0                 (add to the reward: R_i ← R_i + b_i)

    Paper: Chen et al. 2025, "GRPO-CARE: Consistency-Aware Reinforcement Learning for Multimodal Reasoning".
    Code: ``TencentARC/GRPO-CARE`` (read: the block above, verified line by line).

    Shapes: ``accuracy`` ``(B,)`` (the accuracy reward alone, not the total); ``ref_logps`` ``(B, T)`` log-probs of the
    sampled tokens under the EMA reference; ``answer_mask`` ``(B, T)`` marks the final-answer span (tokenizer-dependent
    ``<answer>`` detection is the caller's). Returns the bonus ``(B,)``, detached.

    Defaults (``scripts/run_grpo_care_margin0.01_seed_bench_r1.sh``): ``λ = 0.5``, ``u = 0.95``, ``margin = 0.01``.
    Departure: groups are the G responses of one prompt; the official "group" is the per-device batch (1 prompt × 8
    generations in its scripts, the same thing there). An empty answer span gives conf = exp(0) = 1 → u, as in the code.
    """
    with torch.no_grad():
        am = answer_mask.to(torch.bool)
        mean_logp = torch.where(am, ref_logps, torch.zeros_like(ref_logps)).sum(-1) / (am.sum(-1) + 1e-6)
        conf = torch.exp(mean_logp)
        if confidence_cap is not None:
            conf = conf.clamp(max=confidence_cap)
        acc = groups(accuracy.detach().to(conf.dtype), group_size, "grpo_care_bonus")
        conf = groups(conf, group_size, "grpo_care_bonus")
        accurate = (acc > 0.1) & (acc >= acc.mean(-1, keepdim=True))
        n_acc = accurate.sum(-1, keepdim=True)
        threshold = torch.where(accurate, conf, torch.zeros_like(conf)).sum(-1, keepdim=True)
        threshold = threshold / n_acc.clamp_min(1) - margin
        bonus = torch.where(accurate & (conf >= threshold), bonus_coef * acc, torch.zeros_like(acc))
    return bonus.reshape(-1)


def difficulty_filter(pass_rates: Tensor, low: float, high: float) -> Tensor:
    """Balanced online difficulty filtering: keep prompts with ``low ≤ p̂ ≤ high``.

    ``p̂ = #correct/G`` over a prompt's G rollouts, ``Shape: (Q,)`` → boolean keep mask ``(Q,)``. The caller refills the
    batch with new prompts until it is full ("stack" rollout) and should log how many were dropped.

    Paper: Bae et al. 2025, "Online Difficulty Filtering for Reasoning Oriented Reinforcement Learning",
    arXiv:2504.03380 (abstract read: expected improvement is lower-bounded by the variance p(1−p) of the success
    probability, so intermediate difficulty is best). The band has no default: our recollection [0.25, 0.75] is
    UNVERIFIED. DAPO's dynamic sampling (``0 < p̂ < 1``) is the special case ``low=1/G, high=1−1/G``.
    Both ends are inclusive with a 1e-9 tolerance, so ``k/G`` on a bound is kept despite float rounding.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"difficulty_filter: need 0 ≤ low ≤ high ≤ 1, got low={low}, high={high}")
    p = pass_rates.detach()
    return (p >= low - 1e-9) & (p <= high + 1e-9)
