"""Entropy-controlled (H-DPO) and long-context (LongPO) variants of DPO. See ``tether.losses.preference`` for the
shared notation and calling convention."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tether.losses.preference._common import PreferenceLossOutput, _require
from tether.losses.preference.dpo import dpo


def hdpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """H-DPO: DPO with the entropy part of the reverse KL scaled by α.

    Equation (the objective as the paper states it; the optimum and the loss follow as for DPO)::

        objective  max_π E_π[r] − β·[−α·H(π) + CE(π, π_ref)]
        optimum    π*(y) ∝ π_ref(y)^{1/α}·exp(r(y)/(αβ))
        L = softplus(−{αβ·[LP_θ(y_w) − LP_θ(y_l)] − β·[LP_ref(y_w) − LP_ref(y_l)]})

    Paper: Omura et al. 2024, "Entropy Controllable Direct Preference Optimization", arXiv:2411.07595 (no
    official code found; the loss is derived from the paper's stated objective and matches a third-party
    implementation).

    Shape: inputs ``(B,)``; outputs ``(B,)``.

    Args:
        alpha: α, the entropy coefficient; 1.0 is DPO (the third-party implementation's default); α < 1
            sharpens the optimal policy (mode seeking), α > 1 flattens it.
        beta: β, as DPO (0.1).

    Implicit regularizer: ``β·(CE(π, π_ref) − α·H(π))`` = reverse KL when α = 1. Logged reward
    ``αβ·LP_θ(y) − β·LP_ref(y)``, detached. Stop-gradient: none.
    Departures: summed log-probs as DPO [UNVERIFIED against the paper]. Unlike DPO the loss at ``π_θ = π_ref``
    is not log 2 unless ``LP_ref(y_w) = LP_ref(y_l)``: the margin is then
    ``(α − 1)·β·[LP_ref(y_w) − LP_ref(y_l)]``.
    """
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("hdpo needs the reference log-probs (3rd and 4th positional arguments); got None.")
    chosen_reward = alpha * beta * policy_chosen_logps - beta * ref_chosen_logps
    rejected_reward = alpha * beta * policy_rejected_logps - beta * ref_rejected_logps
    loss = F.softplus(-(chosen_reward - rejected_reward))
    return PreferenceLossOutput(loss, chosen_reward.detach(), rejected_reward.detach())


def longpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_nll: Tensor | None = None,
    beta: float = 0.01,
    lambda_po: float = 0.01,
) -> PreferenceLossOutput:
    """LongPO: NLL on the chosen long-context sequence plus a short-to-long DPO term.

    Equation::

        L_PO = softplus(−β·{[LP_θ(y_w|x_L) − LP_ref(y_w|x_S)] − [LP_θ(y_l|x_L) − LP_ref(y_l|x_S)]})
        L    = NLL(y_w | x_L) + λ·L_PO           # λ multiplies the PREFERENCE term; NLL is unweighted

    The policy log-probs are scored on the LONG context ``x_L``; the reference log-probs the caller passes
    must be scored on the SHORT context ``x_S`` (for multi-turn examples, the sum over turns of the per-turn
    short sequences), with the reference's original RoPE settings. That conditioning is what enforces the
    short-to-long KL ``KL(π_θ(·|x_L) ‖ π_ref(·|x_S))``.

    Paper: Chen et al. 2025, "LongPO: Long Context Self-Evolution of Large Language Models through
    Short-to-Long Preference Optimization" (ICLR), arXiv:2502.13922; loss read in the
    official trainer (``LongPOMTLMUlyssesTrainer.get_batch_loss_metrics``, DAMO-NLP-SG/LongPO @ 47b60a5,
    ``train/longdpo_trainer.py``).

    Shape: inputs ``(B,)``; ``chosen_nll`` ``(B,)`` = token-mean NLL of each chosen long sequence; outputs
    ``(B,)``.

    Args:
        chosen_nll: per-example token-mean cross-entropy of the chosen sequence (differentiable).
        beta: β = 0.01 (README command and ``argument.py`` agree).
        lambda_po: λ = 0.01, the value in the authors' README training command (what they ran). The code's
            ``argument.py`` default is 0.1; pass ``lambda_po=0.1`` to reproduce that default.

    Implicit regularizer: reverse KL between the long-context policy and the short-context reference, through
    the DPO term. Logged reward ``β·ρ(y)`` (with ρ against the short-context reference), detached.
    Stop-gradient: none.
    Departures: the official NLL is a token mean over the whole (micro)batch, with the chosen ``input_ids`` as
    labels (context and queries included); ours is a per-example token mean supplied by the caller, which the
    recipe then averages over examples — identical at the README's per-device batch of 1.
    """
    nll = _require(chosen_nll, "chosen_nll", "longpo", "token-mean NLL of the chosen sequence, (B,)")
    preference = dpo(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    return PreferenceLossOutput(nll + lambda_po * preference.loss, *preference[1:])
