"""Per-token trust regions and token-selective KL: TROLL, Archer, prioritized KL on critical tokens.

Notation, aggregation and the departures shared by every method here: see ``tether.losses.policy``.

Each method decides token by token how hard to hold the policy: TROLL projects every next-token distribution into a
KL ball around the rollout policy's (in place of PPO's ratio clip), Archer splits each response's tokens at an entropy
quantile (tight clip + KL on the low-entropy ones, loose clip on the rest), and the critical-token KL relaxes the
reference KL where the reference is uncertain. They need full-vocabulary logits (TROLL; the critical-token KL's
reference) or per-token entropies (Archer). Archer's clip is :func:`tether.losses.policy.ppo_clip_per_token` with
per-token clip ranges, its KL terms :func:`tether.losses.policy.kl_penalty` over each token class.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tether import kl as _kl
from tether.losses.policy._common import frac, inert, ppo_clip, ratio, sample_kl, token_mean
from tether.losses.policy.surrogates import PolicyLossOutput, aggregate, kl_penalty

__all__ = ["TrustRegionProjection", "archer", "critical_token_kl", "troll", "troll_project"]


# ----------------------------------------------------------------------------------------------------------
# TROLL
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


def _project_atoms(a: Tensor, b: Tensor, atom: Tensor, eps: float, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """The KL-ball projection of :func:`troll_project` on atoms (also used by the sparse form,
    ``tether.losses.policy.chunked_forms.troll_sparse``).

    ``a`` = log p_θ (differentiable), ``b`` = log p_old (constant), both (..., A) and normalized over ``atom``.
    Returns the projected log-probs (..., A) (−inf off the atoms; implicit-function gradient through t), the root
    t* (detached) and KL(p_θ ‖ p_old) (detached). Same bisection on t = η/(1+η) and the same one-step Newton
    correction with a detached denominator as the full-vocabulary form.
    """
    with torch.no_grad():
        a_d = a.detach()
        kl_before = _troll_kl(_troll_interpolate(torch.zeros_like(a_d[..., 0]), a_d, b, atom), b, atom)
        active = kl_before > eps
        lo, hi = torch.zeros_like(kl_before), torch.ones_like(kl_before)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            too_far = _troll_kl(_troll_interpolate(mid, a_d, b, atom), b, atom) > eps
            lo, hi = torch.where(too_far, mid, lo), torch.where(too_far, hi, mid)
        t_star = torch.where(active, hi, torch.zeros_like(hi))
        p_star = _troll_interpolate(t_star, a_d, b, atom).exp()
        diff = torch.where(atom, a_d - b, torch.zeros_like(a_d))
        mean = (p_star * diff).sum(-1, keepdim=True)
        var = (p_star * (diff - mean).square()).sum(-1)
        dg_dt = torch.where(active, -(1.0 - t_star) * var, -torch.ones_like(var))
    g = _troll_kl(_troll_interpolate(t_star, a, b, atom), b, atom)
    t = torch.where(active, t_star - (g - g.detach()) / dg_dt, torch.zeros_like(t_star))
    return _troll_interpolate(t, a, b, atom), t_star, kl_before


def troll_project(
    logits: Tensor,
    old_logits: Tensor,
    *,
    eps: float = 0.05,
    max_support: int | None = 16,
    support_mass: float | None = 1.0 - 1e-5,
    iters: int = 60,
) -> TrustRegionProjection:
    """TROLL's per-token KL trust-region projection of the new distribution toward the old one.

    Equation (our derivation from the abstract's description; details UNVERIFIED against the paper)::

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
    (``p̃(v) = p̃(rest)·p_θ(v)/p_θ(rest)``), so the sampled token always has a projected probability.
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

    logp_atoms, t_star, kl_before = _project_atoms(a_atoms, b_atoms, atom, eps, iters)
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
    """TROLL: the ratio objective with the projected policy in place of PPO's clipped ratio.

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
    our derivation (see :func:`troll_project`); revisit when the paper or code can be read.
    """
    logits, old_logits, tokens = inert(mask, logits, old_logits.detach(), tokens)
    proj = troll_project(logits, old_logits, eps=eps, max_support=max_support, support_mass=support_mass)
    idx = tokens.long().unsqueeze(-1)
    logp_tilde = proj.logprobs.gather(-1, idx).squeeze(-1)
    old_logp = torch.log_softmax(old_logits.detach().to(logp_tilde.dtype), -1).gather(-1, idx).squeeze(-1)
    rho = ratio(logp_tilde, old_logp)
    adv = advantages.detach().to(rho.dtype)[:, None]
    regression = _kl.forward_kl(logits, proj.logprobs.detach())  # KL(sg(p̃) ‖ p_θ)
    per_token = -rho * adv + alpha * regression
    loss = aggregate(per_token, mask, loss_agg_mode, max_len)
    metrics = {
        "projected_frac": frac(proj.eta > 0, mask),
        "kl_old_before": token_mean(proj.kl_before, mask),
        "kl_old_after": token_mean(proj.kl_after, mask),
        "regression": token_mean(regression, mask),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# Archer
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
    """Archer: entropy-quantile split of tokens, tight clip + KL on low-entropy tokens, loose clip on the rest.

    Equation (code ``verl/workers/actor/dp_actor.py``, ``use_token_entropy_separate``)::

        H_{i,t} = H(π_θ(·|s_{i,t}))  (detached)     q_i = quantile_{0.8}{H_{i,t} : t valid}  (linear interp.)
        high ⇔ H_{i,t} > q_i,  low ⇔ H_{i,t} ≤ q_i                         (per response, not per batch)
        L = agg_all( L^clip_{i,t}(A_i; ε_t, c) ) + β_low·agg_low(k3) + β_high·agg_high(k3)
        ε_t = 0.2 on low-entropy tokens, 0.5 on high-entropy tokens (symmetric), dual clip c = 10
        k3_{i,t} = π_ref/π_θ − 1 − log(π_ref/π_θ) at the sampled token (verl low_var_kl)

    Paper: Wang et al. 2025, "Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints for RLVR" (Archer).
    Code: ``wizard-III/ArcherCodeR`` (official); read here in the fork ``Jinxiaolong1129/ArcherCodeR``
    ``verl/workers/actor/dp_actor.py``: ``nanquantile`` per row over valid tokens, ``<= q`` is the low class (the
    code's variable names are swapped: its ``high_entropy_mask`` marks the low-entropy tokens), each class's KL
    aggregated with ``loss_agg_mode`` over that class's tokens, coefficients ``kl_loss_coef`` (low) and
    ``high_entropy_kl_loss_scale_coef`` (high, 0.0 in the scripts).

    Shapes: ``(B, T)`` log-probs and mask; ``advantages`` ``(B,)`` (GRPO mean/std); either ``logits`` ``(B, T, V)``
    of the *current* policy (entropy computed here, detached) or a precomputed ``entropy`` ``(B, T)`` (e.g. from
    ``tether.logprobs.token_stats``, which never materializes the logits).

    Defaults [code/scripts]: quantile 0.8, clips 0.2/0.5, ``clip_c=10``, ``β_low=0.001``, ``β_high=0``, token-mean.
    Divergence: k3 in the loss on samples from π_old; on-policy its gradient is ∇KL(π_ref ‖ π_θ) (forward KL, see
    tether.kl) at every state where the token's class does not depend on which token is sampled there. The
    quantile is per RESPONSE, so a token's class depends on the entropies of the later states of its response —
    and those depend on the token itself: where they do, the expected gradient at that state is the token-selected
    ``Σ_a π(a)·β(a)·(1 − π_ref(a)/π(a))·∇log π(a)`` (β(a) the coefficient of the class a would land in), which is
    not the gradient of any KL (``tests/losses/test_policy_oracles.py``). Off-policy (Archer runs 3 PPO epochs) k3
    lacks the importance weight and follows no KL exactly (Zhang et al. 2025, RPG, arXiv:2505.17508, §2.2).
    Stop-gradient: the entropy (the split is not differentiated); ``old_logps``, ``ref_logps``.
    Departures: KL values are not clamped to ±10 (package note 3). A class with no token contributes 0 (verl's
    masked mean divides by count + 1e-8, same value).
    """
    if (logits is None) == (entropy is None):
        raise ValueError("archer: pass exactly one of logits= (B, T, V) or entropy= (B, T) of the current policy")
    logps, old_logps, ref_logps, logits, entropy = inert(
        mask, logps, old_logps.detach(), ref_logps.detach(), None if logits is None else logits.detach(),
        None if entropy is None else entropy.detach())
    h = (_kl.entropy(logits.detach()) if logits is not None else entropy.detach()).to(logps.dtype)
    m = mask.to(torch.bool)
    with torch.no_grad():
        q = torch.nanquantile(torch.where(m, h, torch.full_like(h, math.nan)), quantile, dim=-1, keepdim=True)
        high = (h > q) & m
        low = (h <= q) & m
    eps = torch.where(high, torch.full_like(h, clip_high_entropy), torch.full_like(h, clip_low_entropy))
    adv = advantages.detach().to(logps.dtype)[:, None]
    pg, clipped = ppo_clip(logps, old_logps.detach(), adv, eps, eps, clip_c)
    kl_low = kl_penalty(logps, ref_logps, low, estimator="k3", agg=loss_agg_mode, max_len=max_len)
    kl_high = kl_penalty(logps, ref_logps, high, estimator="k3", agg=loss_agg_mode, max_len=max_len)
    pg_loss = aggregate(pg, m, loss_agg_mode, max_len)
    loss = pg_loss + kl_coef_low_entropy * kl_low + kl_coef_high_entropy * kl_high
    metrics = {
        "pg_loss": pg_loss.detach().item(),
        "kl_low_entropy": kl_low.detach().item(),
        "kl_high_entropy": kl_high.detach().item(),
        "high_entropy_frac": frac(high, m),
        "clip_frac": frac(clipped, m),
    }
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# Prioritized KL on critical tokens
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
    """KL penalty relaxed on "critical" tokens, where the reference is uncertain.

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

    Defaults (the official ``src/rl_train.py``): ``λ_KL = 5``, k2, ``ρ = 150``, ``b = 0``, ``T' = 4`` — tuned for a
    small GPT-2 with a reduced vocabulary: with |V| ≈ 50k, ``c`` is close to 1 almost everywhere and ρ must be re-tuned.
    Divergence: with ``estimator="k2"`` on on-policy samples the gradient is a per-token ``w_t``-weighted
    ∇KL(π_θ ‖ π_ref) (reverse KL); k3 would give the forward-KL gradient, k1 no regularization (tether.kl).
    Stop-gradient: ``w_t`` (a function of the reference only); ``ref_logps``.
    Departures: none in the math.
    """
    k = sample_kl(estimator, "critical_token_kl")
    logps, ref_logps, ref_logits = inert(mask, logps, ref_logps.detach(), ref_logits.detach())
    with torch.no_grad():
        vocab = ref_logits.shape[-1]
        log_p_max = torch.log_softmax(ref_logits.detach().to(logps.dtype) / ref_temperature, -1).amax(-1)
        certainty = (1.0 + log_p_max / math.log(vocab)).clamp(0.0, 1.0)
        weight = (1.0 - intercept) * certainty.pow(rho) + intercept
    per_token = weight * k(logps, ref_logps.detach())
    penalty = aggregate(per_token, mask, loss_agg_mode, max_len)
    loss = kl_coef * penalty
    metrics = {
        "kl_weighted": penalty.detach().item(),
        "kl_unweighted": token_mean(k(logps, ref_logps), mask),
        "weight_mean": token_mean(weight, mask),
    }
    return PolicyLossOutput(loss, metrics)
