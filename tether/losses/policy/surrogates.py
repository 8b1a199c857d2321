"""Per-token policy-gradient objectives for online RL, as pure functions of log-prob tensors.

Notation: for response token t of sequence i, ``log π_θ`` (``logps``) is the trained policy's log-prob of the sampled
token, ``log π_old`` (``old_logps``) that of the policy that generated the rollouts, ``log π_ref`` (``ref_logps``) that
of the frozen reference. ``ℓ = log π_θ − log π_old`` is the log-ratio and ``ρ = exp(ℓ)`` the ratio; ``A`` the advantage;
``m`` the response mask; ``sg(·)`` stop-gradient. On the first mini-batch of an on-policy step ``old_logps`` equals
``logps.detach()`` numerically, so ρ ≡ 1.

Calling convention shared by every objective here:

* positional ``(logps, old_logps, advantages, mask)``: ``logps`` ``Shape: (B, T)`` (differentiable),
  ``old_logps`` ``(B, T)`` (treated as constant; GPG ignores it and accepts None), ``advantages`` ``(B,)``
  (one per sequence, broadcast over its tokens) or ``(B, T)``, ``mask`` ``(B, T)`` bool or 0/1;
* keyword-only hyperparameters (and ``ref_logps`` for GRPO's KL term), defaults documented on each function;
* returns :class:`PolicyLossOutput` — a scalar loss to minimize, aggregated by :func:`aggregate`, and a small dict
  of detached float metrics.

Departures shared by every function here:

1. Padding is inert: entries at masked positions are replaced by 0 before any math, so they may hold anything
   (even −inf or NaN) and receive exactly zero gradient.
2. Metrics are Python floats (``.item()``, one device sync per metric); means are over valid tokens.
3. Inputs keep their dtype; pass fp32 log-probs (the ratio ``exp(ℓ)`` of bf16 log-probs is coarse). Tests compare
   each objective with a float64 twin at fp32 ``atol 1e-5``.

Which divergence the gradient follows (k1/k2/k3 are the estimators of Schulman 2020, "Approximating KL Divergence";
the gradients are derived in ``tether.kl`` and proved by exact enumeration in ``tests/losses/test_policy_surrogates.py``
and by bandit fixed points in ``tests/losses/test_policy_bandit.py``):

==========================  ===========================  ============================================
KL placement                expected gradient            fixed point on a bandit (reward r, coef β)
==========================  ===========================  ============================================
k1 in reward (returns)      ∇KL(π‖π_ref)                 π* ∝ π_ref·exp(r/β)
k1 in loss                  0 (noise only)               none — no regularization
k2 in loss                  ∇KL(π‖π_ref)                 π* ∝ π_ref·exp(r/β)
k3 in loss (on-policy)      ∇KL(π_ref‖π)  (FORWARD)      π*(a) = β·π_ref(a)/(c − r(a)), Σ π* = 1
k3_is = w·k3, w = π/π_old   ∇KL(π‖π_ref) from π_old      π* ∝ π_ref·exp(r/β)
sg(w)·k2 (off-policy)       ∇KL(π‖π_ref) from π_old      π* ∝ π_ref·exp(r/β)
sg(w)·k3 (off-policy)       ∇KL(π_ref‖π) from π_old      the forward-KL fixed point above
exact (full vocabulary)     ∇Σ_t KL(π(·|s_t)‖π_ref(·|s_t))  π* ∝ π_ref·exp(r/β) (one-token bandit)
==========================  ===========================  ============================================

:func:`kl_penalty` computes every row's loss term; ``importance_weight=True`` gives the sg(w) rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from tether import kl
from tether.losses.policy.advantages import (
    dapo_dynamic_sampling_mask,  # re-exported: DAPO's filter sits beside dapo()
    outcome_to_token_rewards,
)

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "PolicyLossOutput",
    "aggregate",
    "cpgd",
    "dapo",
    "dapo_dynamic_sampling_mask",
    "gpg",
    "grpo",
    "kl_in_reward",
    "kl_penalty",
    "ppo_clip",
    "ppo_clip_per_token",
]

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KLEstimator = Literal["k1", "k2", "k3", "k3_is", "exact"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "k3_is", "exact")
#: Log-ratios are clamped to ±this before ``exp`` (verl's convention); it only bites at ratios beyond e^±20.
LOG_RATIO_CLAMP = 20.0


class PolicyLossOutput(NamedTuple):
    """What every policy objective returns.

    Fields:
        loss: the aggregated loss to minimize, a scalar Tensor (0-dim); differentiable w.r.t. ``logps``.
        metrics: detached diagnostics as Python floats, e.g. ``clip_frac``, ``ratio_mean``, ``ppo_kl``, ``kl``.
    """

    loss: Tensor
    metrics: dict[str, float]


# ----------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------


def aggregate(per_token: Tensor, mask: Tensor, mode: AggMode = "token-mean", max_len: int | None = None) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss matrix ``M`` to a scalar. The mode changes the GRADIENT, not only its scale.

    Modes (``m`` the mask, ``|y_i| = Σ_t m_{i,t}``, ``S`` the sequences with ``|y_i| > 0``)::

        token-mean               Σ_{i,t} m·M / Σ_{i,t} m             every token weighs the same (DAPO; verl default)
        seq-mean-token-mean      (1/|S|) Σ_i (1/|y_i|) Σ_t m·M        every SEQUENCE weighs the same (GRPO paper)
        seq-mean-token-sum       (1/|S|) Σ_i Σ_t m·M                  long sequences weigh more
        seq-mean-token-sum-norm  (1/|S|) Σ_i Σ_t m·M / L              Dr. GRPO; L = max_len, a CONSTANT

    Worked example (ragged): ``M = [[1, 2, 3], [4, ·, ·]]``, ``m = [[1, 1, 1], [1, 0, 0]]``, ``max_len = 3``:

    =========================  ===========================  ==============================
    mode                       value                        ∂loss/∂M (row 0 | row 1)
    =========================  ===========================  ==============================
    token-mean                 (1+2+3+4)/4       = 2.5      1/4 1/4 1/4 | 1/4
    seq-mean-token-mean        (6/3 + 4/1)/2     = 3        1/6 1/6 1/6 | 1/2
    seq-mean-token-sum         (6 + 4)/2         = 5        1/2 1/2 1/2 | 1/2
    seq-mean-token-sum-norm    (6/3 + 4/3)/2     = 5/3      1/6 1/6 1/6 | 1/6
    =========================  ===========================  ==============================

    ``seq-mean-token-mean`` gives the short sequence's token 3× the weight of each long-sequence token — the
    length bias Dr. GRPO removes; the other three weigh tokens uniformly and differ only in scale (which still
    interacts with the learning rate, the KL coefficient and gradient clipping).

    Shape: ``per_token`` and ``mask`` (B, T); returns a 0-dim tensor.

    Args:
        mode: one of ``AGG_MODES``.
        max_len: the constant L of ``seq-mean-token-sum-norm``; pass the generation max length (Dr. GRPO uses
            ``generate_max_length``). Defaults to T, the padded width of this batch — which varies between batches
            and brings the length bias back; prefer an explicit value.

    Departures:
        * ``seq-mean-token-sum-norm`` averages over sequences, as Dr. GRPO's own code (oat ``masked_sum`` with
          ``constant_normalizer``, then mean over the batch). verl instead SUMS over sequences before dividing by
          L, i.e. verl's value = ours × (number of sequences); the direction is the same, the scale grows with the
          batch.
        * Sequences with no valid token are left out of the count ``|S|`` in all three seq-mean modes (verl's
          ``seq-mean-token-mean`` would return NaN for them); an all-masked batch gives 0.
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(
            f"aggregate: per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must both be (B, T)."
        )
    valid = mask.bool()
    zero = per_token.new_zeros(())
    masked = torch.where(valid, per_token, zero)
    if mode == "token-mean":
        return masked.sum() / valid.sum().clamp(min=1)
    tokens = valid.sum(dim=1)
    n_seq = (tokens > 0).sum().clamp(min=1)
    seq_sum = masked.sum(dim=1)
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / tokens.clamp(min=1)
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum
    elif mode == "seq-mean-token-sum-norm":
        length = per_token.shape[1] if max_len is None else max_len
        if length <= 0:
            raise ValueError(f"aggregate: max_len must be a positive token count, got {max_len}.")
        per_seq = seq_sum / length
    else:
        raise ValueError(f"aggregate: unknown mode {mode!r}; choose one of {AGG_MODES}.")
    return per_seq.sum() / n_seq


# ----------------------------------------------------------------------------------------------------------
# shared building blocks
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(fn: str, logps: Tensor, mask: Tensor, **others: Tensor | None) -> None:
    if logps.dim() != 2 or logps.shape != mask.shape:
        raise ValueError(f"{fn}: logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must both be (B, T).")
    for name, value in others.items():
        if value is not None and value.shape != logps.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(value.shape)}, expected (B, T) = {tuple(logps.shape)}.")


def _zero_padding(x: Tensor, valid: Tensor) -> Tensor:
    """Replace masked entries by 0 so padding can never leak NaN/inf into values or gradients."""
    return torch.where(valid, x, x.new_zeros(()))


def _broadcast_advantages(fn: str, advantages: Tensor, logps: Tensor) -> Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == logps.shape[0]:
        return advantages[:, None].expand_as(logps).to(logps.dtype)
    if advantages.shape == logps.shape:
        return advantages.to(logps.dtype)
    raise ValueError(
        f"{fn}: advantages must be (B,) = ({logps.shape[0]},) or (B, T) = {tuple(logps.shape)}, "
        f"got {tuple(advantages.shape)}."
    )


def _masked_mean(x: Tensor, valid: Tensor) -> float:
    with torch.no_grad():
        return (torch.where(valid, x.to(torch.float64), 0.0).sum() / valid.sum().clamp(min=1)).item()


def ppo_clip_per_token(
    ratio: Tensor,
    advantages: Tensor,
    clip_eps_low: float | Tensor,
    clip_eps_high: float | Tensor,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-token PPO-clip loss from the ratio, before masking and aggregation (no checks, no metrics).

    Equation (Schulman et al. 2017, arXiv:1707.06347, Eq. 7; elementwise, minimized)::

        L = max( −A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high) )          = −min(ρA, clip(ρ)A)
        L = min( L, −c·A )   where A < 0                             (dual-clip, if ``dual_clip`` = c is given)

    Shape: ``ratio`` (B, T); ``advantages`` broadcastable to it, e.g. (B, 1) or (B, T); ``clip_eps_*`` floats or
    tensors broadcastable to (B, T) (Archer's per-token clip ranges). Returns ``(loss, clipped, dual_clipped)``, all
    (B, T): ``clipped`` marks where the clipped term is active, ``dual_clipped`` where the dual-clip cap is (all False
    without ``dual_clip``); the two never overlap for c > 1, and the gradient w.r.t. ρ is zero on both.
    :func:`ppo_clip` is this plus input checks, inert padding, aggregation and metrics.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip is None:
        return per_token, clip_active, torch.zeros_like(clip_active)
    cap = -advantages * dual_clip
    dual = (advantages < 0) & (per_token > cap)
    return torch.where(advantages < 0, torch.minimum(per_token, cap), per_token), clip_active, dual


def _clipped_surrogate(
    fn: str,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """PPO clipped per-token loss (see :func:`ppo_clip`) with optional dual-clip; returns (per_token, metrics,
    valid)."""
    _check_inputs(fn, logps, mask, old_logps=old_logps)
    if clip_eps_low < 0 or clip_eps_high < 0:
        raise ValueError(f"{fn}: clip ranges must be ≥ 0, got ε_low={clip_eps_low}, ε_high={clip_eps_high}.")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"{fn}: dual_clip c must be > 1 (verl asserts the same), got {dual_clip}; None disables.")
    valid = mask.bool()
    adv = _zero_padding(_broadcast_advantages(fn, advantages, logps), valid)
    log_ratio = _zero_padding(logps, valid) - _zero_padding(old_logps.detach(), valid)
    log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    per_token, clipped, dual = ppo_clip_per_token(ratio, adv, clip_eps_low, clip_eps_high, dual_clip)
    metrics = {"clip_frac": _masked_mean(clipped, valid)}
    if dual_clip is not None:
        metrics["clip_frac_lower"] = _masked_mean(dual, valid)
    metrics["ratio_mean"] = _masked_mean(ratio, valid)
    metrics["ppo_kl"] = _masked_mean(-log_ratio, valid)
    return per_token, metrics, valid


# ----------------------------------------------------------------------------------------------------------
# PPO-clip family
# ----------------------------------------------------------------------------------------------------------


def ppo_clip(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = 3.0,
    agg: AggMode = "token-mean",
    max_len: int | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> PolicyLossOutput:
    """PPO clipped surrogate per token, with clip-higher (ε_low ≠ ε_high) and dual-clip for negative advantages.

    Equation (minimized)::

        ℓ = clamp(log π_θ − log π_old, −20, 20),   ρ = exp(ℓ)
        L_t = max( −A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high) )             = −min(ρA, clip(ρ)A)
        L_t = min( L_t, −c·A )   where A < 0                               (dual-clip, cap −c·A = c·|A|)
        loss = aggregate(L, m, agg)

    Piecewise: for A ≥ 0, ``L = −A·min(ρ, 1+ε_high)`` (gradient zero once ρ > 1 + ε_high); for A < 0,
    ``L = |A|·min(max(ρ, 1−ε_low), c)`` (gradient zero for ρ < 1 − ε_low and for ρ > c). At ρ = 1 the loss is
    ``aggregate(−A)`` and its gradient ``−A·∇log π_θ`` (REINFORCE with baseline).

    Papers: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347, Eq. 7; dual-clip: Ye et
    al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", Eq. 5; clip-higher: DAPO (Yu et al. 2025) Eq. 10.
    Code: verl ``compute_policy_loss_vanilla``.

    Shape: ``logps``, ``old_logps``, ``mask`` (B, T); ``advantages`` (B,) or (B, T); loss 0-dim.

    Args:
        clip_eps: ε for both sides (0.2: PPO paper, verl ``clip_ratio``).
        clip_eps_low, clip_eps_high: override either side (DAPO: 0.2 / 0.28). ``ε_low ≥ 1`` removes the lower clip.
        dual_clip: c > 1 (verl ``clip_ratio_c = 3.0``); None disables.
        agg, max_len: see :func:`aggregate`; verl's default ``token-mean``.
        log_ratio_clamp: ℓ is clamped to ±this before ``exp`` (verl: 20); the gradient is zero beyond it.

    Metrics: ``clip_frac`` (clipped term active), ``clip_frac_lower`` (dual-clip active, if enabled),
    ``ratio_mean``, ``ppo_kl`` (mean of ``log π_old − log π_θ``, verl's k1 estimate of KL(π_old‖π_θ)).
    Gradient: the policy gradient of the clipped surrogate; no KL term (see :func:`grpo`).
    Stop-gradient: ``old_logps`` and ``advantages``. Departures: none from verl.
    """
    eps_low = clip_eps if clip_eps_low is None else clip_eps_low
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token, metrics, _ = _clipped_surrogate(
        "ppo_clip", logps, old_logps, advantages, mask, eps_low, eps_high, dual_clip, log_ratio_clamp
    )
    return PolicyLossOutput(aggregate(per_token, mask, agg, max_len), metrics)


def kl_penalty(
    logps: Tensor,
    ref_logps: Tensor | None,
    mask: Tensor,
    *,
    estimator: KLEstimator = "k3",
    old_logps: Tensor | None = None,
    importance_weight: bool = False,
    token_kl: Tensor | None = None,
    agg: AggMode = "token-mean",
    max_len: int | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> Tensor:
    """The KL term of a policy loss, ``aggregate(c_t·k_t)``, for every estimator the online recipe offers.

    Equation (ℓ_ref = log π_θ − log π_ref, w = exp(log π_θ − log π_old), sg = stop-gradient)::

        k1: ℓ_ref     k2: ½ ℓ_ref²     k3: exp(−ℓ_ref) − 1 + ℓ_ref     k3_is: w·k3  (w differentiable)
        exact: KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) over the full vocabulary (``token_kl``, from tether.logprobs)
        c_t = sg(w) when importance_weight (k1/k2/k3), else 1

    Expected gradient for samples from π_old (table in the module docstring; bandit proofs in
    ``tests/losses/test_policy_bandit.py``). ``importance_weight=True`` multiplies k1/k2/k3 by the detached ratio so
    that off-policy mini-batches (several updates per rollout) keep the ON-POLICY gradient of each estimator:
    sg(w)·k2 follows ∇KL(π‖π_ref), sg(w)·k3 follows ∇KL(π_ref‖π), sg(w)·k1 still has expected gradient 0.
    ``k3_is`` (RPG) has a differentiable weight and follows ∇KL(π‖π_ref) for any π_old — the same gradient as
    sg(w)·k2. ``exact`` is already an expectation over the next token, so it needs no action-level weight; its
    gradient is that of Σ_t KL_t at the sampled states.

    Shape: ``logps``, ``ref_logps``, ``old_logps``, ``mask``, ``token_kl`` (B, T); output 0-dim.
    Stop-gradient: ``ref_logps``, ``old_logps``. Padding is inert (see the module docstring).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; choose one of {KL_ESTIMATORS}.")
    valid = mask.bool()
    if estimator == "exact":
        if token_kl is None:
            raise ValueError("kl_penalty: estimator='exact' needs token_kl= (B, T), the full-vocabulary KL per token "
                             "(tether.logprobs.token_stats(..., stats=['kl']))")
        _check_inputs("kl_penalty", logps, mask, token_kl=token_kl)
        return aggregate(_zero_padding(token_kl, valid), mask, agg, max_len)
    if ref_logps is None:
        raise ValueError(f"kl_penalty: estimator {estimator!r} needs ref_logps= (the reference's log-probs of the "
                         "sampled tokens, (B, T))")
    needs_old = estimator == "k3_is" or importance_weight
    if needs_old and old_logps is None:
        raise ValueError("kl_penalty: k3_is and importance_weight=True need old_logps= (the sampler's log-probs)")
    _check_inputs("kl_penalty", logps, mask, ref_logps=ref_logps, old_logps=old_logps)
    logps_v, ref_v = _zero_padding(logps, valid), _zero_padding(ref_logps.detach(), valid)
    log_ratio = (logps_v - _zero_padding(old_logps.detach(), valid)).clamp(-log_ratio_clamp, log_ratio_clamp) \
        if needs_old else None
    if estimator == "k1":
        penalty = kl.k1(logps_v, ref_v)
    elif estimator == "k2":
        penalty = kl.k2(logps_v, ref_v)
    else:
        penalty = kl.k3(logps_v, ref_v)
    if estimator == "k3_is":
        penalty = torch.exp(log_ratio) * penalty
    elif importance_weight:
        penalty = torch.exp(log_ratio).detach() * penalty
    return aggregate(penalty, mask, agg, max_len)


def grpo(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    kl_coef: float = 0.04,
    kl_estimator: KLEstimator = "k3",
    kl_importance_weight: bool = False,
    token_kl: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: AggMode = "seq-mean-token-mean",
    max_len: int | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> PolicyLossOutput:
    """GRPO: PPO-clip on group-relative advantages plus a per-token KL penalty to π_ref in the LOSS.

    Equation (DeepSeekMath Eq. 3 with the Eq. 4 estimator as ``k3``; minimized)::

        L_t  = PPO-clip per-token loss (see ppo_clip)  +  β·k_t
        k_t  = k1: ℓ_ref                     ℓ_ref = log π_θ − log π_ref
               k2: ½ ℓ_ref²
               k3: exp(−ℓ_ref) − 1 + ℓ_ref   (DeepSeekMath's estimator; verl "low_var_kl")
               k3_is: w·k3,  w = exp(log π_θ − log π_old)   (w differentiable: importance-corrected k3)
        loss = aggregate(L, m, agg)

    Which divergence the KL term's gradient follows (samples from π_old; on-policy means π_old = π_θ):

    * ``k1``: expected gradient 0 — the term regularizes nothing (its value still estimates KL(π‖π_ref)).
    * ``k2``: ∇KL(π_θ‖π_ref) on-policy — the exact reverse-KL gradient (biased VALUE).
    * ``k3``: ∇KL(π_ref‖π_θ) on-policy — the FORWARD KL, although its value estimates the reverse KL; off-policy
      (several updates per batch) it follows no KL at all (Zhang et al. 2025, RPG, arXiv:2505.17508, §2.2). This is the
      paper's choice.
    * ``k3_is``: ∇KL(π_θ‖π_ref) for samples from any π_old (on- or off-policy) — the reverse KL, exactly.

    These are token-level statements; none of the in-loss estimators reproduces the sequence-level KL gradient
    (that needs the KL in the reward with returns-to-go: :func:`kl_in_reward`).

    Paper: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    arXiv:2402.03300, Eq. 3–4 (β = 0.04, seq-mean-token-mean; the β value is recalled, not re-read). verl's GRPO
    example instead uses ``kl_coef=0.001, agg="token-mean", dual_clip=3.0``. Importance-corrected k3: Zhang et al.
    2025, "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning" (RPG), arXiv:2505.17508.

    Shape: as :func:`ppo_clip`; ``ref_logps`` (B, T).

    Args:
        ref_logps: reference log-probs of the sampled tokens; required when ``kl_coef > 0``.
        kl_coef: β (0.04 paper; 0 disables the term and ``ref_logps`` may be None).
        kl_estimator: one of ``KL_ESTIMATORS``; see above and :func:`kl_penalty` (``exact`` needs ``token_kl``).
        kl_importance_weight: multiply k1/k2/k3 by the detached ratio sg(π_θ/π_old), so that off-policy
            mini-batches keep each estimator's on-policy gradient (:func:`kl_penalty`).
        token_kl: (B, T) exact full-vocabulary KL per token, for ``kl_estimator="exact"``.
        clip_eps, clip_eps_low, clip_eps_high, dual_clip, log_ratio_clamp: as :func:`ppo_clip` (dual-clip off:
            the paper has none).
        agg, max_len: see :func:`aggregate`; the KL term is aggregated with the same mode (as verl).

    Metrics: those of :func:`ppo_clip`, plus ``pg_loss`` and ``kl`` (the aggregated KL-term value, before β).
    Stop-gradient: ``old_logps``, ``ref_logps``, ``advantages``.
    Departures: verl clamps the k3 value to [−10, 10] (zero gradient beyond); we do not clamp the KL value.
    """
    eps_low = clip_eps if clip_eps_low is None else clip_eps_low
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"grpo: unknown kl_estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}.")
    per_token, metrics, _ = _clipped_surrogate(
        "grpo", logps, old_logps, advantages, mask, eps_low, eps_high, dual_clip, log_ratio_clamp
    )
    pg_loss = aggregate(per_token, mask, agg, max_len)
    metrics["pg_loss"] = pg_loss.item()
    if kl_coef == 0:
        return PolicyLossOutput(pg_loss, metrics)
    if ref_logps is None and kl_estimator != "exact":
        raise ValueError(
            "grpo: kl_coef > 0 needs ref_logps= (the reference model's log-probs of the sampled tokens, (B, T)); "
            "pass them or set kl_coef=0."
        )
    kl_term = kl_penalty(logps, ref_logps, mask, estimator=kl_estimator, old_logps=old_logps,
                         importance_weight=kl_importance_weight, token_kl=token_kl, agg=agg, max_len=max_len,
                         log_ratio_clamp=log_ratio_clamp)
    metrics["kl"] = kl_term.item()
    return PolicyLossOutput(pg_loss + kl_coef * kl_term, metrics)


def dapo(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    dual_clip: float | None = None,
    agg: AggMode = "token-mean",
    max_len: int | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> PolicyLossOutput:
    """DAPO: PPO-clip with decoupled clip range (clip-higher), token-level mean, no KL term.

    Equation (DAPO Eq. 8–10; minimized)::

        loss = (1/Σ_i |y_i|) Σ_i Σ_t −min( ρ_{i,t}·Â_i, clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high)·Â_i )

    With A > 0 the gradient is non-zero for ρ < 1.28 and zero above; with A < 0 it is zero for ρ < 0.8. Advantages
    are GRPO's (``grpo_advantages``) on rule rewards ±1, usually after dynamic sampling
    (:func:`dapo_dynamic_sampling_mask`) and with the overlong penalty added to the reward.

    Paper: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476, Eq. 8–10
    (ε_low = 0.2, ε_high = 0.28). Code: verl ``docs/algo/dapo.md``, ``recipe/dapo``.

    Shape: as :func:`ppo_clip`.
    Args: as :func:`ppo_clip`; ``agg`` defaults to ``token-mean`` (DAPO's token-level loss).
    Gradient: policy gradient of the clipped surrogate only; no KL regularization (DAPO drops it).
    Departures: dual-clip is off by default (the paper has none; verl's DAPO recipe scripts set
    ``clip_ratio_c=10.0`` — pass ``dual_clip=10.0`` to match them).
    """
    per_token, metrics, _ = _clipped_surrogate(
        "dapo", logps, old_logps, advantages, mask, clip_eps_low, clip_eps_high, dual_clip, log_ratio_clamp
    )
    return PolicyLossOutput(aggregate(per_token, mask, agg, max_len), metrics)


# ----------------------------------------------------------------------------------------------------------
# ratio-free policy gradients
# ----------------------------------------------------------------------------------------------------------


def gpg(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    agg: AggMode = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """GPG: plain policy gradient on (rescaled) group-centred advantages — no ratio, no clip, no KL.

    Equation (minimized)::

        loss = −(1/Σ_{i,t} m) Σ_{i,t} m·Â_i·log π_θ(y_{i,t})

    with ``Â`` from :func:`tether.losses.policy.advantages.gpg_advantages` (the α rescaling lives there). The loss VALUE
    is ``−Â·log π`` (not meaningful on its own); its gradient ``−Â·∇log π_θ`` is REINFORCE with a group baseline. At
    θ = θ_old it equals the gradient of :func:`ppo_clip` (ρ = 1, clip inactive) on the same advantages.

    Paper: Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
    arXiv:2504.02546;
    code: AMAP-ML/GPG ``gpg_trainer.py`` (token-mean over the local batch, β = 0 in all recipes).

    Shape: ``logps``, ``mask`` (B, T); ``advantages`` (B,) or (B, T); ``old_logps`` (B, T) or None.
    Args:
        old_logps: not used by the loss (GPG takes one gradient step per batch); if given, ``ratio_mean`` and
            ``ppo_kl`` are reported so that off-policy use is visible.
        agg, max_len: see :func:`aggregate`.
    Gradient: unbiased on-policy only; there is no importance correction, so do not reuse a batch.
    Departures: the optional ``β·k3`` term of the official trainer is omitted (β = 0 in every recipe).
    """
    _check_inputs("gpg", logps, mask, old_logps=old_logps)
    valid = mask.bool()
    adv = _zero_padding(_broadcast_advantages("gpg", advantages, logps), valid)
    logps_v = _zero_padding(logps, valid)
    loss = aggregate(-adv * logps_v, mask, agg, max_len)
    metrics: dict[str, float] = {}
    if old_logps is not None:
        log_ratio = (logps_v - _zero_padding(old_logps, valid)).detach()
        metrics["ratio_mean"] = _masked_mean(torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), valid)
        metrics["ppo_kl"] = _masked_mean(-log_ratio, valid)
    return PolicyLossOutput(loss, metrics)


def cpgd(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    drift_coef: float = 0.01,
    drift_clip: float = 2.0,
    agg: AggMode = "token-mean",
    max_len: int | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> PolicyLossOutput:
    """CPGD: policy gradient on the CLIPPED LOG-ratio plus a gradient-clipped policy-drift penalty KL(π_old‖π_θ).

    Equation (CPGD Eq. 1–2 and §4.3; minimized)::

        ℓ    = log π_θ − log π_old
        Φ_t  = min( ℓ·A, clip(ℓ, log(1−ε), log(1+ε))·A )
        E_t  = min( sg(ρ) − 1, c )·log π_θ                   ρ = exp(ℓ)
        L_t  = −Φ_t + α·E_t,    loss = aggregate(L, m, agg)

    Gradients: ``∇(−Φ) = −A·∇log π_θ`` while ℓ is inside the clip range on the side A pushes towards (for A > 0,
    zero once ℓ > log(1+ε); for A < 0, zero once ℓ < log(1−ε)) — no ratio multiplies the gradient. The drift
    gradient ``α·min(ρ − 1, c)·∇log π_θ`` is, under π_old samples, the k3-form gradient of KL(π_old‖π_θ) (the
    FORWARD KL to the old policy: E_old[(ρ−1)∇log π_θ] = ∇KL(π_old‖π_θ)) with its weight capped at c, i.e. the
    gradient — not the value — is clipped. At θ = θ_old the drift gradient is 0 and the loss gradient is
    ``−A·∇log π_θ`` (= GRPO/GPG).

    Paper: Liu et al. 2025, "CPGD: Toward Stable Rule-based Reinforcement Learning for Language Models",
    arXiv:2505.12504, Eq. 1–2 and §4.3; code: MM-EUREKA ``openrlhf/models/loss.py`` (``policy_drift_coef 0.01``,
    ``policy_drift_clip_eps 2.0``, ``eps_clip 0.2``). Advantages: ``drgrpo_advantages`` (ω = 1),
    ``grpo_advantages`` (ω = 1/std, the example script's ``group_norm``), or the clip-filter-like weight.

    Shape: as :func:`ppo_clip`.
    Args:
        clip_eps: ε ∈ (0, 1); the log-ratio is clipped to [log(1−ε), log(1+ε)].
        drift_coef: α, the policy-drift weight.
        drift_clip: c, the cap on the drift weight ρ − 1 (ratio cap 1 + c = 3).
        agg, max_len: see :func:`aggregate`; ``token-mean`` as the code (the paper normalizes per prompt group).
        log_ratio_clamp: ℓ is clamped before ``exp`` in the (detached) drift weight only.
    Metrics: ``clip_frac`` (Φ's clipped branch active and different), ``ratio_mean``, ``ppo_kl``,
    ``drift_weight_mean`` (mean of min(ρ − 1, c)).
    Stop-gradient: ``old_logps``, ``advantages``, and ρ inside the drift weight.
    Departures: the drift term's VALUE is the surrogate ``min(ρ−1, c)·log π_θ``, built for its gradient (CPGD §4.3's
    clipped drift gradient); the value itself means nothing; the tight-to-loose clip schedule of the paper is not
    included.
    """
    _check_inputs("cpgd", logps, mask, old_logps=old_logps)
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"cpgd: clip_eps must lie in (0, 1) so that log(1 − ε) exists, got {clip_eps}.")
    if drift_clip <= 0:
        raise ValueError(f"cpgd: drift_clip c must be > 0, got {drift_clip}.")
    valid = mask.bool()
    adv = _zero_padding(_broadcast_advantages("cpgd", advantages, logps), valid)
    logps_v = _zero_padding(logps, valid)
    log_ratio = logps_v - _zero_padding(old_logps.detach(), valid)
    clipped_log_ratio = log_ratio.clamp(math.log(1.0 - clip_eps), math.log(1.0 + clip_eps))
    phi = torch.minimum(log_ratio * adv, clipped_log_ratio * adv)
    ratio = torch.exp(log_ratio.detach().clamp(-log_ratio_clamp, log_ratio_clamp))
    drift_weight = torch.clamp(ratio - 1.0, max=drift_clip)
    per_token = -phi + drift_coef * drift_weight * logps_v
    metrics = {
        "clip_frac": _masked_mean(clipped_log_ratio * adv < log_ratio * adv, valid),
        "ratio_mean": _masked_mean(ratio, valid),
        "ppo_kl": _masked_mean(-log_ratio, valid),
        "drift_weight_mean": _masked_mean(drift_weight, valid),
    }
    return PolicyLossOutput(aggregate(per_token, mask, agg, max_len), metrics)


# ----------------------------------------------------------------------------------------------------------
# KL in the reward, and KL coefficient controllers
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def kl_in_reward(
    rewards: Tensor,
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    *,
    coef: float = 0.01,
    estimator: Literal["k1", "k2", "k3"] = "k1",
) -> Tensor:
    """Token rewards with a KL penalty: ``r_t − β·k_t`` at every valid token (outcome on the last valid token).

    Equation (Ziegler et al. 2019, arXiv:1909.08593, §2.2; Hu 2025, REINFORCE++, arXiv:2501.03262)::

        r'_{i,t} = r_{i,t} − β·k_{i,t}        r_{i,t} = R_i·[t = last valid token]   (outcome input)

    Everything here is detached: the penalty enters the policy gradient only through the advantage, multiplying
    ``∇log π_θ`` (REINFORCE/PPO style). Which divergence that follows (samples from π_θ):

    * ``k1`` (default): ``E[k1·∇log π_θ] = ∇KL(π_θ‖π_ref)`` per token; with returns-to-go
      (:func:`tether.losses.policy.advantages.token_returns`) it is the exact gradient of the SEQUENCE-level reverse KL.
      This is PPO-RLHF's (Ziegler et al. 2019; Ouyang et al. 2022) and REINFORCE++'s placement.
    * ``k3``: ``∇KL(π‖π_ref) − ∇KL(π_ref‖π)`` — neither KL: ``E_π[k3·∇log π] = Σ_a π_ref(a)·∇log π(a) +
      Σ_a π(a)·log(π(a)/π_ref(a))·∇log π(a)``, the first sum −∇KL(π_ref‖π), the second ∇KL(π‖π_ref) (Σ_a ∇π(a) = 0
      drops the constant); offered for comparison only.
    * ``k2``: ``E[k2·∇log π] = ∇E_π[½ℓ²] − E_π[ℓ∇ℓ]`` — a biased surrogate; offered for comparison only.

    Shape: ``rewards`` (B,) outcome or (B, T) token rewards; ``logps``, ``ref_logps``, ``mask`` (B, T); output
    (B, T), zero at masked positions.

    Args:
        logps: log-probs of the sampled tokens under the SAMPLING policy (π_old; verl uses ``old_log_prob``).
        coef: β, e.g. ``AdaptiveKLController.value``; 0.01 is OpenRLHF's ``init_kl_coef`` default.
        estimator: ``k1`` (default), ``k2`` or ``k3``.
    Departures: none; rows with no valid token must carry zero reward (see ``outcome_to_token_rewards``).
    """
    if rewards.dim() == 1:
        rewards = outcome_to_token_rewards(rewards, mask)
    _check_inputs("kl_in_reward", logps, mask, ref_logps=ref_logps, rewards=rewards)
    valid = mask.bool()
    logps_v, ref_v = _zero_padding(logps, valid), _zero_padding(ref_logps, valid)
    if estimator == "k1":
        penalty = kl.k1(logps_v, ref_v)
    elif estimator == "k2":
        penalty = kl.k2(logps_v, ref_v)
    elif estimator == "k3":
        penalty = kl.k3(logps_v, ref_v)
    else:
        raise ValueError(f"kl_in_reward: estimator must be 'k1', 'k2' or 'k3', got {estimator!r}.")
    return torch.where(valid, rewards - coef * penalty.to(rewards.dtype), rewards.new_zeros(()))


@dataclass
class AdaptiveKLController:
    """Proportional controller for the KL coefficient β (Ziegler et al. 2019, "Fine-Tuning Language Models from
    Human Preferences", §2.2)::

        e   = clip(KL_current / KL_target − 1, −0.2, 0.2)
        β  ← β·(1 + e·n_steps/horizon)

    ``n_steps/horizon`` plays the paper's K_β (0.1 per batch there); verl's ``kl_ctrl`` defaults are
    ``target_kl = 0.1``, ``horizon = 10000``. Measure ``KL_current`` as the per-sequence KL of the batch
    (Σ_t k1 over response tokens, averaged over sequences), in the same units as ``target_kl``.

    Fields:
        init_coef: initial β (> 0).
        target_kl: KL_target (> 0).
        horizon: steps over which a saturated error (±20%) changes β by a factor e^{±0.2}.
        value: the current β (read it each step; starts at ``init_coef``).
    """

    init_coef: float
    target_kl: float
    horizon: float
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.init_coef <= 0 or self.target_kl <= 0 or self.horizon <= 0:
            raise ValueError(
                "AdaptiveKLController: init_coef, target_kl and horizon must all be > 0, got "
                f"{self.init_coef}, {self.target_kl}, {self.horizon}."
            )
        self.value = float(self.init_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one proportional update after ``n_steps`` samples/steps; returns the new β."""
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class FixedKLController:
    """Constant KL coefficient with the :class:`AdaptiveKLController` interface.

    Fields:
        value: β, returned unchanged by ``update``.
    """

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns β."""
        return self.value
