"""Per-token policy objectives (``tether.losses.policy``): plain float64 twins, hand-worked oracles, and exact
expected-gradient identities on a small categorical.

Twins. Each objective is rewritten below from its docstring's equation in PIECEWISE form with explicit loops over tokens
— e.g. PPO-clip as ``−A·min(ρ, 1+ε_high)`` for A ≥ 0 and ``|A|·min(max(ρ, 1−ε_low), c)`` for A < 0 — so that it shares
no code path with the library's ``max(−Aρ, −A·clip(ρ))``. The library runs in fp32 on B = 7, T = 13 with ragged
lengths, a hole inside one response and one fully masked row; the twin runs in float64; loss and gradient (pushed
back with an upstream weight 0.37 ≠ 1) must agree at ``atol 1e-5``.

Hand-worked oracles:

* aggregation, ``M = [[1, 2, 3], [4, ·, ·]]``: token-mean 10/4 = 2.5; seq-mean-token-mean (6/3 + 4)/2 = 3;
  seq-mean-token-sum (6 + 4)/2 = 5; seq-mean-token-sum-norm with L = 3: (6/3 + 4/3)/2 = 5/3.
* PPO at ρ = 1: the loss is ``aggregate(−A)`` and ∂loss/∂log π = −A·(aggregation weight).
* clip, ε = 0.2, one token, ∂L/∂log π = ∂L/∂ρ·ρ: A = +1, ρ = 1.19 → L = −1.19, slope −1.19; ρ = 1.21 → L = −1.2,
  slope 0; ρ = 0.5 → L = −0.5, slope −0.5 (no lower clip for A > 0). A = −1: ρ = 0.79 → L = 0.8, slope 0;
  ρ = 0.81 → slope 0.81; dual-clip c = 3 at ρ = 3.5 → L = −c·A = 3, slope 0 (without dual-clip L = 3.5).

Exact expectations (V = 5, one token, float64): Σ_a sampler(a)·∇loss(a), with each action's loss computed by the
library on a batch of that one token, equals the autograd gradient of the closed-form KL (``tether.kl``).
"""

from __future__ import annotations

import math

import pytest
import torch

from tether import kl
from tether.losses.policy import (
    AGG_MODES,
    AdaptiveKLController,
    FixedKLController,
    PolicyLossOutput,
    aggregate,
    cpgd,
    dapo,
    dapo_dynamic_sampling_mask,
    gpg,
    grpo,
    kl_in_reward,
    ppo_clip,
)
from tether.losses.policy.advantages import token_returns
from tether.testing import assert_close

ATOL = 1e-5
UPSTREAM = 0.37  # gradient pushed from above: catches a loss that is right only up to a constant factor


# ----------------------------------------------------------------------------------------------------------
# batch: B = 7, T = 13, ragged, a hole, one empty row; log-ratios wide enough to hit every clip branch
# ----------------------------------------------------------------------------------------------------------

B, T = 7, 13
LENGTHS = [13, 1, 7, 0, 10, 4, 12]


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = True
    mask[4, 5] = False
    logps = -torch.nn.functional.softplus(torch.randn(B, T, generator=g, dtype=torch.float64)) - 0.05
    log_ratio = 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)
    log_ratio[0, :4] = torch.tensor([1.5, -1.5, 1.3, -1.3], dtype=torch.float64)  # beyond dual-clip / clip ranges
    log_ratio[2, :2] = torch.tensor([1.4, -0.9], dtype=torch.float64)
    old = logps - log_ratio
    ref = logps + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[0], adv[2] = -1.3, 0.8
    adv_tok = torch.randn(B, T, generator=g, dtype=torch.float64)
    return {"logps": logps, "old": old, "ref": ref, "adv": adv, "adv_tok": adv_tok, "mask": mask}


def twin_aggregate(per_token, mask, mode, max_len=None):
    """Loops over rows; sequences without tokens are not counted."""
    rows = []
    for i in range(per_token.shape[0]):
        vals = [per_token[i, t] for t in range(per_token.shape[1]) if mask[i, t]]
        if vals:
            rows.append(vals)
    if mode == "token-mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        length = per_token.shape[1] if max_len is None else max_len
        return sum(sum(r) / length for r in rows) / len(rows)
    raise AssertionError(mode)


def _adv_at(adv, i, t):
    return adv[i] if adv.dim() == 1 else adv[i, t]


def twin_ppo_per_token(lp, old, adv, mask, eps_low, eps_high, c):
    """Piecewise PPO-clip: A ≥ 0: −A·min(ρ, 1+ε_high); A < 0: |A|·min(max(ρ, 1−ε_low), c)."""
    out = torch.zeros_like(lp)
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            rho = torch.exp((lp[i, t] - old[i, t]).clamp(-20, 20))
            a = _adv_at(adv, i, t)
            if a >= 0:
                out[i, t] = -a * torch.clamp(rho, max=1 + eps_high)
            else:
                out[i, t] = -a * torch.clamp(torch.clamp(rho, min=1 - eps_low), max=c)
    return out


def twin_kl(lp, ref, old, estimator):
    d = lp - ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    k3 = torch.exp(-d) - 1 + d
    if estimator == "k3":
        return k3
    return torch.exp(lp - old) * k3  # k3_is


def twin_cpgd_per_token(lp, old, adv, mask, eps, alpha, c):
    """A ≥ 0: Φ = A·min(ℓ, log(1+ε)); A < 0: Φ = A·max(ℓ, log(1−ε)); L = −Φ + α·min(sg(ρ)−1, c)·log π."""
    out = torch.zeros_like(lp)
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            ell = lp[i, t] - old[i, t]
            a = _adv_at(adv, i, t)
            phi = a * torch.clamp(ell, max=math.log(1 + eps)) if a >= 0 else a * torch.clamp(ell, min=math.log(1 - eps))
            weight = min(math.exp(ell.item()) - 1.0, c)
            out[i, t] = -phi + alpha * weight * lp[i, t]
    return out


def run_both(library_fn, twin_loss_fn, batch, adv_key="adv"):
    """Library in fp32 vs twin in float64: loss and upstream-weighted gradient w.r.t. logps."""
    lp32 = batch["logps"].float().requires_grad_(True)
    out = library_fn(lp32, batch["old"].float(), batch[adv_key].float(), batch["mask"], batch["ref"].float())
    assert isinstance(out, PolicyLossOutput) and out.loss.dim() == 0
    assert all(isinstance(v, float) for v in out.metrics.values())
    (g32,) = torch.autograd.grad(out.loss * UPSTREAM, lp32)
    lp64 = batch["logps"].clone().requires_grad_(True)
    twin = twin_loss_fn(lp64, batch["old"], batch[adv_key], batch["mask"], batch["ref"])
    (g64,) = torch.autograd.grad(twin * UPSTREAM, lp64)
    assert_close(out.loss, twin, name="loss")
    assert_close(g32, g64, name="grad")
    assert (g32[~batch["mask"]] == 0).all()
    return out


# ----------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------


def test_aggregation_hand_worked_ragged_example():
    m_vals = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, -7.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = {
        "token-mean": (2.5, [[1 / 4] * 3, [1 / 4, 0, 0]]),
        "seq-mean-token-mean": (3.0, [[1 / 6] * 3, [1 / 2, 0, 0]]),
        "seq-mean-token-sum": (5.0, [[1 / 2] * 3, [1 / 2, 0, 0]]),
        "seq-mean-token-sum-norm": (5 / 3, [[1 / 6] * 3, [1 / 6, 0, 0]]),
    }
    grads = {}
    for mode, (value, weights) in expected.items():
        out = aggregate(m_vals, mask, mode, max_len=3)
        (g,) = torch.autograd.grad(out, m_vals)
        assert abs(out.item() - value) < 1e-12, mode
        assert_close(g, torch.tensor(weights, dtype=torch.float64), atol=1e-12, name=mode)
        grads[mode] = g / g.sum()
    # the modes change the gradient DIRECTION, not only its scale: seq-mean-token-mean re-weights tokens
    assert not torch.allclose(grads["token-mean"], grads["seq-mean-token-mean"])
    assert torch.allclose(grads["token-mean"], grads["seq-mean-token-sum-norm"])


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_matches_twin_with_empty_row(mode):
    batch = make_batch()
    x = batch["adv_tok"]
    assert (
        abs(aggregate(x, batch["mask"], mode, max_len=20).item() - twin_aggregate(x, batch["mask"], mode, 20)) < 1e-12
    )
    assert aggregate(x, torch.zeros(B, T, dtype=torch.bool), mode).item() == 0.0
    with pytest.raises(ValueError, match="unknown mode"):
        aggregate(x, batch["mask"], "seq-sum")


# ----------------------------------------------------------------------------------------------------------
# twins: forward and backward, fp32 vs float64
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adv_key", ["adv", "adv_tok"])
@pytest.mark.parametrize(
    "eps_low,eps_high,dual,mode",
    [
        (0.2, 0.2, 3.0, "token-mean"),
        (0.2, 0.28, None, "seq-mean-token-mean"),
        (0.1, 0.3, 2.0, "seq-mean-token-sum-norm"),
    ],
)
def test_ppo_clip_matches_twin(adv_key, eps_low, eps_high, dual, mode):
    batch = make_batch()
    c = math.inf if dual is None else dual

    def lib(lp, old, adv, mask, ref):
        return ppo_clip(
            lp, old, adv, mask, clip_eps_low=eps_low, clip_eps_high=eps_high, dual_clip=dual, agg=mode, max_len=16
        )

    def twin(lp, old, adv, mask, ref):
        return twin_aggregate(twin_ppo_per_token(lp, old, adv, mask, eps_low, eps_high, c), mask, mode, 16)

    out = run_both(lib, twin, batch, adv_key)
    assert 0 < out.metrics["clip_frac"] < 1
    if dual is not None and adv_key == "adv":
        assert out.metrics["clip_frac_lower"] > 0  # row 0 has A < 0 and ρ = e^1.5 > 3


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k3_is"])
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_grpo_matches_twin(estimator, mode):
    batch = make_batch(1)
    beta = 0.3

    def lib(lp, old, adv, mask, ref):
        return grpo(lp, old, adv, mask, ref_logps=ref, kl_coef=beta, kl_estimator=estimator, agg=mode)

    def twin(lp, old, adv, mask, ref):
        per_token = twin_ppo_per_token(lp, old, adv, mask, 0.2, 0.2, math.inf) + beta * twin_kl(lp, ref, old, estimator)
        return twin_aggregate(per_token, mask, mode)

    out = run_both(lib, twin, batch)
    assert {"pg_loss", "kl", "clip_frac", "ratio_mean", "ppo_kl"} <= out.metrics.keys()


def test_dapo_matches_twin():
    batch = make_batch(2)

    def twin(lp, old, adv, mask, ref):
        return twin_aggregate(twin_ppo_per_token(lp, old, adv, mask, 0.2, 0.28, math.inf), mask, "token-mean")

    run_both(lambda lp, old, adv, mask, ref: dapo(lp, old, adv, mask), twin, batch)


@pytest.mark.parametrize("adv_key", ["adv", "adv_tok"])
def test_gpg_matches_twin(adv_key):
    batch = make_batch(3)

    def twin(lp, old, adv, mask, ref):
        per_token = torch.zeros_like(lp)
        for i in range(B):
            for t in range(T):
                if mask[i, t]:
                    per_token[i, t] = -_adv_at(adv, i, t) * lp[i, t]
        return twin_aggregate(per_token, mask, "token-mean")

    run_both(lambda lp, old, adv, mask, ref: gpg(lp, old, adv, mask), twin, batch, adv_key)
    lp = batch["logps"].float()
    assert gpg(lp, None, batch["adv"].float(), batch["mask"]).metrics == {}


@pytest.mark.parametrize("adv_key", ["adv", "adv_tok"])
def test_cpgd_matches_twin(adv_key):
    batch = make_batch(4)

    def lib(lp, old, adv, mask, ref):
        return cpgd(lp, old, adv, mask, clip_eps=0.2, drift_coef=0.05, drift_clip=2.0)

    def twin(lp, old, adv, mask, ref):
        return twin_aggregate(twin_cpgd_per_token(lp, old, adv, mask, 0.2, 0.05, 2.0), mask, "token-mean")

    run_both(lib, twin, batch, adv_key)


def test_padding_is_inert():
    """NaN / −inf in padded positions change neither the loss nor the gradient."""
    batch = make_batch(5)
    mask = batch["mask"]
    clean = {k: v.float() for k, v in batch.items() if k != "mask"}
    dirty = {k: torch.where(mask, v, torch.nan) if v.dim() == 2 else v for k, v in clean.items()}
    dirty["logps"] = torch.where(mask, clean["logps"], -torch.inf)
    for fn in (
        lambda d, lp: ppo_clip(lp, d["old"], d["adv"], mask),
        lambda d, lp: grpo(lp, d["old"], d["adv"], mask, ref_logps=d["ref"], kl_estimator="k3_is"),
        lambda d, lp: gpg(lp, d["old"], d["adv"], mask),
        lambda d, lp: cpgd(lp, d["old"], d["adv"], mask),
    ):
        results = []
        for d in (clean, dirty):
            lp = d["logps"].clone().requires_grad_(True)
            out = fn(d, lp)
            (g,) = torch.autograd.grad(out.loss, lp)
            results.append((out.loss, g))
        assert torch.isfinite(results[1][0]) and torch.isfinite(results[1][1]).all()
        assert_close(results[1][0], results[0][0], atol=0, name="loss")
        assert_close(results[1][1], results[0][1], atol=0, name="grad")


# ----------------------------------------------------------------------------------------------------------
# hand-worked oracles
# ----------------------------------------------------------------------------------------------------------


def one_token(fn, ratio: float, adv: float, **kw) -> tuple[float, float]:
    """Loss and ∂loss/∂log π_θ for a single token with the given ratio π_θ/π_old and advantage."""
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - math.log(ratio)
    out = fn(lp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), **kw)
    (g,) = torch.autograd.grad(out.loss, lp)
    return out.loss.item(), g.item()


@pytest.mark.parametrize(
    "ratio,adv,loss,slope",
    [
        (1.19, 1.0, -1.19, -1.19),  # inside: −Aρ, slope −Aρ
        (1.21, 1.0, -1.2, 0.0),  # clipped at 1+ε for A > 0
        (0.5, 1.0, -0.5, -0.5),  # A > 0 is never clipped from below (pessimistic min)
        (0.79, -1.0, 0.8, 0.0),  # clipped at 1−ε for A < 0
        (0.81, -1.0, 0.81, 0.81),
        (2.5, -1.0, 2.5, 2.5),  # A < 0 is not clipped above until the dual-clip cap c = 3
        (3.5, -1.0, 3.0, 0.0),  # dual-clip: loss capped at −c·A
        (3.5, -2.0, 6.0, 0.0),
    ],
)
def test_ppo_clip_boundaries(ratio, adv, loss, slope):
    got_loss, got_slope = one_token(ppo_clip, ratio, adv, clip_eps=0.2, dual_clip=3.0)
    assert got_loss == pytest.approx(loss, abs=1e-12)
    assert got_slope == pytest.approx(slope, abs=1e-12)


def test_dual_clip_off_and_clip_higher():
    assert one_token(ppo_clip, 3.5, -1.0, dual_clip=None) == pytest.approx((3.5, 3.5))
    # DAPO (0.2 / 0.28): A > 0 keeps a gradient on (1, 1.28), loses it above; A < 0 loses it below 0.8
    assert one_token(dapo, 1.25, 1.0)[1] == pytest.approx(-1.25)
    assert one_token(ppo_clip, 1.25, 1.0)[1] == 0.0  # symmetric ε = 0.2 would already clip
    assert one_token(dapo, 1.30, 1.0) == pytest.approx((-1.28, 0.0))
    assert one_token(dapo, 0.79, -1.0) == pytest.approx((0.8, 0.0))
    assert one_token(dapo, 0.85, -1.0)[1] == pytest.approx(0.85)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_ppo_at_ratio_one_is_minus_advantage(mode):
    """ρ = 1: loss = aggregate(−A); gradient −A·(aggregation weight)·∇log π — REINFORCE with a baseline."""
    batch = make_batch(6)
    lp = batch["logps"].clone().requires_grad_(True)
    mask, adv = batch["mask"], batch["adv"]
    out = ppo_clip(lp, lp.detach(), adv, mask, agg=mode)
    minus_adv = -adv[:, None].expand(B, T)
    assert out.loss.item() == pytest.approx(aggregate(minus_adv, mask, mode).item(), abs=1e-12)
    assert out.metrics["clip_frac"] == 0.0 and out.metrics["ratio_mean"] == 1.0
    (g,) = torch.autograd.grad(out.loss, lp)
    ones = torch.ones(B, T, dtype=torch.float64, requires_grad=True)
    (w,) = torch.autograd.grad(aggregate(ones, mask, mode), ones)
    assert_close(g, minus_adv * w, atol=1e-12, name=mode)
    # GPG and CPGD at θ = θ_old have the same gradient; GRPO with β = 0 too
    for fn in (
        lambda: gpg(lp, lp.detach(), adv, mask, agg=mode),
        lambda: cpgd(lp, lp.detach(), adv, mask, agg=mode),
        lambda: grpo(lp, lp.detach(), adv, mask, kl_coef=0.0, agg=mode),
    ):
        (g_other,) = torch.autograd.grad(fn().loss, lp)
        assert_close(g_other, g, atol=1e-12, name=mode)


def test_cpgd_clip_and_drift_weight():
    # A > 0 and ℓ > log 1.2: the policy term has zero gradient; with α = 0 nothing is left
    assert one_token(cpgd, 1.3, 1.0, drift_coef=0.0)[1] == 0.0
    assert one_token(cpgd, 1.1, 1.0, drift_coef=0.0)[1] == pytest.approx(-1.0)  # no ratio in the gradient
    assert one_token(cpgd, 0.7, -1.0, drift_coef=0.0)[1] == 0.0  # A < 0 clipped below log 0.8
    # drift weight on ∇log π: α·(ρ − 1) for ρ ≤ 3, saturating at α·2 (A = 0 isolates the drift term)
    for ratio, weight in [(0.5, -0.5), (1.0, 0.0), (2.0, 1.0), (3.0, 2.0), (5.0, 2.0)]:
        assert one_token(cpgd, ratio, 0.0, drift_coef=0.01)[1] == pytest.approx(0.01 * weight, abs=1e-12)


@pytest.mark.parametrize("estimator", ["k2", "k3", "k3_is"])
def test_kl_term_vanishes_after_reference_reset(estimator):
    """ProRL (Liu et al. 2025, arXiv:2505.24864, reference resets): right after π_ref ← π_θ the KL term and its gradient
    are exactly zero (k1's per-sample gradient is not — it is zero only in expectation)."""
    batch = make_batch(7)
    lp = batch["logps"].clone().requires_grad_(True)
    out = grpo(lp, lp.detach(), torch.zeros(B), batch["mask"], ref_logps=lp.detach(), kl_estimator=estimator)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert out.metrics["kl"] == 0.0 and (g == 0).all()
    out_k1 = grpo(lp, lp.detach(), torch.zeros(B), batch["mask"], ref_logps=lp.detach(), kl_estimator="k1")
    assert torch.autograd.grad(out_k1.loss, lp)[0].abs().sum() > 0


def test_kl_in_reward_matches_twin():
    batch = make_batch(8)
    mask = batch["mask"]
    outcome = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    outcome[3] = 0.0
    coef = 0.05
    for estimator in ("k1", "k2", "k3"):
        got = kl_in_reward(
            outcome.float(), batch["old"].float(), batch["ref"].float(), mask, coef=coef, estimator=estimator
        )
        twin = torch.zeros(B, T, dtype=torch.float64)
        for i in range(B):
            pos = [t for t in range(T) if mask[i, t]]
            for t in pos:
                twin[i, t] = -coef * twin_kl(batch["old"][i, t], batch["ref"][i, t], None, estimator)
            if pos:
                twin[i, pos[-1]] += outcome[i]
        assert_close(got, twin, name=estimator)
        assert not got.requires_grad


def test_argument_errors_are_actionable():
    batch = make_batch()
    lp, old, adv, mask = batch["logps"], batch["old"], batch["adv"], batch["mask"]
    with pytest.raises(ValueError, match="ref_logps"):
        grpo(lp, old, adv, mask)
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo(lp, old, adv, mask, ref_logps=batch["ref"], kl_estimator="k4")
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip(lp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip(lp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_eps"):
        cpgd(lp, old, adv, mask, clip_eps=1.0)


def test_dynamic_sampling_mask_is_reexported():
    assert dapo_dynamic_sampling_mask(torch.tensor([[1.0, 1.0], [1.0, 0.0]])).tolist() == [False, True]


def test_kl_controllers():
    """Ziegler et al. 2019: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""
    ctl = AdaptiveKLController(init_coef=0.1, target_kl=6.0, horizon=100)
    assert ctl.update(current_kl=6.0, n_steps=10) == pytest.approx(0.1)  # on target: unchanged
    assert ctl.update(current_kl=6.6, n_steps=10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # +10% error
    before = ctl.value
    assert ctl.update(current_kl=60.0, n_steps=10) == pytest.approx(before * (1 + 0.2 * 0.1))  # clipped at +20%
    before = ctl.value
    assert ctl.update(current_kl=0.0, n_steps=50) == pytest.approx(before * (1 - 0.2 * 0.5))  # clipped at −20%
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05 and fixed.value == 0.05
    with pytest.raises(ValueError, match="must all be > 0"):
        AdaptiveKLController(0.1, 0.0, 100)


# ----------------------------------------------------------------------------------------------------------
# exact expected-gradient identities on a V = 5 categorical (float64, enumeration instead of sampling)
# ----------------------------------------------------------------------------------------------------------

V = 5
ONE = torch.ones(1, 1, dtype=torch.bool)


@pytest.fixture
def dists():
    g = torch.Generator().manual_seed(11)
    theta = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(V, generator=g, dtype=torch.float64)
    old = torch.randn(V, generator=g, dtype=torch.float64)
    return theta, ref.log_softmax(-1), old.log_softmax(-1)


def expected_grad(theta, sampler_logp, loss_of_action):
    """∇_θ Σ_a sampler(a)·loss(a) with the sampler held fixed: the exact expectation of the sampled gradient."""
    p = sampler_logp.detach().exp()
    total = sum(p[a] * loss_of_action(a) for a in range(V))
    (g,) = torch.autograd.grad(total, theta)
    return g


def kl_grads(theta, ref_logp, anchor=None):
    (g_rev,) = torch.autograd.grad(kl.reverse_kl(theta, ref_logp), theta)
    (g_fwd,) = torch.autograd.grad(kl.forward_kl(theta, ref_logp), theta)
    return g_rev, g_fwd


def grpo_kl_only(theta, old_logp, ref_logp, estimator):
    """Loss of the GRPO KL term alone (advantage 0, β = 1) for a batch holding the single token a."""

    def loss(a):
        lp = theta.log_softmax(-1)[a].view(1, 1)
        old = old_logp[a].view(1, 1) if old_logp is not None else lp.detach()
        return grpo(
            lp, old, torch.zeros(1), ONE, ref_logps=ref_logp[a].view(1, 1), kl_coef=1.0, kl_estimator=estimator
        ).loss

    return loss


def test_grpo_kl_term_expected_gradients_on_policy(dists):
    """On-policy: E[∇k1] = 0, E[∇k2] = ∇KL(π‖π_ref), E[∇k3] = ∇KL(π_ref‖π) (forward), E[∇(w·k3)] = ∇KL(π‖π_ref)."""
    theta, ref_logp, _ = dists
    pi_logp = theta.log_softmax(-1)
    g_rev, g_fwd = kl_grads(theta, ref_logp)
    assert not torch.allclose(g_rev, g_fwd, atol=1e-3)  # the two KLs really differ here
    zero = torch.zeros(V, dtype=torch.float64)
    assert_close(expected_grad(theta, pi_logp, grpo_kl_only(theta, None, ref_logp, "k1")), zero, "k1", atol=1e-12)
    assert_close(expected_grad(theta, pi_logp, grpo_kl_only(theta, None, ref_logp, "k2")), g_rev, "k2", atol=1e-12)
    assert_close(expected_grad(theta, pi_logp, grpo_kl_only(theta, None, ref_logp, "k3")), g_fwd, "k3", atol=1e-12)
    assert_close(expected_grad(theta, pi_logp, grpo_kl_only(theta, None, ref_logp, "k3_is")), g_rev, "k3_is",
                 atol=1e-12)


def test_grpo_kl_term_expected_gradients_off_policy(dists):
    """Samples from π_old ≠ π: w·k3 still gives ∇KL(π‖π_ref); plain k3 gives neither KL's gradient."""
    theta, ref_logp, old_logp = dists
    g_rev, g_fwd = kl_grads(theta, ref_logp)
    g_is = expected_grad(theta, old_logp, grpo_kl_only(theta, old_logp, ref_logp, "k3_is"))
    assert_close(g_is, g_rev, "k3_is off-policy", atol=1e-12)
    g_k3 = expected_grad(theta, old_logp, grpo_kl_only(theta, old_logp, ref_logp, "k3"))
    assert not torch.allclose(g_k3, g_rev, atol=1e-3) and not torch.allclose(g_k3, g_fwd, atol=1e-3)


def test_kl_in_reward_reinforce_gives_reverse_kl_gradient(dists):
    """k1 in the reward, pushed through REINFORCE (GPG or PPO at ρ = 1): E[k1·∇log π] = ∇KL(π‖π_ref);
    k3 in the reward gives ∇KL(π‖π_ref) − ∇KL(π_ref‖π)."""
    theta, ref_logp, _ = dists
    pi_logp = theta.log_softmax(-1)
    g_rev, g_fwd = kl_grads(theta, ref_logp)

    def reinforce(estimator, objective):
        def loss(a):
            lp = theta.log_softmax(-1)[a].view(1, 1)
            r = kl_in_reward(
                torch.zeros(1, dtype=torch.float64),
                lp.detach(),
                ref_logp[a].view(1, 1),
                ONE,
                coef=1.0,
                estimator=estimator,
            )
            return objective(lp, lp.detach(), r, ONE).loss

        return loss

    assert_close(expected_grad(theta, pi_logp, reinforce("k1", gpg)), g_rev, "k1 gpg", atol=1e-12)
    assert_close(expected_grad(theta, pi_logp, reinforce("k1", ppo_clip)), g_rev, "k1 ppo", atol=1e-12)
    assert_close(expected_grad(theta, pi_logp, reinforce("k3", gpg)), g_rev - g_fwd, "k3 in reward", atol=1e-12)


def test_cpgd_drift_is_forward_kl_to_old_policy(dists):
    """Σ_a π_old(a)·(ρ(a) − 1)·∇log π(a) = ∇KL(π_old‖π) (drift cap lifted, advantage 0)."""
    theta, _, old_logp = dists
    (g_fwd_old,) = torch.autograd.grad(kl.forward_kl(theta, old_logp), theta)

    def loss(a):
        lp = theta.log_softmax(-1)[a].view(1, 1)
        return cpgd(lp, old_logp[a].view(1, 1), torch.zeros(1), ONE, drift_coef=1.0, drift_clip=1e9).loss

    assert_close(expected_grad(theta, old_logp, loss), g_fwd_old, "cpgd drift", atol=1e-12)


def test_k1_in_reward_with_returns_is_the_sequence_kl_gradient():
    """Two tokens, V = 3, a tabular autoregressive policy; enumerate all 9 sequences. REINFORCE on the returns-to-go
    of −k1 token rewards gives ∇KL(π(y)‖π_ref(y)) of the SEQUENCE distribution; a per-token k2 loss does not
    (it drops the effect of the first token on the second token's KL)."""
    g = torch.Generator().manual_seed(12)
    v = 3
    theta1 = torch.randn(v, generator=g, dtype=torch.float64).requires_grad_(True)
    theta2 = torch.randn(v, v, generator=g, dtype=torch.float64).requires_grad_(True)
    ref1 = torch.randn(v, generator=g, dtype=torch.float64).log_softmax(-1)
    ref2 = torch.randn(v, v, generator=g, dtype=torch.float64).log_softmax(-1)
    mask = torch.ones(1, 2, dtype=torch.bool)

    def token_logps(a, b):
        return torch.stack([theta1.log_softmax(-1)[a], theta2.log_softmax(-1)[a, b]]).view(1, 2)

    seqs = [(a, b) for a in range(v) for b in range(v)]
    probs = [token_logps(a, b).sum().exp().detach() for a, b in seqs]
    seq_kl = sum(token_logps(a, b).sum().exp() * (token_logps(a, b).sum() - ref1[a] - ref2[a, b]) for a, b in seqs)
    g_seq = torch.autograd.grad(seq_kl, (theta1, theta2))

    def expected(loss_of_seq):
        total = sum(p * loss_of_seq(a, b) for p, (a, b) in zip(probs, seqs))
        return torch.autograd.grad(total, (theta1, theta2))

    def reinforce_k1(a, b):
        lp = token_logps(a, b)
        ref = torch.stack([ref1[a], ref2[a, b]]).view(1, 2)
        returns = token_returns(
            kl_in_reward(torch.zeros(1, dtype=torch.float64), lp.detach(), ref, mask, coef=1.0), mask
        )
        return gpg(lp, None, returns, mask, agg="seq-mean-token-sum").loss

    def k2_loss(a, b):
        lp = token_logps(a, b)
        ref = torch.stack([ref1[a], ref2[a, b]]).view(1, 2)
        return grpo(
            lp,
            lp.detach(),
            torch.zeros(1),
            mask,
            ref_logps=ref,
            kl_coef=1.0,
            kl_estimator="k2",
            agg="seq-mean-token-sum",
        ).loss

    for got, want in zip(expected(reinforce_k1), g_seq):
        assert_close(got, want, "k1 + returns-to-go", atol=1e-12)
    k2_grads = expected(k2_loss)
    assert not all(torch.allclose(got, want, atol=1e-4) for got, want in zip(k2_grads, g_seq))
