"""MiniLLM: the sequence-level reverse KL by policy gradient (Gu et al. 2024), as pure functions of tensors.

Notation: student ``q_θ``, teacher ``p``; a batch of ``B`` responses padded to ``T`` positions; at response position t
the state is ``s_t = (x, y_<t)`` and ``y_t`` the token there. Per-position inputs are ``(B, T)``, full-vocabulary
logits ``(B, T, V)``; ``mask`` ``(B, T)`` (bool or 0/1) marks response tokens. Padding is inert: every per-position
input is replaced by 0 at masked positions before any arithmetic, so masked entries may hold anything and receive
exactly zero gradient. Pass fp32 (or float64) inputs; log-softmaxes are taken in the input dtype. The tests compare an
fp32 run with a float64 twin at ``atol 1e-5`` and prove the MiniLLM estimator by exact enumeration in float64.

What each objective's gradient follows:

==================  ==========================================================================================
objective           gradient
==================  ==========================================================================================
``minillm``         the SEQUENCE-level reverse KL(q_θ ‖ p) — exactly, in expectation, at the paper's settings
                    (γ = 1, return from t+1, no length normalization, no whitening, no clipping, exact weights);
                    the official settings follow a length-normalized, discounted, whitened surrogate of it
==================  ==========================================================================================

Sources read (public snapshots) and what was confirmed:

* MiniLLM — Gu, Dong, Wei, Huang 2024, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
  arXiv:2306.08543. Official code microsoft/LMOps @ 4f2a9de: ``minillm/minillm/losses.py`` (``_get_advantages_and_
  returns``, ``_pg_loss``, ``_reg_loss``), ``sampler.py`` (rewards, mixed log-probs, ``w``), ``reward.py``,
  ``utils.py`` (``whiten``, ``get_x_entropy``, ``get_entropy``), ``arguments.py``,
  ``scripts/gpt2/minillm/train_base_xl.sh``. The paper's §2.2 equations (Eqs. 2–6: the gradient, the single-step
  decomposition, p̃, the importance weights and their per-token approximation, length normalization) were read in a
  public reproduction of the paper's text (a translated copy; the arXiv page itself was not readable here).

Where the official code departs from the paper, and what tether follows (each item is at the function named):

==  ===============================================  ===============================  ================================
#   paper (§2.2–2.3)                                  official code                    tether
==  ===============================================  ===============================  ================================
1   sampling from p̃ = α·p + (1 − α)·q (Eq. 4)       the same, inside a patched       the same (``tether.sampling.
                                                      ``generate`` (authors' fork      mixing.TeacherMixture``); top-k/
                                                      t1101675/transformers@minillm;   top-p truncate the mixture, not
                                                      processors on both models)       each model (unused by MiniLLM)
2   prefix-product weights W_t (Eq. 5), then the     per-token w_t = q_old/p̃         per-token w_t (default) or
    per-token approximation w_t                       (``sampler.py``)                 cumulative W_t (option);
                                                                                       :func:`minillm_importance_weights`
3   w weights both terms of the gradient             w only in the PPO ratio ρ·w;     as the official code;
                                                      the single-step KL unweighted    ``weight_single_step`` option
4   long-term return R_{t+1}, undiscounted (Eq. 3)   return from t (r_t included),    official defaults;
                                                      γ = 0.95                         :func:`minillm_advantages`
5   length normalization 1/(T − t − 1) (Eq. 6)       always on, divides by #tokens    the official form (#terms)
                                                      from t; ``--length-norm`` only
                                                      changes logging
6   —                                                 advantages whitened              whitened over valid tokens
7   PPO clipping (§2.3)                               clip the PRODUCT ρ·w at 0.2;     the same; the recipe's
                                                      ``--ppo-epochs 4`` over a        ``ppo_epochs`` updates over the
                                                      rollout store                    step's responses
8   r_t = log p − log q                               /0.5 (reward_scaling), clip      options of
                                                      ±100                             :func:`minillm_rewards` (off)
9   —                                                 a second, pure-student sample    not drawn (the recipe logs
                                                      when α > 0, only for logging     the mixed samples' lengths)
                                                      (rev_kl, student lengths)
==  ===============================================  ===============================  ================================

At the paper's settings with the exact weights (row 2's W_t, per-decision ratios in the return, the single-step
term weighted) the estimator is unbiased for ∇KL(q_θ ‖ p) over sequences for any α (enumeration oracle, float64,
also with P̃ taken from the sampler's processor); rows 2 and 4 of the official code bias it, by the amounts the
tests measure (``tests/losses/test_distill_objectives.py``).

Left out:

* The MiniLLM pre-training term ``L_PT = (1 − kd_ratio)·NLL + kd_ratio·KL(p ‖ q)`` on a separate corpus: it is plain
  forward-KL KD plus NLL, which the distillation recipe already has (``tether.losses.distill`` divergences).
* "Rethinking LLM Distillation: A Constrained MDP Perspective" (Zimmer, Ji, Nguyen, Bou Ammar 2025,
  arXiv:2509.22921): only the abstract and the public reviews could be read (a Sauté-RL-style modified reward without
  state augmentation, an "Eq. 5" with a policy-dependent discrepancy term Φ and a KL budget); neither the paper's
  equations nor any code were accessible, so the modified reward cannot be written down faithfully. Not implemented.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tether import kl
from tether.losses.distill._common import DistillLossOutput, _check, _inert, _mean
from tether.losses.policy import LOG_RATIO_CLAMP, aggregate, ppo_clip_per_token
from tether.losses.policy.advantages import whiten as _whiten

__all__ = [
    "minillm",
    "minillm_advantages",
    "minillm_importance_weights",
    "minillm_long_term",
    "minillm_mixture_logprobs",
    "minillm_rewards",
    "minillm_single_step",
]


def minillm_mixture_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float) -> Tensor:
    """Teacher-mixed sampling distribution ``log p̃ = log(α·p + (1 − α)·q)``, elementwise.

    Equation (MiniLLM, arXiv:2306.08543, §2.2 Eq. 4; ``sampler.py``: ``mix_probs``)::

        p̃(y_t | s_t) = α·p(y_t | s_t) + (1 − α)·q_θ(y_t | s_t)

    Use it on full-vocabulary log-probs ``(B, V)`` to SAMPLE the next token (``Categorical(logits=...)``), or on
    the log-probs of the sampled tokens ``(B, T)`` for the importance weights (:func:`minillm_importance_weights`).
    Computed with ``logaddexp`` (no underflow). α = 0 returns the student's, α = 1 the teacher's log-probs.
    Official default α = 0.2 (``--teacher-mixed-alpha 0.2`` in every MiniLLM script). Departures: none.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"minillm_mixture_logprobs: alpha is the teacher's share in [0, 1], got {alpha}.")
    if alpha == 0.0:
        return student_logprobs
    if alpha == 1.0:
        return teacher_logprobs
    return torch.logaddexp(teacher_logprobs + math.log(alpha), student_logprobs + math.log1p(-alpha))


@torch.no_grad()
def minillm_importance_weights(
    old_logps: Tensor, teacher_logps: Tensor, mask: Tensor, *, alpha: float, cumulative: bool = False
) -> Tensor:
    """Importance weights of teacher-mixed sampling: tokens drawn from p̃, the objective's expectation is under q.

    Equation (MiniLLM §2.2, Eq. 5 and the sentence after it)::

        w_t = q(y_t|s_t) / p̃(y_t|s_t)                        (cumulative=False: the paper's approximation, the code's)
        W_t = Π_{t' ≤ t} q(y_t'|s_t') / p̃(y_t'|s_t')          (cumulative=True: Eq. 5 as written)

    ``q`` is the student AT ROLLOUT TIME (``old_logps``; ``sampler.py`` computes ``w`` once from the rollout model
    and keeps it for all PPO epochs). ``w_t ≤ 1/(1 − α)``; the prefix product ``W_t`` has a variance that grows with
    t, which is why the paper replaces it by ``w_t`` — a BIASED estimator when α > 0 (proved by enumeration in
    ``test_minillm_per_token_weights_are_biased``). ``W_t`` alone is not exact either for the long-term term (the
    tokens after t also come from p̃); pass the per-token ``w`` as ``future_weights`` of :func:`minillm_advantages`
    as well for an exact estimator (``test_minillm_eq5_prefix_weights_alone_are_biased``).

    Shape: ``old_logps``, ``teacher_logps``, ``mask`` (B, T) — log-probs of the sampled tokens; output (B, T),
    zero at masked positions (masked positions add no factor to the prefix product). No gradient.

    Example: q = 0.2, p = 0.8, α = 0.2 → p̃ = 0.16 + 0.16 = 0.32, w = 0.625; α = 0 → w = 1.
    Departures: none for ``cumulative=False``.
    """
    _check("minillm_importance_weights", mask, old_logps=old_logps, teacher_logps=teacher_logps)
    old_logps, teacher_logps = _inert(mask, old_logps), _inert(mask, teacher_logps)
    log_w = _inert(mask, old_logps - minillm_mixture_logprobs(old_logps, teacher_logps, alpha))
    if cumulative:
        log_w = log_w.cumsum(dim=-1)
    return _inert(mask, log_w.exp())


@torch.no_grad()
def minillm_rewards(
    teacher_logps: Tensor,
    old_logps: Tensor,
    mask: Tensor,
    *,
    reward_scaling: float | None = None,
    reward_clip: float | None = None,
) -> Tensor:
    """Per-token reward ``r_t = log p(y_t|s_t) − log q_old(y_t|s_t)``, optionally scaled and clipped.

    Equation (MiniLLM §2.2, Eq. 2's ``r_t``; code ``sampler.py``: ``rewards = t_rewards + ent_rewards``)::

        r_t = clip( (log p(y_t|s_t) − log q_old(y_t|s_t)) / reward_scaling, −reward_clip, reward_clip )

    ``q_old`` is the STUDENT at rollout time (not the mixture p̃), detached. ``−Σ_t r_t`` is a sample of the
    sequence-level KL(q ‖ p) when y ~ q.

    Shape: (B, T) log-probs of the sampled tokens; output (B, T), zero at masked positions. No gradient.

    Args:
        reward_scaling: divide by this (None: no scaling, the paper). The official gpt2/llama scripts pass 0.5;
            the argument's default is None.
        reward_clip: clip to ±this (None: no clip, the paper). The scripts pass ``--cliprange-reward 100``; the
            argument's default is 1.

    Example: q = p ⇒ r ≡ 0. Departures: the official reward takes the teacher's log-softmax from mean-centred
    logits (``reward.py``), which is the same number.
    """
    _check("minillm_rewards", mask, teacher_logps=teacher_logps, old_logps=old_logps)
    r = _inert(mask, teacher_logps) - _inert(mask, old_logps)
    if reward_scaling is not None:
        if not reward_scaling > 0:
            raise ValueError(
                f"minillm_rewards: reward_scaling must be > 0 (official 0.5) or None, got {reward_scaling}."
            )
        r = r / reward_scaling
    if reward_clip is not None:
        if not reward_clip > 0:
            raise ValueError(f"minillm_rewards: reward_clip must be > 0 (official 100) or None, got {reward_clip}.")
        r = r.clamp(-reward_clip, reward_clip)
    return _inert(mask, r)


@torch.no_grad()
def minillm_advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 0.95,
    include_current: bool = True,
    length_norm: bool = True,
    whiten: bool = True,
    future_weights: Tensor | None = None,
) -> Tensor:
    """MiniLLM's long-term advantages: (length-normalized, discounted) returns-to-go, optionally whitened.

    Equation, over the valid tokens t' of the row (masked positions are skipped: no reward, no discount step)::

        G_t = [r_t]  +  Σ_{t' > t} γ^{n(t, t')} · ρ_{t..t'} · r_t'       ρ_{t..t'} = Π_{t < u ≤ t'} w_u (or 1)
        A_t = G_t / N_t          N_t = #terms summed: #valid t' ≥ t (include_current) or > t (not), at least 1
        A   = whiten(A)          batch mean / unbiased variance over valid tokens (tether.losses.policy.whiten)

    The paper's long-term term is ``R_{t+1}`` — the return from the NEXT token, undiscounted (Eq. 3), length-
    normalized by Eq. 6 (printed as ``1/(T − t − 1)`` for the ``T − t`` terms ``t' = t+1 … T``: off by one, and a
    division by zero at t = T − 1; we divide by the number of terms). ``include_current=False, gamma=1,
    length_norm=False, whiten=False`` is the paper's exact ``R_{t+1}``; with :func:`minillm` at those settings the
    estimator's expected gradient is exactly ∇KL(q_θ ‖ p) over sequences (``test_minillm_exact_gradient_oracle``).

    ``future_weights`` (the per-token ``w_t`` of :func:`minillm_importance_weights`) turns on per-decision importance
    sampling of the future rewards (Precup et al. 2000). Under teacher-mixed sampling the tokens after t were drawn
    from p̃ too, so Eq. 5's prefix weight ``W_t`` alone does not make the long-term term unbiased; weighting each
    future reward by the ratios between t and t' does [derived; proved by the same enumeration oracle]. Neither the
    paper nor the official code does this.

    Defaults are the OFFICIAL code's (``losses.py::_get_advantages_and_returns``), which departs from the paper:

    1. ``gamma = 0.95`` (argument default, not overridden by any script), where the paper is undiscounted;
    2. the return INCLUDES the current reward r_t. In expectation this adds the single-step gradient a second time:
       ``E_{y_t~q}[−r_t ∇log q(y_t)] = ∇KL(q(·|s_t) ‖ p(·|s_t))`` (``test_minillm_return_including_current_step``);
    3. length normalization is applied whatever ``--length-norm`` says (that flag only changes what is logged), and
       divides the DISCOUNTED sum by the number of remaining tokens (not by the sum of the discount factors);
    4. whitening is always on.

    Shape: ``rewards``, ``mask``, ``future_weights`` (B, T); output (B, T), zero at masked positions. No gradient.

    Example: r = [1, 1, 1], γ = 1 → G = [3, 2, 1], N = [3, 2, 1], A = [1, 1, 1] before whitening.
    With r = [1, 2, 3], γ = 0.5: include_current → [2.75/3, 3.5/2, 3/1]; not → [1.75/2, 1.5/1, 0/1].
    Departures from the official code: whitening statistics are over valid tokens only (the official ``whiten``
    includes the padding zeros of the (B, T) tensor, and all-gathers across data-parallel ranks); masked positions
    inside a response are skipped (the official loop runs over all positions; the same for right padding).
    """
    _check("minillm_advantages", mask, rewards=rewards, future_weights=future_weights)
    valid = mask.bool()
    r = _inert(mask, rewards)
    w = None if future_weights is None else _inert(mask, future_weights).to(r.dtype)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # G_{t'} (including r_t') of the next valid token t' after t
    next_w = torch.ones_like(r[:, 0])  # w_{t'} of that token
    for t in range(r.shape[1] - 1, -1, -1):
        future = gamma * next_w * running
        here = r[:, t] + future
        out[:, t] = torch.where(valid[:, t], here if include_current else future, 0.0)
        running = torch.where(valid[:, t], here, running)
        if w is not None:
            next_w = torch.where(valid[:, t], w[:, t], next_w)
    if length_norm:
        remaining = valid.flip(-1).cumsum(-1).flip(-1)  # #valid t' ≥ t
        if not include_current:
            remaining = remaining - valid.long()
        out = out / remaining.clamp(min=1).to(out.dtype)
    if whiten:
        out = _whiten(out, mask)
    return _inert(mask, out)


def minillm_long_term(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    clip_eps: float | None = 0.2,
) -> tuple[Tensor, Tensor]:
    """Per-token long-term loss: PPO-clip on the importance-weighted ratio ``ρ_t·w_t`` (before aggregation).

    Equation (MiniLLM §2.3 "we add the clipping strategy [PPO]"; code ``losses.py::_pg_loss``)::

        ρ_t = exp(clamp(log q_θ(y_t) − log q_old(y_t), ±20)),   u_t = ρ_t · sg(w_t)
        L_t = max( −A_t·u_t, −A_t·clip(u_t, 1 − ε, 1 + ε) )

    At ρ = 1 (first pass over a rollout) the gradient is ``−A_t·w_t·∇log q_θ(y_t|s_t)`` — the long-term part of
    the MiniLLM gradient (Eq. 5) with ``A_t`` from :func:`minillm_advantages`. Note the official code clips the
    PRODUCT ρ·w, so an importance weight far from 1 is clipped even on the first pass.

    Shape: ``logps`` (B, T) differentiable; ``old_logps``, ``advantages``, ``weights``, ``mask`` (B, T).
    Returns ``(per_token, clipped)``, both (B, T): the loss (zero at masked positions) and where the clipped branch
    is active (zero gradient there).

    Args:
        weights: per-token ``w_t`` or cumulative ``W_t`` (:func:`minillm_importance_weights`); None means 1
            (α = 0, the official code's ``w = 1`` without mixing).
        clip_eps: ε (official ``--cliprange 0.2``); None disables the clip (the paper's unclipped estimator).

    Stop-gradient: ``old_logps``, ``advantages``, ``weights``. Departures: the log-ratio clamp ±20
    (``tether.losses.policy.LOG_RATIO_CLAMP``; the official code has none; it bites only beyond e^20); no dual clip
    (the official code has none either).
    """
    _check("minillm_long_term", mask, logps=logps, old_logps=old_logps, advantages=advantages, weights=weights)
    log_ratio = (_inert(mask, logps) - _inert(mask, old_logps.detach())).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    u = torch.exp(log_ratio)
    if weights is not None:
        u = u * _inert(mask, weights.detach()).to(u.dtype)
    adv = _inert(mask, advantages.detach()).to(u.dtype)
    if clip_eps is None:
        per_token, clipped = -adv * u, torch.zeros_like(mask, dtype=torch.bool)
    else:
        if clip_eps < 0:
            raise ValueError(f"minillm_long_term: clip_eps must be ≥ 0 (official 0.2) or None, got {clip_eps}.")
        per_token, clipped, _ = ppo_clip_per_token(u, adv, clip_eps, clip_eps)
    valid = mask.bool()
    return _inert(mask, per_token), clipped & valid


def minillm_single_step(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Per-position single-step term: the exact reverse KL ``KL(q_θ(·|s_t) ‖ p(·|s_t))`` over the vocabulary.

    Equation (MiniLLM §2.2 Eq. 3, ``(∇L)_Single = −Σ_t ∇E_{y_t~q_θ(t)}[r_t]``; code ``losses.py::_reg_loss``, cross-
    entropy(q, p) − entropy(q))::

        KL_t = Σ_v q_θ(v|s_t)·(log q_θ(v|s_t) − log p(v|s_t)),     ∇E_{y_t~q_θ}[r_t] = −∇KL_t

    differentiable through the student at fixed states ``s_t`` (the states are data). For long responses and large
    vocabularies compute this chunked over the LM head and pass the ``(B, T)`` result to :func:`minillm` as
    ``single_step_kl``; this function is the plain twin.

    Shape: ``student_logits``, ``teacher_logits`` (B, T, V) (already divided by the sampling temperature, as
    ``trainer.compute_logits_and_log_probs`` does for both models); output (B, T), zero at masked positions.
    Stop-gradient: the teacher. Departures: a vocabulary entry with probability 0 under both models (padded vocabulary,
    logit −inf) contributes 0, as in the official ``inf_mask``; an entry that is −inf for the teacher only gives +inf
    (the true KL), where the official code drops it from both sums.
    """
    _check("minillm_single_step", mask, student_logits=student_logits, teacher_logits=teacher_logits)
    return _inert(mask, kl.reverse_kl(_inert(mask, student_logits), _inert(mask, teacher_logits.detach())))


def minillm(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    single_step_kl: Tensor | None = None,
    student_logits: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    single_step: bool = True,
    weight_single_step: bool = False,
    clip_eps: float | None = 0.2,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> DistillLossOutput:
    """MiniLLM's distillation loss: PPO-clipped long-term term + the exact single-step reverse KL.

    Equation (MiniLLM §2.2 "In Summary" and §2.3; code ``losses.py::ppo_loss``)::

        L = aggregate( L^long_t + [sg(w_t)·] KL(q_θ(·|s_t) ‖ p(·|s_t)) )

    with ``L^long_t`` from :func:`minillm_long_term` and the KL from :func:`minillm_single_step` (or passed in).
    Gradient (at ρ = 1, no clipping)::

        ∇L ∝ Σ_t [ −A_t·w_t·∇log q_θ(y_t|s_t) + [w_t·]∇KL_t ]

    Which divergence: with ``advantages = minillm_advantages(r, m, gamma=1, include_current=False,
    length_norm=False, whiten=False, future_weights=w)``, ``weights = W`` (cumulative), ``weight_single_step=True``,
    ``clip_eps=None`` and tokens drawn from p̃ (any α ∈ [0, 1)), ``E[∇L_seq]`` summed over a sequence equals
    ∇KL(q_θ ‖ p) over whole sequences exactly (enumeration oracle, float64). At α = 0 every weight is 1 and the
    same holds without the weights. The official settings (defaults here and in :func:`minillm_advantages`)
    follow a length-normalized, discounted, whitened surrogate instead, with the single-step gradient counted
    twice in expectation (departure 2 of :func:`minillm_advantages`).

    Shape: ``logps`` (B, T) differentiable (log q_θ of the sampled tokens, at the current parameters);
    ``old_logps``, ``advantages``, ``weights``, ``mask`` (B, T); ``single_step_kl`` (B, T) differentiable, OR
    ``student_logits`` (B, T, V) differentiable with ``teacher_logits`` (B, T, V). Returns a 0-dim loss.

    Args:
        weights: see :func:`minillm_long_term` (None = 1).
        single_step_kl: the per-position exact reverse KL computed by the caller (e.g. chunked over the LM head).
        single_step: include the single-step term (official ``--single-step-reg``, on in every script).
        weight_single_step: multiply the single-step term by ``sg(w_t)`` as Eq. 5 writes; the official code does
            not (False) — it then averages the KL over p̃'s states, not q's. With the per-token ``w_t`` this is a
            no-op in expectation (``E_{y_t~p̃}[w_t] = 1``); with the cumulative ``W_t`` it re-weights the states to q's.
        clip_eps: PPO ε (0.2); None: no clipping.
        agg, max_len: :func:`tether.losses.policy.aggregate`; the official loss is ``token-mean`` (both terms summed
            over valid tokens and divided by their number).

    Metrics: ``long_term`` (aggregated L^long), ``single_step_kl`` (token mean), ``clip_frac``, ``ratio_mean``,
    ``weight_mean``.
    Stop-gradient: ``old_logps``, ``advantages``, ``weights``, the teacher.
    Departures: see :func:`minillm_long_term` and :func:`minillm_advantages`; the PPO epochs and mini-batching over
    rollouts (official ``ppo_epochs 4``, chunk 16) and the pre-training term are the recipe's.
    """
    _check("minillm", mask, logps=logps, old_logps=old_logps, advantages=advantages, weights=weights)
    per_token, clipped = minillm_long_term(logps, old_logps, advantages, mask, weights=weights, clip_eps=clip_eps)
    long_term = aggregate(per_token, mask, agg, max_len)
    metrics = {"long_term": long_term.detach().item(), "clip_frac": _mean(clipped, mask)}
    with torch.no_grad():
        metrics["ratio_mean"] = _mean(torch.exp(_inert(mask, logps) - _inert(mask, old_logps)), mask)
        metrics["weight_mean"] = 1.0 if weights is None else _mean(weights, mask)
    if single_step:
        if (single_step_kl is None) == (student_logits is None or teacher_logits is None):
            raise ValueError(
                "minillm: the single-step term needs either single_step_kl=(B, T) (the caller's exact per-position "
                "KL(q ‖ p)) or both student_logits= and teacher_logits= (B, T, V) — exactly one of the two; or pass "
                "single_step=False."
            )
        if single_step_kl is None:
            single = minillm_single_step(student_logits, teacher_logits, mask)
        else:
            _check("minillm", mask, single_step_kl=single_step_kl)
            single = _inert(mask, single_step_kl)
        metrics["single_step_kl"] = _mean(single, mask)
        if weight_single_step and weights is not None:
            single = single * _inert(mask, weights.detach()).to(single.dtype)
        per_token = per_token + single
    return DistillLossOutput(aggregate(per_token, mask, agg, max_len), metrics)
