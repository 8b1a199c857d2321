"""Acceptance oracle: on a K-armed bandit, gradient descent on the EXACT expected RL surrogate reaches the fixed
point that each KL placement implies — and the on-policy k3-in-loss placement reaches the FORWARD-KL one.

Setup (float64, no sampling noise). K = 6 arms with fixed reward ``r`` and fixed non-uniform reference ``π_ref``;
the policy is ``π = softmax(θ)``, θ ∈ R^K starts at 0 (uniform), and each "response" is one arm of one token, so
its log-prob is ``log_softmax(θ)[a]``. Every term goes through the library: the library loss of a batch holding
every arm once gives each arm's loss(a) (see ``train``), and the expected surrogate is

    E(θ) = Σ_a μ(a)·loss(a; θ)          μ = sg(π) on-policy, or a fixed π_old for the off-policy row

whose gradient (μ held fixed, as samples are data) is exactly the expected sampled gradient. The policy-gradient
part uses advantage ``A(a) = r(a) − Σ_b π(b) r(b)`` (the infinite-group GRPO baseline; any constant baseline has
zero expected gradient) at ratio ρ = 1, whose expected gradient w.r.t. the logits is

    g_PG(b) = −Σ_a π(a)(r(a) − r̄)·∂log π(a)/∂θ_b = −π(b)·(r(b) − r̄),     r̄ = E_π r.

Fixed points, per placement (β = coefficient; gradients w.r.t. the logits θ_b):

=====================  ===================================  ====================================  ====================
placement              library call                         expected KL-term gradient             fixed point
=====================  ===================================  ====================================  ====================
k1 in reward           kl_in_reward(k1) → ppo_clip, ρ = 1   β∇KL(π‖π_ref)  (REINFORCE on −β·k1)   π ∝ π_ref·e^{r/β}
k2 in loss             grpo(kl_estimator="k2")              β∇KL(π‖π_ref)                         π ∝ π_ref·e^{r/β}
k3_is, π_old samples   grpo("k3_is"), ratio-weighted PG     β∇KL(π‖π_ref)                         π ∝ π_ref·e^{r/β}
k3 in loss, on-policy  grpo(kl_estimator="k3")              FORWARD: β∇KL(π_ref‖π) = β(π−π_ref)   π = βπ_ref/(c − r)
k1 in loss (control)   grpo(kl_estimator="k1")              0                                     none: → argmax r
=====================  ===================================  ====================================  ====================

Reverse-KL fixed point. ∂KL(π‖π_ref)/∂θ_b = π(b)·(log(π(b)/π_ref(b)) − KL). Setting g_PG + β·that to zero gives
``π(b)·[β log(π(b)/π_ref(b)) − (r(b) − r̄ + β·KL)] = 0`` for every b, i.e. ``β log(π/π_ref) = r + const``:
π* ∝ π_ref·exp(r/β), the optimum of E_π r − β·KL(π‖π_ref).

Forward-KL fixed point (k3 in the loss, on-policy). The expected gradient of the k3 term is
``E_π[(1 − π_ref/π)∇log π] = −E_{π_ref}[∇log π] = ∇KL(π_ref‖π)``, and for a softmax
``∂KL(π_ref‖π)/∂θ_b = π(b) − π_ref(b)``. Stationarity of the total::

    −π(b)·(r(b) − r̄) + β·(π(b) − π_ref(b)) = 0
    ⇔ π(b)·(r̄ + β − r(b)) = β·π_ref(b)
    ⇔ π(b) = β·π_ref(b) / (c − r(b)),     c := r̄ + β.

Positivity needs c > max r. ``f(c) = Σ_b β·π_ref(b)/(c − r(b))`` decreases strictly from +∞ (c ↓ max r) and
``f(max r + β) ≤ β/β = 1``, so Σ π = 1 has a unique root c ∈ (max r, max r + β], found by bisection in float64
(independently of the training loop). Self-consistency is automatic: Σ_b π(b)(c − r(b)) = β·Σ π_ref = β, i.e.
E_π r = c − β = r̄. This is the optimum of E_π r − β·KL(π_ref‖π) (Lagrangian: r(a) + β·π_ref(a)/π(a) = λ).

For the chosen r, β the two fixed points are ≈ 0.09 apart in total variation, so a k3-in-loss run that converged
to the reverse-KL optimum (or the other way round) fails the test: the test can fail.
"""

from __future__ import annotations

import math

import torch

from tether import kl
from tether.losses.policy import grpo, kl_in_reward, kl_penalty, ppo_clip

K = 6
BETA = 0.5
REWARD = torch.tensor([-0.5, 0.3, 1.0, 0.2, 0.9, 0.6], dtype=torch.float64)
PI_REF = torch.tensor([0.30, 0.25, 0.15, 0.12, 0.10, 0.08], dtype=torch.float64)
PI_OLD = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.25, 0.25], dtype=torch.float64)  # fixed behaviour policy ≠ π
TV_ACCEPT = 0.02  # the acceptance threshold
TV_REACHED = 1e-6  # what exact gradient descent in float64 reaches here (printed below; ≪ 1e-3)
STEPS, LR = 200, 4.0
MASK = torch.ones(K, 1, dtype=torch.bool)  # one single-token response per arm
AGG = "seq-mean-token-sum"  # with T = 1: (1/K)·Σ_a loss(a)
LOG_REF = PI_REF.log()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def reverse_kl_optimum() -> torch.Tensor:
    return torch.softmax(LOG_REF + REWARD / BETA, dim=0)


def forward_kl_optimum() -> torch.Tensor:
    """π(a) = β·π_ref(a)/(c − r(a)) with c ∈ (max r, max r + β] solving Σ π = 1 (bisection, float64)."""
    lo, hi = REWARD.max().item(), REWARD.max().item() + BETA
    total = lambda c: (BETA * PI_REF / (c - REWARD)).sum().item()
    assert total(hi) <= 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if total(mid) > 1.0 else (lo, mid)
    pi = BETA * PI_REF / (hi - REWARD)
    assert abs(pi.sum().item() - 1.0) < 1e-12
    r_bar = (pi * REWARD).sum()
    assert abs(r_bar.item() - (hi - BETA)) < 1e-12  # self-consistency c = r̄ + β
    residual = -pi * (REWARD - r_bar) + BETA * (pi - PI_REF)  # the stationarity condition itself
    assert residual.abs().max().item() < 1e-12
    return pi


def train(batch_loss, sampler: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient descent on E(θ) = Σ_a μ(a)·loss(a); μ = sg(π) (on-policy) or the fixed ``sampler``.

    ``batch_loss(rows, advantage)`` is the library loss of ONE batch holding all K arms, one single-token response
    each (``rows`` = log π(a), shape (K, 1)), aggregated with ``seq-mean-token-sum``: it equals (1/K)·Σ_a loss(a),
    and each arm's term depends only on its own row. So autograd w.r.t. the rows gives (1/K)·∂loss(a)/∂log π(a)
    for every a at once; weighting by K·μ(a) and chaining through log_softmax gives ∇_θ E exactly.
    Returns softmax(θ) after ``STEPS`` steps of size ``LR``.
    """
    theta = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    for _ in range(STEPS):
        logp = torch.log_softmax(theta, dim=0)
        pi = logp.detach().exp()
        mu = pi if sampler is None else sampler
        advantage = REWARD - (pi * REWARD).sum()
        rows = logp.detach()[:, None].requires_grad_(True)
        (per_arm,) = torch.autograd.grad(batch_loss(rows, advantage), rows)
        (grad,) = torch.autograd.grad(logp, theta, grad_outputs=K * mu * per_arm[:, 0])
        with torch.no_grad():
            theta -= LR * grad
    return torch.softmax(theta.detach(), dim=0)


def check(name: str, pi: torch.Tensor, pi_star: torch.Tensor) -> None:
    tv = total_variation(pi, pi_star)
    print(f"{name}: TV(π_θ, π*) = {tv:.3e}   π_θ = {pi.numpy().round(5)}   π* = {pi_star.numpy().round(5)}")
    assert tv < TV_ACCEPT, f"{name}: TV {tv:.3e} ≥ acceptance {TV_ACCEPT}"
    assert tv < TV_REACHED, f"{name}: TV {tv:.3e} — exact gradient descent should reach < {TV_REACHED}"


# ----------------------------------------------------------------------------------------------------------
# library losses, one per placement (all K arms in one batch; see train)
# ----------------------------------------------------------------------------------------------------------


def k1_in_reward_loss(rows, advantage):
    """Shaped reward r − β·k1 (detached), its exact π-mean as baseline, then PPO at ρ = 1."""
    shaped = kl_in_reward(REWARD, rows.detach(), LOG_REF[:, None], MASK, coef=BETA)[:, 0]
    shaped_advantage = shaped - (rows.detach()[:, 0].exp() * shaped).sum()
    return ppo_clip(rows, rows.detach(), shaped_advantage, MASK, agg=AGG).loss


def grpo_loss(estimator):
    """On-policy GRPO (ρ = 1) with the KL estimator in the loss."""

    def loss(rows, advantage):
        return grpo(
            rows,
            rows.detach(),
            advantage,
            MASK,
            ref_logps=LOG_REF[:, None],
            kl_coef=BETA,
            kl_estimator=estimator,
            agg=AGG,
        ).loss

    return loss


def k3_is_off_policy_loss(rows, advantage):
    """Samples from the fixed π_old: the PPO ratio π/π_old reweights the policy-gradient term (clip and dual-clip
    lifted so that the ratio is exact) and w·k3 the KL term."""
    return grpo(
        rows,
        PI_OLD.log()[:, None],
        advantage,
        MASK,
        ref_logps=LOG_REF[:, None],
        kl_coef=BETA,
        kl_estimator="k3_is",
        clip_eps=math.inf,
        dual_clip=None,
        agg=AGG,
    ).loss


def weighted_off_policy_loss(estimator):
    """Samples from the fixed π_old, PPO ratio exact, and the KL estimator multiplied by the DETACHED ratio
    sg(π/π_old) (``kl_importance_weight=True``): off-policy, each estimator keeps its on-policy gradient."""

    def loss(rows, advantage):
        return grpo(rows, PI_OLD.log()[:, None], advantage, MASK, ref_logps=LOG_REF[:, None], kl_coef=BETA,
                    kl_estimator=estimator, kl_importance_weight=True, clip_eps=math.inf, dual_clip=None,
                    agg=AGG).loss

    return loss


# ----------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------


def test_the_two_fixed_points_differ():
    tv = total_variation(forward_kl_optimum(), reverse_kl_optimum())
    print(f"TV(forward-KL optimum, reverse-KL optimum) = {tv:.4f}")
    assert tv > TV_ACCEPT, "choose r, β so that the oracle distinguishes the two placements"


def test_k1_in_reward_reaches_reverse_kl_optimum():
    check("k1 in reward", train(k1_in_reward_loss), reverse_kl_optimum())


def test_k2_in_loss_reaches_reverse_kl_optimum():
    check("k2 in loss", train(grpo_loss("k2")), reverse_kl_optimum())


def test_importance_corrected_k3_off_policy_reaches_reverse_kl_optimum():
    assert total_variation(PI_OLD, reverse_kl_optimum()) > 0.2  # the samples really come from elsewhere
    check("k3_is, π_old samples", train(k3_is_off_policy_loss, sampler=PI_OLD), reverse_kl_optimum())


def test_k3_in_loss_on_policy_reaches_forward_kl_optimum():
    pi = train(grpo_loss("k3"))
    check("k3 in loss (on-policy)", pi, forward_kl_optimum())
    assert total_variation(pi, reverse_kl_optimum()) > TV_ACCEPT


def test_k1_in_loss_does_not_regularize():
    """Control: k1 in the loss has zero expected gradient, so the run drifts towards the best arm instead."""
    pi = train(grpo_loss("k1"))
    tv = total_variation(pi, reverse_kl_optimum())
    print(f"k1 in loss: TV to reverse-KL optimum = {tv:.3f}, π = {pi.numpy().round(4)}")
    assert tv > 0.2 and pi.argmax().item() == REWARD.argmax().item()


def test_importance_weighted_k2_off_policy_reaches_reverse_kl_optimum():
    check("sg(w)·k2, π_old samples", train(weighted_off_policy_loss("k2"), sampler=PI_OLD), reverse_kl_optimum())


def test_importance_weighted_k3_off_policy_keeps_the_forward_kl_fixed_point():
    """sg(w)·k3 off-policy reproduces what k3 does on-policy — the forward-KL fixed point, not the reverse one."""
    pi = train(weighted_off_policy_loss("k3"), sampler=PI_OLD)
    check("sg(w)·k3, π_old samples", pi, forward_kl_optimum())
    assert total_variation(pi, reverse_kl_optimum()) > TV_ACCEPT


def test_unweighted_k3_off_policy_reaches_neither_fixed_point():
    """Control for the two tests above: without the weight, k3 from π_old samples follows no KL (Zhang et al. 2025, RPG,
    arXiv:2505.17508, §2.2)."""
    pi = train(grpo_loss_off_policy_unweighted, sampler=PI_OLD)
    for name, target in (("reverse", reverse_kl_optimum()), ("forward", forward_kl_optimum())):
        tv = total_variation(pi, target)
        print(f"k3 unweighted off-policy: TV to the {name}-KL optimum = {tv:.3f}")
        assert tv > TV_ACCEPT


def grpo_loss_off_policy_unweighted(rows, advantage):
    return grpo(rows, PI_OLD.log()[:, None], advantage, MASK, ref_logps=LOG_REF[:, None], kl_coef=BETA,
                kl_estimator="k3", clip_eps=math.inf, dual_clip=None, agg=AGG).loss


def test_exact_kl_in_loss_reaches_reverse_kl_optimum():
    """The full-vocabulary KL term: on a one-token bandit every state is the same, so the term is KL(π‖π_ref) of
    the whole distribution — its gradient is exact, and the fixed point is the reverse-KL optimum."""
    theta = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    for _ in range(STEPS):
        logp = torch.log_softmax(theta, dim=0)
        pi = logp.detach().exp()
        advantage = REWARD - (pi * REWARD).sum()
        pg = -(pi * advantage * logp).sum()  # exact expected policy gradient at ρ = 1
        token_kl = kl.reverse_kl(theta, LOG_REF).expand(K)[:, None]  # the same state for every arm
        total = pg + BETA * kl_penalty(logp[:, None], None, MASK, estimator="exact", token_kl=token_kl, agg=AGG)
        (grad,) = torch.autograd.grad(total, theta)
        with torch.no_grad():
            theta -= LR * grad
    check("exact KL in loss", torch.softmax(theta.detach(), dim=0), reverse_kl_optimum())
