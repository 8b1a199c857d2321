"""Private helpers shared by the modules of ``tether.losses.policy`` (notation: see its docstring).

The math itself lives elsewhere, once: PPO-clip in :func:`tether.losses.policy.ppo_clip_per_token`, aggregation in
:func:`tether.losses.policy.aggregate`, the sample KL estimators in ``tether.kl``. What is here adapts them to the
calling convention of these objectives: groups of a flat batch, the clamped ratio, one combined clip flag, and masked
means for the metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tether import kl
from tether.losses.policy.surrogates import LOG_RATIO_CLAMP, aggregate, ppo_clip_per_token


def groups(x: Tensor, group_size: int, objective: str) -> Tensor:
    """``(B,)`` → ``(B/G, G)``; a readable error when the batch is not made of complete contiguous groups."""
    if group_size < 1 or x.shape[0] % group_size != 0:
        raise ValueError(
            f"{objective}: batch of {x.shape[0]} responses is not a whole number of groups of group_size="
            f"{group_size}; keep all G responses of a prompt together and contiguous in the batch"
        )
    return x.reshape(-1, group_size)


def ratio(logps: Tensor, anchor_logps: Tensor) -> Tensor:
    """``exp(logps − anchor_logps)`` with the log-ratio clamped to ±``LOG_RATIO_CLAMP`` first (departure 2)."""
    return torch.exp((logps - anchor_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def ppo_clip(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    eps_low: float | Tensor,
    eps_high: float | Tensor,
    dual_clip: float | None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss on the clamped ratio, and one flag where either clip is active (zero gradient there).

    verl's ``compute_policy_loss_vanilla`` via :func:`tether.losses.policy.ppo_clip_per_token`; ``advantages``
    broadcastable to ``(B, T)``, ``eps_*`` floats or per-token tensors (Archer). Unlike
    :func:`tether.losses.policy.ppo_clip` it neither aggregates nor zeroes padding: the callers add their own terms
    per token before aggregating, and report a single ``clip_frac`` (clip and dual-clip together).
    """
    loss, clipped, dual_clipped = ppo_clip_per_token(ratio(logps, old_logps), advantages, eps_low, eps_high, dual_clip)
    return loss, clipped | dual_clipped


def inert(mask: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Padding made inert: every per-token input with 0 at the masked positions, before any arithmetic.

    ``mask`` is ``(B, T)``; each tensor is ``(B, T)`` or ``(B, T, V)`` (masked over its last axis), any dtype (token ids
    too); None passes through. ``torch.where`` sends exactly zero gradient to the replaced entries, so NaN, ±inf or
    an ``IGNORE_INDEX`` id there can reach neither the loss, nor the metrics, nor the gradient.
    """
    m = mask.to(torch.bool)
    out = []
    for x in tensors:
        if x is None:
            out.append(None)
            continue
        keep = m if x.dim() == m.dim() else m[..., None]
        out.append(torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)))
    return tuple(out)


def seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of each row over its valid tokens, ``(B, T)`` → ``(B,)``; a row with no valid token gives 0."""
    m = mask.to(torch.bool)
    return torch.where(m, x, torch.zeros_like(x)).sum(-1) / m.sum(-1).clamp_min(1).to(x.dtype)


def token_mean(x: Tensor, mask: Tensor) -> float:
    """Metric: the detached token-mean of ``x`` over the valid tokens, as a Python float."""
    return aggregate(x.detach(), mask, "token-mean").item()


def frac(flags: Tensor, mask: Tensor) -> float:
    """Metric: the fraction of valid tokens where the boolean ``flags`` hold (0 for an empty mask)."""
    return token_mean(flags.to(torch.float64), mask)


#: Sample estimators of KL(π_θ ‖ q) at the sampled token; see ``tether.kl`` for what each one's gradient follows.
SAMPLE_KL: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl.k1, "k2": kl.k2, "k3": kl.k3}


def sample_kl(name: str, objective: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The estimator called ``name``, with an error naming the objective and the choices."""
    if name not in SAMPLE_KL:
        raise ValueError(f"{objective}: unknown KL estimator {name!r}; choose one of {sorted(SAMPLE_KL)}")
    return SAMPLE_KL[name]
