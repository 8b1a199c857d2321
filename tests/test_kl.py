"""KL estimators and divergences, checked by exact enumeration on small categoricals in float64.

Expectations over a sampling distribution are computed as Σ_a prob(a)·value(a) — no Monte Carlo — and gradients
of those expectations are compared with autograd of the closed-form divergences.
"""

import math

import pytest
import torch

from tether import kl

V = 5


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64)


def _expected_grad(theta, sampler_probs, per_action_value):
    """∇_θ Σ_a sampler(a)·value_θ(a) with the sampler's probabilities held fixed (samples are data)."""
    total = (sampler_probs.detach() * per_action_value).sum()
    (g,) = torch.autograd.grad(total, theta, retain_graph=True)
    return g


@pytest.fixture
def dists():
    theta = _logits(0).requires_grad_(True)
    ref = _logits(1)
    old = _logits(2)
    return theta, ref, old


def test_k1_k3_values_are_unbiased_and_k3_nonnegative(dists):
    theta, ref, _ = dists
    logp, logq = theta.log_softmax(-1), ref.log_softmax(-1)
    p = logp.exp()
    exact = kl.reverse_kl(theta, ref)
    assert torch.allclose((p * kl.k1(logp, logq)).sum(), exact, atol=1e-12)
    assert torch.allclose((p * kl.k3(logp, logq)).sum(), exact, atol=1e-12)
    assert (kl.k3(logp, logq) >= 0).all()
    # k2 is biased: its expectation differs from the KL for these distributions.
    assert abs((p * kl.k2(logp, logq)).sum() - exact) > 1e-3


def test_estimator_gradients_in_the_loss(dists):
    """On-policy: E[∇k1] = 0, E[∇k2] = ∇KL(π‖q), E[∇k3] = ∇KL(q‖π)."""
    theta, ref, _ = dists
    logp, logq = theta.log_softmax(-1), ref.log_softmax(-1)
    p = logp.exp()
    (g_rev,) = torch.autograd.grad(kl.reverse_kl(theta, ref), theta)
    (g_fwd,) = torch.autograd.grad(kl.forward_kl(theta, ref), theta)
    assert torch.allclose(_expected_grad(theta, p, kl.k1(logp, logq)), torch.zeros(V, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(_expected_grad(theta, p, kl.k2(logp, logq)), g_rev, atol=1e-12)
    assert torch.allclose(_expected_grad(theta, p, kl.k3(logp, logq)), g_fwd, atol=1e-12)
    assert not torch.allclose(g_rev, g_fwd, atol=1e-3)  # the two KLs really differ here


def test_estimator_gradients_in_the_reward(dists):
    """Detached estimator × ∇log π: k1 gives ∇KL(π‖q); k3 gives ∇KL(π‖q) − ∇KL(q‖π)."""
    theta, ref, _ = dists
    logp, logq = theta.log_softmax(-1), ref.log_softmax(-1)
    p = logp.exp()
    (g_rev,) = torch.autograd.grad(kl.reverse_kl(theta, ref), theta)
    (g_fwd,) = torch.autograd.grad(kl.forward_kl(theta, ref), theta)
    reinforce_k1 = _expected_grad(theta, p, kl.k1(logp, logq).detach() * logp)
    reinforce_k3 = _expected_grad(theta, p, kl.k3(logp, logq).detach() * logp)
    assert torch.allclose(reinforce_k1, g_rev, atol=1e-12)
    assert torch.allclose(reinforce_k3, g_rev - g_fwd, atol=1e-12)


def test_off_policy_k3_needs_the_importance_weight(dists):
    theta, ref, old = dists
    logp, logq, logold = theta.log_softmax(-1), ref.log_softmax(-1), old.log_softmax(-1)
    p_old = logold.exp()
    (g_rev,) = torch.autograd.grad(kl.reverse_kl(theta, ref), theta)
    (g_fwd,) = torch.autograd.grad(kl.forward_kl(theta, ref), theta)
    w = (logp - logold).exp()
    assert torch.allclose(_expected_grad(theta, p_old, w * kl.k3(logp, logq)), g_rev, atol=1e-12)
    unweighted = _expected_grad(theta, p_old, kl.k3(logp, logq))
    assert not torch.allclose(unweighted, g_rev, atol=1e-3)
    assert not torch.allclose(unweighted, g_fwd, atol=1e-3)


def test_divergences_against_brute_force():
    p_logits, q_logits = _logits(3), _logits(4)
    p, q = p_logits.softmax(-1).tolist(), q_logits.softmax(-1).tolist()
    rev = sum(a * math.log(a / b) for a, b in zip(p, q))
    fwd = sum(b * math.log(b / a) for a, b in zip(p, q))
    m = [(a + b) / 2 for a, b in zip(p, q)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    tv = 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    alpha = 0.3
    alpha_div = (1 - sum(a ** (1 - alpha) * b ** alpha for a, b in zip(p, q))) / (alpha * (1 - alpha))
    ent = -sum(a * math.log(a) for a in p)
    assert kl.reverse_kl(p_logits, q_logits).item() == pytest.approx(rev, abs=1e-12)
    assert kl.forward_kl(p_logits, q_logits).item() == pytest.approx(fwd, abs=1e-12)
    assert kl.js_divergence(p_logits, q_logits).item() == pytest.approx(js, abs=1e-12)
    assert kl.total_variation(p_logits, q_logits).item() == pytest.approx(tv, abs=1e-12)
    assert kl.alpha_divergence(p_logits, q_logits, alpha).item() == pytest.approx(alpha_div, abs=1e-12)
    assert kl.entropy(p_logits).item() == pytest.approx(ent, abs=1e-12)


def test_alpha_divergence_limits():
    p_logits, q_logits = _logits(5), _logits(6)
    rev, fwd = kl.reverse_kl(p_logits, q_logits), kl.forward_kl(p_logits, q_logits)
    assert torch.allclose(kl.alpha_divergence(p_logits, q_logits, 1e-6), rev, atol=1e-5)
    assert torch.allclose(kl.alpha_divergence(p_logits, q_logits, 1 - 1e-6), fwd, atol=1e-5)
    assert torch.equal(kl.alpha_divergence(p_logits, q_logits, 0.0), rev)
    # α = ½ is symmetric.
    assert torch.allclose(kl.alpha_divergence(p_logits, q_logits, 0.5), kl.alpha_divergence(q_logits, p_logits, 0.5))
    with pytest.raises(ValueError, match="alpha"):
        kl.alpha_divergence(p_logits, q_logits, 1.5)


def test_generalized_jsd_golden_and_endpoints():
    """Spec §18 (c): p = [0.5, 0.5] (teacher), q = [0.9, 0.1] (student), β = 0.5 ⇒ 0.101749."""
    q_logits = torch.tensor([0.9, 0.1], dtype=torch.float64).log()
    p_logits = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    assert kl.generalized_jsd(q_logits, p_logits, 0.5).item() == pytest.approx(0.101749, abs=1e-6)
    assert kl.generalized_jsd(q_logits, p_logits, 0.5) <= math.log(2)
    assert torch.equal(kl.generalized_jsd(q_logits, p_logits, 0.0), kl.forward_kl(q_logits, p_logits))
    assert torch.equal(kl.generalized_jsd(q_logits, p_logits, 1.0), kl.reverse_kl(q_logits, p_logits))
    assert kl.generalized_jsd(p_logits, p_logits, 0.3).item() == pytest.approx(0.0, abs=1e-15)


def test_zero_probability_entries_are_exact_and_have_finite_gradients():
    """A padded vocabulary slot (logit −inf in both) contributes nothing and yields no NaN gradient."""
    p_logits = torch.tensor([0.2, -1.0, float("-inf"), 0.5], dtype=torch.float64, requires_grad=True)
    q_logits = torch.tensor([0.0, 0.3, float("-inf"), -0.4], dtype=torch.float64)
    finite = kl.reverse_kl(p_logits[[0, 1, 3]], q_logits[[0, 1, 3]])
    for fn in (kl.reverse_kl, kl.forward_kl, kl.js_divergence, kl.total_variation):
        value = fn(p_logits, q_logits)
        (g,) = torch.autograd.grad(value, p_logits)
        assert torch.isfinite(value) and torch.isfinite(g).all(), fn.__name__
    assert torch.allclose(kl.reverse_kl(p_logits, q_logits), finite)
    assert torch.isfinite(kl.entropy(p_logits))


def test_batched_shapes_reduce_the_last_dim():
    a, b = torch.randn(3, 4, 7, dtype=torch.float64), torch.randn(3, 4, 7, dtype=torch.float64)
    for fn in (kl.reverse_kl, kl.forward_kl, kl.js_divergence, kl.total_variation, kl.entropy):
        out = fn(a, b) if fn is not kl.entropy else fn(a)
        assert out.shape == (3, 4)
    assert torch.allclose(kl.reverse_kl(a, a), torch.zeros(3, 4, dtype=torch.float64), atol=1e-12)
