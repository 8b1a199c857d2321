"""Ra-DPO's per-position risk (``token_risk`` / ``sequential_risk``) and its ``split_risk_ratio`` option.

The twin is the official ``Ra_DPOTrainer.calculate_cvar`` (zlj123-max/Ra-DPO @ d6a10e3, ``Ra-DPO/train/trainers.py``)
re-written in float64 from its description: the reference probabilities as ``softmax(ref_logits)`` and their log,
``d = log π_ref − log π_θ``, ``torch.quantile(d, 1 − c, dim=-1)`` (linear interpolation), the strict ``d > VaR``
mask, and — for ``is_split_risk_ratio=True`` — the vocabulary cut at ``V // 2`` with one quantile per half.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.logprobs import IGNORE_INDEX, token_stats_plain
from tether.losses.preference import ra_dpo, sequential_risk, token_risk
from tether.testing import assert_close

F64 = torch.float64


def twin_official_cvar(logits, ref_logits, mask, confidence_level, split):
    """The official per-position CVaR summed over the response (float64, loops over positions and halves)."""
    ref_p = torch.softmax(ref_logits, -1)
    d_all = ref_p.log() - torch.log_softmax(logits, -1)
    V = logits.shape[-1]
    halves = [slice(0, V // 2), slice(V // 2, V)] if split else [slice(0, V)]
    rows = []
    for i in range(logits.shape[0]):
        total = logits.new_zeros(())
        for t in range(logits.shape[1]):
            if not mask[i, t]:
                continue
            for h in halves:
                d, p = d_all[i, t, h], ref_p[i, t, h]
                var = torch.quantile(d.detach(), 1 - confidence_level)
                total = total + (p * d * (d > var).to(F64)).sum()
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("confidence_level", [0.95, 0.7])
def test_sequential_risk_matches_the_official_code(split, confidence_level):
    """fp32 library against the float64 twin on (B, T, V) = (3, 5, 11) (halves of 5 and 6 tokens), ragged mask;
    loss and gradient w.r.t. the policy logits (upstream weights ≠ 1), atol 1e-5 with rtol 1e-5."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 5, 11
    logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=F64)
    ref_logits = logits + torch.randn(B, T, V, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    w = torch.tensor([0.7, -1.3, 0.4], dtype=F64)
    logits, ref_logits = logits.float().double(), ref_logits.float().double()

    x32 = logits.float().requires_grad_()
    got = sequential_risk(torch.log_softmax(x32, -1), torch.log_softmax(ref_logits.float(), -1), mask,
                          confidence_level=confidence_level, split_vocab=split)
    (got * w.float()).sum().backward()
    x64 = logits.clone().requires_grad_()
    want = twin_official_cvar(x64, ref_logits, mask, confidence_level, split)
    (want * w).sum().backward()
    assert got.dtype == torch.float32
    assert_close(got, want, f"SeqRisk split={split}", atol=1e-5, rtol=1e-5)
    assert_close(x32.grad, x64.grad, f"d SeqRisk/d logits split={split}", atol=1e-5, rtol=1e-5)


def test_unsplit_risk_is_the_recipes_token_stats_risk():
    """``sequential_risk(split_vocab=False)`` = the response sum of ``tether.logprobs`` ``risk`` statistic, the one
    the preference recipe feeds to ``chosen_seq_risk``/``rejected_seq_risk``. ``token_stats`` computes in fp32 whatever
    the input dtype, so the float64 sums agree to fp32 rounding: atol = rtol = 1e-5."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 9, generator=g, dtype=F64)
    ref_logits = logits + torch.randn(2, 6, 9, generator=g, dtype=F64)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 4:] = IGNORE_INDEX
    stats = token_stats_plain(logits, labels, ref_logits=ref_logits, stats=["risk"], risk_confidence=0.9)
    mine = sequential_risk(torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1), labels != IGNORE_INDEX,
                           confidence_level=0.9)
    assert_close(mine, stats["risk"].sum(-1), "sequential_risk vs token_stats risk", atol=1e-5, rtol=1e-5)


def test_token_risk_golden_and_the_split_depends_on_token_ids():
    """π_ref = [0.4, 0.3, 0.2, 0.1], π_θ uniform: d = log(4π_ref) = [0.470004, 0.182322, −0.223144, −0.916291].

    Unsplit, c = 0.5: q = (0.182322 − 0.223144)/2 = −0.020411, tail {0, 1}: R = 0.4·0.470004 + 0.3·0.182322 =
    0.242698. c = 0.95: q = −0.916291 + 0.15·0.693147 = −0.812319, tail {0, 1, 2}: R = 0.242698 − 0.2·0.223144 =
    0.198069.
    Split (halves {0, 1} and {2, 3}), c = 0.95: q¹ = 0.182322 + 0.05·0.287682 = 0.196706 keeps token 0 (0.188002);
    q² = −0.916291 + 0.05·0.693147 = −0.881634 keeps token 2 (−0.044629): R = 0.143373 (also at c = 0.5, where the
    per-half medians keep the same two tokens).
    Relabel the vocabulary as [0, 2, 1, 3] (the same distributions, other token ids): the unsplit risk is unchanged,
    the split one is not — halves {0.4, 0.2} and {0.3, 0.1} keep tokens 0 and 1: R = 0.242698.
    """
    ref = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64).log()
    pol = torch.full((4,), 0.25, dtype=F64).log()
    r = lambda c, split, perm=(0, 1, 2, 3): token_risk(pol[list(perm)], ref[list(perm)], confidence_level=c,  # noqa
                                                         split_vocab=split).item()
    d = (ref - pol).tolist()
    assert d == pytest.approx([0.470004, 0.182322, -0.223144, -0.916291], abs=1e-6)
    assert r(0.5, False) == pytest.approx(0.4 * d[0] + 0.3 * d[1], abs=1e-12)
    assert r(0.5, False) == pytest.approx(0.242698, abs=1e-6)
    assert r(0.95, False) == pytest.approx(0.198069, abs=1e-6)
    for c in (0.5, 0.95):
        assert r(c, True) == pytest.approx(0.4 * d[0] + 0.2 * d[2], abs=1e-12)
        assert r(c, True) == pytest.approx(0.143373, abs=1e-6)
    assert r(0.95, False, (0, 2, 1, 3)) == pytest.approx(r(0.95, False), abs=1e-15)
    assert r(0.95, True, (0, 2, 1, 3)) == pytest.approx(0.242698, abs=1e-6)
    assert abs(math.log(4 * 0.4) - d[0]) < 1e-15


def test_ra_dpo_split_option_selects_its_own_inputs():
    """``split_risk_ratio=True`` reads ``*_seq_risk_split`` (and needs them, naming the missing one); False reads
    ``*_seq_risk``. The loss with split inputs equals the unsplit loss fed the same numbers (the margin is the same
    function of whichever risk it is given)."""
    args = [torch.tensor([-3.0, -5.0], dtype=F64), torch.tensor([-4.0, -4.5], dtype=F64),
            torch.tensor([-3.5, -4.0], dtype=F64), torch.tensor([-3.0, -5.0], dtype=F64)]
    risk_w, risk_l = torch.tensor([0.2, 0.1], dtype=F64), torch.tensor([0.4, -0.3], dtype=F64)
    split = ra_dpo(*args, chosen_seq_risk_split=risk_w, rejected_seq_risk_split=risk_l, split_risk_ratio=True,
                   chosen_seq_risk=risk_w + 9.0, rejected_seq_risk=risk_l - 9.0)
    plain = ra_dpo(*args, chosen_seq_risk=risk_w, rejected_seq_risk=risk_l)
    assert_close(split.loss, plain.loss, "split inputs vs plain inputs", atol=0.0)
    with pytest.raises(ValueError, match="chosen_seq_risk_split"):
        ra_dpo(*args, chosen_seq_risk=risk_w, rejected_seq_risk=risk_l, split_risk_ratio=True)
    with pytest.raises(ValueError, match="chosen_seq_risk"):
        ra_dpo(*args, chosen_seq_risk_split=risk_w, rejected_seq_risk_split=risk_l)
