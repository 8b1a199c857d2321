"""The DPO family with a reverse-KL regularizer, and f-DPO with other f-divergences. See ``tether.losses.preference``
for the shared notation and calling convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.losses.preference._common import (
    PreferenceLossOutput,
    _check_label_smoothing,
    _exp_cap,
    _log_ratios,
    _per_token,
    _require,
)

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

    Equation::

        Δ = ρ(y_w) − ρ(y_l),   ρ(y) = LP_θ(y) − LP_ref(y)
        L = (1 − ε)·softplus(−βΔ) + ε·softplus(βΔ)        # = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)

    Paper: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model", arXiv:2305.18290, Eq. 7. Conservative DPO (ε > 0): Mitchell 2023, "A note on DPO with noisy preferences"
    (cDPO), Eq. 3.

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

    Equation::

        Δ' = ρ(y_w)/|y_w| − ρ(y_l)/|y_l|     (average_log_prob=True, default)
        Δ' = ρ(y_w) − ρ(y_l)                 (average_log_prob=False)
        L  = (Δ' − 1/(2β))²

    Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, Eq. 17 (the sampled IPO loss); β plays the role of the paper's τ.

    Shape: inputs ``(B,)``; ``chosen_lengths``/``rejected_lengths`` ``(B,)`` (int or float response-token
    counts, required when ``average_log_prob``); outputs ``(B,)``.

    Args:
        beta: τ; 0.1 as TRL (and our DPO default).
        average_log_prob: use per-token averages of ρ (TRL's form, which TRL says the IPO authors confirmed);
            False gives the eric-mitchell repo's summed form. Default True (TRL's).

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

    Equation::

        u = π_θ(y)/π_ref(y) = exp(ρ(y)),   s(y) = f'(u) with additive constants dropped
        L = softplus(−β·[s(y_w) − s(y_l)])

        divergence     f'(u)               score s(y) used here          reward ceiling (u → ∞)
        reverse_kl     1 + log u           ρ                             unbounded   (= DPO, bit for bit)
        forward_kl     −1/u                −exp(−ρ)                      0
        js             log(2u/(1+u))       log σ(ρ)                      log 2
        alpha          (1 − u^{−α})/α      −exp(−αρ)/α                   1/α

    Paper: Wang et al. 2023/ICLR 2024, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints", arXiv:2309.16240 (the loss with ``β f'`` in place of ``β log``; their Eq. 11
    [UNVERIFIED number]). The f′ column is TRL's (code comments of two TRL versions); the scores are f′ minus
    constants, which cancel in the score difference.

    α convention (a trap: two TRL versions disagree): ``alpha`` is in the PAPER convention — α → 0 is
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
    Departures: no reference-free mode (forward-KL/α scores would then depend on raw sequence probabilities,
    ``exp(−LP_θ)`` of a long response overflows); bounded rewards saturate once the policy over-concentrates — expected,
    not a bug.
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
