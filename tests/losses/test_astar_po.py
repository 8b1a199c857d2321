"""A*-PO's regression loss (``tether.losses.policy.astar_po``): hand-worked values and the bandit oracle.

Bandit oracle. K arms with rewards r_y, a reference π_ref and the exact optimal value V* = β·log Σ_y π_ref(y)·e^{r_y/β}
(the stage-1 estimate with infinitely many reference samples, computed by ``astar_po_values`` on the exact mixture).
A*-PO samples one arm y ~ π_θ and descends the squared residual (β·log π_θ(y)/π_ref(y) − (r_y − V*))² with the sample
held fixed, so its expected gradient is Σ_y π_θ(y)·∇ℓ_y — computed here exactly (π_θ(y) detached, one library call
per arm). Every residual vanishes at π*(y) = π_ref(y)·e^{r_y/β}/Z with Z = Σ π_ref·e^{r/β} = e^{V*/β}, and nowhere
else (Σ_y π(y) = 1 fixes the normaliser), so gradient descent must land on π*: total variation < 1e-6 (float64).
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses.policy import astar_po, astar_po_values

F64 = torch.float64


def test_loss_by_hand():
    """At θ = θ_ref the log-ratio is 0 and the loss is the mean squared optimal advantage: rewards [1, 0], V* from the
    notes' worked example 0.5·log((e² + 7)/8) ≈ 0.29351 for both prompts → ((1 − V*)² + V*²)/2; a row without loss
    tokens leaves the mean."""
    v = 0.5 * math.log((math.e ** 2 + 7) / 8)
    values = astar_po_values(torch.tensor([[1.0] + [0.0] * 7]), beta=0.5)
    assert values.item() == pytest.approx(v, abs=1e-6)
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.5], [-3.0, -3.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    out = astar_po(logps, logps.detach(), torch.tensor([1.0, 0.0, 5.0], dtype=F64),
                   torch.full((3,), v, dtype=F64), mask, beta=1e-3)
    assert out.loss.item() == pytest.approx(((1 - v) ** 2 + v ** 2) / 2, abs=1e-12)
    # gradient: d/d logps[i,t] = 2·β·(u_i − target_i)/n_rows on the row's loss tokens
    (grad,) = torch.autograd.grad(out.loss, logps)
    expected = torch.tensor([[2e-3 * -(1 - v) / 2] * 2, [2e-3 * v / 2, 0.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(grad, expected, atol=1e-15, rtol=1e-12)


def test_zero_exactly_at_the_regression_target():
    """The loss is 0 iff β·Σ_t log(π_θ/π_ref) = R − V* on every row."""
    beta = 0.1
    ref = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    rewards, values = torch.tensor([0.7], dtype=F64), torch.tensor([0.2], dtype=F64)
    logps = ref.clone()
    logps[0, 1] += (0.7 - 0.2) / beta
    out = astar_po(logps, ref, rewards, values, torch.ones(1, 3, dtype=torch.bool), beta=beta)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-24)


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_bandit_expected_gradient_descent_reaches_the_kl_regularized_optimum(beta):
    g = torch.Generator().manual_seed(0)
    K = 6
    rewards = torch.rand(K, generator=g, dtype=F64)
    ref = torch.softmax(torch.randn(K, generator=g, dtype=F64), -1)
    # exact V*: astar_po_values on the reference's exact mixture (a weighted mean exp) — via a log-sum-exp
    v_star = beta * torch.logsumexp(ref.log() + rewards / beta, 0)
    assert v_star.item() == pytest.approx(
        beta * math.log(sum(p * math.exp(r / beta) for p, r in zip(ref.tolist(), rewards.tolist()))), rel=1e-12)
    optimum = ref * torch.exp(rewards / beta)
    optimum = optimum / optimum.sum()
    theta = torch.zeros(K, dtype=F64, requires_grad=True)
    one = torch.ones(1, 1, dtype=torch.bool)
    lr = 0.5 / beta ** 2
    for n_steps in range(1, 8001):  # noqa: B007 — the count is printed
        logp = torch.log_softmax(theta, 0)
        weights = logp.exp().detach()  # the sampling distribution π_θ, held fixed as in the sampled update
        expected = sum(weights[y] * astar_po(logp[y].view(1, 1), ref[y].log().view(1, 1), rewards[y].view(1),
                                             v_star.view(1), one, beta=beta).loss for y in range(K))
        (grad,) = torch.autograd.grad(expected, theta)
        if grad.abs().max() < 1e-13:  # converged (the fixed point is where every residual is 0)
            break
        with torch.no_grad():
            theta -= lr * grad
    tv = 0.5 * (torch.softmax(theta.detach(), 0) - optimum).abs().sum().item()
    start_tv = 0.5 * (torch.full((K,), 1.0 / K, dtype=F64) - optimum).abs().sum().item()
    print(f"beta={beta}: TV(π_θ, π*) = {tv:.3e} after {n_steps} steps (from {start_tv:.3f} at the uniform start)")
    assert start_tv > 0.05
    assert tv < 1e-6
