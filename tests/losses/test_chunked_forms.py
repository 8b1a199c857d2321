"""TROLL and the critical-token KL on chunked statistics (``tether.losses.policy.chunked_forms``) against their
full-logit forms (``tether.losses.policy.token_selective``).

In float64 the sparse form gets its statistics straight from the logits (top-K of π_old, log-probs of π_θ at those ids,
log-masses off them) and must equal the full form in loss, metrics and the gradient w.r.t. the policy logits to 1e-9
(both bisect the same monotone function on the same atoms; the full form builds them over the vocabulary). Then the
whole chain at fp32 — statistics from ``tether.logprobs.token_stats`` in chunks, gradient w.r.t. hidden states and
head — against the full form on the materialized logits, at atol 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.logprobs import IGNORE_INDEX, token_stats
from tether.losses.policy import critical_token_kl, troll
from tether.losses.policy.chunked_forms import critical_token_kl_from_max, ppo_critical_token_kl, troll_sparse

F64 = torch.float64
B, T, V, K = 3, 9, 13, 5


def _mask(g):
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (start, length) in enumerate([(0, 9), (2, 4), (3, 0)]):
        mask[i, start:start + length] = True
    return mask


def sparse_inputs(logits, old_logits, k):
    """What the scoring and update passes compute, straight from full logits (any dtype)."""
    old = torch.log_softmax(old_logits, -1)
    top = old.topk(k, -1)
    new = torch.log_softmax(logits, -1)
    return dict(support_ids=top.indices, old_support_logps=top.values,
                old_rest_logp=old.scatter(-1, top.indices, -math.inf).logsumexp(-1),
                support_logps=new.gather(-1, top.indices),
                rest_logp=new.scatter(-1, top.indices, -math.inf).logsumexp(-1))


@pytest.mark.parametrize("support_mass", [None, 0.9, 1.0 - 1e-5])
@pytest.mark.parametrize("eps", [0.02, 0.3])
def test_troll_sparse_equals_full_logit_form_float64(support_mass, eps):
    """Value, metrics and d loss / d logits; sampled tokens both inside and outside the support (the tokens are
    drawn uniformly over 13 ids, the support holds at most 5)."""
    g = torch.Generator().manual_seed(0)
    logits = (1.5 * torch.randn(B, T, V, generator=g, dtype=F64)).requires_grad_()
    old_logits = logits.detach() + 0.8 * torch.randn(B, T, V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    adv = torch.tensor([1.0, -0.7, 0.4], dtype=F64)
    mask = _mask(g)
    full = troll(logits, old_logits, tokens, adv, mask, eps=eps, alpha=0.5, max_support=K,
                 support_mass=support_mass)
    (g_full,) = torch.autograd.grad(0.73 * full.loss, logits)
    s = sparse_inputs(logits, old_logits, K)
    old_logps = torch.log_softmax(old_logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    logps = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    sparse = troll_sparse(logps, old_logps, s["support_logps"], s["rest_logp"], s["old_support_logps"],
                          s["old_rest_logp"], s["support_ids"], tokens, adv, mask, eps=eps, alpha=0.5,
                          support_mass=support_mass)
    (g_sparse,) = torch.autograd.grad(0.73 * sparse.loss, logits)
    print(f"loss full {full.loss.item():.12f} sparse {sparse.loss.item():.12f}; "
          f"max |Δgrad| {(g_full - g_sparse).abs().max().item():.2e}; {sparse.metrics}")
    assert 0.0 < sparse.metrics["projected_frac"] < 1.0, "some tokens must be projected and some not"
    assert 0.0 < sparse.metrics["sampled_in_support"] < 1.0, "tokens inside and outside the support"
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g_sparse, g_full, atol=1e-9, rtol=1e-7)
    for key in ("projected_frac", "kl_old_before", "kl_old_after", "regression"):
        assert sparse.metrics[key] == pytest.approx(full.metrics[key], abs=1e-9), key
    assert g_sparse[2].abs().max() == 0 and g_sparse[~mask].abs().max() == 0  # padding gets no gradient


def test_troll_sparse_chunked_statistics_match_full_form_fp32():
    """The recipe's path at fp32: old top-K from a no-grad ``token_stats`` pass, the policy's support statistics
    from a differentiable one; loss and gradients w.r.t. hidden states and LM head equal the full-logit form's on
    the same logits (atol 1e-5). The bisection's tolerance (2^-60 in t) is far below fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    H, Vb = 17, 41
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(Vb, H, generator=g)).requires_grad_()
    old_hidden = hidden.detach() + 0.5 * torch.randn(B, T, H, generator=g)
    mask = _mask(g)
    labels = torch.where(mask, torch.randint(0, Vb, (B, T), generator=g), IGNORE_INDEX)
    adv = torch.tensor([1.0, -0.7, 0.4])
    with torch.no_grad():
        old = token_stats(old_hidden, weight, labels, stats=("logps", "topk_ids", "topk_logps", "topk_rest"),
                          top_k=K, chunk_size=4)
    new = token_stats(hidden, weight, labels, stats=("logps", "support_logps", "support_rest"),
                      support_ids=old["topk_ids"], chunk_size=4)
    tokens = labels.clamp_min(0)
    sparse = troll_sparse(new["logps"], old["logps"], new["support_logps"], new["support_rest"], old["topk_logps"],
                          old["topk_rest"], old["topk_ids"], tokens, adv, mask, eps=0.05)
    grads_s = torch.autograd.grad(sparse.loss, (hidden, weight))
    full = troll(hidden @ weight.T, old_hidden @ weight.detach().T, tokens, adv, mask, eps=0.05, max_support=K)
    grads_f = torch.autograd.grad(full.loss, (hidden, weight))
    assert sparse.metrics["projected_frac"] > 0
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("hidden", "weight"), grads_s, grads_f):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_troll_sparse_inside_the_trust_region_is_the_plain_ratio_objective():
    """Hand-worked: when π_θ = π_old at every position nothing is projected, the regression is 0 and the loss is the
    token-mean of −A (ratio 1), whatever the support."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    s = sparse_inputs(logits, logits, K)
    tokens = torch.randint(0, V, (B, T), generator=g)
    logps = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    adv = torch.tensor([1.0, -0.7, 0.4], dtype=F64)
    mask = _mask(g)
    out = troll_sparse(logps, logps, s["support_logps"], s["rest_logp"], s["old_support_logps"], s["old_rest_logp"],
                       s["support_ids"], tokens, adv, mask)
    expected = -(adv[:, None] * mask).sum() / mask.sum()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert out.metrics["projected_frac"] == 0.0 and out.metrics["regression"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_critical_token_kl_from_max_equals_full_logit_form(estimator):
    """Same loss and gradient w.r.t. the log-probs as :func:`critical_token_kl` given the reference's logits, with
    the max log-probability at T' = 4 taken from ``token_stats`` (fp32, atol 1e-6)."""
    g = torch.Generator().manual_seed(3)
    H = 11
    ref_hidden = torch.randn(B, T, H, generator=g)
    ref_weight = 2.0 * torch.randn(V, H, generator=g)
    mask = _mask(g)
    labels = torch.where(mask, torch.randint(0, V, (B, T), generator=g), IGNORE_INDEX)
    ref_max = token_stats(ref_hidden, ref_weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                          stats=("ref_max_logp",), ref_max_temperature=4.0)["ref_max_logp"]
    logps = (-0.3 - torch.rand(B, T, generator=g)).requires_grad_()
    ref_logps = -0.3 - torch.rand(B, T, generator=g)
    kw = dict(kl_coef=5.0, estimator=estimator, rho=3.0)
    full = critical_token_kl(logps, ref_logps, ref_hidden @ ref_weight.T, mask, ref_temperature=4.0, **kw)
    (g_full,) = torch.autograd.grad(full.loss, logps)
    sparse = critical_token_kl_from_max(logps, ref_logps, ref_max, mask, vocab_size=V, **kw)
    (g_sparse,) = torch.autograd.grad(sparse.loss, logps)
    assert 0.0 < sparse.metrics["weight_mean"] < 1.0
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_sparse, g_full, atol=1e-6, rtol=1e-6)
    for key in full.metrics:
        assert sparse.metrics[key] == pytest.approx(full.metrics[key], abs=1e-6), key


def test_critical_token_weight_hand_values():
    """Vassoyan et al.'s limits and the notes' worked numbers: a uniform reference (max log-prob −log|V|) gives
    c = 0, w = 0; a one-hot reference (0) gives c = 1, w = 1; |V| = 50257, ρ = 150: max-prob 0.9 → w ≈ 0.2306."""
    logps = torch.full((1, 3), -1.0, requires_grad=True)
    ref_logps = torch.full((1, 3), -2.0)
    ref_max = torch.tensor([[-math.log(50257), 0.0, math.log(0.9)]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = critical_token_kl_from_max(logps, ref_logps, ref_max, mask, vocab_size=50257, kl_coef=1.0, estimator="k2")
    c = 1 + math.log(0.9) / math.log(50257)
    w = [0.0, 1.0, c ** 150]
    assert w[2] == pytest.approx(0.2306, abs=1e-4)
    assert out.loss.item() == pytest.approx(sum(wi * 0.5 for wi in w) / 3, rel=1e-6)


def test_ppo_critical_token_kl_is_ppo_clip_plus_the_weighted_kl():
    """At θ = θ_old the surrogate is −token-mean(A) and the total adds β times the weighted KL term exactly."""
    g = torch.Generator().manual_seed(4)
    mask = _mask(g)
    logps = (-0.3 - torch.rand(B, T, generator=g)).requires_grad_()
    ref_logps = -0.3 - torch.rand(B, T, generator=g)
    ref_max = -torch.rand(B, T, generator=g) * 0.2
    adv = torch.tensor([1.0, -0.7, 0.4])
    out = ppo_critical_token_kl(logps, logps.detach(), ref_logps, ref_max, adv, mask, V, beta=2.0, rho=3.0)
    kl = critical_token_kl_from_max(logps, ref_logps, ref_max, mask, vocab_size=V, kl_coef=2.0, rho=3.0)
    pg = -(adv[:, None] * mask).sum() / mask.sum()
    assert out.loss.item() == pytest.approx(pg.item() + kl.loss.item(), abs=1e-6)
