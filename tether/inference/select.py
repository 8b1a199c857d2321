"""Selection rules: from N scored candidates per prompt, the one to keep.

Every rule takes scores (P, N) — candidate j of prompt i, the candidates i.i.d. draws from π_ref — and a mask of
the candidates the reward had an opinion on, and returns a :class:`Selection`: the kept index per prompt and the
probability with which the rule keeps each candidate given the N candidates. Those probabilities are what the KL
accounting reads (``tether.inference.accounting``); the exact law each rule induces over outputs is in
``tether.inference.laws``.

A prompt with no scored candidate keeps candidate 0 (a plain sample from π_ref), flagged in ``no_opinion``. A
candidate without a score is never kept while another has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Selection", "best_of_n", "rejection_sampling", "soft_best_of_n", "tilted_resampling", "worst_of_n"]


@dataclass(frozen=True)
class Selection:
    """What a selection rule kept, for P prompts with N candidates each."""

    index: Tensor
    """(P,) long: the kept candidate."""
    probs: Tensor
    """(P, N) float64: the probability of keeping each candidate given the candidates (rows sum to 1; for
    best-of-N uniform over the tied best, for rejection including the fall-back to candidate 0)."""
    accepted: Tensor
    """(P,) bool: rejection sampling accepted a candidate (True for every other rule)."""
    no_opinion: Tensor
    """(P,) bool: no candidate of the prompt had a score; candidate 0 was kept."""


def _prepare(scores: Tensor, scored: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 2:
        raise ValueError(f"selection: scores must be (prompts, candidates), got shape {tuple(scores.shape)}")
    scored = torch.ones_like(scores, dtype=torch.bool) if scored is None else torch.as_tensor(scored, dtype=torch.bool)
    if scored.shape != scores.shape:
        raise ValueError(f"selection: scored mask {tuple(scored.shape)} does not match scores {tuple(scores.shape)}")
    none = ~scored.any(-1)
    return scores, scored, none


def _with_fallback(probs: Tensor, none: Tensor) -> Tensor:
    probs = probs.clone()
    probs[none] = 0.0
    probs[none, 0] = 1.0
    return probs


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def soft_best_of_n(scores: Tensor, tau: float, scored: Tensor | None = None, *,
                   generator: torch.Generator | None = None) -> Selection:
    """Keep candidate i with probability softmax(score/τ)_i (Verdun et al. 2025, "Soft Best-of-n Sampling for Model
    Alignment", arXiv:2505.03156). τ = 0 is best-of-N (uniform among the tied best); τ = inf keeps a uniformly
    random candidate, i.e. a plain π_ref sample."""
    scores, scored, none = _prepare(scores, scored)
    if tau < 0 or math.isnan(tau):
        raise ValueError(f"soft_best_of_n: tau must be ≥ 0 (0 = best-of-N, inf = plain sampling), got {tau}")
    if tau == 0:
        best = scores.masked_fill(~scored, -math.inf).amax(-1, keepdim=True)
        top = scored & (scores == best)
        probs = top / top.sum(-1, keepdim=True).clamp_min(1)
    else:
        logits = torch.zeros_like(scores) if math.isinf(tau) else scores / tau
        probs = logits.masked_fill(~scored, -math.inf).softmax(-1).nan_to_num(0.0)
    probs = _with_fallback(probs, none)
    ones = torch.ones_like(none)
    return Selection(_draw(probs, generator), probs, ones, none)


def best_of_n(scores: Tensor, scored: Tensor | None = None, *,
              generator: torch.Generator | None = None) -> Selection:
    """Keep the highest-scoring candidate; ties are broken uniformly at random (any outcome-blind tie-break gives
    the same output law, ``tether.inference.laws``)."""
    return soft_best_of_n(scores, 0.0, scored, generator=generator)


def worst_of_n(scores: Tensor, scored: Tensor | None = None, *,
               generator: torch.Generator | None = None) -> Selection:
    """Keep the lowest-scoring candidate (best-of-N jailbreaking's adversary, InfAlign: Balashankar et al. 2025,
    arXiv:2412.19792); ties uniformly at random."""
    return soft_best_of_n(-torch.as_tensor(scores, dtype=torch.float64), 0.0, scored, generator=generator)


def tilted_resampling(scores: Tensor, beta: float, scored: Tensor | None = None, *,
                      generator: torch.Generator | None = None) -> Selection:
    """Self-normalized importance resampling toward π* ∝ π_ref·exp(r/β): the candidates are π_ref draws, the
    importance weight of candidate i is π*(y_i)/π_ref(y_i) ∝ exp(r_i/β), and one candidate is resampled with
    probability proportional to it. This is the soft best-of-N rule at τ = β; what differs is the reading of the
    result (its KL figure estimates KL(π*‖π_ref), and its effective sample size says how well N draws cover π*).
    As N → ∞ the output law tends to π* (Verdun et al. 2025 give the O(1/N) rate)."""
    if not beta > 0:
        raise ValueError(f"tilted_resampling: beta must be > 0, got {beta}")
    return soft_best_of_n(scores, beta, scored, generator=generator)


def _visit_probabilities(accept: Tensor) -> Tensor:
    """(P, N) the probability that candidate i is kept when the N candidates are visited in a uniformly random order,
    each accepted with probability ``accept`` (P, N), the first accepted kept and, if none is, the first visited:

        p_i = a_i · (1/N)·Σ_{k=0}^{N−1} e_k(b_{−i}) / C(N−1, k)  +  (1/N)·Π_j b_j,     b = 1 − a,

    e_k(b_{−i}) the k-th elementary symmetric polynomial of the other candidates' rejection probabilities (k
    candidates visited before i: a uniformly random k-subset of the others)."""
    P, N = accept.shape
    b = 1 - accept
    out = torch.empty_like(accept)
    binom = torch.tensor([math.comb(N - 1, k) for k in range(N)], dtype=torch.float64)
    for i in range(N):
        others = torch.cat([b[:, :i], b[:, i + 1:]], -1)
        e = torch.zeros(P, N, dtype=torch.float64)
        e[:, 0] = 1.0
        for j in range(N - 1):  # e_k ← e_k + b_j·e_{k−1}
            e[:, 1:] = e[:, 1:] + others[:, j:j + 1] * e[:, :-1].clone()
        out[:, i] = accept[:, i] * (e / binom).sum(-1) / N
    return out + b.prod(-1, keepdim=True) / N


def rejection_sampling(scores: Tensor, beta: float, reward_max: float | None, scored: Tensor | None = None, *,
                       generator: torch.Generator | None = None) -> Selection:
    """Rejection sampling toward π* ∝ π_ref·exp(r/β) over the N candidates: visit them in a uniformly random order,
    accept each with probability exp((r_i − r_max)/β), keep the first accepted, or the first visited when none is
    (``accepted`` False). The candidates are exchangeable, so the random order leaves the output law unchanged; it
    makes the keep probabilities symmetric, which tightens the selection bound (``tether.inference.accounting``).

    ``reward_max``: an upper bound on the reward (1 for the rule rewards in [0, 1]); then an accepted candidate is
    an exact draw from π*, and the output law is (1 − (1 − ā)^N)·π* + (1 − ā)^{N−1}·π_ref·(1 − a)
    (``tether.inference.laws.rejection_law``). ``None``: the prompt's largest candidate reward, as in the
    statistical rejection sampling of Liu et al. 2024 (RSO, arXiv:2309.06657, Algorithm 1); the best candidate is
    then always accepted, and the output is only approximately from π*. A score above ``reward_max`` raises."""
    scores, scored, none = _prepare(scores, scored)
    if not beta > 0:
        raise ValueError(f"rejection_sampling: beta must be > 0, got {beta}")
    masked = scores.masked_fill(~scored, -math.inf)
    if reward_max is None:
        bound = masked.amax(-1, keepdim=True).masked_fill(none[:, None], 0.0)
    else:
        if (masked > reward_max).any():
            raise ValueError(f"rejection_sampling: a reward exceeds reward_max={reward_max}; pass a true upper "
                             "bound (or None for the per-prompt maximum)")
        bound = torch.full_like(scores[:, :1], float(reward_max))
    accept = ((masked - bound) / beta).exp()  # 0 for unscored candidates
    probs = _with_fallback(_visit_probabilities(accept), none)
    # Draw the order and the accept/reject coins themselves, so `accepted` is observed rather than inferred.
    order = torch.rand(scores.shape, generator=generator, dtype=torch.float64).argsort(-1)
    coins = torch.rand(scores.shape, generator=generator, dtype=torch.float64) < accept.gather(-1, order)
    first = torch.where(coins.any(-1), coins.double().argmax(-1), torch.zeros_like(none, dtype=torch.long))
    index = order.gather(-1, first[:, None]).squeeze(-1)
    index = torch.where(none, torch.zeros_like(index), index)
    accepted = coins.any(-1) & ~none
    return Selection(index, probs, accepted, none)
