"""Objectives that carry their own KL regularizer in the loss: GVPO, DisCO, RPG, KDRL, APO.

Notation, aggregation and the departures shared by every method here: see ``tether.losses.policy``.

What each one regularizes toward: GVPO, the anchor passed as ``old_logps`` (rollout policy or a fixed reference);
DisCO, the rollout policy (a squared-hinge trust region on a batch KL); RPG, a reference (or the rollout policy) under
any of four KLs with exact off-policy gradients; KDRL, a teacher; APO, the reference with difficulty-adaptive weights.
GVPO, DisCO, KDRL and APO take raw group rewards and normalize them themselves (KDRL and APO with
:func:`tether.losses.policy.advantages.grpo_advantages`); RPG takes advantages. The PPO-clip term of RPG, KDRL and APO
is :func:`tether.losses.policy.ppo_clip_per_token`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tether import kl as _kl
from tether.losses.policy._common import (
    frac,
    groups,
    inert,
    ppo_clip,
    ratio,
    sample_kl,
    seq_mean,
    token_mean,
)
from tether.losses.policy.advantages import grpo_advantages
from tether.losses.policy.surrogates import LOG_RATIO_CLAMP, PolicyLossOutput, aggregate

__all__ = ["APOShaping", "apo", "apo_shaping", "disco", "gvpo", "kdrl", "rpg"]


# ----------------------------------------------------------------------------------------------------------
# GVPO
# ----------------------------------------------------------------------------------------------------------


def gvpo(
    logps: Tensor,
    old_logps: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    group_size: int,
    beta: float = 0.1,
) -> PolicyLossOutput:
    """GVPO: regress the group-centred implicit reward onto the group-centred reward.

    Equation (official README, ``compute_policy_loss_gvpo``)::

        u_i = β · Σ_t m_{i,t} (log π_θ − log π_θ')(y_{i,t})          # sequence-level implicit reward
        L   = Σ_groups  1/(G−1) · Σ_i ½ [ (u_i − sg(ū)) − (R_i − R̄) ]²,   ū, R̄ = group means

    Paper: Zhang et al. 2025, "GVPO: Group Variance Policy Optimization for Large Language Model Post-Training",
    arXiv:2504.19599 (NeurIPS 2025). Code: ``jszkc/GVPO`` README (the repo ships the loss only in its README).

    Shapes: ``logps``, ``old_logps``, ``mask`` ``(B, T)``; ``rewards`` ``(B,)`` raw rewards (centred here — the
    official script feeds verl's ``grpo`` advantage with ``norm_adv_by_std_in_grpo=False``, i.e. ``R − R̄``).

    Args:
        group_size: G ≥ 2, responses per prompt; the whole group must be in this call (the official trainer
            modifies batch balancing and asserts group size == n).
        beta: β = 0.1 (``gvpo_beta`` in the official script; the README warns other settings may differ from the
            paper). Sequence log-ratios of long responses are large: scale β with length.

    KL / fixed point: the anchor is ``old_logps`` (π_θ' — the official code passes the rollout policy). The loss is an
    unbiased estimate of ``½ Var_{y~π_s}[β log(π_θ/π_θ')(y) − R(y)]`` for groups sampled from any π_s (the 1/(G−1) is
    the unbiased-variance factor), minimized exactly when ``β log(π_θ/π_θ') − R`` is constant on the support, i.e. at
    ``π* ∝ π_θ'·exp(R/β)`` — the optimum of ``E_π[R] − β·KL(π ‖ π_θ')`` (reverse KL), whatever the sampling
    distribution; no importance weights. With a fixed anchor (pass π_ref log-probs as ``old_logps``) the fixed point
    is the KL-regularized optimum ``π_ref·exp(R/β)``; with the rollout policy as anchor each step is a mirror-descent
    step and the iteration climbs toward argmax R.

    Stop-gradient: ū (detached, as the official code's all-gathered means; the gradient is unchanged because both
    centred terms sum to zero over the group). Rewards carry no gradient.
    Departures: none in the math; the loss is summed over groups as in the official code (not averaged), so its scale
    grows with the number of prompts per call — divide in the recipe if you change batch sizes.
    """
    if group_size < 2:
        raise ValueError(f"gvpo: group_size must be ≥ 2 (the loss divides by G−1), got {group_size}")
    m = mask.to(torch.bool)
    logps, old_logps = inert(m, logps, old_logps.detach())
    u = beta * torch.where(m, logps - old_logps, torch.zeros_like(logps)).sum(-1)
    u_g = groups(u, group_size, "gvpo")
    r_g = groups(rewards.detach().to(u.dtype), group_size, "gvpo")
    centred = (u_g - u_g.detach().mean(-1, keepdim=True)) - (r_g - r_g.mean(-1, keepdim=True))
    loss = 0.5 * centred.square().sum() / (group_size - 1)
    metrics = {
        "implicit_reward_mean": u.detach().mean().item(),
        "residual_rms": centred.detach().square().mean().sqrt().item(),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# DisCO
# ----------------------------------------------------------------------------------------------------------


def _disco_score_logl(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    return seq_mean(logps, mask)


def _disco_score_lratio(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    return seq_mean(ratio(logps, old_logps), mask)


# DisCO's trust region is KL(π_old ‖ π_θ) estimated on π_old's samples: tether.kl's estimators with π_old first.


def _disco_kl_k1(logps: Tensor, old_logps: Tensor) -> Tensor:
    return _kl.k1(old_logps, logps)  # log π_old − log π_θ


def _disco_kl_low_var(logps: Tensor, old_logps: Tensor) -> Tensor:
    # k3(log π_old, log π_θ) = ρ − 1 − log ρ (verl "low_var_kl"), written k3(0, log ρ) so that log ρ is clamped first
    log_rho = (logps - old_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _kl.k3(torch.zeros_like(log_rho), log_rho)


_DISCO_SCORES = {"logL": _disco_score_logl, "Lratio": _disco_score_lratio}
_DISCO_TAU = {"logL": 10.0, "Lratio": 1.0}
_DISCO_KL = {"kl": _disco_kl_k1, "low_var_kl": _disco_kl_low_var}


def disco(
    logps: Tensor,
    old_logps: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    group_size: int,
    score: str = "logL",
    tau: float | None = None,
    dro: bool = True,
    beta: float = 1e3,
    delta: float = 1e-4,
    kl_type: str = "kl",
) -> PolicyLossOutput:
    """DisCO: discriminative objective on binary rewards with a squared-hinge KL trust region.

    Equation (per prompt q with both classes; pos = {R=1}, neg = {R=0})::

        s_i   = mean_t log π_θ(y_{i,t})              (score="logL")   or   mean_t ρ_{i,t}   (score="Lratio")
        J_q   = mean_{i∈pos} s_i − τ·log mean_{j∈neg} exp(s_j/τ)          (DisCO, dro=True)
              = mean_{i∈pos} s_i − mean_{j∈neg} s_j                         (DisCO-b, dro=False)
        J     = Σ_{q valid} J_q / Q                      Q = all prompts in the batch, degenerate ones included
        D     = token-mean over the batch of  log π_old − log π_θ  (kl_type="kl")  or  ρ − 1 − log ρ  ("low_var_kl")
        L     = −J + (β/2)·[D − δ]_+²

    Paper: Li et al. 2025, "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained Optimization",
    arXiv:2505.12366. Code: ``Optimization-AI/DisCO`` — its ``verl/verl/workers/actor/dp_actor.py`` (dispatch,
    hyperparameter names) is in the code index, its ``core_algos.py`` is not; the loss was read in a verl
    ``core_algos.py`` carrying ``compute_policy_loss_disco_logL`` found by code search (repository not named by the
    index): token-mean logL score, groups by uid, value-free log-mean-exp surrogate, ``pg_loss.sum()/num_questions``,
    ``constraint = sg(max(β(D−δ), 0))·D`` with D the batch token-mean of the chosen estimator.

    Shapes: ``(B, T)`` log-probs and mask; ``rewards`` ``(B,)`` exactly 0/1 (anything else raises — the official code
    silently puts it in neither class).

    Defaults (official scripts): ``beta=1e3``, ``delta=1e-4``, ``kl_type="kl"``, ``tau=10`` for logL and ``tau=1``
    for Lratio (``tau=None`` picks these).

    Gradient: the DRO term's gradient puts weight ``softmax_j(s/τ)`` on negative j (τ → ∞: DisCO-b's uniform mean,
    τ → 0: the max); the constraint's gradient is ``β·[D − δ]_+·∇D`` — exactly the code's
    ``sg(max(β(D−δ), 0))·D``, so the paper's "squared hinge" carries a factor ½ (we verified the code's form; the
    paper's constant stays UNVERIFIED). Both KL estimators have expected gradient ∇KL(π_old ‖ π_θ) under π_old samples
    — a trust region to the rollout policy, not a reference KL (there is none).
    Stop-gradient: none beyond the code's (the hinge coefficient is the derivative of the squared hinge).

    Departures: (1) the loss *value* is the true objective — the code's value-free surrogate for the log-mean-exp
    (value ≈ τ, not τ·log mean exp) and its ``sg(·)·D`` penalty have the same gradients but misleading values;
    (2) ``score="Lratio"`` uses the Lratio score with the DRO term — the snapshot's ``disco_Lratio`` dispatches to
    the DisCO-b function with a ``tau`` argument, which would raise; (3) no all-gather.
    """
    if score not in _DISCO_SCORES:
        raise ValueError(f"disco: unknown score {score!r}; choose 'logL' (log-likelihood) or 'Lratio' (ratio)")
    if kl_type not in _DISCO_KL:
        raise ValueError(f"disco: unknown kl_type {kl_type!r}; choose 'kl' (k1, the scripts') or 'low_var_kl' (k3)")
    r = rewards.detach()
    if not bool(((r == 0) | (r == 1)).all()):
        bad = r[(r != 0) & (r != 1)].unique().tolist()[:5]
        raise ValueError(
            f"disco: rewards must be exactly 0 or 1 (binary verifier), found values such as {bad}; "
            "binarize the reward (e.g. correctness only) before calling"
        )
    tau = _DISCO_TAU[score] if tau is None else tau
    logps, old_logps = inert(mask, logps, old_logps.detach())
    s = groups(_DISCO_SCORES[score](logps, old_logps, mask), group_size, "disco")
    r_g = groups(r, group_size, "disco")
    pos, neg = r_g == 1, r_g == 0
    valid = pos.any(-1) & neg.any(-1)
    n_pos = pos.sum(-1).clamp_min(1).to(s.dtype)
    n_neg = neg.sum(-1).clamp_min(1).to(s.dtype)
    pos_mean = torch.where(pos, s, torch.zeros_like(s)).sum(-1) / n_pos
    if dro:
        z = torch.where(neg, s / tau, torch.full_like(s, -math.inf))
        z = torch.where(neg.any(-1, keepdim=True), z, torch.zeros_like(z))  # rows without negatives: finite dummy
        neg_term = tau * (torch.logsumexp(z, -1) - torch.log(n_neg))
    else:
        neg_term = torch.where(neg, s, torch.zeros_like(s)).sum(-1) / n_neg
    j_q = torch.where(valid, pos_mean - neg_term, torch.zeros_like(pos_mean))
    objective = j_q.sum() / s.shape[0]
    d = aggregate(_DISCO_KL[kl_type](logps, old_logps), mask, "token-mean")
    penalty = 0.5 * beta * F.relu(d - delta).square()
    loss = -objective + penalty
    metrics = {
        "objective": objective.detach().item(),
        "kl": d.detach().item(),
        "penalty": penalty.detach().item(),
        "constraint_active": float(d.detach().item() > delta),
        "valid_groups": float(valid.sum().item()),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# RPG
# ----------------------------------------------------------------------------------------------------------
# w = π_θ/π_old (IS weight), l = log(π_θ/π_ref), r = π_ref/π_old (constant). With the reference = old policy
# (the paper's iterative reference, ref_logps=None) r ≡ 1 and l = log w.


def _rpg_surrogate_rkl(w: Tensor, l: Tensor, r: Tensor) -> Tensor:
    return w * l  # E_old = KL(π_θ ‖ π_ref)


def _rpg_surrogate_urkl(w: Tensor, l: Tensor, r: Tensor) -> Tensor:
    return w * l - w + r  # E_old = KL(π_θ‖π_ref) + Σπ_ref − Σπ_θ = UKL(π_θ ‖ π_ref)


def _rpg_surrogate_fkl(w: Tensor, l: Tensor, r: Tensor) -> Tensor:
    return -r * l  # E_old = E_ref[log π_ref/π_θ] = KL(π_ref ‖ π_θ)


def _rpg_surrogate_ufkl(w: Tensor, l: Tensor, r: Tensor) -> Tensor:
    return w - r * l - r  # E_old = UKL(π_ref ‖ π_θ)


def _rpg_kappa_rkl(w: Tensor, l: Tensor, r: Tensor) -> Tensor:
    return -w * (l + 1.0)  # E_old[κ ∇log π] = −∇KL(π_θ‖π_ref)


def _rpg_kappa_urkl(w: Tensor, l: Tensor, r: Tensor) -> Tensor:
    return -w * l


def _rpg_kappa_fkl(w: Tensor, l: Tensor, r: Tensor) -> Tensor:
    return r


def _rpg_kappa_ufkl(w: Tensor, l: Tensor, r: Tensor) -> Tensor:
    return r - w


_RPG_SURROGATE = {
    "rkl": _rpg_surrogate_rkl,
    "urkl": _rpg_surrogate_urkl,
    "fkl": _rpg_surrogate_fkl,
    "ufkl": _rpg_surrogate_ufkl,
}
_RPG_KAPPA = {"rkl": _rpg_kappa_rkl, "urkl": _rpg_kappa_urkl, "fkl": _rpg_kappa_fkl, "ufkl": _rpg_kappa_ufkl}
_RPG_STYLES = ("differentiable", "reinforce")


def rpg(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    kl: str = "rkl",
    style: str = "reinforce",
    beta: float = 1e-4,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 10.0,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """RPG: off-policy surrogates whose gradient is exactly that of ``E_π[R] − β·D`` for four KLs.

    The two switches are the method's hyperparameters: ``kl`` ∈ {rkl, urkl, fkl, ufkl} (reverse/forward ×
    normalized/unnormalized) and ``style`` ∈ {differentiable, reinforce}. With ``w = π_θ/π_old``,
    ``l = log π_θ/π_ref`` and ``r = π_ref/π_old`` (``r ≡ 1``, ``l = log w`` when ``ref_logps`` is None, the paper's
    iterative reference = old policy)::

        D (per token, E_old of it is the divergence)          κ (REINFORCE weight, E_old[κ∇log π] = −∇D)
        rkl  : w·l                      KL(π_θ‖π_ref)            −w(l + 1)
        urkl : w·l − w + r              UKL(π_θ‖π_ref)           −w·l
        fkl  : −r·l                     KL(π_ref‖π_θ)            r            (= 1 with the iterative reference)
        ufkl : w − r·l − r              UKL(π_ref‖π_θ)           r − w        (= 1 − w)

    * ``style="differentiable"`` (paper Table 1/4; code: ``kl_penalty('rpg_*')`` as the KL loss next to verl's
      PPO-clip loss): per token ``L^clip(A) + β·D``, differentiated through ``w`` and ``l``.
    * ``style="reinforce"`` (paper Table 2; code ``compute_policy_loss_reinforce``, ``clip_ppo`` branch — the
      "RPG-Style Clip"): per token ``−sg(g·(w·A + β·κ(w_c)))·log π_θ`` with ``w_c = clip(w, 1−ε_low, 1+ε_high)``
      inside κ (``l_c = log w_c + log π_old/π_ref``) and the gate ``g = 1[w < 1+ε_high]`` for ``A > 0`` and
      ``g = 1[1−ε_low ≤ w < c]`` for ``A ≤ 0`` (dual clip). Its *value* is a surrogate; only the gradient means
      anything.

    Paper: Zhang et al. 2025, "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning".
    Code: ``complex-reasoning/RPG`` ``verl/trainer/ppo/core_algos.py`` (read: ``kl_penalty`` rpg_* forms,
    ``compute_policy_loss_reinforce`` κ table and clip branch) — they match the table above.

    Shapes: ``(B, T)`` log-probs and mask, ``advantages`` ``(B,)`` (RPG uses ``R − mean_G R``, no std).

    Defaults (RPG scripts ``recipe/rpg/7b/*.sh``): ``beta=1e-4``, ``(clip_low, clip_high) = (0.2, 0.28)`` (or (0.1,
    0.1)), ``clip_c=10``, token-mean. ``kl="rkl"`` / ``style="reinforce"`` are our choice of default (the code's own
    default string is ``rpg_rf_ufkl``).

    Gradient / fixed points (verified on exact expectations in the tests): for every ``kl`` and both styles, while no
    clip is active, ``E_{π_old}[∇ loss] = −∇E_{π_θ}[A] + β·∇D``. Hence with a fixed reference the fixed point is the
    maximizer of ``E[R] − β·D``:

    * rkl / urkl (reverse KL; normalized distributions make them identical in expectation): ``π* ∝ π_ref·exp(R/β)``;
    * fkl / ufkl (forward KL): ``π*(a) = β·π_ref(a)/(λ − R(a))``, λ > max R the normalizer (mass-covering).

    With the iterative reference (``ref_logps=None``) each outer step solves the problem with π_ref = π_old — a
    mirror-descent step; the iteration keeps improving R (no stationary tilt of a fixed reference).

    Stop-gradient: κ and the REINFORCE weight are detached; ``old_logps`` and ``ref_logps`` carry no gradient.
    Departures: (1) verl's [−10, 10] clamp of the KL *values* is dropped (package note 3); (2) the code's truncated
    branch (``kl_type`` without ``clip_ppo``: ``−sg(w_c·A + κ(w_c))·log π``) is not offered — we implement the
    paper's RPG-Style Clip; (3) ``ref_logps`` (a fixed reference distinct from the rollout policy) generalizes the
    paper's iterative setting with the ``r``/``l`` terms above [derived, checked by exact enumeration].
    """
    if kl not in _RPG_SURROGATE:
        raise ValueError(f"rpg: unknown kl {kl!r}; choose one of {sorted(_RPG_SURROGATE)}")
    if style not in _RPG_STYLES:
        raise ValueError(f"rpg: unknown style {style!r}; choose one of {_RPG_STYLES}")
    adv = advantages.detach().to(logps.dtype)[:, None]
    logps, old, ref_logps = inert(mask, logps, old_logps.detach(), None if ref_logps is None else ref_logps.detach())
    ref = old if ref_logps is None else ref_logps
    w = ratio(logps, old)
    r = ratio(ref, old)
    if style == "differentiable":
        pg, clipped = ppo_clip(logps, old, adv, clip_low, clip_high, clip_c)
        divergence = _RPG_SURROGATE[kl](w, logps - ref, r)
        per_token = pg + beta * divergence
    else:
        with torch.no_grad():
            w_c = w.clamp(1.0 - clip_low, 1.0 + clip_high)
            l_c = torch.log(w_c) + (old - ref)
            kappa = beta * _RPG_KAPPA[kl](w_c, l_c, r)
            gate = torch.where(adv > 0, w < 1.0 + clip_high, (w >= 1.0 - clip_low) & (w < clip_c))
            weight = torch.where(gate, w * adv + kappa, torch.zeros_like(w))
            clipped = ~gate
            divergence = _RPG_SURROGATE[kl](w, logps - ref, r)
        per_token = -weight * logps
    loss = aggregate(per_token, mask, loss_agg_mode, max_len)
    metrics = {
        "kl_estimate": token_mean(divergence, mask),
        "clip_frac": frac(clipped, mask),
        "ppo_kl": token_mean(old - logps, mask),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# KDRL
# ----------------------------------------------------------------------------------------------------------


def kdrl(
    logps: Tensor,
    old_logps: Tensor,
    teacher_logps: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    group_size: int,
    beta: float = 5e-3,
    estimator: str = "k2",
    kd_on_correct: bool = False,
    correct_reward: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    adv_eps: float = 1e-6,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """KDRL: GRPO on the student's rollouts plus reverse-KL distillation to a teacher, one objective.

    Equation (secondary sources: arXiv HTML abstract + reviews)::

        J = J_GRPO(θ) − β · E_{y~π_θ}[ Σ_t k2(log π_θ(y_t), log π_T(y_t)) ]
        L_{i,t} = L^clip_{i,t}(Â_i) + β · k2_{i,t} · κ_i       κ_i = 0 for rewarded responses (reward-guided KD)
        Â_i = (R_i − mean_G R)/(std_G R + 1e-6)                (grpo_advantages), token-mean over the batch

    Paper: Xu et al. 2025, "KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and Reinforcement
    Learning", arXiv:2506.02208. No public code found.

    Shapes: ``logps``, ``old_logps``, ``teacher_logps`` (teacher log-probs of the student's sampled tokens — same
    tokenizer), ``mask`` ``(B, T)``; ``rewards`` ``(B,)``.

    Args:
        beta: KD coefficient; the paper anneals it from 5e-3 to 1e-3 [secondary] — schedule it in the recipe.
        estimator: "k2" (default; on-policy its gradient is exactly ∇KL(π_θ ‖ π_T), the reverse KL) or "k3" (whose
            gradient is the *forward* KL(π_T ‖ π_θ), see ``tether.kl.k3``), or "k1" (no gradient in expectation).
        kd_on_correct: False = reward-guided KD: no KD on responses with ``reward ≥ correct_reward``.
        correct_reward: threshold for "rewarded" (binary verifier: 1.0). Masking granularity UNVERIFIED.

    Fixed points (exact expectations on a bandit, G = 2 binary rewards, ``tests/losses/test_policy_oracles.py``):
    GRPO's part then maximizes ``κ·π(C)`` (C the rewarded responses, κ = ½/(std + ε) ≈ 0.707). With
    ``kd_on_correct=True`` the k2 term follows ``β∇KL(π_θ ‖ π_T)`` and the fixed point is the reverse-KL optimum
    ``π* ∝ π_T·exp(κ·1[C]/β)``. With the default reward-guided mask it follows ``β∇Σ_{y∉C} π(y)(log(π(y)/π_T(y)) − 1)``
    — the reverse KL restricted to unrewarded responses, unnormalized — and the fixed point keeps the teacher's
    shape on the unrewarded responses, ``π*(y) = π_T(y)·e^{−κ/β}``, all other mass on C: not a KL-regularized
    optimum over the whole response space.

    Stop-gradient: ``old_logps``, ``teacher_logps``, the advantages.
    Off-policy caveat: the k2 term has no importance weight, so with several mini-batches per rollout it follows the
    reverse-KL gradient only approximately (Zhang et al. 2025, RPG, arXiv:2505.17508, §2.2).
    Departures / UNVERIFIED: masking granularity (response-level here), the KD term shares GRPO's token-mean
    denominator (masked responses just contribute zero), symmetric clip 0.2 (GRPO default), no reference KL. Â is
    :func:`tether.losses.policy.advantages.grpo_advantages`, so a group whose rewards are all equal gets exactly 0.
    """
    k = sample_kl(estimator, "kdrl")
    logps, old_logps, teacher_logps = inert(mask, logps, old_logps.detach(), teacher_logps.detach())
    adv = grpo_advantages(groups(rewards.detach(), group_size, "kdrl"), eps=adv_eps).reshape(-1).to(logps.dtype)
    pg, clipped = ppo_clip(logps, old_logps.detach(), adv[:, None], clip_low, clip_high, None)
    kd = k(logps, teacher_logps.detach())
    if kd_on_correct:
        kd_gate = torch.ones_like(adv)
    else:
        kd_gate = (rewards.detach() < correct_reward).to(logps.dtype)
    per_token = pg + beta * kd * kd_gate[:, None]
    loss = aggregate(per_token, mask, loss_agg_mode, max_len)
    metrics = {
        "pg_loss": aggregate(pg.detach(), mask, loss_agg_mode, max_len).item(),
        "kd": token_mean(kd, mask),
        "kd_frac": kd_gate.mean().item(),
        "clip_frac": frac(clipped, mask),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# APO
# ----------------------------------------------------------------------------------------------------------


class APOShaping(NamedTuple):
    """APO's per-response quantities, each ``Shape: (B,)`` and detached.

    Fields:
        advantages: GRPO advantages after STCR scaling.
        kl_weights: DADS weights w_KL(d) on the per-sequence KL (1 for non-positive advantages).
        difficulty: d = 1 − (#correct in the group)/G.
        length_weights: the STCR factors (1 where not applied).
    """

    advantages: Tensor
    kl_weights: Tensor
    difficulty: Tensor
    length_weights: Tensor


def apo_shaping(rewards: Tensor, lengths: Tensor, *, group_size: int, std_eps: float = 1e-9) -> APOShaping:
    """APO's difficulty-adaptive KL weights (DADS) and length-penalized negative advantages (STCR).

    Equations (code ``openrlhf/trainer/ppo_utils/experience_maker.py`` and ``trainer/ray/ppo_actor.py``)::

        correct_i = ⌊R_i⌋ ≥ 1,   d = 1 − #correct/G
        Â_i = (R_i − mean_G R)/(std_G R + 1e-9)                                  (grpo_advantages)
        STCR: Δ_i = |y_i| − mean_{correct}|y| for an incorrect i in a group with a correct answer;
              Â_i ← Â_i · (1 + (1 − 1.00001^{−Δ_i})) if Δ_i > 0
        DADS: w_KL = 1 − exp(−e·(1 − d)) if Â_i > 0 and 0 < d < 1, else 1

    Shapes: ``rewards`` ``(B,)``, ``lengths`` ``(B,)`` valid response lengths (``mask.sum(-1)``).
    Departures: (1) the code weights correct lengths by ``trunc(R)`` and uses ``1 − trunc(R)`` as the incorrect flag; we
    use the indicator ``R ≥ 1`` — identical for rewards in [0, 2), different (and saner) above. (2) Â is
    :func:`tether.losses.policy.advantages.grpo_advantages`: a group whose rewards are all equal gets exactly 0, where
    the code's formula turns the fp32 rounding residual of the mean into order-1 advantages through the 1e-9 (eight
    rewards of 1.2 would get 0.93 each); a group of one keeps its raw reward (no baseline: use G ≥ 2).
    """
    r = groups(rewards.detach(), group_size, "apo_shaping")
    length = groups(lengths.detach().to(r.dtype), group_size, "apo_shaping")
    correct = r >= 1.0
    n_correct = correct.sum(-1, keepdim=True).to(r.dtype)
    difficulty = (1.0 - n_correct / group_size).expand_as(r)
    adv = grpo_advantages(r, eps=std_eps)
    mean_correct_len = torch.where(correct, length, torch.zeros_like(length)).sum(-1, keepdim=True)
    mean_correct_len = mean_correct_len / n_correct.clamp_min(1.0)
    gap = length - mean_correct_len
    stcr = (~correct) & (n_correct > 0) & (gap > 0)
    length_weights = torch.where(stcr, 2.0 - torch.pow(torch.full_like(gap, 1.00001), -gap), torch.ones_like(gap))
    adv = adv * length_weights
    d_open = (difficulty > 0) & (difficulty < 1)
    dads = 1.0 - torch.exp(-math.e * (1.0 - difficulty))
    kl_weights = torch.where((adv > 0) & d_open, dads, torch.ones_like(adv))
    return APOShaping(adv.reshape(-1), kl_weights.reshape(-1), difficulty.reshape(-1), length_weights.reshape(-1))


def apo(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    group_size: int,
    beta: float = 1e-3,
    clip_eps: float = 0.2,
    use_dads: bool = True,
    use_stcr: bool = True,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """APO: asymmetric treatment of positive (DADS KL weights) and negative (STCR length) responses.

    Equation::

        (Â, w_KL) = apo_shaping(R, |y|)                        see apo_shaping
        L = agg( L^clip_{i,t}(Â_i; ε = 0.2) ) + β · mean_i [ w_KL,i · mean_t k3_{i,t} ]
        agg = token-mean:  Σ_{i,t} m·L^clip / Σ_{i,t} m   (every token of the batch weighs the same)

    Paper: Hong et al. 2025, "APO: Enhancing Reasoning Ability of MLLMs via Asymmetric Policy Optimization",
    arXiv:2506.21655. Code: ``Indolent-Kawhi/View-R1`` (read:
    ``experience_maker.py`` group_norm branch — difficulty, STCR; ``ppo_actor.py`` — ``calculate_kl_weight``, KL weights
    chosen by the sign of the first-token advantage, per-sequence masked-mean KL × weights, batch mean,
    ``× kl_ctl.value``).

    Shapes: ``(B, T)`` log-probs and mask (lengths = ``mask.sum(-1)``); ``rewards`` ``(B,)`` (total reward; "correct"
    means reward ≥ 1, the integer part of an accuracy + format reward).

    Defaults (``examples/scripts/train_grpo.sh``): ``beta=1e-3`` (``--init_kl_coef``) with k3, ``G=8``;
    ``clip_eps=0.2`` (``--eps_clip`` default). ``loss_agg_mode="token-mean"``: the fork's ``ppo_trainer.py`` builds
    ``PolicyLoss(eps_clip)`` with the default ``token_level_loss=True``, i.e. ``masked_mean(loss, action_mask,
    dim=None)`` — one mean over every valid token of the micro-batch (``openrlhf/models/loss.py``). The KL term is
    the other way round in the code (``masked_mean(kl, mask, dim=-1)`` per sequence, × w_KL, ``.mean()`` over the
    batch), and so it is here whatever ``loss_agg_mode`` says. On ragged rows the two modes differ in the gradient,
    not only in scale: token-mean gives each token of a 3-token and of a 1-token response the weight 1/4,
    seq-mean-token-mean gives them 1/6 and 1/2 (see :func:`tether.losses.policy.aggregate`).
    Divergence: k3 in the loss → on-policy gradient of KL(π_ref ‖ π_θ) (forward), per sequence weighted by w_KL: easy
    prompts keep (nearly) the full KL on positive responses, hard prompts (d → 1) almost none — the opposite of a
    naive guess.
    Stop-gradient: advantages, weights, ``old_logps``, ``ref_logps``.
    Departures: see :func:`apo_shaping`; KL values not clamped; the token mean is over the batch this call is given
    (OpenRLHF's micro-batch: pass the same rows to reproduce it).
    """
    m = mask.to(torch.bool)
    logps, old_logps, ref_logps = inert(m, logps, old_logps.detach(), ref_logps.detach())
    shaping = apo_shaping(rewards, m.sum(-1), group_size=group_size)
    adv = shaping.advantages if use_stcr else shaping.advantages / shaping.length_weights
    adv = adv.to(logps.dtype)
    pg, clipped = ppo_clip(logps, old_logps.detach(), adv[:, None], clip_eps, clip_eps, None)
    pg_loss = aggregate(pg, m, loss_agg_mode, max_len)
    kl = _kl.k3(logps, ref_logps.detach())
    kl_seq = seq_mean(kl, m)
    weights = shaping.kl_weights.to(kl.dtype) if use_dads else torch.ones_like(kl_seq)
    kl_term = (kl_seq * weights).mean()
    loss = pg_loss + beta * kl_term
    metrics = {
        "pg_loss": pg_loss.detach().item(),
        "kl": kl_seq.detach().mean().item(),
        "kl_weighted": kl_term.detach().item(),
        "kl_weight_mean": weights.mean().item(),
        "clip_frac": frac(clipped, m),
    }
    return PolicyLossOutput(loss, metrics)
