"""The inference-time methods by name, each a function over :class:`~tether.inference.candidates.Candidates` that
returns what it kept and how far that moved from π_ref.

``METHODS[name](cands, n, generator=..., **params) -> MethodResult`` runs the method on the first ``n`` candidates of
every prompt (so one set of candidates drawn at the largest N serves every smaller N: the first n of N i.i.d. draws
are n i.i.d. draws). The KL figures, win rate and effective sample size are defined in
``tether.inference.accounting``.

``score_transform`` (``tether.inference.transforms``: calibrate, ctrl_bon, ctrl_won, vbon) replaces each candidate's
reward by its transform against the prompt's n candidates — themselves π_ref draws — before selecting; the rewards
reported stay the raw ones. Best-/worst-of-N are unchanged by it (the transforms are non-decreasing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tether.inference import laws
from tether.inference.accounting import (
    KLFigure,
    kish_ess,
    level_plugin_kl,
    selection_bound,
    summarize_values,
    win_rate_vs_base,
)
from tether.inference.candidates import Candidates
from tether.inference.select import (
    Selection,
    best_of_n,
    rejection_sampling,
    soft_best_of_n,
    tilted_resampling,
    worst_of_n,
)
from tether.inference.transforms import transform_rewards

__all__ = ["METHODS", "MethodResult", "best_of_n_method", "plain_method", "qprobe_method", "rejection_method",
           "soft_best_of_n_method", "tilted_method", "worst_of_n_method"]


@dataclass(frozen=True)
class MethodResult:
    """What one method kept on P prompts, with its figures."""

    method: str
    n: int
    params: dict
    selection: Selection
    reward: Tensor
    """(P,) float64: raw reward of the kept completion (NaN where the reward had no opinion)."""
    win_rate: Tensor
    """(P,) against the prompt's base draws, ties ½ (NaN without base draws)."""
    ess: Tensor
    """(P,) Kish effective sample size (``tether.inference.accounting``)."""
    kl: dict[str, KLFigure] = field(default_factory=dict)

    def kept(self, cands: Candidates) -> list[int]:
        """Positions in ``cands.done`` of the kept completions, one per prompt."""
        return [cands.flat(i, int(j)) for i, j in enumerate(self.selection.index)]

    def summary(self) -> dict:
        sel = self.selection
        return {"method": self.method, "n": self.n, **self.params,
                "reward": summarize_values(self.reward), "win_rate": summarize_values(self.win_rate),
                "ess": summarize_values(self.ess), "kl": {k: f.summary() for k, f in self.kl.items()},
                "accepted": int(sel.accepted.sum()), "no_opinion_prompts": int(sel.no_opinion.sum()),
                "prompts": len(sel.index)}


def _scores(cands: Candidates, n: int, transform: str, transform_args: dict) -> Tensor:
    raw = cands.rewards[:, :n]
    if transform == "none":
        return raw
    out = raw.clone()
    for i in range(cands.prompts):  # each prompt against its own candidates (scored ones only)
        table = raw[i][cands.scored[i, :n]]
        if len(table):
            out[i] = transform_rewards(transform, raw[i], table, **transform_args)
    return out


def _result(name: str, cands: Candidates, n: int, params: dict, sel: Selection, ess: Tensor,
            kl: dict[str, KLFigure]) -> MethodResult:
    P = cands.prompts
    rows = torch.arange(P)
    reward = cands.rewards[rows, sel.index]
    scored = cands.scored[rows, sel.index]
    reward = torch.where(scored, reward, torch.full_like(reward, math.nan))
    base = slice(cands.n, cands.n + cands.m)
    win = win_rate_vs_base(cands.rewards[rows, sel.index], scored, cands.rewards[:, base], cands.scored[:, base])
    return MethodResult(name, n, params, sel, reward, win, ess, kl)


def _reference_draws(cands: Candidates) -> tuple[Tensor, Tensor]:
    """Every π_ref draw of each prompt (all candidates and base draws) for the plug-in."""
    return cands.rewards, cands.scored


def _selection_figure(sel: Selection, extra: str = "") -> KLFigure:
    return KLFigure(selection_bound(sel.probs), "bound",
                    "log N − H(p) of the selection probabilities p over the N candidates: an upper bound on the "
                    "KL in expectation (data-processing inequality)" + extra)


def _plugin_figure(cands: Candidates, law: Callable) -> KLFigure:
    r, s = _reference_draws(cands)
    return KLFigure(level_plugin_kl(r, s, law), "plug-in",
                    "the method's exact law on the empirical reward-level law of the prompt's N+M reference draws "
                    "(prompts with > 8 distinct rewards: not applicable)")


def plain_method(cands: Candidates, n: int = 1, *, generator: torch.Generator | None = None) -> MethodResult:
    """A plain sample: candidate 0. KL 0 exactly."""
    P = cands.prompts
    probs = torch.zeros(P, 1, dtype=torch.float64)
    probs[:, 0] = 1.0
    none = ~cands.scored[:, 0]
    sel = Selection(torch.zeros(P, dtype=torch.long), probs, torch.ones(P, dtype=torch.bool), none)
    kl = {"exact": KLFigure(torch.zeros(P, dtype=torch.float64), "exact", "plain sampling is π_ref itself")}
    return _result("plain", cands, 1, {}, sel, torch.ones(P, dtype=torch.float64), kl)


def _bon_like(name: str, rule, law, cands: Candidates, n: int, generator) -> MethodResult:
    sel = rule(cands.rewards[:, :n], cands.scored[:, :n], generator=generator)
    P = cands.prompts
    eps = cands.seq_logprob[torch.arange(P), sel.index].exp().clamp(1e-300, 1.0)
    kl = {
        "beirami_estimate": KLFigure(laws.bon_kl_estimate(eps, n), "estimate",
                                     "Beirami et al. (2024) KL̂(ε; N) at ε = π_ref(y|x), the kept completion's "
                                     "sequence probability (blind to ties in the reward)"),
        "bound": KLFigure(torch.full((P,), laws.bon_kl_bound(n), dtype=torch.float64), "bound",
                          "log N − (N−1)/N: an upper bound, exact only for an atomless reward law (Beirami et al. "
                          "2024)"),
        "selection_bound": _selection_figure(sel, "; log(N / #tied best) here"),
        "reward_level_plugin": _plugin_figure(cands, lambda p, v: law(p, v, n)),
    }
    return _result(name, cands, n, {}, sel, (sel.probs > 0).sum(-1).double(), kl)


def best_of_n_method(cands: Candidates, n: int, *, generator: torch.Generator | None = None) -> MethodResult:
    """Best-of-n by the reward."""
    return _bon_like("best_of_n", best_of_n, laws.best_of_n_law, cands, n, generator)


def worst_of_n_method(cands: Candidates, n: int, *, generator: torch.Generator | None = None) -> MethodResult:
    """Worst-of-n by the reward."""
    return _bon_like("worst_of_n", worst_of_n, laws.worst_of_n_law, cands, n, generator)


def soft_best_of_n_method(cands: Candidates, n: int, *, tau: float, transform: str = "none",
                          transform_args: dict | None = None,
                          generator: torch.Generator | None = None) -> MethodResult:
    """Soft best-of-n at temperature τ on the (transformed) reward."""
    sel = soft_best_of_n(_scores(cands, n, transform, transform_args or {}), tau, cands.scored[:, :n],
                         generator=generator)
    kl = {"selection_bound": _selection_figure(sel)}
    if transform == "none":
        kl["reward_level_plugin"] = _plugin_figure(cands, lambda p, v: laws.soft_best_of_n_law(p, v, n, tau))
    return _result("soft_best_of_n", cands, n, {"tau": tau, "transform": transform}, sel, kish_ess(sel.probs), kl)


def tilted_method(cands: Candidates, n: int, *, beta: float, transform: str = "none",
                  transform_args: dict | None = None, generator: torch.Generator | None = None) -> MethodResult:
    """Self-normalized importance resampling toward π* ∝ π_ref·exp(r/β) (``select.tilted_resampling``)."""
    sel = tilted_resampling(_scores(cands, n, transform, transform_args or {}), beta, cands.scored[:, :n],
                            generator=generator)
    kl = {"selection_bound": _selection_figure(sel, "; also the self-normalized estimate of KL(π*‖π_ref)")}
    if transform == "none":
        kl["reward_level_plugin"] = _plugin_figure(cands, lambda p, v: laws.soft_best_of_n_law(p, v, n, beta))
    return _result("tilted", cands, n, {"beta": beta, "transform": transform}, sel, kish_ess(sel.probs), kl)


def rejection_method(cands: Candidates, n: int, *, beta: float, reward_max: float | None, transform: str = "none",
                     transform_args: dict | None = None,
                     generator: torch.Generator | None = None) -> MethodResult:
    """Rejection sampling toward π* over the n candidates (``select.rejection_sampling``)."""
    scores = _scores(cands, n, transform, transform_args or {})
    sel = rejection_sampling(scores, beta, reward_max, cands.scored[:, :n], generator=generator)
    kl = {"selection_bound": _selection_figure(sel)}
    if transform == "none" and reward_max is not None:
        kl["reward_level_plugin"] = _plugin_figure(
            cands, lambda p, v: laws.rejection_law(p, v, n, beta, reward_max))
    tilt = (scores / beta).masked_fill(~cands.scored[:, :n], -math.inf).softmax(-1).nan_to_num(0.0)
    return _result("rejection", cands, n, {"beta": beta, "reward_max": reward_max, "transform": transform}, sel,
                   kish_ess(tilt), kl)


def qprobe_method(cands: Candidates, n: int, *, q: Tensor, tau: float,
                  generator: torch.Generator | None = None) -> MethodResult:
    """Keep one of the n candidates with probability softmax(Q/τ) (``tether.inference.qprobe``); ``q`` (P, ≥ n)
    the probe's values of the candidates."""
    from tether.inference.qprobe import qprobe_select

    sel = qprobe_select(q[:, :n], tau, generator=generator)
    kl = {"selection_bound": _selection_figure(sel)}
    return _result("qprobe", cands, n, {"tau": tau}, sel, kish_ess(sel.probs), kl)


METHODS: dict[str, Callable[..., MethodResult]] = {
    "plain": plain_method, "best_of_n": best_of_n_method, "worst_of_n": worst_of_n_method,
    "soft_best_of_n": soft_best_of_n_method, "tilted": tilted_method, "rejection": rejection_method,
    "qprobe": qprobe_method}
