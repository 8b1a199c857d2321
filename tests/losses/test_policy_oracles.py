"""Oracles for KDRL, APO, DisCO, Archer and the critical-token KL: fixed points of the exact expected update, and
exact expected gradients, in float64.

Same manner as ``test_policy_bandit.py`` (read it first). The policy is ``π = softmax(θ)`` over K one-token
responses; every term goes through the library, and expectations are exact sums over all outcomes:

* **Groups** (KDRL, APO normalize rewards per group themselves): all K² ordered groups (a1, a2) of G = 2 go into ONE
  library call (2K² rows). Both objectives average over the rows (token-mean; APO's KL is a per-sequence mean, then a
  batch mean), and each row's loss depends on the other rows only through detached advantages/weights, so autograd
  w.r.t. the rows gives ``∂ℓ_row/∂log π(a_row) / (2K²)``; weighting row i of group (a1, a2) by
  ``2K²·π(a1)π(a2)/2`` and chaining through ``log_softmax`` gives the gradient of
  ``E(θ) = E_{(a1,a2)~π⊗π}[(ℓ1 + ℓ2)/2]`` with the samples held fixed — the exact on-policy expected gradient.
* **Samples from a fixed π_old with rational probabilities** (DisCO): a batch holding every ordered group with
  multiplicity ∝ π_old(a1)π_old(a2) IS the expectation, so the library loss on it is the expected objective.

Binary rewards, G = 2: a group with one correct and one wrong response gets ``Â = ±½/(std + ε) = ±κ`` (unbiased
std √½), equal rewards get Â = 0. Writing C for the correct responses and p_C = π(C), the expected policy-gradient
part is ``−E[Â1·∇log π(a1)] = −κ·Σ_{a∈C} ∇π(a)·(1 − p_C) − κ·Σ_{a∉C} ∇π(a)·(−p_C) = −κ·∇p_C`` — GRPO on G = 2
binary rewards maximizes ``κ·π(C)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether import kl as K_
from tether.losses.policy import apo, archer, critical_token_kl, disco, kdrl, ppo_clip
from tether.testing import assert_close

F64 = torch.float64
TV_REACHED = 1e-6
K = 6
CORRECT = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
IS_C = CORRECT.bool()


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


# ----------------------------------------------------------------------------------------------------------
# exact expectations over groups of two
# ----------------------------------------------------------------------------------------------------------

_A1, _A2 = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
IDX = torch.stack([_A1.reshape(-1), _A2.reshape(-1)], 1).reshape(-1)  # row 2g, 2g+1 = the two responses of group g
ONES = torch.ones(2 * K * K, 1, dtype=torch.bool)


def group_expected_grad(theta: torch.Tensor, batch_loss) -> torch.Tensor:
    """∇_θ E_{(a1,a2)~π⊗π}[(ℓ1 + ℓ2)/2] with the samples held fixed (module docstring)."""
    logp = torch.log_softmax(theta, -1)
    pi = logp.detach().exp()
    rows = logp.detach()[IDX][:, None].requires_grad_(True)
    (per_row,) = torch.autograd.grad(batch_loss(rows), rows)
    p_group = (pi[:, None] * pi[None, :]).reshape(-1).repeat_interleave(2)
    (grad,) = torch.autograd.grad(logp[IDX], theta, grad_outputs=K * K * p_group * per_row[:, 0])
    return grad


def descend(batch_loss, steps: int = 2000, lr: float = 2.0) -> torch.Tensor:
    theta = torch.zeros(K, dtype=F64, requires_grad=True)
    for _ in range(steps):
        grad = group_expected_grad(theta, batch_loss)
        with torch.no_grad():
            theta -= lr * grad
    return torch.softmax(theta.detach(), -1)


# ----------------------------------------------------------------------------------------------------------
# KDRL
# ----------------------------------------------------------------------------------------------------------

TEACHER = torch.log_softmax(torch.randn(K, generator=torch.Generator().manual_seed(0), dtype=F64), -1)
KAPPA_KDRL = 0.5 / (math.sqrt(0.5) + 1e-6)  # grpo_advantages with KDRL's adv_eps = 1e-6


def kdrl_loss(beta: float, kd_on_correct: bool):
    return lambda rows: kdrl(rows, rows.detach(), TEACHER[IDX][:, None], CORRECT[IDX], ONES, group_size=2,
                             beta=beta, estimator="k2", kd_on_correct=kd_on_correct).loss


def test_kdrl_without_reward_mask_reaches_the_reverse_kl_optimum():
    """``kd_on_correct=True``: the k2 KD term's expected gradient is ``β·E_π[ℓ∇log π] = β∇KL(π‖π_T)`` (``tether.kl``),
    so the expected update is ``∇[−κ·π(C) + β·KL(π‖π_T)]``, minimized at the reverse-KL-regularized optimum
    ``π* ∝ π_T·exp(κ·1[a∈C]/β)`` — the docstring's "reverse-KL distillation to a teacher". β = 0.5."""
    beta = 0.5
    pi = descend(kdrl_loss(beta, kd_on_correct=True))
    target = torch.softmax(TEACHER + KAPPA_KDRL * CORRECT / beta, -1)
    print(f"KDRL, KD on every response: TV(π, π*) = {tv(pi, target):.2e}")
    assert tv(pi, target) < TV_REACHED


def test_kdrl_reward_guided_kd_fixes_the_wrong_responses_at_a_scaled_teacher():
    """Default reward-guided KD (no KD on rewarded responses): the KD term's expected gradient is
    ``β·Σ_{a∉C} π(a)ℓ(a)∇log π(a) = β·Σ_{a∉C} ℓ(a)∇π(a) = β∇D_C``, ``D_C(π) = Σ_{a∉C} π(a)(log(π(a)/π_T(a)) − 1)``
    (``π∇ℓ = ∇π`` cancels the −1) — the reverse KL restricted to unrewarded responses, unnormalized. The update
    minimizes ``J = −κ·π(C) + β·D_C``; at a stationary point ``∂J/∂π(a)`` is the same for every a:
    ``−κ`` on C and ``β·log(π(a)/π_T(a))`` off C, hence

        π*(a) = π_T(a)·e^{−κ/β}  for every wrong response,    π*(C) = 1 − e^{−κ/β}·π_T(∉C).

    The wrong responses keep the TEACHER'S SHAPE scaled down, not π_T·e^{r/β}/Z; how π*(C) splits among the correct
    responses is left to the path (J depends on π(C) only). β = 0.5: both asserted to 1e-9."""
    beta = 0.5
    pi = descend(kdrl_loss(beta, kd_on_correct=False))
    wrong = TEACHER.exp()[~IS_C] * math.exp(-KAPPA_KDRL / beta)
    print(f"KDRL reward-guided: π(wrong) = {pi[~IS_C].numpy().round(6)}, π_T·e^(−κ/β) = {wrong.numpy().round(6)}")
    assert_close(pi[~IS_C], wrong, "π* on wrong responses", atol=1e-9)
    assert_close(pi[IS_C].sum(), 1 - wrong.sum(), "π*(C)", atol=1e-9)
    assert tv(pi, torch.softmax(TEACHER + KAPPA_KDRL * CORRECT / beta, -1)) > 0.02  # ≠ the unmasked optimum


# ----------------------------------------------------------------------------------------------------------
# APO
# ----------------------------------------------------------------------------------------------------------

APO_REF = torch.log_softmax(torch.randn(K, generator=torch.Generator().manual_seed(1), dtype=F64), -1)
KAPPA_APO = 0.5 / (math.sqrt(0.5) + 1e-9)  # apo_shaping's std_eps = 1e-9
OMEGA = 1.0 - math.exp(-math.e / 2)  # DADS weight of a correct response in a group of G = 2 with one correct: d = ½


def apo_fixed_point(beta: float) -> torch.Tensor:
    """The closed form of ``test_apo_fixed_point`` (p_C by bisection on its scalar equation)."""
    ref = APO_REF.exp()
    ref_c, ref_w = ref[IS_C].sum().item(), ref[~IS_C].sum().item()

    def parts(p):
        w_c = p + (1 - p) * OMEGA
        c = beta * ref_w / (1 - p) - beta
        return w_c, c, beta * w_c - KAPPA_APO + c

    def f(p):
        w_c, c, denom = parts(p)
        return p - beta * w_c * ref_c / denom if denom > 0 else -math.inf

    grid = [k / 4000 for k in range(1, 4000)]
    signs = [f(p) > 0 for p in grid]
    changes = [k for k in range(len(grid) - 1) if signs[k] != signs[k + 1]]
    assert len(changes) == 1, "the scalar equation has one root on (0, 1)"
    lo, hi = grid[changes[0]], grid[changes[0] + 1]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    w_c, c, denom = parts(hi)
    pi = torch.where(IS_C, beta * w_c * ref / denom, beta * ref / (beta + c))
    assert abs(pi.sum().item() - 1.0) < 1e-12
    # the stationarity condition itself, written out (see the test's docstring)
    w_bar = torch.where(IS_C, torch.full_like(ref, w_c), torch.ones_like(ref))
    s = (w_bar * (pi - ref)).sum()
    residual = -KAPPA_APO * pi * (CORRECT - pi[IS_C].sum()) + beta * (w_bar * (pi - ref) - pi * s)
    assert residual.abs().max().item() < 1e-12
    return pi


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_apo_fixed_point(beta):
    """APO on G = 2, one-token responses (lengths 1: STCR is inactive), binary rewards. DADS: a group with one correct
    response has d = ½, so its correct response's KL weight is ω = 1 − e^{−e/2}; all other responses keep 1. A
    correct response's expected weight is ``w_C = p_C + (1 − p_C)·ω`` (its partner is correct with prob. p_C), a wrong
    one's is 1. k3's on-policy gradient is ``(1 − π_ref/π)∇log π`` (forward KL, ``tether.kl.k3``), so the expected
    update w.r.t. θ_b is

        −κπ(b)(1[b∈C] − p_C) + β·[w̄(b)(π(b) − π_ref(b)) − π(b)·S],     S = Σ_a w̄(a)(π(a) − π_ref(a)),

    zero iff ``π(b) = β·w̄(b)·π_ref(b) / (β·w̄(b) − κ·1[b∈C] + c)`` with one scalar c: π is proportional to π_ref
    inside C and outside C (the forward-KL form ``βπ_ref/(λ − r)`` of ``test_policy_bandit.py``, with the DADS weight
    scaling β on the correct side). Normalization gives ``c = β·π_ref(∉C)/(1 − p_C) − β`` and one scalar equation
    for p_C, solved by bisection in float64 (and the stationarity residual checked to 1e-12). Gradient descent on the
    exact expected update lands on it (TV < 1e-6)."""
    pi = descend(lambda rows: apo(rows, rows.detach(), APO_REF[IDX][:, None], CORRECT[IDX], ONES, group_size=2,
                                  beta=beta).loss)
    target = apo_fixed_point(beta)
    print(f"APO β={beta}: TV(π, π*) = {tv(pi, target):.2e}, π* = {target.numpy().round(5)}")
    assert tv(pi, target) < TV_REACHED


# ----------------------------------------------------------------------------------------------------------
# DisCO
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_type", ["kl", "low_var_kl"])
def test_disco_b_trust_region_optimum(kl_type):
    """DisCO-b (``dro=False``, logL score), one-token responses, π_old = [3, 1, 2, 2]/8, correct = {0, 2}
    (p = π_old(C) = 5/8), G = 2. The batch holds every ordered group (a1, a2) n(a1)·n(a2) times (64 groups): it IS
    the expectation over groups from π_old. Then, exactly,

        J = Σ_q J_q / 64 = P_v·(E_{π_old|C}[log π] − E_{π_old|∉C}[log π]),   P_v = 2p(1 − p)   (valid groups)
        D = token mean = E_{π_old}[log π_old − log π]  (kl)  or  E_{π_old}[ρ − 1 − log ρ] = Σπ − 1 + KL  (low_var_kl)
          = KL(π_old ‖ π) for both,

    and the library loss is ``−J + (β/2)·[KL(π_old‖π) − δ]₊²``. Stationarity over the simplex, with m = D − δ > 0:
    ``π(a) ∝ π_old(a)·(P_v·g(a) + β·m)``, g = 1/p on C and −1/(1 − p) off C; the normalizer is βm, so

        π*(a) = π_old(a)·(1 + P_v·g(a)/(β·m)),    π*(C) = p + P_v/(βm),

    and m solves ``m = KL_bin(p ‖ p + P_v/(βm)) − δ`` (the left side increases, the right decreases: one root,
    bisection). β = 20, δ = 1e-3. L-BFGS on the library loss lands on π* (TV < 1e-6) for both estimators — the
    docstring's "trust region to the rollout policy" with the code's ½ in the squared hinge."""
    counts = [3, 1, 2, 2]
    pi_old = torch.tensor(counts, dtype=F64) / 8
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    is_c = correct.bool()
    idx = torch.tensor([(a, b) for a in range(4) for b in range(4) for _ in range(counts[a] * counts[b])]).reshape(-1)
    mask = torch.ones(idx.numel(), 1, dtype=torch.bool)
    beta, delta = 20.0, 1e-3

    theta = torch.zeros(4, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=30, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lp = torch.log_softmax(theta, -1)
        loss = disco(lp[idx][:, None], pi_old.log()[idx][:, None], correct[idx], mask, group_size=2, dro=False,
                     beta=beta, delta=delta, kl_type=kl_type).loss
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    pi = torch.softmax(theta.detach(), -1)

    p = 5 / 8
    p_v = 2 * p * (1 - p)
    kl_bin = lambda q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))  # noqa: E731
    lo, hi = p_v / (beta * (1 - p)) * (1 + 1e-12), 100.0
    for _ in range(300):
        m = 0.5 * (lo + hi)
        lo, hi = (m, hi) if m < kl_bin(p + p_v / (beta * m)) - delta else (lo, m)
    m = 0.5 * (lo + hi)
    g = torch.where(is_c, torch.full((4,), 1 / p, dtype=F64), torch.full((4,), -1 / (1 - p), dtype=F64))
    target = pi_old * (1 + p_v * g / (beta * m))
    print(f"DisCO-b {kl_type}: TV(π, π*) = {tv(pi, target):.2e}, π* = {target.numpy().round(5)}, D − δ = {m:.5f}")
    assert tv(pi, target) < TV_REACHED


# ----------------------------------------------------------------------------------------------------------
# critical-token KL
# ----------------------------------------------------------------------------------------------------------


def test_critical_token_kl_two_state_bandit():
    """Two prompts (states) with K = 4 one-token responses each, separate logits θ_s. Reference logits: a confident
    state (max prob 0.79) and a less confident one (0.59); ρ = 3, T' = 1, b = 0 give weights
    ``w_s = (1 + log max π_ref(·|s)/log 4)^3`` = 0.7089 and 0.2402. Loss per batch: PPO at ρ = 1 with advantage
    ``r − E_π r`` per state, plus ``critical_token_kl`` (k2, λ = 2); both token-means over the 8 rows, which the
    per-row weights ``8·π_s(a)`` turn into the exact expectation (module docstring). On-policy k2 follows
    ``w_s·∇KL(π_s‖π_ref,s)``, so each state is a reverse-KL bandit with its own coefficient λ·w_s:

        π*_s ∝ π_ref,s·exp(r_s/(λ·w_s)).

    Gradient descent reaches both (TV < 1e-6 per state), and the two temperatures really differ (TV between the
    tilts with swapped weights ≈ 0.043 > 0.03)."""
    ref_logits = torch.tensor([[3.0, 0.5, 0.0, -0.5], [1.5, 0.3, 0.0, -0.3]], dtype=F64)
    ref = torch.log_softmax(ref_logits, -1)
    reward = torch.rand(2, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    lam, rho = 2.0, 3.0
    w = (1 + ref.amax(-1) / math.log(4)) ** rho
    assert_close(w, torch.tensor([0.7089, 0.2402], dtype=F64), "weights", atol=1e-4)
    mask = torch.ones(8, 1, dtype=torch.bool)
    ref_logits_rows = ref_logits.repeat_interleave(4, 0)[:, None, :]

    theta = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    for _ in range(400):
        logp = torch.log_softmax(theta, -1)
        pi = logp.detach().exp()
        adv = (reward - (pi * reward).sum(-1, keepdim=True)).reshape(-1)
        rows = logp.detach().reshape(-1, 1).requires_grad_(True)
        loss = ppo_clip(rows, rows.detach(), adv, mask).loss + critical_token_kl(
            rows, ref.reshape(-1, 1), ref_logits_rows, mask, kl_coef=lam, rho=rho, ref_temperature=1.0).loss
        (per_row,) = torch.autograd.grad(loss, rows)
        (grad,) = torch.autograd.grad(logp.reshape(-1), theta, grad_outputs=8 * pi.reshape(-1) * per_row[:, 0])
        with torch.no_grad():
            theta -= 2.0 * grad
    pi = torch.softmax(theta.detach(), -1)
    target = torch.softmax(ref + reward / (lam * w[:, None]), -1)
    for s in range(2):
        print(f"critical-token KL, state {s}: TV(π, π*) = {tv(pi[s], target[s]):.2e}")
        assert tv(pi[s], target[s]) < TV_REACHED
    swapped = torch.softmax(ref + reward / (lam * w.flip(0)[:, None]), -1)
    assert min(tv(target[s], swapped[s]) for s in range(2)) > 0.03


# ----------------------------------------------------------------------------------------------------------
# Archer: which KL the low-entropy term follows
# ----------------------------------------------------------------------------------------------------------


def _archer_tree(child_scale: list[float]):
    """Root logits θ0 (3,), child logits θ1 (3, 3) with child a's logits scaled by child_scale[a] (sharper → lower
    entropy), fixed references, and the per-response class of each position (root low iff H(π0) ≤ H(π1(·|a)))."""
    g = torch.Generator().manual_seed(8)
    theta0 = (0.8 * torch.randn(3, generator=g, dtype=F64)).requires_grad_()
    scale = torch.tensor(child_scale, dtype=F64)[:, None]
    theta1 = (scale * torch.randn(3, 3, generator=g, dtype=F64)).requires_grad_()
    ref0 = torch.log_softmax(torch.randn(3, generator=g, dtype=F64), -1)
    ref1 = torch.log_softmax(torch.randn(3, 3, generator=g, dtype=F64), -1)
    return theta0, theta1, ref0, ref1


def _archer_expected_grad(theta0, theta1, ref0, ref1, beta_low, beta_high):
    """Σ_y π(y)·∇ loss(y) over the 9 responses y = (a, b), each its own batch of one (T = 2), A = 0 (no PG term),
    entropies of the current policy at both positions."""
    lp0, lp1 = torch.log_softmax(theta0, -1), torch.log_softmax(theta1, -1)
    h0, h1 = K_.entropy(theta0.detach()), K_.entropy(theta1.detach())
    total = theta0.new_zeros(())
    for a in range(3):
        for b in range(3):
            logps = torch.stack([lp0[a], lp1[a, b]])[None]
            ref = torch.stack([ref0[a], ref1[a, b]])[None]
            out = archer(logps, logps.detach(), ref, torch.zeros(1, dtype=F64), torch.ones(1, 2, dtype=torch.bool),
                         entropy=torch.stack([h0, h1[a]])[None], kl_coef_low_entropy=beta_low,
                         kl_coef_high_entropy=beta_high)
            total = total + (lp0[a] + lp1[a, b]).detach().exp() * out.loss
    return torch.autograd.grad(total, [theta0, theta1]), h0, h1


def test_archer_low_entropy_kl_follows_the_forward_kl_where_the_class_is_a_property_of_the_state():
    """Depth-2 tree; with A = 0 the loss of a response is ``β_low·k3(its low token) + β_high·k3(its high token)``
    (each class's token mean over the one token it holds). k3's on-policy expected gradient at a state s is
    ``∇KL(π_ref(·|s)‖π_θ(·|s))`` (``tether.kl.k3``). Case 1: the root is flatter than every child, so in every
    response the root token is the high-entropy one and the child token the low one; the expected gradient is then
    exactly ``β_high·∇KL(π_ref0‖π0) + β_low·Σ_a π0(a)·∇KL(π_ref1(·|a)‖π1(·|a))`` (π0(a) held fixed: samples are data)
    — the docstring's forward KL on low-entropy tokens (1e-12)."""
    theta0, theta1, ref0, ref1 = _archer_tree([3.0, 3.0, 3.0])
    (g0, g1), h0, h1 = _archer_expected_grad(theta0, theta1, ref0, ref1, beta_low=0.3, beta_high=0.1)
    assert (h0 > h1).all(), "case 1 needs the root flatter than every child"
    lp0 = torch.log_softmax(theta0, -1)
    forward = 0.1 * K_.forward_kl(theta0, ref0) + 0.3 * (lp0.detach().exp() * K_.forward_kl(theta1, ref1)).sum()
    w0, w1 = torch.autograd.grad(forward, [theta0, theta1])
    assert_close(g0, w0, "root: β_high·∇KL", atol=1e-12)
    assert_close(g1, w1, "children: β_low·Σ π0(a)∇KL", atol=1e-12)


def test_archer_class_depending_on_the_sampled_token_is_not_a_kl_gradient():
    """Case 2: child 0 is flatter than the root, children 1 and 2 sharper. The quantile is per RESPONSE, so the root
    token is low-entropy in responses that start with a = 0 and high-entropy otherwise: its class depends on the
    token sampled at the root. The expected root gradient is then

        Σ_a π0(a)·β(a)·(1 − π_ref0(a)/π0(a))·∇log π0(a),   β(a) = β_low if a = 0 else β_high,

    (exact, 1e-12) — a token-selected forward-KL gradient, NOT ``P(low)·β_low·∇KL + P(high)·β_high·∇KL`` at the root
    (the two differ here by more than 1e-3): the low-entropy KL of Archer follows ∇KL(π_ref‖π_θ) at a state only
    where the class does not depend on which token is sampled there."""
    theta0, theta1, ref0, ref1 = _archer_tree([0.05, 4.0, 4.0])
    beta_low, beta_high = 0.3, 0.1
    (g0, _), h0, h1 = _archer_expected_grad(theta0, theta1, ref0, ref1, beta_low, beta_high)
    assert h1[0] > h0 > h1[1] and h0 > h1[2], "case 2 needs child 0 flatter than the root, the others sharper"
    lp0 = torch.log_softmax(theta0, -1)
    pi0, q0 = lp0.detach().exp(), ref0.exp()
    coef = torch.tensor([beta_low, beta_high, beta_high], dtype=F64)
    (want,) = torch.autograd.grad((coef * (pi0 - q0) * lp0).sum(), theta0)  # Σ_a β(a)(π − π_ref)(a)∇log π0(a)
    assert_close(g0, want, "root: token-selected forward KL", atol=1e-12)
    p_low = pi0[0]
    (state_level,) = torch.autograd.grad((p_low * beta_low + (1 - p_low) * beta_high) * K_.forward_kl(theta0, ref0),
                                         theta0)
    assert (g0 - state_level).abs().max().item() > 1e-3
