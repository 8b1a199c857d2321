"""GVPO, DisCO, RPG, KDRL and APO (``tether.losses.policy.kl_objectives``) against plain float64 twins,
hand-worked oracles, exact expected gradients and exact bandit optima (conventions: ``policy_helpers.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from policy_helpers import (
    F64,
    ONE,
    T,
    assert_close,
    run_against_twin,
    token_batch,
    twin_ppo_clip,
    twin_token_mean,
)

from tether import kl as K
from tether.losses.policy import AGG_MODES
from tether.losses.policy.kl_objectives import apo, apo_shaping, disco, gvpo, kdrl, rpg

# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def grpo_adv_twin(rewards, G, eps):
    out = torch.empty_like(rewards)
    for q in range(rewards.shape[0] // G):
        r = rewards[q * G : (q + 1) * G]
        out[q * G : (q + 1) * G] = (r - r.mean()) / (torch.std(r) + eps)  # torch.std is unbiased
    return out


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def bandit(seed: int = 0, K_arms: int = 6, beta: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    ref = torch.log_softmax(torch.randn(K_arms, generator=g, dtype=F64), -1)
    reward = torch.rand(K_arms, generator=g, dtype=F64)
    target = torch.softmax(ref + reward / beta, -1)
    return ref, reward, target


def _expected_grad(loss_fn, theta, p_old):
    """Σ_a π_old(a)·∇_θ loss(a) for the one-token responses a = 0..V−1."""
    total = sum(p_old[a] * loss_fn(a) for a in range(theta.shape[0]))
    return torch.autograd.grad(total, theta)[0]


# ----------------------------------------------------------------------------------------------------------
# GVPO
# ----------------------------------------------------------------------------------------------------------


def gvpo_twin(logps, old_logps, rewards, mask, group_size, beta):
    """README formula, loop per response; the group mean of u is NOT detached (must not change the gradient)."""
    total = logps.new_zeros(())
    for q in range(logps.shape[0] // group_size):
        rows = range(q * group_size, (q + 1) * group_size)
        u = [beta * (logps[i] - old_logps[i])[mask[i]].sum() for i in rows]
        r = [rewards[i] for i in rows]
        u_bar, r_bar = sum(u) / group_size, sum(r) / group_size
        for ui, ri in zip(u, r):
            total = total + 0.5 * ((ui - u_bar) - (ri - r_bar)) ** 2
    return total / (group_size - 1)


def test_gvpo_matches_twin():
    b = token_batch(6, seed=1)
    b.pop("ref_logps")
    b["rewards"] = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0], dtype=F64)
    run_against_twin(gvpo, gvpo_twin, b, diff=("logps",), const=("old_logps",), group_size=3, beta=0.1)


def test_gvpo_gradient_at_old_policy_is_centred_policy_gradient():
    """At θ = θ_old every u_i = 0, so ∂L/∂log π(y_{i,t}) = −β(R_i − R̄)/(G − 1) on response tokens, 0 elsewhere."""
    b = token_batch(6, seed=2)
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, 0.0], dtype=F64)
    logps = b["old_logps"].clone().requires_grad_()
    beta, G = 0.3, 3
    gvpo(logps, b["old_logps"], rewards, b["mask"], group_size=G, beta=beta).loss.backward()
    centred = rewards - rewards.view(-1, G).mean(-1).repeat_interleave(G)
    expected = torch.where(b["mask"], -beta * centred[:, None] / (G - 1), torch.zeros_like(logps))
    assert_close(logps.grad, expected, "gvpo grad at θ_old", atol=1e-12, rtol=1e-12)


def test_gvpo_zero_iff_centred_implicit_reward_matches_centred_reward():
    """log(π/π_old)(y_i) − mean_j log(π/π_old)(y_j) = (R_i − R̄)/β makes the loss exactly 0 (and its gradient)."""
    b = token_batch(6, seed=3)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0], dtype=F64)
    beta, lengths = 0.2, b["mask"].sum(-1, keepdim=True).to(F64)
    shift = (rewards / beta + 7.0)[:, None] / lengths  # any per-group constant (7) is allowed
    logps = (b["old_logps"] + torch.where(b["mask"], shift, torch.zeros_like(shift))).requires_grad_()
    out = gvpo(logps, b["old_logps"], rewards, b["mask"], group_size=3, beta=beta)
    out.loss.backward()
    assert out.loss.item() < 1e-20 and logps.grad.abs().max().item() < 1e-10
    off = gvpo(logps.detach() + 0.01 * b["mask"], b["old_logps"], rewards * 1.1, b["mask"], group_size=3, beta=beta)
    assert off.loss.item() > 1e-6


def test_gvpo_expected_loss_is_half_variance_and_bandit_converges():
    """E over groups of 2 iid arms of the loss = ½ Var_{π_s}[β log(π/π_ref) − R] (unbiased 1/(G−1) factor), and
    gradient descent on that exact expectation (π_s = current policy, detached) reaches π* ∝ π_ref·exp(R/β)."""
    ref, reward, target = bandit(seed=0)
    beta, K_arms = 0.5, ref.shape[0]
    pairs = [(a, c) for a in range(K_arms) for c in range(a + 1, K_arms)]  # (a, a) groups have zero loss
    mask2 = torch.ones(2, 1, dtype=torch.bool)

    def expected_loss(logp, p_s):
        total = logp.new_zeros(())
        for a, c in pairs:
            out = gvpo(logp[[a, c]].view(2, 1), ref[[a, c]].view(2, 1), reward[[a, c]], mask2, group_size=2, beta=beta)
            total = total + 2 * p_s[a] * p_s[c] * out.loss
        return total

    theta = torch.randn(K_arms, dtype=F64, generator=torch.Generator().manual_seed(5))
    logp = torch.log_softmax(theta, -1)
    x = beta * (logp - ref) - reward
    p_s = torch.softmax(torch.zeros(K_arms, dtype=F64), -1)
    half_var = 0.5 * ((p_s * x.square()).sum() - (p_s * x).sum().square())
    assert_close(expected_loss(logp, p_s), half_var, "E[gvpo] = ½Var", atol=1e-12, rtol=1e-12)

    theta = torch.zeros(K_arms, dtype=F64, requires_grad=True)
    for _ in range(50):
        logp = torch.log_softmax(theta, -1)
        (grad,) = torch.autograd.grad(expected_loss(logp, logp.detach().exp()), theta)
        with torch.no_grad():
            theta -= 10.0 * grad
    dist = tv(torch.softmax(theta.detach(), -1), target)
    print(f"GVPO bandit: TV(π, π*) = {dist:.2e}")
    assert dist < 0.02


# ----------------------------------------------------------------------------------------------------------
# DisCO
# ----------------------------------------------------------------------------------------------------------


def disco_twin(logps, old_logps, rewards, mask, group_size, score, tau, dro, beta, delta, kl_type):
    B = logps.shape[0]
    scores = []
    for i in range(B):
        values = logps[i][mask[i]] if score == "logL" else torch.exp(logps[i] - old_logps[i])[mask[i]]
        scores.append(values.mean())
    objective = logps.new_zeros(())
    for q in range(B // group_size):
        rows = range(q * group_size, (q + 1) * group_size)
        pos = [scores[i] for i in rows if rewards[i] == 1]
        neg = [scores[i] for i in rows if rewards[i] == 0]
        if not pos or not neg:
            continue
        if dro:
            neg_term = tau * torch.log(torch.stack([torch.exp(s / tau) for s in neg]).mean())
        else:
            neg_term = sum(neg) / len(neg)
        objective = objective + sum(pos) / len(pos) - neg_term
    objective = objective / (B // group_size)
    log_ratio = logps - old_logps
    per_token = -log_ratio if kl_type == "kl" else torch.exp(log_ratio) - 1 - log_ratio
    d = twin_token_mean(per_token, mask)
    return -objective + 0.5 * beta * torch.clamp(d - delta, min=0) ** 2


@pytest.mark.parametrize(
    "score,dro,kl_type", [("logL", True, "kl"), ("Lratio", True, "low_var_kl"), ("logL", False, "low_var_kl")]
)
def test_disco_matches_twin(score, dro, kl_type):
    b = token_batch(9, seed=4)
    b.pop("ref_logps")
    b["old_logps"] = b["logps"] + 0.3 + 0.2 * torch.randn(9, T, dtype=F64)  # D > δ: the constraint is active
    b["rewards"] = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=F64)  # third prompt degenerate, still counted
    tau = 10.0 if score == "logL" else 1.0
    out = run_against_twin(
        disco, disco_twin, b, diff=("logps",), const=("old_logps",), group_size=3, score=score, tau=tau, dro=dro,
        beta=50.0, delta=1e-4, kl_type=kl_type,
    )  # fmt: skip
    assert out.metrics["constraint_active"] == 1.0 and out.metrics["valid_groups"] == 2.0


def test_disco_dro_limits_and_softmax_weights():
    """τ → ∞: the DRO term is DisCO-b's mean; τ → 0: the max; the gradient weight on negative j is softmax_j(s/τ)."""
    s = torch.tensor([[-0.5], [-1.0], [-2.0], [-0.3]], dtype=F64)  # T = 1: the logL score is the log-prob itself
    rewards = torch.tensor([1.0, 0, 0, 0], dtype=F64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    common = dict(group_size=4, beta=1e3, delta=1e-4, kl_type="kl")

    def objective(tau, dro=True):
        return disco(s, s, rewards, mask, tau=tau, dro=dro, **common).metrics["objective"]

    negatives = s[1:, 0]
    assert objective(1e7) == pytest.approx(objective(None, dro=False), abs=1e-6)
    assert objective(1e-3) == pytest.approx((s[0, 0] - negatives.max()).item(), abs=1e-2)
    assert objective(None, dro=False) == pytest.approx((s[0, 0] - negatives.mean()).item(), abs=1e-12)

    tau = 0.7
    logps = s.clone().requires_grad_()
    disco(logps, s, rewards, mask, tau=tau, **common).loss.backward()  # D = 0 ≤ δ: no penalty gradient
    expected = torch.cat([torch.tensor([-1.0], dtype=F64), torch.softmax(negatives / tau, 0)])
    assert_close(logps.grad[:, 0], expected, "d(−J)/ds = [−1/|pos|, softmax(s_neg/τ)]", atol=1e-12, rtol=1e-12)


def test_disco_penalty_is_the_codes_squared_hinge_gradient():
    """D ≤ δ: zero penalty gradient. D = δ + 1e-4 with β = 1e3: penalty gradient = 0.1·∇D, which is also the gradient
    of the official code's ``sg(max(β(D − δ), 0))·D``."""
    b = token_batch(6, seed=5)
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1], dtype=F64)
    n_tokens = b["mask"].sum().item()

    def grad(old, beta):
        logps = b["logps"].clone().requires_grad_()
        disco(logps, old, rewards, b["mask"], group_size=3, beta=beta, delta=1e-4, kl_type="kl").loss.backward()
        return logps.grad

    inside = b["logps"] + 0.5e-4  # D = 0.5e-4 < δ
    assert_close(grad(inside, 1e3), grad(inside, 0.0), "no penalty gradient inside the trust region", atol=1e-12)
    edge = b["logps"] + 2e-4  # D = δ + 1e-4 exactly
    penalty_grad = grad(edge, 1e3) - grad(edge, 0.0)
    expected = torch.where(b["mask"], torch.full_like(edge, -0.1 / n_tokens), torch.zeros_like(edge))
    assert_close(penalty_grad, expected, "0.1·∇D", atol=1e-9, rtol=1e-6)

    logps = b["logps"].clone().requires_grad_()
    d = ((edge - logps) * b["mask"]).sum() / n_tokens
    (torch.clamp(1e3 * (d - 1e-4), min=0).detach() * d).backward()  # the official code's form
    assert_close(penalty_grad, logps.grad, "code form sg(β[D−δ]+)·D", atol=1e-9, rtol=1e-6)


def test_disco_rejects_non_binary_rewards():
    b = token_batch(3, seed=6)
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        disco(b["logps"], b["old_logps"], torch.tensor([1.0, 0.5, 0.0]), b["mask"], group_size=3)


# ----------------------------------------------------------------------------------------------------------
# RPG
# ----------------------------------------------------------------------------------------------------------


def rpg_twin(logps, old_logps, advantages, mask, ref_logps=None, kl="rkl", style="reinforce", beta=1e-4,
             clip_low=0.2, clip_high=0.28, clip_c=10.0, loss_agg_mode="token-mean", max_len=None):  # fmt: skip
    ref = old_logps if ref_logps is None else ref_logps
    w = torch.exp(logps - old_logps)
    r = torch.exp(ref - old_logps)
    l = logps - ref
    A = advantages[:, None].expand_as(w)
    if style == "differentiable":
        table = {"rkl": w * l, "urkl": w * l - w + r, "fkl": -r * l, "ufkl": w - r * l - r}
        per = twin_ppo_clip(w, A, clip_low, clip_high, clip_c) + beta * table[kl]
    else:
        with torch.no_grad():
            wc = torch.clamp(w, 1 - clip_low, 1 + clip_high)
            lc = torch.log(wc) + old_logps - ref
            kappa = {"rkl": -wc * (lc + 1), "urkl": -wc * lc, "fkl": r, "ufkl": r - wc}[kl]
            weight = torch.zeros_like(w)
            for i in range(w.shape[0]):
                for t in range(w.shape[1]):
                    wt = w[i, t].item()
                    passes = wt < 1 + clip_high if A[i, t] > 0 else (1 - clip_low <= wt < clip_c)
                    if passes:
                        weight[i, t] = w[i, t] * A[i, t] + beta * kappa[i, t]
        per = -weight * logps
    m = mask.to(F64)
    if loss_agg_mode == "token-mean":
        return twin_token_mean(per, mask)
    if loss_agg_mode == "seq-mean-token-mean":
        return torch.stack([(per[i] * m[i]).sum() / m[i].sum() for i in range(per.shape[0])]).mean()
    if loss_agg_mode == "seq-mean-token-sum":
        return torch.stack([(per[i] * m[i]).sum() for i in range(per.shape[0])]).mean()
    return torch.stack([(per[i] * m[i]).sum() / max_len for i in range(per.shape[0])]).mean()


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
@pytest.mark.parametrize("kl", ["rkl", "urkl", "fkl", "ufkl"])
def test_rpg_matches_twin(kl, style):
    b = token_batch(6, seed=7, scale=0.4)  # ratios spread over both sides of every clip boundary
    b["advantages"] = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5, 0.3], dtype=F64)
    run_against_twin(
        rpg, rpg_twin, b, diff=("logps",), const=("old_logps", "ref_logps"), kl=kl, style=style, beta=0.3,
        clip_c=1.5,
    )  # fmt: skip


@pytest.mark.parametrize("mode", AGG_MODES)
def test_rpg_iterative_reference_and_aggregation_modes_match_twin(mode):
    b = token_batch(6, seed=8, scale=0.4)
    b.pop("ref_logps")  # reference = old policy (the paper's iterative reference)
    b["advantages"] = torch.tensor([1.0, -0.5, 0.2, 2.0, -1.5, 0.3], dtype=F64)
    run_against_twin(
        rpg, rpg_twin, b, diff=("logps",), const=("old_logps",), kl="ufkl", style="reinforce", beta=0.3,
        loss_agg_mode=mode, max_len=11,
    )  # fmt: skip


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
@pytest.mark.parametrize("kl,closed_form", [
    ("rkl", lambda lp, ref: (lp.exp() * (lp - ref)).sum()),
    ("urkl", lambda lp, ref: (lp.exp() * (lp - ref)).sum() + ref.exp().sum() - lp.exp().sum()),
    ("fkl", lambda lp, ref: (ref.exp() * (ref - lp)).sum()),
    ("ufkl", lambda lp, ref: (ref.exp() * (ref - lp)).sum() + lp.exp().sum() - ref.exp().sum()),
])  # fmt: skip
def test_rpg_exact_expected_gradient_is_beta_grad_kl(kl, closed_form, style):
    """On a V = 5 categorical with π_θ ≠ π_old ≠ π_ref and no active clip, E_{π_old}[∇ loss] = β·∇D exactly when A = 0
    (RPG, arXiv:2505.17508, Tables 1–2; e.g. Σ π_old·w(log w + 1)·∇log π = ∇KL(π‖π_old) for rkl with the iterative
    reference)."""
    g = torch.Generator().manual_seed(9)
    theta = torch.randn(5, dtype=F64, generator=g).requires_grad_()
    old = torch.log_softmax(torch.randn(5, dtype=F64, generator=g), -1)
    for ref in (old, torch.log_softmax(torch.randn(5, dtype=F64, generator=g), -1)):
        lp = torch.log_softmax(theta, -1)
        beta = 0.7
        no_clip = dict(clip_low=1.0, clip_high=1e9, clip_c=1e9)

        def loss(a, lp=lp, ref=ref, beta=beta, no_clip=no_clip):
            return rpg(lp[a].view(1, 1), old[a].view(1, 1), torch.zeros(1, dtype=F64), ONE, ref_logps=ref[a].view(1, 1),
                       kl=kl, style=style, beta=beta, **no_clip).loss  # fmt: skip

        got = _expected_grad(loss, theta, old.exp())
        (want,) = torch.autograd.grad(beta * closed_form(torch.log_softmax(theta, -1), ref), theta)
        assert_close(got, want, f"E[∇ rpg {kl}/{style}] = β∇D", atol=1e-12, rtol=1e-10)


def test_rpg_styles_share_the_expected_gradient_with_advantages():
    """Fully differentiable and REINFORCE surrogates: equal expected gradients (A ≠ 0, no clip active)."""
    g = torch.Generator().manual_seed(10)
    theta = torch.randn(5, dtype=F64, generator=g).requires_grad_()
    old = torch.log_softmax(torch.randn(5, dtype=F64, generator=g), -1)
    adv = torch.randn(5, dtype=F64, generator=g)
    no_clip = dict(clip_low=1.0, clip_high=1e9, clip_c=1e9)
    grads = []
    for style in ("differentiable", "reinforce"):
        lp = torch.log_softmax(theta, -1)

        def loss(a, style=style, lp=lp):
            return rpg(lp[a].view(1, 1), old[a].view(1, 1), adv[a].view(1), ONE, kl="rkl", style=style, beta=0.4,
                       **no_clip).loss  # fmt: skip

        grads.append(_expected_grad(loss, theta, old.exp()))
    assert_close(grads[0], grads[1], "differentiable vs REINFORCE expected gradient", atol=1e-12, rtol=1e-10)


def test_rpg_reinforce_clip_gates():
    """RPG-style dual clip: A > 0 passes only w < 1+ε_high; A < 0 passes only 1−ε_low ≤ w < c."""
    old = torch.zeros(6, 1, dtype=F64)
    w = torch.tensor([1.1, 1.4, 0.9, 0.7, 2.0, 12.0], dtype=F64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -1.0], dtype=F64)
    logps = w.log().view(6, 1).requires_grad_()
    rpg(logps, old, adv, torch.ones(6, 1, dtype=torch.bool), style="reinforce", beta=1e-4).loss.backward()
    passes = (logps.grad[:, 0] != 0).tolist()
    assert passes == [True, False, True, False, True, False]


def _rpg_bandit_policy(ref: torch.Tensor, reward: torch.Tensor, *, kl: str, style: str, beta: float,
                       steps: int) -> torch.Tensor:
    """π after ``steps`` of gradient descent on the exact on-policy expectation of the RPG loss (fixed reference)."""
    theta = torch.zeros(ref.shape[0], dtype=F64, requires_grad=True)
    for _ in range(steps):
        lp = torch.log_softmax(theta, -1)
        old = lp.detach()
        adv = reward - (old.exp() * reward).sum()

        def loss(a, lp=lp, old=old, adv=adv):
            return rpg(lp[a].view(1, 1), old[a].view(1, 1), adv[a].view(1), ONE, ref_logps=ref[a].view(1, 1),
                       kl=kl, style=style, beta=beta).loss  # fmt: skip

        grad = _expected_grad(loss, theta, old.exp())
        with torch.no_grad():
            theta -= 3.0 * grad
    return torch.softmax(theta.detach(), -1)


@pytest.mark.parametrize("style", ["reinforce", "differentiable"])
def test_rpg_reverse_kl_bandit_converges_to_tilted_reference(style):
    """Gradient descent on the exact on-policy expectation of the RPG reverse-KL loss, fixed reference: the fixed point
    is π* ∝ π_ref·exp(R/β) (the reverse-KL-regularized optimum)."""
    ref, reward, target = bandit(seed=0)
    dist = tv(_rpg_bandit_policy(ref, reward, kl="rkl", style=style, beta=0.5, steps=60), target)
    print(f"RPG reverse-KL ({style}) bandit: TV(π, π*) = {dist:.2e}")
    assert dist < 0.02


def test_rpg_forward_kl_bandit_fixed_point_is_mass_covering():
    """The forward-KL variant's fixed point is π*(a) = β·π_ref(a)/(λ − R(a)), not the exponential tilt."""
    ref, reward, tilt = bandit(seed=0)
    beta = 0.5
    lo, hi = reward.max().item() + 1e-12, reward.max().item() + 10.0
    for _ in range(200):  # normalizer λ: Σ β π_ref/(λ − R) = 1
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if (beta * ref.exp() / (lam - reward)).sum() > 1 else (lo, lam)
    target = beta * ref.exp() / (lam - reward)
    p = _rpg_bandit_policy(ref, reward, kl="fkl", style="reinforce", beta=beta, steps=120)
    print(f"RPG forward-KL bandit: TV(π, β·π_ref/(λ−R)) = {tv(p, target):.2e}, TV(π, tilt) = {tv(p, tilt):.2e}")
    assert tv(p, target) < 0.02 and tv(target, tilt) > 0.01


# ----------------------------------------------------------------------------------------------------------
# KDRL
# ----------------------------------------------------------------------------------------------------------


def kdrl_twin(logps, old_logps, teacher_logps, rewards, mask, group_size, beta, kd_on_correct):
    adv = grpo_adv_twin(rewards, group_size, 1e-6)
    ratio = torch.exp(logps - old_logps)
    pg = twin_ppo_clip(ratio, adv[:, None].expand_as(ratio), 0.2, 0.2)
    kd = 0.5 * (logps - teacher_logps) ** 2
    gate = torch.tensor([1.0 if kd_on_correct or r < 1.0 else 0.0 for r in rewards.tolist()], dtype=F64)
    return twin_token_mean(pg + beta * kd * gate[:, None], mask)


@pytest.mark.parametrize("kd_on_correct", [False, True])
def test_kdrl_matches_twin(kd_on_correct):
    b = token_batch(6, seed=16)
    b["teacher_logps"] = b.pop("ref_logps")
    b["rewards"] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=F64)
    run_against_twin(
        kdrl, kdrl_twin, b, diff=("logps",), const=("old_logps", "teacher_logps"), group_size=3, beta=0.4,
        kd_on_correct=kd_on_correct,
    )  # fmt: skip


def test_kdrl_exact_gradients_and_reward_mask():
    """Exact enumeration with A = 0: the k2 KD term's expected gradient is β∇KL(π_θ‖π_T); k3's is β∇KL(π_T‖π_θ).
    A group in which every response is rewarded receives zero KD gradient."""
    g = torch.Generator().manual_seed(17)
    theta = torch.randn(5, dtype=F64, generator=g).requires_grad_()
    teacher_logits = torch.randn(5, dtype=F64, generator=g)
    teacher = torch.log_softmax(teacher_logits, -1)
    for estimator, closed in (("k2", K.reverse_kl), ("k3", K.forward_kl)):
        lp = torch.log_softmax(theta, -1)

        def loss(a, estimator=estimator, lp=lp):
            x = lp[a].view(1, 1)
            return kdrl(x, x.detach(), teacher[a].view(1, 1), torch.zeros(1, dtype=F64), ONE, group_size=1, beta=0.3,
                        estimator=estimator).loss  # fmt: skip

        got = _expected_grad(loss, theta, lp.detach().exp())
        (want,) = torch.autograd.grad(0.3 * closed(theta, teacher_logits), theta)
        assert_close(got, want, f"E[∇ kd {estimator}]", atol=1e-12, rtol=1e-10)

    b = token_batch(3, seed=18)
    grads = []
    for beta in (0.5, 0.0):
        logps = b["logps"].clone().requires_grad_()
        kdrl(logps, b["old_logps"], b["ref_logps"], torch.ones(3, dtype=F64), b["mask"], group_size=3,
             beta=beta).loss.backward()  # fmt: skip
        grads.append(logps.grad)
    assert_close(grads[0], grads[1], "all-correct group: no KD gradient", atol=0.0, rtol=0.0)


# ----------------------------------------------------------------------------------------------------------
# APO
# ----------------------------------------------------------------------------------------------------------


def apo_shaping_twin(rewards, lengths, G):
    adv, w_kl = [], []
    for q in range(len(rewards) // G):
        r = rewards[q * G : (q + 1) * G]
        n = lengths[q * G : (q + 1) * G]
        correct = [x >= 1 for x in r]
        d = 1 - sum(correct) / G
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        mean_len = sum(n[i] for i in range(G) if correct[i]) / max(sum(correct), 1)
        for i in range(G):
            a = (r[i] - mean) / (std + 1e-9)
            gap = n[i] - mean_len
            if not correct[i] and any(correct) and gap > 0:
                a *= 1 + (1 - 1.00001 ** (-gap))
            adv.append(a)
            w_kl.append(1 - math.exp(-math.e * (1 - d)) if a > 0 and 0 < d < 1 else 1.0)
    return adv, w_kl


def apo_twin(logps, old_logps, ref_logps, rewards, mask, group_size, beta, loss_agg_mode="token-mean"):
    adv, w_kl = apo_shaping_twin(rewards.tolist(), mask.sum(-1).tolist(), group_size)
    ratio = torch.exp(logps - old_logps)
    pg = twin_ppo_clip(ratio, torch.tensor(adv, dtype=F64)[:, None].expand_as(ratio), 0.2, 0.2)
    log_r = ref_logps - logps
    k3 = torch.exp(log_r) - 1 - log_r
    if loss_agg_mode == "token-mean":
        pg_loss = twin_token_mean(pg, mask)
    else:
        pg_loss = torch.stack([pg[i][mask[i]].mean() for i in range(pg.shape[0])]).mean()
    kl = torch.stack([k3[i][mask[i]].mean() * w_kl[i] for i in range(pg.shape[0])]).mean()
    return pg_loss + beta * kl


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_apo_matches_twin(loss_agg_mode):
    b = token_batch(8, seed=19)
    b["rewards"] = torch.tensor([1.2, 0.0, 0.3, 1.0, 0.0, 0.0, 1.0, 0.2], dtype=F64)  # G = 4
    run_against_twin(apo, apo_twin, b, diff=("logps",), const=("old_logps", "ref_logps"), group_size=4, beta=0.5,
                     loss_agg_mode=loss_agg_mode)


def test_apo_default_aggregation_is_the_official_token_mean():
    """The official code (View-R1 ``PolicyLoss(eps_clip)``, ``token_level_loss=True``) averages the clipped loss over
    every valid token of the micro-batch. Worked by hand on one group of G = 2 with ragged rows:

    * rewards [1, 0]: mean ½, unbiased std √½, so Â = ±½/(√½ + 1e-9) = ±κ, κ = 0.70710678; difficulty d = ½, so the
      positive row's DADS weight is w = 1 − e^{−e/2} = 0.743119 and the negative row keeps 1; row 0 has 3 valid tokens,
      row 1 has 1 (STCR is off: the wrong answer is shorter than the right one);
    * ρ = 1 everywhere (``old_logps = logps``), so L^clip = −Â_i on every valid token;
    * ``ref_logps = logps − log 2`` on row 0 (ℓ = log 2: k3 = e^{−ℓ} − 1 + ℓ = log 2 − ½ = 0.193147, ∂k3/∂log π =
      1 − e^{−ℓ} = ½) and ``= logps`` on row 1 (k3 = 0, ∂k3 = 0); β = 0.5.

    token-mean (the default):      pg = (3·(−κ) + κ)/4 = −κ/2 = −0.353553,
    seq-mean-token-mean:           pg = (−κ + κ)/2 = 0;
    KL term (same for both):       β·(w·(log 2 − ½) + 0)/2 = 0.035883   [per-sequence token mean, then batch mean]
    total (token-mean):            −0.353553 + 0.035883 = −0.317671
    ∂loss/∂log π, row 0 tokens:    −κ/4 + β·w/(2·3)·½ = −0.145813   (seq-mean-token-mean: −κ/6 + 0.030963 = −0.086888)
    ∂loss/∂log π, row 1 token:     +κ/4 = 0.176777                    (seq-mean-token-mean: +κ/2 = 0.353553)
    """
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.7, 0.0, 0.0]], dtype=F64)
    ref = logps - torch.tensor([[math.log(2.0)] * 3, [0.0] * 3], dtype=F64)
    rewards = torch.tensor([1.0, 0.0], dtype=F64)
    kappa = 0.5 / (math.sqrt(0.5) + 1e-9)
    w = 1.0 - math.exp(-math.e / 2)
    kl_term = 0.5 * (w * (math.log(2.0) - 0.5)) / 2
    kl_grad = 0.5 * w / (2 * 3) * 0.5
    expected = {
        "token-mean": (-kappa / 2 + kl_term, [[-kappa / 4 + kl_grad] * 3, [kappa / 4, 0.0, 0.0]]),
        "seq-mean-token-mean": (0.0 + kl_term, [[-kappa / 6 + kl_grad] * 3, [kappa / 2, 0.0, 0.0]]),
    }
    assert abs(-kappa / 2 + kl_term - (-0.317671)) < 1e-6  # the numbers of the docstring
    for mode, kwargs in (("token-mean", {}), ("token-mean", {"loss_agg_mode": "token-mean"}),
                         ("seq-mean-token-mean", {"loss_agg_mode": "seq-mean-token-mean"})):
        x = logps.clone().requires_grad_()
        out = apo(x, logps, ref, rewards, mask, group_size=2, beta=0.5, **kwargs)
        out.loss.backward()
        value, grad = expected[mode]
        assert_close(out.loss, torch.tensor(value, dtype=F64), f"apo loss ({mode}, {kwargs})", atol=1e-12, rtol=0)
        assert_close(x.grad, torch.tensor(grad, dtype=F64), f"apo grad ({mode}, {kwargs})", atol=1e-12, rtol=0)


def test_apo_shaping_oracles():
    """DADS: d = 0.5 → w_KL ≈ 0.743, d = 0.875 → 0.288 (positives only). STCR: Δ = 10000 tokens → ×1.095; negatives
    in an all-wrong group unchanged."""
    rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0] + [1, 0, 0, 0, 0, 0, 0, 0] + [0] * 8, dtype=F64)
    lengths = torch.tensor([100] * 4 + [100, 10100, 50, 100] + [200] + [200] * 7 + [9999] * 8, dtype=F64)
    s = apo_shaping(rewards, lengths, group_size=8)
    assert s.kl_weights[0].item() == pytest.approx(1 - math.exp(-math.e * 0.5), abs=1e-12)
    assert s.kl_weights[0].item() == pytest.approx(0.7432, abs=1e-4)
    assert s.kl_weights[8].item() == pytest.approx(0.2881, abs=1e-4)
    assert s.kl_weights[4].item() == 1.0 and s.kl_weights[9].item() == 1.0  # negatives keep the full KL
    assert s.length_weights[5].item() == pytest.approx(1.0952, abs=1e-4)  # Δ = 10100 − 100 = 10000
    assert s.length_weights[[4, 6, 7]].tolist() == [1.0, 1.0, 1.0]  # Δ ≤ 0
    assert (s.length_weights[16:] == 1).all() and (s.advantages[16:] == 0).all()  # all-wrong group
    assert s.difficulty[[0, 8, 16]].tolist() == [0.5, 0.875, 1.0]


def test_all_equal_group_rewards_give_zero_advantage():
    """A group whose rewards are all equal carries no signal, so APO's and KDRL's advantages are exactly 0 (both
    normalize with tether.losses.policy.advantages.grpo_advantages). Eight fp32 rewards of 1.2 have a computed mean
    1.2e-7 off, which (R − mean)/(std + 1e-9) would blow up to advantages of 0.93."""
    rewards = torch.full((8,), 1.2)
    assert (apo_shaping(rewards, torch.full((8,), 10.0), group_size=8).advantages == 0).all()
    logps = torch.zeros(8, 3, requires_grad=True)
    mask = torch.ones(8, 3, dtype=torch.bool)
    kdrl(logps, logps.detach(), logps.detach(), torch.full((8,), 0.7), mask, group_size=8, beta=0.0).loss.backward()
    assert (logps.grad == 0).all()
