"""Distillation objectives beyond a per-position divergence — MiniLLM, DPKD, DCKD, ADPA — as pure functions of tensors.

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
``dpkd_token*``     no divergence: a Bradley–Terry loss per position on two argmax tokens (teacher's vs student's)
``dpkd_sequence``   DPO with the teacher as reference (implicit regularizer: reverse KL(q_θ ‖ p))
``dckd``            per-position FORWARD KL(π_dpo ‖ q_θ) under teacher forcing on chosen and rejected responses
                    (+ NLL on chosen); top-k compressed: forward KL between (k+1)-bin distributions
``adpa``            ascent on the expected teacher advantage Σ_a q_θ(a|s_t)·A(s_t, a) over the teacher's top-k
==================  ==========================================================================================

Sources read (public snapshots) and what was confirmed:

* MiniLLM — Gu, Dong, Wei, Huang 2024, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
  arXiv:2306.08543. Official code microsoft/LMOps @ 4f2a9de: ``minillm/minillm/losses.py`` (``_get_advantages_and_
  returns``, ``_pg_loss``, ``_reg_loss``), ``sampler.py`` (rewards, mixed log-probs, ``w``), ``reward.py``,
  ``utils.py`` (``whiten``, ``get_x_entropy``, ``get_entropy``), ``arguments.py``,
  ``scripts/gpt2/minillm/train_base_xl.sh``. The paper's §2.2 equations (Eqs. 2–6: the gradient, the single-step
  decomposition, p̃, the importance weights and their per-token approximation, length normalization) were read in a
  public reproduction of the paper's text (a translated copy; the arXiv page itself was not readable here).
* DPKD — Li, Gu, Dong, Wang, Cheng, Wei 2024, "Direct Preference Knowledge Distillation for Large Language Models",
  arXiv:2406.19774v2: §2.2 Eqs. 6–9 and Algorithm 1 read in a public copy of the paper text. Official code
  microsoft/LMOps @ 4f2a9de ``dpkd/main.py`` (``get_distil_loss``, ``--seqKD-DPO`` branch), ``dpkd/arguments.py``,
  ``dpkd/scripts/dpkd-gpt2_base_runner.sh``.
* DCKD / ADPA — Gao, Wan, Guo, Quan, Wang 2025, "Advantage-Guided Distillation for Preference Alignment in Small
  Language Models", ICLR 2025, arXiv:2502.17927. The authors' repository (SLIT-AI/ADPA) is NOT available here; read:
  its README text (pipeline: DCKD on chosen + rejected, ADPA on student generations, top-k teacher logits merged by
  ``utils/merge_logits_adpa_dataset.py``), and the code of the fork built on it,
  kaist-siit-lab/StarLab_Preference-Distillation-via-Value-based-Reinforcement-Learning @ 92fd496:
  ``scripts/run_distill_dpo.py`` (``get_kl_loss``, ``get_reverse_ce``, ``get_batch_loss_metrics``),
  ``utils/compress_logits.py`` (``compress_probs``, ``load_input_and_target_probs_fast``),
  ``utils/merge_logits_adpa_dataset.py`` (``get_margin_logp_token``). The paper's equations were NOT read: the
  formulas below are the fork's code; the paper's recipe weights are unverified.

Left out:

* The MiniLLM pre-training term ``L_PT = (1 − kd_ratio)·NLL + kd_ratio·KL(p ‖ q)`` on a separate corpus: it is plain
  forward-KL KD plus NLL, which the distillation recipe already has (``tether.losses.distill`` divergences).
* The DPKD ``--simpo`` option (divides each position's loss by a count of non-repeating student argmax tokens / 256):
  undocumented in the paper; the plain DPKD path does not use it.
* "Rethinking LLM Distillation: A Constrained MDP Perspective" (Zimmer, Ji, Nguyen, Bou Ammar 2025,
  arXiv:2509.22921): only the abstract and the public reviews could be read (a Sauté-RL-style modified reward without
  state augmentation, an "Eq. 5" with a policy-dependent discrepancy term Φ and a KL budget); neither the paper's
  equations nor any code were accessible, so the modified reward cannot be written down faithfully. Not implemented.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tether import kl
from tether.losses.policy import LOG_RATIO_CLAMP, aggregate, ppo_clip_per_token
from tether.losses.policy.advantages import whiten as _whiten
from tether.losses.preference import PreferenceLossOutput

__all__ = [
    "DistillLossOutput",
    "TopK",
    # MiniLLM
    "minillm",
    "minillm_advantages",
    "minillm_importance_weights",
    "minillm_long_term",
    "minillm_mixture_logprobs",
    "minillm_rewards",
    "minillm_single_step",
    # DPKD
    "dpkd_sequence",
    "dpkd_token",
    "dpkd_token_dpop",
    "dpkd_token_ipo",
    # DCKD
    "dckd",
    "teacher_topk",
    "topk_forward_kl",
    # ADPA
    "adpa",
    "adpa_advantages",
]


class DistillLossOutput(NamedTuple):
    """What every aggregated objective here returns.

    Fields:
        loss: the scalar (0-dim) loss to minimize; differentiable w.r.t. the student's inputs only.
        metrics: detached diagnostics as Python floats (token means over valid positions).
    """

    loss: Tensor
    metrics: dict[str, float]


class TopK(NamedTuple):
    """A teacher distribution stored as its top-k, as the DCKD/ADPA code stores it (``compress_probs``).

    Fields:
        ids: the k most probable token ids, ``Shape: (..., K)`` (long).
        probs: their probabilities, ``Shape: (..., K)``.
        rest: the remaining mass ``1 − Σ probs``, ``Shape: (...)``.
    """

    ids: Tensor
    probs: Tensor
    rest: Tensor


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _check(fn: str, mask: Tensor, **tensors: Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"{fn}: mask must be (B, T), got shape {tuple(mask.shape)}.")
    for name, x in tensors.items():
        if x is None:
            continue
        if x.shape[:2] != mask.shape or x.dim() not in (2, 3):
            raise ValueError(
                f"{fn}: {name} has shape {tuple(x.shape)}; expected (B, T) = {tuple(mask.shape)} "
                "(or (B, T, V) / (B, T, K) for logits and top-k tensors), aligned with mask."
            )


def _inert(mask: Tensor, x: Tensor) -> Tensor:
    """``x`` with 0 at masked positions (over a trailing vocabulary axis if any); exactly zero gradient there."""
    keep = mask.bool() if x.dim() == mask.dim() else mask.bool()[..., None]
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _mean(x: Tensor, mask: Tensor) -> float:
    """Metric: detached token mean of ``x`` over valid positions (0 for an empty mask)."""
    return aggregate(x.detach().to(torch.float64), mask, "token-mean").item()


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Differentiable token mean over valid positions (0 for an empty mask)."""
    return aggregate(_inert(mask, x), mask, "token-mean")


# ----------------------------------------------------------------------------------------------------------
# MiniLLM: the sequence-level reverse KL by policy gradient (Gu et al. 2024)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# DPKD: direct preference knowledge distillation (Li et al. 2024)
# ----------------------------------------------------------------------------------------------------------


class _ArgmaxMargin(NamedTuple):
    h: Tensor  # (B, T) student margin minus teacher margin
    student_teacher_token: Tensor  # (B, T) log q_θ(a_T)
    teacher_teacher_token: Tensor  # (B, T) log p(a_T)
    agree: Tensor  # (B, T) a_T == a_S


def _dpkd_margin(fn: str, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, reference_free: bool):
    """``h_t`` of DPKD's token-level instantiation (official ``get_distil_loss``, ``--seqKD-DPO``)."""
    _check(fn, mask, student_logits=student_logits, teacher_logits=teacher_logits)
    student_logp = F.log_softmax(_inert(mask, student_logits), dim=-1)
    teacher_logp = F.log_softmax(_inert(mask, teacher_logits.detach()).to(student_logp.dtype), dim=-1)
    a_t = teacher_logp.argmax(dim=-1, keepdim=True)
    a_s = student_logp.detach().argmax(dim=-1, keepdim=True)
    s_t, s_s = student_logp.gather(-1, a_t).squeeze(-1), student_logp.gather(-1, a_s).squeeze(-1)
    t_t, t_s = teacher_logp.gather(-1, a_t).squeeze(-1), teacher_logp.gather(-1, a_s).squeeze(-1)
    h = s_t - s_s if reference_free else (s_t - s_s) - (t_t - t_s)
    return _ArgmaxMargin(_inert(mask, h), s_t, t_t, (a_t == a_s).squeeze(-1))


def _dpkd_metrics(m: _ArgmaxMargin, mask: Tensor) -> dict[str, float]:
    return {"margin": _mean(m.h, mask), "argmax_agree": _mean(m.agree, mask), "accuracy": _mean(m.h > 0, mask)}


def dpkd_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> DistillLossOutput:
    """DPKD as the official code implements it: a DPO loss per position between two argmax tokens.

    Equation (official ``dpkd/main.py::get_distil_loss``, ``--seqKD-DPO``; the paper's Eq. 8 at one position)::

        a_T = argmax_v p(v|s_t),   a_S = argmax_v q_θ(v|s_t)                      (no gradient through argmax)
        h_t = [log q_θ(a_T|s_t) − log q_θ(a_S|s_t)] − [log p(a_T|s_t) − log p(a_S|s_t)]   (teacher term 0 if
                                                                                         reference_free)
        L_t = (1 − ε)·softplus(−β·h_t) + ε·softplus(β·h_t)       = −(1−ε) log σ(βh) − ε log σ(−βh)
        L   = aggregate(L_t)                                       official: token mean over valid positions

    The teacher's argmax plays the chosen response, the student's the rejected one, the teacher the reference —
    under teacher forcing on the TRAINING TARGET (the dataset response), not on sampled outputs. Where the two
    argmaxes agree ``h_t ≡ 0``: the position costs log 2 and has zero gradient, but still counts in the mean.

    Shape: ``student_logits`` (B, T, V) differentiable; ``teacher_logits`` (B, T, V); ``mask`` (B, T). 0-dim loss.

    Args:
        beta: β (official ``--dpo-beta``, default 0.1).
        label_smoothing: ε ∈ [0, 0.5] (official ``--label-smoothing``, default 0).
        reference_free: drop the teacher's margin (official ``--reference-free``).

    Examples: q = p ⇒ a_T = a_S everywhere ⇒ L = log 2, gradient 0. One position with log q(a_T) = −2,
    log q(a_S) = −1, log p(a_T) = −0.5, log p(a_S) = −3, β = 0.1: h = (−2 + 1) − (−0.5 + 3) = −3.5,
    L = softplus(0.35) = log(1 + e^0.35) = 0.883382; reference-free h = −1, L = softplus(0.1) = 0.744397.
    Metrics: ``margin`` (mean h), ``argmax_agree``, ``accuracy`` (fraction h > 0).
    The full official loss is ``(1 − kd_ratio)·NLL + kd_ratio·L + lm_coef·L_LMPT`` (kd_ratio 0.5, lm_coef 0.5):
    the recipe's. Stop-gradient: the teacher, both argmaxes.
    Departures: log-softmax in the input dtype (the official code uses bf16); the official code fills the student's
    log-probs at −inf logits with 0 BEFORE its argmax, so with a padded vocabulary its student argmax can land on a
    padded slot — here −inf entries never win the argmax.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpkd_token: label_smoothing ε must lie in [0, 0.5], got {label_smoothing}.")
    m = _dpkd_margin("dpkd_token", student_logits, teacher_logits, mask, reference_free)
    z = beta * m.h
    per_token = F.softplus(-z)
    if label_smoothing > 0:
        per_token = (1.0 - label_smoothing) * per_token + label_smoothing * F.softplus(z)
    return DistillLossOutput(aggregate(per_token, mask, agg, max_len), _dpkd_metrics(m, mask))


def dpkd_token_ipo(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.1,
    reference_free: bool = False,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> DistillLossOutput:
    """DPKD's IPO variant (official ``--ipo``): ``L_t = (h_t − 1/(2β))²``, token mean.

    ``h_t`` as in :func:`dpkd_token`; the squared loss is Azar et al. 2023 (arXiv:2310.12036) Eq. 17 per position.
    At q = p, ``h = 0`` and ``L = 1/(4β²)`` (25 at β = 0.1); in the worked example of :func:`dpkd_token`,
    ``(−3.5 − 5)² = 72.25``. Shapes as :func:`dpkd_token`. Departures: as :func:`dpkd_token`.
    """
    m = _dpkd_margin("dpkd_token_ipo", student_logits, teacher_logits, mask, reference_free)
    per_token = (m.h - 1.0 / (2.0 * beta)).square()
    return DistillLossOutput(aggregate(per_token, mask, agg, max_len), _dpkd_metrics(m, mask))


def dpkd_token_dpop(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.1,
    dpop_lambda: float = 50.0,
    reference_free: bool = False,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> DistillLossOutput:
    """DPKD's DPOP variant (official ``--DPOP``, λ = ``--DPOP-lambda`` 50): a penalty when q_θ(a_T) < p(a_T).

    Equation::

        L_t = softplus(−β·h_t) + λ·max(0, log p(a_T|s_t) − log q_θ(a_T|s_t))

    In the worked example of :func:`dpkd_token`: 0.883382 + 50·(−0.5 + 2) = 75.883382. Shapes as
    :func:`dpkd_token`. Departures: as :func:`dpkd_token`.
    """
    m = _dpkd_margin("dpkd_token_dpop", student_logits, teacher_logits, mask, reference_free)
    penalty = (m.teacher_teacher_token - m.student_teacher_token).clamp(min=0.0)
    per_token = F.softplus(-beta * m.h) + dpop_lambda * penalty
    return DistillLossOutput(aggregate(per_token, mask, agg, max_len), _dpkd_metrics(m, mask))


def dpkd_sequence(
    student_logps_teacher_out: Tensor,
    student_logps_student_out: Tensor,
    teacher_logps_teacher_out: Tensor,
    teacher_logps_student_out: Tensor,
    *,
    beta: float = 0.1,
    teacher_out_lengths: Tensor | None = None,
    student_out_lengths: Tensor | None = None,
) -> PreferenceLossOutput:
    """DPKD as the paper writes it: Bradley–Terry preference of the teacher's output over the student's.

    Equation (DPKD, arXiv:2406.19774, §2.2 Eq. 8; Eq. 9 with lengths)::

        u = β·[log q_θ(y_T|x) − log p(y_T|x)] − β·[log q_θ(y_S|x) − log p(y_S|x)]
        L = −log σ(u) = softplus(−u)
        Eq. 9 (Algorithm 1): β → β/|y_T| on the first bracket and β/|y_S| on the second

    This is DPO (``tether.losses.preference.dpo``) with chosen = a teacher sample ``y_T``, rejected = a student sample
    ``y_S`` and the TEACHER as the reference; the implicit reward is ``β·log(q_θ/p)`` (Eq. 5), i.e. the regularizer
    is the reverse KL(q_θ ‖ p) of Eq. 2.

    Shape: all four inputs (B,) summed response log-probs (teacher output under student/teacher, student output
    under student/teacher); lengths (B,) response token counts; outputs (B,) (the recipe takes the mean).
    Returns ``PreferenceLossOutput(loss, chosen_rewards = β·(LP_q − LP_p)(y_T), rejected_rewards = … (y_S))``.
    Stop-gradient: the teacher's log-probs are data. Departures: none from Eq. 8/9; the official code does not
    implement this form (it is the token-level :func:`dpkd_token`).
    """
    if (teacher_out_lengths is None) != (student_out_lengths is None):
        raise ValueError("dpkd_sequence: pass both teacher_out_lengths and student_out_lengths (Eq. 9) or neither.")
    chosen = student_logps_teacher_out - teacher_logps_teacher_out.detach()
    rejected = student_logps_student_out - teacher_logps_student_out.detach()
    if teacher_out_lengths is not None:
        chosen = chosen / teacher_out_lengths.to(chosen.dtype)
        rejected = rejected / student_out_lengths.to(rejected.dtype)
    u = beta * (chosen - rejected)
    return PreferenceLossOutput(F.softplus(-u), beta * chosen.detach(), beta * rejected.detach())


# ----------------------------------------------------------------------------------------------------------
# DCKD: forward KL of a DPO teacher on chosen and rejected responses (Gao et al. 2025)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_topk(teacher_logits: Tensor, k: int = 50) -> TopK:
    """The teacher's distribution compressed to its top-k and one remaining-mass bucket (fork ``compress_probs``).

    Shape: ``teacher_logits`` (..., V) → ``TopK(ids (..., K), probs (..., K), rest (...))``, ``rest = 1 − Σ probs``
    (clamped at 0). k = 50 in the DCKD/ADPA code (``precompute_logits.py``). No gradient.
    """
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"teacher_topk: k must be in [1, V = {teacher_logits.shape[-1]}], got {k}.")
    probs, ids = torch.softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    return TopK(ids, probs, (1.0 - probs.sum(-1)).clamp(min=0.0))


def topk_forward_kl(
    student_logits: Tensor,
    teacher: TopK,
    *,
    student_floor: float = 1e-7,
    stabilize: float | None = 1e-8,
) -> Tensor:
    """Forward KL between (k+1)-bin distributions: the teacher's top-k + rest, the student gathered at the same ids.

    Equation (fork ``compress_logits.py::load_input_and_target_probs_fast`` then ``run_distill_dpo.py::get_kl_loss``)::

        P = [p_1 … p_K, rest_p],   Q = [q_θ(id_1) … q_θ(id_K), 1 − Σ_k q_θ(id_k)]       (q_θ: full softmax)
        P, Q ← clamp(·, s, 1 − s)   (s = stabilize; ``prob_stabilize``)
        Q    ← max(Q, student_floor)
        KL   = Σ_{b=1}^{K+1} P_b·(log P_b − log Q_b)

    By the data-processing inequality this is ≤ the full forward KL(p ‖ q_θ) (before the clamps); with K = V it
    equals it up to the clamps (≈ 1e-7). Gradient: the forward KL of the binned distributions (zero through clamped
    entries).

    Shape: ``student_logits`` (..., V) differentiable; ``teacher`` a :class:`TopK` of (..., K) / (...); output (...).
    Stop-gradient: the teacher. Departures: none from the fork's code (the authors' own repository was not
    accessible).
    """
    q = torch.softmax(student_logits, dim=-1)
    q_top = q.gather(-1, teacher.ids)
    p_bins = torch.cat([teacher.probs.detach(), teacher.rest.detach()[..., None]], dim=-1).to(q.dtype)
    q_bins = torch.cat([q_top, (1.0 - q_top.sum(-1, keepdim=True))], dim=-1)
    if stabilize is not None:
        p_bins = p_bins.clamp(stabilize, 1.0 - stabilize)
        q_bins = q_bins.clamp(stabilize, 1.0 - stabilize)
    q_bins = q_bins.clamp(min=student_floor)
    log_p = torch.where(p_bins > 0, p_bins.log(), torch.zeros_like(p_bins))
    return (p_bins * (log_p - q_bins.log())).sum(-1)


def dckd(
    chosen_kl: Tensor,
    chosen_mask: Tensor,
    *,
    sft_weight: float,
    chosen_weight: float,
    rejected_weight: float,
    chosen_logps: Tensor | None = None,
    rejected_kl: Tensor | None = None,
    rejected_mask: Tensor | None = None,
) -> DistillLossOutput:
    """DCKD: forward KL to a DPO teacher on the chosen AND the rejected response, plus NLL on the chosen one.

    Equation (fork ``run_distill_dpo.py::get_batch_loss_metrics``: ``sft_on_chosen``, ``chosen_distil_weight``,
    ``rejected_distil_weight``)::

        L = w_sft·mean_t[−log q_θ(y_w,t)] + w_c·mean_t KL(π_dpo ‖ q_θ)|_{y_w} + w_r·mean_t KL(π_dpo ‖ q_θ)|_{y_l}

    each mean over the valid tokens of its own side (token mean, not mean of per-sequence means), under teacher
    forcing on the dataset's chosen ``y_w`` and rejected ``y_l``. The per-position KLs are the caller's: the exact
    full-vocabulary forward KL (``tether.kl.forward_kl(student_logits, teacher_logits)`` on (B, T, V), the distill
    divergence ``forward_kl`` on (N, V) rows, or chunked over the LM head), or the official top-k compressed one
    (:func:`topk_forward_kl` of :func:`teacher_topk`, k = 50).

    Neutral settings: ``sft_weight=0, rejected_weight=0, chosen_weight=1`` is plain word-level KD (forward KL, token
    mean) on the chosen responses (``test_dckd_neutral_is_plain_kd``).

    Shape: ``chosen_kl``, ``chosen_mask``, ``chosen_logps`` (B, T); ``rejected_kl``, ``rejected_mask`` (B', T')
    (the two sides may differ in shape). 0-dim loss.

    Args:
        sft_weight, chosen_weight, rejected_weight: no defaults on purpose — the authors' DCKD recipe values
            (``student_dckd.yaml``) were not accessible; the fork's chosen-only KD recipe uses ``sft_on_chosen 0,
            chosen_distil_weight 0.1``.
        chosen_logps: log q_θ of the chosen tokens, (B, T) differentiable; needed when ``sft_weight > 0``.

    Metrics: ``nll``, ``kl_chosen``, ``kl_rejected`` (those computed). Stop-gradient: the teacher (inside the KLs).
    Departures: none in the combination; the fork additionally multiplies the distillation part by
    ``distillation_weight`` (fold it into the weights).
    """
    _check("dckd", chosen_mask, chosen_kl=chosen_kl, chosen_logps=chosen_logps)
    loss = chosen_kl.new_zeros(())
    metrics: dict[str, float] = {}
    if sft_weight != 0.0:
        if chosen_logps is None:
            raise ValueError("dckd: sft_weight > 0 needs chosen_logps= (log q_θ of the chosen tokens, (B, T)).")
        nll = -_token_mean(chosen_logps, chosen_mask)
        loss = loss + sft_weight * nll
        metrics["nll"] = nll.detach().item()
    if chosen_weight != 0.0:
        kl_c = _token_mean(chosen_kl, chosen_mask)
        loss = loss + chosen_weight * kl_c
        metrics["kl_chosen"] = kl_c.detach().item()
    if rejected_weight != 0.0:
        if rejected_kl is None or rejected_mask is None:
            raise ValueError("dckd: rejected_weight > 0 needs rejected_kl= and rejected_mask= ((B', T') each).")
        _check("dckd", rejected_mask, rejected_kl=rejected_kl)
        kl_r = _token_mean(rejected_kl, rejected_mask)
        loss = loss + rejected_weight * kl_r
        metrics["kl_rejected"] = kl_r.detach().item()
    return DistillLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# ADPA: advantage-guided distillation on the student's own generations (Gao et al. 2025)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def adpa_advantages(
    dpo_logits: Tensor,
    ref_logits: Tensor,
    *,
    top_k: int = 50,
    ref_top_k: int | None = None,
    floor: float = 1e-7,
) -> tuple[Tensor, Tensor]:
    """The DPO teacher's advantage ``A(s_t, a) = log π_dpo(a|s_t) − log π_ref(a|s_t)`` on π_dpo's top-k tokens.

    Equation (fork ``utils/merge_logits_adpa_dataset.py::get_margin_logp_token``)::

        ids   = top-k of π_dpo(·|s_t)
        A(a)  = log max(π_dpo(a), floor) − log π̂_ref(a),   a ∈ ids
        π̂_ref(a) = max(π_ref(a), floor)                     (exact: ref_top_k=None)
        π̂_ref(a) = max(π_ref(a), floor)        if a is in π_ref's top-``ref_top_k``     (the official compressed
                   max(min_k π_dpo(id_k), floor) otherwise                                 store)

    Tokens outside ``ids`` get advantage 0 (the loss never sees them). The stored value has no β: the paper's
    advantage is β times this [secondary: a public review of the paper], so β folds into the ADPA weight.

    Shape: ``dpo_logits``, ``ref_logits`` (..., V) — the two teachers on the student's response; returns
    ``(ids, A)``, both (..., K). No gradient.

    Args:
        top_k: K (50 in the ADPA/TVKD code).
        ref_top_k: None computes π_ref exactly at the ids (an online recipe has both teachers' logits); an int
            reproduces the official precomputed store, where π_ref is known only on its own top-k and every other
            token takes the DPO teacher's smallest top-k probability — which sets A ≈ 0 for a DPO top-k token the
            reference ranks low.
        floor: probability floor (1e-7).

    Example: π_dpo = [0.5, 0.3, 0.15, 0.05], π_ref = [0.4, 0.1, 0.3, 0.2], K = 2 → ids [0, 1],
    A = [log(0.5/0.4), log(0.3/0.1)] = [0.22314, 1.09861]; with ref_top_k = 2 (π_ref's top-2 = {0, 2}) token 1 takes
    π̂_ref = min(0.5, 0.3) = 0.3 → A = [0.22314, 0]. π_dpo = π_ref ⇒ A ≡ 0 either way.
    Departures: none from the fork's merge script (the authors' own repository was not accessible).
    """
    if not 1 <= top_k <= dpo_logits.shape[-1]:
        raise ValueError(f"adpa_advantages: top_k must be in [1, V = {dpo_logits.shape[-1]}], got {top_k}.")
    p_dpo, ids = torch.softmax(dpo_logits, dim=-1).topk(top_k, dim=-1)
    p_ref_all = torch.softmax(ref_logits.to(p_dpo.dtype), dim=-1)
    p_ref = p_ref_all.gather(-1, ids).clamp(min=floor)
    if ref_top_k is not None:
        ref_ids = p_ref_all.topk(ref_top_k, dim=-1).indices
        known = (ids[..., :, None] == ref_ids[..., None, :]).any(-1)
        fallback = p_dpo.min(dim=-1, keepdim=True).values.clamp(min=floor)
        p_ref = torch.where(known, p_ref, fallback)
    return ids, p_dpo.clamp(min=floor).log() - p_ref.log()


def adpa(
    student_logits: Tensor,
    topk_ids: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    adpa_weight: float = 1.0,
    sft_weight: float = 0.0,
    chosen_logps: Tensor | None = None,
    chosen_mask: Tensor | None = None,
    prob_stabilize: bool = False,
) -> DistillLossOutput:
    """ADPA: raise the student's probability of tokens the DPO teacher prefers over its reference, on its own samples.

    Equation (fork ``run_distill_dpo.py::get_reverse_ce``, ``adpa_loss_type="reverse_ce"``)::

        L_ADPA = −mean_t Σ_{a ∈ top-k_t} q_θ(a|s_t)·A(s_t, a)        (token mean over valid positions)
        L      = w_adpa·L_ADPA + w_sft·mean_t[−log q_θ(y_w,t)]

    ``q_θ`` is the FULL softmax gathered at the ids (not renormalized over the k tokens); ``s_t`` runs over the
    student's own generation ŷ (the "rejected" slot of the ADPA dataset); the NLL is on the dataset's chosen response.
    Gradient w.r.t. the student's logits z at one position: ``∂L/∂z_v = −q_v·(A_v − Ā)``, ``Ā = Σ_a q_a A_a``
    (A = 0 off the top-k): it raises every token whose advantage beats the student's expected advantage.

    Shape: ``student_logits`` (B, T, V) differentiable; ``topk_ids``, ``advantages`` (B, T, K) from
    :func:`adpa_advantages`; ``mask`` (B, T); ``chosen_logps``, ``chosen_mask`` (B', T') when ``sft_weight > 0``.

    Args:
        adpa_weight, sft_weight: w_adpa and w_sft. The authors' values (``student_adpa.yaml``) were not accessible.
        prob_stabilize: reproduce the fork's default ``prob_stabilize=True`` in ``load_input_and_target_probs_fast``,
            which clamps the student's (k+1)-bin probabilities AND the advantages to [1e-8, 1 − 1e-8] — every
            negative advantage becomes 1e-8 and every advantage above 1 becomes 1 − 1e-8 (the remaining-mass bin
            gets advantage 1e-8). Off by default: it changes the objective, not only its numerics.

    Examples: one position, q = [0.6, 0.3, 0.1], ids = [0, 1], A = [+1, −1] → L = −(0.6 − 0.3) = −0.3;
    Ā = 0.3, ∂L/∂z = −[0.6·0.7, 0.3·(−1.3), 0.1·(−0.3)] = [−0.42, 0.39, 0.03] (descent raises q_0, lowers q_1).
    With ``prob_stabilize`` the same position gives ≈ −0.6. π_dpo = π_ref ⇒ A ≡ 0 ⇒ L = 0, zero gradient.
    Metrics: ``adpa`` (L_ADPA), ``advantage_mean``, ``positive_frac``, ``nll`` (if used).
    Stop-gradient: the advantages (teacher data). Departures: none from the fork's code with ``prob_stabilize=True``.
    """
    _check("adpa", mask, student_logits=student_logits, topk_ids=topk_ids, advantages=advantages)
    q = torch.softmax(_inert(mask, student_logits), dim=-1)
    q_top = q.gather(-1, _inert(mask, topk_ids))
    adv = _inert(mask, advantages.detach()).to(q.dtype)
    if prob_stabilize:
        lo, hi = 1e-8, 1.0 - 1e-8
        q_rest = (1.0 - q_top.sum(-1)).clamp(lo, hi)
        per_token = -((q_top.clamp(lo, hi) * adv.clamp(lo, hi)).sum(-1) + q_rest * lo)
    else:
        per_token = -(q_top * adv).sum(-1)
    adpa_loss = _token_mean(per_token, mask)
    loss = adpa_weight * adpa_loss
    metrics = {
        "adpa": adpa_loss.detach().item(),
        "advantage_mean": _mean(adv.mean(-1), mask),
        "positive_frac": _mean((adv > 0).to(q.dtype).mean(-1), mask),
    }
    if sft_weight != 0.0:
        if chosen_logps is None or chosen_mask is None:
            raise ValueError("adpa: sft_weight > 0 needs chosen_logps= and chosen_mask= ((B', T') each).")
        _check("adpa", chosen_mask, chosen_logps=chosen_logps)
        nll = -_token_mean(chosen_logps, chosen_mask)
        loss = loss + sft_weight * nll
        metrics["nll"] = nll.detach().item()
    return DistillLossOutput(loss, metrics)
