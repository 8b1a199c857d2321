"""Online-RL objectives with a non-standard KL regularizer or trust region, and the loop helpers that go with them.

Every method here is one of tether's online-RL method notes (``spec §N`` = section N of ``methods/online-rl.md``),
in three modules, all re-exported here and from ``tether.losses``:

* ``kl_objectives``   — GVPO (§8), DisCO (§9), RPG (§10), KDRL (§14), APO (§17): objectives whose regularizer (to the
  rollout policy, a reference or a teacher) is part of the loss;
* ``token_selective`` — TROLL (§11), Archer (§12), prioritized KL on critical tokens (§13): per-token trust regions
  and KL terms chosen token by token, from full-vocabulary logits or entropies;
* ``loop_helpers``    — GRPO-CARE's consistency bonus + EMA reference (§18), online difficulty filtering (§19) and
  ProRL's reference resets (§20): what a training loop calls around the loss.

PPO-clip / GRPO / DAPO / GPG / CPGD themselves live in ``tether.losses.policy``; the objectives here are built from its
pieces (:func:`~tether.losses.policy.ppo_clip_per_token`, :func:`~tether.losses.policy.aggregate`,
:func:`~tether.losses.policy.kl_penalty`), from :func:`tether.rl.advantages.grpo_advantages` and from the sample KL
estimators of ``tether.kl``. The few private helpers the three modules share are in ``_common``.

Notation (spec §0): a batch holds ``B = Q·G`` responses — ``Q`` prompts × ``G`` responses each, **contiguous**
(rows ``q·G … q·G+G−1`` belong to prompt ``q``). For the sampled token ``y_{i,t}`` at state ``s_{i,t}``:

* ``logps``     log π_θ(y_{i,t}|s_{i,t}) under the policy being trained (differentiable), ``Shape: (B, T)``;
* ``old_logps`` log π_old — the rollout policy that sampled the tokens (no gradient), ``Shape: (B, T)``;
* ``ref_logps`` log π_ref — frozen reference (or teacher) (no gradient), ``Shape: (B, T)``;
* ``mask``      1/True on response tokens, 0/False on prompt and padding, ``Shape: (B, T)`` (ragged rows are fine);
* ``w = ρ = exp(logps − old_logps)`` the per-token importance ratio; ``sg(·)`` stop-gradient;
* per-sequence ``rewards`` / ``advantages``, ``Shape: (B,)``, broadcast over the tokens of their response;
* ``logits``    full-vocabulary logits ``(B, T, V)`` for the methods that need distributions (TROLL, Archer, §13).

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
"""

from __future__ import annotations

from tether.losses.policy import AGG_MODES, PolicyLossOutput
from tether.losses.regularized.kl_objectives import APOShaping, apo, apo_shaping, disco, gvpo, kdrl, rpg
from tether.losses.regularized.loop_helpers import (
    EMAReference,
    ReferenceResetSchedule,
    difficulty_filter,
    ema_update_,
    grpo_care_bonus,
)
from tether.losses.regularized.token_selective import (
    TrustRegionProjection,
    archer,
    critical_token_kl,
    troll,
    troll_project,
)

__all__ = [
    "AGG_MODES",
    "APOShaping",
    "EMAReference",
    "PolicyLossOutput",
    "ReferenceResetSchedule",
    "TrustRegionProjection",
    "apo",
    "apo_shaping",
    "archer",
    "critical_token_kl",
    "difficulty_filter",
    "disco",
    "ema_update_",
    "grpo_care_bonus",
    "gvpo",
    "kdrl",
    "rpg",
    "troll",
    "troll_project",
]
