"""Online-RL objectives with a non-standard KL regularizer or trust region, as pure functions of tensors.

Every objective here is a method from tether's online-RL method notes (``spec §N`` = section N of
``methods/online-rl.md``): GVPO (§8), DisCO (§9), RPG (§10), TROLL (§11), Archer (§12), prioritized KL on critical
tokens (§13), KDRL (§14), APO (§17), and the helpers GRPO-CARE's consistency bonus + EMA reference (§18), online
difficulty filtering (§19) and ProRL's reference resets (§20). PPO-clip / GRPO / DAPO / GPG / CPGD themselves live
in ``tether.losses.policy``; this module does not import it (it was being written in parallel) and carries its own
small private PPO-clip, aggregation and group-advantage helpers, with the same mode names.

Notation (spec §0): a batch holds ``B = Q·G`` responses — ``Q`` prompts × ``G`` responses each, **contiguous**
(rows ``q·G … q·G+G−1`` belong to prompt ``q``). For the sampled token ``y_{i,t}`` at state ``s_{i,t}``:

* ``logps``     log π_θ(y_{i,t}|s_{i,t}) under the policy being trained (differentiable), ``Shape: (B, T)``;
* ``old_logps`` log π_old — the rollout policy that sampled the tokens (no gradient), ``Shape: (B, T)``;
* ``ref_logps`` log π_ref — frozen reference (or teacher) (no gradient), ``Shape: (B, T)``;
* ``mask``      1/True on response tokens, 0/False on prompt and padding, ``Shape: (B, T)`` (ragged rows are fine);
* ``w = ρ = exp(logps − old_logps)`` the per-token importance ratio; ``sg(·)`` stop-gradient;
* per-sequence ``rewards`` / ``advantages``, ``Shape: (B,)``, broadcast over the tokens of their response;
* ``logits``    full-vocabulary logits ``(B, T, V)`` for the methods that need distributions (TROLL, Archer, §13).

Every objective returns :class:`PolicyLossOutput` — a differentiable scalar loss (to minimize) and a dict of
detached float metrics. Per-token matrices are reduced with the aggregation modes of spec §0 (``AGG_MODES``):

* ``token-mean``              Σ_{i,t} m·M / Σ_{i,t} m;
* ``seq-mean-token-mean``     mean_i [Σ_t m·M / Σ_t m];
* ``seq-mean-token-sum``      mean_i Σ_t m·M;
* ``seq-mean-token-sum-norm`` mean_i [Σ_t m·M / max_len] (Dr. GRPO; we average over sequences as oat does — verl
  sums over sequences before dividing by the constant — see spec §0).

Empty selections (a row or a token class with no token) contribute 0 instead of NaN.

Departures shared by everything here:

1. Distributed all-gathers of the official code (GVPO's group means, DisCO's batch) are the caller's business:
   each function sees the whole batch it is given; groups must be complete (``B % G == 0``, checked).
2. Log-ratios are clamped to [−20, 20] before exponentiating (verl's convention); this only bites at ratios beyond
   e^±20, far outside any trust region.
3. KL-estimator *values* are not clamped to [−10, 10] as verl does: a clamped value has zero gradient, which
   silently switches the regularizer off exactly where it is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tether import kl as _kl
from tether.losses.policy import AGG_MODES, PolicyLossOutput, aggregate

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

_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------------------
# private helpers: groups, PPO clip, sample KL estimators (aggregation is tether.losses.policy.aggregate)
# ----------------------------------------------------------------------------------------------------------


def _aggregate(per_token: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> Tensor:
    return aggregate(per_token, mask, mode, max_len)


def _groups(x: Tensor, group_size: int, objective: str) -> Tensor:
    """``(B,)`` → ``(B/G, G)``; a readable error when the batch is not made of complete contiguous groups."""
    if group_size < 1 or x.shape[0] % group_size != 0:
        raise ValueError(
            f"{objective}: batch of {x.shape[0]} responses is not a whole number of groups of group_size="
            f"{group_size}; keep all G responses of a prompt together and contiguous in the batch"
        )
    return x.reshape(-1, group_size)


def _grpo_advantages(rewards: Tensor, group_size: int, eps: float, objective: str) -> Tensor:
    """GRPO outcome advantage ``(R − mean_G R)/(std_G R + eps)`` with the unbiased std (verl, TRL), ``(B,)``."""
    r = _groups(rewards.detach(), group_size, objective)
    if group_size == 1:  # verl: a lone response keeps its raw score (mean 0, std 1)
        return r.reshape(-1)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)).reshape(-1)


def _ppo_clip(
    logps: Tensor,
    old_logps: Tensor,
    adv: Tensor,
    eps_low: float | Tensor,
    eps_high: float | Tensor,
    clip_c: float | None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss ``−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)``, dual-clipped at ``−c·A`` for ``A < 0``.

    verl's ``compute_policy_loss_vanilla``. ``eps_*`` may be tensors broadcastable to ``(B, T)`` (Archer's per-token
    clip ranges). Returns ``(loss, clipped)`` with ``clipped`` the boolean where the gradient is zero.
    """
    ratio = torch.exp((logps - old_logps).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    lo = 1.0 - torch.as_tensor(eps_low, dtype=ratio.dtype, device=ratio.device)
    hi = 1.0 + torch.as_tensor(eps_high, dtype=ratio.dtype, device=ratio.device)
    pg1 = -adv * ratio
    pg2 = -adv * torch.minimum(torch.maximum(ratio, lo), hi)
    loss = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if clip_c is not None:
        pg3 = -adv * clip_c
        dual = (adv < 0) & (loss > pg3)
        loss = torch.where(dual, pg3, loss)
        clipped = clipped | dual
    return loss, clipped


def _k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    return _kl.k1(logps, ref_logps)


def _k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    return _kl.k2(logps, ref_logps)


def _k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    return _kl.k3(logps, ref_logps)


#: Sample estimators of KL(π_θ ‖ q) at the sampled token (tether.kl); see tether.kl for what each one's gradient is.
_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def _estimator(name: str, objective: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in _ESTIMATORS:
        raise ValueError(f"{objective}: unknown KL estimator {name!r}; choose one of {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[name]


def _masked_frac(flags: Tensor, mask: Tensor) -> float:
    m = mask.to(torch.bool)
    return (flags & m).sum().item() / max(int(m.sum().item()), 1)


# ----------------------------------------------------------------------------------------------------------
# §8 GVPO
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
    """GVPO: regress the group-centred implicit reward onto the group-centred reward (spec §8).

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
    u = beta * torch.where(m, logps - old_logps.detach(), torch.zeros_like(logps)).sum(-1)
    u_g = _groups(u, group_size, "gvpo")
    r_g = _groups(rewards.detach().to(u.dtype), group_size, "gvpo")
    centred = (u_g - u_g.detach().mean(-1, keepdim=True)) - (r_g - r_g.mean(-1, keepdim=True))
    loss = 0.5 * centred.square().sum() / (group_size - 1)
    metrics = {
        "implicit_reward_mean": u.detach().mean().item(),
        "residual_rms": centred.detach().square().mean().sqrt().item(),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# §9 DisCO
# ----------------------------------------------------------------------------------------------------------


def _disco_score_logl(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(torch.bool)
    return torch.where(m, logps, torch.zeros_like(logps)).sum(-1) / m.sum(-1).clamp_min(1).to(logps.dtype)


def _disco_score_lratio(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(torch.bool)
    ratio = torch.exp((logps - old_logps).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    return torch.where(m, ratio, torch.zeros_like(ratio)).sum(-1) / m.sum(-1).clamp_min(1).to(logps.dtype)


def _disco_kl_k1(logps: Tensor, old_logps: Tensor) -> Tensor:
    return old_logps - logps


def _disco_kl_low_var(logps: Tensor, old_logps: Tensor) -> Tensor:
    log_ratio = (logps - old_logps).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.expm1(log_ratio) - log_ratio


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
    """DisCO: discriminative objective on binary rewards with a squared-hinge KL trust region (spec §9).

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
    the DisCO-b function with a ``tau`` argument, which would raise (spec §9 pitfall); (3) no all-gather.
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
    old_logps = old_logps.detach()
    s = _groups(_DISCO_SCORES[score](logps, old_logps, mask), group_size, "disco")
    r_g = _groups(r, group_size, "disco")
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
    d = _aggregate(_DISCO_KL[kl_type](logps, old_logps), mask, "token-mean")
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
# §10 RPG
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
    """RPG: off-policy surrogates whose gradient is exactly that of ``E_π[R] − β·D`` for four KLs (spec §10).

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

    Defaults (RPG scripts, spec §10): ``beta=1e-4``, ``(clip_low, clip_high) = (0.2, 0.28)`` (or (0.1, 0.1)),
    ``clip_c=10``, token-mean. ``kl="rkl"`` / ``style="reinforce"`` are our choice of default (the code's own default
    string is ``rpg_rf_ufkl``).

    Gradient / fixed points (verified on exact expectations in the tests): for every ``kl`` and both styles, while no
    clip is active, ``E_{π_old}[∇ loss] = −∇E_{π_θ}[A] + β·∇D``. Hence with a fixed reference the fixed point is the
    maximizer of ``E[R] − β·D``:

    * rkl / urkl (reverse KL; normalized distributions make them identical in expectation): ``π* ∝ π_ref·exp(R/β)``;
    * fkl / ufkl (forward KL): ``π*(a) = β·π_ref(a)/(λ − R(a))``, λ > max R the normalizer (mass-covering).

    With the iterative reference (``ref_logps=None``) each outer step solves the problem with π_ref = π_old — a
    mirror-descent step; the iteration keeps improving R (no stationary tilt of a fixed reference).

    Stop-gradient: κ and the REINFORCE weight are detached; ``old_logps`` and ``ref_logps`` carry no gradient.
    Departures: (1) verl's [−10, 10] clamp of the KL *values* is dropped (see module note 3); (2) the code's truncated
    branch (``kl_type`` without ``clip_ppo``: ``−sg(w_c·A + κ(w_c))·log π``) is not offered — we implement the
    paper's RPG-Style Clip; (3) ``ref_logps`` (a fixed reference distinct from the rollout policy) generalizes the
    paper's iterative setting with the ``r``/``l`` terms above [derived, checked by exact enumeration].
    """
    if kl not in _RPG_SURROGATE:
        raise ValueError(f"rpg: unknown kl {kl!r}; choose one of {sorted(_RPG_SURROGATE)}")
    if style not in _RPG_STYLES:
        raise ValueError(f"rpg: unknown style {style!r}; choose one of {_RPG_STYLES}")
    adv = advantages.detach().to(logps.dtype)[:, None]
    old = old_logps.detach()
    ref = old if ref_logps is None else ref_logps.detach()
    log_w = (logps - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    w = torch.exp(log_w)
    r = torch.exp((ref - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    if style == "differentiable":
        pg, clipped = _ppo_clip(logps, old, adv, clip_low, clip_high, clip_c)
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
    loss = _aggregate(per_token, mask, loss_agg_mode, max_len)
    metrics = {
        "kl_estimate": _aggregate(divergence.detach(), mask, "token-mean").item(),
        "clip_frac": _masked_frac(clipped, mask),
        "ppo_kl": _aggregate((old - logps).detach(), mask, "token-mean").item(),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# §11 TROLL
# ----------------------------------------------------------------------------------------------------------


class TrustRegionProjection(NamedTuple):
    """Result of :func:`troll_project`; every tensor has the leading shape ``(...)`` of the logits.

    Fields:
        logprobs: projected log-probabilities over the full vocabulary, ``Shape: (..., V)``, differentiable w.r.t.
            the policy logits (implicit-function gradient through η).
        eta: the Lagrange multiplier η ≥ 0 (0 where the constraint is inactive), detached, ``Shape: (...)``.
        kl_before: KL(p_θ ‖ p_old) on the lumped support, detached, ``Shape: (...)``.
        kl_after: KL(p̃ ‖ p_old) on the lumped support (≤ ε up to the bisection tolerance), detached.
        support: which tokens were kept individually, ``Shape: (..., V)`` bool.
    """

    logprobs: Tensor
    eta: Tensor
    kl_before: Tensor
    kl_after: Tensor
    support: Tensor


def _troll_support(old_logp: Tensor, max_support: int | None, support_mass: float | None) -> Tensor:
    """Most probable tokens of p_old: the smallest set with mass ≥ support_mass, at most max_support tokens."""
    if max_support is None and support_mass is None:
        return torch.ones_like(old_logp, dtype=torch.bool)
    sorted_logp, order = old_logp.sort(-1, descending=True)
    keep = torch.ones_like(sorted_logp, dtype=torch.bool)
    if support_mass is not None:
        mass_before = torch.cumsum(sorted_logp.exp(), -1) - sorted_logp.exp()
        keep = mass_before < support_mass
    if max_support is not None:
        rank = torch.arange(old_logp.shape[-1], device=old_logp.device)
        keep = keep & (rank < max_support)
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _troll_interpolate(t: Tensor, a: Tensor, b: Tensor, atom: Tensor) -> Tensor:
    """log p̃_t = log_softmax((1−t)·a + t·b) over the atoms (−inf elsewhere); a, b finite on atoms."""
    mixed = (1.0 - t)[..., None] * a + t[..., None] * b
    return torch.log_softmax(torch.where(atom, mixed, torch.full_like(mixed, -math.inf)), -1)


def _troll_kl(logp: Tensor, b: Tensor, atom: Tensor) -> Tensor:
    # logp is −inf off the atoms: keep 0·(−inf) out of the graph, or its backward is NaN even under torch.where
    return (logp.exp() * (torch.where(atom, logp, torch.zeros_like(logp)) - b)).sum(-1)


def troll_project(
    logits: Tensor,
    old_logits: Tensor,
    *,
    eps: float = 0.05,
    max_support: int | None = 16,
    support_mass: float | None = 1.0 - 1e-5,
    iters: int = 60,
) -> TrustRegionProjection:
    """TROLL's per-token KL trust-region projection of the new distribution toward the old one (spec §11).

    Equation (what the spec derives; [derived], details UNVERIFIED against the paper)::

        p̃ = argmin_p KL(p ‖ p_θ)  s.t.  KL(p ‖ p_old) ≤ ε
        ⇒ log p̃ = (log p_θ + η·log p_old)/(1 + η) − log Z(η)     (η = 0 if KL(p_θ ‖ p_old) ≤ ε)

    We solve in ``t = η/(1+η) ∈ [0, 1)`` (log p̃ = (1−t)·log p_θ + t·log p_old − log Z): ``KL(p̃_t ‖ p_old)`` is
    strictly decreasing in t with ``dKL/dt = −(1−t)·Var_{p̃_t}(log p_θ − log p_old)``, so bisection is safe; the
    gradient w.r.t. the policy logits goes through the implicit function theorem
    (``dt/dθ = −∂_θ g / ∂_t g`` for ``g = KL(p̃_t ‖ p_old) − ε``), implemented as one detached-denominator Newton
    correction whose value is exactly the bisection root.

    Sparsification: the support S is the smallest set of p_old's most probable tokens with mass ≥ ``support_mass``,
    capped at ``max_support`` (paper: "typically 5–10 tokens capturing > 99.999% of the mass" — secondary summary).
    Tokens outside S are lumped into one "rest" atom for the projection; inside the rest, p̃ keeps p_θ's proportions
    (``p̃(v) = p̃(rest)·p_θ(v)/p_θ(rest)``), so the sampled token always has a projected probability (spec pitfall).
    ``max_support=None, support_mass=None`` projects over the full vocabulary.

    Paper: Becker, Freymuth, Thilges, Otto, Neumann 2025, "TROLL: Trust Regions improve Reinforcement Learning for
    Large Language Models", arXiv:2510.03817. No public code was found; project page and abstract read only.

    Shapes: ``logits``, ``old_logits`` ``(..., V)`` → see :class:`TrustRegionProjection`. The old logits carry no
    gradient. The bisection runs in fp32 (fp64 if the inputs are fp64) whatever the input dtype.

    Defaults: ``eps=0.05``, ``max_support=16`` — UNVERIFIED (paper not accessible here). The projection direction
    (KL(p ‖ p_θ) objective, KL(p ‖ p_old) constraint), the lumping of the tail and the tolerances are our choices.
    Departures: takes full old logits; at scale store p_old's top-K log-probs and ids at rollout time instead.
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    a = torch.log_softmax(logits.to(compute_dtype), -1)
    b = torch.log_softmax(old_logits.detach().to(compute_dtype), -1)
    support = _troll_support(b, max_support, support_mass)
    has_rest = (~support).any(-1)

    def rest_logmass(x: Tensor) -> Tensor:
        tail = torch.where(support, torch.full_like(x, -math.inf), x)
        tail = torch.where(has_rest[..., None], tail, torch.zeros_like(x))  # no tail: finite dummy, masked below
        return torch.where(has_rest, torch.logsumexp(tail, -1), torch.zeros_like(x[..., 0]))

    a_rest, b_rest = rest_logmass(a), rest_logmass(b)
    atom = torch.cat([support, has_rest[..., None]], -1)
    a_atoms = torch.cat([a, a_rest[..., None]], -1)
    a_atoms = torch.where(atom, a_atoms, torch.zeros_like(a_atoms))
    b_atoms = torch.cat([b, b_rest[..., None]], -1)
    b_atoms = torch.where(atom, b_atoms, torch.zeros_like(b_atoms))

    with torch.no_grad():
        a_d = a_atoms.detach()
        kl_before = _troll_kl(_troll_interpolate(torch.zeros_like(a_rest), a_d, b_atoms, atom), b_atoms, atom)
        active = kl_before > eps
        lo, hi = torch.zeros_like(kl_before), torch.ones_like(kl_before)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            too_far = _troll_kl(_troll_interpolate(mid, a_d, b_atoms, atom), b_atoms, atom) > eps
            lo = torch.where(too_far, mid, lo)
            hi = torch.where(too_far, hi, mid)
        t_star = torch.where(active, hi, torch.zeros_like(hi))
        logp_star = _troll_interpolate(t_star, a_d, b_atoms, atom)
        diff = torch.where(atom, a_d - b_atoms, torch.zeros_like(a_d))
        p_star = logp_star.exp()
        mean = (p_star * diff).sum(-1, keepdim=True)
        var = (p_star * (diff - mean).square()).sum(-1)
        dg_dt = torch.where(active, -(1.0 - t_star) * var, -torch.ones_like(var))

    g = _troll_kl(_troll_interpolate(t_star, a_atoms, b_atoms, atom), b_atoms, atom)
    t = torch.where(active, t_star - (g - g.detach()) / dg_dt, torch.zeros_like(t_star))
    logp_atoms = _troll_interpolate(t, a_atoms, b_atoms, atom)
    rest = torch.where(has_rest, logp_atoms[..., -1], torch.zeros_like(a_rest))
    logprobs = torch.where(support, logp_atoms[..., :-1], rest[..., None] + a - a_rest[..., None])
    with torch.no_grad():
        kl_after = _troll_kl(logp_atoms.detach(), b_atoms, atom)
        eta = t_star / (1.0 - t_star)
    return TrustRegionProjection(logprobs.to(logits.dtype), eta, kl_before, kl_after, support)


def troll(
    logits: Tensor,
    old_logits: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps: float = 0.05,
    alpha: float = 1.0,
    max_support: int | None = 16,
    support_mass: float | None = 1.0 - 1e-5,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """TROLL: the ratio objective with the projected policy in place of PPO's clipped ratio (spec §11).

    Equation (structure from the abstract/project page; exact form UNVERIFIED)::

        p̃ = troll_project(p_θ, p_old; ε)                             per token (see troll_project)
        L_{i,t} = −(p̃(y_{i,t}) / p_old(y_{i,t}))·A_i  +  α·KL(sg(p̃) ‖ p_θ)(s_{i,t})

    The first term is the unclipped importance-weighted objective of the projected policy — its gradient flows into
    θ through the differentiable projection, and is the plain on-policy gradient inside the trust region; the second
    regresses the model onto its projection so that inference needs no projection (zero where the constraint is
    inactive, since then p̃ = p_θ).

    Paper: Becker et al. 2025, arXiv:2510.03817 (see :func:`troll_project`).
    Shapes: ``logits``, ``old_logits`` ``(B, T, V)``; ``tokens`` ``(B, T)`` sampled ids; ``advantages`` ``(B,)`` from
    any estimator (GRPO, Dr. GRPO, REINFORCE++ …; the method is advantage-agnostic); ``mask`` ``(B, T)``.

    KL handling: a hard token-level trust region KL(p̃ ‖ p_old) ≤ ε to the rollout policy; any reference KL of the
    underlying method is added by the caller unchanged.
    Defaults: ``eps=0.05``, ``alpha=1.0``, ``max_support=16`` — all UNVERIFIED (no paper text or code available).
    Stop-gradient: the regression target p̃; ``old_logits``.
    Departures: everything beyond "differentiable KL projection on a sparse top-token support replacing the clip" is
    our derivation (spec §11); revisit when the paper or code can be read.
    """
    proj = troll_project(logits, old_logits, eps=eps, max_support=max_support, support_mass=support_mass)
    idx = tokens.long().unsqueeze(-1)
    logp_tilde = proj.logprobs.gather(-1, idx).squeeze(-1)
    old_logp = torch.log_softmax(old_logits.detach().to(logp_tilde.dtype), -1).gather(-1, idx).squeeze(-1)
    ratio = torch.exp((logp_tilde - old_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    adv = advantages.detach().to(ratio.dtype)[:, None]
    regression = _kl.forward_kl(logits, proj.logprobs.detach())  # KL(sg(p̃) ‖ p_θ)
    per_token = -ratio * adv + alpha * regression
    loss = _aggregate(per_token, mask, loss_agg_mode, max_len)
    metrics = {
        "projected_frac": _masked_frac(proj.eta > 0, mask),
        "kl_old_before": _aggregate(proj.kl_before, mask, "token-mean").item(),
        "kl_old_after": _aggregate(proj.kl_after, mask, "token-mean").item(),
        "regression": _aggregate(regression.detach(), mask, "token-mean").item(),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# §12 Archer
# ----------------------------------------------------------------------------------------------------------


def archer(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    logits: Tensor | None = None,
    entropy: Tensor | None = None,
    quantile: float = 0.8,
    clip_low_entropy: float = 0.2,
    clip_high_entropy: float = 0.5,
    clip_c: float | None = 10.0,
    kl_coef_low_entropy: float = 1e-3,
    kl_coef_high_entropy: float = 0.0,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """Archer: entropy-quantile split of tokens, tight clip + KL on low-entropy tokens, loose clip on the rest (§12).

    Equation (code ``verl/workers/actor/dp_actor.py``, ``use_token_entropy_separate``)::

        H_{i,t} = H(π_θ(·|s_{i,t}))  (detached)     q_i = quantile_{0.8}{H_{i,t} : t valid}  (linear interp.)
        high ⇔ H_{i,t} > q_i,  low ⇔ H_{i,t} ≤ q_i                         (per response, not per batch)
        L = agg_all( L^clip_{i,t}(A_i; ε_t, c) ) + β_low·agg_low(k3) + β_high·agg_high(k3)
        ε_t = 0.2 on low-entropy tokens, 0.5 on high-entropy tokens (symmetric), dual clip c = 10
        k3_{i,t} = π_ref/π_θ − 1 − log(π_ref/π_θ) at the sampled token (verl low_var_kl)

    Paper: Wang et al. 2025, "Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints for RLVR" (Archer).
    Code: ``wizard-III/ArcherCodeR`` per spec; read here in the fork ``Jinxiaolong1129/ArcherCodeR``
    ``verl/workers/actor/dp_actor.py``: ``nanquantile`` per row over valid tokens, ``<= q`` is the low class (the
    code's variable names are swapped: its ``high_entropy_mask`` marks the low-entropy tokens), each class's KL
    aggregated with ``loss_agg_mode`` over that class's tokens, coefficients ``kl_loss_coef`` (low) and
    ``high_entropy_kl_loss_scale_coef`` (high, 0.0 in the scripts).

    Shapes: ``(B, T)`` log-probs and mask; ``advantages`` ``(B,)`` (GRPO mean/std); either ``logits`` ``(B, T, V)``
    of the *current* policy (entropy computed here, detached) or a precomputed ``entropy`` ``(B, T)`` (e.g. from
    ``tether.logprobs.token_stats``, which never materializes the logits).

    Defaults [code/scripts]: quantile 0.8, clips 0.2/0.5, ``clip_c=10``, ``β_low=0.001``, ``β_high=0``, token-mean.
    Divergence: k3 in the loss on samples from π_old; on-policy its gradient is ∇KL(π_ref ‖ π_θ) (forward KL, see
    tether.kl), applied to low-entropy tokens only; off-policy (Archer runs 3 PPO epochs) it lacks the importance
    weight and follows no KL exactly (spec §0.1).
    Stop-gradient: the entropy (the split is not differentiated); ``old_logps``, ``ref_logps``.
    Departures: KL values are not clamped to ±10 (module note 3). A class with no token contributes 0 (verl's
    masked mean divides by count + 1e-8, same value).
    """
    if (logits is None) == (entropy is None):
        raise ValueError("archer: pass exactly one of logits= (B, T, V) or entropy= (B, T) of the current policy")
    h = (_kl.entropy(logits.detach()) if logits is not None else entropy.detach()).to(logps.dtype)
    m = mask.to(torch.bool)
    with torch.no_grad():
        q = torch.nanquantile(torch.where(m, h, torch.full_like(h, math.nan)), quantile, dim=-1, keepdim=True)
        high = (h > q) & m
        low = (h <= q) & m
    eps = torch.where(high, torch.full_like(h, clip_high_entropy), torch.full_like(h, clip_low_entropy))
    adv = advantages.detach().to(logps.dtype)[:, None]
    pg, clipped = _ppo_clip(logps, old_logps.detach(), adv, eps, eps, clip_c)
    kl = _kl.k3(logps, ref_logps.detach())
    kl_low = _aggregate(kl, low, loss_agg_mode, max_len)
    kl_high = _aggregate(kl, high, loss_agg_mode, max_len)
    pg_loss = _aggregate(pg, m, loss_agg_mode, max_len)
    loss = pg_loss + kl_coef_low_entropy * kl_low + kl_coef_high_entropy * kl_high
    metrics = {
        "pg_loss": pg_loss.detach().item(),
        "kl_low_entropy": kl_low.detach().item(),
        "kl_high_entropy": kl_high.detach().item(),
        "high_entropy_frac": _masked_frac(high, m),
        "clip_frac": _masked_frac(clipped, m),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# §13 Prioritized KL on critical tokens
# ----------------------------------------------------------------------------------------------------------


def critical_token_kl(
    logps: Tensor,
    ref_logps: Tensor,
    ref_logits: Tensor,
    mask: Tensor,
    *,
    kl_coef: float = 5.0,
    estimator: str = "k2",
    rho: float = 150.0,
    intercept: float = 0.0,
    ref_temperature: float = 4.0,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """KL penalty relaxed on "critical" tokens, where the reference is uncertain (spec §13).

    Equation (code ``compute_certainty_coeff`` / ``compute_kl_div_penalty``)::

        c_t = 1 + log(max_a π_ref^{(T')}(a|s_t)) / log|V|     ∈ [0, 1]   (π_ref^{(T')} = softmax(ref_logits / T'))
        w_t = (1 − b)·c_t^ρ + b
        L   = λ_KL · mean_t [ w_t · k(y_t) ],   k ∈ {k1, k2, k3}(log π_θ, log π_ref) at the sampled token

    Uniform reference → c = 0, w = b (KL ignored); one-hot reference → c = 1, w = 1 (full penalty).

    Paper: Vassoyan, Beau, Plaud 2025, "Ignore the KL Penalty! Boosting Exploration on Critical Tokens to Enhance
    RL Fine-Tuning". Code: ``jvasso/llm-rl-arithmetic`` ``src/rl_modules/custom_a2c_policy.py`` (read: the penalty
    is ``torch.mean(certainty_coeff * k)`` over all positions — our token-mean).

    This is the KL term only; add it to the actor (A2C/PPO) loss of your recipe.
    Shapes: ``logps``, ``ref_logps``, ``mask`` ``(B, T)``; ``ref_logits`` ``(B, T, V)`` (only its max probability is
    used; detached).

    Defaults (``src/rl_train.py``, spec §13): ``λ_KL = 5``, k2, ``ρ = 150``, ``b = 0``, ``T' = 4`` — tuned for a small
    GPT-2 with a reduced vocabulary: with |V| ≈ 50k, ``c`` is close to 1 almost everywhere and ρ must be re-tuned.
    Divergence: with ``estimator="k2"`` on on-policy samples the gradient is a per-token ``w_t``-weighted
    ∇KL(π_θ ‖ π_ref) (reverse KL); k3 would give the forward-KL gradient, k1 no regularization (tether.kl).
    Stop-gradient: ``w_t`` (a function of the reference only); ``ref_logps``.
    Departures: none in the math.
    """
    k = _estimator(estimator, "critical_token_kl")
    with torch.no_grad():
        vocab = ref_logits.shape[-1]
        log_p_max = torch.log_softmax(ref_logits.detach().to(logps.dtype) / ref_temperature, -1).amax(-1)
        certainty = (1.0 + log_p_max / math.log(vocab)).clamp(0.0, 1.0)
        weight = (1.0 - intercept) * certainty.pow(rho) + intercept
    per_token = weight * k(logps, ref_logps.detach())
    penalty = _aggregate(per_token, mask, loss_agg_mode, max_len)
    loss = kl_coef * penalty
    metrics = {
        "kl_weighted": penalty.detach().item(),
        "kl_unweighted": _aggregate(k(logps, ref_logps).detach(), mask, "token-mean").item(),
        "weight_mean": _aggregate(weight, mask, "token-mean").item(),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# §14 KDRL
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
    """KDRL: GRPO on the student's rollouts plus reverse-KL distillation to a teacher, one objective (spec §14).

    Equation (secondary sources: arXiv HTML abstract + reviews)::

        J = J_GRPO(θ) − β · E_{y~π_θ}[ Σ_t k2(log π_θ(y_t), log π_T(y_t)) ]
        L_{i,t} = L^clip_{i,t}(Â_i) + β · k2_{i,t} · κ_i       κ_i = 0 for rewarded responses (reward-guided KD)
        Â_i = (R_i − mean_G R)/(std_G R + 1e-6)                (unbiased std), token-mean over the batch

    Paper: Xu et al. 2025, "KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and Reinforcement
    Learning", arXiv:2506.02208. No public code found.

    Shapes: ``logps``, ``old_logps``, ``teacher_logps`` (teacher log-probs of the student's sampled tokens — same
    tokenizer), ``mask`` ``(B, T)``; ``rewards`` ``(B,)``.

    Args:
        beta: KD coefficient; the paper anneals it from 5e-3 to 1e-3 [secondary] — schedule it in the recipe.
        estimator: "k2" (default; on-policy its gradient is exactly ∇KL(π_θ ‖ π_T), the reverse KL) or "k3" (whose
            gradient is the *forward* KL(π_T ‖ π_θ) — spec §14 pitfall), or "k1" (no gradient in expectation).
        kd_on_correct: False = reward-guided KD: no KD on responses with ``reward ≥ correct_reward``.
        correct_reward: threshold for "rewarded" (binary verifier: 1.0). Masking granularity UNVERIFIED.

    Stop-gradient: ``old_logps``, ``teacher_logps``, the advantages.
    Off-policy caveat: the k2 term has no importance weight, so with several mini-batches per rollout it follows the
    reverse-KL gradient only approximately (spec §0.1).
    Departures / UNVERIFIED: masking granularity (response-level here), the KD term shares GRPO's token-mean
    denominator (masked responses just contribute zero), symmetric clip 0.2 (GRPO default), no reference KL.
    """
    k = _estimator(estimator, "kdrl")
    adv = _grpo_advantages(rewards, group_size, adv_eps, "kdrl").to(logps.dtype)
    pg, clipped = _ppo_clip(logps, old_logps.detach(), adv[:, None], clip_low, clip_high, None)
    kd = k(logps, teacher_logps.detach())
    if kd_on_correct:
        kd_gate = torch.ones_like(adv)
    else:
        kd_gate = (rewards.detach() < correct_reward).to(logps.dtype)
    per_token = pg + beta * kd * kd_gate[:, None]
    loss = _aggregate(per_token, mask, loss_agg_mode, max_len)
    metrics = {
        "pg_loss": _aggregate(pg.detach(), mask, loss_agg_mode, max_len).item(),
        "kd": _aggregate(kd.detach(), mask, "token-mean").item(),
        "kd_frac": kd_gate.mean().item(),
        "clip_frac": _masked_frac(clipped, mask),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# §17 APO
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
    """APO's difficulty-adaptive KL weights (DADS) and length-penalized negative advantages (STCR), spec §17.

    Equations (code ``openrlhf/trainer/ppo_utils/experience_maker.py`` and ``trainer/ray/ppo_actor.py``)::

        correct_i = ⌊R_i⌋ ≥ 1,   d = 1 − #correct/G
        Â_i = (R_i − mean_G R)/(std_G R + 1e-9)                                  (unbiased std)
        STCR: Δ_i = |y_i| − mean_{correct}|y| for an incorrect i in a group with a correct answer;
              Â_i ← Â_i · (1 + (1 − 1.00001^{−Δ_i})) if Δ_i > 0
        DADS: w_KL = 1 − exp(−e·(1 − d)) if Â_i > 0 and 0 < d < 1, else 1

    Shapes: ``rewards`` ``(B,)``, ``lengths`` ``(B,)`` valid response lengths (``mask.sum(-1)``).
    Departure: the code weights correct lengths by ``trunc(R)`` and uses ``1 − trunc(R)`` as the incorrect flag; we use
    the indicator ``R ≥ 1`` — identical for rewards in [0, 2), different (and saner) above.
    """
    r = _groups(rewards.detach(), group_size, "apo_shaping")
    length = _groups(lengths.detach().to(r.dtype), group_size, "apo_shaping")
    correct = r >= 1.0
    n_correct = correct.sum(-1, keepdim=True).to(r.dtype)
    difficulty = (1.0 - n_correct / group_size).expand_as(r)
    std = r.std(-1, keepdim=True) if group_size > 1 else torch.ones_like(r[:, :1])
    adv = (r - r.mean(-1, keepdim=True)) / (std + std_eps)
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
    loss_agg_mode: str = "seq-mean-token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """APO: asymmetric treatment of positive (DADS KL weights) and negative (STCR length) responses (spec §17).

    Equation::

        (Â, w_KL) = apo_shaping(R, |y|)                        see apo_shaping
        L = agg( L^clip_{i,t}(Â_i; ε = 0.2) ) + β · mean_i [ w_KL,i · mean_t k3_{i,t} ]

    Paper: "Asymmetric Policy Optimization" (View-R1). Code: ``Indolent-Kawhi/View-R1`` (read:
    ``experience_maker.py`` group_norm branch — difficulty, STCR; ``ppo_actor.py`` — ``calculate_kl_weight``, KL weights
    chosen by the sign of the first-token advantage, per-sequence masked-mean KL × weights, batch mean,
    ``× kl_ctl.value``).

    Shapes: ``(B, T)`` log-probs and mask (lengths = ``mask.sum(-1)``); ``rewards`` ``(B,)`` (total reward; "correct"
    means reward ≥ 1, the integer part of an accuracy + format reward).

    Defaults (``examples/scripts/train_grpo.sh`` per spec): ``beta=1e-3`` with k3, ``G=8``; ``clip_eps=0.2`` (OpenRLHF
    default). ``loss_agg_mode`` of OpenRLHF's PolicyLoss in this fork: UNVERIFIED (seq-mean-token-mean assumed).
    Divergence: k3 in the loss → on-policy gradient of KL(π_ref ‖ π_θ) (forward), per sequence weighted by w_KL: easy
    prompts keep (nearly) the full KL on positive responses, hard prompts (d → 1) almost none — the opposite of a
    naive guess (spec pitfall).
    Stop-gradient: advantages, weights, ``old_logps``, ``ref_logps``.
    Departures: see :func:`apo_shaping`; KL values not clamped.
    """
    m = mask.to(torch.bool)
    shaping = apo_shaping(rewards, m.sum(-1), group_size=group_size)
    adv = shaping.advantages if use_stcr else shaping.advantages / shaping.length_weights
    adv = adv.to(logps.dtype)
    pg, clipped = _ppo_clip(logps, old_logps.detach(), adv[:, None], clip_eps, clip_eps, None)
    pg_loss = _aggregate(pg, m, loss_agg_mode, max_len)
    kl = _kl.k3(logps, ref_logps.detach())
    kl_seq = torch.where(m, kl, torch.zeros_like(kl)).sum(-1) / m.sum(-1).clamp_min(1).to(kl.dtype)
    weights = shaping.kl_weights.to(kl.dtype) if use_dads else torch.ones_like(kl_seq)
    kl_term = (kl_seq * weights).mean()
    loss = pg_loss + beta * kl_term
    metrics = {
        "pg_loss": pg_loss.detach().item(),
        "kl": kl_seq.detach().mean().item(),
        "kl_weighted": kl_term.detach().item(),
        "kl_weight_mean": weights.mean().item(),
        "clip_frac": _masked_frac(clipped, m),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# §18 GRPO-CARE: consistency bonus and EMA reference
# ----------------------------------------------------------------------------------------------------------


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
    """GRPO-CARE's consistency bonus: reward correct answers that the EMA reference finds likely (spec §18).

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
        acc = _groups(accuracy.detach().to(conf.dtype), group_size, "grpo_care_bonus")
        conf = _groups(conf, group_size, "grpo_care_bonus")
        accurate = (acc > 0.1) & (acc >= acc.mean(-1, keepdim=True))
        n_acc = accurate.sum(-1, keepdim=True)
        threshold = torch.where(accurate, conf, torch.zeros_like(conf)).sum(-1, keepdim=True)
        threshold = threshold / n_acc.clamp_min(1) - margin
        bonus = torch.where(accurate & (conf >= threshold), bonus_coef * acc, torch.zeros_like(acc))
    return bonus.reshape(-1)


@torch.no_grad()
def ema_update_(ref_state: MutableMapping[str, Tensor], policy_state: Mapping[str, Tensor], decay: float) -> None:
    """In place: ``θ_ref ← decay·θ_ref + (1 − decay)·θ`` for every floating tensor; other tensors are copied.

    GRPO-CARE (``ema_trainer.py::moving_average``: ``param_ema.copy_(lerp(param, param_ema, β))``, β = 0.995 in the
    scripts; ``decay = 0`` copies). Works on ``model.state_dict()`` (tensors share storage with the parameters).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1] (0 = copy the policy), got {decay}")
    missing = set(ref_state) ^ set(policy_state)
    if missing:
        raise KeyError(f"ema_update_: reference and policy state dicts differ in keys {sorted(missing)[:5]}")
    for name, ref in ref_state.items():
        new = policy_state[name].to(device=ref.device, dtype=ref.dtype)
        if ref.is_floating_point() and decay > 0.0:
            ref.lerp_(new, 1.0 - decay)
        else:
            ref.copy_(new)


@dataclass
class EMAReference:
    """GRPO-CARE's slowly moving reference: every ``every`` optimizer steps, ``θ_ref ← d·θ_ref + (1−d)·θ`` (§18).

    Fields:
        decay: d = 0.995 (script); 0 turns it into a hard copy ("reset every K steps").
        every: K = 10 (script): the update happens on calls K, 2K, 3K, …
        steps: calls to :meth:`step` so far (state).
    """

    decay: float = 0.995
    every: int = 10
    steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"EMAReference.every must be ≥ 1 (optimizer steps between updates), got {self.every}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"EMAReference.decay must be in [0, 1], got {self.decay}")

    def step(self, ref_state: MutableMapping[str, Tensor], policy_state: Mapping[str, Tensor]) -> bool:
        """Call once per optimizer step; returns True when the reference was updated."""
        self.steps += 1
        if self.steps % self.every:
            return False
        ema_update_(ref_state, policy_state, self.decay)
        return True


# ----------------------------------------------------------------------------------------------------------
# §19 online difficulty filtering, §20 ProRL reference resets
# ----------------------------------------------------------------------------------------------------------


def difficulty_filter(pass_rates: Tensor, low: float, high: float) -> Tensor:
    """Balanced online difficulty filtering: keep prompts with ``low ≤ p̂ ≤ high`` (spec §19).

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


@dataclass
class ReferenceResetSchedule:
    """ProRL's periodic hard reset of the reference to the current policy (spec §20).

    ProRL (Liu et al. 2025, "ProRL: Prolonged Reinforcement Learning Expands Reasoning Boundaries in Large Language
    Models", arXiv:2505.24864) keeps a KL penalty to a reference and, when validation stalls or degrades, resets the
    reference to the current policy and re-initializes the optimizer. The trigger and schedule are UNVERIFIED (the
    paper describes resets at stage boundaries / when validation degrades), so this helper supports both:

    Fields:
        every: reset every ``every`` optimizer steps (None: off).
        at_steps: explicit optimizer steps at which to reset.
        patience: reset after this many consecutive validations without improvement (None: off).
        min_delta: an improvement must exceed this to count.
        higher_is_better: direction of the validation metric.

    On a reset the caller must: copy the policy weights into the reference (``ref.load_state_dict(policy.state_dict())``
    or ``ema_update_(…, decay=0)``) **and** re-create the optimizer (moments to zero). Immediately afterwards the KL
    term and its gradient are exactly zero.
    """

    every: int | None = None
    at_steps: tuple[int, ...] = ()
    patience: int | None = None
    min_delta: float = 0.0
    higher_is_better: bool = True
    steps: int = field(default=0, init=False)
    resets: int = field(default=0, init=False)
    _best: float | None = field(default=None, init=False, repr=False)
    _bad: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError(f"ReferenceResetSchedule.every must be ≥ 1 or None, got {self.every}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"ReferenceResetSchedule.patience must be ≥ 1 or None, got {self.patience}")

    def step(self) -> bool:
        """Call once per optimizer step; True when the reference must be reset now (periodic / listed steps)."""
        self.steps += 1
        due = (self.every is not None and self.steps % self.every == 0) or self.steps in self.at_steps
        if due:
            self._reset()
        return due

    def observe(self, value: float) -> bool:
        """Report a validation metric; True when it has not improved for ``patience`` evaluations (reset now)."""
        if self.patience is None:
            return False
        score = value if self.higher_is_better else -value
        if self._best is None or score > self._best + self.min_delta:
            self._best, self._bad = score, 0
            return False
        self._bad += 1
        if self._bad >= self.patience:
            self._reset()
            return True
        return False

    def _reset(self) -> None:
        self.resets += 1
        self._bad = 0
        self._best = None
