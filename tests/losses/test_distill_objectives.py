"""Distillation objectives (``tether.losses.distill``: ``minillm``, ``dpkd``, ``preference_kd``): exact-enumeration
oracles, hand-worked values, identities between objectives at neutral settings, and fp32 runs against float64
twins written independently.

MiniLLM enumeration oracle (float64). Sequence space: vocabulary V = 3, length T = 2, so 9 sequences y = (a, b). The
student is tabular: logits θ₁ ∈ R³ at the first state, θ₂[a] ∈ R³ at the state after token a; the teacher likewise
(φ₁, φ₂), fixed. Tokens are drawn from the teacher-mixed law p̃_t = α·p_t + (1−α)·q_t, so
P̃(y) = p̃₁(a)·p̃₂(b|a). For every sequence the library's ``minillm`` loss L(y; θ) is computed on a batch of that one
sequence (sum over its tokens), at θ = θ_old (ratio 1). Then

    Σ_y sg(P̃(y)) · ∇_θ L(y; θ)    ==    ∇_θ Σ_y q_θ(y)·(log q_θ(y) − log p(y))      (sequence-level reverse KL)

at the paper's settings — return from t+1, γ = 1, no length normalization, no whitening, no clip — with the exact
weights: cumulative W_t on each token (and on the single-step term) and per-decision ratios inside the future
return. Why it holds: ∇KL = E_q[Σ_t ∇KL_t(s_t)] + E_q[Σ_t Σ_{t'>t} (log q − log p)(y_t')·∇log q(y_t)] (MiniLLM
Eq. 3), and Π_{u ≤ t'} q/p̃ turns E_p̃ into E_q for anything that depends on y_≤t'. At α = 0 all weights are 1.

Departures measured the same way: the official return includes r_t, which adds E_q[Σ_t ∇KL_t(s_t)] (states held
fixed) once more — because E_{y~q}[−(log p − log q)(y)·∇log q(y)] = Σ_y ∇q·(log q − log p) = ∇KL(q‖p) at one
state; and the paper's per-token weight w_t (instead of the products) is biased when α > 0.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tether import kl
from tether.losses.distill.dpkd import (
    dpkd_sequence,
    dpkd_token,
    dpkd_token_dpop,
    dpkd_token_ipo,
    dpkd_token_per_position,
)
from tether.losses.distill.minillm import (
    minillm,
    minillm_advantages,
    minillm_importance_weights,
    minillm_mixture_logprobs,
    minillm_rewards,
    minillm_single_step,
)
from tether.losses.distill.preference_kd import (
    TopK,
    adpa,
    adpa_advantages,
    adpa_per_position,
    dckd,
    teacher_topk,
    topk_forward_kl,
    topk_forward_kl_per_position,
)
from tether.losses.policy.advantages import whiten
from tether.losses.preference import dpo
from tether.testing import assert_close

F64 = torch.float64
UPSTREAM = 0.37  # gradient pushed from above: catches a loss right only up to a constant factor


def ragged_mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def gathered(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# MiniLLM: the tabular sequence space
# ----------------------------------------------------------------------------------------------------------

V, T = 3, 2
SEQS = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (9, 2)


def tabular(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta1 = torch.randn(V, generator=g, dtype=F64).requires_grad_()
    theta2 = torch.randn(V, V, generator=g, dtype=F64).requires_grad_()
    phi1 = 1.5 * torch.randn(V, generator=g, dtype=F64)
    phi2 = 1.5 * torch.randn(V, V, generator=g, dtype=F64)
    return {"theta1": theta1, "theta2": theta2, "phi1": phi1, "phi2": phi2}


def per_sequence_logits(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(9, 2, V): the logits at s₁ and at s₂ = (y₁) for every sequence."""
    return torch.stack([first.expand(len(SEQS), V), second[SEQS[:, 0]]], dim=1)


def sequence_reverse_kl(m: dict[str, torch.Tensor]) -> torch.Tensor:
    log_q = gathered(per_sequence_logits(m["theta1"], m["theta2"]), SEQS).sum(-1)
    log_p = gathered(per_sequence_logits(m["phi1"], m["phi2"]), SEQS).sum(-1)
    return (log_q.exp() * (log_q - log_p)).sum()


def expected_estimator_gradient(
    m: dict[str, torch.Tensor],
    alpha: float,
    *,
    exact_weights: bool,
    include_current: bool = False,
    weight_single_step: bool = True,
    per_decision: bool | None = None,
    p_tilde: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_y sg(P̃(y))·∇ L(y) with L from ``minillm`` on each one-sequence batch (sum over its two tokens).

    ``exact_weights``: cumulative W_t on the tokens (else the per-token w_t); ``per_decision`` (default: the same as
    ``exact_weights``): per-token ratios inside the future return; ``p_tilde``: the law of the 9 sequences (default:
    the product of ``minillm_mixture_logprobs``)."""
    per_decision = exact_weights if per_decision is None else per_decision
    s_logits = per_sequence_logits(m["theta1"], m["theta2"])
    t_logits = per_sequence_logits(m["phi1"], m["phi2"])
    logps = gathered(s_logits, SEQS)
    old = logps.detach()
    t_logps = gathered(t_logits, SEQS)
    mask = torch.ones(len(SEQS), T, dtype=torch.bool)
    if p_tilde is None:
        with torch.no_grad():
            p_tilde = minillm_mixture_logprobs(old, t_logps, alpha).sum(-1).exp()  # P̃(y)
    rewards = minillm_rewards(t_logps, old, mask)
    w = minillm_importance_weights(old, t_logps, mask, alpha=alpha)
    big_w = minillm_importance_weights(old, t_logps, mask, alpha=alpha, cumulative=True)
    adv = minillm_advantages(
        rewards, mask, gamma=1.0, include_current=include_current, length_norm=False, whiten=False,
        future_weights=w if per_decision else None,
    )
    weights = big_w if exact_weights else w
    surrogate = logps.new_zeros(())
    for i in range(len(SEQS)):
        row = slice(i, i + 1)
        out = minillm(
            logps[row], old[row], adv[row], mask[row], weights=weights[row], student_logits=s_logits[row],
            teacher_logits=t_logits[row], weight_single_step=weight_single_step, clip_eps=None,
            agg="seq-mean-token-sum",
        )
        surrogate = surrogate + p_tilde[i] * out.loss
    return torch.autograd.grad(surrogate, [m["theta1"], m["theta2"]])


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_minillm_exact_gradient_oracle(alpha, seed):
    """E_p̃[∇(single-step + long-term)] = ∇KL(q_θ ‖ p) over whole sequences, exactly (see module docstring)."""
    m = tabular(seed)
    want = torch.autograd.grad(sequence_reverse_kl(m), [m["theta1"], m["theta2"]])
    got = expected_estimator_gradient(m, alpha, exact_weights=True)
    for g, w, name in zip(got, want, ["theta1", "theta2"]):
        assert_close(g, w, f"∇{name} α={alpha}", atol=1e-12)


def sampler_law(m: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """P̃(y) of the 9 sequences as the sampler's teacher-mixed draw gives it: ``TeacherMixture`` driven over the
    whole space (9 completions of one prompt), the student and the teacher as fixed-logits models (``TableLM``) whose
    logits after the prompt token 3 are θ₁ / φ₁ and after token a are θ₂[a] / φ₂[a]; token 3 (end of sequence) has
    logit −inf, so every sequence has length 2. Probabilities are the softmax of the processor's output, exactly
    what ``sample`` draws from."""
    from tether.sampling.mixing import TeacherMixture
    from tether.testing import TableLM

    def table(first, second):
        t = torch.full((V + 1, V + 1), float("-inf"), dtype=F64)
        t[:V, :V], t[V, :V] = second.detach(), first.detach()
        return t

    student, teacher = table(m["theta1"], m["theta2"]), table(m["phi1"], m["phi2"])
    mix = TeacherMixture(TableLM(teacher), [[V]], n=len(SEQS), alpha=alpha, temperature=1.0)
    rows = torch.arange(len(SEQS))
    mix.start(rows)
    log_p = mix(student[torch.full((len(SEQS),), V)], rows).gather(-1, SEQS[:, :1])
    mix.accept(SEQS[:, 0], rows)
    log_p = log_p + mix(student[SEQS[:, 0]], rows).gather(-1, SEQS[:, 1:])
    return log_p.squeeze(-1).exp()


@pytest.mark.parametrize("alpha", [0.2, 0.7])
def test_minillm_exact_gradient_oracle_through_the_teacher_mixed_sampler(alpha):
    """The same oracle with P̃ taken from the sampler's processor (``tether.sampling.mixing.TeacherMixture``):
    it is a law (sums to 1), it is Π_t (α·p_t + (1−α)·q_t) over the sequence, and the exact-weight estimator's
    expectation under it is ∇KL(q_θ ‖ p) over sequences, to float64 rounding."""
    m = tabular(4)
    law = sampler_law(m, alpha)
    assert float(law.sum()) == pytest.approx(1.0, abs=1e-14)
    q = F.softmax(per_sequence_logits(m["theta1"], m["theta2"]).detach(), -1)
    p = F.softmax(per_sequence_logits(m["phi1"], m["phi2"]), -1)
    by_hand = (alpha * p + (1 - alpha) * q).gather(-1, SEQS[..., None]).squeeze(-1).prod(-1)
    assert_close(law, by_hand, "P̃", atol=1e-15)
    want = torch.autograd.grad(sequence_reverse_kl(m), [m["theta1"], m["theta2"]])
    got = expected_estimator_gradient(m, alpha, exact_weights=True, p_tilde=law)
    for g, w, name in zip(got, want, ["theta1", "theta2"]):
        assert_close(g, w, f"∇{name} α={alpha}", atol=1e-12)


def test_minillm_exact_gradient_oracle_alpha0_official_weighting():
    """At α = 0 the official weighting (w ≡ 1, single-step unweighted) gives the same exact gradient."""
    m = tabular(2)
    want = torch.autograd.grad(sequence_reverse_kl(m), [m["theta1"], m["theta2"]])
    got = expected_estimator_gradient(m, 0.0, exact_weights=False, weight_single_step=False)
    for g, w, name in zip(got, want, ["theta1", "theta2"]):
        assert_close(g, w, f"∇{name}", atol=1e-12)


def test_minillm_return_including_current_step():
    """The official return from t (not t+1) adds the single-step gradient once more, in expectation (α = 0):
    E = ∇KL_seq + ∇[KL₁(s₁) + Σ_a sg(q₁(a))·KL₂(s₂(a))]."""
    m = tabular(3)
    got = expected_estimator_gradient(m, 0.0, exact_weights=False, include_current=True)
    q1 = torch.softmax(m["theta1"], -1).detach()
    per_state = kl.reverse_kl(m["theta1"], m["phi1"]) + (q1 * kl.reverse_kl(m["theta2"], m["phi2"])).sum()
    want = torch.autograd.grad(sequence_reverse_kl(m) + per_state, [m["theta1"], m["theta2"]])
    for g, w, name in zip(got, want, ["theta1", "theta2"]):
        assert_close(g, w, f"∇{name}", atol=1e-12)


def test_minillm_per_token_weights_are_biased():
    """The paper's approximation w_t ≈ q/p̃ (and the official code) is NOT the exact gradient when α > 0: on this
    tabular problem (seed 0, α = 0.3, largest gradient entry 0.49) the gap is 0.122 in max-norm, while the exact
    weights close it to 1e-16 (oracle above)."""
    m = tabular(0)
    want = torch.autograd.grad(sequence_reverse_kl(m), [m["theta1"], m["theta2"]])
    got = expected_estimator_gradient(m, 0.3, exact_weights=False)
    gap = max((g - w).abs().max().item() for g, w in zip(got, want))
    assert gap > 0.1, gap


def test_minillm_eq5_prefix_weights_alone_are_biased():
    """Eq. 5 as written — the prefix product W_t on each token, the future return unweighted — is not exact either
    when α > 0: the tokens after t come from p̃ as well (gap 0.065 here); the per-decision ratios close it."""
    m = tabular(0)
    want = torch.autograd.grad(sequence_reverse_kl(m), [m["theta1"], m["theta2"]])
    got = expected_estimator_gradient(m, 0.3, exact_weights=True, per_decision=False)
    gap = max((g - w).abs().max().item() for g, w in zip(got, want))
    assert gap > 0.05, gap


# ----------------------------------------------------------------------------------------------------------
# MiniLLM: hand-worked values and the pieces
# ----------------------------------------------------------------------------------------------------------


def test_importance_weight_hand_values():
    """q = 0.2, p = 0.8, α = 0.2 → p̃ = 0.2·0.8 + 0.8·0.2 = 0.32, w = 0.2/0.32 = 0.625; α = 0 → w = 1.
    Cumulative over [0.625, 0.625] → [0.625, 0.390625]."""
    q = torch.tensor([[math.log(0.2), math.log(0.2)]], dtype=F64)
    p = torch.tensor([[math.log(0.8), math.log(0.8)]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert_close(minillm_mixture_logprobs(q, p, 0.2).exp(), torch.full((1, 2), 0.32, dtype=F64), "p̃", atol=1e-15)
    assert_close(minillm_importance_weights(q, p, mask, alpha=0.2), torch.full((1, 2), 0.625), "w", atol=1e-15)
    assert_close(minillm_importance_weights(q, p, mask, alpha=0.0), torch.ones(1, 2), "w α=0", atol=1e-15)
    cum = minillm_importance_weights(q, p, mask, alpha=0.2, cumulative=True)
    assert_close(cum, torch.tensor([[0.625, 0.390625]], dtype=F64), "W", atol=1e-15)


def test_advantage_hand_values():
    """r = [1, 1, 1], γ = 1: G = [3, 2, 1] / N = [3, 2, 1] = [1, 1, 1]. r = [1, 2, 3], γ = 0.5:
    include r_t: G = [1 + 0.5·(2 + 0.5·3), 2 + 0.5·3, 3] = [2.75, 3.5, 3] / [3, 2, 1]; from t+1:
    [0.5·3.5, 0.5·3, 0] = [1.75, 1.5, 0] / [2, 1, 1]. A padded 4th slot stays 0."""
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    ones = torch.tensor([[1.0, 1.0, 1.0, 9.0]], dtype=F64)
    got = minillm_advantages(ones, mask, gamma=1.0, whiten=False)
    assert_close(got, torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64), "r=1", atol=1e-15)
    r = torch.tensor([[1.0, 2.0, 3.0, float("nan")]], dtype=F64)
    got = minillm_advantages(r, mask, gamma=0.5, whiten=False)
    assert_close(got, torch.tensor([[2.75 / 3, 3.5 / 2, 3.0, 0.0]], dtype=F64), "include", atol=1e-15)
    got = minillm_advantages(r, mask, gamma=0.5, include_current=False, whiten=False)
    assert_close(got, torch.tensor([[1.75 / 2, 1.5, 0.0, 0.0]], dtype=F64), "from t+1", atol=1e-15)
    got = minillm_advantages(r, mask, gamma=0.5, include_current=False, length_norm=False, whiten=False)
    assert_close(got, torch.tensor([[1.75, 1.5, 0.0, 0.0]], dtype=F64), "unnormalized", atol=1e-15)


def test_advantage_future_weights_hand_values():
    """Per-decision weights w = [·, 2, 0.5], r = [1, 1, 1], γ = 1, from t+1, no normalization:
    A₀ = w₁·(r₁ + w₂·r₂) = 2·(1 + 0.5) = 3; A₁ = w₂·r₂ = 0.5; A₂ = 0."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    r = torch.ones(1, 3, dtype=F64)
    w = torch.tensor([[7.0, 2.0, 0.5]], dtype=F64)
    got = minillm_advantages(r, mask, gamma=1.0, include_current=False, length_norm=False, whiten=False,
                             future_weights=w)
    assert_close(got, torch.tensor([[3.0, 0.5, 0.0]], dtype=F64), "per-decision", atol=1e-15)


def official_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """MiniLLM ``_get_advantages_and_returns`` without whitening, re-derived: a backward discounted sum over ALL
    positions, divided by the number of mask entries from t to the end (``mask − cumsum + total``, 0 → 1)."""
    m = mask.to(F64)
    lens = m - m.cumsum(-1) + m.sum(-1, keepdim=True)
    lens = torch.where(lens == 0, torch.ones_like(lens), lens)
    out = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        last = rewards[:, t] + gamma * last
        out[:, t] = last
    return out / lens


def test_advantages_match_official_returns_right_padded():
    """Right-padded rows with zero rewards at padding: our returns equal the official ones (before whitening), at the
    official γ = 0.95; whitening is then over valid tokens."""
    g = torch.Generator().manual_seed(5)
    mask = ragged_mask([6, 1, 4, 6, 2], 6)
    r = torch.where(mask, torch.randn(5, 6, generator=g, dtype=F64), 0.0)
    got = minillm_advantages(r, mask, whiten=False)
    assert_close(got, torch.where(mask, official_advantages(r, mask, 0.95), 0.0), "returns", atol=1e-12)
    assert_close(minillm_advantages(r, mask), whiten(got, mask), "whitened", atol=1e-12)


def test_rewards_scaling_clip_and_q_equals_p():
    """r = (log p − log q)/0.5 clipped to ±1: (−0.1 + 0.7)/0.5 = 1.2 → 1; (−2 + 1)/0.5 = −2 → −1; q = p → 0."""
    p = torch.tensor([[-0.1, -2.0, -1.3]], dtype=F64)
    q = torch.tensor([[-0.7, -1.0, -1.3]], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = minillm_rewards(p, q, mask, reward_scaling=0.5, reward_clip=1.0)
    assert_close(got, torch.tensor([[1.0, -1.0, 0.0]], dtype=F64), "rewards", atol=1e-15)
    assert_close(minillm_rewards(p, p, mask), torch.zeros(1, 3), "q = p", atol=0.0)


def test_minillm_q_equals_p_is_zero_with_zero_gradient():
    """q = p ⇒ r ≡ 0 ⇒ A ≡ 0 (before whitening; whitening a constant needs ≥ 2 distinct values, so it is off) and
    KL_t = 0 ⇒ loss 0, gradient 0 (KL is minimal at q = p)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=g, dtype=F64)
    student = logits.clone().requires_grad_()
    ids = torch.randint(0, 5, (2, 4), generator=g)
    mask = ragged_mask([4, 2], 4)
    logps = gathered(student, ids)
    r = minillm_rewards(gathered(logits, ids), logps.detach(), mask)
    adv = minillm_advantages(r, mask, whiten=False)
    out = minillm(logps, logps.detach(), adv, mask, student_logits=student, teacher_logits=logits)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert out.loss.item() == 0.0
    assert_close(grad, torch.zeros_like(grad), "grad", atol=1e-15)


def official_minillm_loss(logps, old, adv, w, mask, s_logits, t_logits, eps=0.2):
    """MiniLLM ``_pg_loss`` + ``_reg_loss`` re-derived in float64: ratio·w clipped, token mean; cross-entropy(q, p)
    minus entropy(q), token mean."""
    m = mask.to(F64)
    ratio = torch.exp((logps - old) * m) * w
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    q = torch.softmax(s_logits, -1)
    xent = -(q * torch.log_softmax(t_logits, -1)).sum(-1)
    ent = -(q * torch.log_softmax(s_logits, -1)).sum(-1)
    return (pg * m).sum() / m.sum() + ((xent - ent) * m).sum() / m.sum()


def test_minillm_fp32_matches_official_float64_twin():
    """B = 5, T = 9, V = 7, ragged with an empty row; ratios and weights spread to hit both clip sides; NaN/inf at
    masked positions of the library's inputs. Loss and gradient (upstream 0.37) at fp32 atol 1e-5."""
    g = torch.Generator().manual_seed(7)
    b, t, v = 5, 9, 7
    mask = ragged_mask([9, 1, 5, 0, 7], t)
    s64 = torch.randn(b, t, v, generator=g, dtype=F64)
    t64 = torch.randn(b, t, v, generator=g, dtype=F64)
    ids = torch.randint(0, v, (b, t), generator=g)
    old64 = gathered(s64, ids) + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    adv64 = torch.randn(b, t, generator=g, dtype=F64)
    w64 = 0.6 + 0.8 * torch.rand(b, t, generator=g, dtype=F64)

    def run(dtype, poison):
        s = s64.to(dtype).requires_grad_()
        logps = gathered(s, ids)
        old, adv, w = old64.to(dtype), adv64.to(dtype), w64.to(dtype)
        if poison:
            bad = torch.tensor(float("nan"), dtype=dtype)
            old, adv, w = (torch.where(mask, x, bad) for x in (old, adv, w))
            logps = torch.where(mask, logps, torch.tensor(float("inf"), dtype=dtype))
            loss = minillm(logps, old, adv, mask, weights=w, student_logits=s, teacher_logits=t64.to(dtype)).loss
        else:
            loss = official_minillm_loss(logps, old, adv, w, mask, s, t64)
        (grad,) = torch.autograd.grad(UPSTREAM * loss, s)
        return loss, grad

    loss32, grad32 = run(torch.float32, poison=True)
    loss64, grad64 = run(F64, poison=False)
    assert_close(loss32, loss64, "loss")
    assert_close(grad32, grad64, "grad")
    assert torch.all(grad32[~mask] == 0)


def test_minillm_precomputed_single_step_kl_matches_logits_path():
    """``single_step_kl`` (what a chunked LM-head computation returns) gives the same loss and gradient as logits."""
    g = torch.Generator().manual_seed(8)
    mask = ragged_mask([3, 5], 5)
    s = torch.randn(2, 5, 6, generator=g, dtype=F64).requires_grad_()
    tl = torch.randn(2, 5, 6, generator=g, dtype=F64)
    ids = torch.randint(0, 6, (2, 5), generator=g)
    logps = gathered(s, ids)
    adv = torch.randn(2, 5, generator=g, dtype=F64)
    a = minillm(logps, logps.detach(), adv, mask, student_logits=s, teacher_logits=tl).loss
    b = minillm(logps, logps.detach(), adv, mask, single_step_kl=kl.reverse_kl(s, tl)).loss
    ga, gb = (torch.autograd.grad(x, s, retain_graph=True)[0] for x in (a, b))
    assert_close(a, b, "loss", atol=1e-14)
    assert_close(ga, gb, "grad", atol=1e-14)
    assert_close(minillm_single_step(s, tl, mask), torch.where(mask, kl.reverse_kl(s, tl), 0.0), "kl", atol=1e-14)
    with pytest.raises(ValueError, match="exactly one"):
        minillm(logps, logps.detach(), adv, mask, single_step_kl=kl.reverse_kl(s, tl), student_logits=s,
                teacher_logits=tl)


# ----------------------------------------------------------------------------------------------------------
# DPKD
# ----------------------------------------------------------------------------------------------------------


def single_position_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """V = 4, token 0 = a_T (teacher argmax), token 1 = a_S (student argmax).
    Student: log q = [−2, −1, log r, log r], r = (1 − e^−2 − e^−1)/2 = 0.24842 < e^−1 (so token 1 is its argmax).
    Teacher: log p = [−0.5, −3, log s, log s], s = (1 − e^−0.5 − e^−3)/2 = 0.17186 < e^−0.5."""
    r = (1 - math.exp(-2) - math.exp(-1)) / 2
    s = (1 - math.exp(-0.5) - math.exp(-3)) / 2
    student = torch.tensor([[[-2.0, -1.0, math.log(r), math.log(r)]]], dtype=F64)
    teacher = torch.tensor([[[-0.5, -3.0, math.log(s), math.log(s)]]], dtype=F64)
    return student, teacher


def test_dpkd_token_hand_values():
    """h = [log q(a_T) − log q(a_S)] − [log p(a_T) − log p(a_S)] = (−2 + 1) − (−0.5 + 3) = −3.5; β = 0.1:
    L = −log σ(−0.35) = log(1 + e^0.35) = log 2.419068 = 0.883382. Reference-free: h = −1, L = log(1 + e^0.1) =
    0.744397. IPO: (−3.5 − 1/(2·0.1))² = 8.5² = 72.25. DPOP: 0.883382 + 50·max(0, −0.5 − (−2)) = 75.883382."""
    student, teacher = single_position_logits()
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = dpkd_token(student, teacher, mask, beta=0.1)
    assert abs(out.loss.item() - 0.883382) < 5e-7
    assert abs(out.loss.item() - math.log1p(math.exp(0.35))) < 1e-12
    assert out.metrics["margin"] == pytest.approx(-3.5, abs=1e-12)
    assert out.metrics["argmax_agree"] == 0.0
    ref_free = dpkd_token(student, teacher, mask, beta=0.1, reference_free=True).loss.item()
    assert abs(ref_free - math.log1p(math.exp(0.1))) < 1e-12
    assert abs(ref_free - 0.744397) < 5e-7
    assert dpkd_token_ipo(student, teacher, mask, beta=0.1).loss.item() == pytest.approx(72.25, abs=1e-10)
    dpop = dpkd_token_dpop(student, teacher, mask, beta=0.1).loss.item()
    assert dpop == pytest.approx(math.log1p(math.exp(0.35)) + 75.0, abs=1e-10)


def test_dpkd_token_label_smoothing_hand_value():
    """ε = 0.1: 0.9·softplus(0.35) + 0.1·softplus(−0.35) = 0.9·0.883382 + 0.1·0.533382 = 0.848382."""
    student, teacher = single_position_logits()
    got = dpkd_token(student, teacher, torch.ones(1, 1, dtype=torch.bool), label_smoothing=0.1).loss.item()
    want = 0.9 * math.log1p(math.exp(0.35)) + 0.1 * math.log1p(math.exp(-0.35))
    assert got == pytest.approx(want, abs=1e-12)
    assert got == pytest.approx(0.848382, abs=5e-7)


def test_dpkd_token_q_equals_p_is_log2_zero_gradient():
    """q = p ⇒ a_T = a_S at every position ⇒ h ≡ 0 ⇒ L = log 2 per position, gradient 0 (the position still counts)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 9, generator=g, dtype=F64)
    student = logits.clone().requires_grad_()
    mask = ragged_mask([6, 2, 4], 6)
    out = dpkd_token(student, logits, mask)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert out.loss.item() == pytest.approx(math.log(2.0), abs=1e-15)
    assert out.metrics["argmax_agree"] == 1.0
    assert torch.all(grad == 0)


@pytest.mark.parametrize("label_smoothing, reference_free", [(0.0, False), (0.2, False), (0.0, True)])
def test_dpkd_token_per_position_matches_dpkd_token(label_smoothing, reference_free):
    """The per-position form on log-probs gathered at the two argmaxes, token-meaned, is ``dpkd_token`` on full logits:
    loss and student gradient (upstream 0.37) at float64 1e-12; ragged (3, 7, 11)."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(3, 7, 11, generator=g, dtype=F64, requires_grad=True)
    teacher = torch.randn(3, 7, 11, generator=g, dtype=F64)
    mask = ragged_mask([7, 3, 5], 7)
    kw = dict(beta=0.3, label_smoothing=label_smoothing, reference_free=reference_free)
    want = dpkd_token(student, teacher, mask, **kw).loss
    (g_want,) = torch.autograd.grad(0.37 * want, student)
    lq, lp = torch.log_softmax(student, -1)[mask], torch.log_softmax(teacher, -1)[mask]
    a_t, a_s = lp.argmax(-1, keepdim=True), lq.detach().argmax(-1, keepdim=True)
    per = dpkd_token_per_position(lq.gather(-1, a_t)[:, 0], lq.gather(-1, a_s)[:, 0], lp.gather(-1, a_t)[:, 0],
                                  lp.gather(-1, a_s)[:, 0], **kw)
    got = per.mean()
    (g_got,) = torch.autograd.grad(0.37 * got, student)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=0)
    assert g_want.abs().max() > 1e-3  # the argmaxes disagree somewhere: a non-trivial gradient


def dpkd_token_loops(student, teacher, mask, beta):
    """Float64 twin of ``dpkd_token``: python loops over positions, argmaxes taken with ``max`` over a list."""
    total, count = student.new_zeros(()), 0
    for i in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[i, t]:
                continue
            lq, lp = torch.log_softmax(student[i, t], -1), torch.log_softmax(teacher[i, t], -1)
            a_t = max(range(lp.shape[0]), key=lambda v: lp[v].item())
            a_s = max(range(lq.shape[0]), key=lambda v: lq[v].item())
            h = (lq[a_t] - lq[a_s]) - (lp[a_t] - lp[a_s])
            total = total - F.logsigmoid(beta * h)
            count += 1
    return total / count


def test_dpkd_token_fp32_matches_loop_twin():
    """B = 3, T = 7, V = 11 ragged; teacher gets no gradient; loss and gradient (upstream 0.37) at atol 1e-5."""
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask([7, 3, 5], 7)
    s64 = 2 * torch.randn(3, 7, 11, generator=g, dtype=F64)
    t64 = 2 * torch.randn(3, 7, 11, generator=g, dtype=F64)
    s32 = s64.float().requires_grad_()
    t32 = t64.float().requires_grad_()
    loss32 = dpkd_token(s32, torch.where(mask[..., None], t32, torch.nan), mask, beta=0.5).loss
    (grad32,) = torch.autograd.grad(UPSTREAM * loss32, s32)
    s = s64.clone().requires_grad_()
    loss64 = dpkd_token_loops(s, t64, mask, 0.5)
    (grad64,) = torch.autograd.grad(UPSTREAM * loss64, s)
    assert_close(loss32, loss64, "loss")
    assert_close(grad32, grad64, "grad")
    assert t32.grad is None


def test_dpkd_sequence_is_dpo_with_teacher_reference():
    """Eq. 8 ≡ ``dpo(policy_chosen = log q(y_T), policy_rejected = log q(y_S), ref = the teacher's)``, value and
    gradient; Eq. 9 ≡ the same on per-token means."""
    g = torch.Generator().manual_seed(4)
    s_t, s_s, t_t, t_s = (-20 * torch.rand(6, generator=g, dtype=F64) for _ in range(4))
    s_t.requires_grad_()
    got = dpkd_sequence(s_t, s_s, t_t, t_s, beta=0.3)
    want = dpo(s_t, s_s, t_t, t_s, beta=0.3)
    for a, b, name in zip(got, want, ["loss", "chosen_rewards", "rejected_rewards"]):
        assert_close(a, b, name, atol=1e-15)
    ga, gb = (torch.autograd.grad(x.loss.sum(), s_t)[0] for x in (got, want))
    assert_close(ga, gb, "grad", atol=1e-15)
    lt, ls = torch.tensor([3, 5, 7, 2, 9, 4]), torch.tensor([8, 1, 6, 6, 3, 2])
    got9 = dpkd_sequence(s_t, s_s, t_t, t_s, beta=0.3, teacher_out_lengths=lt, student_out_lengths=ls).loss
    want9 = dpo(s_t / lt, s_s / ls, t_t / lt, t_s / ls, beta=0.3).loss
    assert_close(got9, want9, "Eq. 9", atol=1e-15)


# ----------------------------------------------------------------------------------------------------------
# DCKD
# ----------------------------------------------------------------------------------------------------------


def forward_kl_loops(student, teacher, mask):
    """Plain word-level KD, float64 loops: mean over valid positions of Σ_v p_v (log p_v − log q_v), p_v > 0 only."""
    total, count = student.new_zeros(()), 0
    for i in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[i, t]:
                continue
            lp, lq = torch.log_softmax(teacher[i, t], -1), torch.log_softmax(student[i, t], -1)
            total = total + sum(lp[v].exp() * (lp[v] - lq[v]) for v in range(lp.shape[0]) if lp[v] > -math.inf)
            count += 1
    return total / count


def test_dckd_neutral_is_plain_kd():
    """w_sft = 0, only chosen ⇒ plain forward-KL KD, against a loop twin; with −inf padded vocabulary slots and a
    ragged mask; value and gradient (upstream 0.37) at fp32 atol 1e-5."""
    g = torch.Generator().manual_seed(6)
    mask = ragged_mask([5, 2, 4], 5)
    s64 = torch.randn(3, 5, 8, generator=g, dtype=F64)
    t64 = torch.randn(3, 5, 8, generator=g, dtype=F64)
    s64[..., -2:] = -math.inf
    t64[..., -2:] = -math.inf
    s32 = s64.float().requires_grad_()
    loss32 = dckd(kl.forward_kl(s32, t64.float()), mask, sft_weight=0.0, chosen_weight=1.0, rejected_weight=0.0).loss
    (grad32,) = torch.autograd.grad(UPSTREAM * loss32, s32)
    s = s64.clone().requires_grad_()
    loss64 = forward_kl_loops(s, t64, mask)
    (grad64,) = torch.autograd.grad(UPSTREAM * loss64, s)
    assert_close(loss32, loss64, "loss")
    assert_close(grad32, grad64, "grad")


def test_topk_forward_kl_hand_value():
    """V = 4, k = 2: p = [0.5, 0.3, 0.15, 0.05] → bins [0.5, 0.3, 0.2]; q = [0.4, 0.4, 0.1, 0.1] → [0.4, 0.4, 0.2];
    KL = 0.5·log(0.5/0.4) + 0.3·log(0.3/0.4) + 0.2·log 1 = 0.111572 − 0.086305 = 0.025267."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64)
    q = torch.tensor([0.4, 0.4, 0.1, 0.1], dtype=F64)
    got = topk_forward_kl(q.log(), teacher_topk(p.log(), 2))
    want = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    assert got.item() == pytest.approx(want, abs=1e-12)
    assert got.item() == pytest.approx(0.025267, abs=5e-7)


def test_topk_forward_kl_full_vocabulary_is_exact_and_bounded():
    """k = V reproduces the full forward KL up to the clamps (< 1e-6); k < V is below it (data processing)."""
    g = torch.Generator().manual_seed(9)
    s = torch.randn(4, 6, 10, generator=g, dtype=F64)
    t = torch.randn(4, 6, 10, generator=g, dtype=F64)
    exact = kl.forward_kl(s, t)
    assert_close(topk_forward_kl(s, teacher_topk(t, 10)), exact, "k = V", atol=1e-6)
    assert torch.all(topk_forward_kl(s, teacher_topk(t, 3), stabilize=None, student_floor=0.0) <= exact + 1e-12)


def topk_kl_loops(student, ids, probs, rest):
    """Float64 twin of the fork's binned KL: gather, append the rest bucket, clamp to [1e-8, 1 − 1e-8], floor 1e-7."""
    out = torch.zeros(student.shape[:-1], dtype=F64)
    for idx in itertools.product(*(range(n) for n in student.shape[:-1])):
        q = torch.softmax(student[idx], -1)
        qb = [q[i] for i in ids[idx].tolist()]
        qb.append(1 - sum(qb))
        pb = [*probs[idx].tolist(), rest[idx].item()]
        qb = [torch.clamp(x, 1e-8, 1 - 1e-8).clamp(min=1e-7) for x in qb]
        pb = [min(max(x, 1e-8), 1 - 1e-8) for x in pb]
        out[idx] = sum(pv * (math.log(pv) - torch.log(qv)) for pv, qv in zip(pb, qb))
    return out


def test_topk_forward_kl_fp32_matches_loop_twin():
    g = torch.Generator().manual_seed(10)
    s64 = 2 * torch.randn(3, 5, 9, generator=g, dtype=F64)
    top = teacher_topk(2 * torch.randn(3, 5, 9, generator=g, dtype=F64), 4)
    s32 = s64.float().requires_grad_()
    got = topk_forward_kl(s32, TopK(top.ids, top.probs.float(), top.rest.float()))
    (g32,) = torch.autograd.grad((UPSTREAM * got).sum(), s32)
    s = s64.clone().requires_grad_()
    want = topk_kl_loops(s, top.ids, top.probs, top.rest)
    (g64,) = torch.autograd.grad((UPSTREAM * want).sum(), s)
    assert_close(got, want, "kl")
    assert_close(g32, g64, "grad")


def test_topk_forward_kl_error_is_the_tail_kl():
    """The compression's error, exactly (float64, no clamps): KL(p ‖ q) − KL_bins = rest_p·KL(p(·|tail) ‖ q(·|tail)),
    the KL between the two distributions restricted to the tokens outside the teacher's top-k and renormalized
    (chain rule of KL). Checked at k = 1, 3, 7 of V = 12 on random logits; the gap is > 0 (not a trivial 0 = 0)."""
    g = torch.Generator().manual_seed(12)
    s = 2 * torch.randn(5, 12, generator=g, dtype=F64)
    t = 2 * torch.randn(5, 12, generator=g, dtype=F64)
    exact = kl.forward_kl(s, t)
    for k in (1, 3, 7):
        top = teacher_topk(t, k)
        binned = topk_forward_kl(s, top, stabilize=None, student_floor=0.0)
        tail = torch.ones_like(s, dtype=torch.bool).scatter(-1, top.ids, False)
        p_tail = F.log_softmax(t.masked_fill(~tail, -math.inf), -1)
        q_tail = F.log_softmax(s.masked_fill(~tail, -math.inf), -1)
        tail_kl = torch.where(tail, p_tail.exp() * (p_tail - q_tail), 0.0).sum(-1)
        assert_close(exact - binned, top.rest * tail_kl, f"k={k}", atol=1e-13)
        assert (exact - binned).min() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_topk_forward_kl_per_position_matches(dtype):
    """From log-probs at the ids (the recipe's chunked path) ≡ from full logits, forward and backward, with the clamps
    (fp32 1e-5; float64 1e-12)."""
    g = torch.Generator().manual_seed(13)
    logits = (3 * torch.randn(4, 7, 11, generator=g, dtype=F64)).to(dtype)
    top = teacher_topk(2 * torch.randn(4, 7, 11, generator=g, dtype=F64), 4)
    top = TopK(top.ids, top.probs.to(dtype), top.rest.to(dtype))
    a = logits.clone().requires_grad_()
    want = topk_forward_kl(a, top)
    (ga,) = torch.autograd.grad((UPSTREAM * want).sum(), a)
    b = logits.clone().requires_grad_()
    got = topk_forward_kl_per_position(F.log_softmax(b, -1).gather(-1, top.ids), top)
    (gb,) = torch.autograd.grad((UPSTREAM * got).sum(), b)
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(got, want, "kl", atol=atol)
    assert_close(gb, ga, "grad", atol=atol)


def test_dckd_teacher_equals_student_and_weights():
    """Teacher = student ⇒ both KD terms 0 (exact and top-k); the total is then w_sft·NLL: log-probs −1, −3 on the
    chosen tokens ⇒ NLL = 2, w_sft = 0.5 ⇒ L = 1."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 7, generator=g, dtype=F64)
    mask_c, mask_r = ragged_mask([2, 1], 3), ragged_mask([3, 3], 3)
    for kl_c in (kl.forward_kl(logits, logits), topk_forward_kl(logits, teacher_topk(logits, 7))):
        out = dckd(kl_c, mask_c, rejected_kl=kl_c, rejected_mask=mask_r, sft_weight=0.0, chosen_weight=1.0,
                   rejected_weight=1.0)
        assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
    logps = torch.tensor([[-1.0, -3.0, float("nan")], [-2.0, float("nan"), float("nan")]], dtype=F64)
    out = dckd(kl.forward_kl(logits, logits), mask_c, chosen_logps=logps, sft_weight=0.5, chosen_weight=1.0,
               rejected_weight=0.0)
    assert out.loss.item() == pytest.approx(0.5 * (1 + 3 + 2) / 3, abs=1e-14)
    with pytest.raises(ValueError, match="chosen_logps"):
        dckd(kl.forward_kl(logits, logits), mask_c, sft_weight=1.0, chosen_weight=1.0, rejected_weight=0.0)


# ----------------------------------------------------------------------------------------------------------
# ADPA
# ----------------------------------------------------------------------------------------------------------


def test_adpa_two_token_oracle_value_and_gradient():
    """q = [0.6, 0.3, 0.1], ids [0, 1], A = [+1, −1] → L = −(0.6 − 0.3) = −0.3. Ā = Σ q·A = 0.3;
    ∂L/∂z_v = −q_v (A_v − Ā) = [−0.6·0.7, +0.3·1.3, +0.1·0.3] = [−0.42, 0.39, 0.03]: one descent step raises q₀ and
    lowers q₁. ``prob_stabilize`` (the fork's clamp of A to [1e-8, 1 − 1e-8]) drops the −1: L ≈ −0.6."""
    z = torch.tensor([[[0.6, 0.3, 0.1]]], dtype=F64).log().requires_grad_()
    ids = torch.tensor([[[0, 1]]])
    adv = torch.tensor([[[1.0, -1.0]]], dtype=F64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = adpa(z, ids, adv, mask)
    assert out.loss.item() == pytest.approx(-0.3, abs=1e-15)
    (grad,) = torch.autograd.grad(out.loss, z)
    assert_close(grad, torch.tensor([[[-0.42, 0.39, 0.03]]], dtype=F64), "grad", atol=1e-15)
    q_after = torch.softmax(z.detach() - 0.1 * grad, -1)[0, 0]
    assert q_after[0] > 0.6 and q_after[1] < 0.3
    stabilized = adpa(z, ids, adv, mask, prob_stabilize=True).loss.item()
    assert stabilized == pytest.approx(-0.6, abs=1e-7)


def test_adpa_per_position_matches_adpa():
    """The per-position form on log q_θ gathered at the top-k ids, token-meaned, is ``adpa``'s L_ADPA on full logits:
    loss and student gradient (upstream 0.37) at float64 1e-12; ragged (3, 7, 11), K = 4."""
    g = torch.Generator().manual_seed(6)
    student = torch.randn(3, 7, 11, generator=g, dtype=F64, requires_grad=True)
    ids, adv = adpa_advantages(torch.randn(3, 7, 11, generator=g, dtype=F64),
                               torch.randn(3, 7, 11, generator=g, dtype=F64), top_k=4)
    mask = ragged_mask([7, 3, 5], 7)
    want = adpa(student, ids, adv, mask).loss
    (g_want,) = torch.autograd.grad(0.37 * want, student)
    got = adpa_per_position(torch.log_softmax(student, -1)[mask].gather(-1, ids[mask]), adv[mask]).mean()
    (g_got,) = torch.autograd.grad(0.37 * got, student)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=0)
    assert g_want.abs().max() > 1e-3


def test_adpa_advantages_hand_values():
    """π_dpo = [0.5, 0.3, 0.15, 0.05], π_ref = [0.4, 0.1, 0.3, 0.2], K = 2: ids [0, 1],
    A = [log(0.5/0.4), log(0.3/0.1)] = [0.223144, 1.098612]. Compressed (π_ref's top-2 = {2, 0}): token 1 is unknown
    to the store and takes min(0.5, 0.3) = 0.3 → A = [0.223144, 0]."""
    dpo_logits = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64).log()
    ref_logits = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=F64).log()
    ids, a = adpa_advantages(dpo_logits, ref_logits, top_k=2)
    assert ids.tolist() == [0, 1]
    assert_close(a, torch.tensor([math.log(0.5 / 0.4), math.log(3.0)], dtype=F64), "exact", atol=1e-14)
    ids, a = adpa_advantages(dpo_logits, ref_logits, top_k=2, ref_top_k=2)
    assert_close(a, torch.tensor([math.log(0.5 / 0.4), 0.0], dtype=F64), "compressed", atol=1e-14)


@pytest.mark.parametrize("ref_top_k", [None, 4])
def test_adpa_dpo_equals_ref_is_zero_with_zero_gradient(ref_top_k):
    g = torch.Generator().manual_seed(12)
    teacher = torch.randn(2, 5, 12, generator=g, dtype=F64)
    ids, a = adpa_advantages(teacher, teacher.clone(), top_k=4, ref_top_k=ref_top_k)
    assert torch.all(a == 0)
    z = torch.randn(2, 5, 12, generator=g, dtype=F64).requires_grad_()
    out = adpa(z, ids, a, ragged_mask([5, 3], 5))
    (grad,) = torch.autograd.grad(out.loss, z)
    assert out.loss.item() == 0.0
    assert torch.all(grad == 0)


def test_adpa_fp32_matches_loop_twin():
    """B = 2, T = 6, V = 13, K = 5 ragged; loss and gradient (upstream 0.37) at atol 1e-5; NaN advantages at masked
    positions are inert."""
    g = torch.Generator().manual_seed(13)
    mask = ragged_mask([6, 4], 6)
    ids, a = adpa_advantages(torch.randn(2, 6, 13, generator=g, dtype=F64), torch.randn(2, 6, 13, generator=g,
                             dtype=F64), top_k=5)
    z64 = torch.randn(2, 6, 13, generator=g, dtype=F64)
    z32 = z64.float().requires_grad_()
    loss32 = adpa(z32, ids, torch.where(mask[..., None], a, torch.nan).float(), mask).loss
    (g32,) = torch.autograd.grad(UPSTREAM * loss32, z32)
    z = z64.clone().requires_grad_()
    terms = [-(torch.softmax(z[i, t], -1)[ids[i, t]] * a[i, t]).sum() for i in range(2) for t in range(6) if mask[i, t]]
    loss64 = sum(terms) / len(terms)
    (g64,) = torch.autograd.grad(UPSTREAM * loss64, z)
    assert_close(loss32, loss64, "loss")
    assert_close(g32, g64, "grad")
    assert torch.all(g32[~mask] == 0)
