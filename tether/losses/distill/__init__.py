"""Knowledge distillation: per-position divergences between teacher and student, and the objectives built on them.

Modules, re-exported here and from ``tether.losses``:

* ``divergences`` — pure functions ``fn(student_logits (N, V), teacher_logits (N, V), *, temperature, ...) → (N,)``:
  forward / reverse KL, GKD's generalized JSD, DistiLLM's skew KLs, total variation, AKL, SinKD's Sinkhorn cost;
  ``DIVERGENCES`` maps config names to them. ``tether.head_divergence`` evaluates them from LM-head hidden states
  in chunks.
* ``minillm`` — MiniLLM: the sequence-level reverse KL by policy gradient (teacher-mixed sampling, importance weights,
  rewards, long-term advantages, the PPO-clipped long-term term, the single-step reverse KL).
* ``dpkd`` — DPKD: a DPO loss per position on the teacher's vs the student's argmax token (and its IPO / DPOP
  variants), and the sequence-level form (DPO with the teacher as reference).
* ``preference_kd`` — DCKD and ADPA: distilling a DPO teacher through its top-k distribution (``TopK``,
  ``teacher_topk``), by forward KL on chosen and rejected responses, or by its advantages on the student's samples.

The objectives beyond a per-position divergence return ``DistillLossOutput``; it and the private helpers they share
are in ``_common``.
"""

from __future__ import annotations

from tether.losses.distill._common import DistillLossOutput
from tether.losses.distill.divergences import (
    COUPLED_DIVERGENCES,
    DIVERGENCES,
    akl,
    akl_weights,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sinkhorn,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)

# --- objectives (minillm, dpkd, preference_kd: MiniLLM, DPKD, DCKD, ADPA) -----------------------------------------
from tether.losses.distill.dpkd import (
    dpkd_sequence,
    dpkd_token,
    dpkd_token_dpop,
    dpkd_token_ipo,
    dpkd_token_per_position,
)
from tether.losses.distill.minillm import (
    minillm,
    minillm_advantages,
    minillm_importance_weights,
    minillm_long_term,
    minillm_mixture_logprobs,
    minillm_rewards,
    minillm_single_step,
)
from tether.losses.distill.preference_kd import (
    TopK,
    adpa,
    adpa_advantages,
    adpa_per_position,
    dckd,
    teacher_topk,
    topk_forward_kl,
    topk_forward_kl_per_position,
)

# ------------------------------------------------------------------------------------------------------------------

__all__ = [
    # divergences
    "COUPLED_DIVERGENCES", "DIVERGENCES", "akl", "akl_weights", "forward_kl", "generalized_jsd", "reverse_kl",
    "sinkhorn", "skew_kl", "skew_reverse_kl", "total_variation",
    # objectives
    "DistillLossOutput", "TopK", "adpa", "adpa_advantages", "adpa_per_position",
    "dckd", "dpkd_sequence", "dpkd_token", "dpkd_token_dpop",
    "dpkd_token_ipo", "dpkd_token_per_position",
    "minillm", "minillm_advantages", "minillm_importance_weights", "minillm_long_term",
    "minillm_mixture_logprobs", "minillm_rewards", "minillm_single_step", "teacher_topk", "topk_forward_kl",
    "topk_forward_kl_per_position",
]
