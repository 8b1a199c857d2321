"""Reward tools: calibration and the CTRL / vBoN transforms (``tether.inference.transforms``), the reward transform
of ``tether rl`` (``ReferenceCalibration``), and ensembles (``tether.inference.ensemble``)."""

import dataclasses
import math

import pytest
import torch
from inference_helpers import REF, CharTokenizer, TableLM, count_b_reward, distinct_reward, rewards_of

from tether.inference import METHODS, EnsembleReward, ReferenceCalibration, draw_candidates, ensemble, laws
from tether.inference.transforms import calibrate, ctrl_bon, ctrl_won, vbon_exact_reward, vbon_reward
from tether.rollout import rewarded
from tether.sampling import sample
from tether.testing import assert_close

DISTINCT_R, LEVEL_R = rewards_of(distinct_reward), rewards_of(count_b_reward)


def g(r):
    """A strictly increasing map."""
    return torch.exp(3 * r) + r ** 3 - 7.0


def test_calibrate_golden():
    """Reference rewards (0, 1, 1, 2): r = 1 has one below and two equal, C = (1 + ½·2)/4 = ½; r = 2 → (3 + ½)/4;
    r = −1 → 0; r = 5 → 1."""
    got = calibrate(torch.tensor([1.0, 2.0, -1.0, 5.0]), torch.tensor([0.0, 1.0, 1.0, 2.0]))
    assert torch.equal(got, torch.tensor([0.5, 0.875, 0.0, 1.0], dtype=torch.float64))


def test_transforms_are_invariant_to_strictly_increasing_maps_of_the_reward():
    """calibrate, ctrl_bon, ctrl_won and vbon read only comparisons with the reference rewards, so g∘r gives
    bit-identical values — and so does a soft selection scored by them."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 5, (3, 40), generator=gen).double() / 4  # atoms: ties matter
    r = torch.randint(0, 5, (3, 9), generator=gen).double() / 4
    for fn, kw in ((calibrate, {}), (ctrl_bon, {"t": 3.0}), (ctrl_won, {"t": 2.0}), (vbon_reward, {})):
        assert torch.equal(fn(g(r), g(ref), **kw), fn(r, ref, **kw)), fn.__name__
    cands = draw_candidates(TableLM(), CharTokenizer(), [{"prompt": "a"}] * 200, count_b_reward, n=6,
                            base_samples=0, max_new_tokens=3, seed=3, batch_size=2048)
    moved = dataclasses.replace(cands, rewards=g(cands.rewards))
    for transform in ("calibrate", "ctrl_bon", "vbon"):
        args = {"t": 2.0} if transform == "ctrl_bon" else {}
        a = METHODS["tilted"](cands, 6, beta=0.2, transform=transform, transform_args=args)
        b = METHODS["tilted"](moved, 6, beta=0.2, transform=transform, transform_args=args)
        assert torch.equal(a.selection.probs, b.selection.probs), transform


def test_calibrated_reward_is_the_win_rate_against_pi_ref():
    """With the exact reference law, C(y) = F⁻(y) + ½m(y), so E_π[C] is π's win rate against π_ref with ties ½:
    ½ for π_ref itself, and for best-of-4 its exact win rate."""
    F, Fm = laws.reward_cdf(REF, LEVEL_R)
    C = Fm + 0.5 * (F - Fm)
    assert float((REF * C).sum()) == pytest.approx(0.5, abs=1e-15)
    bon = laws.best_of_n_law(REF, LEVEL_R, 4)
    assert float((bon * C).sum()) == pytest.approx(laws.win_rate(bon, REF, LEVEL_R), abs=1e-15)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_vbon_exact_reward_targets_the_best_of_n_law(n):
    """R(y) = log π_BoN(y) − log π_ref(y) from the binomial sum Σ_i C(n,i) F⁻^{n−i} π_ref^i: π_ref·e^R is the
    best-of-n law (F^n − F⁻^n, distinct rewards) and sums to one; E_π[R] − KL(π‖π_ref) = −KL(π‖π_BoN) for every π
    (so π_BoN maximizes it, at 0); the bound log n + (n−1)·log F⁻ that vBoN-L optimizes is ≤ R pointwise."""
    _, Fm = laws.reward_cdf(REF, DISTINCT_R)
    R = vbon_exact_reward(REF.log(), Fm, n)
    bon = laws.best_of_n_law(REF, DISTINCT_R, n)
    assert_close(REF * R.exp(), bon, "π_ref·e^R", atol=1e-15)
    assert float((REF * R.exp()).sum()) == pytest.approx(1.0, abs=1e-14)
    gen = torch.Generator().manual_seed(n)
    for pi in [e / e.sum() for e in -torch.rand(4, len(REF), generator=gen, dtype=torch.float64).log()] + [bon]:
        objective = float((pi * R).sum()) - laws.kl(pi, REF)
        assert objective == pytest.approx(-laws.kl(pi, bon), abs=1e-12)
    bound = math.log(n) + (n - 1) * Fm.log()
    assert (bound <= R + 1e-12).all()


def test_vbon_smoothed_cdf_golden():
    """F̂⁻ = (#{ref < r} + 1)/(K + 1): reference (0, 1, 1, 2), r = 1 → log(2/5); r = −1 → log(1/5); r = 3 → 0."""
    got = vbon_reward(torch.tensor([1.0, -1.0, 3.0]), torch.tensor([0.0, 1.0, 1.0, 2.0]))
    want = torch.tensor([math.log(0.4), math.log(0.2), 0.0], dtype=torch.float64)
    assert_close(got, want, "log F̂⁻", atol=1e-15)


def test_ctrl_signs():
    """exp(t·C) increases with the reward; −exp(−t·C) also increases, but most steeply at the bottom (C = 0),
    where best-of-N jailbreaking's adversary looks; t → 0 leaves the order of C."""
    ref = torch.arange(10.0)
    r = torch.tensor([0.5, 3.5, 8.5])
    bon, won = ctrl_bon(r, ref, t=3.0), ctrl_won(r, ref, t=3.0)
    assert (bon.diff() > 0).all() and (won.diff() > 0).all()
    assert float(won[1] - won[0]) > float(won[2] - won[1])
    assert float(bon[2] - bon[1]) > float(bon[1] - bon[0])


def test_ensemble_golden_and_invariants():
    """Members (1, 2, 3, 6): mean 3, min 1, population variance (4 + 1 + 0 + 9)/4 = 3.5, std 1.870829;
    mean − ½·std = 2.064586, UWO (λ = ½) = 3 − 1.75 = 1.25. Identical members give identical aggregates; min ≤
    mean; the penalized forms ≤ mean; member order and λ = 0 change nothing."""
    s = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    assert float(ensemble(s, "mean")) == 3.0 and float(ensemble(s, "min")) == 1.0
    assert float(ensemble(s, "mean_minus_std", 0.5)) == pytest.approx(3 - 0.5 * math.sqrt(3.5), abs=1e-15)
    assert float(ensemble(s, "uwo", 0.5)) == pytest.approx(1.25, abs=1e-15)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 5, generator=gen, dtype=torch.float64)
    same = scores[:, :1].expand(50, 5)
    for mode in ("mean", "min", "mean_minus_std", "uwo"):
        assert_close(ensemble(same, mode, 0.7), scores[:, 0], f"identical members, {mode}", atol=1e-15)
        assert_close(ensemble(scores.flip(-1), mode, 0.7), ensemble(scores, mode, 0.7), f"order, {mode}", atol=1e-14)
    mean = ensemble(scores, "mean")
    assert (ensemble(scores, "min") <= mean).all()
    assert (ensemble(scores, "mean_minus_std", 0.7) <= mean).all() and (ensemble(scores, "uwo", 0.7) <= mean).all()
    assert torch.equal(ensemble(scores, "uwo", 0.0), mean)
    with pytest.raises(ValueError, match="unknown mode"):
        ensemble(scores, "median")


def test_ensemble_reward_has_no_opinion_when_a_member_has_none():
    rm = EnsembleReward({"a": lambda p, c, m: 1.0, "b": lambda p, c, m: 3.0}, "min")
    assert rm("x", "y", {}) == 1.0
    assert EnsembleReward([lambda p, c, m: 1.0, lambda p, c, m: None])("x", "y", {}) is None


def _reward_with_gaps(prompt, completion, row):
    """count-of-b, no opinion on the empty completion."""
    return None if completion == "" else count_b_reward(prompt, completion, row)


def test_reference_calibration_transforms_a_rewarded_batch():
    """The ``tether rl`` hook: each group's scored rewards become their calibrated values against the reference
    samples of its prompt (drawn once, cached); no-opinion rows hold the group's mean of the transformed values;
    uniform groups are recomputed. With the policy equal to the reference, the calibrated reward has mean ½
    (within 4 standard errors)."""
    G, prompts = 4, 300
    rows = [{"prompt": "a", "id": 0}] * prompts
    done = sample(TableLM(), CharTokenizer(), [[1]] * prompts, n=G, max_new_tokens=3, seed=5, batch_size=2048)
    batch = rewarded(_reward_with_gaps, rows, done, pad=0, group_size=G)
    hook = ReferenceCalibration("calibrate", {"samples": 256}, reference=TableLM(), tokenizer=CharTokenizer(),
                                reward=_reward_with_gaps, max_new_tokens=3, temperature=1.0, seed=0, batch_size=2048)
    out = hook(batch, rows, group_size=G, drop_uniform_groups=True)
    assert len(hook.tables) == 1
    table = hook.tables[hook.key(rows[0])]
    assert 0 < len(table) <= 256  # the empty completions (no opinion) are left out of the table
    raw = batch.rewards.double()
    want = calibrate(raw, table)
    for gi in range(prompts):
        sl = slice(gi * G, (gi + 1) * G)
        keep = batch.scored[sl]
        if keep.any():
            filled = torch.where(keep, want[sl], want[sl][keep].mean())
            assert_close(out.rewards[sl], filled, f"group {gi}", atol=1e-6)
    assert torch.equal(out.uniform, out.rewards.view(-1, G).std(dim=1) == 0)
    assert torch.equal(out.loss_mask, batch.rollout.mask & (batch.scored & ~out.uniform.repeat_interleave(G))[:, None])
    c = out.rewards[batch.scored].double()
    assert abs(float(c.mean()) - 0.5) < 4 * float(c.std()) / math.sqrt(len(c))
    hook(batch, rows, group_size=G, drop_uniform_groups=False)
    assert hook.tables[hook.key(rows[0])] is table  # cached: no new reference samples
