"""KL to the base policy, effective sample size and win rate of a selection, each with how it was obtained.

Every method of ``tether.inference`` draws N candidates i.i.d. from π_ref and keeps one with probabilities p_1…p_N
that depend on the candidates. The KL figures a method reports (each a per-prompt value, labelled by kind):

* ``exact`` — known in closed form (plain sampling: 0).
* ``beirami_estimate`` (best-/worst-of-N) — Beirami et al. 2024 (arXiv:2401.01879), §4's estimator KL̂(ε; N) at
  ε = π_ref(y|x) of the kept completion (``tether.inference.laws.bon_kl_estimate``). It models the reference as
  "the kept outcome's atom plus an atomless rest", so with a sequence probability ε ≈ 0 it is close to the bound;
  it does not see ties in the reward (a rule reward puts many sequences on one reward level), which only lower the
  KL — read ``reward_level_plugin`` there.
* ``bound`` (best-/worst-of-N) — log N − (N−1)/N, the value often quoted as the KL of best-of-N; it is an upper
  bound (exact only for an atomless reward law; same paper).
* ``selection_bound`` (every stochastic rule) — log N − H(p), averaged over prompts. By the data-processing
  inequality it bounds the KL in expectation: the kept outcome is a function of the pair (candidates, index), and
  KL of that pair's law against "the same candidates, index uniform" (whose kept outcome is exactly π_ref) is
  E[Σ_i p_i log(N·p_i)] = E[log N − H(p)]. For tilted resampling (p_i = w_i/Σw, w = exp(r/β)) the same number is
  Σ_i p_i·r_i/β − log((1/N)·Σ_i w_i), the self-normalized importance-sampling estimate of KL(π*‖π_ref), consistent
  as N → ∞. For best-of-N it is log N minus the log of the number of tied best.
* ``reward_level_plugin`` (rules that read only the reward) — the exact KL of the method's law computed on the
  empirical reward-level law of the prompt's N + M reference draws (``tether.inference.laws``): when the selection
  depends only on rewards, KL(π_out‖π_ref) equals the KL between the reward-level laws. A plug-in: biased where
  levels are rare or unseen (low for continuous rewards, where every draw is its own level); reported when a
  prompt has at most ``max_levels`` distinct rewards, None otherwise.

Win rate: the kept completion against the prompt's M independent base draws, ties ½ (unbiased for
P(r(y) > r(y')) + ½·P(=), y' ~ π_ref). ESS: Kish's 1/Σ p_i² of the selection probabilities (for rejection
sampling, of the tilted weights exp(r/β)/Σ: how many of the N draws effectively serve π*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.inference import laws
from tether.stats import mean_ci95

__all__ = ["KLFigure", "kish_ess", "level_plugin_kl", "selection_bound", "summarize_values", "win_rate_vs_base"]

KINDS = ("exact", "estimate", "bound", "plug-in")


@dataclass(frozen=True)
class KLFigure:
    """One KL(π_method ‖ π_ref) figure, per prompt, with what it is."""

    values: Tensor
    """(P,) float64 nats; NaN where the figure does not apply to a prompt (counted in the summary)."""
    kind: str
    """'exact', 'estimate', 'bound' or 'plug-in'."""
    how: str
    """How it was obtained, in one sentence."""

    def summary(self) -> dict:
        return {**summarize_values(self.values), "kind": self.kind, "how": self.how}


def summarize_values(values: Tensor) -> dict:
    """Mean over the finite entries with a 95% CI, and how many were left out as not applicable."""
    v = [float(x) for x in values.tolist() if math.isfinite(float(x))]
    if not v:
        return {"mean": None, "ci95": None, "n": 0, "not_applicable": len(values)}
    mean, half = mean_ci95(v)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(v), "not_applicable": len(values) - len(v)}


def selection_bound(probs: Tensor) -> Tensor:
    """(P,) log N − H(p) for selection probabilities (P, N) (module docstring)."""
    p = probs.double()
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return math.log(p.shape[-1]) + plogp.sum(-1)


def kish_ess(weights: Tensor) -> Tensor:
    """(P,) (Σw)²/Σw² of non-negative weights (P, N): N for equal weights, 1 for a single one."""
    w = weights.double()
    return w.sum(-1) ** 2 / (w ** 2).sum(-1)


def win_rate_vs_base(chosen: Tensor, chosen_scored: Tensor, base: Tensor, base_scored: Tensor) -> Tensor:
    """(P,) mean over the scored base draws of 1{r > r'} + ½·1{r = r'}; NaN without a scored base draw or without a
    scored kept completion. ``chosen`` (P,), ``base`` (P, M)."""
    gt = (chosen[:, None] > base).double()
    eq = (chosen[:, None] == base).double()
    k = base_scored.sum(-1)
    win = ((gt + 0.5 * eq) * base_scored).sum(-1) / k.clamp_min(1)
    return torch.where((k > 0) & chosen_scored, win, torch.full_like(win, math.nan))


def level_plugin_kl(rewards: Tensor, scored: Tensor, law, *, max_levels: int = 8) -> Tensor:
    """(P,) KL(law(p̂, levels) ‖ p̂) with p̂ the empirical law of each prompt's scored reference rewards
    (``rewards`` (P, K) — every reference draw of the prompt) over its distinct values, and ``law(ref, values)``
    the method's exact law on those levels (e.g. ``lambda p, v: laws.best_of_n_law(p, v, n)``). NaN for a prompt
    with more than ``max_levels`` levels or no scored draw."""
    out = torch.full((rewards.shape[0],), math.nan, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        r = rewards[i][scored[i]]
        if len(r) == 0:
            continue
        values, counts = torch.unique(r, return_counts=True)
        if len(values) > max_levels:
            continue
        p_hat = counts.double() / counts.sum()
        out[i] = max(laws.kl(law(p_hat, values), p_hat), 0.0)  # KL ≥ 0; a law equal to p̂ can round to −1e-17
    return out
