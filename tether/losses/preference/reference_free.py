"""Reference-free objectives (SimPO, ORPO): the reference arguments are accepted and ignored. See
``tether.losses.preference`` for the shared notation and calling convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.losses.preference._common import PreferenceLossOutput, _log1mexp, _per_token, _require


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
) -> PreferenceLossOutput:
    """SimPO: length-normalized, reference-free margin with a target reward margin γ.

    Equation::

        L = softplus(−[β·LP_θ(y_w)/|y_w| − β·LP_θ(y_l)/|y_l| − γ]),   γ = gamma_beta_ratio·β

    Paper: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.

    Defaults, as checked via the code index: the official repo (princeton-nlp/SimPO
    ``scripts/simpo_config.py``) ships ``beta=2.0, gamma_beta_ratio=0.25`` (γ = 0.5) and its loss is
    ``−logσ(β·(Δm − gamma_beta_ratio))``. TRL's ``CPOTrainer`` (``loss_type="simpo"``) instead has
    ``beta=0.1`` and ``simpo_gamma=0.5``, where ``simpo_gamma`` is γ itself (it divides by β inside). Both
    give γ = 0.5 at their defaults; we take the official β = 2.0 and ratio 0.25. The README suggests tuning
    the ratio in {0.25, 0.3, 0.4} (and larger β, e.g. 10, has been reported better).

    Shape: the policy log-probs (sums) and ``chosen_lengths``/``rejected_lengths`` are ``(B,)``; outputs
    ``(B,)``. ``ref_chosen_logps``/``ref_rejected_logps`` are ignored (accepted, may be None) for a uniform
    signature.

    Implicit regularizer: none (no reference; only the target margin and length normalization constrain the
    policy). Logged reward ``β·LP_θ(y)/|y|``, detached (as the official code). Stop-gradient: none.
    Departures: no label smoothing / hinge switches and no SFT term (``sft_weight=0`` in the official config).
    """
    what = "number of response tokens, (B,)"
    chosen_mean = _per_token(policy_chosen_logps, _require(chosen_lengths, "chosen_lengths", "simpo", what))
    rejected_mean = _per_token(
        policy_rejected_logps, _require(rejected_lengths, "rejected_lengths", "simpo", what)
    )
    chosen_reward, rejected_reward = beta * chosen_mean, beta * rejected_mean
    loss = F.softplus(-(chosen_reward - rejected_reward - gamma_beta_ratio * beta))
    return PreferenceLossOutput(loss, chosen_reward.detach(), rejected_reward.detach())


def orpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """ORPO: SFT on the chosen response plus an odds-ratio preference term, no reference.

    Equation::

        m(y)       = LP_θ(y)/|y|                               (mean per-token log-prob)
        log odds(y) = m(y) − log(1 − exp(m(y)))
        L = −m(y_w) + λ·softplus(−[log odds(y_w) − log odds(y_l)])

    Paper: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    Eq. 4 (odds), Eq. 6 (L_SFT + λ·L_OR) and Eq. 7 (L_OR) — TRL cites "Eqs. (4) and (7)" for the odds-ratio
    term; the paper's §4.1 text numbers the combined objective Eq. 6 (read as quoted at
    deepnlp.org/equation/odds-ratio-preference-optimization-orpo, not in the PDF itself).

    Checked against TRL's ``ORPOTrainer`` (via the code index): ``log odds`` with ``log1p(−exp(m))``, mean
    per-token log-probs (``average_log_prob=True``), loss ``nll − mean(β·logσ(·))`` with ``beta=0.1`` playing
    λ, rewards ``β·m(y)``.

    Shape: the policy log-probs (sums) and ``chosen_lengths``/``rejected_lengths`` are ``(B,)``; outputs
    ``(B,)``. ``ref_chosen_logps``/``ref_rejected_logps`` are ignored (accepted, may be None).

    Args:
        beta: λ, the weight of the odds-ratio term (0.1, TRL's default; the paper's name is λ).

    Numerics: ``log(1 − e^m)`` uses the two-branch ``log1mexp`` (``log(−expm1(m))`` near 0); ``m`` is clamped
    to ``≤ −eps(dtype)`` so a sequence with probability 1 gives huge but finite odds (zero gradient there).
    Implicit regularizer: none (no reference; the SFT term anchors the policy). Logged reward ``β·m(y)``,
    detached (as TRL). Stop-gradient: none.
    Departures: the NLL is the chosen response's own mean log-prob, averaged over examples by the recipe; TRL
    takes a token mean over the whole batch (and older TRL versions included prompt tokens in it).
    """
    what = "number of response tokens, (B,)"
    chosen_mean = _per_token(policy_chosen_logps, _require(chosen_lengths, "chosen_lengths", "orpo", what))
    rejected_mean = _per_token(
        policy_rejected_logps, _require(rejected_lengths, "rejected_lengths", "orpo", what)
    )
    tiny = torch.finfo(chosen_mean.dtype).eps
    chosen_safe, rejected_safe = chosen_mean.clamp(max=-tiny), rejected_mean.clamp(max=-tiny)
    log_odds_ratio = (chosen_safe - _log1mexp(chosen_safe)) - (rejected_safe - _log1mexp(rejected_safe))
    loss = -chosen_mean + beta * F.softplus(-log_odds_ratio)
    return PreferenceLossOutput(loss, beta * chosen_mean.detach(), beta * rejected_mean.detach())
