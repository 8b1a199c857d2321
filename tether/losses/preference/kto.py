"""KTO on paired data, with its reference point estimated on mismatched pairs. See ``tether.losses.preference`` for the
shared notation and calling convention."""

from __future__ import annotations

import torch
from torch import Tensor

from tether.losses.preference._common import PreferenceLossOutput, _log_ratios, _require


def kto(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    kl_reference: Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLossOutput:
    """KTO on paired data: chosen = desirable, rejected = undesirable.

    Equation::

        z = max(0, sg(KL̂(π_θ ‖ π_ref)))                          # the reference point
        L = λ_D·(1 − σ(β·(ρ(y_w) − z))) + λ_U·(1 − σ(β·(z − ρ(y_l))))

    computed as ``λ_D·σ(−β(ρ_w − z)) + λ_U·σ(−β(z − ρ_l))`` (``1 − σ(x) = σ(−x)``, no cancellation).

    Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7 (the paper
    writes ``λ_y − v(x, y)``; λ_D = λ_U = 1 makes that equal to the form above). Checked against TRL's
    ``KTOTrainer.kto_loss`` (via the code index): same per-side losses, ``kl`` = batch mean of mismatched-pair
    log-ratios, detached, clamped ≥ 0; rewards ``β·ρ``.

    Shape: inputs ``(B,)``; ``kl_reference`` a scalar (0-dim tensor or float) — the caller's estimate of
    ``KL(π_θ ‖ π_ref)``, e.g. the batch mean of ``LP_θ(y') − LP_ref(y')`` over responses ``y'`` paired with
    other prompts; outputs ``(B,)``.

    Args:
        kl_reference: the reference point before clamping; detached and clamped at 0 here.
        beta: β (0.1, TRL's default).
        desirable_weight: λ_D (1.0, TRL's default).
        undesirable_weight: λ_U (1.0, TRL's default; the paper recommends λ_D·n_D/(λ_U·n_U) ∈ [1, 4/3]).

    Implicit regularizer: none at the optimum. The loss is a bounded sigmoid of ``β(ρ − z)``: on a two-response
    bandit with preference probability p > ½ the expected loss is ``1 + (1 − 2p)(σ(u_w) − σ(u_l))``, strictly
    decreasing toward the deterministic policy on the preferred response — there is no interior, KL-regularized
    optimum like DPO's ``π_ref·e^{r/β}`` (``tests/losses/test_preference_oracles.py``). The reference and z only set
    where the sigmoids saturate, i.e. how fast the gradient fades as ρ grows. Logged reward ``β·ρ``.
    Stop-gradient: ``kl_reference`` (as TRL and the paper).
    Departures: paired data only; per-example loss = desirable + undesirable terms, so the recipe's mean over
    B pairs is TWICE TRL's value, which averages over the 2B concatenated single-response examples.
    """
    kl = _require(kl_reference, "kl_reference", "kto", "a scalar estimate of KL(π_θ ‖ π_ref)")
    chosen_ratio, rejected_ratio = _log_ratios(
        "kto", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = torch.as_tensor(kl, dtype=chosen_ratio.dtype, device=chosen_ratio.device).detach().clamp(min=0)
    loss = desirable_weight * torch.sigmoid(-beta * (chosen_ratio - z)) + undesirable_weight * torch.sigmoid(
        -beta * (z - rejected_ratio)
    )
    return PreferenceLossOutput(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
