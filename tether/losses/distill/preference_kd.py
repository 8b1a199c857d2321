"""DCKD and ADPA: distilling a DPO teacher's preferences (Gao et al. 2025), as pure functions of tensors.

Both read the DPO teacher through its top-k tokens, as the authors' pipeline stores it (k = 50): DCKD's compressed
forward KL (:class:`TopK`, :func:`teacher_topk`, :func:`topk_forward_kl`) on the chosen and rejected responses, ADPA's
teacher advantages on the top-k tokens (:func:`adpa_advantages`) along the student's own generations.

Notation: student ``q_θ``, teacher ``p``; a batch of ``B`` responses padded to ``T`` positions; at response position t
the state is ``s_t = (x, y_<t)`` and ``y_t`` the token there. Per-position inputs are ``(B, T)``, full-vocabulary
logits ``(B, T, V)``; ``mask`` ``(B, T)`` (bool or 0/1) marks response tokens. Padding is inert: every per-position
input is replaced by 0 at masked positions before any arithmetic, so masked entries may hold anything and receive
exactly zero gradient. Pass fp32 (or float64) inputs; log-softmaxes are taken in the input dtype. The tests compare an
fp32 run with a float64 twin at ``atol 1e-5``.

What each objective's gradient follows:

==================  ==========================================================================================
objective           gradient
==================  ==========================================================================================
``dckd``            per-position FORWARD KL(π_dpo ‖ q_θ) under teacher forcing on chosen and rejected responses
                    (+ NLL on chosen); top-k compressed: forward KL between (k+1)-bin distributions
``adpa``            ascent on the expected teacher advantage Σ_a q_θ(a|s_t)·A(s_t, a) over the teacher's top-k
==================  ==========================================================================================

Sources read (public snapshots) and what was confirmed:

* DCKD / ADPA — Gao, Wan, Guo, Quan, Wang 2025, "Advantage-Guided Distillation for Preference Alignment in Small
  Language Models", ICLR 2025, arXiv:2502.17927. The authors' repository (SLIT-AI/ADPA) is NOT available here; read:
  its README text (pipeline: DCKD on chosen + rejected, ADPA on student generations, top-k teacher logits merged by
  ``utils/merge_logits_adpa_dataset.py``), and the code of the fork built on it,
  kaist-siit-lab/StarLab_Preference-Distillation-via-Value-based-Reinforcement-Learning @ 92fd496:
  ``scripts/run_distill_dpo.py`` (``get_kl_loss``, ``get_reverse_ce``, ``get_batch_loss_metrics``),
  ``utils/compress_logits.py`` (``compress_probs``, ``load_input_and_target_probs_fast``),
  ``utils/merge_logits_adpa_dataset.py`` (``get_margin_logp_token``). The paper's equations were NOT read: the
  formulas below are the fork's code. The recipe weights were later read in the first author's public copy of the
  code, gaoshiping/ADPA @ a95c32f (same ``run_distill_dpo.py`` loss; ``recipes/llama3.2-1b-deita-dpomix``):
  DCKD ``student_dckd.yaml`` — ``sft_on_chosen 1``, ``chosen_distil_weight 0.1``, ``rejected_distil_weight 0.1``,
  ``distillation_weight 1``; ADPA ``student_adpa.yaml`` — ``sft_on_chosen 1``, ``adpa_weight 1.6`` from the DCKD
  student (ADPA+); both lr 5e-7, 3 epochs, cosine, warmup 0.1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tether.losses.distill._common import DistillLossOutput, _check, _inert, _mean, _token_mean

__all__ = [
    "TopK",
    # DCKD
    "dckd",
    "teacher_topk",
    "topk_forward_kl",
    "topk_forward_kl_per_position",
    # ADPA
    "adpa",
    "adpa_advantages",
    "adpa_per_position",
]


class TopK(NamedTuple):
    """A teacher distribution stored as its top-k, as the DCKD/ADPA code stores it (``compress_probs``).

    Fields:
        ids: the k most probable token ids, ``Shape: (..., K)`` (long).
        probs: their probabilities, ``Shape: (..., K)``.
        rest: the remaining mass ``1 − Σ probs``, ``Shape: (...)``.
    """

    ids: Tensor
    probs: Tensor
    rest: Tensor


# ----------------------------------------------------------------------------------------------------------
# DCKD: forward KL of a DPO teacher on chosen and rejected responses (Gao et al. 2025)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_topk(teacher_logits: Tensor, k: int = 50) -> TopK:
    """The teacher's distribution compressed to its top-k and one remaining-mass bucket (fork ``compress_probs``).

    Shape: ``teacher_logits`` (..., V) → ``TopK(ids (..., K), probs (..., K), rest (...))``, ``rest = 1 − Σ probs``
    (clamped at 0). k = 50 in the DCKD/ADPA code (``precompute_logits.py``). No gradient.
    """
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"teacher_topk: k must be in [1, V = {teacher_logits.shape[-1]}], got {k}.")
    probs, ids = torch.softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    return TopK(ids, probs, (1.0 - probs.sum(-1)).clamp(min=0.0))


def topk_forward_kl(
    student_logits: Tensor,
    teacher: TopK,
    *,
    student_floor: float = 1e-7,
    stabilize: float | None = 1e-8,
) -> Tensor:
    """Forward KL between (k+1)-bin distributions: the teacher's top-k + rest, the student gathered at the same ids.

    Equation (fork ``compress_logits.py::load_input_and_target_probs_fast`` then ``run_distill_dpo.py::get_kl_loss``)::

        P = [p_1 … p_K, rest_p],   Q = [q_θ(id_1) … q_θ(id_K), 1 − Σ_k q_θ(id_k)]       (q_θ: full softmax)
        P, Q ← clamp(·, s, 1 − s)   (s = stabilize; ``prob_stabilize``)
        Q    ← max(Q, student_floor)
        KL   = Σ_{b=1}^{K+1} P_b·(log P_b − log Q_b)

    The error of the compression, exactly (chain rule of KL; without the clamps)::

        KL(p ‖ q_θ) = KL_bins + rest_p · KL( p(·|rest) ‖ q_θ(·|rest) )       ≥ KL_bins

    where ``p(·|rest)``, ``q_θ(·|rest)`` are the two distributions restricted to the tokens outside the teacher's
    top-k and renormalized: the compressed KL drops the mismatch INSIDE the teacher's tail, weighted by its mass
    (``test_topk_forward_kl_error_is_the_tail_kl``). With K = V it is exact up to the clamps (≈ 1e-7). Gradient: the
    forward KL of the binned distributions (zero through clamped entries) — the student is not pushed to shape its
    tail like the teacher's, only to give it the right total mass.

    Shape: ``student_logits`` (..., V) differentiable; ``teacher`` a :class:`TopK` of (..., K) / (...); output (...).
    Stop-gradient: the teacher. Departures: none from the fork's code (the authors' own repository was not
    accessible).
    """
    q = torch.softmax(student_logits, dim=-1)
    q_top = q.gather(-1, teacher.ids)
    p_bins = torch.cat([teacher.probs.detach(), teacher.rest.detach()[..., None]], dim=-1).to(q.dtype)
    q_bins = torch.cat([q_top, (1.0 - q_top.sum(-1, keepdim=True))], dim=-1)
    if stabilize is not None:
        p_bins = p_bins.clamp(stabilize, 1.0 - stabilize)
        q_bins = q_bins.clamp(stabilize, 1.0 - stabilize)
    q_bins = q_bins.clamp(min=student_floor)
    log_p = torch.where(p_bins > 0, p_bins.log(), torch.zeros_like(p_bins))
    return (p_bins * (log_p - q_bins.log())).sum(-1)


def topk_forward_kl_per_position(
    student_logps_at_ids: Tensor,
    teacher: TopK,
    *,
    student_floor: float = 1e-7,
    stabilize: float | None = 1e-8,
) -> Tensor:
    """:func:`topk_forward_kl` from the student's log-probs at the teacher's top-k ids, for a caller that never holds
    (B, T, V) logits (``tether.recipes.distill`` gathers log q_θ at the stored ids chunk by chunk over the LM head,
    ``token_stats`` ``support_logps``). Same equation, same clamps; equal to :func:`topk_forward_kl` forward and
    backward (``test_topk_forward_kl_per_position_matches``).

    Shape: ``student_logps_at_ids`` (..., K) differentiable (log of the FULL softmax at ``teacher.ids``);
    ``teacher`` a :class:`TopK` of (..., K) / (...); output (...). Stop-gradient: the teacher.
    """
    q_top = student_logps_at_ids.exp()
    p_bins = torch.cat([teacher.probs.detach(), teacher.rest.detach()[..., None]], dim=-1).to(q_top.dtype)
    q_bins = torch.cat([q_top, (1.0 - q_top.sum(-1, keepdim=True))], dim=-1)
    if stabilize is not None:
        p_bins = p_bins.clamp(stabilize, 1.0 - stabilize)
        q_bins = q_bins.clamp(stabilize, 1.0 - stabilize)
    q_bins = q_bins.clamp(min=student_floor)
    log_p = torch.where(p_bins > 0, p_bins.log(), torch.zeros_like(p_bins))
    return (p_bins * (log_p - q_bins.log())).sum(-1)


def dckd(
    chosen_kl: Tensor,
    chosen_mask: Tensor,
    *,
    sft_weight: float,
    chosen_weight: float,
    rejected_weight: float,
    chosen_logps: Tensor | None = None,
    rejected_kl: Tensor | None = None,
    rejected_mask: Tensor | None = None,
) -> DistillLossOutput:
    """DCKD: forward KL to a DPO teacher on the chosen AND the rejected response, plus NLL on the chosen one.

    Equation (fork ``run_distill_dpo.py::get_batch_loss_metrics``: ``sft_on_chosen``, ``chosen_distil_weight``,
    ``rejected_distil_weight``)::

        L = w_sft·mean_t[−log q_θ(y_w,t)] + w_c·mean_t KL(π_dpo ‖ q_θ)|_{y_w} + w_r·mean_t KL(π_dpo ‖ q_θ)|_{y_l}

    each mean over the valid tokens of its own side (token mean, not mean of per-sequence means), under teacher
    forcing on the dataset's chosen ``y_w`` and rejected ``y_l``. The per-position KLs are the caller's: the exact
    full-vocabulary forward KL (``tether.kl.forward_kl(student_logits, teacher_logits)`` on (B, T, V), the distill
    divergence ``forward_kl`` on (N, V) rows, or chunked over the LM head), or the official top-k compressed one
    (:func:`topk_forward_kl` of :func:`teacher_topk`, k = 50).

    Neutral settings: ``sft_weight=0, rejected_weight=0, chosen_weight=1`` is plain word-level KD (forward KL, token
    mean) on the chosen responses (``test_dckd_neutral_is_plain_kd``).

    Shape: ``chosen_kl``, ``chosen_mask``, ``chosen_logps`` (B, T); ``rejected_kl``, ``rejected_mask`` (B', T')
    (the two sides may differ in shape). 0-dim loss.

    Args:
        sft_weight, chosen_weight, rejected_weight: no defaults on purpose. The authors' DCKD recipe
            (gaoshiping/ADPA@a95c32f ``student_dckd.yaml``): ``sft_weight=1, chosen_weight=0.1,
            rejected_weight=0.1``; the fork's chosen-only KD recipe: ``sft_on_chosen 0, chosen_distil_weight 0.1``.
        chosen_logps: log q_θ of the chosen tokens, (B, T) differentiable; needed when ``sft_weight > 0``.

    Metrics: ``nll``, ``kl_chosen``, ``kl_rejected`` (those computed). Stop-gradient: the teacher (inside the KLs).
    Departures: none in the combination; the fork additionally multiplies the distillation part by
    ``distillation_weight`` (fold it into the weights).
    """
    _check("dckd", chosen_mask, chosen_kl=chosen_kl, chosen_logps=chosen_logps)
    loss = chosen_kl.new_zeros(())
    metrics: dict[str, float] = {}
    if sft_weight != 0.0:
        if chosen_logps is None:
            raise ValueError("dckd: sft_weight > 0 needs chosen_logps= (log q_θ of the chosen tokens, (B, T)).")
        nll = -_token_mean(chosen_logps, chosen_mask)
        loss = loss + sft_weight * nll
        metrics["nll"] = nll.detach().item()
    if chosen_weight != 0.0:
        kl_c = _token_mean(chosen_kl, chosen_mask)
        loss = loss + chosen_weight * kl_c
        metrics["kl_chosen"] = kl_c.detach().item()
    if rejected_weight != 0.0:
        if rejected_kl is None or rejected_mask is None:
            raise ValueError("dckd: rejected_weight > 0 needs rejected_kl= and rejected_mask= ((B', T') each).")
        _check("dckd", rejected_mask, rejected_kl=rejected_kl)
        kl_r = _token_mean(rejected_kl, rejected_mask)
        loss = loss + rejected_weight * kl_r
        metrics["kl_rejected"] = kl_r.detach().item()
    return DistillLossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# ADPA: advantage-guided distillation on the student's own generations (Gao et al. 2025)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def adpa_advantages(
    dpo_logits: Tensor,
    ref_logits: Tensor,
    *,
    top_k: int = 50,
    ref_top_k: int | None = None,
    floor: float = 1e-7,
) -> tuple[Tensor, Tensor]:
    """The DPO teacher's advantage ``A(s_t, a) = log π_dpo(a|s_t) − log π_ref(a|s_t)`` on π_dpo's top-k tokens.

    Equation (fork ``utils/merge_logits_adpa_dataset.py::get_margin_logp_token``)::

        ids   = top-k of π_dpo(·|s_t)
        A(a)  = log max(π_dpo(a), floor) − log π̂_ref(a),   a ∈ ids
        π̂_ref(a) = max(π_ref(a), floor)                     (exact: ref_top_k=None)
        π̂_ref(a) = max(π_ref(a), floor)        if a is in π_ref's top-``ref_top_k``     (the official compressed
                   max(min_k π_dpo(id_k), floor) otherwise                                 store)

    Tokens outside ``ids`` get advantage 0 (the loss never sees them). The stored value has no β: the paper's
    advantage is β times this [secondary: a public review of the paper], so β folds into the ADPA weight.

    Shape: ``dpo_logits``, ``ref_logits`` (..., V) — the two teachers on the student's response; returns
    ``(ids, A)``, both (..., K). No gradient.

    Args:
        top_k: K (50 in the ADPA/TVKD code).
        ref_top_k: None computes π_ref exactly at the ids (an online recipe has both teachers' logits); an int
            reproduces the official precomputed store, where π_ref is known only on its own top-k and every other
            token takes the DPO teacher's smallest top-k probability — which sets A ≈ 0 for a DPO top-k token the
            reference ranks low.
        floor: probability floor (1e-7).

    Example: π_dpo = [0.5, 0.3, 0.15, 0.05], π_ref = [0.4, 0.1, 0.3, 0.2], K = 2 → ids [0, 1],
    A = [log(0.5/0.4), log(0.3/0.1)] = [0.22314, 1.09861]; with ref_top_k = 2 (π_ref's top-2 = {0, 2}) token 1 takes
    π̂_ref = min(0.5, 0.3) = 0.3 → A = [0.22314, 0]. π_dpo = π_ref ⇒ A ≡ 0 either way.
    Departures: none from the fork's merge script (the authors' own repository was not accessible).
    """
    if not 1 <= top_k <= dpo_logits.shape[-1]:
        raise ValueError(f"adpa_advantages: top_k must be in [1, V = {dpo_logits.shape[-1]}], got {top_k}.")
    p_dpo, ids = torch.softmax(dpo_logits, dim=-1).topk(top_k, dim=-1)
    p_ref_all = torch.softmax(ref_logits.to(p_dpo.dtype), dim=-1)
    p_ref = p_ref_all.gather(-1, ids).clamp(min=floor)
    if ref_top_k is not None:
        ref_ids = p_ref_all.topk(ref_top_k, dim=-1).indices
        known = (ids[..., :, None] == ref_ids[..., None, :]).any(-1)
        fallback = p_dpo.min(dim=-1, keepdim=True).values.clamp(min=floor)
        p_ref = torch.where(known, p_ref, fallback)
    return ids, p_dpo.clamp(min=floor).log() - p_ref.log()


def adpa_per_position(student_logps_at_ids: Tensor, advantages: Tensor) -> Tensor:
    """The per-position ADPA term ``−Σ_{a ∈ top-k} q_θ(a|s_t)·A(s_t, a)`` from the student's log-probs at the ids.

    For a caller that never holds (B, T, V) logits (``tether.recipes.distill`` gathers log q_θ at the teacher's
    top-k ids chunk by chunk over the LM head, ``token_stats`` ``support_logps``). The token mean of this over valid
    positions is ``adpa(...)``'s ``L_ADPA`` at ``prob_stabilize=False`` (forward and backward,
    ``test_adpa_per_position_matches_adpa``).

    Shape: ``student_logps_at_ids`` (..., K) differentiable (log of the FULL softmax at the ids); ``advantages``
    (..., K) from :func:`adpa_advantages` (constants); output (...). Stop-gradient: the advantages.
    """
    return -(student_logps_at_ids.exp() * advantages.detach().to(student_logps_at_ids.dtype)).sum(-1)


def adpa(
    student_logits: Tensor,
    topk_ids: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    adpa_weight: float = 1.0,
    sft_weight: float = 0.0,
    chosen_logps: Tensor | None = None,
    chosen_mask: Tensor | None = None,
    prob_stabilize: bool = False,
) -> DistillLossOutput:
    """ADPA: raise the student's probability of tokens the DPO teacher prefers over its reference, on its own samples.

    Equation (fork ``run_distill_dpo.py::get_reverse_ce``, ``adpa_loss_type="reverse_ce"``)::

        L_ADPA = −mean_t Σ_{a ∈ top-k_t} q_θ(a|s_t)·A(s_t, a)        (token mean over valid positions)
        L      = w_adpa·L_ADPA + w_sft·mean_t[−log q_θ(y_w,t)]

    ``q_θ`` is the FULL softmax gathered at the ids (not renormalized over the k tokens); ``s_t`` runs over the
    student's own generation ŷ (the "rejected" slot of the ADPA dataset); the NLL is on the dataset's chosen response.
    Gradient w.r.t. the student's logits z at one position: ``∂L/∂z_v = −q_v·(A_v − Ā)``, ``Ā = Σ_a q_a A_a``
    (A = 0 off the top-k): it raises every token whose advantage beats the student's expected advantage.

    Shape: ``student_logits`` (B, T, V) differentiable; ``topk_ids``, ``advantages`` (B, T, K) from
    :func:`adpa_advantages`; ``mask`` (B, T); ``chosen_logps``, ``chosen_mask`` (B', T') when ``sft_weight > 0``.

    Args:
        adpa_weight, sft_weight: w_adpa and w_sft; the authors' recipe (gaoshiping/ADPA@a95c32f
            ``student_adpa.yaml``): 1.6 and 1.
        prob_stabilize: reproduce the fork's default ``prob_stabilize=True`` in ``load_input_and_target_probs_fast``,
            which clamps the student's (k+1)-bin probabilities AND the advantages to [1e-8, 1 − 1e-8] — every
            negative advantage becomes 1e-8 and every advantage above 1 becomes 1 − 1e-8 (the remaining-mass bin
            gets advantage 1e-8). Off by default: it changes the objective, not only its numerics.

    Examples: one position, q = [0.6, 0.3, 0.1], ids = [0, 1], A = [+1, −1] → L = −(0.6 − 0.3) = −0.3;
    Ā = 0.3, ∂L/∂z = −[0.6·0.7, 0.3·(−1.3), 0.1·(−0.3)] = [−0.42, 0.39, 0.03] (descent raises q_0, lowers q_1).
    With ``prob_stabilize`` the same position gives ≈ −0.6. π_dpo = π_ref ⇒ A ≡ 0 ⇒ L = 0, zero gradient.
    Metrics: ``adpa`` (L_ADPA), ``advantage_mean``, ``positive_frac``, ``nll`` (if used).
    Stop-gradient: the advantages (teacher data). Departures: none from the fork's code with ``prob_stabilize=True``.
    """
    _check("adpa", mask, student_logits=student_logits, topk_ids=topk_ids, advantages=advantages)
    q = torch.softmax(_inert(mask, student_logits), dim=-1)
    q_top = q.gather(-1, _inert(mask, topk_ids))
    adv = _inert(mask, advantages.detach()).to(q.dtype)
    if prob_stabilize:
        lo, hi = 1e-8, 1.0 - 1e-8
        q_rest = (1.0 - q_top.sum(-1)).clamp(lo, hi)
        per_token = -((q_top.clamp(lo, hi) * adv.clamp(lo, hi)).sum(-1) + q_rest * lo)
    else:
        per_token = -(q_top * adv).sum(-1)
    adpa_loss = _token_mean(per_token, mask)
    loss = adpa_weight * adpa_loss
    metrics = {
        "adpa": adpa_loss.detach().item(),
        "advantage_mean": _mean(adv.mean(-1), mask),
        "positive_frac": _mean((adv > 0).to(q.dtype).mean(-1), mask),
    }
    if sft_weight != 0.0:
        if chosen_logps is None or chosen_mask is None:
            raise ValueError("adpa: sft_weight > 0 needs chosen_logps= and chosen_mask= ((B', T') each).")
        _check("adpa", chosen_mask, chosen_logps=chosen_logps)
        nll = -_token_mean(chosen_logps, chosen_mask)
        loss = loss + sft_weight * nll
        metrics["nll"] = nll.detach().item()
    return DistillLossOutput(loss, metrics)
