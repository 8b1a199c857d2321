"""Exact output laws of the selection methods on an enumerated outcome space, and the closed forms around them.

Every function takes the reference law ``ref`` (K,) over K outcomes (sequences) and each outcome's score ``rewards``
(K,), and returns a law over the same K outcomes (float64, sums to one). They are the oracles of
``tests/inference/`` and the plug-in estimates of ``tether.inference.accounting`` (there the outcomes are the reward
levels seen in a prompt's reference draws).

All methods draw N candidates i.i.d. from π_ref and keep one. Write F(y) = P_{y'~π_ref}(r(y') ≤ r(y)),
F⁻(y) = P(r(y') < r(y)) and m(y) = F(y) − F⁻(y), the reference mass of y's reward level.

**Ties.** Candidates with equal reward are exchangeable, so any tie-break that does not look at the outcomes
themselves (first in draw order, or uniform among the tied) gives the same law: the kept candidate's reward level
has the law below and, given its level, the outcome is π_ref restricted to that level. Hence

    best-of-N   π_N(y) = π_ref(y)/m(y) · (F(y)^N − F⁻(y)^N)          (= F^N − F⁻^N for distinct rewards: the law of
                                                                       the maximum of N draws; Beirami et al. 2024)
    worst-of-N  π(y)   = π_ref(y)/m(y) · ((1 − F⁻(y))^N − (1 − F(y))^N)

and KL(π‖π_ref) equals the KL between the reward-level laws (within a level both are π_ref's conditional).

**Soft selection** (soft best-of-N, Verdun et al. 2025, arXiv:2505.03156; self-normalized importance resampling
toward π* ∝ π_ref·exp(r/β), which is the same rule with τ = β): keep candidate i with probability
w_i / Σ_j w_j, w = exp(r/τ). The kept outcome has law

    π(y) = N · π_ref(y) · E[ w(y) / (w(y) + S_{N−1}) ],   S_{N−1} = Σ of the weights of N − 1 further draws,

computed exactly by enumerating the multinomial counts of the N − 1 other draws over the reward levels.

**Rejection** over the N candidates (accept candidate i with probability a(y_i) = exp((r(y_i) − r_max)/β), the
first accepted is kept; if none is, the first candidate is kept):

    π(y) = (1 − (1 − ā)^N) · π*(y) + (1 − ā)^{N−1} · π_ref(y) · (1 − a(y)),   ā = E_{π_ref}[a] = Z·exp(−r_max/β).

It is exactly π* when r_max bounds the reward and N → ∞ (von Neumann's rejection sampling).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor

__all__ = ["best_of_n_law", "bon_kl_bound", "bon_kl_estimate", "bon_win_rate_bound", "kl", "levels",
           "rejection_law", "reward_cdf", "soft_best_of_n_law", "tilted_law", "tv", "win_rate",
           "worst_of_n_law"]


def _check(ref: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    ref, rewards = torch.as_tensor(ref, dtype=torch.float64), torch.as_tensor(rewards, dtype=torch.float64)
    if ref.dim() != 1 or ref.shape != rewards.shape:
        raise ValueError(f"laws: ref and rewards must both be (K,), got {tuple(ref.shape)} and {tuple(rewards.shape)}")
    if (ref < 0).any() or abs(float(ref.sum()) - 1.0) > 1e-6:
        raise ValueError(f"laws: ref must be a probability vector (non-negative, sum 1), sums to {float(ref.sum())}")
    return ref, rewards


def reward_cdf(ref: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(F, F⁻), each (K,): the reference mass of outcomes with reward ≤ (resp. <) each outcome's reward."""
    ref, rewards = _check(ref, rewards)
    sorted_r, order = torch.sort(rewards)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), ref[order].cumsum(0)])  # cum[i] = mass of the i lowest
    le = torch.searchsorted(sorted_r, rewards, right=True)  # how many rewards are ≤ each
    lt = torch.searchsorted(sorted_r, rewards, right=False)
    return cum[le], cum[lt]


def best_of_n_law(ref: Tensor, rewards: Tensor, n: int) -> Tensor:
    """(K,) the law of the best of ``n`` i.i.d. reference draws: π_ref(y)/m(y)·(F(y)^n − F⁻(y)^n) (module
    docstring). Example: ref = (½, ½), rewards (0, 1), n = 2 → (¼, ¾)."""
    F, Fm = reward_cdf(ref, rewards)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    mass = F - Fm
    return torch.where(ref > 0, ref / mass.clamp_min(1e-300) * (F ** n - Fm ** n), torch.zeros_like(ref))


def worst_of_n_law(ref: Tensor, rewards: Tensor, n: int) -> Tensor:
    """(K,) the law of the worst of ``n`` reference draws (best-of-n of the negated reward)."""
    return best_of_n_law(ref, -torch.as_tensor(rewards, dtype=torch.float64), n)


def tilted_law(ref: Tensor, rewards: Tensor, beta: float) -> tuple[Tensor, float]:
    """π* = π_ref·exp(r/β)/Z, the maximizer of E_π[r] − β·KL(π‖π_ref), and log Z (Korbak et al. 2022,
    "RL with KL penalties is better viewed as Bayesian inference", Findings of EMNLP)."""
    ref, rewards = _check(ref, rewards)
    logits = torch.where(ref > 0, ref.log() + rewards / beta, torch.full_like(ref, -math.inf))
    log_z = float(torch.logsumexp(logits, 0))
    return (logits - log_z).exp(), log_z


def levels(ref: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct reward values of the outcomes with positive reference mass: (values (L,), masses (L,), the level
    of each outcome (K,), −1 where ref is 0)."""
    ref, rewards = _check(ref, rewards)
    pos = ref > 0
    values, inverse = torch.unique(rewards[pos], return_inverse=True)
    masses = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ref[pos])
    level = torch.full(ref.shape, -1, dtype=torch.long)
    level[pos] = inverse
    return values, masses, level


@functools.lru_cache(maxsize=32)
def _compositions(total: int, parts: int) -> Tensor:
    """(C, parts) every vector of non-negative ints summing to ``total`` (stars and bars), C = C(total+parts−1,
    parts−1)."""
    rows = []
    for bars in itertools.combinations(range(total + parts - 1), parts - 1):
        edges = (-1, *bars, total + parts - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(parts)])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, parts)


def soft_best_of_n_law(ref: Tensor, rewards: Tensor, n: int, tau: float) -> Tensor:
    """(K,) the exact law of soft best-of-``n`` at temperature ``tau`` (keep candidate i with probability
    softmax(r/τ)_i): N·π_ref(y)·E[w(y)/(w(y) + S_{N−1})] by enumerating the counts of the other N − 1 draws over the
    reward levels (C(N+L−2, L−1) count vectors for L levels). ``tau = inf``: π_ref; ``tau = 0``: best-of-n (its
    limit). The ratio is formed in log space, so a tiny τ does not divide 0 by 0."""
    ref, rewards = _check(ref, rewards)
    if n < 1 or not tau >= 0:
        raise ValueError(f"soft_best_of_n_law: need n ≥ 1 and tau ≥ 0, got n={n}, tau={tau}")
    if tau == 0:
        return best_of_n_law(ref, rewards, n)
    values, masses, level = levels(ref, rewards)
    logw = torch.zeros_like(values) if math.isinf(tau) else values / tau
    counts = _compositions(n - 1, len(values)).to(torch.float64)  # (C, L)
    log_prob = (math.lgamma(n) - torch.lgamma(counts + 1).sum(-1) + (counts * masses.log()).sum(-1))  # (C,)
    # E[w_l / (w_l + S)] = E[σ(−log Σ_j c_j exp(logw_j − logw_l))] for each level l, the sum in log space
    # (an empty count gives −inf, so 0 · exp(huge) never appears).
    log_rel = logw[None, :] - logw[:, None]  # [l, j]
    log_s = torch.logsumexp(counts.log()[:, None, :] + log_rel[None], -1)  # (C, L)
    ratio = torch.sigmoid(-log_s)
    expect = (log_prob.exp()[:, None] * ratio).sum(0)  # (L,)
    out = torch.zeros_like(ref)
    pos = level >= 0
    out[pos] = n * ref[pos] * expect[level[pos]]
    return out


def rejection_law(ref: Tensor, rewards: Tensor, n: int, beta: float, reward_max: float) -> Tensor:
    """(K,) the law of rejection sampling toward π* over ``n`` candidates with acceptance exp((r − r_max)/β) and
    the first candidate kept when none is accepted (module docstring). ``reward_max`` must bound the rewards."""
    ref, rewards = _check(ref, rewards)
    if float(rewards[ref > 0].max()) > reward_max:
        raise ValueError(f"rejection_law: reward_max={reward_max} is below the largest reward "
                         f"{float(rewards[ref > 0].max())}")
    accept = ((rewards - reward_max) / beta).exp()
    a_bar = float((ref * accept).sum())
    star, _ = tilted_law(ref, rewards, beta)
    return (1 - (1 - a_bar) ** n) * star + (1 - a_bar) ** (n - 1) * ref * (1 - accept)


def kl(p: Tensor, q: Tensor) -> float:
    """KL(p‖q) = Σ p log(p/q) in nats (0·log 0 = 0; +inf where p > 0 = q)."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    pos = p > 0
    if (q[pos] <= 0).any():
        return math.inf
    return float((p[pos] * (p[pos].log() - q[pos].log())).sum())


def tv(p: Tensor, q: Tensor) -> float:
    """Total variation ½ Σ |p − q|."""
    return 0.5 * float((torch.as_tensor(p, dtype=torch.float64) - torch.as_tensor(q, dtype=torch.float64)).abs().sum())


def win_rate(policy: Tensor, ref: Tensor, rewards: Tensor) -> float:
    """P(r(y) > r(y')) + ½·P(r(y) = r(y')) for y ~ ``policy``, y' ~ π_ref independent: Σ_y π(y)(F⁻(y) + ½m(y)).
    ½ for π = π_ref."""
    F, Fm = reward_cdf(ref, rewards)
    return float((torch.as_tensor(policy, dtype=torch.float64) * (Fm + 0.5 * (F - Fm))).sum())


def bon_kl_bound(n: int) -> float:
    """log n − (n − 1)/n: the KL of best-of-n when the reward's law under π_ref has no atoms, and an upper bound on
    it otherwise (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
    arXiv:2401.01879 — the abstract's claim; it is not the KL in general)."""
    return math.log(n) - (n - 1) / n


def bon_win_rate_bound(n: int) -> float:
    """n/(n + 1): the win rate of best-of-n against π_ref for an atomless reward law, an upper bound otherwise
    (Beirami et al. 2024, abstract)."""
    return n / (n + 1)


def bon_kl_estimate(eps: Tensor, n: int) -> Tensor:
    """Beirami et al. (2024)'s KL estimator at the reference probability ε = π_ref(y|x) of a best-of-n output y:

        KL̂(ε; n) = (1−ε)^n·[log n + (n−1)·log(1−ε) − (n−1)/n] + (1 − (1−ε)^n)·log((1 − (1−ε)^n)/ε)

    It is the exact KL of best-of-n when π_ref is an atom of mass ε at the top reward plus an atomless remainder:
    the remainder contributes (1−ε)^n times the atomless KL shifted by (n−1)·log(1−ε), the atom gets best-of-n mass
    1 − (1−ε)^n (``tests/inference/test_laws.py`` converges to it by enumeration). 0 ≤ KL̂ ≤ log n − (n−1)/n,
    KL̂ → the bound as ε → 0, KL̂(1) = 0, KL̂ = 0 at n = 1. Computed with log1p/expm1, so tiny ε (a sequence
    probability) keeps its precision. Shape: as ``eps``; float64."""
    eps = torch.as_tensor(eps, dtype=torch.float64)
    if ((eps <= 0) | (eps > 1)).any():
        raise ValueError("bon_kl_estimate: ε must be in (0, 1]")
    log1m = torch.log1p(-eps)  # −inf at ε = 1
    rest = torch.exp(n * log1m)  # (1−ε)^n
    top = -torch.expm1(n * log1m)  # 1 − (1−ε)^n
    first = torch.where(rest > 0, rest * (math.log(n) + (n - 1) * log1m.clamp_min(-1e300) - (n - 1) / n),
                        torch.zeros_like(eps))
    return first + top * (top.log() - eps.log())
