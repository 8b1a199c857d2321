"""KL estimators and divergences between categorical distributions — pure tensor math.

Conventions used throughout tether:

* The first argument is always the distribution being trained (policy / student, written π or q); the second is
  the anchor (reference π_ref, teacher p, or old policy). "Reverse KL" means KL(π ‖ π_ref); "forward KL" means
  KL(π_ref ‖ π) — in distillation, KL(teacher ‖ student).
* Functions over distributions take *logits* (or log-probabilities: they are normalised with ``log_softmax`` over
  the last dimension, which leaves log-probabilities unchanged) and return one value per leading index, i.e. the
  last dimension is reduced. Entries with probability zero (logit ``-inf``, e.g. padded vocabulary slots) contribute
  exactly zero, with finite gradients.
* The sample-based estimators ``k1``/``k2``/``k3`` take the log-probabilities of the *sampled* tokens under the two
  distributions and return one estimate per token.

Value vs. gradient (Schulman, "Approximating KL divergence", 2020):
With tokens sampled from π (on-policy), ℓ = log π(a) − log q(a), r = q(a)/π(a):

=========  =====================  ==============================  =========================================
estimator  per-token value        E_π[value]                      E_π[∇ value] when placed in the *loss*
=========  =====================  ==============================  =========================================
k1         ℓ                      KL(π‖q) (unbiased)              0 — no regularisation, only noise
k2         ½ ℓ²                   ≈ KL(π‖q) (biased, 2nd order)   ∇ KL(π‖q) — exact reverse-KL gradient
k3         r − 1 − log r  (≥ 0)   KL(π‖q) (unbiased)              ∇ KL(q‖π) — the *forward*-KL gradient
=========  =====================  ==============================  =========================================

Placed in the *reward* (detached, multiplied by ∇log π): k1 gives ∇KL(π‖q); k3 gives ∇KL(π‖q) − ∇KL(q‖π).
Off-policy (samples from π_old, w = π/π_old): ``w·k3`` differentiated through both factors gives ∇KL(π‖q).
These identities are verified by exact enumeration in ``tests/test_kl.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "k1",
    "k2",
    "k3",
    "entropy",
    "reverse_kl",
    "forward_kl",
    "js_divergence",
    "alpha_divergence",
    "total_variation",
    "generalized_jsd",
]


# --------------------------------------------------------------------------------------------------------------
# Sample-based per-token estimators of KL(π ‖ q), with a ~ π.  Shapes: any, elementwise.
# --------------------------------------------------------------------------------------------------------------


def k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log π(a) − log q(a). Unbiased for KL(π‖q); its expected gradient in the loss is zero.

    Placed in the reward (detached, REINFORCE/PPO style) it gives the exact reverse-KL gradient ∇KL(π‖q).
    """
    return logps - ref_logps


def k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = ½ (log π(a) − log q(a))². Biased value; in the loss its expected gradient is exactly ∇KL(π‖q)."""
    return 0.5 * (logps - ref_logps).square()


def k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = q(a)/π(a) − 1 − log(q(a)/π(a)) ≥ 0. Unbiased for KL(π‖q).

    In the loss (on-policy) its expected gradient is ∇KL(q‖π) — the *forward* KL — not the reverse KL its value
    estimates. Off-policy, multiply by the importance weight w = π/π_old (kept differentiable) to recover ∇KL(π‖q).
    """
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio


# --------------------------------------------------------------------------------------------------------------
# Exact divergences over the last dimension.  Shapes: (..., V) logits → (...).
# --------------------------------------------------------------------------------------------------------------


def _plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """Σ_v p_v (log p_v − log q_v) with 0·log 0 = 0 (finite gradients where p_v = 0)."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def entropy(logits: Tensor) -> Tensor:
    """H(π) = −Σ_v π_v log π_v."""
    logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def reverse_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(π ‖ π_ref) = Σ_v π_v (log π_v − log π_ref,v), exact over the vocabulary. Mode-seeking."""
    return _plogp_ratio(F.log_softmax(logits, dim=-1), F.log_softmax(ref_logits, dim=-1))


def forward_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(π_ref ‖ π) = Σ_v π_ref,v (log π_ref,v − log π_v), exact. Mass-covering (distillation's "forward KL")."""
    return _plogp_ratio(F.log_softmax(ref_logits, dim=-1), F.log_softmax(logits, dim=-1))


def _mixture_logp(logp: Tensor, logq: Tensor, weight_p: float) -> Tensor:
    """log(w·p + (1−w)·q) for 0 < w < 1; −inf (with zero gradient) where both probabilities are zero."""
    m = weight_p * logp.exp() + (1.0 - weight_p) * logq.exp()
    positive = m > 0
    safe_log = torch.log(torch.where(positive, m, torch.ones_like(m)))
    return torch.where(positive, safe_log, torch.full_like(m, -torch.inf))


def js_divergence(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Jensen–Shannon divergence ½ KL(π ‖ m) + ½ KL(π_ref ‖ m), m = ½(π + π_ref). Symmetric, ≤ log 2."""
    return generalized_jsd(logits, ref_logits, beta=0.5)


def alpha_divergence(logits: Tensor, ref_logits: Tensor, alpha: float = 0.5) -> Tensor:
    """α-divergence in the f-DPO paper's convention (Wang et al., 2023, "Beyond Reverse KL").

    D_α(π ‖ π_ref) = Σ_v π_ref,v f(π_v/π_ref,v) with f(u) = (u^{1−α} − (1−α)u − α) / (α(α−1)), which simplifies to
    (1 − Σ_v π_v^{1−α} π_ref,v^α) / (α(1−α)).  α → 0 gives the reverse KL(π‖π_ref), α → 1 the forward KL(π_ref‖π);
    α = ½ is symmetric (four times the squared Hellinger distance). The endpoints are returned exactly.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha_divergence: alpha must be in [0, 1] (0 = reverse KL, 1 = forward KL), got {alpha}")
    if alpha == 0.0:
        return reverse_kl(logits, ref_logits)
    if alpha == 1.0:
        return forward_kl(logits, ref_logits)
    logp = F.log_softmax(logits, dim=-1)
    logq = F.log_softmax(ref_logits, dim=-1)
    log_overlap = torch.logsumexp((1.0 - alpha) * logp + alpha * logq, dim=-1)
    return -torch.expm1(log_overlap) / (alpha * (1.0 - alpha))


def total_variation(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Total variation distance ½ Σ_v |π_v − π_ref,v| ∈ [0, 1]."""
    return 0.5 * (F.softmax(logits, dim=-1) - F.softmax(ref_logits, dim=-1)).abs().sum(-1)


def generalized_jsd(logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD of GKD (Agarwal et al., 2024): β·KL(p ‖ M) + (1−β)·KL(q ‖ M), M = β·p + (1−β)·q.

    q = student (``logits``), p = teacher (``teacher_logits``). The mixture is formed in probability space with
    logsumexp (not the geometric mixture of early TRL versions). The raw formula vanishes at both endpoints; as in
    TRL, β = 0 returns the forward KL(p ‖ q) and β = 1 the reverse KL(q ‖ p).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(logits, teacher_logits)
    logq = F.log_softmax(logits, dim=-1)
    logp = F.log_softmax(teacher_logits, dim=-1)
    logm = _mixture_logp(logp, logq, beta)
    return beta * _plogp_ratio(logp, logm) + (1.0 - beta) * _plogp_ratio(logq, logm)
