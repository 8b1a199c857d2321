"""Reference strategies (``tether.reference``): the EMA reference and ProRL's resets, against hand-worked oracles."""

from __future__ import annotations

import copy

import pytest
import torch

from tether import kl as K
from tether.reference import (
    ReferenceResetSchedule,
    ReferenceSync,
    ema_update_,
    frozen_copy,
    soup_state,
)
from tether.testing import assert_close

F64 = torch.float64

def test_ema_update_is_the_lerp_and_copies_integer_buffers():
    torch.manual_seed(0)
    ref, pol = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ref.register_buffer("count", torch.tensor(1))
    pol.register_buffer("count", torch.tensor(7))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ema_update_(ref.state_dict(), pol.state_dict(), decay=0.9)
    for name in ("weight", "bias"):
        expected = 0.9 * before[name] + 0.1 * pol.state_dict()[name]
        assert_close(ref.state_dict()[name], expected, name, atol=1e-7, rtol=1e-6)
    assert ref.count.item() == 7  # integer buffers are copied
    ema_update_(ref.state_dict(), pol.state_dict(), decay=0.0)  # decay 0 = hard copy
    assert all(torch.equal(ref.state_dict()[k], pol.state_dict()[k]) for k in before)
    with pytest.raises(KeyError):
        ema_update_({"x": torch.zeros(1)}, {"y": torch.zeros(1)}, 0.5)


def test_reference_reset_zeroes_kl_and_its_gradient():
    """After the scheduled reset (copy policy → reference) the k3 KL term and its gradient are exactly 0. (Re-creating
    the optimizer — ProRL's other half of a reset — is the recipe's one-liner; a real torch.optim import costs seconds
    here.) The stall trigger fires after `patience` non-improving validations."""
    torch.manual_seed(0)
    policy = torch.nn.Linear(4, 5)
    reference = copy.deepcopy(policy).requires_grad_(False)
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    schedule = ReferenceResetSchedule(every=3)

    def kl_term():
        logp = torch.log_softmax(policy(x), -1).gather(-1, y[:, None])
        ref_logp = torch.log_softmax(reference(x), -1).gather(-1, y[:, None])
        return K.k3(logp, ref_logp).mean()

    resets = []
    for _ in range(4):
        policy.zero_grad()
        (-torch.log_softmax(policy(x), -1).gather(-1, y[:, None]).mean() + kl_term()).backward()
        with torch.no_grad():
            for p in policy.parameters():
                p -= 0.5 * p.grad
        if schedule.step():
            assert kl_term().item() > 0  # the policy has drifted from the reference
            reference.load_state_dict(policy.state_dict())
            resets.append(schedule.steps)
            policy.zero_grad()
            kl = kl_term()
            kl.backward()
            assert kl.item() == 0.0 and all((p.grad == 0).all() for p in policy.parameters())
    assert resets == [3] and schedule.resets == 1

    stall = ReferenceResetSchedule(patience=2)
    assert [stall.observe(v) for v in (0.5, 0.6, 0.6, 0.55, 0.7)] == [False, False, False, True, False]


# ------------------------------------------------------------------------------------------------------------
# ReferenceSync (the strategies by name) and soup_state.
# ------------------------------------------------------------------------------------------------------------


def _drift(policy: torch.nn.Module, seed: int) -> None:
    """Move the policy by a seeded random step (a stand-in for an optimizer step)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_ema_rate_zero_is_the_fixed_reference_and_rate_one_follows_the_policy():
    """θ_ref ← (1 − r)·θ_ref + r·θ: r = 0 leaves the starting weights bit for bit; r = 1 is the policy after every
    step (the previous step's policy at the next one); 0 < r < 1 is the hand-computed lerp."""
    torch.manual_seed(0)
    policy = torch.nn.Linear(3, 4)
    start = copy.deepcopy(policy.state_dict())
    fixed, follow, half = (frozen_copy(policy) for _ in range(3))
    syncs = [ReferenceSync("ema", rate=0.0), ReferenceSync("ema", rate=1.0), ReferenceSync("ema", rate=0.25)]
    for step in range(3):
        before_half = {k: v.clone() for k, v in half.state_dict().items()}
        _drift(policy, step)
        assert all(s.step(ref, policy) for s, ref in zip(syncs, (fixed, follow, half)))
        for k in start:
            assert torch.equal(fixed.state_dict()[k], start[k])
            assert torch.equal(follow.state_dict()[k], policy.state_dict()[k])
            assert_close(half.state_dict()[k], 0.75 * before_half[k] + 0.25 * policy.state_dict()[k], k, atol=1e-6)
    assert syncs[1].metrics() == {"ref/version": 3, "ref/steps_since_sync": 0, "ref/rate": 1.0}


def test_sync_every_k_steps_and_its_metrics():
    """TR-DPO's τ: the update comes after optimizer steps τ, 2τ, …; the metrics count the steps since."""
    policy = torch.nn.Linear(2, 2)
    ref = frozen_copy(policy)
    sync = ReferenceSync("trdpo_soft", rate=0.6, every=3)
    moved = []
    for step in range(1, 8):
        _drift(policy, step)
        moved.append(sync.step(ref, policy))
    assert moved == [False, False, True, False, False, True, False]
    assert sync.metrics() == {"ref/version": 2, "ref/steps_since_sync": 1, "ref/rate": 0.6}
    assert ReferenceSync("fixed").metrics()["ref/rate"] == 0.0
    assert ReferenceSync("trdpo_hard", rate=0.3).rate == 1.0  # a hard update copies whatever rate says
    restored = ReferenceSync("trdpo_soft", rate=0.6, every=3)
    restored.load_state_dict(sync.state_dict())
    assert restored.metrics() == sync.metrics()
    for bad in (dict(strategy="warp"), dict(strategy="ema", rate=1.5), dict(strategy="ema", every=0)):
        with pytest.raises(ValueError):
            ReferenceSync(**bad)


def test_after_a_reset_the_exact_kl_and_its_gradient_are_zero_and_the_optimizer_state_is_cleared():
    """ProRL's reset (strategy ``reset``, every 2 steps): right after it the exact KL(π‖π_ref) — the full sum over
    the vocabulary, not an estimator — is 0 and so is its gradient (∇ KL(π‖q) at π = q is 0, up to the rounding of
    Σ p in float64); the optimizer's per-parameter state is gone, so the next step is a fresh one."""
    torch.manual_seed(0)
    policy = torch.nn.Linear(4, 5).double()
    reference = frozen_copy(policy)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.3, momentum=0.9)  # momentum: per-parameter state
    x, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 5, (8,))
    sync = ReferenceSync("reset", every=2)

    def exact_kl():
        return K.reverse_kl(policy(x), reference(x)).mean()

    for _ in range(4):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(policy(x), y).backward()
        optimizer.step()
        drifted = exact_kl().item()
        if sync.step(reference, policy, optimizer):
            assert drifted > 1e-6 and not optimizer.state  # it had moved; the momentum buffers are gone
            policy.zero_grad()
            kl = exact_kl()
            kl.backward()
            assert kl.item() == 0.0
            # The gradient through log-softmax is p·(1 − Σ_v p_v): zero up to float64 rounding of Σ p (≈ 1e-16).
            assert max(p.grad.abs().max().item() for p in policy.parameters()) < 1e-14
        else:
            assert optimizer.state
    assert sync.version == 2


def test_a_soup_of_identical_models_is_the_identity_and_a_soup_is_linear():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    a.register_buffer("count", torch.tensor(4))
    b.register_buffer("count", torch.tensor(4))
    for n in (1, 2, 3, 5):
        soup = soup_state([a.state_dict()] * n)
        assert all(torch.equal(soup[k], v) for k, v in a.state_dict().items()), n
    mixed = soup_state([a.state_dict(), b.state_dict()], [0.3, 0.7])
    assert_close(mixed["weight"], 0.3 * a.weight + 0.7 * b.weight, "weight", atol=1e-7)
    with pytest.raises(ValueError, match="differ in tensors"):
        soup_state([a.state_dict(), {"weight": a.weight}], names=["A", "B"])
    with pytest.raises(ValueError, match=r"'weight' is \(3, 4\) in B"):
        soup_state([a.state_dict(), {**a.state_dict(), "weight": torch.zeros(3, 4)}], names=["A", "B"])
