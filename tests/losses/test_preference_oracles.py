"""Oracles for TDPO, Ra-DPO, KTO and LongPO: analytic optima of the exact expected loss, or exact expected gradients.

Same manner as ``test_preference_bandit.py`` (read it first): float64, no sampling noise; a "sequence" is a response
of one token (one state) or of two tokens (a depth-2 tree); pairs are ALL ordered pairs of distinct responses with
the Bradley–Terry weights ``w(c, d) = [μ(c,d) + μ(d,c)]·σ(r_c − r_d)`` for a fixed full-support μ, so the expected
loss is ``E(θ) = Σ_{c≠d} w(c,d)·L(c ≻ d)``, evaluated as ONE weighted batch through the library and minimized with
full-batch L-BFGS.

Why per-sequence scores give closed forms. If ``L(c ≻ d) = softplus(−(g(c) − g(d)))`` for a per-response score g,
each unordered pair {a, b} contributes ``w(a,b)·softplus(−x) + w(b,a)·softplus(x)`` with ``x = g(a) − g(b)``,
minimized iff ``x = log(w(a,b)/w(b,a)) = r_a − r_b``. All pairs hold at once iff ``g = r + C``; then E equals its
lower bound ``E_min = Σ_{c≠d} w(c,d)·softplus(−(r_c − r_d))``, so such a π is a GLOBAL minimizer — checked below by
evaluating the library loss at the closed form (1e-12), independently of the optimizer.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tether.losses.preference import dpo, kto, longpo, ra_dpo, tdpo, token_risk
from tether.testing import assert_close

F64 = torch.float64
BETA = 0.5
TV_REACHED = 1e-6


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def pair_weights(reward: torch.Tensor, seed: int = 0):
    """All ordered pairs (c, d), c ≠ d, of n responses and w(c, d) = [μ(c,d) + μ(d,c)]·σ(r_c − r_d); Σ w = 1."""
    n = reward.shape[0]
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 + torch.rand(n, n, generator=g, dtype=F64)
    mu.fill_diagonal_(0.0)
    mu /= mu.sum()
    c, d = zip(*[(i, j) for i in range(n) for j in range(n) if i != j])
    c, d = torch.tensor(c), torch.tensor(d)
    w = (mu[c, d] + mu[d, c]) * torch.sigmoid(reward[c] - reward[d])
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-12)
    return c, d, w


def lbfgs(theta: torch.Tensor, objective) -> torch.Tensor:
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=30, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    for _ in range(5):
        opt.step(closure)
    return theta.detach()


# ----------------------------------------------------------------------------------------------------------
# a depth-2 tree: responses y = (a, b), a ∈ {0..K0−1} at the root, b ∈ {0..K1−1} after a
# ----------------------------------------------------------------------------------------------------------

K0, K1 = 3, 4


class Tree:
    """π_θ(a, b) = π0(a)·π1(b|a) with logits θ0 (K0,) and θ1 (K0, K1); fixed reference and reward on the K0·K1
    responses (indexed a·K1 + b)."""

    def __init__(self, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.ref0 = torch.log_softmax(torch.randn(K0, generator=g, dtype=F64), -1)
        self.ref1 = torch.log_softmax(1.5 * torch.randn(K0, K1, generator=g, dtype=F64), -1)
        self.reward = 2.0 * torch.rand(K0, K1, generator=g, dtype=F64)
        self.a = torch.arange(K0).repeat_interleave(K1)
        self.b = torch.arange(K1).repeat(K0)

    def logps(self, theta0, theta1):
        """Per-response LP_θ (K0·K1,), the per-state log-probs (log π0, log π1)."""
        lp0, lp1 = torch.log_softmax(theta0, -1), torch.log_softmax(theta1, -1)
        return lp0[self.a] + lp1[self.a, self.b], lp0, lp1

    def ref_logps(self):
        return self.ref0[self.a] + self.ref1[self.a, self.b]

    def tilt(self):
        """π1*(·|a) ∝ π_ref1(·|a)·e^{r(a,·)/β} and log Z1(a)."""
        logits = self.ref1 + self.reward / BETA
        return torch.log_softmax(logits, -1), torch.logsumexp(logits, -1)


def seq_kl(ref0, lp0, ref1, lp1, a):
    """SeqKL(y) = KL(π_ref0‖π0) + KL(π_ref1(·|a)‖π1(·|a)) (TDPO's sequential forward KL), per response."""
    k0 = (ref0.exp() * (ref0 - lp0)).sum()
    k1 = (ref1.exp() * (ref1 - lp1)).sum(-1)
    return k0 + k1[a]


def seq_risk(ref0, lp0, ref1, lp1, a, c, split):
    """SeqRisk(y) = R(root) + R(after a), the library's token_risk at both states."""
    return token_risk(lp0, ref0, confidence_level=c, split_vocab=split) + \
        token_risk(lp1, ref1, confidence_level=c, split_vocab=split)[a]


def tree_objective(tree, loss_fn, extra):
    """E(θ) through the library: ``extra(lp0, lp1)`` gives the per-response extra term (SeqKL or SeqRisk)."""
    reward = tree.reward.reshape(-1)
    c, d, w = pair_weights(reward)
    ref = tree.ref_logps()

    def objective(theta):
        th0, th1 = theta[:K0], theta[K0:].reshape(K0, K1)
        lp, lp0, lp1 = tree.logps(th0, th1)
        s = extra(lp0, lp1)
        return (w * loss_fn(lp[c], lp[d], ref[c], ref[d], s[c], s[d]).loss).sum()

    e_min = (w * F.softplus(-(reward[c] - reward[d]))).sum()
    return objective, e_min


def tree_closed_form(tree, penalty):
    """θ* of a TDPO1-type optimum: π1* = tilt; π0*(a) ∝ π_ref0(a)·Z1(a)·exp(−penalty(a)), where penalty(a) is the
    step-1 SeqKL/SeqRisk term at the tilted π1*(·|a)."""
    lp1_star, log_z1 = tree.tilt()
    lp0_star = torch.log_softmax(tree.ref0 + log_z1 - penalty(lp1_star), -1)
    return torch.cat([lp0_star, lp1_star.reshape(-1)]), lp0_star, lp1_star


def joint(lp0, lp1):
    return (lp0[:, None] + lp1).exp().reshape(-1)


def test_tdpo1_tree_optimum():
    """TDPO1 on a depth-2 tree: the margin is ``g(c) − g(d)`` with ``g(y) = β·(ρ(y) + SeqKL(y))``, so the optimum is
    ``g = r + C`` (module docstring). Writing ``ρ(a,b) = log π0(a)/π_ref0(a) + log π1(b|a)/π_ref1(b|a)`` and
    ``SeqKL(a,b) = K0 + K1(a)`` (K0 = KL(π_ref0‖π0) is the same for every response, K1(a) = KL(π_ref1(·|a)‖π1(·|a))):

    * varying b with a fixed, only ``β log π1(b|a)/π_ref1(b|a) − r(a,b)`` changes, so
      ``π1*(·|a) ∝ π_ref1(·|a)·e^{r(a,·)/β}`` (the DPO tilt; normalizer Z1(a));
    * then ``β log π1*/π_ref1 = r − β log Z1(a)`` and g − r = C reads
      ``log π0(a)/π_ref0(a) − log Z1(a) + K1*(a) = const``, i.e. ``π0*(a) ∝ π_ref0(a)·Z1(a)·e^{−K1*(a)}``.

    DPO's optimum has ``π0(a) ∝ π_ref0(a)·Z1(a)``: TDPO1 moves first-step mass away from branches whose tilted
    continuation drifted far (in forward KL) from the reference. Checks: the library loss at π* equals E_min
    (global minimum, 1e-12); L-BFGS from θ = 0 lands on π* (TV < 1e-6); π* differs from DPO's optimum.
    """
    tree = Tree()
    objective, e_min = tree_objective(
        tree, lambda pc, pr, rc, rr, kc, kr: tdpo(pc, pr, rc, rr, chosen_seq_kl=kc, rejected_seq_kl=kr, variant=1,
                                                  beta=BETA),
        lambda lp0, lp1: seq_kl(tree.ref0, lp0, tree.ref1, lp1, tree.a))
    k1 = lambda lp1: (tree.ref1.exp() * (tree.ref1 - lp1)).sum(-1)  # noqa: E731
    theta_star, lp0_star, lp1_star = tree_closed_form(tree, k1)
    assert_close(objective(theta_star), e_min, "E(π*) = E_min", atol=1e-12)
    pi_star = joint(lp0_star, lp1_star)
    pi_dpo = torch.softmax(tree.ref_logps() + tree.reward.reshape(-1) / BETA, -1)
    print(f"TV(TDPO1 optimum, DPO optimum) = {tv(pi_star, pi_dpo):.4f}")
    assert tv(pi_star, pi_dpo) > 0.02

    theta = lbfgs(torch.zeros(K0 + K0 * K1, dtype=F64, requires_grad=True), objective)
    _, lp0, lp1 = tree.logps(theta[:K0], theta[K0:].reshape(K0, K1))
    dist = tv(joint(lp0, lp1), pi_star)
    print(f"TDPO1 tree: TV(π, π*) = {dist:.2e}")
    assert dist < TV_REACHED


@pytest.mark.parametrize("split", [False, True])
def test_ra_dpo1_tree_optimum(split):
    """Ra-DPO1 has TDPO1's structure with ``SeqRisk(a,b) = R0 + R1(a)`` in place of SeqKL (each R_t is a function of
    the two distributions at the state, :func:`tether.losses.preference.token_risk`), so the same derivation gives
    ``π1* = tilt`` and ``π0*(a) ∝ π_ref0(a)·Z1(a)·e^{−R1*(a)}`` with ``R1*(a)`` the risk of the tilted π1*(·|a)
    (c = 0.8; with ``split_vocab`` the per-half risk). The risk's indicator is piecewise constant in θ, so global
    optimality is checked directly — the library loss at π* equals E_min (1e-12), a perturbed π0 is strictly worse —
    and L-BFGS from θ = 0 (on the piecewise-smooth loss) lands on π* too (TV < 1e-6). π* differs from the DPO
    optimum: the risk term matters."""
    tree = Tree(seed=2)
    conf = 0.8
    objective, e_min = tree_objective(
        tree, lambda pc, pr, rc, rr, sc, sr: ra_dpo(pc, pr, rc, rr, chosen_seq_risk=sc, rejected_seq_risk=sr,
                                                    variant=1, beta=BETA),
        lambda lp0, lp1: seq_risk(tree.ref0, lp0, tree.ref1, lp1, tree.a, conf, split))
    r1 = lambda lp1: token_risk(lp1, tree.ref1, confidence_level=conf, split_vocab=split)  # noqa: E731
    theta_star, lp0_star, lp1_star = tree_closed_form(tree, r1)
    assert_close(objective(theta_star), e_min, "E(π*) = E_min", atol=1e-12)
    pi_star = joint(lp0_star, lp1_star)
    pi_dpo = torch.softmax(tree.ref_logps() + tree.reward.reshape(-1) / BETA, -1)
    print(f"Ra-DPO1 split={split}: TV(π*, DPO optimum) = {tv(pi_star, pi_dpo):.4f}")
    assert tv(pi_star, pi_dpo) > 0.01
    # and any other first-step distribution is strictly worse (the optimum is unique)
    bumped = theta_star.clone()
    bumped[0] += 0.05
    assert objective(bumped).item() > e_min.item() + 1e-8
    theta = lbfgs(torch.zeros(K0 + K0 * K1, dtype=F64, requires_grad=True), objective)
    _, lp0, lp1 = tree.logps(theta[:K0], theta[K0:].reshape(K0, K1))
    dist = tv(joint(lp0, lp1), pi_star)
    print(f"Ra-DPO1 split={split} tree: TV(π, π*) = {dist:.2e}")
    assert dist < TV_REACHED


def test_tdpo2_expected_gradient_adds_a_forward_kl_gradient():
    """One state, K = 6 one-token responses: every response has the same SeqKL = KL(π_ref‖π_θ) =: K. TDPO2's margin is
    ``z = Δ − α(K − sg(K))`` — the VALUE of DPO's margin — with gradient ``∇Δ − α∇K``. Hence, exactly,

        ∇E_TDPO2 = ∇E_DPO + αβ·S·∇KL(π_ref‖π_θ),    S = Σ_{c≠d} w(c,d)·σ(−βΔ_cd),   ∇_θ KL(π_ref‖softmax θ) = π − π_ref,

    i.e. TDPO2 is DPO plus a FORWARD-KL penalty whose weight S is the expected DPO error — the docstring's
    "sequential forward KL KL(π_ref ‖ π_θ)" with the chosen term detached. TDPO1's two KL terms cancel in value and
    gradient: its expected gradient is DPO's (1e-12)."""
    g = torch.Generator().manual_seed(7)
    K, alpha = 6, 0.5
    ref = torch.log_softmax(torch.randn(K, generator=g, dtype=F64), -1)
    reward = torch.randn(K, generator=g, dtype=F64)
    c, d, w = pair_weights(reward, seed=3)
    theta = torch.randn(K, generator=g, dtype=F64).requires_grad_()

    def expected_grad(variant):
        lp = torch.log_softmax(theta, -1)
        kl = (ref.exp() * (ref - lp)).sum().expand(K)
        if variant is None:
            out = dpo(lp[c], lp[d], ref[c], ref[d], beta=BETA)
        else:
            out = tdpo(lp[c], lp[d], ref[c], ref[d], chosen_seq_kl=kl[c], rejected_seq_kl=kl[d], variant=variant,
                       alpha=alpha, beta=BETA)
        return torch.autograd.grad((w * out.loss).sum(), theta)[0]

    with torch.no_grad():
        lp = torch.log_softmax(theta, -1)
        delta = (lp[c] - ref[c]) - (lp[d] - ref[d])
        s = (w * torch.sigmoid(-BETA * delta)).sum()
        grad_forward_kl = lp.exp() - ref.exp()
    assert_close(expected_grad(2) - expected_grad(None), alpha * BETA * s * grad_forward_kl, "TDPO2 − DPO",
                 atol=1e-12)
    assert_close(expected_grad(1), expected_grad(None), "TDPO1 = DPO on one state", atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# KTO: no KL-regularized optimum
# ----------------------------------------------------------------------------------------------------------


def test_kto_two_response_bandit_has_no_interior_optimum():
    """Two responses, preferred one way with probability p = σ(r0 − r1) = σ(0.8) = 0.690; pairs (0 ≻ 1) with weight
    p and (1 ≻ 0) with 1 − p; reference point z fixed (KTO detaches it); λ_D = λ_U = 1. Per response, with
    ``u_a = β(ρ_a − z)`` and ``1 − σ(x) = σ(−x)``:

        E = p·[σ(−u0) + σ(u1)] + (1 − p)·[σ(−u1) + σ(u0)] = 1 + (1 − 2p)·(σ(u0) − σ(u1)).

    With t = θ0 − θ1 (π = softmax θ): ``dρ0/dt = π1``, ``dρ1/dt = −π0``, so

        dE/dt = (1 − 2p)·β·[σ'(u0)·π1 + σ'(u1)·π0] < 0   for every t when p > ½:

    the expected loss decreases monotonically toward the deterministic policy on response 0; its infimum
    ``1 + (1 − 2p)·σ(β(−log π_ref(0) − z))`` is approached only as π0 → 1. There is no KL-regularized optimum —
    unlike DPO on the same data, whose optimum π ∝ π_ref·e^{r/β} is an interior point; at that point KTO's
    gradient is still the (nonzero) closed form above. Checked on a grid of t, value and gradient to 1e-12."""
    ref = torch.tensor([0.3, 0.7], dtype=F64).log()
    p = torch.sigmoid(torch.tensor(0.8, dtype=F64))
    z, beta = 0.2, BETA
    kw = dict(kl_reference=torch.tensor(z, dtype=F64), beta=beta)
    pi_dpo = torch.softmax(ref + torch.tensor([0.8, 0.0], dtype=F64) / beta, -1)
    t_dpo = (pi_dpo.log()[0] - pi_dpo.log()[1]).item()
    for t0 in [-8.0, -2.0, 0.0, t_dpo, 1.5, 6.0]:
        t = torch.tensor(t0, dtype=F64, requires_grad=True)
        lp = torch.log_softmax(torch.stack([t, torch.zeros((), dtype=F64)]), -1)
        loss = p * kto(lp[:1], lp[1:], ref[:1], ref[1:], **kw).loss + \
            (1 - p) * kto(lp[1:], lp[:1], ref[1:], ref[:1], **kw).loss
        (grad,) = torch.autograd.grad(loss.sum(), t)
        with torch.no_grad():
            pi = lp.exp()
            u = beta * (lp - ref - z)
            value = 1 + (1 - 2 * p) * (torch.sigmoid(u[0]) - torch.sigmoid(u[1]))
            sp = torch.sigmoid(u) * torch.sigmoid(-u)
            slope = (1 - 2 * p) * beta * (sp[0] * pi[1] + sp[1] * pi[0])
        assert_close(loss, value.reshape(1), f"E at t={t0:.3f}", atol=1e-12)
        assert_close(grad, slope, f"dE/dt at t={t0:.3f}", atol=1e-12)
        assert slope.item() < 0


# ----------------------------------------------------------------------------------------------------------
# LongPO
# ----------------------------------------------------------------------------------------------------------


def longpo_setup():
    g = torch.Generator().manual_seed(5)
    K = 6
    reward = torch.randn(K, generator=g, dtype=F64)
    c, d, w = pair_weights(reward, seed=4)
    chosen_marginal = torch.zeros(K, dtype=F64).index_add_(0, c, w)  # μ_w(a) = Σ_d w(a, d); Σ μ_w = 1
    return K, reward, c, d, w, chosen_marginal


def longpo_objective(c, d, w, ref_short, lam):
    def objective(theta):
        lp = torch.log_softmax(theta, -1)
        out = longpo(lp[c], lp[d], ref_short[c], ref_short[d], chosen_nll=-lp[c], beta=BETA, lambda_po=lam)
        return (w * out.loss).sum()

    return objective


@pytest.mark.parametrize("lam", [0.01, 1.0, 10.0])
def test_longpo_optimum_with_a_matched_short_context_reference(lam):
    """One-token responses, so ``chosen_nll = −log π(y_w)``. The expected loss is

        E = Σ w(c,d)·[−log π(c)] + λ·Σ w(c,d)·softplus(−βΔ_cd) = CE(μ_w, π) + λ·E_DPO(π; π_ref(·|x_S)),

    with μ_w(a) = Σ_d w(a,d) the chosen marginal. CE is minimized at π = μ_w; E_DPO at π_ref·e^{r/β}/Z (the DPO
    optimum against the SHORT-context reference). Choose the short-context reference π_ref ∝ μ_w·e^{−r/β}: then both
    optima are μ_w, and — both terms being convex in θ (E_DPO depends on θ only through the linear θ_c − θ_d) —
    μ_w is THE optimum of LongPO for every λ. L-BFGS lands there (TV < 1e-6) for λ = 0.01, 1, 10."""
    K, reward, c, d, w, mu_w = longpo_setup()
    ref_short = torch.log_softmax(mu_w.log() - reward / BETA, -1)
    theta = lbfgs(torch.zeros(K, dtype=F64, requires_grad=True), longpo_objective(c, d, w, ref_short, lam))
    dist = tv(torch.softmax(theta, -1), mu_w)
    print(f"LongPO λ={lam}: TV(π, μ_w) = {dist:.2e}")
    assert dist < TV_REACHED


def test_longpo_expected_gradient_is_ce_plus_lambda_dpo():
    """Any reference, any θ: ``∇E_LongPO = (π − μ_w) + λ·∇E_DPO`` exactly — the NLL enters unweighted (its gradient
    is the cross-entropy gradient ``softmax(θ) − μ_w``) and λ multiplies only the preference term (1e-12)."""
    K, reward, c, d, w, mu_w = longpo_setup()
    g = torch.Generator().manual_seed(6)
    ref_short = torch.log_softmax(torch.randn(K, generator=g, dtype=F64), -1)
    theta = torch.randn(K, generator=g, dtype=F64).requires_grad_()
    lam = 0.3
    (total,) = torch.autograd.grad(longpo_objective(c, d, w, ref_short, lam)(theta), theta)
    lp = torch.log_softmax(theta, -1)
    (g_dpo,) = torch.autograd.grad((w * dpo(lp[c], lp[d], ref_short[c], ref_short[d], beta=BETA).loss).sum(), theta)
    assert_close(total, (lp.exp() - mu_w).detach() + lam * g_dpo, "∇E_LongPO", atol=1e-12)
