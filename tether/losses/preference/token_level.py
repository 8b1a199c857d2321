"""Token-level KL and risk variants (TDPO 1/2, Ra-DPO); they need the full-vocabulary reference online. See
``tether.losses.preference`` for the shared notation and calling convention.

Besides the losses, Ra-DPO's per-position risk is here as plain functions of full-vocabulary log-probs
(:func:`token_risk`, :func:`sequential_risk`), with both of the official code's quantile conventions.
"""

from __future__ import annotations

import torch
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
    reverse-KL-derived log-ratio. Exactly (``tests/losses/test_preference_oracles.py``): TDPO1's optimum scores
    ``β(ρ(y) + SeqKL(y)) = r(y) + C``; on a two-step tree that is the DPO tilt at the last step and
    ``π(a) ∝ π_ref(a)·Z(a)·e^{−KL(π_ref(·|a) ‖ π*(·|a))}`` at the first (DPO: ``π_ref(a)·Z(a)``). On one state (every
    response sharing SeqKL), TDPO2's expected gradient is DPO's plus ``αβ·S·∇KL(π_ref ‖ π_θ)`` with
    ``S = E[σ(−βΔ)]``, the expected DPO error. Logged reward (as the official code): ``β·(ρ(y) + SeqKL(y))``,
    detached.
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


def _interpolated_quantile(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q, dim=-1)`` (linear interpolation) through ``kthvalue``: no size limit, no gradient."""
    n = x.shape[-1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    x_lo = torch.kthvalue(x, lo + 1, dim=-1).values
    x_hi = torch.kthvalue(x, hi + 1, dim=-1).values
    return x_lo + (pos - lo) * (x_hi - x_lo)


def _tail_risk(logps: Tensor, ref_logps: Tensor, confidence_level: float) -> Tensor:
    d = ref_logps - logps
    with torch.no_grad():
        above = d > _interpolated_quantile(d.detach(), 1.0 - confidence_level).unsqueeze(-1)
    return (ref_logps.exp() * torch.where(above, d, torch.zeros_like(d))).sum(-1)


def token_risk(
    logps: Tensor,
    ref_logps: Tensor,
    *,
    confidence_level: float = 0.95,
    split_vocab: bool = False,
) -> Tensor:
    """Ra-DPO's per-position risk: the reference-weighted upper tail of ``d = log π_ref − log π_θ`` over the vocabulary.

    Equation (official ``Ra_DPOTrainer.calculate_cvar``, zlj123-max/Ra-DPO @ d6a10e3, ``Ra-DPO/train/trainers.py``)::

        d_v = log π_ref(v|s_t) − log π_θ(v|s_t),   q_t = Quantile_{1−c}({d_v}_v)   (linear interpolation)
        R_t = Σ_v π_ref(v|s_t)·d_v·1[d_v > q_t]                                 (split_vocab=False)
        R_t = Σ_{h ∈ {[0, V/2), [V/2, V)}} Σ_{v∈h} π_ref(v|s_t)·d_v·1[d_v > q_t^h]  (split_vocab=True,
                                                            q_t^h = Quantile_{1−c} over half h only, V/2 = ⌊V/2⌋)

    ``split_vocab=True`` is the official ``is_split_risk_ratio: true`` (``config/loss/ra-dpo.yaml``): the code cuts
    the LAST axis of the (batch, position, vocabulary) tensor at ``V // 2`` and takes the quantile in each half.
    Its comment and variable names ("split (chosen & rejected)", ``chosen_distribution``) show the intent was to
    separate the chosen from the rejected responses — but those are stacked on the batch axis, and a per-position
    quantile over the vocabulary never mixes rows, so that intended split would change nothing: it IS
    ``split_vocab=False``. What the flag does instead is split the vocabulary by token id, which makes R_t depend on
    the tokenizer's id order (permuting ids changes it); the paper's nested CVaR has no such split. Use True only to
    reproduce the official runs.

    Shapes: ``logps``, ``ref_logps`` ``(..., V)`` normalized log-probs (``log_softmax`` of the logits) → ``(...)``.
    Gradient: through ``d`` only; the indicator (and the quantile inside it) is not differentiated, as in the code
    (a boolean mask); ``ref_logps`` is a constant. Not bounded by the full KL(π_ref ‖ π_θ): it drops the negative
    lower tail.
    """
    if not 0.0 < confidence_level < 1.0:
        raise ValueError(f"token_risk: confidence_level c must lie in (0, 1), got {confidence_level}")
    ref_logps = ref_logps.detach()
    if not split_vocab:
        return _tail_risk(logps, ref_logps, confidence_level)
    mid = logps.shape[-1] // 2
    if mid < 1:
        raise ValueError("token_risk: split_vocab=True needs a vocabulary of at least 2 tokens")
    return (_tail_risk(logps[..., :mid], ref_logps[..., :mid], confidence_level)
            + _tail_risk(logps[..., mid:], ref_logps[..., mid:], confidence_level))


def sequential_risk(
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    *,
    confidence_level: float = 0.95,
    split_vocab: bool = False,
) -> Tensor:
    """``SeqRisk(y) = Σ_{t∈resp} R_t`` (:func:`token_risk`) for each sequence: Ra-DPO's ``chosen_seq_risk`` /
    ``rejected_seq_risk`` (``split_vocab=False``) or ``chosen_seq_risk_split`` / ``rejected_seq_risk_split``
    (``split_vocab=True``) from full-vocabulary log-probs.

    Shapes: ``logps``, ``ref_logps`` ``(B, T, V)``, ``mask`` ``(B, T)`` (response tokens) → ``(B,)``. Padding is
    inert: masked positions are replaced by a uniform distribution before any arithmetic and contribute 0 and no
    gradient. The preference recipe computes the unsplit risk in chunks (``tether.logprobs.token_stats``); this is the
    plain version for callers that hold the log-probs, and the reference for tests.
    """
    m = mask.to(torch.bool)[..., None]
    logps = torch.where(m, logps, torch.zeros_like(logps))
    ref_logps = torch.where(m, ref_logps.detach(), torch.zeros_like(ref_logps))
    risk = token_risk(logps, ref_logps, confidence_level=confidence_level, split_vocab=split_vocab)
    return torch.where(m[..., 0], risk, torch.zeros_like(risk)).sum(-1)


def ra_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_seq_risk: Tensor | None = None,
    rejected_seq_risk: Tensor | None = None,
    chosen_seq_risk_split: Tensor | None = None,
    rejected_seq_risk_split: Tensor | None = None,
    split_risk_ratio: bool = False,
    variant: int = 1,
    alpha: float = 0.5,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """Ra-DPO (risk-aware DPO), variants Ra-DPO1 and Ra-DPO2: TDPO with the sequential KL replaced by a risk.

    Equation (R_t: :func:`token_risk`)::

        SeqRisk(y) = Σ_{t∈resp} R_t
        Ra-DPO1: z = ρ(y_w) − ρ(y_l) − [SeqRisk(y_l) − SeqRisk(y_w)]
        Ra-DPO2: z = ρ(y_w) − ρ(y_l) − α·[SeqRisk(y_l) − sg(SeqRisk(y_w))]
        L = softplus(−β·z)

    Paper: Zhang, Li, Qi, Song, Yang, Wang, Wei 2025, "Risk-aware Direct Preference Optimization under Nested Risk
    Measure", arXiv:2505.20359 (read at abstract level; the Ra-DPO1/Ra-DPO2 losses are its two objectives). The loss
    is the official ``Ra_DPOTrainer.loss`` (zlj123-max/Ra-DPO @ d6a10e3, ``Ra-DPO/train/trainers.py``), re-read for
    this module: same margin, rewards ``β·(ρ + SeqRisk)``, ``losses.sum()`` over the batch.

    Shape: the four log-prob inputs and the ``*_seq_risk*`` inputs are ``(B,)``; outputs ``(B,)``. ``SeqRisk``
    needs full-vocabulary policy and reference distributions (``LossSpec.full_vocab``); computing it is the
    caller's job (:func:`sequential_risk`, or ``tether.logprobs.token_stats(stats=["risk"])`` for the unsplit one).

    Args:
        chosen_seq_risk, rejected_seq_risk: ``SeqRisk`` with one quantile over the whole vocabulary
            (:func:`sequential_risk` with ``split_vocab=False``); used when ``split_risk_ratio=False``.
        chosen_seq_risk_split, rejected_seq_risk_split: ``SeqRisk`` with the official code's per-half quantiles
            (:func:`sequential_risk` with ``split_vocab=True``); used when ``split_risk_ratio=True``.
        split_risk_ratio: which risk the margin uses. False (our default) differs from the official configuration
            (``is_split_risk_ratio: true``): that flag splits the vocabulary at ``V // 2`` by token id, a bug by the
            code's own comment (it meant chosen vs rejected, which would have been a no-op) — see
            :func:`token_risk`. Pass True to reproduce the official runs.
        variant: 1 (default, ``if_ra_dpo2: false`` in the shipped config) or 2.
        alpha: α, weight of the risk term in Ra-DPO2 (0.5, config); ignored by Ra-DPO1.
        beta: β (0.1, config).

    Stop-gradient: Ra-DPO2 detaches only the chosen SeqRisk; Ra-DPO1 nothing.
    Implicit regularizer: a CVaR-style truncation of the token-level forward KL ``KL(π_ref ‖ π_θ)`` (only the
    upper tail of the per-vocabulary log-ratios); ``R_t`` is NOT bounded by the full KL. Logged reward
    ``β·(ρ(y) + SeqRisk(y))``, detached (as the official code).
    Departures: per-example losses (the official code SUMS over the batch, so its effective learning rate
    scales with the batch size; our recipe means); the default risk is the unsplit one (above).
    """
    _check_variant(variant, "ra_dpo")
    if split_risk_ratio:
        what = "Σ_t R_t with a quantile in each half of the vocabulary (sequential_risk(split_vocab=True)), (B,)"
        chosen_risk = _require(chosen_seq_risk_split, "chosen_seq_risk_split", "ra_dpo", what)
        rejected_risk = _require(rejected_seq_risk_split, "rejected_seq_risk_split", "ra_dpo", what)
    else:
        what = "Σ_t R_t, the sequential CVaR risk over response tokens (sequential_risk), (B,)"
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
