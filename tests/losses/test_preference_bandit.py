"""Acceptance oracle: on a K-armed bandit, minimizing the EXACT expected loss reaches the analytic optimum.

Setup (float64, no sampling noise). K = 6 arms, a fixed reward vector ``r`` and a fixed non-uniform reference
``π_ref``; the policy is ``π_θ = softmax(θ)`` and each "sequence" is one arm, so its log-prob is
``log_softmax(θ)[a]`` (a response of one token: lengths are 1). Pairs ``(a, b)``, ``a ≠ b``, are drawn from a
fixed full-support, non-uniform distribution ``μ`` and labelled ``a ≻ b`` with the Bradley–Terry probability
``σ(r_a − r_b)``. The expected loss is, exactly,

    E(θ) = Σ_{a≠b} μ(a,b)·[σ(r_a − r_b)·L(a ≻ b) + σ(r_b − r_a)·L(b ≻ a)]
         = Σ_{c≠d} w(c,d)·L(c ≻ d),   w(c,d) = [μ(c,d) + μ(d,c)]·σ(r_c − r_d),

which we evaluate as one weighted batch of all 30 ordered pairs through the library's loss functions and
minimize with full-batch L-BFGS.

Why the optimum is analytic. Every objective tested here is ``−log σ(g(c) − g(d))`` for a per-arm score ``g``
(DPO: ``g = β·log(π/π_ref)``; f-DPO: ``g = β·s(π/π_ref)``; H-DPO: ``g = αβ·log π − β·log π_ref``). For each
unordered pair the two terms form a logistic cross-entropy with target probability ``σ(r_c − r_d)``, minimized
iff ``g(c) − g(d) = r_c − r_d``. Since ``r`` itself is a per-arm score, all pairs are satisfied at once iff
``g(a) = r(a) + C`` for one constant ``C`` — whatever ``μ`` is, as long as it has full support — and ``C`` is
fixed by ``Σ_a π(a) = 1``. That is the stationarity condition ``β·f'(π(a)/π_ref(a)) = r(a) + c`` of the
f-divergence-regularized reward maximization, i.e. the KL (or f) optimum:

* DPO (reverse KL): ``β log(π/π_ref) = r + C`` ⇒ ``π* ∝ π_ref·exp(r/β)``.
* H-DPO: ``αβ log π − β log π_ref = r + C`` ⇒ ``π* ∝ π_ref^{1/α}·exp(r/(αβ))``.
* f-DPO with score ``s`` (our ``s`` = f' minus a constant, which only shifts C):
  ``π*(a) = π_ref(a)·s⁻¹((r(a) + c)/β)``.
  ``s`` is increasing, so ``Σ_a π*(a)`` is increasing in ``c``; we solve ``Σ = 1`` by bisection in float64.
  Scores and inverses (``y = (r + c)/β``, which must lie in the range of ``s``, here ``y < 0``, i.e.
  ``c < −max r``):
    forward KL  s(u) = −1/u          ⇒ u = −1/y
    JS          s(u) = log(u/(1+u))  ⇒ u = 1/(e^{−y} − 1)
    α (paper)   s(u) = −u^{−α}/α     ⇒ u = (−α·y)^{−1/α}
  As ``c → −max r`` from below the best arm's ``u → ∞``; as ``c → −∞`` every ``u → 0``: a unique root exists.
* IPO (summed form, lengths 1) is not a logistic loss, so its optimum is not of the form above:
  ``E = Σ w(c,d)·(ρ_c − ρ_d − 1/(2β))²`` is a weighted least-squares problem in the per-arm log-ratios ρ
  (``r`` enters only through the weights ``w``); its minimizer solves the rank-(K−1) normal equations,
  which we solve by pseudo-inverse and compare.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses import dpo, f_dpo, hdpo, ipo

K = 6
BETA = 0.5
REWARD = torch.tensor([1.0, 0.2, -0.5, 0.7, -1.0, 0.0], dtype=torch.float64)
PI_REF = torch.tensor([0.30, 0.25, 0.15, 0.12, 0.10, 0.08], dtype=torch.float64)
TV_ACCEPT = 0.02  # the acceptance threshold
TV_REACHED = 1e-6  # what exact full-batch L-BFGS in float64 actually reaches (printed below)


def pair_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All 30 ordered pairs (chosen c, rejected d), weights w(c, d) = [μ(c,d) + μ(d,c)]·σ(r_c − r_d)."""
    g = torch.Generator().manual_seed(0)
    mu = 0.5 + torch.rand(K, K, generator=g, dtype=torch.float64)  # full support, non-uniform, non-symmetric
    mu.fill_diagonal_(0.0)
    mu /= mu.sum()
    chosen, rejected = zip(*[(c, d) for c in range(K) for d in range(K) if c != d])
    chosen, rejected = torch.tensor(chosen), torch.tensor(rejected)
    weight = (mu[chosen, rejected] + mu[rejected, chosen]) * torch.sigmoid(REWARD[chosen] - REWARD[rejected])
    # Σ w = Σ_{a≠b} μ(a,b)·[σ(r_a − r_b) + σ(r_b − r_a)] = Σ μ = 1: every label of every pair is counted once
    assert math.isclose(weight.sum().item(), 1.0, rel_tol=1e-12)
    return chosen, rejected, weight


def minimize_expected_loss(loss_fn) -> torch.Tensor:
    """Full-batch L-BFGS on E(θ); returns the policy softmax(θ*). θ starts at 0 (uniform policy)."""
    chosen, rejected, weight = pair_batch()
    log_ref = PI_REF.log()
    theta = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-13,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, dim=0)
        out = loss_fn(logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected])
        expected = (weight * out.loss).sum()
        expected.backward()
        return expected

    for _ in range(4):
        opt.step(closure)
    return torch.softmax(theta.detach(), dim=0)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def check(name: str, pi: torch.Tensor, pi_star: torch.Tensor) -> None:
    tv = total_variation(pi, pi_star)
    print(f"{name}: TV(π_θ, π*) = {tv:.3e}   π_θ = {pi.numpy().round(5)}   π* = {pi_star.numpy().round(5)}")
    assert tv < TV_ACCEPT, f"{name}: TV {tv:.3e} ≥ acceptance {TV_ACCEPT}"
    assert tv < TV_REACHED, f"{name}: TV {tv:.3e} — exact L-BFGS should reach < {TV_REACHED}"


def test_dpo_reaches_kl_optimum():
    """π* ∝ π_ref·exp(r/β) with β = 0.5."""
    pi_star = torch.softmax(PI_REF.log() + REWARD / BETA, dim=0)
    check("DPO", minimize_expected_loss(lambda *a: dpo(*a, beta=BETA)), pi_star)


def test_hdpo_reaches_entropy_scaled_optimum():
    """α = 0.8: π* ∝ π_ref^{1/α}·exp(r/(αβ)) — sharper than the DPO optimum."""
    alpha = 0.8
    pi_star = torch.softmax(PI_REF.log() / alpha + REWARD / (alpha * BETA), dim=0)
    pi_dpo = torch.softmax(PI_REF.log() + REWARD / BETA, dim=0)
    assert total_variation(pi_star, pi_dpo) > 0.05  # the oracle distinguishes H-DPO from DPO
    check("H-DPO α=0.8", minimize_expected_loss(lambda *a: hdpo(*a, alpha=alpha, beta=BETA)), pi_star)


def f_optimum(inverse_score, lower: float = -200.0, upper: float | None = None) -> torch.Tensor:
    """π*(a) = π_ref(a)·s⁻¹((r(a) + c)/β), with c ∈ (lower, upper) found by bisection on Σ π* = 1 (float64).

    ``upper`` defaults to −max r, the edge of the domain for scores whose range is y < 0."""
    hi = -REWARD.max().item() if upper is None else upper
    lo = lower
    total = lambda c: (PI_REF * inverse_score((REWARD + c) / BETA)).sum().item()
    assert total(lo) < 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid == lo or mid == hi:
            break
        if total(mid) < 1.0:
            lo = mid
        else:
            hi = mid
    c = 0.5 * (lo + hi)
    pi = PI_REF * inverse_score((REWARD + c) / BETA)
    assert abs(pi.sum().item() - 1.0) < 1e-12
    return pi


F_CASES = {
    "forward_kl": (lambda y: -1.0 / y, {}),
    "js": (lambda y: 1.0 / torch.expm1(-y), {}),
    "alpha": (lambda y: (-0.5 * y) ** (-1.0 / 0.5), {"alpha": 0.5}),
    "alpha0.3": (lambda y: (-0.3 * y) ** (-1.0 / 0.3), {"alpha": 0.3}),
}


@pytest.mark.parametrize("case", list(F_CASES))
def test_f_dpo_reaches_its_f_optimum(case):
    inverse_score, extra = F_CASES[case]
    divergence = "alpha" if case.startswith("alpha") else case
    pi_star = f_optimum(inverse_score)
    pi_dpo = torch.softmax(PI_REF.log() + REWARD / BETA, dim=0)
    print(f"{case}: TV(π*_f, π*_KL) = {total_variation(pi_star, pi_dpo):.3e}")
    assert total_variation(pi_star, pi_dpo) > 0.01  # a different optimum than DPO's
    pi = minimize_expected_loss(lambda *a: f_dpo(*a, beta=BETA, divergence=divergence, **extra))
    check(f"f-DPO {case}", pi, pi_star)


def test_f_dpo_reverse_kl_bisection_matches_closed_form():
    """The bisection solver, run with the reverse-KL inverse u = e^y, reproduces π_ref·exp(r/β)/Z."""
    pi_star = torch.softmax(PI_REF.log() + REWARD / BETA, dim=0)
    pi = f_optimum(torch.exp, lower=-200.0, upper=200.0)  # log u has range R: c is unconstrained
    assert total_variation(pi, pi_star) < 1e-12


def test_ipo_reaches_least_squares_optimum():
    """IPO (summed, lengths 1): minimize Σ w(c,d)(ρ_c − ρ_d − τ⁻¹/2)² over ρ ∈ R^K; solve the normal equations
    with the gauge fixed by a pseudo-inverse, then π* ∝ π_ref·exp(ρ*)."""
    chosen, rejected, weight = pair_batch()
    design = torch.zeros(len(chosen), K, dtype=torch.float64)
    design[torch.arange(len(chosen)), chosen] = 1.0
    design[torch.arange(len(chosen)), rejected] = -1.0
    target = torch.full((len(chosen),), 1.0 / (2 * BETA), dtype=torch.float64)
    rho = torch.linalg.pinv(design.T @ (weight[:, None] * design)) @ (design.T @ (weight * target))
    pi_star = torch.softmax(PI_REF.log() + rho, dim=0)
    check("IPO", minimize_expected_loss(lambda *a: ipo(*a, beta=BETA, average_log_prob=False)), pi_star)
