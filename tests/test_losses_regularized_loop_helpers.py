"""GRPO-CARE's bonus and EMA reference, difficulty filtering and ProRL's reference resets
(``tether.losses.regularized.loop_helpers``) against hand-worked oracles."""

from __future__ import annotations

import copy

import pytest
import torch
from regularized_helpers import F64, assert_close

from tether import kl as K
from tether.losses.regularized.loop_helpers import (
    EMAReference,
    ReferenceResetSchedule,
    difficulty_filter,
    ema_update_,
    grpo_care_bonus,
)

# ----------------------------------------------------------------------------------------------------------
# §18 GRPO-CARE
# ----------------------------------------------------------------------------------------------------------


def test_grpo_care_bonus_oracle():
    """acc [1,1,0,0], conf [0.9, 0.5, 0.95, 0.1]: A = {0, 1}, τ = 0.7 − 0.01 = 0.69 → only response 0 gets +0.5.
    A second group with no accurate response gets nothing; the cap u = 0.95 clamps confidence 0.99."""
    conf = torch.tensor([0.9, 0.5, 0.95, 0.1, 0.99, 0.2, 0.3, 0.4], dtype=F64)
    ref_logps = torch.stack([conf.log(), torch.full_like(conf, -50.0)], -1)  # second token outside the answer span
    answer_mask = torch.tensor([[True, False]] * 8)
    acc = torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0], dtype=F64)
    bonus = grpo_care_bonus(acc, ref_logps, answer_mask, group_size=4)
    assert_close(bonus, torch.tensor([0.5, 0, 0, 0, 0, 0, 0, 0], dtype=F64), "CARE bonus", atol=1e-12)
    conf2 = torch.tensor([[0.99], [0.935], [0.5], [0.1]], dtype=F64)  # cap u = 0.95 decides response 1:
    acc2 = torch.tensor([1.0, 1, 0, 0], dtype=F64)  # capped τ = 0.9425 − 0.01, uncapped τ = 0.9625 − 0.01
    args = (acc2, conf2.log(), torch.ones(4, 1, dtype=torch.bool))
    assert grpo_care_bonus(*args, group_size=4).tolist() == [0.5, 0.5, 0.0, 0.0]
    assert grpo_care_bonus(*args, group_size=4, confidence_cap=None).tolist() == [0.5, 0.0, 0.0, 0.0]


def test_ema_reference_updates_every_k_steps():
    torch.manual_seed(0)
    ref, pol = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ref.register_buffer("count", torch.tensor(1))
    pol.register_buffer("count", torch.tensor(7))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ema = EMAReference(decay=0.9, every=3)
    assert [ema.step(ref.state_dict(), pol.state_dict()) for _ in range(3)] == [False, False, True]
    for name in ("weight", "bias"):
        assert_close(ref.state_dict()[name], 0.9 * before[name] + 0.1 * pol.state_dict()[name], name, atol=1e-7)
    assert ref.count.item() == 7  # integer buffers are copied
    ema_update_(ref.state_dict(), pol.state_dict(), decay=0.0)  # decay 0 = hard copy
    assert all(torch.equal(ref.state_dict()[k], pol.state_dict()[k]) for k in before)
    with pytest.raises(KeyError):
        ema_update_({"x": torch.zeros(1)}, {"y": torch.zeros(1)}, 0.5)


# ----------------------------------------------------------------------------------------------------------
# §19 difficulty filtering, §20 ProRL resets
# ----------------------------------------------------------------------------------------------------------


def test_difficulty_filter_oracle():
    """G = 8, band [0.25, 0.75]: prompts with 1 or 7 correct are dropped, 2–6 kept (and 0, 8)."""
    pass_rates = torch.arange(9, dtype=torch.float32) / 8
    keep = difficulty_filter(pass_rates, 0.25, 0.75)
    assert keep.tolist() == [False, False, True, True, True, True, True, False, False]
    assert difficulty_filter(torch.tensor([1 / 3, 2 / 3]), 1 / 3, 2 / 3).all()  # bounds inclusive despite rounding
    with pytest.raises(ValueError):
        difficulty_filter(pass_rates, 0.8, 0.2)


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
