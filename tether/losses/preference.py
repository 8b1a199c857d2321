"""Offline preference-optimization objectives, as pure functions of per-sequence log-probs.

Notation (shared by every objective here; "spec §N" refers to tether's method notes): for a response
``y`` to a prompt ``x``, ``LP_θ(y)`` is the SUM of the policy's per-token log-probs over response tokens,
``LP_ref(y)`` the same under the frozen reference, ``ρ(y) = LP_θ(y) − LP_ref(y)`` the sequence log-ratio,
``Δ = ρ(y_w) − ρ(y_l)`` the DPO margin, ``|y|`` the number of response tokens, ``mLP(y) = LP(y)/|y|``.
``sg(·)`` is stop-gradient. ``−log σ(z)`` is always computed as ``softplus(−z)``.

Calling convention (the preference recipe relies on it exactly):

* positional: ``(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)``, each
  ``Shape: (B,)``. Objectives without a reference (SimPO, ORPO) still take all four and ignore the last two
  (``None`` is accepted for them);
* keyword-only: extra per-sequence inputs (``chosen_lengths``/``rejected_lengths``, ``chosen_seq_kl``/
  ``rejected_seq_kl``, ``chosen_seq_risk``/``rejected_seq_risk``, ``kl_reference``, ``chosen_nll``) and
  hyperparameters, with the defaults documented on each function;
* returns a :class:`PreferenceLossOutput`: the per-example loss ``(B,)`` (the recipe takes the mean) and the
  detached implicit rewards the method defines, for logging margins and reward accuracy.

Departures shared by every function here (each function lists its own):

1. Batch reduction is left to the caller: we return per-example losses. The official Ra-DPO/TDPO code
   sums over the batch; TRL and the DPO reference code take the mean. Our recipe takes the mean.
2. Inputs are taken in whatever dtype they come; pass fp32 sequence log-probs (bf16 sums of hundreds of tokens
   lose the margin). Tests compare against float64 twins at fp32 ``atol 1e-5``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "F_DIVERGENCES",
    "PreferenceLossOutput",
    "dpo",
    "f_dpo",
    "hdpo",
    "hinge_dpo",
    "ipo",
    "kto",
    "longpo",
    "orpo",
    "ra_dpo",
    "robust_dpo",
    "simpo",
    "tdpo",
    "tdpo1",
    "tdpo2",
]


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


# ----------------------------------------------------------------------------------------------------------
# DPO family with a reverse-KL regularizer
# ----------------------------------------------------------------------------------------------------------


def dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> PreferenceLossOutput:
    """DPO (sigmoid loss), with conservative DPO (label smoothing) and the reference-free variant.

    Equation (spec §1)::

        Δ = ρ(y_w) − ρ(y_l),   ρ(y) = LP_θ(y) − LP_ref(y)
        L = (1 − ε)·softplus(−βΔ) + ε·softplus(βΔ)        # = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)

    Paper: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model", Eq. 7. Conservative DPO (ε > 0): Mitchell 2023, "A note on DPO with noisy preferences" (cDPO),
    Eq. 3.

    Shape: all inputs ``(B,)`` (summed response log-probs); outputs ``(B,)``.

    Args:
        beta: β, the KL coefficient; 0.1 is TRL's default and the DPO README's example (the official config
            has no default, ``beta: ???``; RefDPO finds 0.01–0.02 often better with an SFT reference).
        label_smoothing: ε ∈ [0, 0.5], the assumed fraction of flipped labels; 0 is plain DPO (official
            config).
        reference_free: replace ``LP_ref`` by 0 (a uniform reference), ``Δ = LP_θ(y_w) − LP_θ(y_l)``; the
            reference arguments are then ignored and may be None.

    Implicit regularizer: reverse KL, ``β·KL(π_θ ‖ π_ref)``; the implicit reward is ``β·ρ(y)`` (logged,
    detached).
    Stop-gradient: none inside the loss (the reference log-probs carry no gradient by construction).
    Departures: none from the paper; the per-example loss is returned unreduced.
    """
    _check_label_smoothing(label_smoothing, "dpo", upper_inclusive=True)
    if reference_free:
        chosen_ratio, rejected_ratio = policy_chosen_logps, policy_rejected_logps
    else:
        chosen_ratio, rejected_ratio = _log_ratios(
            "dpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
    z = beta * (chosen_ratio - rejected_ratio)
    loss = F.softplus(-z)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * F.softplus(z)
    return PreferenceLossOutput(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float = 0.1,
    average_log_prob: bool = True,
) -> PreferenceLossOutput:
    """IPO: squared loss pulling the log-ratio margin to ``1/(2τ)``.

    Equation (spec §1)::

        Δ' = ρ(y_w)/|y_w| − ρ(y_l)/|y_l|     (average_log_prob=True, default)
        Δ' = ρ(y_w) − ρ(y_l)                 (average_log_prob=False)
        L  = (Δ' − 1/(2β))²

    Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    Eq. 17 (the sampled IPO loss); β plays the role of the paper's τ.

    Shape: inputs ``(B,)``; ``chosen_lengths``/``rejected_lengths`` ``(B,)`` (int or float response-token
    counts, required when ``average_log_prob``); outputs ``(B,)``.

    Args:
        beta: τ; 0.1 as TRL (and our DPO default).
        average_log_prob: use per-token averages of ρ (TRL's form, which TRL says the IPO authors confirmed);
            False gives the eric-mitchell repo's summed form. Default True per the spec.

    Implicit regularizer: IPO's ``τ·KL(π_θ ‖ π_ref)``-regularized objective on preference probabilities (no
    Bradley–Terry assumption); the logged reward is ``β·ρ(y)/|y|`` (averaged form, as TRL) or ``β·ρ(y)``.
    Stop-gradient: none.
    Departures: the averaged form is TRL's, not the paper's (which works on whole-sequence probabilities).
    """
    chosen_ratio, rejected_ratio = _log_ratios(
        "ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if average_log_prob:
        what = "number of response tokens, (B,); or pass average_log_prob=False"
        chosen_ratio = _per_token(chosen_ratio, _require(chosen_lengths, "chosen_lengths", "ipo", what))
        rejected_ratio = _per_token(
            rejected_ratio, _require(rejected_lengths, "rejected_lengths", "ipo", what)
        )
    loss = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLossOutput(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def hinge_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """Hinge loss on the DPO margin (SLiC-style), TRL's ``loss_type="hinge"``.

    Equation::

        L = max(0, 1 − β·Δ),   Δ = ρ(y_w) − ρ(y_l)

    Paper: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 1
    (calibration loss ``max(0, δ − log π_θ(y_w) + log π_θ(y_l))``); the reference-normalized form here is from
    Liu et al. 2024, "Statistical Rejection Sampling Improves Preference Optimization" (RSO), as implemented
    by TRL.

    Shape: inputs ``(B,)``; outputs ``(B,)``.

    Args:
        beta: β = 1/δ, the reciprocal of the margin in log-ratio units; 0.1 as TRL's default (δ = 10 nats).

    Implicit regularizer: none explicit; the reference enters only through ρ (the margin is measured relative
    to π_ref). Logged reward ``β·ρ(y)``. Stop-gradient: none.
    Departures from SLiC: uses log-ratios ρ instead of raw log-probs, and no separate SFT regularization term.
    """
    chosen_ratio, rejected_ratio = _log_ratios(
        "hinge_dpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))
    return PreferenceLossOutput(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def robust_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> PreferenceLossOutput:
    """Robust DPO (rDPO): the DPO loss de-biased for a known label-flip rate ε.

    Equation::

        L = [(1 − ε)·softplus(−βΔ) − ε·softplus(βΔ)] / (1 − 2ε)
          = softplus(−βΔ) − ε/(1 − 2ε)·βΔ          (using softplus(x) = softplus(−x) + x)

    Unbiasedness: if the observed label is flipped with probability ε, then
    ``(1 − ε)·L(Δ) + ε·L(−Δ) = softplus(−βΔ)``, the clean DPO loss — tested as an identity.

    Paper: Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", the rDPO loss (their Eq. 6; equation number [UNVERIFIED], the formula is TRL's).

    Checked against TRL's ``loss_type="robust"`` (read via the code index, ``trl/trainer/dpo_trainer.py``): it
    computes ``(−logσ(βΔ)(1−ε) + logσ(−βΔ)·ε)/(1−2ε)`` with ε = ``label_smoothing`` — the same formula. TRL's
    ``label_smoothing`` defaults to 0.0, which makes rDPO plain DPO; we default to ε = 0.1 (an assumed 10 %
    flip rate, our choice — set it to your estimate of the noise).

    Shape: inputs ``(B,)``; outputs ``(B,)``.

    Args:
        beta: β, as DPO (0.1).
        label_smoothing: ε ∈ [0, 0.5), the assumed label-flip rate.

    Implicit regularizer: reverse KL as DPO; logged reward ``β·ρ(y)``. Stop-gradient: none.
    Note (not a bug): the per-example loss is unbounded below — its gradient in Δ never vanishes (the constant
    term ``−βε/(1 − 2ε)``); only in expectation over flipped labels does it equal the bounded DPO loss.
    """
    _check_label_smoothing(label_smoothing, "robust_dpo", upper_inclusive=False)
    chosen_ratio, rejected_ratio = _log_ratios(
        "robust_dpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing
    loss = ((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps)
    return PreferenceLossOutput(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# ----------------------------------------------------------------------------------------------------------
# f-DPO: other divergences than reverse KL
# ----------------------------------------------------------------------------------------------------------


def _score_reverse_kl(rho: Tensor, alpha: float) -> Tensor:
    return rho  # f'(u) = 1 + log u = 1 + ρ


def _score_forward_kl(rho: Tensor, alpha: float) -> Tensor:
    return -torch.exp(torch.clamp(-rho, max=_exp_cap(rho.dtype)))  # f'(u) = −1/u = −e^{−ρ}


def _score_js(rho: Tensor, alpha: float) -> Tensor:
    return F.logsigmoid(rho)  # f'(u) = log(2u/(1+u)) = log 2 + log σ(ρ)


def _score_alpha(rho: Tensor, alpha: float) -> Tensor:
    return -torch.exp(torch.clamp(-alpha * rho, max=_exp_cap(rho.dtype))) / alpha  # f'(u) = (1 − u^{−α})/α


_F_SCORES = {
    "reverse_kl": _score_reverse_kl,
    "forward_kl": _score_forward_kl,
    "js": _score_js,
    "alpha": _score_alpha,
}
F_DIVERGENCES = tuple(_F_SCORES)


def f_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
) -> PreferenceLossOutput:
    """f-DPO: DPO with an f-divergence ``D_f(π_θ ‖ π_ref)`` in place of reverse KL.

    Equation (spec §2)::

        u = π_θ(y)/π_ref(y) = exp(ρ(y)),   s(y) = f'(u) with additive constants dropped
        L = softplus(−β·[s(y_w) − s(y_l)])

        divergence     f'(u)               score s(y) used here          reward ceiling (u → ∞)
        reverse_kl     1 + log u           ρ                             unbounded   (= DPO, bit for bit)
        forward_kl     −1/u                −exp(−ρ)                      0
        js             log(2u/(1+u))       log σ(ρ)                      log 2
        alpha          (1 − u^{−α})/α      −exp(−αρ)/α                   1/α

    Paper: Wang et al. 2023/ICLR 2024, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints" (the loss with ``β f'`` in place of ``β log``; their Eq. 11 [UNVERIFIED
    number]). The f′ table is the spec's (TRL code comments, two TRL versions).

    α convention (the spec's "parameter-convention trap"): ``alpha`` is in the PAPER convention — α → 0 is
    reverse KL (DPO), α = 1 is forward KL. Current TRL's ``f_alpha_divergence_coef`` is α' = 1 − α; the older
    TRL used the paper convention. α = 0.5 is the same divergence in both conventions. Any α > 0 gives a valid
    (increasing) f′; the paper studies α ∈ (0, 1).

    Shape: inputs ``(B,)``; outputs ``(B,)``.

    Args:
        beta: β, as DPO (0.1, TRL's doc example).
        divergence: one of ``F_DIVERGENCES`` = reverse_kl (default, TRL's default), forward_kl, js, alpha. The
            divergence is the method's hyperparameter, so it is a name here rather than four functions.
        alpha: α of the α-divergence (paper convention), used only when ``divergence="alpha"``; 0.5 as
            current TRL's default (same divergence in both conventions).

    Numerics: scores are computed in log space; the exponents ``−ρ`` and ``−αρ`` are clamped at 80 (fp32/bf16/
    fp64) or 11 (fp16) before ``exp``, as TRL's ``cap_exp`` does. Where the clamp is active (ρ < −80, a policy
    that has all but dropped the sequence) the score saturates and its gradient is zero.
    Implicit regularizer: ``β·D_f(π_θ ‖ π_ref)``; logged reward ``β·s(y)``. Stop-gradient: none.
    Departures: no reference-free mode (the spec advises against it: forward-KL/α scores would depend on raw
    sequence probabilities); bounded rewards saturate once the policy over-concentrates — expected, not a bug.
    """
    if divergence not in _F_SCORES:
        raise ValueError(f"f_dpo: unknown divergence {divergence!r}; choose one of {list(_F_SCORES)}.")
    if divergence == "alpha" and not alpha > 0:
        raise ValueError(
            f"f_dpo: alpha must be > 0 (paper convention: α → 0 is reverse KL, α = 1 forward KL), "
            f"got {alpha}."
        )
    chosen_ratio, rejected_ratio = _log_ratios(
        "f_dpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    score = _F_SCORES[divergence]
    chosen_score, rejected_score = score(chosen_ratio, alpha), score(rejected_ratio, alpha)
    loss = F.softplus(-beta * (chosen_score - rejected_score))
    return PreferenceLossOutput(loss, beta * chosen_score.detach(), beta * rejected_score.detach())


# ----------------------------------------------------------------------------------------------------------
# token-level KL / risk variants (need the full-vocabulary reference online)
# ----------------------------------------------------------------------------------------------------------


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

    Equation (spec §3)::

        SeqKL(y) = Σ_{t∈resp} KL(π_ref(·|s_t) ‖ π_θ(·|s_t))          # reference FIRST
        TDPO1:  z = ρ(y_w) − ρ(y_l) − [SeqKL(y_l) − SeqKL(y_w)]
        TDPO2:  z = ρ(y_w) − ρ(y_l) − α·[SeqKL(y_l) − sg(SeqKL(y_w))]
        L = softplus(−β·z)

    β multiplies the whole ``z``, so the KL term carries ``α·β``.

    Paper: Zeng et al. 2024, "Token-level Direct Preference Optimization" (ICML), Eq. 19 (TDPO1) and Eq. 20
    (TDPO2) [equation numbers UNVERIFIED]; matches the official ``tdpo_loss`` (Vance0124/Token-level-Direct-
    Preference-Optimization @ 2a736ec) as read for the spec.

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

    Equation (spec §5)::

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


# ----------------------------------------------------------------------------------------------------------
# entropy-controlled and long-context variants
# ----------------------------------------------------------------------------------------------------------


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

    Equation (spec §4)::

        objective  max_π E_π[r] − β·[−α·H(π) + CE(π, π_ref)]
        optimum    π*(y) ∝ π_ref(y)^{1/α}·exp(r(y)/(αβ))
        L = softplus(−{αβ·[LP_θ(y_w) − LP_θ(y_l)] − β·[LP_ref(y_w) − LP_ref(y_l)]})

    Paper: Omura et al. 2024, "Entropy Controllable Direct Preference Optimization" (no official code found;
    loss derived in the spec from the paper's stated objective, matching a third-party implementation).

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

    Equation (spec §8)::

        L_PO = softplus(−β·{[LP_θ(y_w|x_L) − LP_ref(y_w|x_S)] − [LP_θ(y_l|x_L) − LP_ref(y_l|x_S)]})
        L    = NLL(y_w | x_L) + λ·L_PO           # λ multiplies the PREFERENCE term; NLL is unweighted

    The policy log-probs are scored on the LONG context ``x_L``; the reference log-probs the caller passes
    must be scored on the SHORT context ``x_S`` (for multi-turn examples, the sum over turns of the per-turn
    short sequences), with the reference's original RoPE settings. That conditioning is what enforces the
    short-to-long KL ``KL(π_θ(·|x_L) ‖ π_ref(·|x_S))``.

    Paper: Chen et al. 2025, "LongPO: Long Context Self-Evolution of Large Language Models through
    Short-to-Long Preference Optimization" (ICLR); loss read in the official trainer
    (``LongPOMTLMUlyssesTrainer.get_batch_loss_metrics``, DAMO-NLP-SG/LongPO @ 47b60a5) for the spec.

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


# ----------------------------------------------------------------------------------------------------------
# reference-free objectives (the reference arguments are ignored)
# ----------------------------------------------------------------------------------------------------------


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
    term; the number of the combined objective is [UNVERIFIED].

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


# ----------------------------------------------------------------------------------------------------------
# KTO on paired data
# ----------------------------------------------------------------------------------------------------------


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

    Implicit regularizer: reverse KL through the log-ratios, plus the KL reference point. Logged reward
    ``β·ρ``.
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
