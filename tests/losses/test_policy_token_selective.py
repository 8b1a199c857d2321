"""TROLL, Archer and the critical-token KL (``tether.losses.policy.token_selective``) against plain float64
twins and hand-worked oracles (conventions: ``policy_helpers.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from policy_helpers import (
    F64,
    ONE,
    T,
    V,
    assert_close,
    ragged_mask,
    run_against_twin,
    token_batch,
    twin_ppo_clip,
    twin_token_mean,
)

from tether import kl as K
from tether.losses.policy.token_selective import archer, critical_token_kl, troll, troll_project

# ----------------------------------------------------------------------------------------------------------
# TROLL
# ----------------------------------------------------------------------------------------------------------


def project_twin(a_logits, b_logits, eps):
    """Full-support projection by bisection on η itself; gradient through the IFT with autograd's ∂g/∂η."""
    a = torch.log_softmax(a_logits, -1)
    b = torch.log_softmax(b_logits, -1)

    def path(eta, a):
        return torch.log_softmax((a + eta * b) / (1 + eta), -1)

    def kl(eta, a):
        lp = path(eta, a)
        return (lp.exp() * (lp - b)).sum()

    if kl(0.0, a.detach()) <= eps:
        return a
    lo, hi = 0.0, 1.0
    while kl(hi, a.detach()) > eps:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl(mid, a.detach()) > eps else (lo, mid)
    eta_star = torch.tensor(hi, dtype=F64, requires_grad=True)
    (dg_deta,) = torch.autograd.grad(kl(eta_star, a.detach()), eta_star)
    g = kl(hi, a)
    eta = hi - (g - g.detach()) / dg_deta
    return path(eta, a)


def troll_twin(logits, old_logits, tokens, advantages, mask, eps, alpha, max_support, support_mass):
    per = logits.new_zeros(mask.shape)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            proj = project_twin(logits[i, t], old_logits[i, t], eps)
            old = torch.log_softmax(old_logits[i, t], -1)
            y = tokens[i, t]
            ratio = torch.exp(proj[y] - old[y])
            target = proj.detach()
            regression = (target.exp() * (target - torch.log_softmax(logits[i, t], -1))).sum()
            per[i, t] = -ratio * advantages[i] + alpha * regression
    return twin_token_mean(per, mask)


def test_troll_matches_twin_full_support():
    g = torch.Generator().manual_seed(11)
    B = 3
    b = {
        "logits": 1.5 * torch.randn(B, T, V, generator=g, dtype=F64),
        "old_logits": 1.5 * torch.randn(B, T, V, generator=g, dtype=F64),
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "advantages": torch.tensor([1.0, -0.7, 0.4], dtype=F64),
        "mask": ragged_mask(B, g),
    }
    b["old_logits"][0] = b["logits"][0] + 0.05 * torch.randn(T, V, generator=g, dtype=F64)  # inside: identity rows
    out = run_against_twin(
        troll, troll_twin, b, diff=("logits",), const=("old_logits",), eps=0.05, alpha=0.5, max_support=None,
        support_mass=None,
    )  # fmt: skip
    assert 0.0 < out.metrics["projected_frac"] < 1.0


def test_troll_projection_oracles():
    """Inside the ball: identity (η = 0). Outside: KL(p̃‖p_old) = ε and p̃ on the log-linear path between p_θ and p_old.
    Finite differences of a scalar function of p̃ match autograd (full and sparse support)."""
    g = torch.Generator().manual_seed(12)
    logits = 2.0 * torch.randn(4, 5, V, generator=g, dtype=F64)
    old = 2.0 * torch.randn(4, 5, V, generator=g, dtype=F64)
    old[0] = logits[0] + 0.02 * torch.randn(5, V, generator=g, dtype=F64)
    p = troll_project(logits, old, eps=0.05, max_support=None, support_mass=None)
    a, b = torch.log_softmax(logits, -1), torch.log_softmax(old, -1)
    inside = K.reverse_kl(logits, old) <= 0.05
    assert inside[0].all() and (~inside[1:]).any()
    assert_close(p.logprobs[inside], a[inside], "identity inside the trust region", atol=1e-12)
    assert (p.eta[inside] == 0).all()
    assert_close(K.reverse_kl(p.logprobs, old)[~inside], torch.full(((~inside).sum(),), 0.05, dtype=F64), "KL = ε",
                 atol=1e-10)  # fmt: skip
    t = (p.eta / (1 + p.eta))[..., None]
    residual = p.logprobs - ((1 - t) * a + t * b)  # on the path ⇔ residual is a per-position constant (log Z)
    assert_close(residual, residual[..., :1].expand_as(residual), "log-linear path", atol=1e-10)

    weights = torch.randn(2, 2, V, generator=g, dtype=F64)
    old_small = old[1:3, :2]
    for support in ({"max_support": None, "support_mass": None}, {"max_support": 3, "support_mass": 0.9}):

        def fn(x, support=support):
            return (troll_project(x, old_small, eps=0.05, **support).logprobs * weights).sum()

        assert torch.autograd.gradcheck(fn, (logits[1:3, :2].clone().requires_grad_(),), fast_mode=True)


def test_troll_sparse_support_lumps_the_tail():
    """Support = top tokens of p_old (≤ max_support, mass ≥ support_mass). The tail is one atom for the projection:
    the lumped KL is ε, tokens outside S keep p_θ's proportions, and a sampled tail token still gets a gradient."""
    g = torch.Generator().manual_seed(13)
    logits = 2.0 * torch.randn(2, 3, V, generator=g, dtype=F64)
    old = 2.0 * torch.randn(2, 3, V, generator=g, dtype=F64)
    p = troll_project(logits, old, eps=0.02, max_support=3, support_mass=0.999)
    assert (p.support.sum(-1) <= 3).all()
    top3 = torch.zeros_like(p.support).scatter(-1, old.topk(3, -1).indices, True)
    assert not (p.support & ~top3).any()  # support ⊆ the 3 most probable old tokens
    assert_close(p.logprobs.exp().sum(-1), torch.ones(2, 3, dtype=F64), "normalized", atol=1e-12)
    a, b = torch.log_softmax(logits, -1), torch.log_softmax(old, -1)
    for idx in [(0, 0), (1, 2)]:
        s = p.support[idx]
        tail_shift = (p.logprobs[idx] - a[idx])[~s]
        assert_close(tail_shift, tail_shift[:1].expand_as(tail_shift), "tail keeps p_θ proportions", atol=1e-12)
        lumped = lambda x, s=s: torch.cat([x[s], torch.logsumexp(x[~s], 0, keepdim=True)])  # noqa: E731
        lp, lb = lumped(p.logprobs[idx]), lumped(b[idx])
        if p.eta[idx] > 0:
            assert abs((lp.exp() * (lp - lb)).sum().item() - 0.02) < 1e-10
    logits_req = logits.clone().requires_grad_()
    tail_token = (~p.support[0, 0]).nonzero()[0, 0]
    troll_project(logits_req, old, eps=0.02, max_support=3, support_mass=0.999).logprobs[0, 0, tail_token].backward()
    assert torch.isfinite(logits_req.grad).all() and logits_req.grad[0, 0].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# Archer
# ----------------------------------------------------------------------------------------------------------


def archer_twin(logps, old_logps, ref_logps, advantages, mask, logits, quantile, clip_low_entropy,
                clip_high_entropy, clip_c, kl_coef_low_entropy, kl_coef_high_entropy):  # fmt: skip
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        ent = -(probs * torch.log_softmax(logits, -1)).sum(-1)
    high = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        vals = sorted(ent[i][mask[i]].tolist())
        pos = quantile * (len(vals) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(vals) - 1)
        q = vals[lo] + (pos - lo) * (vals[hi] - vals[lo])
        for t in range(mask.shape[1]):
            high[i, t] = bool(mask[i, t]) and ent[i, t].item() > q
    low = mask & ~high
    eps = torch.where(high, clip_high_entropy, clip_low_entropy).to(F64)
    ratio = torch.exp(logps - old_logps)
    pg = twin_ppo_clip(ratio, advantages[:, None].expand_as(ratio), eps, eps, clip_c)
    log_r = ref_logps - logps
    k3 = torch.exp(log_r) - 1 - log_r
    return (twin_token_mean(pg, mask) + kl_coef_low_entropy * twin_token_mean(k3, low)
            + kl_coef_high_entropy * twin_token_mean(k3, high))  # fmt: skip


def test_archer_matches_twin():
    b = token_batch(6, seed=14, scale=0.35)
    g = torch.Generator().manual_seed(14)
    b["logits"] = 2.0 * torch.randn(6, T, V, generator=g, dtype=F64)
    b["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.2, 1.5, -2.0], dtype=F64)
    run_against_twin(
        archer, archer_twin, b, diff=("logps",), const=("old_logps", "ref_logps", "logits"), quantile=0.8,
        clip_low_entropy=0.2, clip_high_entropy=0.5, clip_c=3.0, kl_coef_low_entropy=0.3, kl_coef_high_entropy=0.1,
    )  # fmt: skip


def _logits_with_entropy(targets: list[float], vocab: int = 8) -> torch.Tensor:
    """One peaked token plus a uniform rest, with the peak solved by bisection to hit each target entropy."""
    rows = []
    for h in targets:
        lo, hi = 1.0 / vocab, 1.0
        for _ in range(100):
            p = 0.5 * (lo + hi)
            q = (1 - p) / (vocab - 1)
            ent = -(p * math.log(p) + (vocab - 1) * q * math.log(q)) if q > 0 else 0.0
            lo, hi = (p, hi) if ent > h else (lo, p)
        rows.append([math.log(p)] + [math.log((1 - p) / (vocab - 1))] * (vocab - 1))
    return torch.tensor(rows, dtype=F64)


def test_archer_entropy_split_oracle():
    """Entropies 0.1 … 1.0 → q = quantile_0.8 = 0.82 → exactly tokens 0.9 and 1.0 are high-entropy. With ratio 1.4 and
    A > 0 only those two still get gradient (clip 0.5 vs 0.2); with A = 0 the KL reaches only the low tokens
    (β_high = 0)."""
    entropies = [0.1 * (k + 1) for k in range(10)]
    logits = _logits_with_entropy(entropies)[None]
    assert_close(K.entropy(logits)[0], torch.tensor(entropies, dtype=F64), "constructed entropies", atol=1e-9)
    mask = torch.ones(1, 10, dtype=torch.bool)
    old = torch.full((1, 10), -1.0, dtype=F64)
    logps = (old + math.log(1.4)).requires_grad_()
    out = archer(logps, old, old, torch.tensor([1.0], dtype=F64), mask, logits=logits, kl_coef_low_entropy=0.0)
    out.loss.backward()
    assert out.metrics["high_entropy_frac"] == pytest.approx(0.2)
    assert (logps.grad[0] != 0).tolist() == [False] * 8 + [True, True]

    logps = old.clone().requires_grad_()
    ref = old - 0.3
    zero = torch.tensor([0.0], dtype=F64)
    from_logits = archer(logps, old, ref, zero, mask, logits=logits)
    from_logits.loss.backward()
    assert (logps.grad[0] != 0).tolist() == [True] * 8 + [False, False]
    from_entropy = archer(logps, old, ref, zero, mask, entropy=K.entropy(logits))  # precomputed-entropy path
    assert from_entropy.loss.item() == from_logits.loss.item()
    with pytest.raises(ValueError, match="exactly one"):
        archer(logps, old, ref, zero, mask)


# ----------------------------------------------------------------------------------------------------------
# prioritized KL on critical tokens
# ----------------------------------------------------------------------------------------------------------


def critical_twin(logps, ref_logps, ref_logits, mask, kl_coef, rho, intercept, ref_temperature):
    with torch.no_grad():
        p_max = torch.softmax(ref_logits / ref_temperature, -1).max(-1).values
        c = 1 + torch.log(p_max) / math.log(ref_logits.shape[-1])
        w = (1 - intercept) * c**rho + intercept
    return kl_coef * twin_token_mean(w * 0.5 * (logps - ref_logps) ** 2, mask)


def test_critical_token_kl_matches_twin():
    b = token_batch(6, seed=15)
    b.pop("old_logps")
    b["ref_logits"] = 3.0 * torch.randn(6, T, V, generator=torch.Generator().manual_seed(15), dtype=F64)
    run_against_twin(
        critical_token_kl, critical_twin, b, diff=("logps",), const=("ref_logps", "ref_logits"), kl_coef=5.0,
        rho=3.0, intercept=-0.1, ref_temperature=2.0,
    )  # fmt: skip


@pytest.mark.parametrize("p_max,vocab,expected", [(0.9, 50257, 0.2306), (0.5, 50257, 4.9e-5), (1.0, 7, 1.0)])
def test_critical_token_weights_oracle(p_max, vocab, expected):
    """|V| = 50257, ρ = 150: max-prob 0.9 → w ≈ 0.23, 0.5 → w ≈ 0; one-hot → w = 1; uniform → w = 0."""
    rest = math.log((1 - p_max) / (vocab - 1)) if p_max < 1 else -1e4
    ref_logits = torch.full((1, 1, vocab), rest, dtype=F64)
    ref_logits[..., 0] = math.log(p_max)
    x = torch.zeros(1, 1, dtype=F64)
    out = critical_token_kl(x, x, ref_logits, ONE, ref_temperature=1.0)
    assert out.metrics["weight_mean"] == pytest.approx(expected, rel=2e-3, abs=1e-6)
    uniform = critical_token_kl(x, x, torch.zeros(1, 1, vocab, dtype=F64), ONE, ref_temperature=1.0)
    assert uniform.metrics["weight_mean"] < 1e-12
