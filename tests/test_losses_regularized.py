"""Regularized online-RL objectives against plain float64 twins, hand-worked oracles and exact bandit optima.

Conventions of this file:

* **Twins.** Every objective of ``tether.losses.regularized`` is re-implemented here, in float64, straight from the
  spec formula (python loops over groups/positions, explicit ``exp``/``log``, no shared helpers). The library runs in
  fp32 on the same values (rounded once to fp32, then both sides see identical numbers), on odd shapes (B = 6 or 9,
  T = 7, V = 11) with ragged masks (random prompt offset and length per row); a gradient of 0.73 (≠ 1) is pushed
  from above; loss and gradients w.r.t. every differentiable input must agree to ``atol = rtol = 1e-5``
  (mismatching indices are printed).
* **Stop-gradients.** Inputs the method treats as constants (old/ref/teacher log-probs, old logits) are passed with
  ``requires_grad=True`` and must come back with no (or an all-zero) gradient.
* **Exact expectations.** Gradient identities are checked by enumerating a small categorical (V = 5 or K = 6 arms)
  and weighting each arm by its sampling probability, in float64 — no sampling noise.
* **Bandits.** RPG (reverse KL, both styles) and GVPO are run by gradient descent on the exact expected objective
  and must land on π* ∝ π_ref·exp(r/β) within 2% total variation (the TV is printed).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tether import kl as K
from tether.losses.regularized import (
    AGG_MODES,
    EMAReference,
    PolicyLossOutput,
    ReferenceResetSchedule,
    apo,
    apo_shaping,
    archer,
    critical_token_kl,
    difficulty_filter,
    disco,
    ema_update_,
    grpo_care_bonus,
    gvpo,
    kdrl,
    rpg,
    troll,
    troll_project,
)

ATOL = RTOL = 1e-5  # fp32 library vs float64 twin
UPSTREAM = 0.73  # gradient pushed into the scalar loss from above
T = 7
V = 11
F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, atol=ATOL, rtol=RTOL) -> None:
    """``|a − e| ≤ atol + rtol·|e|`` elementwise, listing the offending indices and values on failure."""
    actual = actual.detach().to(F64).reshape(expected.shape)
    expected = expected.detach().to(F64)
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    if bad.any():
        idx = bad.nonzero().tolist()
        rows = [f"  {i}: got {actual[tuple(i)].item():.10g} want {expected[tuple(i)].item():.10g}" for i in idx[:20]]
        raise AssertionError(f"{name}: {len(idx)} mismatching entries (atol={atol}, rtol={rtol}):\n" + "\n".join(rows))


def assert_no_grad(x: torch.Tensor, name: str) -> None:
    assert x.grad is None or bool((x.grad == 0).all()), f"{name} must be stop-gradient, got grad {x.grad}"


def ragged_mask(B: int, g: torch.Generator) -> torch.Tensor:
    """Rows with a random prompt offset (masked prefix) and a random response length ≥ 1."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        length = int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[i, start : start + length] = True
    return mask


def token_batch(B: int, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """float64 per-token log-probs (policy, old, ref) and a ragged mask; log-ratios of order ``scale``."""
    g = torch.Generator().manual_seed(seed)
    logps = -0.2 - 2.0 * torch.rand(B, T, generator=g, dtype=F64)
    old = logps + scale * torch.randn(B, T, generator=g, dtype=F64)
    ref = logps + scale * torch.randn(B, T, generator=g, dtype=F64)
    return {"logps": logps, "old_logps": old, "ref_logps": ref, "mask": ragged_mask(B, g)}


def run_against_twin(lib_fn, twin_fn, tensors: dict, diff: tuple[str, ...], const: tuple[str, ...] = (), **kw):
    """Run ``lib_fn`` in fp32 and ``twin_fn`` in float64 on identical values; compare loss and gradients.

    ``diff``: inputs whose gradients are compared; ``const``: inputs that must receive no gradient.
    Returns the library output.
    """
    lib_in, twin_in = {}, {}
    for name, value in tensors.items():
        if value.is_floating_point():
            v32 = value.to(torch.float32)
            lib_in[name] = v32.clone().requires_grad_(name in diff or name in const)
            twin_in[name] = v32.to(F64).requires_grad_(name in diff)
        else:
            lib_in[name] = twin_in[name] = value
    out = lib_fn(**lib_in, **kw)
    assert isinstance(out, PolicyLossOutput) and out.loss.dim() == 0
    assert all(isinstance(v, float) for v in out.metrics.values()), out.metrics
    (out.loss * UPSTREAM).backward()
    expected = twin_fn(**twin_in, **kw)
    (expected * UPSTREAM).backward()
    assert_close(out.loss, expected, "loss")
    for name in diff:
        assert_close(lib_in[name].grad, twin_in[name].grad, f"d loss / d {name}")
    for name in const:
        assert_no_grad(lib_in[name], name)
    return out


def twin_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total, count = x.new_zeros(()), 0
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t]:
                total = total + x[i, t]
                count += 1
    return total / max(count, 1)


def twin_ppo_clip(ratio, adv, eps_low, eps_high, clip_c=None):
    """−min(ρA, clip(ρ)A), and for A < 0 at most −c·A (verl dual clip), elementwise by the book."""
    lo = torch.as_tensor(1 - eps_low, dtype=F64)
    hi = torch.as_tensor(1 + eps_high, dtype=F64)
    loss = -torch.minimum(ratio * adv, torch.minimum(torch.maximum(ratio, lo), hi) * adv)
    if clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -clip_c * adv), loss)
    return loss


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


ONE = torch.ones(1, 1, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------
# §8 GVPO
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
# §9 DisCO
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
# §10 RPG
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


def _expected_grad(loss_fn, theta, p_old):
    """Σ_a π_old(a)·∇_θ loss(a) for the one-token responses a = 0..V−1."""
    total = sum(p_old[a] * loss_fn(a) for a in range(theta.shape[0]))
    return torch.autograd.grad(total, theta)[0]


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
@pytest.mark.parametrize("kl,closed_form", [
    ("rkl", lambda lp, ref: (lp.exp() * (lp - ref)).sum()),
    ("urkl", lambda lp, ref: (lp.exp() * (lp - ref)).sum() + ref.exp().sum() - lp.exp().sum()),
    ("fkl", lambda lp, ref: (ref.exp() * (ref - lp)).sum()),
    ("ufkl", lambda lp, ref: (ref.exp() * (ref - lp)).sum() + lp.exp().sum() - ref.exp().sum()),
])  # fmt: skip
def test_rpg_exact_expected_gradient_is_beta_grad_kl(kl, closed_form, style):
    """On a V = 5 categorical with π_θ ≠ π_old ≠ π_ref and no active clip, E_{π_old}[∇ loss] = β·∇D exactly when A = 0
    (spec §10 oracle; e.g. Σ π_old·w(log w + 1)·∇log π = ∇KL(π‖π_old) for rkl with the iterative reference)."""
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


@pytest.mark.parametrize("style", ["reinforce", "differentiable"])
def test_rpg_reverse_kl_bandit_converges_to_tilted_reference(style):
    """Gradient descent on the exact on-policy expectation of the RPG reverse-KL loss, fixed reference: the fixed point
    is π* ∝ π_ref·exp(R/β) (the reverse-KL-regularized optimum)."""
    ref, reward, target = bandit(seed=0)
    beta, K_arms = 0.5, ref.shape[0]
    theta = torch.zeros(K_arms, dtype=F64, requires_grad=True)
    for _ in range(60):
        lp = torch.log_softmax(theta, -1)
        old = lp.detach()
        adv = reward - (old.exp() * reward).sum()

        def loss(a, lp=lp, old=old, adv=adv):
            return rpg(lp[a].view(1, 1), old[a].view(1, 1), adv[a].view(1), ONE, ref_logps=ref[a].view(1, 1),
                       kl="rkl", style=style, beta=beta).loss  # fmt: skip

        grad = _expected_grad(loss, theta, old.exp())
        with torch.no_grad():
            theta -= 3.0 * grad
    dist = tv(torch.softmax(theta.detach(), -1), target)
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
    theta = torch.zeros(ref.shape[0], dtype=F64, requires_grad=True)
    for _ in range(120):
        lp = torch.log_softmax(theta, -1)
        old = lp.detach()
        adv = reward - (old.exp() * reward).sum()

        def loss(a, lp=lp, old=old, adv=adv):
            return rpg(lp[a].view(1, 1), old[a].view(1, 1), adv[a].view(1), ONE, ref_logps=ref[a].view(1, 1),
                       kl="fkl", style="reinforce", beta=beta).loss  # fmt: skip

        grad = _expected_grad(loss, theta, old.exp())
        with torch.no_grad():
            theta -= 3.0 * grad
    p = torch.softmax(theta.detach(), -1)
    print(f"RPG forward-KL bandit: TV(π, β·π_ref/(λ−R)) = {tv(p, target):.2e}, TV(π, tilt) = {tv(p, tilt):.2e}")
    assert tv(p, target) < 0.02 and tv(target, tilt) > 0.01


# ----------------------------------------------------------------------------------------------------------
# §11 TROLL
# ----------------------------------------------------------------------------------------------------------


def project_twin(a_logits, b_logits, eps):
    """Full-support projection by bisection on η itself; gradient through the IFT with autograd's ∂g/∂η."""
    a = torch.log_softmax(a_logits, -1)
    b = torch.log_softmax(b_logits, -1)

    def path(eta, a):
        return torch.log_softmax((a + eta * b) / (1 + eta), -1)

    def kl(eta, a):
        lp = path(eta, a)
        return (lp.exp() * (lp - b)).sum()

    if kl(0.0, a.detach()) <= eps:
        return a
    lo, hi = 0.0, 1.0
    while kl(hi, a.detach()) > eps:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl(mid, a.detach()) > eps else (lo, mid)
    eta_star = torch.tensor(hi, dtype=F64, requires_grad=True)
    (dg_deta,) = torch.autograd.grad(kl(eta_star, a.detach()), eta_star)
    g = kl(hi, a)
    eta = hi - (g - g.detach()) / dg_deta
    return path(eta, a)


def troll_twin(logits, old_logits, tokens, advantages, mask, eps, alpha, max_support, support_mass):
    per = logits.new_zeros(mask.shape)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            proj = project_twin(logits[i, t], old_logits[i, t], eps)
            old = torch.log_softmax(old_logits[i, t], -1)
            y = tokens[i, t]
            ratio = torch.exp(proj[y] - old[y])
            target = proj.detach()
            regression = (target.exp() * (target - torch.log_softmax(logits[i, t], -1))).sum()
            per[i, t] = -ratio * advantages[i] + alpha * regression
    return twin_token_mean(per, mask)


def test_troll_matches_twin_full_support():
    g = torch.Generator().manual_seed(11)
    B = 3
    b = {
        "logits": 1.5 * torch.randn(B, T, V, generator=g, dtype=F64),
        "old_logits": 1.5 * torch.randn(B, T, V, generator=g, dtype=F64),
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "advantages": torch.tensor([1.0, -0.7, 0.4], dtype=F64),
        "mask": ragged_mask(B, g),
    }
    b["old_logits"][0] = b["logits"][0] + 0.05 * torch.randn(T, V, generator=g, dtype=F64)  # inside: identity rows
    out = run_against_twin(
        troll, troll_twin, b, diff=("logits",), const=("old_logits",), eps=0.05, alpha=0.5, max_support=None,
        support_mass=None,
    )  # fmt: skip
    assert 0.0 < out.metrics["projected_frac"] < 1.0


def test_troll_projection_oracles():
    """Inside the ball: identity (η = 0). Outside: KL(p̃‖p_old) = ε and p̃ on the log-linear path between p_θ and p_old.
    Finite differences of a scalar function of p̃ match autograd (full and sparse support)."""
    g = torch.Generator().manual_seed(12)
    logits = 2.0 * torch.randn(4, 5, V, generator=g, dtype=F64)
    old = 2.0 * torch.randn(4, 5, V, generator=g, dtype=F64)
    old[0] = logits[0] + 0.02 * torch.randn(5, V, generator=g, dtype=F64)
    p = troll_project(logits, old, eps=0.05, max_support=None, support_mass=None)
    a, b = torch.log_softmax(logits, -1), torch.log_softmax(old, -1)
    inside = K.reverse_kl(logits, old) <= 0.05
    assert inside[0].all() and (~inside[1:]).any()
    assert_close(p.logprobs[inside], a[inside], "identity inside the trust region", atol=1e-12)
    assert (p.eta[inside] == 0).all()
    assert_close(K.reverse_kl(p.logprobs, old)[~inside], torch.full(((~inside).sum(),), 0.05, dtype=F64), "KL = ε",
                 atol=1e-10)  # fmt: skip
    t = (p.eta / (1 + p.eta))[..., None]
    residual = p.logprobs - ((1 - t) * a + t * b)  # on the path ⇔ residual is a per-position constant (log Z)
    assert_close(residual, residual[..., :1].expand_as(residual), "log-linear path", atol=1e-10)

    weights = torch.randn(2, 2, V, generator=g, dtype=F64)
    old_small = old[1:3, :2]
    for support in ({"max_support": None, "support_mass": None}, {"max_support": 3, "support_mass": 0.9}):

        def fn(x, support=support):
            return (troll_project(x, old_small, eps=0.05, **support).logprobs * weights).sum()

        assert torch.autograd.gradcheck(fn, (logits[1:3, :2].clone().requires_grad_(),), fast_mode=True)


def test_troll_sparse_support_lumps_the_tail():
    """Support = top tokens of p_old (≤ max_support, mass ≥ support_mass). The tail is one atom for the projection:
    the lumped KL is ε, tokens outside S keep p_θ's proportions, and a sampled tail token still gets a gradient."""
    g = torch.Generator().manual_seed(13)
    logits = 2.0 * torch.randn(2, 3, V, generator=g, dtype=F64)
    old = 2.0 * torch.randn(2, 3, V, generator=g, dtype=F64)
    p = troll_project(logits, old, eps=0.02, max_support=3, support_mass=0.999)
    assert (p.support.sum(-1) <= 3).all()
    top3 = torch.zeros_like(p.support).scatter(-1, old.topk(3, -1).indices, True)
    assert not (p.support & ~top3).any()  # support ⊆ the 3 most probable old tokens
    assert_close(p.logprobs.exp().sum(-1), torch.ones(2, 3, dtype=F64), "normalized", atol=1e-12)
    a, b = torch.log_softmax(logits, -1), torch.log_softmax(old, -1)
    for idx in [(0, 0), (1, 2)]:
        s = p.support[idx]
        tail_shift = (p.logprobs[idx] - a[idx])[~s]
        assert_close(tail_shift, tail_shift[:1].expand_as(tail_shift), "tail keeps p_θ proportions", atol=1e-12)
        lumped = lambda x, s=s: torch.cat([x[s], torch.logsumexp(x[~s], 0, keepdim=True)])  # noqa: E731
        lp, lb = lumped(p.logprobs[idx]), lumped(b[idx])
        if p.eta[idx] > 0:
            assert abs((lp.exp() * (lp - lb)).sum().item() - 0.02) < 1e-10
    logits_req = logits.clone().requires_grad_()
    tail_token = (~p.support[0, 0]).nonzero()[0, 0]
    troll_project(logits_req, old, eps=0.02, max_support=3, support_mass=0.999).logprobs[0, 0, tail_token].backward()
    assert torch.isfinite(logits_req.grad).all() and logits_req.grad[0, 0].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# §12 Archer
# ----------------------------------------------------------------------------------------------------------


def archer_twin(logps, old_logps, ref_logps, advantages, mask, logits, quantile, clip_low_entropy,
                clip_high_entropy, clip_c, kl_coef_low_entropy, kl_coef_high_entropy):  # fmt: skip
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        ent = -(probs * torch.log_softmax(logits, -1)).sum(-1)
    high = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        vals = sorted(ent[i][mask[i]].tolist())
        pos = quantile * (len(vals) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(vals) - 1)
        q = vals[lo] + (pos - lo) * (vals[hi] - vals[lo])
        for t in range(mask.shape[1]):
            high[i, t] = bool(mask[i, t]) and ent[i, t].item() > q
    low = mask & ~high
    eps = torch.where(high, clip_high_entropy, clip_low_entropy).to(F64)
    ratio = torch.exp(logps - old_logps)
    pg = twin_ppo_clip(ratio, advantages[:, None].expand_as(ratio), eps, eps, clip_c)
    log_r = ref_logps - logps
    k3 = torch.exp(log_r) - 1 - log_r
    return (twin_token_mean(pg, mask) + kl_coef_low_entropy * twin_token_mean(k3, low)
            + kl_coef_high_entropy * twin_token_mean(k3, high))  # fmt: skip


def test_archer_matches_twin():
    b = token_batch(6, seed=14, scale=0.35)
    g = torch.Generator().manual_seed(14)
    b["logits"] = 2.0 * torch.randn(6, T, V, generator=g, dtype=F64)
    b["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.2, 1.5, -2.0], dtype=F64)
    run_against_twin(
        archer, archer_twin, b, diff=("logps",), const=("old_logps", "ref_logps", "logits"), quantile=0.8,
        clip_low_entropy=0.2, clip_high_entropy=0.5, clip_c=3.0, kl_coef_low_entropy=0.3, kl_coef_high_entropy=0.1,
    )  # fmt: skip


def _logits_with_entropy(targets: list[float], vocab: int = 8) -> torch.Tensor:
    """One peaked token plus a uniform rest, with the peak solved by bisection to hit each target entropy."""
    rows = []
    for h in targets:
        lo, hi = 1.0 / vocab, 1.0
        for _ in range(100):
            p = 0.5 * (lo + hi)
            q = (1 - p) / (vocab - 1)
            ent = -(p * math.log(p) + (vocab - 1) * q * math.log(q)) if q > 0 else 0.0
            lo, hi = (p, hi) if ent > h else (lo, p)
        rows.append([math.log(p)] + [math.log((1 - p) / (vocab - 1))] * (vocab - 1))
    return torch.tensor(rows, dtype=F64)


def test_archer_entropy_split_oracle():
    """Entropies 0.1 … 1.0 → q = quantile_0.8 = 0.82 → exactly tokens 0.9 and 1.0 are high-entropy. With ratio 1.4 and
    A > 0 only those two still get gradient (clip 0.5 vs 0.2); with A = 0 the KL reaches only the low tokens
    (β_high = 0)."""
    entropies = [0.1 * (k + 1) for k in range(10)]
    logits = _logits_with_entropy(entropies)[None]
    assert_close(K.entropy(logits)[0], torch.tensor(entropies, dtype=F64), "constructed entropies", atol=1e-9)
    mask = torch.ones(1, 10, dtype=torch.bool)
    old = torch.full((1, 10), -1.0, dtype=F64)
    logps = (old + math.log(1.4)).requires_grad_()
    out = archer(logps, old, old, torch.tensor([1.0], dtype=F64), mask, logits=logits, kl_coef_low_entropy=0.0)
    out.loss.backward()
    assert out.metrics["high_entropy_frac"] == pytest.approx(0.2)
    assert (logps.grad[0] != 0).tolist() == [False] * 8 + [True, True]

    logps = old.clone().requires_grad_()
    ref = old - 0.3
    zero = torch.tensor([0.0], dtype=F64)
    from_logits = archer(logps, old, ref, zero, mask, logits=logits)
    from_logits.loss.backward()
    assert (logps.grad[0] != 0).tolist() == [True] * 8 + [False, False]
    from_entropy = archer(logps, old, ref, zero, mask, entropy=K.entropy(logits))  # precomputed-entropy path
    assert from_entropy.loss.item() == from_logits.loss.item()
    with pytest.raises(ValueError, match="exactly one"):
        archer(logps, old, ref, zero, mask)


# ----------------------------------------------------------------------------------------------------------
# §13 prioritized KL on critical tokens
# ----------------------------------------------------------------------------------------------------------


def critical_twin(logps, ref_logps, ref_logits, mask, kl_coef, rho, intercept, ref_temperature):
    with torch.no_grad():
        p_max = torch.softmax(ref_logits / ref_temperature, -1).max(-1).values
        c = 1 + torch.log(p_max) / math.log(ref_logits.shape[-1])
        w = (1 - intercept) * c**rho + intercept
    return kl_coef * twin_token_mean(w * 0.5 * (logps - ref_logps) ** 2, mask)


def test_critical_token_kl_matches_twin():
    b = token_batch(6, seed=15)
    b.pop("old_logps")
    b["ref_logits"] = 3.0 * torch.randn(6, T, V, generator=torch.Generator().manual_seed(15), dtype=F64)
    run_against_twin(
        critical_token_kl, critical_twin, b, diff=("logps",), const=("ref_logps", "ref_logits"), kl_coef=5.0,
        rho=3.0, intercept=-0.1, ref_temperature=2.0,
    )  # fmt: skip


@pytest.mark.parametrize("p_max,vocab,expected", [(0.9, 50257, 0.2306), (0.5, 50257, 4.9e-5), (1.0, 7, 1.0)])
def test_critical_token_weights_oracle(p_max, vocab, expected):
    """|V| = 50257, ρ = 150: max-prob 0.9 → w ≈ 0.23, 0.5 → w ≈ 0; one-hot → w = 1; uniform → w = 0."""
    rest = math.log((1 - p_max) / (vocab - 1)) if p_max < 1 else -1e4
    ref_logits = torch.full((1, 1, vocab), rest, dtype=F64)
    ref_logits[..., 0] = math.log(p_max)
    x = torch.zeros(1, 1, dtype=F64)
    out = critical_token_kl(x, x, ref_logits, ONE, ref_temperature=1.0)
    assert out.metrics["weight_mean"] == pytest.approx(expected, rel=2e-3, abs=1e-6)
    uniform = critical_token_kl(x, x, torch.zeros(1, 1, vocab, dtype=F64), ONE, ref_temperature=1.0)
    assert uniform.metrics["weight_mean"] < 1e-12


# ----------------------------------------------------------------------------------------------------------
# §14 KDRL
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
# §17 APO
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


def apo_twin(logps, old_logps, ref_logps, rewards, mask, group_size, beta):
    adv, w_kl = apo_shaping_twin(rewards.tolist(), mask.sum(-1).tolist(), group_size)
    ratio = torch.exp(logps - old_logps)
    pg = twin_ppo_clip(ratio, torch.tensor(adv, dtype=F64)[:, None].expand_as(ratio), 0.2, 0.2)
    log_r = ref_logps - logps
    k3 = torch.exp(log_r) - 1 - log_r
    pg_loss = torch.stack([pg[i][mask[i]].mean() for i in range(pg.shape[0])]).mean()
    kl = torch.stack([k3[i][mask[i]].mean() * w_kl[i] for i in range(pg.shape[0])]).mean()
    return pg_loss + beta * kl


def test_apo_matches_twin():
    b = token_batch(8, seed=19)
    b["rewards"] = torch.tensor([1.2, 0.0, 0.3, 1.0, 0.0, 0.0, 1.0, 0.2], dtype=F64)  # G = 4
    run_against_twin(apo, apo_twin, b, diff=("logps",), const=("old_logps", "ref_logps"), group_size=4, beta=0.5)


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


# ----------------------------------------------------------------------------------------------------------
# §18 GRPO-CARE
# ----------------------------------------------------------------------------------------------------------


def test_grpo_care_bonus_oracle():
    """acc [1,1,0,0], conf [0.9, 0.5, 0.95, 0.1]: A = {0, 1}, τ = 0.7 − 0.01 = 0.69 → only response 0 gets +0.5.
    A second group with no accurate response gets nothing; the cap u = 0.95 clamps confidence 0.99."""
    conf = torch.tensor([0.9, 0.5, 0.95, 0.1, 0.99, 0.2, 0.3, 0.4], dtype=F64)
    ref_logps = torch.stack([conf.log(), torch.full_like(conf, -50.0)], -1)  # second token outside the answer span
    answer_mask = torch.tensor([[True, False]] * 8)
    acc = torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0], dtype=F64)
    bonus = grpo_care_bonus(acc, ref_logps, answer_mask, group_size=4)
    assert_close(bonus, torch.tensor([0.5, 0, 0, 0, 0, 0, 0, 0], dtype=F64), "CARE bonus", atol=1e-12)
    conf2 = torch.tensor([[0.99], [0.935], [0.5], [0.1]], dtype=F64)  # cap u = 0.95 decides response 1:
    acc2 = torch.tensor([1.0, 1, 0, 0], dtype=F64)  # capped τ = 0.9425 − 0.01, uncapped τ = 0.9625 − 0.01
    args = (acc2, conf2.log(), torch.ones(4, 1, dtype=torch.bool))
    assert grpo_care_bonus(*args, group_size=4).tolist() == [0.5, 0.5, 0.0, 0.0]
    assert grpo_care_bonus(*args, group_size=4, confidence_cap=None).tolist() == [0.5, 0.0, 0.0, 0.0]


def test_ema_reference_updates_every_k_steps():
    torch.manual_seed(0)
    ref, pol = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ref.register_buffer("count", torch.tensor(1))
    pol.register_buffer("count", torch.tensor(7))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ema = EMAReference(decay=0.9, every=3)
    assert [ema.step(ref.state_dict(), pol.state_dict()) for _ in range(3)] == [False, False, True]
    for name in ("weight", "bias"):
        assert_close(ref.state_dict()[name], 0.9 * before[name] + 0.1 * pol.state_dict()[name], name, atol=1e-7)
    assert ref.count.item() == 7  # integer buffers are copied
    ema_update_(ref.state_dict(), pol.state_dict(), decay=0.0)  # decay 0 = hard copy
    assert all(torch.equal(ref.state_dict()[k], pol.state_dict()[k]) for k in before)
    with pytest.raises(KeyError):
        ema_update_({"x": torch.zeros(1)}, {"y": torch.zeros(1)}, 0.5)


# ----------------------------------------------------------------------------------------------------------
# §19 difficulty filtering, §20 ProRL resets
# ----------------------------------------------------------------------------------------------------------


def test_difficulty_filter_oracle():
    """G = 8, band [0.25, 0.75]: prompts with 1 or 7 correct are dropped, 2–6 kept (and 0, 8)."""
    pass_rates = torch.arange(9, dtype=torch.float32) / 8
    keep = difficulty_filter(pass_rates, 0.25, 0.75)
    assert keep.tolist() == [False, False, True, True, True, True, True, False, False]
    assert difficulty_filter(torch.tensor([1 / 3, 2 / 3]), 1 / 3, 2 / 3).all()  # bounds inclusive despite rounding
    with pytest.raises(ValueError):
        difficulty_filter(pass_rates, 0.8, 0.2)


def test_reference_reset_zeroes_kl_and_its_gradient():
    """After the scheduled reset (copy policy → reference) the k3 KL term and its gradient are exactly 0. (Re-creating
    the optimizer — ProRL's other half of a reset — is the recipe's one-liner; a real torch.optim import costs seconds
    here.) The stall trigger fires after `patience` non-improving validations."""
    torch.manual_seed(0)
    policy = torch.nn.Linear(4, 5)
    reference = copy.deepcopy(policy).requires_grad_(False)
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    schedule = ReferenceResetSchedule(every=3)

    def kl_term():
        logp = torch.log_softmax(policy(x), -1).gather(-1, y[:, None])
        ref_logp = torch.log_softmax(reference(x), -1).gather(-1, y[:, None])
        return K.k3(logp, ref_logp).mean()

    resets = []
    for _ in range(4):
        policy.zero_grad()
        (-torch.log_softmax(policy(x), -1).gather(-1, y[:, None]).mean() + kl_term()).backward()
        with torch.no_grad():
            for p in policy.parameters():
                p -= 0.5 * p.grad
        if schedule.step():
            assert kl_term().item() > 0  # the policy has drifted from the reference
            reference.load_state_dict(policy.state_dict())
            resets.append(schedule.steps)
            policy.zero_grad()
            kl = kl_term()
            kl.backward()
            assert kl.item() == 0.0 and all((p.grad == 0).all() for p in policy.parameters())
    assert resets == [3] and schedule.resets == 1

    stall = ReferenceResetSchedule(patience=2)
    assert [stall.observe(v) for v in (0.5, 0.6, 0.6, 0.55, 0.7)] == [False, False, False, True, False]
