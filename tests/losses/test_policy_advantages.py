"""Advantage estimators (``tether.losses.policy.advantages``) against hand-worked oracles and plain float64 twins.

Each twin below is written from the equation in the estimator's docstring with explicit Python loops over groups /
tokens (no vectorized tricks shared with the library); the library runs in fp32 and must match at ``atol 1e-5``.

Hand-worked values:

* GRPO, R = [1, 0, 0, 0]: mean 0.25; unbiased std sqrt((0.75² + 3·0.25²)/3) = sqrt(0.25) = 0.5, so
  Â = (R − 0.25)/0.5 = [1.5, −0.5, −0.5, −0.5] (the population std 0.433 would give [1.732, −0.577, …]).
* Dr. GRPO: Â = R − 0.25 = [0.75, −0.25, −0.25, −0.25].
* RLOO: Â_1 = 1 − 0 = 1, Â_j = 0 − 1/3 = −1/3.
* GPG, groups [1,0,0,0] and [0,0,0,0]: one of two groups is valid, α = 8/(8 − 4) = 2 → [1.5, −0.5, …, 0, …]
  (verl's port would use α = 8/#nonzero = 8).
* A*-PO, r = [1, 0 ×7], β = 0.5: V* = 0.5·log((e² + 7)/8) ≈ 0.29351.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses.policy.advantages import (
    astar_po_targets,
    astar_po_values,
    dapo_dynamic_sampling_mask,
    drgrpo_advantages,
    gpg_advantages,
    grpo_advantages,
    gvpo_weights,
    outcome_to_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    token_returns,
    whiten,
)
from tether.testing import assert_close

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# fixtures: N = 5 prompts × G = 7 completions, one constant group, fp32 library vs float64 twin
# ----------------------------------------------------------------------------------------------------------

N, G = 5, 7


@pytest.fixture
def rewards() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(N, G, generator=g, dtype=torch.float64)
    r[2] = 0.7  # a zero-variance group
    r[4] = (torch.rand(G, generator=g) > 0.5).double()  # binary rewards
    r[4, 0], r[4, 1] = 1.0, 0.0
    return r


def _mean(xs):
    return sum(xs) / len(xs)


def _unbiased_std(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def twin_grpo(r, eps=1e-6, scale=True):
    out = torch.zeros_like(r)
    for n in range(r.shape[0]):
        xs = r[n].tolist()
        m, s = _mean(xs), _unbiased_std(xs)
        for i, x in enumerate(xs):
            out[n, i] = (x - m) / (s + eps) if scale else x - m
    return out


def twin_rloo(r):
    out = torch.zeros_like(r)
    for n in range(r.shape[0]):
        xs = r[n].tolist()
        for i, x in enumerate(xs):
            others = xs[:i] + xs[i + 1 :]
            out[n, i] = x - _mean(others)
    return out


def twin_gpg(r, scale=False, eps=1e-4):
    n_groups = r.shape[0]
    valid = [len(set(r[n].tolist())) > 1 for n in range(n_groups)]
    n_samples = r.numel()
    m_invalid = sum(r.shape[1] for n in range(n_groups) if not valid[n])
    alpha = n_samples / (n_samples - m_invalid)  # the paper's B/(B − M)
    out = torch.zeros_like(r)
    for n in range(n_groups):
        xs = r[n].tolist()
        m = _mean(xs)
        f_norm = _unbiased_std(xs) + eps if scale else 1.0
        for i, x in enumerate(xs):
            out[n, i] = alpha * (x - m) / f_norm
    return out


# ----------------------------------------------------------------------------------------------------------
# hand-worked oracles
# ----------------------------------------------------------------------------------------------------------


def test_grpo_hand_case_uses_unbiased_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert_close(grpo_advantages(r), torch.tensor([[1.5, -0.5, -0.5, -0.5]]), name="grpo")
    # the population std would give 0.75/0.433 = 1.732: make sure we are not that
    assert abs(grpo_advantages(r)[0, 0].item() - math.sqrt(3)) > 0.2
    assert_close(grpo_advantages(r, scale=False), torch.tensor([[0.75, -0.25, -0.25, -0.25]]), name="unscaled")


def test_drgrpo_and_rloo_hand_cases():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert_close(drgrpo_advantages(r, group_size=4), torch.tensor([0.75, -0.25, -0.25, -0.25]), name="drgrpo")
    assert_close(rloo_advantages(r, group_size=4), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]), name="rloo")
    assert abs(rloo_advantages(r, group_size=4).sum().item()) < 1e-6


def test_flat_input_keeps_its_shape(rewards):
    flat = rewards.reshape(-1)
    for fn in (grpo_advantages, drgrpo_advantages, rloo_advantages, gpg_advantages):
        out = fn(flat, group_size=G)
        assert out.shape == flat.shape
        assert_close(out, fn(rewards).reshape(-1), atol=1e-12, name=fn.__name__)


def test_group_of_one_follows_verl_fallback():
    """verl: a lone sample gets mean 0 / std 1, so its advantage is its raw reward (RLOO: raw reward too)."""
    r = torch.tensor([[2.0], [-1.0]])
    assert_close(grpo_advantages(r), r / (1 + 1e-6), name="grpo G=1")
    assert_close(drgrpo_advantages(r), r, name="drgrpo G=1")
    assert_close(rloo_advantages(r), r, name="rloo G=1")
    assert_close(gpg_advantages(r), torch.zeros_like(r), name="gpg G=1")


def test_gpg_valid_group_rescaling_hand_case():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]])  # α = 2
    assert_close(gpg_advantages(r), expected, name="gpg")
    # verl's port (α = B/#nonzero = 8) would give 6.0 for the correct sample — not what we do
    assert abs(gpg_advantages(r)[0, 0].item() - 8 * 0.75) > 1.0
    assert_close(gpg_advantages(torch.zeros(3, 4)), torch.zeros(3, 4), name="no valid group")


def test_dapo_dynamic_sampling_mask():
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5001]])
    assert dapo_dynamic_sampling_mask(r).tolist() == [False, False, True, True]
    assert dapo_dynamic_sampling_mask(r.reshape(-1), group_size=4).tolist() == [False, False, True, True]


def test_astar_po_values_hand_case_and_limits():
    r = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    v = astar_po_values(r, beta=0.5)
    assert abs(v.item() - 0.5 * math.log((math.e**2 + 7) / 8)) < 1e-12
    assert abs(v.item() - 0.29351) < 1e-5
    assert astar_po_values(r, beta=0.0).item() == 1.0  # β → 0: the max
    assert astar_po_values(r, beta=math.inf).item() == pytest.approx(1 / 8)  # β → ∞: the mean
    betas = [0.05, 0.1, 0.5, 1.0, 5.0, 50.0]
    values = [astar_po_values(r, beta=b).item() for b in betas]
    assert all(1 / 8 <= x <= 1.0 for x in values)
    assert all(a > b for a, b in zip(values, values[1:])), values  # decreasing in β
    with pytest.raises(ValueError, match="beta must be"):
        astar_po_values(r, beta=-0.5)
    # stage 2 target R − V*
    assert_close(astar_po_targets(torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.5])), torch.tensor([0.75, -0.5]))


def test_astar_po_values_twin_no_overflow(rewards):
    """Twin: β·log(mean exp(r/β)) in float64 with math; β = 0.01 would overflow a naive exp(r/β) for r ≈ 10."""
    for beta in (0.5, 2.0):
        twin = torch.tensor(
            [beta * math.log(_mean([math.exp(x / beta) for x in rewards[n].tolist()])) for n in range(N)]
        )
        assert_close(astar_po_values(rewards.float(), beta=beta), twin, name=f"astar β={beta}")
    big = torch.full((1, 4), 10.0)
    assert torch.isfinite(astar_po_values(big, beta=0.01)).all()
    assert_close(astar_po_values(big, beta=0.01), torch.tensor([10.0]), name="constant rewards")


# ----------------------------------------------------------------------------------------------------------
# plain float64 twins on random rewards
# ----------------------------------------------------------------------------------------------------------


def test_group_estimators_match_twins(rewards):
    r32 = rewards.float()
    assert_close(grpo_advantages(r32), twin_grpo(rewards), name="grpo")
    assert_close(grpo_advantages(r32, scale=False), twin_grpo(rewards, scale=False), name="grpo unscaled")
    assert_close(drgrpo_advantages(r32), twin_grpo(rewards, scale=False), name="drgrpo")
    assert_close(rloo_advantages(r32), twin_rloo(rewards), name="rloo")
    assert_close(gpg_advantages(r32), twin_gpg(rewards), name="gpg")
    assert_close(gpg_advantages(r32, scale=True), twin_gpg(rewards, scale=True), atol=1e-4, name="gpg scaled")
    # zero-variance group: exactly zero advantage everywhere
    for fn in (grpo_advantages, drgrpo_advantages, rloo_advantages, gpg_advantages):
        assert (fn(r32)[2] == 0).all(), fn.__name__
    for row in twin_grpo(rewards):
        assert abs(row.sum().item()) < 1e-9  # centred


def test_gvpo_weights_are_the_gvpo_loss_gradient(rewards):
    """Twin: the GVPO loss (Zhang et al. 2025, arXiv:2504.19599) written out; autograd w.r.t. the sequence log-probs
    gives −w exactly."""
    beta = 0.1
    g = torch.Generator().manual_seed(1)
    old_lp = -5 * torch.rand(N, G, generator=g, dtype=torch.float64)
    lp = (old_lp + 0.3 * torch.randn(N, G, generator=g, dtype=torch.float64)).requires_grad_(True)

    def gvpo_loss(detach_mean: bool) -> torch.Tensor:
        total = lp.new_zeros(())
        for n in range(N):
            u = beta * (lp[n] - old_lp[n])
            u_bar = u.detach().mean() if detach_mean else u.mean()
            r_bar = rewards[n].mean()
            for i in range(G):
                total = total + 0.5 * ((u[i] - u_bar) - (rewards[n, i] - r_bar)) ** 2 / (G - 1)
        return total

    (grad,) = torch.autograd.grad(gvpo_loss(False), lp)
    (grad_detached,) = torch.autograd.grad(gvpo_loss(True), lp)
    w = gvpo_weights(rewards.float(), (lp - old_lp).detach().float(), beta=beta)
    assert_close(-w, grad, name="∇L = −w")
    assert_close(grad_detached, grad, atol=1e-12, name="detaching ū does not change the gradient")
    # at θ = θ_old: w = β/(G−1)·(R − R̄)
    w0 = gvpo_weights(rewards, torch.zeros_like(rewards), beta=beta)
    assert_close(w0, beta / (G - 1) * (rewards - rewards.mean(dim=1, keepdim=True)), atol=1e-12, name="w at old")
    with pytest.raises(ValueError, match="G ≥ 2"):
        gvpo_weights(torch.ones(3, 1), torch.zeros(3, 1))


# ----------------------------------------------------------------------------------------------------------
# token-level: placement, returns-to-go, whitening, REINFORCE++
# ----------------------------------------------------------------------------------------------------------

B, T = 7, 13
LENGTHS = [13, 1, 7, 0, 10, 4, 12]  # row 3 fully masked


def _mask() -> torch.Tensor:
    m = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        m[i, :n] = True
    m[4, 5] = False  # a hole inside a response (e.g. a masked tool output)
    return m


def twin_returns(r, mask, gamma):
    out = torch.zeros_like(r)
    for i in range(r.shape[0]):
        pos = [t for t in range(r.shape[1]) if mask[i, t]]
        for k, t in enumerate(pos):
            out[i, t] = sum(gamma ** (j - k) * r[i, pos[j]].item() for j in range(k, len(pos)))
    return out


def twin_whiten(x, mask):
    vals = [x[i, t].item() for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]
    m, s2 = _mean(vals), _unbiased_std(vals) ** 2
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t]:
                out[i, t] = (x[i, t] - m) / math.sqrt(s2 + 1e-8)
    return out


def test_outcome_placement_on_last_valid_token():
    mask = _mask()
    r = torch.arange(1.0, B + 1)
    r[3] = 0.0  # the empty row must carry zero reward
    placed = outcome_to_token_rewards(r, mask)
    for i in range(B):
        pos = [t for t in range(T) if mask[i, t]]
        expect = torch.zeros(T)
        if pos:
            expect[pos[-1]] = r[i]
        assert_close(placed[i], expect, name=f"row {i}")
    r[3] = 1.0
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        outcome_to_token_rewards(r, mask)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_token_returns_match_twin(gamma):
    g = torch.Generator().manual_seed(2)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _mask()
    out = token_returns(r.float(), mask, gamma)
    assert_close(out, twin_returns(r, mask, gamma), name=f"returns γ={gamma}")
    assert (out[~mask] == 0).all()


def test_token_returns_agree_with_verl_reset_on_right_padding():
    """verl resets the running return at masked positions; for right-padded masks both definitions agree."""
    g = torch.Generator().manual_seed(3)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    verl = torch.zeros_like(r)
    running = torch.zeros(B, dtype=torch.float64)
    for t in reversed(range(T)):
        running = r[:, t] + 0.9 * running
        verl[:, t] = running
        running = running * mask[:, t]
    assert_close(token_returns(r, mask, 0.9), verl * mask, atol=1e-12, name="vs verl")


def test_whiten_matches_twin_and_rejects_tiny_batches():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + 1
    mask = _mask()
    assert_close(whiten(x.float(), mask), twin_whiten(x, mask), name="whiten")
    one = torch.zeros(B, T, dtype=torch.bool)
    one[0, 0] = True
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        whiten(x, one)


def test_reinforce_pp_matches_twin():
    """Both variants against the docstring's formula: returns-to-go (or group-centred scores), then global whitening."""
    g = torch.Generator().manual_seed(5)
    mask = _mask()
    token_r = torch.where(mask, 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)  # −β·k1 stand-in
    outcome = torch.randn(B, generator=g, dtype=torch.float64)
    outcome[3] = 0.0
    token_r = token_r + outcome_to_token_rewards(outcome, mask)
    out = reinforce_pp_advantages(token_r.float(), mask)
    assert_close(out, twin_whiten(twin_returns(token_r, mask, 1.0), mask), name="reinforce++")

    # -baseline: groups of G = 7 here would need B = 7·N; use the 7 rows as one group
    scores = [sum(token_r[i, t].item() for t in range(T) if mask[i, t]) for i in range(B)]
    centred = [s - _mean(scores) for s in scores]
    broadcast = torch.tensor([[centred[i]] * T for i in range(B)], dtype=torch.float64)
    out_b = reinforce_pp_advantages(token_r.float(), mask, baseline=True, group_size=B)
    assert_close(out_b, twin_whiten(broadcast, mask), name="reinforce++-baseline")
    with pytest.raises(ValueError, match="group_size"):
        reinforce_pp_advantages(token_r, mask, baseline=True)


def test_reinforce_pp_outcome_only_oracle():
    """β = 0, one reward per sequence: Â is constant along each sequence before whitening; after whitening the
    token-weighted mean is 0 and the (unbiased) token-weighted variance is 1."""
    mask = _mask()
    outcome = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5, 0.0])
    adv = reinforce_pp_advantages(outcome, mask).double()
    vals = adv[mask]
    assert abs(vals.mean().item()) < 1e-6
    assert abs(vals.var(unbiased=True).item() - 1.0) < 1e-5
    for i in range(B):
        row = adv[i][mask[i]]
        if row.numel():
            assert_close(row, row[:1].expand_as(row), name=f"constant along row {i}")


def test_shape_errors_are_actionable():
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="cannot be split"):
        grpo_advantages(torch.zeros(10), group_size=4)
    with pytest.raises(ValueError, match="group_size=3"):
        grpo_advantages(torch.zeros(2, 4), group_size=3)
