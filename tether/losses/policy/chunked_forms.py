"""TROLL and the critical-token KL on chunked statistics: the forms the online recipe trains with.

:func:`tether.losses.policy.troll` and :func:`tether.losses.policy.critical_token_kl` take full ``(B, T, V)`` logits.
The forms here take what ``tether.logprobs.token_stats`` computes chunk by chunk, never a batch's logits, and give
the same values and gradients (``tests/losses/test_chunked_forms.py`` compares them in float64):

* :func:`troll_sparse` — TROLL on the rollout policy's top-K support. The scoring pass stores π_old's K most probable
  ids, their log-probs and the log-mass of everything else (``topk_ids``, ``topk_logps``, ``topk_rest``); the update
  pass computes π_θ's log-probs at those ids and its log-mass off them (``support_logps``, ``support_rest``). That is
  all the projection needs: it works on the support atoms plus one lumped "rest" atom, and inside the rest the
  projected policy keeps π_θ's proportions, so the full-vocabulary regression KL(sg(p̃) ‖ p_θ) equals the KL over the
  atoms (every rest token has the same log-ratio log p̃_rest − log p_θ,rest) and the sampled token's projected
  probability is ``p̃_rest · p_θ(y) / p_θ,rest`` when it lies outside the support.
* :func:`critical_token_kl_from_max` — the critical-token KL from the reference's per-token max log-probability at
  temperature T' (``ref_max_logp``) instead of its logits.
* :func:`ppo_critical_token_kl` — the recipe's objective around it: PPO-clip on the advantages plus that KL term
  (the paper's actor loss is A2C; any policy-gradient term can carry the penalty).

Notation, aggregation and departures shared by every objective: see ``tether.losses.policy``. Padding is inert: every
per-token input is replaced by 0 at masked positions before any arithmetic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tether import kl as _kl
from tether.losses.policy.surrogates import LOG_RATIO_CLAMP, PolicyLossOutput, aggregate, ppo_clip
from tether.losses.policy.token_selective import _project_atoms
from tether.losses.policy.token_selective import _troll_kl as _kl_to

__all__ = ["critical_token_kl_from_max", "ppo_critical_token_kl", "troll_sparse"]

_SAMPLE_KL = {"k1": _kl.k1, "k2": _kl.k2, "k3": _kl.k3}


def _inert(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Each (B, T) or (B, T, K) tensor with 0 at the masked positions (no NaN/inf of padding reaches anything)."""
    m = mask.to(torch.bool)
    return [torch.where(m if x.dim() == m.dim() else m[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
            for x in tensors]


def _metric(x: Tensor, mask: Tensor) -> float:
    return aggregate(x.detach().to(torch.float64), mask, "token-mean").item()


# ----------------------------------------------------------------------------------------------------------
# TROLL on a sparse support
# ----------------------------------------------------------------------------------------------------------


def _lumped_rest(support_logps: Tensor, rest_logp: Tensor, keep: Tensor) -> Tensor:
    """log of the mass off the kept support: the support entries not kept plus everything off the K ids."""
    dropped = torch.where(keep, torch.full_like(support_logps, -math.inf), support_logps)
    return torch.cat([dropped, rest_logp[..., None]], -1).logsumexp(-1)


def troll_sparse(
    logps: Tensor,
    old_logps: Tensor,
    support_logps: Tensor,
    rest_logp: Tensor,
    old_support_logps: Tensor,
    old_rest_logp: Tensor,
    support_ids: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps: float = 0.05,
    alpha: float = 1.0,
    support_mass: float | None = 1.0 - 1e-5,
    iters: int = 60,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """TROLL (Becker et al. 2025, arXiv:2510.03817) from sparse statistics; same loss as :func:`troll`.

    Equation (as :func:`troll`; the projection's structure from the abstract/project page, UNVERIFIED)::

        S      = the smallest prefix of π_old's top-K with mass ≥ support_mass (≥ 1 token)
        atoms  = S ∪ {rest};  log p_θ,rest = log Σ_{v∉S} π_θ(v),  log p_old,rest likewise
        p̃      = argmin_p KL(p ‖ p_θ)  s.t.  KL(p ‖ p_old) ≤ ε          over the atoms
        log p̃(y) = log p̃(y)                               if y ∈ S
                 = log p̃_rest + log π_θ(y) − log p_θ,rest  otherwise (rest keeps π_θ's proportions)
        L_{i,t} = −(p̃(y_{i,t}) / π_old(y_{i,t}))·A_i + α·KL(sg(p̃) ‖ p_θ)(s_{i,t})

    Shapes: ``logps``, ``old_logps`` (B, T) at the sampled tokens ``tokens`` (B, T); ``support_ids`` (B, T, K) π_old's
    top-K ids, most probable first, with ``old_support_logps`` (B, T, K) and ``old_rest_logp`` (B, T) (the log-mass
    off the K ids); ``support_logps`` (B, T, K) and ``rest_logp`` (B, T) the same for π_θ (differentiable);
    ``advantages`` (B,); ``mask`` (B, T). K plays the role of :func:`troll`'s ``max_support``.

    Equal to ``troll(logits, old_logits, tokens, …, max_support=K)`` in value and gradient (the projection's root is
    found by the same bisection, so the two agree to its tolerance). Stop-gradient: π_old, the regression target p̃.
    Defaults: ``eps=0.05``, ``alpha=1.0``, ``support_mass=1−1e-5`` — UNVERIFIED (as :func:`troll`).
    """
    logps, old_logps, support_logps, rest_logp, old_support_logps, old_rest_logp, support_ids, tokens = _inert(
        mask, logps, old_logps.detach(), support_logps, rest_logp, old_support_logps.detach(),
        old_rest_logp.detach(), support_ids, tokens)
    dtype = torch.float64 if support_logps.dtype == torch.float64 else torch.float32
    a_sup, a_tail, b_sup, b_tail = (x.to(dtype) for x in (support_logps, rest_logp, old_support_logps, old_rest_logp))
    with torch.no_grad():
        keep = torch.ones_like(b_sup, dtype=torch.bool)
        if support_mass is not None:
            mass_before = torch.cumsum(b_sup.exp(), -1) - b_sup.exp()
            keep = mass_before < support_mass
        keep[..., 0] = True
        b_rest = _lumped_rest(b_sup, b_tail, keep)
        atom = torch.cat([keep, torch.ones_like(keep[..., :1])], -1)
        b = torch.where(atom, torch.cat([b_sup, b_rest[..., None]], -1), torch.zeros(()).to(b_sup))
    a_rest = _lumped_rest(a_sup, a_tail, keep)
    a = torch.where(atom, torch.cat([a_sup, a_rest[..., None]], -1), torch.zeros(()).to(a_sup))
    logp_atoms, t_star, kl_before = _project_atoms(a, b, atom, eps, iters)

    hit = (support_ids == tokens[..., None]) & keep  # (B, T, K): where the sampled token sits in S
    in_support = hit.any(-1)
    at_token = logp_atoms[..., :-1].gather(-1, hit.to(torch.long).argmax(-1, keepdim=True)).squeeze(-1)
    off_support = logp_atoms[..., -1] + logps.to(dtype) - a_rest
    logp_tilde = torch.where(in_support, at_token, off_support)
    rho = torch.exp((logp_tilde - old_logps.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    target = logp_atoms.detach()
    regression = (target.exp() * (torch.where(atom, target, torch.zeros_like(target)) - a)).sum(-1)
    per_token = -rho * advantages.detach().to(dtype)[:, None] + alpha * regression
    loss = aggregate(per_token, mask, loss_agg_mode, max_len)
    with torch.no_grad():
        kl_after = _kl_to(target, b, atom)
    metrics = {"projected_frac": _metric((t_star > 0).to(dtype), mask), "kl_old_before": _metric(kl_before, mask),
               "kl_old_after": _metric(kl_after, mask), "regression": _metric(regression, mask),
               "support_size": _metric(keep.sum(-1).to(dtype), mask), "sampled_in_support": _metric(
                   in_support.to(dtype), mask)}
    return PolicyLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# Prioritized KL on critical tokens
# ----------------------------------------------------------------------------------------------------------


def critical_token_kl_from_max(
    logps: Tensor,
    ref_logps: Tensor,
    ref_max_logp: Tensor,
    mask: Tensor,
    *,
    vocab_size: int,
    kl_coef: float = 5.0,
    estimator: str = "k2",
    rho: float = 150.0,
    intercept: float = 0.0,
    loss_agg_mode: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """:func:`tether.losses.policy.critical_token_kl` from the reference's max log-probability per token.

    Equation (Vassoyan, Beau, Plaud 2025, "Ignore the KL Penalty! Boosting Exploration on Critical Tokens to Enhance
    RL Fine-Tuning"; code ``jvasso/llm-rl-arithmetic`` ``compute_certainty_coeff``)::

        c_t = 1 + ref_max_logp_t / log|V|          ref_max_logp_t = max_a log π_ref^{(T')}(a|s_t)   (clamped to [0, 1])
        w_t = (1 − b)·c_t^ρ + b
        L   = λ_KL · agg_t [ w_t · k(y_t) ]

    Shapes: ``logps``, ``ref_logps``, ``ref_max_logp``, ``mask`` (B, T) — ``ref_max_logp`` from
    ``tether.logprobs.token_stats(..., stats=("ref_max_logp",), ref_max_temperature=T')``; ``vocab_size`` = |V| of
    the softmax (the LM head's rows). The weight is a constant (stop-gradient), as in the full-logit form, whose
    defaults, divergence and departures apply unchanged.
    """
    if estimator not in _SAMPLE_KL:
        raise ValueError(f"critical_token_kl: unknown KL estimator {estimator!r}; choose one of {sorted(_SAMPLE_KL)}")
    k = _SAMPLE_KL[estimator]
    logps, ref_logps, ref_max_logp = _inert(mask, logps, ref_logps.detach(), ref_max_logp.detach())
    with torch.no_grad():
        certainty = (1.0 + ref_max_logp.to(logps.dtype) / math.log(vocab_size)).clamp(0.0, 1.0)
        weight = (1.0 - intercept) * certainty.pow(rho) + intercept
    per_token = weight * k(logps, ref_logps)
    penalty = aggregate(per_token, mask, loss_agg_mode, max_len)
    metrics = {"kl_weighted": penalty.detach().item(), "kl_unweighted": _metric(k(logps, ref_logps), mask),
               "weight_mean": _metric(weight, mask)}
    return PolicyLossOutput(kl_coef * penalty, metrics)


def ppo_critical_token_kl(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor,
    ref_max_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    vocab_size: int,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = 3.0,
    beta: float = 5.0,
    estimator: str = "k2",
    rho: float = 150.0,
    intercept: float = 0.0,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> PolicyLossOutput:
    """PPO-clip plus the critical-token KL: the online recipe's ``--loss critical_token_kl``.

    Equation::

        L = agg( L^clip_{i,t}(A_i; ε) ) + β · agg( w_t · k(y_{i,t}) )     (w_t: :func:`critical_token_kl_from_max`)

    Shapes as :func:`tether.losses.policy.ppo_clip` and :func:`critical_token_kl_from_max`.
    Defaults: the KL part's are the official code's (``src/rl_train.py``: β = λ_KL = 5, k2, ρ = 150, b = 0;
    T' = 4 is set where ``ref_max_logp`` is computed), tuned for a GPT-2 with a reduced vocabulary — with |V| ≈ 50k
    re-tune ρ (the weight is near 0 unless the reference's max probability is near 1).
    Departure: the paper's actor is A2C with a value head; here the penalty rides on PPO-clip with group advantages
    (the recipe's GRPO estimator by default). With ``estimator="k2"`` and on-policy samples, the KL gradient is a
    w_t-weighted ∇KL(π_θ ‖ π_ref) per token; off-policy mini-batches add no importance weight (as the official code).
    """
    pg = ppo_clip(logps, old_logps, advantages, mask, clip_eps=clip_eps, dual_clip=dual_clip, agg=agg,
                  max_len=max_len)
    kl = critical_token_kl_from_max(logps, ref_logps, ref_max_logp, mask, vocab_size=vocab_size, kl_coef=beta,
                                    estimator=estimator, rho=rho, intercept=intercept, loss_agg_mode=agg,
                                    max_len=max_len)
    return PolicyLossOutput(pg.loss + kl.loss, {**pg.metrics, "pg_loss": pg.loss.item(), **kl.metrics})
