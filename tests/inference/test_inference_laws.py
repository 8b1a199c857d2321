"""Exact output laws of the selection methods (``tether.inference.laws``) against brute force and hand-worked
values, in float64, on the 15-outcome sequence space of the fixed-logits model (``inference_helpers``).

Brute force: enumerate every ordered N-tuple of outcomes (15^N of them), its probability Π π_ref(y_i), and the
probability that the rule keeps each of its entries — independent of the closed forms under test."""

import math

import pytest
import torch
from inference_helpers import REF, count_b_reward, distinct_reward, rewards_of

from tether.inference import laws
from tether.testing import assert_close

DISTINCT_R = rewards_of(distinct_reward)
LEVEL_R = rewards_of(count_b_reward)


def brute_force(ref: torch.Tensor, rewards: torch.Tensor, n: int, keep) -> torch.Tensor:
    """The law of the kept outcome: ``keep(r (T, n)) -> (T, n)`` probabilities of keeping each entry of every
    tuple."""
    K = len(ref)
    tuples = torch.cartesian_prod(*[torch.arange(K)] * n).reshape(-1, n)
    prob = ref[tuples].prod(-1)
    weights = keep(rewards[tuples])
    return torch.zeros(K, dtype=torch.float64).index_add_(0, tuples.reshape(-1), (prob[:, None] * weights).reshape(-1))


def keep_first_best(r):
    first = r.argmax(-1)  # torch.argmax returns the first maximal index
    return torch.nn.functional.one_hot(first, r.shape[-1]).double()


def keep_first_worst(r):
    return keep_first_best(-r)


def keep_soft(tau):
    return lambda r: (r / tau).softmax(-1)


def keep_rejection(beta, r_max):
    def keep(r):
        a = ((r - r_max) / beta).exp()
        before = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1 - a[:, :-1]], -1), -1)
        w = a * before
        w[:, 0] += (1 - a).prod(-1)  # none accepted: the first candidate
        return w
    return keep


def test_best_of_n_golden_half_half():
    """π_ref = (½, ½), rewards (0, 1), N = 2: the best of two is outcome 1 unless both draws are 0, so
    π_2 = (¼, ¾); KL = ¼·log(¼/½) + ¾·log(¾/½) = −¼ log 2 + ¾ log 1.5 = 0.130812…, below the quoted
    log 2 − ½ = 0.193147…; the win rate against π_ref, ties ½, is ¼·¼ + ¾·(½ + ¼) = 0.625 ≤ 2/3."""
    ref, r = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    law = laws.best_of_n_law(ref, r, 2)
    assert_close(law, torch.tensor([0.25, 0.75]), "π_2", atol=1e-15)
    assert laws.kl(law, ref) == pytest.approx(-0.25 * math.log(2) + 0.75 * math.log(1.5), abs=1e-15)
    assert laws.kl(law, ref) == pytest.approx(0.1308120359, abs=1e-10)
    assert laws.bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert laws.win_rate(law, ref, r) == pytest.approx(0.625, abs=1e-15)
    assert laws.win_rate(law, ref, r) <= laws.bon_win_rate_bound(2)


@pytest.mark.parametrize("reward_name", ["distinct", "ties"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_best_of_n_law_is_the_law_of_the_first_best_of_n_draws(reward_name, n):
    """π_N(y) = π_ref(y)/m(y)·(F(y)^N − F⁻(y)^N) equals brute force with a first-in-draw-order tie-break (with
    distinct rewards this is F^N − F⁻^N), sums to one and its KL is below log N − (N−1)/N."""
    r = DISTINCT_R if reward_name == "distinct" else LEVEL_R
    law = laws.best_of_n_law(REF, r, n)
    assert_close(law, brute_force(REF, r, n, keep_first_best), "best-of-n law", atol=1e-13)
    assert float(law.sum()) == pytest.approx(1.0, abs=1e-14)
    if reward_name == "distinct":
        F, Fm = laws.reward_cdf(REF, r)
        assert_close(law, F ** n - Fm ** n, "F^N − F⁻^N", atol=1e-15)
    assert laws.kl(law, REF) <= laws.bon_kl_bound(n) + 1e-15
    assert laws.win_rate(law, REF, r) <= laws.bon_win_rate_bound(n) + 1e-15
    worst = laws.worst_of_n_law(REF, r, n)
    assert_close(worst, brute_force(REF, r, n, keep_first_worst), "worst-of-n law", atol=1e-13)


def test_best_of_n_kl_grows_to_minus_log_of_the_best_outcome():
    """N → ∞: the best of N draws is the top outcome with probability 1 − (1 − π_ref(top))^N, so KL(π_N‖π_ref) →
    −log π_ref(top). π_ref = (0.1, 0.2, 0.7) with the 0.7 outcome best: at N = 200, 0.3^200 ≈ 3e-105, so the KL
    is −log 0.7 = 0.356675 to double precision; on the sequence space the KL increases with N towards
    −log π_ref(best sequence), staying below the bound."""
    ref = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    law = laws.best_of_n_law(ref, torch.tensor([0.0, 1.0, 2.0]), 200)
    assert laws.kl(law, ref) == pytest.approx(-math.log(0.7), abs=1e-14)
    top = float(REF[DISTINCT_R.argmax()])
    ns = (1, 2, 4, 16, 64, 256)
    kls = [laws.kl(laws.best_of_n_law(REF, DISTINCT_R, n), REF) for n in ns]
    assert kls[0] == 0.0
    assert all(a < b for a, b in zip(kls, kls[1:])), kls
    assert all(k <= laws.bon_kl_bound(n) for k, n in zip(kls, ns))
    assert laws.kl(laws.best_of_n_law(REF, DISTINCT_R, 4096), REF) == pytest.approx(-math.log(top), abs=1e-12)


def test_half_half_kl_tends_to_log_2_while_the_quoted_formula_grows():
    """Two equally likely outcomes: KL(π_N‖π_ref) → log 2 (the law tends to a point mass on the better one) while
    log N − (N−1)/N grows without bound. N = 4: π_4 = (1/16, 15/16), KL = 0.459356 (bound 0.636294); N = 16:
    0.692963 (bound 1.835088)."""
    ref, r = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    k4 = laws.kl(laws.best_of_n_law(ref, r, 4), ref)
    assert k4 == pytest.approx((1 / 16) * math.log(1 / 8) + (15 / 16) * math.log(15 / 8), abs=1e-15)
    assert k4 == pytest.approx(0.4593555219, abs=1e-10) and k4 < laws.bon_kl_bound(4)
    k16 = laws.kl(laws.best_of_n_law(ref, r, 16), ref)
    assert k16 == pytest.approx(0.6929626965, abs=1e-10)
    assert k16 < math.log(2) < laws.bon_kl_bound(16) == pytest.approx(1.8350887222, abs=1e-10)
    assert laws.kl(laws.best_of_n_law(ref, r, 1000), ref) == pytest.approx(math.log(2), abs=1e-12)


def test_beirami_estimator_bounds_and_limits():
    """0 ≤ KL̂(ε; N) ≤ log N − (N−1)/N on a grid of ε; KL̂(1) = 0; KL̂ = 0 at N = 1; KL̂ → the bound as ε → 0
    (ε = 1e-300: a sequence probability far below float precision of 1 − ε is still handled)."""
    eps = torch.cat([torch.logspace(-300, -1, 60, dtype=torch.float64), torch.linspace(0.1, 1.0, 91,
                                                                                       dtype=torch.float64)])
    for n in (1, 2, 3, 8, 64, 1000):
        est = laws.bon_kl_estimate(eps, n)
        assert torch.isfinite(est).all()
        assert (est >= -1e-14).all() and (est <= laws.bon_kl_bound(n) + 1e-12).all(), n
        assert float(laws.bon_kl_estimate(torch.tensor(1.0), n)) == 0.0
        tiny = laws.bon_kl_estimate(torch.tensor(1e-300, dtype=torch.float64), n)
        assert float(tiny) == pytest.approx(laws.bon_kl_bound(n), abs=1e-12)
    assert_close(laws.bon_kl_estimate(eps, 1), torch.zeros_like(eps), "n = 1", atol=1e-15)


@pytest.mark.parametrize("eps,n", [(0.1, 8), (0.4, 3), (0.02, 32)])
def test_beirami_estimator_is_exact_for_an_atom_plus_an_atomless_rest(eps, n):
    """The estimator is the KL of best-of-N for π_ref = an atom of mass ε at the top reward plus an atomless rest.
    Enumerated with the rest split into M equal atoms (rank k of M): π_N = (1−ε)^N·((k/M)^N − ((k−1)/M)^N) on the
    rest and 1 − (1−ε)^N on the atom, so exactly

        KL_M = KL̂(ε; N) − (1−ε)^N·(log N − (N−1)/N − KL_unif(M, N)),

    KL_unif(M, N) the best-of-N KL of the uniform law on M outcomes; KL_M → KL̂ as M grows (the rest becomes
    atomless): at M = 10⁴ within 1e-6 for these cases."""
    est = float(laws.bon_kl_estimate(torch.tensor(eps, dtype=torch.float64), n))
    gaps = []
    for M in (10, 100, 1000, 10_000):
        ref = torch.cat([torch.full((M,), (1 - eps) / M, dtype=torch.float64),
                         torch.tensor([eps], dtype=torch.float64)])
        r = torch.arange(M + 1, dtype=torch.float64)
        exact = laws.kl(laws.best_of_n_law(ref, r, n), ref)
        uniform = torch.full((M,), 1 / M, dtype=torch.float64)
        kl_unif = laws.kl(laws.best_of_n_law(uniform, r[:M], n), uniform)
        # 1e-10: F is a float64 cumulative sum over up to 10⁴ atoms (relative error ≲ 10⁴·2⁻⁵³ ≈ 1e-12), raised to
        # the N-th power.
        assert exact == pytest.approx(est - (1 - eps) ** n * (laws.bon_kl_bound(n) - kl_unif), abs=1e-10)
        gaps.append(est - exact)
    assert all(g >= 0 for g in gaps) and all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-6


def test_soft_best_of_n_law_matches_brute_force_and_its_limits():
    """Soft best-of-N (keep i with probability softmax(r/τ)_i): the composition-count formula equals brute force;
    τ → 0 gives best-of-N (ties split uniformly, the same law as first-in-order); τ = ∞ gives π_ref."""
    for r in (DISTINCT_R / 14, LEVEL_R):
        for tau in (0.3, 1.0, 5.0):
            assert_close(laws.soft_best_of_n_law(REF, r, 3, tau), brute_force(REF, r, 3, keep_soft(tau)),
                         f"soft law τ={tau}", atol=1e-14)
        assert_close(laws.soft_best_of_n_law(REF, r, 4, 1e-9), laws.best_of_n_law(REF, r, 4), "τ → 0",
                     atol=1e-14)
        assert_close(laws.soft_best_of_n_law(REF, r, 4, math.inf), REF, "τ = ∞", atol=1e-15)
    # Moving towards the limits: TV to best-of-N shrinks as τ falls, TV to π_ref as τ grows.
    taus = (4.0, 1.0, 0.25, 0.05, 0.01)
    to_bon = [laws.tv(laws.soft_best_of_n_law(REF, LEVEL_R, 4, t), laws.best_of_n_law(REF, LEVEL_R, 4)) for t in taus]
    assert all(a > b for a, b in zip(to_bon, to_bon[1:])), to_bon
    to_ref = [laws.tv(laws.soft_best_of_n_law(REF, LEVEL_R, 4, t), REF) for t in taus]
    assert all(a < b for a, b in zip(to_ref, to_ref[1:])), to_ref


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_tilted_resampling_approaches_the_tilted_optimum(beta):
    """Importance resampling of one of N π_ref draws with weights exp(r/β) has a law that approaches π* ∝
    π_ref·exp(r/β): the exact TV to π* falls strictly with N (N = 1 is π_ref itself)."""
    star, _ = laws.tilted_law(REF, LEVEL_R, beta)
    ns = (1, 2, 4, 8, 16, 32)
    tvs = [laws.tv(laws.soft_best_of_n_law(REF, LEVEL_R, n, beta), star) for n in ns]
    assert tvs[0] == pytest.approx(laws.tv(REF, star), abs=1e-15)
    assert all(a > b for a, b in zip(tvs, tvs[1:])), tvs


def test_kl_regularized_objective_identity():
    """For every π: E_π[r] − β·KL(π‖π_ref) = β·log Z − β·KL(π‖π*), with π* = π_ref·exp(r/β)/Z — so π* maximizes
    the objective (value β log Z) and any method's shortfall is β times its KL to π*. Checked for random π and for
    the laws of best-of-N and soft best-of-N."""
    gen = torch.Generator().manual_seed(0)
    for beta in (0.1, 1.0, 3.0):
        star, log_z = laws.tilted_law(REF, DISTINCT_R / 14, beta)
        # Uniform on the simplex: normalized Exp(1) draws.
        candidates = [e / e.sum() for e in (-torch.rand(5, len(REF), generator=gen, dtype=torch.float64).log())]
        candidates += [laws.best_of_n_law(REF, DISTINCT_R, 4), laws.soft_best_of_n_law(REF, LEVEL_R, 3, 0.5), star]
        for pi in candidates:
            lhs = float((pi * DISTINCT_R / 14).sum()) - beta * laws.kl(pi, REF)
            rhs = beta * log_z - beta * laws.kl(pi, star)
            assert lhs == pytest.approx(rhs, abs=1e-12)
        assert float((star * DISTINCT_R / 14).sum()) - beta * laws.kl(star, REF) == pytest.approx(beta * log_z,
                                                                                              abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_rejection_law_matches_brute_force_and_tends_to_the_optimum(n):
    """Rejection over N candidates (accept with exp((r − r_max)/β), first accepted kept, else the first candidate):
    (1 − (1 − ā)^N)·π* + (1 − ā)^{N−1}·π_ref·(1 − a) equals brute force; as N grows it tends to π*."""
    beta, r = 0.7, LEVEL_R
    r_max = float(r.max())
    assert_close(laws.rejection_law(REF, r, n, beta, r_max), brute_force(REF, r, n, keep_rejection(beta, r_max)),
                 "rejection law", atol=1e-14)
    star, _ = laws.tilted_law(REF, r, beta)
    tvs = [laws.tv(laws.rejection_law(REF, r, k, beta, r_max), star) for k in (1, 4, 16, 64, 256)]
    assert all(a > b for a, b in zip(tvs, tvs[1:])) and tvs[-1] < 1e-6, tvs
    with pytest.raises(ValueError, match="reward_max"):
        laws.rejection_law(REF, r, n, beta, r_max - 1)


def test_win_rate_of_the_reference_is_a_half_and_best_of_n_below_its_bound():
    """Ties counted ½: π_ref against itself wins exactly ½ (Σ π(F⁻ + ½m) = ½ (Σ_levels m)² = ½); best-of-N stays
    ≤ N/(N+1), with equality for distinct rewards only in the atomless limit."""
    for r in (DISTINCT_R, LEVEL_R):
        assert laws.win_rate(REF, REF, r) == pytest.approx(0.5, abs=1e-15)
        for n in (2, 4, 8):
            assert laws.win_rate(laws.best_of_n_law(REF, r, n), REF, r) < laws.bon_win_rate_bound(n)
