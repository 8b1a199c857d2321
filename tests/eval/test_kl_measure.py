"""KL measurement (``tether.eval.kl.measure_kl``) against exact enumeration, and the sampler it relies on.

Models: ``tether.testing.tiny_model`` with seeds 0 and 1 (vocab 259). A freshly initialised tiny model is almost
uniform (max next-token probability ≈ 0.007, KL between seeds ≈ 0.01 nats/token, end-of-sequence almost never
sampled), so besides the plain models the oracle also runs on "sharpened" ones: the final-norm gain × 10 (every
logit × 10) and a +3 bias on the end-of-sequence logit through an LM head with a bias. Those put ≈ 0.35 on the
top token, ≈ 5 % on eos, and the two seeds ≈ 1 nat/token apart, so both branches of the enumeration (a first
token that ends the completion, and one that does not) carry weight.

Exact oracle (max_new_tokens = 2): completions are y = (y1) when y1 = eos, else (y1, y2), so

    KL(π(·|x) ‖ π_ref(·|x)) = KL_1(x) + Σ_{y1 ≠ eos} π(y1|x) · KL_2(x, y1),

with KL_t the full-vocabulary KL of the next-token distributions, computed from ``model(ids).logits`` in float64
(one batched forward over all 258 continuations y1). The expected length is E|y| = 2 − π(eos|x).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tether.eval.kl import measure_kl
from tether.sampling import render_prompts, sample
from tether.testing import tiny_model, tiny_tokenizer

PROMPTS = ["Say hi.", "Name a colour, please."]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def sharpened(seed: int, scale: float = 10.0, eos_bias: float = 3.0):
    """tiny_model(seed) with logits × ``scale`` and ``eos_bias`` added to the eos logit (LM head with a bias; the
    head's weight stays tied to the embedding)."""
    model = tiny_model(seed=seed)
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        head.weight = model.lm_head.weight
        head.bias.zero_()
        head.bias[eos] = eos_bias
        model.lm_head = head
    return model


MODELS = {"plain": lambda seed: tiny_model(seed=seed), "sharpened": sharpened}


@torch.no_grad()
def _next_logp(model, ids: list[list[int]]) -> torch.Tensor:
    """(N, V) float64 log-probs of the next token after each (equal-length) id list, from full logits."""
    return F.log_softmax(model(torch.tensor(ids)).logits[:, -1].double(), dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def exact_two_token_kl(policy, reference, prompt_ids: list[int], eos: int) -> tuple[float, float]:
    """(sequence KL over the first two tokens, expected completion length), by enumeration."""
    lp, lq = _next_logp(policy, [prompt_ids])[0], _next_logp(reference, [prompt_ids])[0]
    kl1 = _kl(lp, lq)
    y1 = [v for v in range(lp.numel()) if v != eos]
    kl2 = _kl(_next_logp(policy, [prompt_ids + [v] for v in y1]), _next_logp(reference, [prompt_ids + [v] for v in y1]))
    return (kl1 + (lp[y1].exp() * kl2).sum()).item(), 2.0 - lp[eos].exp().item()


def _half_width(stat: dict) -> float:
    return (stat["ci95"][1] - stat["ci95"][0]) / 2


# ------------------------------------------------------------------------------------------------------ zero


@pytest.mark.parametrize("kind", MODELS)
def test_identical_models_give_zero_kl(tok, kind):
    """Two separately built copies of the same weights: every per-token KL and log-ratio is exactly 0."""
    policy, reference = MODELS[kind](0), MODELS[kind](0)
    report = measure_kl(policy, reference, tok, PROMPTS, samples_per_prompt=3, max_new_tokens=5, seed=0)
    assert report["completions"] == 6 and report["token_kl"]["n_tokens"] > 0
    assert abs(report["token_kl"]["mean"]) < 1e-6 and abs(report["token_kl"]["max"]) < 1e-6
    assert abs(report["sequence_kl_rao_blackwell"]["mean"]) < 1e-6
    assert abs(report["sequence_kl_monte_carlo"]["mean"]) < 1e-6


# ----------------------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("kind", MODELS)
def test_sequence_and_token_kl_match_exact_enumeration(tok, kind):
    """64 samples per prompt × 2 prompts, max_new_tokens = 2: each estimate lies within max(4 × its 95 % CI
    half-width, 1e-3) of the exact value. Rao–Blackwell and Monte-Carlo estimate the mean over prompts of the
    sequence KL; the token-level ratio estimator Σ KL_t / Σ|y| estimates Σ_x KL(x) / Σ_x E|y|."""
    policy, reference = MODELS[kind](0), MODELS[kind](1)
    eos = tok.eos_token_id
    exact = [exact_two_token_kl(policy, reference, ids, eos) for ids in render_prompts(tok, PROMPTS)]
    seq_exact = sum(kl for kl, _ in exact) / len(exact)
    token_exact = sum(kl for kl, _ in exact) / sum(n for _, n in exact)
    assert seq_exact > 0.02  # far from 0: a report of 0 cannot pass

    report = measure_kl(policy, reference, tok, PROMPTS, samples_per_prompt=64, max_new_tokens=2, seed=0)
    assert report["completions"] == 128 and report["sequence_kl_rao_blackwell"]["n"] == 128
    for name in ("sequence_kl_rao_blackwell", "sequence_kl_monte_carlo"):
        stat = report[name]
        tol = max(4 * _half_width(stat), 1e-3)
        assert abs(stat["mean"] - seq_exact) < tol, f"{name}: {stat['mean']:.5f} vs exact {seq_exact:.5f} ± {tol:.5f}"
    tk = report["token_kl"]
    tol = max(4 * _half_width(tk), 1e-3)
    assert abs(tk["mean"] - token_exact) < tol, f"token_kl: {tk['mean']:.5f} vs exact {token_exact:.5f} ± {tol:.5f}"
    # Rao–Blackwellisation must not cost precision: its CI is no wider than the Monte-Carlo one.
    assert _half_width(report["sequence_kl_rao_blackwell"]) <= _half_width(report["sequence_kl_monte_carlo"])
    # |y| ∈ {1, 2}: sd ≤ 0.5, so 4 sd of the mean of 128 is 0.18.
    mean_len = sum(n for _, n in exact) / len(exact)
    assert abs(report["mean_completion_tokens"] - mean_len) < 4 * 0.5 / math.sqrt(128)
    again = measure_kl(policy, reference, tok, PROMPTS, samples_per_prompt=64, max_new_tokens=2, seed=0)
    assert again == report, "measure_kl is not deterministic for a fixed seed"


# --------------------------------------------------------------------------------------------------- sampling


def _greedy_by_hand(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(int(_next_logp(model, [prompt + out])[0].argmax()))
        if out[-1] == eos:
            break
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_token_frequencies_follow_the_tempered_policy(tok, temperature):
    """2000 one-token samples: the frequency of every token with p > 1 % (and of the rest together) lies within
    4 binomial standard errors of softmax(logits / T). At T = 1 the top token has p ≈ 0.36; sampling at 0.9
    instead would give ≈ 0.47, ten standard errors away — the KL report assumes samples from π itself."""
    model, N = sharpened(0), 2000
    ids = render_prompts(tok, PROMPTS)[:1]
    p = torch.softmax(_next_logp(model, ids)[0] / temperature, dim=-1)
    done = sample(model, tok, ids, n=N, max_new_tokens=1, temperature=temperature, seed=0, batch_size=N)
    freq = torch.bincount(torch.tensor([c[0] for c in done.completion_ids]), minlength=p.numel()).double() / N
    big = p > 0.01
    assert big.sum() >= 3
    buckets = [(f"token {v}", freq[v].item(), p[v].item()) for v in big.nonzero().flatten().tolist()]
    buckets.append(("rest", freq[~big].sum().item(), p[~big].sum().item()))
    for name, f, q in buckets:
        assert abs(f - q) < 4 * math.sqrt(q * (1 - q) / N), f"{name}: frequency {f:.4f} vs probability {q:.4f}"


def test_same_seed_same_completions_and_seeds_matter(tok):
    model = sharpened(0)
    ids = render_prompts(tok, PROMPTS)
    a = sample(model, tok, ids, n=4, max_new_tokens=6, temperature=1.0, seed=3, batch_size=3)
    b = sample(model, tok, ids, n=4, max_new_tokens=6, temperature=1.0, seed=3, batch_size=3)
    c = sample(model, tok, ids, n=4, max_new_tokens=6, temperature=1.0, seed=4, batch_size=3)
    assert a == b
    assert a.completion_ids != c.completion_ids
    assert len(set(map(tuple, a.completion_ids))) > 1, "temperature 1 gave identical samples"


def test_temperature_zero_is_greedy_for_every_seed(tok):
    """temperature 0 = argmax decoding, checked against a hand loop over full-logit argmaxes; the seed is
    irrelevant and all n completions of a prompt are the same."""
    model = sharpened(1)
    ids = render_prompts(tok, PROMPTS)
    runs = [sample(model, tok, ids, n=3, max_new_tokens=6, temperature=0.0, seed=s) for s in (0, 1, 7)]
    assert runs[0] == runs[1] == runs[2]
    for k, i in enumerate(runs[0].prompt_index):
        assert runs[0].completion_ids[k] == _greedy_by_hand(model, ids[i], 6, tok.eos_token_id)


def test_n_per_prompt_length_limit_and_eos_accounting(tok):
    """n completions per prompt in prompt order; none longer than max_new_tokens; a completion is finished exactly
    when it ends with eos (and eos appears nowhere else), otherwise it has exactly max_new_tokens tokens; the
    KL report counts the unfinished ones as cut."""
    model, n, max_new = sharpened(0, eos_bias=5.0), 5, 4
    ids = render_prompts(tok, PROMPTS)
    done = sample(model, tok, ids, n=n, max_new_tokens=max_new, temperature=1.0, seed=0, batch_size=16)
    assert done.prompt_index == [i for i in range(len(PROMPTS)) for _ in range(n)]
    assert done.prompt_ids == [ids[i] for i in done.prompt_index]
    eos = tok.eos_token_id
    for c, finished, text in zip(done.completion_ids, done.finished, done.texts):
        assert 1 <= len(c) <= max_new
        assert eos not in c[:-1]
        assert finished == (c[-1] == eos)
        if not finished:
            assert len(c) == max_new
        assert text == tok.decode(c, skip_special_tokens=True)
    assert any(done.finished) and not all(done.finished), "the test needs both outcomes"

    report = measure_kl(model, sharpened(1, eos_bias=5.0), tok, PROMPTS, samples_per_prompt=n,
                        max_new_tokens=max_new, seed=0, batch_size=16)
    assert report["truncated_at_max_new_tokens"] == sum(not f for f in done.finished)
    assert math.isclose(report["mean_completion_tokens"], sum(map(len, done.completion_ids)) / len(done.finished))
