"""Token-level KL and risk variants (TDPO 1/2, Ra-DPO); they need the full-vocabulary reference online. See
``tether.losses.preference`` for the shared notation and calling convention."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tether.losses.preference._common import PreferenceLossOutput, _log_ratios, _require


def _sequential_margin(
    chosen_ratio: Tensor,
    rejected_ratio: Tensor,
    chosen_term: Tensor,
    rejected_term: Tensor,
    variant: int,
    alpha: float,
) -> Tensor:
    """TDPO/Ra-DPO margin ``z``. Variant 1: α = 1, no stop-gradient; variant 2: α, sg on the chosen term."""
    if variant == 1:
        return chosen_ratio - rejected_ratio - (rejected_term - chosen_term)
    return chosen_ratio - rejected_ratio - alpha * (rejected_term - chosen_term.detach())


def _check_variant(variant: int, objective: str) -> None:
    if variant not in (1, 2):
        raise ValueError(f"{objective}: variant must be 1 or 2, got {variant!r}.")


def tdpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_seq_kl: Tensor | None = None,
    rejected_seq_kl: Tensor | None = None,
    variant: int = 2,
    alpha: float = 0.5,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """TDPO (token-level DPO), variants TDPO1 and TDPO2.

    Equation::

        SeqKL(y) = Σ_{t∈resp} KL(π_ref(·|s_t) ‖ π_θ(·|s_t))          # reference FIRST
        TDPO1:  z = ρ(y_w) − ρ(y_l) − [SeqKL(y_l) − SeqKL(y_w)]
        TDPO2:  z = ρ(y_w) − ρ(y_l) − α·[SeqKL(y_l) − sg(SeqKL(y_w))]
        L = softplus(−β·z)

    β multiplies the whole ``z``, so the KL term carries ``α·β``.

    Paper: Zeng et al. 2024, "Token-level Direct Preference Optimization" (ICML), arXiv:2404.11999, Eq. 19 (TDPO1) and
    Eq. 20 (TDPO2) [equation numbers UNVERIFIED]; matches the official ``tdpo_loss`` (Vance0124/Token-level-Direct-
    Preference-Optimization @ 2a736ec, ``trainers.py``).

    Shape: the four log-prob inputs and ``chosen_seq_kl``/``rejected_seq_kl`` are ``(B,)`` (token SUMS over
    the response); outputs ``(B,)``. ``SeqKL`` needs the policy's and the reference's full-vocabulary
    distributions at every response position, so the reference must run online (``LossSpec.full_vocab``).

    Args:
        variant: 2 (default, as the README recommends and the loss function's own default) or 1.
        alpha: α, weight of the sequential-KL term in TDPO2 (0.5, README/config); ignored by TDPO1.
        beta: β (0.1, README/config).

    Stop-gradient: TDPO2 detaches ONLY the chosen SeqKL; TDPO1 detaches nothing.
    Implicit regularizer: token-level (sequential) forward KL ``KL(π_ref ‖ π_θ)`` per step, on top of the
    reverse-KL-derived log-ratio. Logged reward (as the official code): ``β·(ρ(y) + SeqKL(y))``, detached.
    Departures: none in the loss; the official code sums the batch, we return per-example losses.
    """
    _check_variant(variant, "tdpo")
    what = "Σ_t KL(π_ref(·|s_t) ‖ π_θ(·|s_t)) over response tokens, (B,)"
    chosen_kl = _require(chosen_seq_kl, "chosen_seq_kl", "tdpo", what)
    rejected_kl = _require(rejected_seq_kl, "rejected_seq_kl", "tdpo", what)
    chosen_ratio, rejected_ratio = _log_ratios(
        "tdpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = _sequential_margin(chosen_ratio, rejected_ratio, chosen_kl, rejected_kl, variant, alpha)
    loss = F.softplus(-beta * z)
    return PreferenceLossOutput(
        loss,
        beta * (chosen_ratio + chosen_kl).detach(),
        beta * (rejected_ratio + rejected_kl).detach(),
    )


def tdpo1(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_seq_kl: Tensor | None = None,
    rejected_seq_kl: Tensor | None = None,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """TDPO1: :func:`tdpo` with ``variant=1`` (no α, no stop-gradient). See :func:`tdpo`."""
    return tdpo(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_seq_kl=chosen_seq_kl,
        rejected_seq_kl=rejected_seq_kl,
        variant=1,
        beta=beta,
    )


def tdpo2(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_seq_kl: Tensor | None = None,
    rejected_seq_kl: Tensor | None = None,
    alpha: float = 0.5,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """TDPO2: :func:`tdpo` with ``variant=2`` (α-weighted, sg on the chosen SeqKL). See :func:`tdpo`."""
    return tdpo(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_seq_kl=chosen_seq_kl,
        rejected_seq_kl=rejected_seq_kl,
        variant=2,
        alpha=alpha,
        beta=beta,
    )


def ra_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_seq_risk: Tensor | None = None,
    rejected_seq_risk: Tensor | None = None,
    variant: int = 1,
    alpha: float = 0.5,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """Ra-DPO (risk-aware DPO), variants Ra-DPO1 and Ra-DPO2: TDPO with the sequential KL replaced by a risk.

    Equation::

        d_v = log π_ref(v|s_t) − log π_θ(v|s_t),   q_t = Quantile_{1−c}({d_v}_v)
        R_t = Σ_v π_ref(v|s_t)·d_v·1[d_v > q_t],     SeqRisk(y) = Σ_{t∈resp} R_t
        Ra-DPO1: z = ρ(y_w) − ρ(y_l) − [SeqRisk(y_l) − SeqRisk(y_w)]
        Ra-DPO2: z = ρ(y_w) − ρ(y_l) − α·[SeqRisk(y_l) − sg(SeqRisk(y_w))]
        L = softplus(−β·z)

    Paper: "Risk-aware Direct Preference Optimization under Nested Risk Measure" (2025; read at abstract level
    only, authors/equation numbers [UNVERIFIED]); the loss is the official ``Ra_DPOTrainer.loss``
    (zlj123-max/Ra-DPO @ d6a10e3), re-read for this module: same margin, rewards ``β·(ρ + SeqRisk)``,
    ``losses.sum()`` over the batch.

    Shape: the four log-prob inputs and ``chosen_seq_risk``/``rejected_seq_risk`` are ``(B,)``; outputs
    ``(B,)``. ``SeqRisk`` needs full-vocabulary policy and reference distributions (``LossSpec.full_vocab``);
    computing it (quantile over the vocabulary, ``confidence_level`` c = 0.95) is the caller's job.

    Args:
        variant: 1 (default, ``if_ra_dpo2: false`` in the shipped config) or 2.
        alpha: α, weight of the risk term in Ra-DPO2 (0.5, config); ignored by Ra-DPO1.
        beta: β (0.1, config).

    Stop-gradient: Ra-DPO2 detaches only the chosen SeqRisk; Ra-DPO1 nothing.
    Implicit regularizer: a CVaR-style truncation of the token-level forward KL ``KL(π_ref ‖ π_θ)`` (only the
    upper tail of the per-vocabulary log-ratios); note ``R_t`` is NOT bounded by the full KL. Logged reward
    ``β·(ρ(y) + SeqRisk(y))``, detached (as the official code).
    Departures: per-example losses (the official code SUMS over the batch, so its effective learning rate
    scales with the batch size; our recipe means).
    """
    _check_variant(variant, "ra_dpo")
    what = "Σ_t R_t, the sequential CVaR risk over response tokens, (B,)"
    chosen_risk = _require(chosen_seq_risk, "chosen_seq_risk", "ra_dpo", what)
    rejected_risk = _require(rejected_seq_risk, "rejected_seq_risk", "ra_dpo", what)
    chosen_ratio, rejected_ratio = _log_ratios(
        "ra_dpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = _sequential_margin(chosen_ratio, rejected_ratio, chosen_risk, rejected_risk, variant, alpha)
    loss = F.softplus(-beta * z)
    return PreferenceLossOutput(
        loss,
        beta * (chosen_ratio + chosen_risk).detach(),
        beta * (rejected_ratio + rejected_risk).detach(),
    )
