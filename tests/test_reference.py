"""Reference strategies (``tether.reference``): the EMA reference and ProRL's resets, against hand-worked oracles."""

from __future__ import annotations

import copy

import pytest
import torch

from tether import kl as K
from tether.reference import EMAReference, ReferenceResetSchedule, ema_update_
from tether.testing import assert_close

F64 = torch.float64

def test_ema_reference_updates_every_k_steps():
    torch.manual_seed(0)
    ref, pol = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ref.register_buffer("count", torch.tensor(1))
    pol.register_buffer("count", torch.tensor(7))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ema = EMAReference(decay=0.9, every=3)
    assert [ema.step(ref.state_dict(), pol.state_dict()) for _ in range(3)] == [False, False, True]
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
