"""Knowledge distillation: per-position divergences between teacher and student, and the objectives built on them.

Modules, re-exported here and from ``tether.losses``:

* ``divergences`` — pure functions ``fn(student_logits (N, V), teacher_logits (N, V), *, temperature, ...) → (N,)``:
  forward / reverse KL, GKD's generalized JSD, DistiLLM's skew KLs, total variation, AKL, SinKD's Sinkhorn cost;
  ``DIVERGENCES`` maps config names to them. ``tether.head_divergence`` evaluates them from LM-head hidden states
  in chunks.
* ``objectives`` — distillation objectives beyond a per-position divergence (MiniLLM, DPKD, DCKD, ADPA).
"""

from __future__ import annotations

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

# --- objectives (tether.losses.distill.objectives: MiniLLM, DPKD, DCKD, ADPA) --------------------------------------
from tether.losses.distill.objectives import (
    DistillLossOutput,
    TopK,
    adpa,
    adpa_advantages,
    dckd,
    dpkd_sequence,
    dpkd_token,
    dpkd_token_dpop,
    dpkd_token_ipo,
    minillm,
    minillm_advantages,
    minillm_importance_weights,
    minillm_long_term,
    minillm_mixture_logprobs,
    minillm_rewards,
    minillm_single_step,
    teacher_topk,
    topk_forward_kl,
)

# ------------------------------------------------------------------------------------------------------------------

__all__ = [
    # divergences
    "COUPLED_DIVERGENCES", "DIVERGENCES", "akl", "akl_weights", "forward_kl", "generalized_jsd", "reverse_kl",
    "sinkhorn", "skew_kl", "skew_reverse_kl", "total_variation",
    # objectives
    "DistillLossOutput", "TopK", "adpa", "adpa_advantages", "dckd", "dpkd_sequence", "dpkd_token", "dpkd_token_dpop",
    "dpkd_token_ipo", "minillm", "minillm_advantages", "minillm_importance_weights", "minillm_long_term",
    "minillm_mixture_logprobs", "minillm_rewards", "minillm_single_step", "teacher_topk", "topk_forward_kl",
]
