"""What every preference objective returns, and the small helpers they share."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class PreferenceLossOutput(NamedTuple):
    """What every preference objective returns.

    Fields:
        loss: per-example loss, ``Shape: (B,)``; differentiable. The recipe averages it over the batch.
        chosen_rewards: the method's implicit reward of the chosen response, detached, ``Shape: (B,)``.
        rejected_rewards: the same for the rejected response, detached, ``Shape: (B,)``.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _require(value: Tensor | None, name: str, objective: str, what: str) -> Tensor:
    if value is None:
        raise ValueError(
            f"{objective} needs the keyword input `{name}=` ({what}); it was not given. "
            f"The recipe supplies it when PREFERENCE_LOSSES['{objective}'].needs lists it."
        )
    return value


def _log_ratios(
    objective: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``ρ(y_w), ρ(y_l)``; a readable error when the reference log-probs are missing."""
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(
            f"{objective} needs the reference log-probs (3rd and 4th positional arguments); got None. "
            "Pass the reference model's summed response log-probs "
            "(or reference_free=True where the objective offers it)."
        )
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """Sum of per-token log-probs -> mean per token (``lengths`` may be int or float)."""
    return logps / lengths.to(logps.dtype)


def _check_label_smoothing(label_smoothing: float, objective: str, upper_inclusive: bool) -> None:
    ok = 0.0 <= label_smoothing <= 0.5 if upper_inclusive else 0.0 <= label_smoothing < 0.5
    if not ok:
        bound = "[0, 0.5]" if upper_inclusive else "[0, 0.5)"
        raise ValueError(
            f"{objective}: label_smoothing (assumed label-flip rate ε) must lie in {bound}, "
            f"got {label_smoothing}. "
            "ε ≥ 0.5 means the labels carry no (or inverted) information."
        )


def _exp_cap(dtype: torch.dtype) -> float:
    """Largest exponent we feed to ``exp`` in f-DPO scores: 11 for fp16 (e^11 ≈ 6e4 < 65504), else 80."""
    return 11.0 if dtype == torch.float16 else 80.0


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate at both ends (Mächler 2012: switch at ``x = −log 2``).

    Both branches are finite for every ``x < 0``, so ``torch.where`` does not leak NaN gradients.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
