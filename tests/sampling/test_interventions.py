"""Sampling-time interventions and their KL cost: token exclusion ((G)I-DLE), KL-guided temperature, activation
steering with a KL budget, and ``Completions.kl_cost``.

Exact laws come from a table model (next-token logits = TABLE[current token], vocabulary 6, token 0 = EOS), where
every step's law is known in float64 and whole sequences can be enumerated; the stream, steering and decode paths
that need a real KV cache run on the tiny random Llama of ``tether.testing``. Rows finish at different steps
(end-of-sequence, or ``FinishAt`` which ends row r after a row-dependent number of tokens) in every batched test.
"""

import dataclasses
import functools
import itertools
import math

import pytest
import torch

from tether import testing
from tether.sampling import sample
from tether.sampling.decode import supports
from tether.sampling.exclusion import Exclude, masked_softmax_plain, renormalize_excluding
from tether.sampling.guidance import KLGuidedTemperature, kl_guided_temperature
from tether.sampling.steering import (
    Steer,
    calibrate_gamma,
    decoder_layers,
    mean_difference_vector,
    steer,
    steering_kl,
)
from tether.testing import assert_close, tiny_model

V, EOS = 6, 0
TABLE = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [-1.0, 2.0, 0.5, 1.5, -0.5, 0.0],
                      [-2.0, 0.3, 1.7, -0.2, 1.1, 0.9],
                      [-0.5, 1.2, 0.0, 2.2, 0.4, -1.0],
                      [-1.5, 0.8, 1.9, 0.1, 0.6, 1.4],
                      [-3.0, 1.0, -0.3, 0.7, 2.4, 0.2]])
TableLM = functools.partial(testing.TableLM, TABLE)
CharTokenizer = functools.partial(testing.CharTokenizer, "abcdef")
PROMPTS = [[1], [2, 3], [5], [4, 4, 1]]


def logp(prev: int, T: float = 1.0, banned=()) -> torch.Tensor:
    """float64 log softmax(TABLE[prev] / T), −inf on ``banned`` and renormalised (plain masking)."""
    z = TABLE[prev].double() / T
    if banned:
        z = z.index_fill(0, torch.tensor(sorted(banned)), float("-inf"))
    return z.log_softmax(-1)


def kl64(logq: torch.Tensor, logp_: torch.Tensor) -> float:
    q = logq.exp()
    return float(torch.where(q > 0, q * (logq - logp_), torch.zeros_like(q)).sum())


class FinishAt:
    """Draw-only, changes nothing: ends completion r after ``1 + r % 4`` tokens (rows leave at different steps)."""

    changes_logprobs = False

    def __call__(self, scores, rows):
        return scores

    def start(self, rows):
        self.len = {r: 0 for r in rows.tolist()}

    def accept(self, tokens, rows):
        done = []
        for r in rows.tolist():
            self.len[r] += 1
            done.append(self.len[r] >= 1 + r % 4)
        return torch.tensor(done)


class Identity:
    changes_logprobs = True

    def __call__(self, scores, rows):
        return scores


# --- exclusion -------------------------------------------------------------------------------------------------


def test_renormalized_restriction_is_masking_and_the_kl_projection():
    """On random logits (5, 47), float64: renormalize_excluding == log_softmax of −∞-masked logits; its KL to P is
    −log P(B^c); any other Q with Q(B) = 0 is farther from P (KL(Q‖P) = KL(Q‖Q*) − log P(B^c))."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 47, generator=g, dtype=torch.float64) * 2
    banned = torch.rand(5, 47, generator=g) < 0.3
    q = renormalize_excluding(z, banned)
    assert_close(q.exp(), masked_softmax_plain(z, banned).exp(), "Q* vs masking", atol=1e-15)
    assert torch.isneginf(q[banned]).all()
    p = z.log_softmax(-1)
    allowed_mass = p.exp().masked_fill(banned, 0).sum(-1)
    for i in range(5):
        assert kl64(q[i], p[i]) == pytest.approx(-math.log(allowed_mass[i]), abs=1e-12)
        other = torch.randn(47, generator=g, dtype=torch.float64).masked_fill(banned[i], float("-inf"))
        assert kl64(other.log_softmax(-1), p[i]) > kl64(q[i], p[i])


def test_exclusion_never_emits_banned_and_its_law_is_masking_by_enumeration():
    """Exclude(token 3, phrase (1, 2)) on the table model, 4 prompts × 600 draws of ≤ 2 tokens, rows finishing at
    EOS. Every completion avoids token 3 and the pair 1 → 2; every recorded log-prob is the float64 masked law's;
    the frequencies of the 36 + 6 completions of prompt [1] match the exact law Q (|f − Q| ≤ 4σ + 1/N); the same
    seed through a plain −∞-masking processor draws the same tokens; kl_cost is the float64 sum of −log P(B^c)."""
    ex = Exclude(tokens=[3], phrases=[[1, 2]])
    out = sample(TableLM(), CharTokenizer(), PROMPTS, n=600, max_new_tokens=2, temperature=1.0, batch_size=256,
                 processors=[ex], seed=1)
    assert ex.removed > 0 and 0 < ex.removed_mass < ex.removed
    seen: dict[tuple, int] = {}
    for i, p, ids, lp, kl in zip(out.prompt_index, out.prompt_ids, out.completion_ids, out.logprobs, out.kl_cost):
        assert 3 not in ids
        walk = list(zip([p[-1]] + ids[:-1], ids))
        assert all(not (a == 1 and b == 2) for a, b in walk[1:])
        want_lp, want_kl = [], 0.0
        for t, (a, b) in enumerate(walk):
            banned = {3} | ({2} if t > 0 and a == 1 else set())
            want_lp.append(float(logp(a, banned=banned)[b]))
            want_kl += kl64(logp(a, banned=banned), logp(a))
        assert_close(torch.tensor(lp), torch.tensor(want_lp), "recorded log-probs", atol=1e-6)
        assert float(kl) == pytest.approx(want_kl, abs=1e-6)
        if i == 0:
            seen[tuple(ids)] = seen.get(tuple(ids), 0) + 1
    N = 600
    for y1 in range(V):
        first = float(logp(1, banned={3})[y1].exp())
        seconds = [()] if y1 == EOS else [(y2,) for y2 in range(V)]
        for rest in seconds:
            q = first if not rest else first * float(logp(y1, banned={3} | ({2} if y1 == 1 else set()))[rest[0]].exp())
            f = seen.get((y1, *rest), 0) / N
            assert abs(f - q) <= 4 * math.sqrt(q * (1 - q) / N) + 1 / N, (y1, rest, f, q)

    class Mask:  # the plain twin: −inf masking of the same banned sets
        changes_logprobs = True

        def start(self, rows):
            self.last = {r: None for r in rows.tolist()}

        def accept(self, tokens, rows):
            self.last.update(zip(rows.tolist(), tokens.tolist()))

        def __call__(self, scores, rows):
            ban = torch.zeros_like(scores, dtype=torch.bool)
            ban[:, 3] = True
            for i, r in enumerate(rows.tolist()):
                ban[i, 2] |= self.last[r] == 1
            return scores.masked_fill(ban, float("-inf"))

    twin = sample(TableLM(), CharTokenizer(), PROMPTS, n=600, max_new_tokens=2, temperature=1.0, batch_size=256,
                  processors=[Mask()], seed=1)
    assert twin.completion_ids == out.completion_ids
    assert_close(torch.tensor([sum(x) for x in twin.logprobs]), torch.tensor([sum(x) for x in out.logprobs]),
                 atol=1e-5)


def test_exclude_from_strings_and_errors():
    """The byte-level tiny tokenizer: "d" is one token; phrase "ab" is banned as a·b and as " "·a·b."""
    tok = testing.tiny_tokenizer()
    d, a, b, space = (tok(c, add_special_tokens=False)["input_ids"][0] for c in ("d", "a", "b", " "))
    ex = Exclude.from_strings(tok, tokens=["d"], phrases=["ab"])
    assert ex.tokens == [d] and ex.follow == {(a,): {b}, (space, a): {b}}
    with pytest.raises(ValueError, match="not one"):
        Exclude.from_strings(tok, tokens=["ab"])
    with pytest.raises(ValueError, match="empty phrase"):
        Exclude(phrases=[[]])


# --- KL cost ---------------------------------------------------------------------------------------------------


class Bias:
    """Draw-only: adds ``bias`` to token 4's score (a tilt the recorded log-probs do not see)."""

    changes_logprobs = False

    def __init__(self, bias):
        self.bias = bias

    def __call__(self, scores, rows):
        return scores + torch.nn.functional.one_hot(torch.tensor(4), V).to(scores) * self.bias


def processed_logp(prev, T, t, bias=0.7):
    """The law after [Exclude(token 5), Bias(+0.7 on token 4)], float64."""
    z = TABLE[prev].double() / T
    z = z.index_fill(0, torch.tensor([5]), float("-inf"))
    z[4] += bias
    return z.log_softmax(-1)


def test_no_processors_no_cost_and_identity_costs_exactly_zero():
    plain = sample(TableLM(), CharTokenizer(), PROMPTS, n=3, max_new_tokens=5, seed=2)
    assert plain.kl_cost is None
    ident = sample(TableLM(), CharTokenizer(), PROMPTS, n=3, max_new_tokens=5, seed=2,
                   processors=[Identity(), Exclude(), FinishAt()])
    assert ident.kl_cost.dtype == torch.float64 and torch.equal(ident.kl_cost, torch.zeros(12, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_kl_cost_is_the_float64_sum_of_step_kls(temperature):
    """Chain [Exclude(5), Bias(+0.7 on 4), FinishAt] with top_k = 4 (not part of the cost): kl_cost[k] =
    Σ_t KL(q_t ‖ p_t) with q_t the law after the caller's processors and p_t = softmax(TABLE[prev]/T), both at the
    sampling temperature (1 at temperature 0), recomputed in float64; batched, rows leaving at different steps."""
    out = sample(TableLM(), CharTokenizer(), PROMPTS, n=5, max_new_tokens=6, temperature=temperature, top_k=4,
                 batch_size=8, seed=3, processors=[Exclude(tokens=[5]), Bias(0.7), FinishAt()])
    T = temperature or 1.0
    lengths = set()
    for r, (p, ids, kl) in enumerate(zip(out.prompt_ids, out.completion_ids, out.kl_cost)):
        lengths.add(len(ids))
        assert len(ids) <= 1 + r % 4
        want = sum(kl64(processed_logp(a, T, t), logp(a, T)) for t, (a, _) in enumerate(zip([p[-1]] + ids[:-1], ids)))
        assert float(kl) == pytest.approx(want, abs=1e-6)
    assert len(lengths) > 2


def test_expected_kl_cost_is_the_sequence_kl_by_enumeration():
    """Chain rule, by enumeration of every completion of ≤ 3 tokens of prompt [2] (EOS ends one; length 3 is cut):
    Σ_y Q(y)·Σ_t KL(q_t‖p_t) = KL(Q ‖ P) = Σ_y Q(y) log(Q(y)/P(y)) exactly (float64), and the Monte-Carlo mean of
    the sampler's kl_cost over 3000 draws is within 4 standard errors of it."""
    T, L = 0.8, 3
    exp_cost = seq_kl = total = 0.0
    for length in range(1, L + 1):
        for ys in itertools.product(range(V), repeat=length):
            if (EOS in ys[:-1]) or (length < L and ys[-1] != EOS):
                continue
            prev = [2, *ys[:-1]]
            lq = sum(float(processed_logp(a, T, 0)[b]) for a, b in zip(prev, ys))
            lp = sum(float(logp(a, T)[b]) for a, b in zip(prev, ys))
            if lq == -math.inf:
                continue
            cost = sum(kl64(processed_logp(a, T, 0), logp(a, T)) for a in prev)
            total += math.exp(lq)
            exp_cost += math.exp(lq) * cost
            seq_kl += math.exp(lq) * (lq - lp)
    assert total == pytest.approx(1.0, abs=1e-12)
    assert exp_cost == pytest.approx(seq_kl, abs=1e-12)
    out = sample(TableLM(), CharTokenizer(), [[2]], n=3000, max_new_tokens=L, temperature=T, batch_size=512, seed=4,
                 processors=[Exclude(tokens=[5]), Bias(0.7)])
    mean, se = out.kl_cost.mean().item(), out.kl_cost.std().item() / math.sqrt(3000)
    assert abs(mean - seq_kl) <= 4 * se, (mean, seq_kl, se)


# --- KL-guided temperature -------------------------------------------------------------------------------------


def test_kl_guided_temperature_closed_forms():
    """Identical laws → KL = 0 exactly and T = T₀; KL = h → T₀/2; KL = 3h → T₀/8; KL direction with ‖ without
    (checked against a two-token closed form: p = (0.8, 0.2), p' = (0.5, 0.5): KL = 0.8 log 1.6 + 0.2 log 0.4)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 31, generator=g)
    t, kl = kl_guided_temperature(z, z.clone(), 0.9, 0.3)
    assert torch.equal(kl, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(t, torch.full((4,), 0.9, dtype=torch.float64))
    a = torch.tensor([[math.log(0.8), math.log(0.2)]])
    b = torch.tensor([[0.0, 0.0]])
    want = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    t, kl = kl_guided_temperature(a, b, 1.2, want)
    assert kl.item() == pytest.approx(want, abs=1e-7) and t.item() == pytest.approx(0.6, abs=1e-6)
    t, _ = kl_guided_temperature(a, b, 1.2, want / 3)
    assert t.item() == pytest.approx(0.15, abs=1e-6)
    assert kl_guided_temperature(a, b, 1.2, 1e-9, min_temperature=0.05)[0].item() == 0.05
    with pytest.raises(ValueError, match="bandwidth"):
        KLGuidedTemperature(TableLM(), PROMPTS, temperature=1.0, bandwidth=0.0)


def test_kl_guided_temperature_on_the_table_model():
    """Source-free prompts that end with the same token as the sampled ones: the two laws coincide at every step,
    T_t = T₀ throughout and the draw is plain sampling at T₀ (same tokens, same log-probs, cost exactly 0). Source-free
    prompts ending differently: on the table model the laws differ only at the first step (after it both streams
    hold the same token), so T_1 = T₀·2^(−KL_1/h) with KL_1 = KL(softmax(TABLE[a]) ‖ softmax(TABLE[a'])) and
    T_t = T₀ after; the recorded log-prob of y_1 is that of softmax(TABLE[a]/T_1) and kl_cost is
    KL(softmax(TABLE[a]/T_1) ‖ softmax(TABLE[a]/T₀))."""
    T0, h = 0.9, 0.25
    plain = sample(TableLM(), CharTokenizer(), PROMPTS, n=4, max_new_tokens=5, temperature=T0, batch_size=6, seed=6)
    same = KLGuidedTemperature(TableLM(), [[p[-1]] for p in PROMPTS], n=4, temperature=T0, bandwidth=h)
    out = sample(TableLM(), CharTokenizer(), PROMPTS, n=4, max_new_tokens=5, temperature=T0, batch_size=6, seed=6,
                 processors=[same])
    assert out.completion_ids == plain.completion_ids
    assert all(t == T0 for ts in same.temperatures.values() for t in ts)
    assert_close(torch.tensor(sum(out.logprobs, [])), torch.tensor(sum(plain.logprobs, [])), atol=1e-6)
    assert torch.equal(out.kl_cost, torch.zeros(16, dtype=torch.float64))

    free = [[3], [1], [2], [5]]  # last token of each source-free prompt
    guided = KLGuidedTemperature(TableLM(), free, n=4, temperature=T0, bandwidth=h)
    out = sample(TableLM(), CharTokenizer(), PROMPTS, n=4, max_new_tokens=5, temperature=T0, batch_size=6, seed=6,
                 processors=[guided, FinishAt()])
    for r, (i, ids, lp, kl) in enumerate(zip(out.prompt_index, out.completion_ids, out.logprobs, out.kl_cost)):
        a, a_free = PROMPTS[i][-1], free[i][0]
        kl1 = kl64(logp(a), logp(a_free))
        t1 = T0 * 2 ** (-kl1 / h)
        ts = guided.temperatures[r]
        assert len(ts) == len(ids)
        assert ts[0] == pytest.approx(t1, rel=1e-6) and guided.guide_kl[r][0] == pytest.approx(kl1, abs=1e-6)
        assert all(t == pytest.approx(T0, rel=1e-6) for t in ts[1:])
        assert lp[0] == pytest.approx(float(logp(a, t1)[ids[0]]), abs=1e-5)
        assert float(kl) == pytest.approx(kl64(logp(a, t1), logp(a, T0)), abs=1e-5)


def test_kl_guided_stream_matches_full_forwards_on_a_real_cache():
    """Tiny Llama (lean decode path for both streams), rows leaving at different steps: every step's guide KL equals
    the KL recomputed from two full forwards (with-source prompt + tokens so far, source-free prompt + tokens so
    far), fp32 forward noise ≤ 1e-4."""
    model = tiny_model(seed=1)
    prompts = [[10, 20, 30, 40], [50, 60]]
    free = [[40], [7, 8, 60]]
    guided = KLGuidedTemperature(model, free, n=3, temperature=1.0, bandwidth=0.5, max_new_tokens=4)
    out = sample(model, testing.tiny_tokenizer(), prompts, n=3, max_new_tokens=4, seed=7,
                 processors=[guided, FinishAt()])
    assert guided.stream.decoder is not None
    for r, (i, ids) in enumerate(zip(out.prompt_index, out.completion_ids)):
        for t in range(len(ids)):
            with torch.no_grad():
                zw = model(torch.tensor([prompts[i] + ids[:t]])).logits[0, -1].double()
                zf = model(torch.tensor([free[i] + ids[:t]])).logits[0, -1].double()
            assert guided.guide_kl[r][t] == pytest.approx(kl64(zw.log_softmax(-1), zf.log_softmax(-1)), abs=1e-4)


# --- steering --------------------------------------------------------------------------------------------------


def test_steering_gamma_zero_is_exact_and_the_hook_is_removed():
    model = tiny_model(seed=2)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, 1, v, 0.0):
            assert not supports(model)
            zero = model(ids).logits
        with steer(model, 1, v, 0.5):
            moved = model(ids).logits
        after = model(ids).logits
    assert torch.equal(zero, base) and torch.equal(after, base) and not torch.equal(moved, base)
    assert supports(model) and not decoder_layers(model)[1]._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, 1, v, 0.5):
            raise RuntimeError("boom")
    assert not decoder_layers(model)[1]._forward_hooks
    with pytest.raises(ValueError, match="layer 5 out of range"):
        with steer(model, 5, v, 0.5):
            pass


def test_mean_difference_vector_reads_the_hooked_block():
    """v = mean over pairs of the output of block L at the last real token = hidden_states[L + 1] there."""
    model = tiny_model(seed=3)
    pos, neg = [[5, 6, 7], [8, 9]], [[1, 2], [3, 4, 5, 6]]
    v = mean_difference_vector(model, 0, pos, neg)
    with torch.no_grad():
        def h(s):
            return model(torch.tensor([s]), output_hidden_states=True).hidden_states[1][0, -1]
        want = torch.stack([h(a) - h(b) for a, b in zip(pos, neg)]).mean(0)
    assert_close(v, want, atol=1e-5)


def test_calibrated_gamma_meets_the_budget():
    """Bisection on the measured mean token KL(p_γ ‖ p_0): the returned γ is within the budget, 1.2·γ is not (the
    bracket is tight), the evaluated KLs increase with γ, and for small γ the KL grows as γ² (ratio 4 ± 5% when γ
    doubles)."""
    model = tiny_model(seed=4)
    seqs = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    budget = 0.005  # the KL saturates near 0.012 as γ → ∞ here (the final norm bounds the shift)
    cal = calibrate_gamma(model, seqs, 1, v, budget, gamma_start=0.01)
    assert cal.monotone and 0 < cal.kl <= budget and cal.gamma > 0
    assert steering_kl(model, seqs, 1, v, cal.gamma) == pytest.approx(cal.kl, abs=1e-12)
    assert steering_kl(model, seqs, 1, v, 1.2 * cal.gamma) > budget
    small = cal.gamma / 64
    ratio = steering_kl(model, seqs, 1, v, 2 * small) / steering_kl(model, seqs, 1, v, small)
    assert ratio == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError, match="budget"):
        calibrate_gamma(model, seqs, 1, v, 0.0)


def test_steer_processor_costs_the_exact_steering_kl():
    """Steer as a processor (steered model in its own cache, the sampler's model unsteered and on the lean decode
    path), rows leaving at different steps: each recorded log-prob is the steered full forward's, and kl_cost is
    Σ_t KL(steered ‖ unsteered) at T recomputed from full forwards (fp32 noise ≤ 1e-4). γ = 0 costs 0."""
    model = tiny_model(seed=5)
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    prompts, T = [[10, 11, 12], [40, 41]], 0.8
    proc = Steer(model, prompts, n=3, layer=0, vector=v, gamma=0.7, temperature=T)
    out = sample(model, testing.tiny_tokenizer(), prompts, n=3, max_new_tokens=4, temperature=T, seed=8,
                 processors=[proc, FinishAt()])
    assert supports(model)
    for i, ids, lp, kl in zip(out.prompt_index, out.completion_ids, out.logprobs, out.kl_cost):
        seq = torch.tensor([prompts[i] + ids])
        with torch.no_grad():
            base = (model(seq).logits[0].double() / T).log_softmax(-1)
            with steer(model, 0, v, 0.7):
                steered = (model(seq).logits[0].double() / T).log_softmax(-1)
        at = range(len(prompts[i]) - 1, len(prompts[i]) - 1 + len(ids))
        assert_close(torch.tensor(lp), torch.stack([steered[t, y] for t, y in zip(at, ids)]), atol=1e-4)
        assert float(kl) == pytest.approx(sum(kl64(steered[t], base[t]) for t in at), abs=1e-4)
    assert out.kl_cost.min() > 0
    zero = sample(model, testing.tiny_tokenizer(), prompts, n=3, max_new_tokens=4, temperature=T, seed=8,
                  processors=[Steer(model, prompts, n=3, layer=0, vector=v, gamma=0.0, temperature=T)])
    assert zero.kl_cost.abs().max() < 1e-6


def test_kl_cost_summary_is_a_mean_over_prompts():
    """Costs [0.1, 0.3] for prompt 0 and [0.5] for prompt 1 → per-prompt means 0.2, 0.5 → mean 0.35, CI half-width
    1.96·sd/√2 with sd = |0.5 − 0.2|/√2."""
    from tether.sampling import Completions
    from tether.sampling.sampler import kl_cost_summary

    done = Completions(prompt_index=[0, 0, 1], kl_cost=torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64))
    got = kl_cost_summary(done)
    assert got["intervention_kl"] == pytest.approx(0.35)
    assert got["intervention_kl_ci95"] == pytest.approx(1.96 * 0.3 / math.sqrt(2) / math.sqrt(2))
    assert kl_cost_summary(Completions(prompt_index=[0])) == {}


def test_sampling_inside_steer_is_the_steer_processor():
    """``with steer(...): sample(...)`` (the hook makes ``supports`` refuse the lean path, so every decode step runs
    the hooked forward) draws what the ``Steer`` processor draws with the same seed, with the same recorded
    log-probs (fp32 paths: ≤ 1e-4) — a lean decode that skipped the hook would draw from the unsteered model."""
    model = tiny_model(seed=6)
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    prompts, kw = [[10, 11, 12], [40, 41]], dict(n=3, max_new_tokens=5, temperature=1.0, seed=9)
    via_proc = sample(model, testing.tiny_tokenizer(), prompts, processors=[
        Steer(model, prompts, n=3, layer=1, vector=v, gamma=1.5)], **kw)
    with steer(model, 1, v, 1.5):
        via_hook = sample(model, testing.tiny_tokenizer(), prompts, **kw)
    plain = sample(model, testing.tiny_tokenizer(), prompts, **kw)
    assert via_hook.completion_ids == via_proc.completion_ids != plain.completion_ids
    assert_close(torch.tensor(sum(via_hook.logprobs, [])), torch.tensor(sum(via_proc.logprobs, [])), atol=1e-4)
    with pytest.raises(ValueError, match="no forward hooks"):
        with steer(model, 1, v, 1.5):
            sample(model, testing.tiny_tokenizer(), prompts, lean_decode=True, **kw)


def test_completions_select_takes_every_field():
    from tether.sampling import Completions

    done = Completions(prompt_index=[0, 0, 1], prompt_ids=[[9], [9], [8]], completion_ids=[[1], [2], [3]],
                       logprobs=[[-1.0], [-2.0], [-3.0]], texts=["a", "b", "c"], finished=[True, False, True],
                       kl_cost=torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    sub = done.select([2, 0])
    assert sub.prompt_index == [1, 0] and sub.completion_ids == [[3], [1]] and sub.texts == ["c", "a"]
    assert torch.equal(sub.kl_cost, torch.tensor([0.3, 0.1], dtype=torch.float64))
    assert sub.finished == [True, True] and sub.logprobs == [[-3.0], [-1.0]]
    assert dataclasses.replace(done, kl_cost=None).select([1]).kl_cost is None
