"""The methods on real samples: candidates drawn by ``tether.sampling.sample`` from the fixed-logits model
(``inference_helpers``), selected by ``tether.inference.methods``, compared with the exact laws of
``tether.inference.laws``.

Goodness of fit: Pearson's χ² of the kept completions' histogram against the exact law, P = 3000 prompts (each a
fresh set of candidates), fixed seeds; a test fails when p < 1e-3 (cells with an expected count below 5 pooled).
Averages of per-prompt figures are compared with their exact expectations within 4 standard errors."""

import math

import pytest
import torch
from inference_helpers import (
    REF,
    TEXTS,
    CharTokenizer,
    TableLM,
    chi_square_pvalue,
    count_b_reward,
    distinct_reward,
    histogram,
    rewards_of,
)

from tether.inference import METHODS, best_of_n, draw_candidates, laws, rejection_sampling, soft_best_of_n
from tether.inference.accounting import level_plugin_kl, selection_bound

P = 3000
ALPHA = 1e-3
LEVEL_R, DISTINCT_R = rewards_of(count_b_reward), rewards_of(distinct_reward)


def draw(reward, n, m=2, seed=0, prompts=P, temperature=1.0):
    return draw_candidates(TableLM(), CharTokenizer(), [{"prompt": "a"}] * prompts, reward, n=n, base_samples=m,
                           max_new_tokens=3, temperature=temperature, seed=seed, batch_size=4096)


@pytest.fixture(scope="module")
def level_cands():
    return draw(count_b_reward, 4, seed=1)


@pytest.fixture(scope="module")
def distinct_cands():
    return draw(distinct_reward, 4, seed=2)


def kept_texts(cands, result):
    return [cands.done.texts[k] for k in result.kept(cands)]


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values[torch.isfinite(values)]
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def test_candidates_carry_the_exact_sequence_log_probability(level_cands):
    """Σ of the sampler's token log-probs (float32 steps) = log π_ref(y|x) from the enumeration, EOS included."""
    index = {t: k for k, t in enumerate(TEXTS)}
    want = torch.tensor([math.log(REF[index[t]]) for t in level_cands.done.texts], dtype=torch.float64)
    got = level_cands.seq_logprob.reshape(-1)
    assert (got - want).abs().max() < 1e-5
    assert level_cands.rewards.shape == (P, 6) and level_cands.scored.all()


def test_candidate_draws_follow_pi_ref(level_cands):
    """Every one of the P·(N+M) draws is a π_ref sample: their histogram fits REF."""
    assert chi_square_pvalue(histogram(level_cands.done.texts), REF) > ALPHA


@pytest.mark.parametrize("name", ["best_of_n", "worst_of_n"])
@pytest.mark.parametrize("which", ["distinct", "ties"])
def test_sampled_best_and_worst_of_n_follow_the_closed_form(name, which, level_cands, distinct_cands):
    """The kept completions of best-/worst-of-4 fit π_N(y) = π_ref(y)/m(y)·(F^N − F⁻^N) (ties broken uniformly)."""
    cands, r = (distinct_cands, DISTINCT_R) if which == "distinct" else (level_cands, LEVEL_R)
    res = METHODS[name](cands, 4, generator=torch.Generator().manual_seed(3))
    law = (laws.best_of_n_law if name == "best_of_n" else laws.worst_of_n_law)(REF, r, 4)
    assert chi_square_pvalue(histogram(kept_texts(cands, res)), law) > ALPHA


def test_sampled_soft_best_of_n_tilted_and_rejection_follow_their_exact_laws(level_cands, distinct_cands):
    """Soft best-of-4 at τ = 0.5 and importance resampling at β = 1 (count-of-b reward, with ties), rejection at
    β = 0.7 with r_max = 3 and at n = 3 (its exact law includes the fall-back to the first candidate)."""
    gen = torch.Generator().manual_seed(4)
    soft = METHODS["soft_best_of_n"](level_cands, 4, tau=0.5, generator=gen)
    assert chi_square_pvalue(histogram(kept_texts(level_cands, soft)), laws.soft_best_of_n_law(REF, LEVEL_R, 4,
                                                                                                0.5)) > ALPHA
    tilted = METHODS["tilted"](distinct_cands, 4, beta=4.0, generator=gen)
    assert chi_square_pvalue(histogram(kept_texts(distinct_cands, tilted)),
                             laws.soft_best_of_n_law(REF, DISTINCT_R, 4, 4.0)) > ALPHA
    rej = METHODS["rejection"](level_cands, 3, beta=0.7, reward_max=3.0, generator=gen)
    assert chi_square_pvalue(histogram(kept_texts(level_cands, rej)),
                             laws.rejection_law(REF, LEVEL_R, 3, 0.7, 3.0)) > ALPHA
    # The probabilities the rule reports match the coins it drew: the mean acceptance equals the exact one.
    a_bar = float((REF * ((LEVEL_R - 3.0) / 0.7).exp()).sum())
    mean, se = mean_se(rej.selection.accepted.double())
    assert abs(mean - (1 - (1 - a_bar) ** 3)) < 4 * se


def test_win_rate_estimates_are_unbiased(level_cands):
    """Against the M independent base draws, ties ½: plain sampling wins ½ in expectation, best-of-4 wins
    Σ π_4(F⁻ + ½m) (exact); the sample means are within 4 standard errors."""
    plain = METHODS["plain"](level_cands, 1)
    mean, se = mean_se(plain.win_rate)
    assert abs(mean - 0.5) < 4 * se
    bon = METHODS["best_of_n"](level_cands, 4, generator=torch.Generator().manual_seed(5))
    mean, se = mean_se(bon.win_rate)
    assert abs(mean - laws.win_rate(laws.best_of_n_law(REF, LEVEL_R, 4), REF, LEVEL_R)) < 4 * se


def test_kl_figures_of_best_of_n(level_cands):
    """Per prompt: Beirami's estimate at ε = exp(sequence log-prob of the kept completion); the bound log N −
    (N−1)/N; the selection bound log(N / #tied best). The exact KL (ties lower it) lies below the mean of both
    bounds; the tie-blind Beirami estimate stays at or below the quoted bound."""
    res = METHODS["best_of_n"](level_cands, 4, generator=torch.Generator().manual_seed(6))
    rows = torch.arange(P)
    eps = level_cands.seq_logprob[rows, res.selection.index].exp()
    assert torch.equal(res.kl["beirami_estimate"].values, laws.bon_kl_estimate(eps, 4))
    assert (res.kl["beirami_estimate"].values <= laws.bon_kl_bound(4) + 1e-12).all()
    assert torch.equal(res.kl["bound"].values, torch.full((P,), laws.bon_kl_bound(4), dtype=torch.float64))
    r = level_cands.rewards[:, :4]
    tied = (r == r.amax(-1, keepdim=True)).sum(-1)
    assert torch.allclose(res.kl["selection_bound"].values, math.log(4) - tied.double().log(), atol=1e-12)
    assert torch.equal(res.ess, tied.double())
    exact = laws.kl(laws.best_of_n_law(REF, LEVEL_R, 4), REF)
    assert exact < laws.bon_kl_bound(4) and exact < float(res.kl["selection_bound"].values.mean())
    assert {f.kind for f in res.kl.values()} == {"estimate", "bound", "plug-in"}


def test_selection_bound_bounds_the_exact_kl_of_soft_best_of_n(level_cands):
    """E[log N − H(p)] ≥ KL(π_out‖π_ref) (data-processing inequality); its sample mean is not significantly below
    the exact KL of the soft best-of-4 law, at two temperatures."""
    for tau in (0.3, 1.0):
        res = METHODS["soft_best_of_n"](level_cands, 4, tau=tau, generator=torch.Generator().manual_seed(7))
        exact = laws.kl(laws.soft_best_of_n_law(REF, LEVEL_R, 4, tau), REF)
        mean, se = mean_se(res.kl["selection_bound"].values)
        assert mean > exact - 4 * se, (tau, mean, exact)


def test_level_plugin_golden():
    """Reference draws (0, 0, 1, 1): p̂ = (½, ½) on two levels, so the best-of-2 plug-in is the (½, ½) golden
    value −¼ log 2 + ¾ log 1.5 = 0.130812; soft best-of-2 at τ = ∞ is π_ref itself (0); more levels than allowed →
    NaN (not applicable)."""
    r = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    s = torch.ones_like(r, dtype=torch.bool)
    bon = level_plugin_kl(r, s, lambda p, v: laws.best_of_n_law(p, v, 2), max_levels=2)
    assert bon[0] == pytest.approx(-0.25 * math.log(2) + 0.75 * math.log(1.5), abs=1e-15)
    assert math.isnan(bon[1])
    flat = level_plugin_kl(r, s, lambda p, v: laws.soft_best_of_n_law(p, v, 2, math.inf))
    assert flat.abs().max() < 1e-15


def test_selection_rules_limits_and_bookkeeping():
    """τ = 0 keeps the best (uniform over ties), τ = ∞ gives uniform probabilities (ESS = N, selection bound 0);
    an unscored candidate is never kept while a scored one exists; a prompt with none keeps candidate 0, flagged;
    rejection with r_max = None always accepts (its best candidate has acceptance 1)."""
    scores = torch.tensor([[0.1, 0.9, 0.9, 0.2], [0.3, 0.3, 0.3, 0.3], [5.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    scored = torch.tensor([[True] * 4, [True] * 4, [False, True, True, True]])
    gen = torch.Generator().manual_seed(0)
    sel = best_of_n(scores, scored, generator=gen)
    assert torch.equal(sel.probs, torch.tensor([[0, .5, .5, 0], [.25, .25, .25, .25], [0, 0, 0, 1]],
                                               dtype=torch.float64))
    flat = soft_best_of_n(scores, math.inf, generator=gen)
    assert torch.equal(flat.probs, torch.full((3, 4), 0.25, dtype=torch.float64))
    assert torch.allclose(selection_bound(flat.probs), torch.zeros(3, dtype=torch.float64), atol=1e-15)
    none = soft_best_of_n(scores, 1.0, torch.zeros_like(scored), generator=gen)
    assert none.no_opinion.all() and (none.index == 0).all()
    rej = rejection_sampling(scores, 0.1, None, generator=gen)
    assert rej.accepted.all()
    with pytest.raises(ValueError, match="reward_max"):
        rejection_sampling(scores, 0.1, 1.0)


def test_same_seed_same_result():
    a, b = draw(count_b_reward, 4, prompts=50, seed=9), draw(count_b_reward, 4, prompts=50, seed=9)
    assert a.done.texts == b.done.texts
    ra = METHODS["soft_best_of_n"](a, 4, tau=0.5, generator=torch.Generator().manual_seed(1))
    rb = METHODS["soft_best_of_n"](b, 4, tau=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ra.selection.index, rb.selection.index)
    assert draw(count_b_reward, 4, prompts=50, seed=10).done.texts != a.done.texts


def test_best_of_n_reward_is_monotone_in_n_on_shared_candidates(level_cands):
    """Every n uses the first n candidates of the same draws, so per prompt the best-of-n reward never falls and the
    worst-of-n reward never rises as n grows; n = 1 keeps candidate 0, the plain sample."""
    gen = torch.Generator().manual_seed(2)
    best = torch.stack([METHODS["best_of_n"](level_cands, n, generator=gen).reward for n in (1, 2, 3, 4)])
    worst = torch.stack([METHODS["worst_of_n"](level_cands, n, generator=gen).reward for n in (1, 2, 3, 4)])
    assert (best.diff(dim=0) >= 0).all() and (worst.diff(dim=0) <= 0).all()
    assert torch.equal(best[0], METHODS["plain"](level_cands).reward)


def test_rejection_keep_probabilities_average_over_visiting_orders():
    """Rejection visits the candidates in a uniformly random order; its keep probabilities (elementary symmetric
    polynomials) equal the average over all N! orders of 'first accepted, else first visited', computed by brute
    force — and are 1/N each when all acceptances are equal (so the selection bound is 0 when the rewards tie)."""
    import itertools

    from tether.inference.select import _visit_probabilities

    gen = torch.Generator().manual_seed(0)
    accept = torch.cat([torch.rand(3, 5, generator=gen, dtype=torch.float64), torch.full((1, 5), 0.3,
                                                                                         dtype=torch.float64)])
    want = torch.zeros_like(accept)
    for row in range(accept.shape[0]):
        for perm in itertools.permutations(range(5)):
            rejected = 1.0
            for i in perm:
                want[row, i] += rejected * accept[row, i] / 120
                rejected *= 1 - float(accept[row, i])
            want[row, perm[0]] += rejected / 120
    got = _visit_probabilities(accept)
    assert torch.allclose(got, want, atol=1e-15, rtol=0)
    assert torch.allclose(got[3], torch.full((5,), 0.2, dtype=torch.float64), atol=1e-15, rtol=0)
    assert selection_bound(got[3:]).abs().max() < 1e-15
