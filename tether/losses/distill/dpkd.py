"""DPKD: direct preference knowledge distillation (Li et al. 2024), token- and sequence-level, as pure functions.

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
``dpkd_token*``     no divergence: a Bradley–Terry loss per position on two argmax tokens (teacher's vs student's)
``dpkd_sequence``   DPO with the teacher as reference (implicit regularizer: reverse KL(q_θ ‖ p))
==================  ==========================================================================================

Sources read (public snapshots) and what was confirmed:

* DPKD — Li, Gu, Dong, Wang, Cheng, Wei 2024, "Direct Preference Knowledge Distillation for Large Language Models",
  arXiv:2406.19774v2: §2.2 Eqs. 6–9 and Algorithm 1 read in a public copy of the paper text. Official code
  microsoft/LMOps @ 4f2a9de ``dpkd/main.py`` (``get_distil_loss``, ``--seqKD-DPO`` branch), ``dpkd/arguments.py``,
  ``dpkd/scripts/dpkd-gpt2_base_runner.sh``.

Left out:

* The DPKD ``--simpo`` option (divides each position's loss by a count of non-repeating student argmax tokens / 256):
  undocumented in the paper; the plain DPKD path does not use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from tether.losses.distill._common import DistillLossOutput, _check, _inert, _mean
from tether.losses.policy import aggregate
from tether.losses.preference import PreferenceLossOutput

__all__ = [
    "dpkd_sequence",
    "dpkd_token",
    "dpkd_token_dpop",
    "dpkd_token_ipo",
    "dpkd_token_per_position",
]


class _ArgmaxMargin(NamedTuple):
    h: Tensor  # (B, T) student margin minus teacher margin
    student_teacher_token: Tensor  # (B, T) log q_θ(a_T)
    teacher_teacher_token: Tensor  # (B, T) log p(a_T)
    agree: Tensor  # (B, T) a_T == a_S


def _dpkd_margin(fn: str, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, reference_free: bool):
    """``h_t`` of DPKD's token-level instantiation (official ``get_distil_loss``, ``--seqKD-DPO``)."""
    _check(fn, mask, student_logits=student_logits, teacher_logits=teacher_logits)
    student_logp = F.log_softmax(_inert(mask, student_logits), dim=-1)
    teacher_logp = F.log_softmax(_inert(mask, teacher_logits.detach()).to(student_logp.dtype), dim=-1)
    a_t = teacher_logp.argmax(dim=-1, keepdim=True)
    a_s = student_logp.detach().argmax(dim=-1, keepdim=True)
    s_t, s_s = student_logp.gather(-1, a_t).squeeze(-1), student_logp.gather(-1, a_s).squeeze(-1)
    t_t, t_s = teacher_logp.gather(-1, a_t).squeeze(-1), teacher_logp.gather(-1, a_s).squeeze(-1)
    h = s_t - s_s if reference_free else (s_t - s_s) - (t_t - t_s)
    return _ArgmaxMargin(_inert(mask, h), s_t, t_t, (a_t == a_s).squeeze(-1))


def _dpkd_metrics(m: _ArgmaxMargin, mask: Tensor) -> dict[str, float]:
    return {"margin": _mean(m.h, mask), "argmax_agree": _mean(m.agree, mask), "accuracy": _mean(m.h > 0, mask)}


def dpkd_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> DistillLossOutput:
    """DPKD as the official code implements it: a DPO loss per position between two argmax tokens.

    Equation (official ``dpkd/main.py::get_distil_loss``, ``--seqKD-DPO``; the paper's Eq. 8 at one position)::

        a_T = argmax_v p(v|s_t),   a_S = argmax_v q_θ(v|s_t)                      (no gradient through argmax)
        h_t = [log q_θ(a_T|s_t) − log q_θ(a_S|s_t)] − [log p(a_T|s_t) − log p(a_S|s_t)]   (teacher term 0 if
                                                                                         reference_free)
        L_t = (1 − ε)·softplus(−β·h_t) + ε·softplus(β·h_t)       = −(1−ε) log σ(βh) − ε log σ(−βh)
        L   = aggregate(L_t)                                       official: token mean over valid positions

    The teacher's argmax plays the chosen response, the student's the rejected one, the teacher the reference —
    under teacher forcing on the TRAINING TARGET (the dataset response), not on sampled outputs. Where the two
    argmaxes agree ``h_t ≡ 0``: the position costs log 2 and has zero gradient, but still counts in the mean.

    Shape: ``student_logits`` (B, T, V) differentiable; ``teacher_logits`` (B, T, V); ``mask`` (B, T). 0-dim loss.

    Args:
        beta: β (official ``--dpo-beta``, default 0.1).
        label_smoothing: ε ∈ [0, 0.5] (official ``--label-smoothing``, default 0).
        reference_free: drop the teacher's margin (official ``--reference-free``).

    Examples: q = p ⇒ a_T = a_S everywhere ⇒ L = log 2, gradient 0. One position with log q(a_T) = −2,
    log q(a_S) = −1, log p(a_T) = −0.5, log p(a_S) = −3, β = 0.1: h = (−2 + 1) − (−0.5 + 3) = −3.5,
    L = softplus(0.35) = log(1 + e^0.35) = 0.883382; reference-free h = −1, L = softplus(0.1) = 0.744397.
    Metrics: ``margin`` (mean h), ``argmax_agree``, ``accuracy`` (fraction h > 0).
    The full official loss is ``(1 − kd_ratio)·NLL + kd_ratio·L + lm_coef·L_LMPT`` (kd_ratio 0.5, lm_coef 0.5):
    the recipe's. Stop-gradient: the teacher, both argmaxes.
    Departures: log-softmax in the input dtype (the official code uses bf16); the official code fills the student's
    log-probs at −inf logits with 0 BEFORE its argmax, so with a padded vocabulary its student argmax can land on a
    padded slot — here −inf entries never win the argmax.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpkd_token: label_smoothing ε must lie in [0, 0.5], got {label_smoothing}.")
    m = _dpkd_margin("dpkd_token", student_logits, teacher_logits, mask, reference_free)
    z = beta * m.h
    per_token = F.softplus(-z)
    if label_smoothing > 0:
        per_token = (1.0 - label_smoothing) * per_token + label_smoothing * F.softplus(z)
    return DistillLossOutput(aggregate(per_token, mask, agg, max_len), _dpkd_metrics(m, mask))


def dpkd_token_per_position(
    student_logps_teacher_argmax: Tensor,
    student_logps_student_argmax: Tensor,
    teacher_logps_teacher_argmax: Tensor,
    teacher_logps_student_argmax: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> Tensor:
    """The per-position loss ``L_t`` of :func:`dpkd_token` from the four log-probs at the two argmax tokens.

    For a caller that never holds (B, T, V) logits (``tether.recipes.distill`` finds both argmaxes chunk by chunk
    over the LM head without gradient, then gathers the student's log-probs at them with gradient)::

        h_t = [log q_θ(a_T) − log q_θ(a_S)] − [log p(a_T) − log p(a_S)]      (teacher term 0 if reference_free)
        L_t = (1 − ε)·softplus(−β·h_t) + ε·softplus(β·h_t)

    The token mean of ``L_t`` over valid positions is ``dpkd_token(...).loss`` (forward and backward,
    ``test_dpkd_token_per_position_matches_dpkd_token``).

    Shape: four (N,) tensors (or any one shape) — log q_θ(a_T), log q_θ(a_S) differentiable; log p(a_T), log p(a_S)
    constants; output the same shape. Stop-gradient: the teacher's log-probs (and the argmaxes, by construction).
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpkd_token_per_position: label_smoothing ε must lie in [0, 0.5], got {label_smoothing}.")
    h = student_logps_teacher_argmax - student_logps_student_argmax
    if not reference_free:
        h = h - (teacher_logps_teacher_argmax - teacher_logps_student_argmax).detach()
    z = beta * h
    per_position = F.softplus(-z)
    if label_smoothing > 0:
        per_position = (1.0 - label_smoothing) * per_position + label_smoothing * F.softplus(z)
    return per_position


def dpkd_token_ipo(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.1,
    reference_free: bool = False,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> DistillLossOutput:
    """DPKD's IPO variant (official ``--ipo``): ``L_t = (h_t − 1/(2β))²``, token mean.

    ``h_t`` as in :func:`dpkd_token`; the squared loss is Azar et al. 2023 (arXiv:2310.12036) Eq. 17 per position.
    At q = p, ``h = 0`` and ``L = 1/(4β²)`` (25 at β = 0.1); in the worked example of :func:`dpkd_token`,
    ``(−3.5 − 5)² = 72.25``. Shapes as :func:`dpkd_token`. Departures: as :func:`dpkd_token`.
    """
    m = _dpkd_margin("dpkd_token_ipo", student_logits, teacher_logits, mask, reference_free)
    per_token = (m.h - 1.0 / (2.0 * beta)).square()
    return DistillLossOutput(aggregate(per_token, mask, agg, max_len), _dpkd_metrics(m, mask))


def dpkd_token_dpop(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.1,
    dpop_lambda: float = 50.0,
    reference_free: bool = False,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> DistillLossOutput:
    """DPKD's DPOP variant (official ``--DPOP``, λ = ``--DPOP-lambda`` 50): a penalty when q_θ(a_T) < p(a_T).

    Equation::

        L_t = softplus(−β·h_t) + λ·max(0, log p(a_T|s_t) − log q_θ(a_T|s_t))

    In the worked example of :func:`dpkd_token`: 0.883382 + 50·(−0.5 + 2) = 75.883382. Shapes as
    :func:`dpkd_token`. Departures: as :func:`dpkd_token`.
    """
    m = _dpkd_margin("dpkd_token_dpop", student_logits, teacher_logits, mask, reference_free)
    penalty = (m.teacher_teacher_token - m.student_teacher_token).clamp(min=0.0)
    per_token = F.softplus(-beta * m.h) + dpop_lambda * penalty
    return DistillLossOutput(aggregate(per_token, mask, agg, max_len), _dpkd_metrics(m, mask))


def dpkd_sequence(
    student_logps_teacher_out: Tensor,
    student_logps_student_out: Tensor,
    teacher_logps_teacher_out: Tensor,
    teacher_logps_student_out: Tensor,
    *,
    beta: float = 0.1,
    teacher_out_lengths: Tensor | None = None,
    student_out_lengths: Tensor | None = None,
) -> PreferenceLossOutput:
    """DPKD as the paper writes it: Bradley–Terry preference of the teacher's output over the student's.

    Equation (DPKD, arXiv:2406.19774, §2.2 Eq. 8; Eq. 9 with lengths)::

        u = β·[log q_θ(y_T|x) − log p(y_T|x)] − β·[log q_θ(y_S|x) − log p(y_S|x)]
        L = −log σ(u) = softplus(−u)
        Eq. 9 (Algorithm 1): β → β/|y_T| on the first bracket and β/|y_S| on the second

    This is DPO (``tether.losses.preference.dpo``) with chosen = a teacher sample ``y_T``, rejected = a student sample
    ``y_S`` and the TEACHER as the reference; the implicit reward is ``β·log(q_θ/p)`` (Eq. 5), i.e. the regularizer
    is the reverse KL(q_θ ‖ p) of Eq. 2.

    Shape: all four inputs (B,) summed response log-probs (teacher output under student/teacher, student output
    under student/teacher); lengths (B,) response token counts; outputs (B,) (the recipe takes the mean).
    Returns ``PreferenceLossOutput(loss, chosen_rewards = β·(LP_q − LP_p)(y_T), rejected_rewards = … (y_S))``.
    Stop-gradient: the teacher's log-probs are data. Departures: none from Eq. 8/9; the official code does not
    implement this form (it is the token-level :func:`dpkd_token`).
    """
    if (teacher_out_lengths is None) != (student_out_lengths is None):
        raise ValueError("dpkd_sequence: pass both teacher_out_lengths and student_out_lengths (Eq. 9) or neither.")
    chosen = student_logps_teacher_out - teacher_logps_teacher_out.detach()
    rejected = student_logps_student_out - teacher_logps_student_out.detach()
    if teacher_out_lengths is not None:
        chosen = chosen / teacher_out_lengths.to(chosen.dtype)
        rejected = rejected / student_out_lengths.to(rejected.dtype)
    u = beta * (chosen - rejected)
    return PreferenceLossOutput(F.softplus(-u), beta * chosen.detach(), beta * rejected.detach())
