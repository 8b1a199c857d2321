"""Advantage estimators for group-sampled online RL, as pure functions of reward tensors.

Notation: a batch holds ``N`` prompts with ``G`` completions each (a *group*); ``R_{n,i}`` is the scalar outcome reward
of completion ``i`` of prompt ``n``; ``mean_G``/``std_G`` are taken over the group. ``B = N·G`` rows of a flat batch are
ordered prompt-major: rows ``n·G … n·G + G − 1`` belong to prompt ``n`` (the order in which ``G`` samples per prompt
come out of a sampler).

Calling convention shared by the group estimators:

* ``rewards`` is ``Shape: (N, G)``, or flat ``Shape: (N·G,)`` together with ``group_size=G``;
* the result has the same shape as ``rewards`` (a flat input gives a flat result), one advantage per completion,
  to be broadcast over that completion's tokens by the policy loss;
* nothing here carries gradient on purpose: rewards are data. Compute advantages once per batch, before the
  (possibly several) policy updates, and pass them as constants.

Token-level estimators (REINFORCE++, KL-in-reward returns) take ``(B, T)`` per-token rewards and a ``(B, T)``
response mask and return ``(B, T)``.

Group-statistics conventions (checked against verl ``core_algos.py``): the std is the UNBIASED (n−1) sample std
(``torch.std``); a group of size 1 is given mean 0 and std 1 (so its advantage is its raw reward) — verl's
fallback, kept for compatibility; use ``G ≥ 2``. A group whose rewards are all equal gets advantage exactly 0
(``torch.mean`` rounding would otherwise leave ~1e-8 residuals, which GRPO's 1/(std + 1e-6) turns into ~0.06).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "astar_po_targets",
    "astar_po_values",
    "dapo_dynamic_sampling_mask",
    "drgrpo_advantages",
    "gpg_advantages",
    "grpo_advantages",
    "gvpo_weights",
    "outcome_to_token_rewards",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_returns",
    "whiten",
]


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _as_groups(rewards: Tensor, group_size: int | None, fn: str) -> tuple[Tensor, bool]:
    """``(N, G)`` view of the rewards and whether the caller passed them flat."""
    if rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(
                f"{fn}: rewards have shape {tuple(rewards.shape)} = (N, G) with G = {rewards.shape[1]}, but "
                f"group_size={group_size}; drop group_size for (N, G) input or pass matching values."
            )
        if rewards.shape[1] < 1:
            raise ValueError(f"{fn}: rewards of shape {tuple(rewards.shape)} have empty groups (G = 0).")
        return rewards, False
    if rewards.dim() == 1:
        if group_size is None:
            raise ValueError(
                f"{fn}: flat rewards of shape {tuple(rewards.shape)} need group_size=G (completions per prompt), "
                "or pass them as an (N, G) tensor."
            )
        if group_size < 1 or rewards.numel() % group_size != 0:
            raise ValueError(
                f"{fn}: {rewards.numel()} flat rewards cannot be split into groups of group_size={group_size}; "
                "every prompt must have exactly G completions, ordered prompt-major."
            )
        return rewards.reshape(-1, group_size), True
    raise ValueError(f"{fn}: rewards must be (N, G) or flat (N·G,), got shape {tuple(rewards.shape)}.")


def _restore(grouped: Tensor, flat: bool) -> Tensor:
    return grouped.reshape(-1) if flat else grouped


def _nonconstant_groups(grouped: Tensor) -> Tensor:
    """``(N,)`` bool: True where the group's rewards are not all equal (exact test, no std threshold)."""
    return (grouped != grouped[:, :1]).any(dim=1)


def _centre(grouped: Tensor) -> Tensor:
    """``R − mean_G R``, exactly 0 for all-equal groups.

    ``torch.mean`` of G equal fp32 values is not always that value (0.7 × 7 is off by 6e-8); GRPO's 1/(std + 1e-6)
    would blow that residual up to ≈ 0.06. A group with no reward difference carries no signal, so it gets 0.
    """
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return torch.where(_nonconstant_groups(grouped)[:, None], centred, 0.0)


def _check_token_inputs(token_rewards: Tensor, mask: Tensor, fn: str) -> None:
    if token_rewards.dim() != 2 or token_rewards.shape != mask.shape:
        raise ValueError(
            f"{fn}: token rewards {tuple(token_rewards.shape)} and mask {tuple(mask.shape)} must both be (B, T); "
            "place outcome rewards on tokens with outcome_to_token_rewards(rewards, mask) first."
        )


# ----------------------------------------------------------------------------------------------------------
# group-relative outcome advantages
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def grpo_advantages(rewards: Tensor, *, group_size: int | None = None, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """GRPO outcome advantage: group-centred, divided by the group's unbiased std.

    Equation::

        Â_i = (R_i − mean_G R) / (std_G R + ε)        (scale=True)
        Â_i =  R_i − mean_G R                          (scale=False: Dr. GRPO, see drgrpo_advantages)

    Paper: Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, §4.1.2 (outcome supervision). Implementation: verl
    ``compute_grpo_outcome_advantage`` (``epsilon=1e-6``, ``torch.std`` = unbiased, ``norm_adv_by_std_in_grpo``).

    Shape: ``rewards`` (N, G), or (N·G,) with ``group_size=G``; output the same shape.

    Args:
        eps: added to the std, not the variance (verl). All-equal groups get Â = 0 exactly.
        scale: divide by the std (GRPO). False gives Dr. GRPO's unscaled advantage.

    Example: R = [1, 0, 0, 0] → mean 0.25, unbiased std 0.5 → Â = [1.5, −0.5, −0.5, −0.5] (the population std
    0.433 would give [1.732, −0.577, …]).
    Departures: all-equal groups give exactly 0 (verl's ``torch.mean`` can leave a rounding residual that the
    1/(std + ε) scaling inflates to ~0.06 in fp32). A group of one completion gets mean 0 and std 1 (verl's
    fallback), so its advantage is its raw reward — there is no baseline; use G ≥ 2.
    """
    grouped, flat = _as_groups(rewards, group_size, "grpo_advantages")
    if grouped.shape[1] == 1:  # verl: mean 0, std 1
        return _restore(grouped / (1.0 + eps) if scale else grouped.clone(), flat)
    adv = _centre(grouped)
    if scale:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    return _restore(adv, flat)


@torch.no_grad()
def drgrpo_advantages(rewards: Tensor, *, group_size: int | None = None) -> Tensor:
    """Dr. GRPO outcome advantage: group-centred rewards, no std division.

    Equation::

        Â_i = R_i − mean_G R

    Paper: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO), arXiv:2503.20783,
    §3.1;
    code: understand-r1-zero ``compute_monte_carlo_advantages`` with ``critic_type=drgrpo``. Pair it with the
    ``seq-mean-token-sum-norm`` aggregation (constant ``max_len``) in ``tether.losses.policy``.

    Shape: ``rewards`` (N, G), or (N·G,) with ``group_size=G``; output the same shape.
    Example: R = [1, 0, 0, 0] → Â = [0.75, −0.25, −0.25, −0.25].
    Departures: none. G = 1 gives the raw reward (mean 0), as ``grpo_advantages``.
    """
    grouped, flat = _as_groups(rewards, group_size, "drgrpo_advantages")
    if grouped.shape[1] == 1:  # verl: mean 0
        return _restore(grouped.clone(), flat)
    return _restore(_centre(grouped), flat)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, *, group_size: int | None = None) -> Tensor:
    """RLOO: each completion's baseline is the mean reward of the OTHER G − 1 completions of its prompt.

    Equation::

        Â_i = R_i − (1/(G−1)) Σ_{j≠i} R_j  =  (G/(G−1))·(R_i − mean_G R)

    Paper: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", arXiv:2402.14740 (RLOO, after Kool et al. 2019). Code: verl ``compute_rloo_outcome_advantage``.

    Shape: ``rewards`` (N, G), or (N·G,) with ``group_size=G``; output the same shape.
    Example: R = [1, 0, 0, 0] → Â = [1, −1/3, −1/3, −1/3]; each group's advantages sum to 0.
    Departures: G = 1 has no leave-one-out baseline; like verl we return the raw reward. The baseline is
    independent of sample i, so the policy gradient stays unbiased. In the original paper R_i is the sequence
    reward minus β·Σ_t k1 (KL in the reward) — build that with ``tether.losses.policy.kl_in_reward`` and sum.
    """
    grouped, flat = _as_groups(rewards, group_size, "rloo_advantages")
    g = grouped.shape[1]
    if g == 1:
        return _restore(grouped.clone(), flat)
    return _restore(_centre(grouped) * (g / (g - 1)), flat)


@torch.no_grad()
def gpg_advantages(rewards: Tensor, *, group_size: int | None = None, scale: bool = False, eps: float = 1e-4) -> Tensor:
    """GPG advantage: group-centred reward, rescaled by the inverse fraction of groups that carry signal.

    Equation (α as in the paper's advantage; its code divides the loss by 1/α instead)::

        Â_i = α·(R_i − mean_G R) / F_norm,   F_norm = 1 (scale=False) or std_G R + ε (scale=True)
        α   = N / N_valid = B / (B − M)

    where a group is *valid* when its rewards are not all equal (std > 0), ``N_valid`` counts valid groups in the
    batch and ``M`` the samples in invalid groups. Zero-variance groups have Â = 0, so they dilute a token-mean
    loss; α undoes that dilution.

    Paper: Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
    arXiv:2504.02546 (AMAP-ML/GPG). Code: ``gpg_trainer.py`` divides the loss by ``inverse_alpha = n_valid_groups /
    n_groups`` (identical for equal group sizes); ``--scale_rewards False`` is the recipe default (F_norm = 1).

    Shape: ``rewards`` (N, G), or (N·G,) with ``group_size=G``; output the same shape. α is computed over the
    rewards passed in: pass exactly the groups of one gradient step (the official trainer uses the local batch).

    Args:
        scale: divide by the unbiased group std + ``eps`` (TRL-style ``1e-4``).
        eps: see ``scale``.

    Example (worked by hand): groups [1, 0, 0, 0] and [0, 0, 0, 0] → α = 8/(8 − 4) = 2 →
    Â = [1.5, −0.5, −0.5, −0.5, 0, 0, 0, 0].
    Departures: verl's port computes α = B / #(samples with non-zero reward) (= 8 in the example) — not the
    paper's α; we follow the paper and the official code. With no valid group every advantage is 0 (α is moot).
    The resampling loop that tops batches up to ``β_th`` valid groups belongs to the sampler, not here.
    """
    grouped, flat = _as_groups(rewards, group_size, "gpg_advantages")
    if grouped.shape[1] == 1:
        return _restore(torch.zeros_like(grouped), flat)
    n_valid = int(_nonconstant_groups(grouped).sum())
    alpha = grouped.shape[0] / n_valid if n_valid > 0 else 1.0
    adv = _centre(grouped)
    if scale:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    return _restore(alpha * adv, flat)


@torch.no_grad()
def dapo_dynamic_sampling_mask(rewards: Tensor, *, group_size: int | None = None) -> Tensor:
    """DAPO dynamic sampling: which prompt groups to keep — those whose rewards are not all equal.

    Rule: keep a group iff ``std_G(R) > 0``, i.e. not all correct and not all wrong. Such groups carry
    zero group-relative advantage and only waste batch slots. The refill loop (generate more prompts until the
    batch holds ``train_batch_size`` valid groups, at most ``max_num_gen_batches`` rounds) belongs to the sampler.

    Paper: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476, §3.2
    (Eq. 11's constraint ``0 < |{o_i correct}| < G``). Code: verl ``filter_groups`` in the DAPO recipe.

    Shape: ``rewards`` (N, G), or (N·G,) with ``group_size=G``; output ``(N,)`` bool, True = keep.
    Departures: equality is tested exactly (no std threshold), so a group like [1, 1, 1, 1] is always dropped
    and any difference, however small, keeps the group. Filter on whatever metric the recipe names (accuracy or
    the full reward) by passing that tensor.
    """
    grouped, _ = _as_groups(rewards, group_size, "dapo_dynamic_sampling_mask")
    return _nonconstant_groups(grouped)


# ----------------------------------------------------------------------------------------------------------
# A*-PO and GVPO: closed forms used as regression targets / gradient weights
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def astar_po_values(ref_rewards: Tensor, *, group_size: int | None = None, beta: float = 0.5) -> Tensor:
    """A*-PO stage 1: the optimal KL-regularized value V*(x), estimated from reference samples.

    Equation::

        V*(x) = β₁·log( (1/M) Σ_j exp(r_j/β₁) )       r_1..r_M: rewards of M samples from π_ref(·|x)

    This is the soft maximum ``β·log E_{π_ref}[exp(r/β)]``, the value of the optimum π* ∝ π_ref·exp(r/β); it lies in
    [mean r, max r], tends to max r as β → 0 and to mean r as β → ∞. Computed with ``logsumexp`` (no overflow).

    Paper: Brantley et al. 2025, "Accelerating RL for LLM Reasoning with Optimal Advantage Regression" (A*-PO),
    arXiv:2505.20686.
    Code: ZhaolinGao/A-PO ``rl_dataset.py`` (β₁ = 0.5, M = 8).

    Shape: ``ref_rewards`` (N, M), or (N·M,) with ``group_size=M``; output ``(N,)``.

    Args:
        beta: β₁ > 0; ``0`` returns the max (the β → 0 limit), ``math.inf`` the mean (the β → ∞ limit).

    Example: r = [1, 0, 0, 0, 0, 0, 0, 0], β₁ = 0.5 → V* = 0.5·log((e² + 7)/8) ≈ 0.29351.
    Departures: the official code returns the MEAN for β₁ = 0 (that is the β → ∞ limit) and 0 for β₁ < 0; we
    return the correct limit for 0 and reject negative β.
    """
    grouped, _ = _as_groups(ref_rewards, group_size, "astar_po_values")
    if beta < 0 or math.isnan(beta):
        raise ValueError(f"astar_po_values: beta must be ≥ 0 (0 = max, inf = mean), got {beta}.")
    if beta == 0:
        return grouped.max(dim=1).values
    if math.isinf(beta):
        return grouped.mean(dim=1)
    m = grouped.shape[1]
    return beta * (torch.logsumexp(grouped / beta, dim=1) - math.log(m))


@torch.no_grad()
def astar_po_targets(rewards: Tensor, values: Tensor) -> Tensor:
    """A*-PO stage 2 regression target: the optimal advantage ``R − V*(x)`` of one on-policy sample per prompt.

    Equation (A*-PO, Brantley et al. 2025, arXiv:2505.20686, stage 2)::

        L = mean_i ( β₂·Σ_t (log π_θ − log π_ref)(y_{i,t}) − (R_i − V*(x_i)) )²

    The loss is zero iff the sequence log-ratio equals ``(R − V*)/β₂``, i.e. π_θ is the KL-regularized optimum
    (with β₂ in place of β₁). This function returns the target ``R_i − V*(x_i)``.

    Shape: ``rewards`` (N,) (one sample per prompt) or (N, K); ``values`` (N,) from :func:`astar_po_values`;
    output the shape of ``rewards``.
    Departures: none (β₂ = 1e-3 in the official MATH script).
    """
    if values.dim() != 1 or values.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"astar_po_targets: values must be (N,) with N = {rewards.shape[0]} prompts, got {tuple(values.shape)}."
        )
    return rewards - values.view(-1, *([1] * (rewards.dim() - 1)))


@torch.no_grad()
def gvpo_weights(
    rewards: Tensor, seq_log_ratios: Tensor, *, group_size: int | None = None, beta: float = 0.1
) -> Tensor:
    """GVPO's gradient in closed form: per-sequence weights w with ∇L_GVPO = −Σ_i w_i ∇log π_θ(y_i|x).

    GVPO loss (:func:`tether.losses.policy.gvpo`), per group of G, with ``u_i = β·Σ_t (log π_θ − log π_old)(y_{i,t})``::

        L = (1/(G−1)) Σ_i ½ [ (u_i − ū) − (R_i − R̄) ]²

    Differentiating (the centred terms sum to zero, so ∂/∂u_k of the group mean cancels)::

        ∂L/∂u_k = (1/(G−1))·[(u_k − ū) − (R_k − R̄)]
        ∇L      = −Σ_k w_k ∇log π_θ(y_k|x),    w_k = (β/(G−1))·[(R_k − R̄) − β·(ℓ_k − ℓ̄)],   ℓ_k = u_k/β

    So ``−(w.detach() * seq_logps).sum()`` has exactly GVPO's gradient (summed over groups): a policy gradient whose
    "advantage" is the group-centred reward minus the group-centred implicit reward β·ℓ. At θ = θ_old (ℓ = 0) the
    weights are ``β/(G−1)·(R − R̄)``, a Dr. GRPO-like sequence-level gradient scaled by β/(G−1).

    Paper: Zhang et al. 2025, "GVPO: Group Variance Policy Optimization for LLM Post-Training", arXiv:2504.19599; code:
    jszkc/GVPO README (``gvpo_beta = 0.1``).

    Shape: ``rewards`` and ``seq_log_ratios`` (N, G), or (N·G,) with ``group_size=G``; output the same shape.
    ``seq_log_ratios`` is the CURRENT sequence log-ratio ``Σ_t (log π_θ − log π_old)`` over response tokens (its
    value is used; it is treated as a constant).

    Departures: none; the loss itself is the sum over groups (as the official code), not a mean.
    """
    grouped_r, flat = _as_groups(rewards, group_size, "gvpo_weights")
    grouped_l, _ = _as_groups(seq_log_ratios, group_size, "gvpo_weights")
    if grouped_l.shape != grouped_r.shape:
        raise ValueError(
            f"gvpo_weights: rewards {tuple(rewards.shape)} and seq_log_ratios {tuple(seq_log_ratios.shape)} "
            "must have the same shape."
        )
    g = grouped_r.shape[1]
    if g < 2:
        raise ValueError("gvpo_weights: GVPO needs at least 2 completions per prompt (G ≥ 2); got G = 1.")
    centred_r = _centre(grouped_r)
    centred_l = _centre(grouped_l)
    return _restore(beta / (g - 1) * (centred_r - beta * centred_l), flat)


# ----------------------------------------------------------------------------------------------------------
# token-level rewards: placement, returns-to-go, whitening, REINFORCE++
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def outcome_to_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Place each sequence's outcome reward on its LAST valid response token; zeros elsewhere.

    Shape: ``rewards`` (B,), ``mask`` (B, T) (bool or 0/1); output (B, T) in the rewards' dtype.
    Raises if a row with a non-zero reward has no valid token (its reward would be lost); rows with an empty
    mask and zero reward give an all-zero row.
    """
    if rewards.dim() != 1 or mask.dim() != 2 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(
            f"outcome_to_token_rewards: rewards must be (B,) and mask (B, T) with the same B; got "
            f"{tuple(rewards.shape)} and {tuple(mask.shape)}."
        )
    valid = mask.bool()
    has_token = valid.any(dim=1)
    lost = (~has_token) & (rewards != 0)
    if lost.any():
        rows = lost.nonzero().flatten().tolist()
        raise ValueError(
            f"outcome_to_token_rewards: rows {rows} have a non-zero reward but no valid response token, so the "
            "reward cannot be placed; drop these rows or fix their response mask."
        )
    t = mask.shape[1]
    positions = torch.arange(t, device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    out[torch.arange(mask.shape[0], device=mask.device), last] = torch.where(has_token, rewards, 0.0)
    return out


@torch.no_grad()
def token_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Returns-to-go over response tokens: ``G_t = r_t + γ·G_{t'}`` with t' the next VALID token after t.

    Equation::

        G_{i,t} = Σ_{t' ≥ t, m_{i,t'} = 1} γ^{n(t, t')} r_{i,t'},    n(t, t') = #valid tokens in (t, t']

    Needed when a KL penalty sits in the reward (per token): with returns-to-go, the REINFORCE gradient of
    ``−β·Σ_t k1_t`` is the exact gradient of the SEQUENCE-level reverse KL, ``E[Σ_t ∇log π(y_t|s_t)·Σ_{t'≥t} k1_{t'}]``
    (score-function identity: k1 of a token before t does not depend on y_t, so only the return from t on multiplies
    ∇log π(y_t|s_t); Schulman 2020, "Approximating KL Divergence", for k1).

    Shape: ``token_rewards`` (B, T), ``mask`` (B, T); output (B, T), zero at masked positions.
    Departures: masked positions inside a response (e.g. tool output in multi-turn) are skipped: they add no
    reward, no discount, and future rewards pass through them. verl's REINFORCE++ instead resets the running
    return at every masked position; the two agree for right-padded masks (the usual case).
    """
    _check_token_inputs(token_rewards, mask, "token_returns")
    valid = mask.bool()
    out = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        running = torch.where(valid[:, t], token_rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(valid[:, t], running, 0.0)
    return out


@torch.no_grad()
def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Batch-global whitening over valid tokens: ``(x − μ)/sqrt(σ² + eps)``, zero at masked positions.

    μ and σ² are the mean and UNBIASED (n−1) variance over all valid tokens of the batch, as verl's
    ``masked_whiten`` (``masked_var(unbiased=True)``). Shape: (B, T) in, (B, T) out.
    """
    _check_token_inputs(values, mask, "whiten")
    valid = mask.bool()
    n = int(valid.sum())
    if n < 2:
        raise ValueError(
            f"whiten: batch-global whitening needs at least 2 valid tokens, got {n}; "
            "use a larger (mini-)batch or a group-relative estimator."
        )
    x = torch.where(valid, values, 0.0)
    mean = x.sum() / n
    var = torch.where(valid, (values - mean) ** 2, 0.0).sum() / (n - 1)
    return torch.where(valid, (values - mean) * torch.rsqrt(var + eps), 0.0)


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    baseline: bool = False,
    group_size: int | None = None,
    gamma: float = 1.0,
) -> Tensor:
    """REINFORCE++ token advantages: returns-to-go, whitened over all valid tokens of the batch.

    Equation (Hu 2025, REINFORCE++, arXiv:2501.03262; as verl implements it)::

        r_{i,t} = −β·k1_{i,t} (+ R_i at the last valid token)         # build with kl_in_reward
        G_{i,t} = Σ_{t'≥t} γ^{t'−t} r_{i,t'}                            # token_returns
        Â_{i,t} = (G_{i,t} − μ) / sqrt(σ² + 1e-8)                      # μ, σ² over ALL valid tokens of the batch

    REINFORCE++-baseline (``baseline=True``)::

        S_i = Σ_t r_{i,t};   Â_{i,t} = whiten( S_i − mean_G S )        # group mean subtracted, then global whitening

    Paper: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models". Code: verl
    ``compute_reinforce_plus_plus_outcome_advantage`` / ``..._baseline_outcome_advantage`` + ``masked_whiten``;
    OpenRLHF ``compute_reward`` (k1 in reward, ``init_kl_coef 0.01``).

    Shape: ``rewards`` (B, T) per-token rewards, or (B,) outcome rewards (placed on the last valid token);
    ``mask`` (B, T); output (B, T), zero at masked positions. For ``baseline=True`` rows are grouped prompt-major
    with ``group_size=G`` (B = N·G).

    Args:
        baseline: the -baseline variant (needs ``group_size``). It sums the token rewards into one sequence score
            (γ is not used), as verl.
        gamma: discount for the returns-to-go (γ = 1 in every reference recipe).

    Departures: the variance is the unbiased (n−1) one, as verl's ``masked_whiten``; the whitening statistics are
    over the tensors passed in (gather across data-parallel ranks before calling if you want verl's global batch).
    """
    if rewards.dim() == 1:
        rewards = outcome_to_token_rewards(rewards, mask)
    _check_token_inputs(rewards, mask, "reinforce_pp_advantages")
    valid = mask.bool()
    if not baseline:
        return whiten(token_returns(rewards, mask, gamma), mask)
    if group_size is None:
        raise ValueError(
            "reinforce_pp_advantages(baseline=True) needs group_size=G to subtract each prompt's mean score; "
            "rows must be ordered prompt-major."
        )
    scores = torch.where(valid, rewards, 0.0).sum(dim=1)
    grouped, _ = _as_groups(scores, group_size, "reinforce_pp_advantages")
    centred = (grouped.clone() if group_size == 1 else _centre(grouped)).reshape(-1)  # G = 1: mean 0 (verl)
    return whiten(centred[:, None].expand_as(rewards), mask)
