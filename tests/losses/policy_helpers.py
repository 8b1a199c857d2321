"""Shared helpers of ``test_policy_kl_objectives.py`` and ``test_policy_token_selective.py`` (``tether.losses.policy``).

Conventions of those files:

* **Twins.** Every objective of ``tether.losses.policy.kl_objectives`` and ``token_selective`` is re-implemented in its
  test file, in float64, straight from the equation in its docstring (python loops over groups/positions, explicit
  ``exp``/``log``, no library helpers; the small twins here — token mean, PPO clip — are shared).
  :func:`run_against_twin` runs the library in fp32 on the same values (rounded once to fp32, then both sides see
  identical numbers), on odd shapes (B = 6 or 9, T = 7, V = 11) with ragged masks (random prompt offset and length per
  row); a gradient of 0.73 (≠ 1) is pushed from above; loss and gradients w.r.t. every differentiable input must agree
  to ``atol = rtol = 1e-5`` (mismatching indices are printed).
* **Stop-gradients.** Inputs the method treats as constants (old/ref/teacher log-probs, old logits) are passed with
  ``requires_grad=True`` and must come back with no (or an all-zero) gradient.
* **Exact expectations.** Gradient identities are checked by enumerating a small categorical (V = 5 or K = 6 arms)
  and weighting each arm by its sampling probability, in float64 — no sampling noise.
* **Bandits.** RPG (reverse KL, both styles) and GVPO are run by gradient descent on the exact expected objective
  and must land on π* ∝ π_ref·exp(r/β) within 2% total variation (the TV is printed).
"""

from __future__ import annotations

import functools

import torch

from tether.losses.policy import PolicyLossOutput
from tether.testing import assert_close

ATOL = RTOL = 1e-5  # fp32 library vs float64 twin
assert_close = functools.partial(assert_close, atol=ATOL, rtol=RTOL)
UPSTREAM = 0.73  # gradient pushed into the scalar loss from above
T = 7
V = 11
F64 = torch.float64
ONE = torch.ones(1, 1, dtype=torch.bool)


def assert_no_grad(x: torch.Tensor, name: str) -> None:
    assert x.grad is None or bool((x.grad == 0).all()), f"{name} must be stop-gradient, got grad {x.grad}"


def ragged_mask(B: int, g: torch.Generator) -> torch.Tensor:
    """Rows with a random prompt offset (masked prefix) and a random response length ≥ 1."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        length = int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[i, start : start + length] = True
    return mask


def token_batch(B: int, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """float64 per-token log-probs (policy, old, ref) and a ragged mask; log-ratios of order ``scale``."""
    g = torch.Generator().manual_seed(seed)
    logps = -0.2 - 2.0 * torch.rand(B, T, generator=g, dtype=F64)
    old = logps + scale * torch.randn(B, T, generator=g, dtype=F64)
    ref = logps + scale * torch.randn(B, T, generator=g, dtype=F64)
    return {"logps": logps, "old_logps": old, "ref_logps": ref, "mask": ragged_mask(B, g)}


def run_against_twin(lib_fn, twin_fn, tensors: dict, diff: tuple[str, ...], const: tuple[str, ...] = (), **kw):
    """Run ``lib_fn`` in fp32 and ``twin_fn`` in float64 on identical values; compare loss and gradients.

    ``diff``: inputs whose gradients are compared; ``const``: inputs that must receive no gradient.
    Returns the library output.
    """
    lib_in, twin_in = {}, {}
    for name, value in tensors.items():
        if value.is_floating_point():
            v32 = value.to(torch.float32)
            lib_in[name] = v32.clone().requires_grad_(name in diff or name in const)
            twin_in[name] = v32.to(F64).requires_grad_(name in diff)
        else:
            lib_in[name] = twin_in[name] = value
    out = lib_fn(**lib_in, **kw)
    assert isinstance(out, PolicyLossOutput) and out.loss.dim() == 0
    assert all(isinstance(v, float) for v in out.metrics.values()), out.metrics
    (out.loss * UPSTREAM).backward()
    expected = twin_fn(**twin_in, **kw)
    (expected * UPSTREAM).backward()
    assert_close(out.loss, expected, "loss")
    for name in diff:
        assert_close(lib_in[name].grad, twin_in[name].grad, f"d loss / d {name}")
    for name in const:
        assert_no_grad(lib_in[name], name)
    return out


def twin_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total, count = x.new_zeros(()), 0
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t]:
                total = total + x[i, t]
                count += 1
    return total / max(count, 1)


def twin_ppo_clip(ratio, adv, eps_low, eps_high, clip_c=None):
    """−min(ρA, clip(ρ)A), and for A < 0 at most −c·A (verl dual clip), elementwise by the book."""
    lo = torch.as_tensor(1 - eps_low, dtype=F64)
    hi = torch.as_tensor(1 + eps_high, dtype=F64)
    loss = -torch.minimum(ratio * adv, torch.minimum(torch.maximum(ratio, lo), hi) * adv)
    if clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -clip_c * adv), loss)
    return loss
