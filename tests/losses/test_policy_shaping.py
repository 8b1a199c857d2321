"""GRPO-CARE's consistency bonus and online difficulty filtering (``tether.losses.policy.shaping``) against
hand-worked oracles."""

from __future__ import annotations

import pytest
import torch
from policy_helpers import F64, assert_close

from tether.losses.policy.shaping import difficulty_filter, grpo_care_bonus


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


def test_difficulty_filter_oracle():
    """G = 8, band [0.25, 0.75]: prompts with 1 or 7 correct are dropped, 2–6 kept (and 0, 8)."""
    pass_rates = torch.arange(9, dtype=torch.float32) / 8
    keep = difficulty_filter(pass_rates, 0.25, 0.75)
    assert keep.tolist() == [False, False, True, True, True, True, True, False, False]
    assert difficulty_filter(torch.tensor([1 / 3, 2 / 3]), 1 / 3, 2 / 3).all()  # bounds inclusive despite rounding
    with pytest.raises(ValueError):
        difficulty_filter(pass_rates, 0.8, 0.2)


