"""Online policy objectives as pure functions of log-prob tensors, with their advantages and their registry.

Modules, all re-exported here and from ``tether.losses``:

* ``surrogates``      — PPO-clip, GRPO, DAPO, GPG, CPGD, the KL penalty in the loss (k1/k2/k3/k3_is/exact) or in the
  reward, loss aggregation modes, KL controllers;
* ``advantages``      — GRPO, Dr.GRPO, RLOO, REINFORCE++, GPG advantages; A*-PO values and targets; GVPO weights;
* ``kl_objectives``   — GVPO, DisCO, RPG, KDRL, APO: objectives whose regularizer (to the rollout policy, a
  reference or a teacher) is part of the loss;
* ``token_selective`` — TROLL, Archer, KL on critical tokens: per-token trust regions and KL terms chosen token by
  token, from full-vocabulary logits or entropies;
* ``shaping``         — GRPO-CARE's consistency bonus and online difficulty filtering (reward and prompt selection
  around the loss);
* ``registry``        — ``ONLINE_OBJECTIVES``: how the online recipe calls each objective and what inputs it needs.

The objectives are built from a few shared pieces (:func:`ppo_clip_per_token`, :func:`aggregate`,
:func:`kl_penalty`, :func:`grpo_advantages`, the sample KL estimators of ``tether.kl``); the private helpers they
share are in ``_common``.

Notation: a batch holds ``B = Q·G`` responses — ``Q`` prompts × ``G`` responses each, **contiguous**
(rows ``q·G … q·G+G−1`` belong to prompt ``q``). For the sampled token ``y_{i,t}`` at state ``s_{i,t}``:

* ``logps``     log π_θ(y_{i,t}|s_{i,t}) under the policy being trained (differentiable), ``Shape: (B, T)``;
* ``old_logps`` log π_old — the rollout policy that sampled the tokens (no gradient), ``Shape: (B, T)``;
* ``ref_logps`` log π_ref — frozen reference (or teacher) (no gradient), ``Shape: (B, T)``;
* ``mask``      1/True on response tokens, 0/False on prompt and padding, ``Shape: (B, T)`` (ragged rows are fine);
* ``w = ρ = exp(logps − old_logps)`` the per-token importance ratio; ``sg(·)`` stop-gradient;
* per-sequence ``rewards`` / ``advantages``, ``Shape: (B,)``, broadcast over the tokens of their response;
* ``logits``    full-vocabulary logits ``(B, T, V)`` for the methods that need distributions (TROLL, Archer, the
  critical-token KL).

Every objective returns :class:`~tether.losses.policy.PolicyLossOutput` — a differentiable scalar loss (to minimize)
and a dict of detached float metrics. Per-token matrices are reduced by :func:`~tether.losses.policy.aggregate`,
whose docstring defines the modes of ``AGG_MODES`` (``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
``seq-mean-token-sum-norm``) with a worked example. Empty selections (a row or a token class with no token)
contribute 0 instead of NaN.

Departures shared by everything here:

1. Distributed all-gathers of the official code (GVPO's group means, DisCO's batch) are the caller's business:
   each function sees the whole batch it is given; groups must be complete (``B % G == 0``, checked).
2. Log-ratios are clamped to [−20, 20] before exponentiating (verl's convention,
   ``tether.losses.policy.LOG_RATIO_CLAMP``); this only bites at ratios beyond e^±20, far outside any trust region.
3. KL-estimator *values* are not clamped to [−10, 10] as verl does: a clamped value has zero gradient, which
   silently switches the regularizer off exactly where it is needed.
4. Padding is inert: every per-token input (log-probs, entropies, logits, token ids, token rewards) is replaced by 0
   at masked positions before any arithmetic, so NaN, ±inf or ``IGNORE_INDEX`` there reach neither the loss, nor
   the metrics, nor the gradient (exactly zero at masked positions; ``tests/losses/test_padding_inert.py``).
"""

from __future__ import annotations

from tether.losses.policy.advantages import (
    astar_po_targets,
    astar_po_values,
    dapo_dynamic_sampling_mask,
    drgrpo_advantages,
    gpg_advantages,
    grpo_advantages,
    gvpo_weights,
    outcome_to_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    token_returns,
    whiten,
)
from tether.losses.policy.astar_po import astar_po
from tether.losses.policy.chunked_forms import critical_token_kl_from_max, ppo_critical_token_kl, troll_sparse
from tether.losses.policy.kl_objectives import APOShaping, apo, apo_shaping, disco, gvpo, kdrl, rpg
from tether.losses.policy.registry import (
    ONLINE_OBJECTIVES,
    OnlineObjective,
    call_objective,
    check_loss_args,
    objective_agg_mode,
)
from tether.losses.policy.shaping import difficulty_filter, grpo_care_bonus
from tether.losses.policy.surrogates import (
    AGG_MODES,
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    AdaptiveKLController,
    FixedKLController,
    PolicyLossOutput,
    aggregate,
    cpgd,
    dapo,
    gpg,
    grpo,
    kl_in_reward,
    kl_penalty,
    ppo_clip,
    ppo_clip_per_token,
)
from tether.losses.policy.token_selective import (
    TrustRegionProjection,
    archer,
    critical_token_kl,
    troll,
    troll_project,
)

__all__ = [
    # surrogates
    "AGG_MODES", "KL_ESTIMATORS", "LOG_RATIO_CLAMP", "AdaptiveKLController", "FixedKLController", "PolicyLossOutput",
    "aggregate", "cpgd", "dapo", "gpg", "grpo", "kl_in_reward", "kl_penalty", "ppo_clip", "ppo_clip_per_token",
    # advantages
    "astar_po_targets", "astar_po_values", "dapo_dynamic_sampling_mask", "drgrpo_advantages", "gpg_advantages",
    "grpo_advantages", "gvpo_weights", "outcome_to_token_rewards", "reinforce_pp_advantages", "rloo_advantages",
    "token_returns", "whiten",
    # KL-regularized successors and token-selective objectives
    "APOShaping", "TrustRegionProjection", "apo", "apo_shaping", "archer", "critical_token_kl", "disco", "gvpo",
    "kdrl", "rpg", "troll", "troll_project",
    # on chunked statistics (the online recipe's forms) and A*-PO's regression
    "astar_po", "critical_token_kl_from_max", "ppo_critical_token_kl", "troll_sparse",
    # shaping
    "difficulty_filter", "grpo_care_bonus",
    # registry
    "ONLINE_OBJECTIVES", "OnlineObjective", "call_objective", "check_loss_args", "objective_agg_mode",
]
